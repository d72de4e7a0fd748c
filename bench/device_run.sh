#!/usr/bin/env bash
# GPU benchmark on the device tool's host: the network alone (bench.network), the in-process profiles of preprocess,
# postprocess, the image copies and whole batches (bench.profile_detection, bench.profile_postprocess,
# bench.profile_copies, bench.profile_request: wall, GPU time, peak memory, operators by shape; their
# summary lines go to profile.txt), served results against in-process ones (bench.served_check), the served
# ensemble (bench.run, extra arguments passed on, e.g. --mps --instances preprocess=6,postprocess=6 --models
# face_fusion --concurrency 1,16,64,128 --skip-baseline for README's latest figures, or --instances gpu; either way
# on a GPU host with the GPU configs' batching delays and threads), then a per-model timeline at c=128
# (bench.stall_probe, one instance each, no MPS). Results go to bench/results, or under the device tool (OUT set)
# into one archive, $OUT/results.tgz, written however the run ends: the tool brings back at most 8 files, and a
# sweep writes more (session 12 lost its CSV, summary and profiles that way). Unpack it into bench/results here.
set -euo pipefail
source bench/device_env.sh
if [ -n "${OUT:-}" ]; then
  RESULTS=/tmp/device-results
  rm -rf "$RESULTS"
  trap 'tar -czf "$OUT/results.tgz" -C "$RESULTS" . && echo "[device] results: $OUT/results.tgz"' EXIT
else
  RESULTS=bench/results
fi
mkdir -p "$RESULTS"
python3 -m bench.network --out "$RESULTS"
{
  python3 -m bench.profile_detection --device cuda --batches 2,64 --repeats 3 --preprocess | grep '^\[profile\]'
  python3 -m bench.profile_postprocess --rows 1,32 | grep '^\[profile\]'
  python3 -m bench.profile_copies --images 32 --keep-freed-memory | grep '^\[copies\]'
  python3 -m bench.profile_request --rows 1,8 --repeats 5 --by-operator | grep '^\[request\]'
} | tee "$RESULTS/$(date +%F)_profile.txt"
python3 -m bench.served_check --pairs 16 --device cuda --min-psnr 30 | tail -3
python3 -m bench.run --out "$RESULTS" "$@"
python3 -m bench.stall_probe --concurrency 128 --seconds 30 --out "$RESULTS" | grep "^\[stall-probe\]"
