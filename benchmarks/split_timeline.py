"""Where the time of a split run goes (issue 13): each worker's tasks, the scoring worker's model time, the client's CPU.

    python benchmarks/split_timeline.py SLIDE... --model MODEL_DIR [--workers 2] [--score-workers 1] [--repeat 2] [-v]

Runs ``cancernet run``'s stream (``run_pipeline``) on a local cluster already started (one thread a worker,
the engine on one thread, like ``cancernet bench``'s split figure) under Dask's task stream, and prints per
worker: when its first task started, its busy seconds by kind of task (preflight, prepare, chunk, score,
report), the idle gaps between its tasks and when its last task ended; the sums of the scoring tasks' own
read / model / write seconds; and the CPU seconds the client process (with the Dask scheduler in it) spent
during the run. ``--score-workers 0 --workers 1``: the same work on one worker that does everything, for
the model time without a second busy worker. ``-v`` lists every task. ``--model-beside-tiling``: the model's own rate on one thread, alone and
with tiling running in another process (is the scorer slowed by the work beside it?). Used for RESULTS.md
section 6.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time


def compute_spans(stream, t0: float = 0.0) -> list[tuple[float, float, str, str, str]]:
    """Every compute span of a Dask task stream (``get_task_stream(...).data``) as ``(start, stop, kind, worker,
    key)``, times from ``t0``; ``kind`` is the key's first word (prepare, chunk, score, report...)."""
    spans = []
    for d in stream:
        key = str(d["key"][0] if isinstance(d["key"], tuple) else d["key"])
        for ss in d["startstops"]:
            if ss["action"] == "compute":
                spans.append((ss["start"] - t0, ss["stop"] - t0, key.split("-")[0], d["worker"], key))
    return spans


def one_run(slides: list[str], model: str, workers: int, score_workers: int, verbose: bool) -> None:
    from distributed import get_task_stream

    from cancernet_batch.cluster import ClusterConfig, dask_client
    from cancernet_batch.stages import flow as flow_module
    from cancernet_batch.stages.report import ReportConfig
    from cancernet_batch.stages.run import run_pipeline
    from cancernet_batch.stages.score import PredictConfig
    from cancernet_batch.tiling import TileConfig

    parts = {"read_s": 0.0, "model_s": 0.0, "write_s": 0.0}
    on_score = flow_module.Flow._on_score

    def counting(self, inp, res, extra):
        if isinstance(res, dict):
            for k in parts:
                parts[k] += res[k]
        return on_score(self, inp, res, extra)

    flow_module.Flow._on_score = counting
    cluster = ClusterConfig(workers=workers, threads_per_worker=1, dashboard=False, score_workers=score_workers or None)
    pcfg = PredictConfig(model_dir=model, engine="onnx", batch_size=256, engine_threads=1, cluster=cluster)
    run = tempfile.mkdtemp(prefix="split-timeline-")
    try:
        with dask_client(cluster) as client:
            client.wait_for_workers(workers)
            with get_task_stream(client) as ts:
                t0, c0 = time.time(), time.process_time()
                s = run_pipeline(slides, run + "/run", TileConfig(), pcfg, ReportConfig(model_dir=model), client=client)
                wall, client_cpu = time.time() - t0, time.process_time() - c0
    finally:
        flow_module.Flow._on_score = on_score
        shutil.rmtree(run, ignore_errors=True)
    rows = compute_spans(ts.data, t0)
    print(f"run: {s.predict.tiles_scored} patches, {wall:.2f} s (run_pipeline {s.seconds['total']:.2f} s), first input "
          f"reported after {s.first_report_seconds:.2f} s; client process CPU {client_cpu:.2f} s; scoring tasks: "
          + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    for w in sorted({r[3] for r in rows}):
        mine = sorted(r for r in rows if r[3] == w)
        kinds: dict[str, float] = {}
        for a, b, k, *_ in mine:
            kinds[k] = kinds.get(k, 0.0) + b - a
        gaps = sum(max(0.0, mine[i][0] - mine[i - 1][1]) for i in range(1, len(mine)))
        print(f"  worker {w}: first task at {mine[0][0]:.2f} s, last ends {mine[-1][1]:.2f} s, busy "
              f"{sum(kinds.values()):.2f} s (" + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items())
              + f"), idle between tasks {gaps:.2f} s")
        if verbose:
            for a, b, k, _, key in mine:  # the task's kind and its input (the key: kind-input-...)
                print(f"      {a:6.2f} {b:6.2f} {b - a:5.2f} {k:8s} {key[len(k) + 1:].rsplit('-', 2)[0]}")


_TILING_LOOP = """
import sys
from cancernet_batch.config import TileConfig
from cancernet_batch.slides import open_slide
from cancernet_batch.tiling import plan_slide, read_tiles
readers = [open_slide(p) for p in sys.argv[1:]]
plans = [plan_slide(p, TileConfig(), reader=r) for p, r in zip(sys.argv[1:], readers)]
while True:
    for r, p in zip(readers, plans):
        read_tiles(r, p.level, p.tile_px_level, p.coords)
"""


def model_beside_tiling(slides: list[str], model: str, rounds: int = 3) -> None:
    """ONNX Runtime on one thread, 256-tile batches: patches/s alone, then with tiling running in another process."""
    import subprocess

    import numpy as np
    import onnxruntime as ort

    from cancernet_batch.modelfolder import ModelFolder

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(ModelFolder(model).onnx), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(0).integers(0, 256, (256, 50, 50, 3), dtype=np.uint8)
    x = x.astype(np.float32) if "float" in inp.type else x

    def rate(n: int = 20) -> float:
        t = time.perf_counter()
        for _ in range(n):
            sess.run(None, {inp.name: x})
        return n * 256 / (time.perf_counter() - t)

    rate(3)
    alone = [rate() for _ in range(rounds)]
    tiling = subprocess.Popen([sys.executable, "-c", _TILING_LOOP, *slides[:4]])
    try:
        time.sleep(3)  # the loop's slides opened and planned: it is tiling now
        beside = [rate() for _ in range(rounds)]
    finally:
        tiling.kill()
        tiling.wait()
    print("model on one thread, patches/s: alone " + ", ".join(f"{r:.0f}" for r in alone)
          + "; with tiling in another process " + ", ".join(f"{r:.0f}" for r in beside)
          + f" (median ratio {np.median(beside) / np.median(alone):.2f})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slides", nargs="+")
    ap.add_argument("--model", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--score-workers", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--model-beside-tiling", action="store_true",
                    help="also: the model's rate on one thread alone and with tiling on the other core")
    a = ap.parse_args(argv)
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {len(a.slides)} slides, "
          f"{a.workers} workers, {a.score_workers} scoring")
    for _ in range(a.repeat):
        one_run(a.slides, a.model, a.workers, a.score_workers, a.verbose)
    if a.model_beside_tiling:
        model_beside_tiling(a.slides, a.model)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
