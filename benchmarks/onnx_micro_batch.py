"""ONNX Runtime on CPU: tiles per model call within a batch (``OnnxEngine.micro_batch``), rate and memory.

    python benchmarks/onnx_micro_batch.py [--model MODEL_DIR] [--threads 1,2] [--micro 0,4,8,16,32,64]
                                          [--batch 256] [--rounds 3] [--seconds 1.5] [--json OUT]

Each measurement is a fresh process (ONNX Runtime keeps the memory of its largest call): the engine with
``--threads`` intra-op threads and batches of ``--batch`` tiles, run in calls of ``micro`` tiles (0: one call a
batch, as engines ran before), two batches of warm-up, then whole batches for ``--seconds``. It prints tiles/s
(range over ``--rounds`` rounds; the sizes alternate within each round) and the process's peak resident memory.
Without ``--model`` a CancerNet of the default width with random weights is used (the rate does not depend on the
weights). The default of :data:`cancernet_batch.engines.ONNX_CPU_TILES_PER_THREAD` comes from this script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

ONE = r"""
import json, resource, sys, time
import numpy as np
from cancernet_batch.engines import OnnxEngine
model, threads, batch, micro, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
eng = OnnxEngine(model, threads=threads, batch_size=batch, micro_batch=micro)
tiles = np.random.default_rng(0).integers(0, 256, (2 * batch, 50, 50, 3), dtype=np.uint8)
eng.predict(tiles)  # two batches of warm-up
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    n += len(eng.predict(tiles[:batch]))
rate = n / (time.perf_counter() - t0)
print(json.dumps({"rate": rate, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--micro", default="0,4,8,16,32,64")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    threads = [int(v) for v in a.threads.split(",")]
    micros = [int(v) for v in a.micro.split(",")]
    model = a.model
    tmp = None
    if model is None:
        from pathlib import Path

        from cancernet_batch.bench import _random_model

        tmp = tempfile.mkdtemp(prefix="onnx-micro-")
        model = str(_random_model(Path(tmp) / "model"))
    from cancernet_batch.cluster import worker_environ
    from cancernet_batch.config import ClusterConfig

    # malloc as in a local worker (the engine threads are set by --threads here)
    malloc = {k: v for k, v in worker_environ(ClusterConfig(workers=1)).items() if k.startswith("MALLOC_")}
    env = {**os.environ, **malloc}
    results: dict[tuple[int, int], list[dict]] = {(t, m): [] for t in threads for m in micros}
    for r in range(a.rounds):
        for t in threads:
            order = micros if r % 2 == 0 else micros[::-1]
            for m in order:
                p = subprocess.run([sys.executable, "-c", ONE, model, str(t), str(a.batch), str(m), str(a.seconds)],
                                   capture_output=True, text=True, env=env, check=True)
                results[(t, m)].append(json.loads(p.stdout.strip().splitlines()[-1]))
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {when}, {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or ''}, load average "
          f"{os.getloadavg()[0]:.2f}; batch {a.batch}, {a.rounds} rounds")
    print("| intra-op threads | tiles per call | tiles/s (range) | x whole batches | peak MiB |")
    print("|---:|---:|---:|---:|---:|")
    rows = []
    for t in threads:
        base = sorted(x["rate"] for x in results[(t, 0)]) if (t, 0) in results else None
        for m in micros:
            rates = sorted(x["rate"] for x in results[(t, m)])
            med = rates[len(rates) // 2]
            ratio = f"{med / base[len(base) // 2]:.2f}" if base else ""
            peak = max(x["peak_mib"] for x in results[(t, m)])
            print(f"| {t} | {m or f'{a.batch} (whole)'} | {med:,.0f} ({rates[0]:,.0f}-{rates[-1]:,.0f}) | {ratio} | "
                  f"{peak:.0f} |")
            rows.append({"threads": t, "micro_batch": m, "rates": rates, "median": med, "peak_mib": peak})
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"when": when, "batch": a.batch, "rounds": a.rounds, "machine": platform.processor(),
                       "cpus": os.cpu_count(), "rows": rows}, fh, indent=1)
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
