#!/usr/bin/env bash
# What a session lent the GPU machine carries there for issue 17's GPU part (benchmarks/gpu_session.sh runs it):
# .gpu-kit/ (git-ignored), made here because the device machine reaches no package registry and has no TensorFlow.
#   whl/    the Python 3.12 wheels of the packages its image lacks (KINDS.md in the device tool's folder lists the image's),
#           at the versions installed in this environment; numpy, scipy, Pillow, tifffile, onnxruntime, JAX and PyTorch
#           are the image's own; imagecodecs (26 MB) stays behind: the synthetic SVS's JPEG tiles and thumbnails are
#           decoded by simplejpeg (slides/direct.py), and the kit with the working tree must stay under 64 MiB; so does
#           opencv-python-headless (64 MB): a tile averaged 2 x 2 is halved by Pillow there, the same pixels (slides/base.py)
#   model/  CancerNet of bench's default width with random weights and its ONNX export (`cancernet bench`'s own default
#           model, whose export needs TensorFlow): throughput does not depend on the weights
# Run from this environment (the project's .venv active): bash benchmarks/gpu_kit.sh; it prints the kit's size (the device
# tool carries at most 64 MiB with the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
kit=.gpu-kit
rm -rf "$kit" && mkdir -p "$kit/whl"
pkgs="keras namex optree dask distributed partd locket zict tblib tornado zarr numcodecs donfig crc32c google-crc32c
      msgspec openslide-python openslide-bin simplejpeg"
for p in $pkgs; do  # those this environment has (a version here that needs none of them: left out, said)
  v=$(python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p" 2>/dev/null) \
    || { echo "$p: not installed here, left out"; continue; }
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
    -d "$kit/whl" "$p==$v" 2>&1 | grep -v "^WARNING: Location" || true
  ls "$kit"/whl | grep -qi "^$(echo "$p" | tr - _)-$v" || { echo "no Python 3.12 wheel of $p $v for Linux x86-64" >&2; exit 1; }
done
KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=3 python -c "
import sys; from pathlib import Path; from cancernet_batch.bench import _random_model; _random_model(Path(sys.argv[1]))" "$kit/model"
du -sh "$kit" "$kit"/whl "$kit"/model
