#!/usr/bin/env bash
# GPU benchmark on the device tool's host: the network alone (bench.network), then the served ensemble (bench.run,
# extra arguments passed on). Results go to ${OUT:-bench/results}.
set -euo pipefail
source bench/device_env.sh
RESULTS="${OUT:-bench/results}"
python3 -m bench.network --out "$RESULTS"
python3 -m bench.run --out "$RESULTS" "$@"
