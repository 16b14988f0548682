#!/usr/bin/env bash
# Set up (if needed) and run the test suite.
set -euo pipefail
. "$(dirname "$0")/setup.sh"
python -m pytest -q "$@"
