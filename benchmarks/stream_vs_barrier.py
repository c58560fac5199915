"""The stream against the same work stage by stage (issue 13), alternating, with each kind of task's busy time.

    python benchmarks/stream_vs_barrier.py SLIDE... --model MODEL_DIR [--passes 4] [--workers 2] [--warm]

Each pass runs ``cancernet run``'s stream (``run_pipeline``) and the barrier version (``tile_run``, then
``predict_run``, then ``make_report``: what ``cancernet bench`` calls stage by stage) on the same inputs,
one after the other; which goes first alternates from pass to pass. Each run gets a fresh local cluster
(as a user's command does: its start is timed apart and left out of the run's seconds), or with ``--warm``
all runs share one cluster started once. For every run it prints the run's seconds and, from Dask's task
stream, the seconds the workers spent in each kind of task (prepare, chunk, score, report) with their
count: where the two versions' work differs. The bench's ``stream / stage by stage`` figure is one pair
of runs; this gives several, so that a difference can be told from the machine's drift. Used for
RESULTS.md section 6.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from installed import as_installed  # noqa: E402 - a sibling script
from split_timeline import compute_spans  # noqa: E402 - a sibling script


def busy_by_kind(stream) -> dict[str, tuple[float, int]]:
    """Seconds of compute and number of tasks of each kind (the key's first word) in a Dask task stream."""
    busy: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    for start, stop, kind, _, _ in compute_spans(stream):
        busy[kind] += stop - start
        count[kind] += 1
    return {k: (busy[k], count[k]) for k in sorted(busy)}


def one_run(kind: str, slides: list[str], model: str, pcfg, client) -> tuple[float, dict, float | None]:
    """``(seconds, busy_by_kind, first input reported after s)``; the stage-by-stage version reports nothing
    before its end (None)."""
    from distributed import get_task_stream

    from cancernet_batch.stages.report import ReportConfig, make_report
    from cancernet_batch.stages.run import run_pipeline
    from cancernet_batch.stages.score import predict_run
    from cancernet_batch.stages.tile import tile_run
    from cancernet_batch.tiling import TileConfig

    work = tempfile.mkdtemp(prefix="stream-vs-barrier-")
    run = os.path.join(work, "run")
    try:
        with get_task_stream(client) as ts:
            t0 = time.perf_counter()
            first = None
            if kind == "stream":
                first = run_pipeline(slides, run, TileConfig(), pcfg, ReportConfig(model_dir=model),
                                     client=client).first_report_seconds
            else:
                tile_run(slides, run, TileConfig(), client=client)
                predict_run(run, pcfg, client=client)
                make_report(run, ReportConfig(model_dir=model), client=client)
            seconds = time.perf_counter() - t0
        return seconds, busy_by_kind(ts.data), first
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slides", nargs="+")
    ap.add_argument("--model", required=True)
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--warm", action="store_true", help="one cluster for every run (default: a fresh one per run)")
    a = ap.parse_args(argv)
    as_installed()

    from cancernet_batch.cluster import ClusterConfig, dask_client
    from cancernet_batch.stages.score import PredictConfig

    pcfg = PredictConfig(model_dir=a.model, engine="onnx", batch_size=256,
                         cluster=ClusterConfig(workers=a.workers, threads_per_worker=1, dashboard=False))
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {len(a.slides)} inputs, {a.workers} workers "
          f"(one thread each), {'one cluster for all runs' if a.warm else 'a fresh cluster per run'}")
    shared = dask_client(pcfg.cluster) if a.warm else contextlib.nullcontext()
    seconds: dict[str, list[float]] = {"stream": [], "barrier": []}
    with shared as warm_client:
        for p in range(a.passes):
            for kind in ("stream", "barrier") if p % 2 == 0 else ("barrier", "stream"):
                t0 = time.perf_counter()
                with contextlib.nullcontext(warm_client) if a.warm else dask_client(pcfg.cluster) as client:
                    client.wait_for_workers(a.workers)
                    start = time.perf_counter() - t0
                    s, busy, first = one_run(kind, a.slides, a.model, pcfg, client)
                seconds[kind].append(s)
                firsts = f"; first input reported after {first:.2f} s" if first is not None else ""
                print(f"pass {p + 1} {kind:8s} run {s:6.2f} s (cluster start {start:4.2f} s{firsts}); busy "
                      f"{sum(b for b, _ in busy.values()):6.2f} s: "
                      + ", ".join(f"{k} {b:.2f} s / {n}" for k, (b, n) in busy.items())
                      + f"; load {os.getloadavg()[0]:.2f}", flush=True)
    pairs = [b / s for s, b in zip(seconds["stream"], seconds["barrier"])]
    print("stream / stage by stage, patches/s, per pass: " + ", ".join(f"{r:.3f}" for r in pairs)
          + f"; mean {sum(pairs) / len(pairs):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
