#!/usr/bin/env bash
# Codex CLI against a local mla-server on the demo model: installs @openai/codex with npm outside
# the repository, starts the server, runs one `codex exec` and checks that it exits 0 and that its
# requests reached /v1/responses. Not part of the test suite or CI (it needs npm and the network).
#
#   bash scripts/agents/codex.sh ["prompt"]      (AGENTS_DIR, PORT and PYTHON may be set)
set -euo pipefail

cd "$(dirname "$0")/../.."
AGENTS_DIR=${AGENTS_DIR:-/tmp/mla-agents}
PORT=${PORT:-8765}
PYTHON=${PYTHON:-.venv/bin/python}
PROMPT=${1:-Say hello in one sentence.}
WORK=$(mktemp -d)
trap 'kill "$SERVER" 2>/dev/null || true; rm -rf "$WORK"' EXIT

[ -x "$AGENTS_DIR/codex/node_modules/.bin/codex" ] || npm install --prefix "$AGENTS_DIR/codex" @openai/codex

"$PYTHON" -m server --port "$PORT" --log-level info >"$WORK/server.log" 2>&1 &
SERVER=$!
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
    kill -0 "$SERVER" || { cat "$WORK/server.log"; exit 1; }
    sleep 1
done

# A custom provider speaking the Responses API; Codex needs no key for it.
mkdir -p "$WORK/home" "$WORK/project"
cat >"$WORK/home/config.toml" <<TOML
model = "mla-demo"
model_provider = "mla"

[model_providers.mla]
name = "mla-server"
base_url = "http://127.0.0.1:$PORT/v1"
wire_api = "responses"
TOML

start=$(date +%s)
(cd "$WORK/project" && CODEX_HOME="$WORK/home" "$AGENTS_DIR/codex/node_modules/.bin/codex" exec \
    --skip-git-repo-check --sandbox read-only "$PROMPT" </dev/null)
echo "codex exec: exit status 0 in $(( $(date +%s) - start )) s"
grep '"POST /v1/responses' "$WORK/server.log"
