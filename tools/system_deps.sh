#!/usr/bin/env bash
# Debian packages the local stack needs, installed only when missing (run by `make demo` / `make test`):
#   libpython3.11 - Triton's Python-backend stub (pytriton wheel) links it;
#   nginx-light   - the API gateway that tests/test_gateway.py runs in front of Triton (only with --gateway).
set -euo pipefail
missing=()
ldconfig -p | grep -q 'libpython3.11.so.1.0' || missing+=(libpython3.11)
if [ "${1:-}" = "--gateway" ] && ! command -v nginx >/dev/null 2>&1 && ! [ -x /usr/sbin/nginx ]; then
  missing+=(nginx-light)
fi
[ ${#missing[@]} -eq 0 ] && exit 0
echo "[deps] installing Debian packages: ${missing[*]}"
if [ "$(id -u)" -eq 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
else
  sudo sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${missing[*]}"
fi
