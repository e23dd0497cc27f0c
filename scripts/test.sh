#!/usr/bin/env bash
# Creates .venv (if needed) with the server and its test dependencies, checks the tree with ruff
# (lint and format) and mypy (strict, settings in pyproject.toml), then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,bench]"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
