#!/usr/bin/env bash
# Creates .venv (if needed) with the server and its test dependencies, then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,bench]"
exec .venv/bin/python -m pytest "$@"
