#!/usr/bin/env bash
# Creates .venv (if needed) with the server, then starts it; arguments go to `python -m server`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/python -m server "$@"
