#!/usr/bin/env bash
# Certificates and keys for a test federation: a local CA, the SuperLink's TLS certificate
# (SAN: localhost, 127.0.0.1, ::1 and every --host) and SuperNode key pairs, via `proper certs`
# (Python's cryptography; no openssl needed). See docs/deployment.md.
#   bash scripts/make_certs.sh [OUT_DIR] [N_NODES] [--host NAME ...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-certs}"
NODES="${2:-3}"
shift $(( $# > 2 ? 2 : $# ))
# shellcheck disable=SC1091
[ -x "$ROOT/.venv/bin/python" ] && . "$ROOT/.venv/bin/activate"
exec python -m sim.cli certs --out "$OUT" --nodes "$NODES" "$@"
