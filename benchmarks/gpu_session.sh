#!/usr/bin/env bash
# Issue 17's GPU part as one prepared command for a session lent the GPU machine (15 minutes of device time in all,
# its start included). Its steps' timeouts end it within 9.5 minutes; a kit that does not install or import on that
# machine ends it within a minute or two, leaving time to fix the kit and run it again.
#
#   here:   . .venv/bin/activate && bash benchmarks/gpu_kit.sh          # .gpu-kit/: wheels and a model (git-ignored)
#   device: run(command="bash benchmarks/gpu_session.sh", carry=[".gpu-kit"], timeout_s=590)
#
# Checked on this project's CPU machine only (no session has been lent the GPU machine yet): the kit's wheels are made for
# the device's Python 3.12; the bench command below ran with --device cpu on two CMU-1 copies (2026-12-07, its flags and
# the JAX and PyTorch roofs); gpu_decode.py's GPU rows have not run anywhere yet.
#
# On the device machine (Python 3.12 with JAX, PyTorch and torchvision on CUDA; no TensorFlow, no registry) it installs
# the kit's wheels beside the image's packages, makes synthetic slides, then measures, each step bounded by its own
# timeout and writing into $OUT as it ends (what finished comes back even if a later step does not):
#   1. gpu-decode.json/.md: the slides' compressed tiles decoded by nvJPEG (torchvision; nvImageCodec where present)
#      against every CPU core's libjpeg-turbo (benchmarks/gpu_decode.py; issue 17: a tiling option at 3 x or more);
#   2. bench-gpu.json/.md: `cancernet bench` under Keras-JAX on the GPU: the host-fed model roofs (JAX, PyTorch), the
#      predict stage with 1 and 8 workers (scoring rate / roof: issue 17 asks >= 0.7), the streaming `run` end to end,
#      and the split run (7 workers tiling, 1 scoring on the GPU), the naive loop;
#   session.log: everything printed, with the versions and nvidia-smi.
# Figures go to benchmarks/RESULTS.md section 5 with the date and the device the reply names.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
step() { echo "== $(date -u +%H:%M:%S) $*"; }
[ -d .gpu-kit/whl ] || { echo ".gpu-kit is missing: run benchmarks/gpu_kit.sh here and carry .gpu-kit"; exit 2; }
step "install the kit"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu-kit/whl/*.whl \
  || exit 3
export PYTHONPATH="/tmp/site:$PWD" KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 \
  TF_CPP_MIN_LOG_LEVEL=3
nvidia-smi || true
python3 - <<'PY' || exit 4
import importlib.metadata as m, jax, torch
print({p: m.version(p) for p in ("jax", "torch", "torchvision", "keras", "numpy", "zarr", "dask", "tifffile",
                                 "onnxruntime", "openslide-bin", "simplejpeg")})
print("jax devices:", jax.devices(), "| torch cuda:", torch.cuda.is_available(), torch.cuda.get_device_name())
import cancernet_batch.cli  # noqa: F401 - the package imports on this machine
PY
cn() { python3 -m cancernet_batch.cli "$@"; }

step "synthetic slides: 4 of 16,000 px at 0.5 µm/px made side by side, each copied 10 times (40 inputs)"
mkdir -p /tmp/g/slides
for s in 0 1 2 3; do timeout 150 python3 -m cancernet_batch.cli synth slides "/tmp/g/s$s" --count 1 --size 16000 --seed "$s" & done
wait
for s in 0 1 2 3; do
  f=$(ls /tmp/g/s$s/*.svs 2>/dev/null | head -n 1) || true
  [ -n "$f" ] || { echo "synthetic slide $s was not made"; exit 5; }
  for c in 0 1 2 3 4 5 6 7 8 9; do cp "$f" "/tmp/g/slides/s$s-c$c.svs"; done
done
ls /tmp/g/slides | wc -l

step "GPU JPEG decode against the CPU cores"
timeout 120 python3 benchmarks/gpu_decode.py /tmp/g/slides/s*-c0.svs --seconds 3 --json "$OUT/gpu-decode.json" \
  | tee "$OUT/gpu-decode.md"

step "cancernet bench, Keras-JAX on the GPU"
timeout 330 python3 -m cancernet_batch.cli bench /tmp/g/slides/*.svs --model .gpu-kit/model --engines keras --backend jax \
  --device gpu --batch-sizes 2048,16384 --workers 1,8 --roof-backends jax,torch --variants none --naive-count 50 \
  --roof-seconds 2 --no-save-autotune --json "$OUT/bench-gpu.json" --markdown "$OUT/bench-gpu.md"
echo "bench exit status $?"
step "done"
