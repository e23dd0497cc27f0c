#!/usr/bin/env bash
# Claude Code against this server: installs it from npm (outside the repo), serves the demo model,
# runs one non-interactive `claude -p`, and checks that it exits 0 and that its requests reached
# the engine. Not part of CI or the README's commands: it needs npm and the network, and on a
# small CPU the first request's prefill (Claude Code's ~40K-token prompt) takes minutes.
#
#   scripts/agents/claude_code.sh [prompt [claude options...]]
# e.g. `... "Say hello" --tools Read --system-prompt "You are terse."` for a short prompt (a CPU
# shared with other work may need that: Claude Code's default one takes long to prefill there).
# env: AGENTS_DIR (npm prefix, default /tmp/mla-agents), PORT (default 8765), PYTHON (default python)
set -euo pipefail
cd "$(dirname "$0")/../.."
AGENTS_DIR=${AGENTS_DIR:-/tmp/mla-agents}
PORT=${PORT:-8765}
PYTHON=${PYTHON:-python}
PROMPT=${1:-Say hello in one short sentence.}
shift || true
LOG=$(mktemp -t claude-code-server.XXXXXX.log)

[ -x "$AGENTS_DIR/node_modules/.bin/claude" ] || npm install --prefix "$AGENTS_DIR" @anthropic-ai/claude-code

"$PYTHON" -m server --port "$PORT" --log-level debug >"$LOG" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
    kill -0 "$SERVER" 2>/dev/null || { cat "$LOG"; exit 1; }
    sleep 1
done
MODEL=$(curl -s "http://127.0.0.1:$PORT/v1/models" | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')

# Every model Claude Code asks for (main, and haiku for small background tasks) is this one.
export ANTHROPIC_BASE_URL="http://127.0.0.1:$PORT" ANTHROPIC_AUTH_TOKEN=unused
export ANTHROPIC_MODEL="$MODEL" ANTHROPIC_DEFAULT_HAIKU_MODEL="$MODEL" ANTHROPIC_DEFAULT_SONNET_MODEL="$MODEL"
export ANTHROPIC_DEFAULT_OPUS_MODEL="$MODEL" ANTHROPIC_SMALL_FAST_MODEL="$MODEL"
# No telemetry, update checks or error reports: nothing leaves the machine.
export CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_AUTOUPDATER=1
export API_TIMEOUT_MS=1800000  # a long prompt's first prefill on a CPU outlasts the default
# Claude Code drops a request after 300 s without a message event (the server's pings do not count)
# and sends it again; a 40K-token first prefill on a small CPU takes longer. These turn both of its
# limits off (its fetch timeout for hosts other than Anthropic's, and its stream watchdog).
export API_FORCE_IDLE_TIMEOUT=${API_FORCE_IDLE_TIMEOUT:-false} CLAUDE_ENABLE_STREAM_WATCHDOG=${CLAUDE_ENABLE_STREAM_WATCHDOG:-0}
# Claude Code asks for 32000 output tokens; the demo model, past the 4K tokens it was trained on,
# may not end its answer before them, which takes a CPU many minutes. Its own cap, overridable.
export CLAUDE_CODE_MAX_OUTPUT_TOKENS=${CLAUDE_CODE_MAX_OUTPUT_TOKENS:-256}

start=$(date +%s)
status=0
"$AGENTS_DIR/node_modules/.bin/claude" -p "$PROMPT" "$@" || status=$?
echo "claude exited with $status after $(($(date +%s) - start)) s"
echo "requests the server served (server log: $LOG):"
grep -E 'POST /v1/messages|message: ' "$LOG" || true
exit "$status"
