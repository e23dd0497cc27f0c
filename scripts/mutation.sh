#!/usr/bin/env bash
# Mutation testing with mutmut 3 (pip install -e ".[test]"), by hand, not in CI.
#
# What is mutated and which tests judge each mutant: [tool.mutmut] in pyproject.toml; the why and
# the last measured score: docs/testing.md. The run happens in a scratch copy of the committed tree
# at MUTATION_REV (default HEAD; others' uncommitted work is not measured), so the checkout gets no
# mutants/ directory and nothing in it is touched.
#
#   scripts/mutation.sh                 # the whole run, stopped after MUTATION_TIMEOUT seconds
#   MUTATION_TIMEOUT=600 JOBS=4 MUTATION_REV=HEAD~1 scripts/mutation.sh
#   KEEP=/tmp/mm scripts/mutation.sh    # keep the copy, to inspect survivors: (cd /tmp/mm && mutmut show NAME)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
JOBS=${JOBS:-$(nproc 2>/dev/null || sysctl -n hw.ncpu)}
MUTATION_TIMEOUT=${MUTATION_TIMEOUT:-1500}
WORK=${KEEP:-$(mktemp -d "${TMPDIR:-/tmp}/mla-mutation.XXXXXX")}
[ -n "${KEEP:-}" ] || trap 'rm -rf "$WORK"' EXIT

mkdir -p "$WORK"
git -C "$ROOT" archive "${MUTATION_REV:-HEAD}" | tar -x -C "$WORK"
cd "$WORK"
rm -rf mutants

echo "mutation run in $WORK with $JOBS workers, at most ${MUTATION_TIMEOUT}s" >&2
started=$(date +%s)
status=0
timeout "$MUTATION_TIMEOUT" "$PYTHON" -m mutmut run --max-children "$JOBS" >"$WORK/mutmut-run.log" 2>&1 || status=$?
echo "mutmut run: exit $status after $(($(date +%s) - started))s (124: stopped by the time limit; the score is then partial)" >&2

# One line a mutant: "<name>: <status>"; the score counts killed (and timed-out) among those tested.
"$PYTHON" -m mutmut results --all true >"$WORK/results.txt" 2>/dev/null || "$PYTHON" -m mutmut results >"$WORK/results.txt"
"$PYTHON" - "$WORK/results.txt" <<'PY'
import collections, sys
counts = collections.Counter()
for line in open(sys.argv[1]):
    name, sep, status = line.rpartition(": ")
    if sep:
        counts[status.strip()] += 1
killed = counts["killed"] + counts["timeout"]
judged = killed + counts["survived"]
print(dict(counts))
if judged:
    print(f"score: {killed}/{judged} = {100 * killed / judged:.1f}% (killed + timeout over killed + timeout + survived)")
PY
grep -E ": survived$" "$WORK/results.txt" || true
