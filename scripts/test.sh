#!/usr/bin/env bash
# Set up (if needed), lint, and run the test suite.
set -euo pipefail
. "$(dirname "$0")/setup.sh"
# the lint settings are in pyproject.toml ([tool.ruff]; .venv and runs/ are not linted)
ruff check .
python -m pytest -q "$@"
