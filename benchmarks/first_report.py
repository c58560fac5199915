"""When the stream reports its first input, as ``cancernet bench`` counts it (issue 13), run after run.

    python benchmarks/first_report.py SLIDE... --model MODEL_DIR [--repeat 4] [--workers 2] [-v]

Each run starts a local cluster (2 workers, one thread each, ONNX Runtime at batch 256: the bench's ``run``
figure), runs ``cancernet run``'s stream (``run_pipeline``) on it and prints the cluster's start, the first
reported input and the whole wall time from the cluster's start, and their ratio (the bench's
``first_report_fraction``). The first run of a process also imports everything and starts the workers'
forkserver: it is printed with ``cold`` and left out of a comparison. ``-v``: each worker's tasks until just
after the first report (``*``: the first slide's). A comparison of two checkouts runs this script with
``PYTHONPATH=CHECKOUT`` (the script's own folder, not the current one, is first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time


def one_run(slides: list[str], model: str, workers: int, verbose: bool) -> str:
    from distributed import get_task_stream

    from cancernet_batch.cluster import ClusterConfig, dask_client
    from cancernet_batch.stages.report import ReportConfig
    from cancernet_batch.stages.run import run_pipeline
    from cancernet_batch.stages.score import PredictConfig
    from cancernet_batch.tiling import TileConfig
    from split_timeline import compute_spans

    cluster = ClusterConfig(workers=workers, threads_per_worker=1, dashboard=False)
    pcfg = PredictConfig(model_dir=model, engine="onnx", batch_size=256, cluster=cluster)
    run = tempfile.mkdtemp(prefix="first-report-")
    try:
        t00 = time.time()
        with dask_client(cluster) as client:
            t0 = time.time()
            with get_task_stream(client) as ts:
                s = run_pipeline(slides, run + "/run", TileConfig(), pcfg, ReportConfig(model_dir=model), client=client)
        wall = time.time() - t00
    finally:
        shutil.rmtree(run, ignore_errors=True)
    first = s.first_report_seconds + (t0 - t00)
    lines = [f"start {t0 - t00:.2f} first {first:.2f} wall {wall:.2f} frac {first / wall:.3f}"]
    if verbose:
        first_gid = os.path.splitext(os.path.basename(slides[0]))[0]
        rows = compute_spans(ts.data, t00)
        for w in sorted({r[3] for r in rows}):
            mine = sorted(r for r in rows if r[3] == w and r[0] < first + 0.3)
            lines.append(f"  {w}: " + " ".join(f"{k}{'*' if first_gid in key else ''} {a:.2f}-{b:.2f}"
                                               for a, b, k, _, key in mine))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slides", nargs="+")
    ap.add_argument("--model", required=True)
    ap.add_argument("--repeat", type=int, default=4, help="runs, the first of them cold (default 4)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    import cancernet_batch
    from installed import as_installed

    as_installed(os.path.dirname(os.path.dirname(cancernet_batch.__file__)))

    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, code {os.path.dirname(cancernet_batch.__file__)}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    slides = sorted(a.slides)
    for i in range(a.repeat):
        print(("cold " if i == 0 else "") + one_run(slides, a.model, a.workers, a.verbose), flush=True)


if __name__ == "__main__":  # the workers' forkserver imports this module as __mp_main__: nothing runs then
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
