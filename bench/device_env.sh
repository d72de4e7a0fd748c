#!/usr/bin/env bash
# Sourced on a GPU host with the device tool's image (Python 3.12 + CUDA torch, no internet): unpacks the carried
# Triton bundle (.device/triton_bundle.tar.xz: pytriton's tritonserver + 3.12 stub, its libraries, perf_analyzer,
# the weight files (MTCNN, the face mesh, BlazeFace) and sample photos), a numpy<2 overlay (FACTS.md: numpy 2
# empties Python-backend outputs) and, if carried, py-spy; exports PYTHONPATH/PATH so that `python3 -m bench.run`
# serves the real Triton on the GPU.
BUNDLE=/tmp/ffbundle
mkdir -p "$BUNDLE" /tmp/ffsite
[ -x "$BUNDLE/perf/perf_analyzer" ] || tar -xJf .device/triton_bundle.tar.xz -C "$BUNDLE"
# The numpy overlay: the wheel, or (half its size, for the device tool's 64 MiB per call) its files without tests,
# f2py and distutils as .device/numpy_site.tar.xz (extracted from the wheel, see bench/device_bundle.sh).
if [ -f .device/numpy_site.tar.xz ]; then
  [ -d /tmp/ffsite/numpy ] || tar -xJf .device/numpy_site.tar.xz -C /tmp/ffsite
else
  python3 -m pip install -q --no-index --no-deps --target /tmp/ffsite .device/numpy-1.26.4-*.whl 2>/dev/null
fi
# nvImageCodec (facefuse.device_imaging's decoder under FACEFUSE_JPEG_DECODER=nvimgcodec), when carried: under
# /tmp/ffsite/nvidia beside whatever nvidia/ the image's site-packages has (its __init__ extends the package's path).
if [ -f .device/nvimgcodec_site.tar.xz ] && [ ! -d /tmp/ffsite/nvidia/nvimgcodec ]; then
  tar -xJf .device/nvimgcodec_site.tar.xz -C /tmp/ffsite
fi
# py-spy for bench.run --profile-stubs, when its wheel was carried too: its one binary, taken straight out of the
# wheel (a second `pip install --target` into the same folder skipped it).
for wheel in .device/py_spy-*.whl; do
  [ -f "$wheel" ] || continue
  mkdir -p /tmp/ffsite/bin
  python3 -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); n = next(n for n in z.namelist() if n.endswith("/scripts/py-spy")); open("/tmp/ffsite/bin/py-spy", "wb").write(z.read(n))' "$wheel"
  chmod +x /tmp/ffsite/bin/py-spy
done
export PYTHONPATH="/tmp/ffsite:$BUNDLE/minipkgs:$BUNDLE:$PWD"
export PATH="$BUNDLE/perf:/tmp/ffsite/bin:$PATH"
ln -sf "$BUNDLE/perf/perf_analyzer" "$(dirname "$(python3 -c 'import sys; print(sys.executable)')")/perf_analyzer" 2>/dev/null || true
python3 -c "import numpy, torch; print('numpy', numpy.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
python3 -c "from facefuse.device_imaging import describe_jpeg_decoding as d; print('JPEG decoding:', d('cuda'))"
