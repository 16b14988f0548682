#!/usr/bin/env bash
# Set up (if needed) and run the main job: federated PROPER on Flower's simulation engine, on the
# embedded SmolLM2-135M-Instruct and the real LaMP-2 sample; ends with the per-stage table.
set -euo pipefail
. "$(dirname "$0")/setup.sh"
proper sim -c lamp2_quick "$@"
