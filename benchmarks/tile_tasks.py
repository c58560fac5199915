"""Where the tile stage's time goes: every Dask task of ``tile`` on a started local cluster, in order.

    python benchmarks/tile_tasks.py SLIDE... [--workers 2] [--decode fast]

Prints, per task (preflight, prepare = plan + store group, chunk = read, resample and write its
tiles), when it started after the stage's start, how long it ran and on which worker; then the
stage's wall time. Used for the per-task figures in ``RESULTS.md`` section 9.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slides", nargs="+")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--decode", default="fast")
    a = ap.parse_args(argv)

    from distributed import get_task_stream

    from cancernet_batch.cluster import ClusterConfig, dask_client
    from cancernet_batch.config import TileConfig
    from cancernet_batch.stages.tile import tile_run

    run = tempfile.mkdtemp(prefix="tile-tasks-")
    try:
        with dask_client(ClusterConfig(workers=a.workers, dashboard=False)) as client:
            client.wait_for_workers(a.workers)
            with get_task_stream(client) as ts:
                t0 = time.time()
                s = tile_run(a.slides, run, TileConfig(decode=a.decode), client=client)
                wall = time.time() - t0
        print(f"{'task':<44} {'start s':>8} {'ran s':>7}  worker")
        for d in sorted(ts.data, key=lambda d: d["startstops"][0]["start"]):
            key = d["key"][0] if isinstance(d["key"], tuple) else d["key"]
            for ss in d["startstops"]:
                if ss["action"] == "compute":
                    print(f"{key[:44]:<44} {ss['start'] - t0:8.2f} {ss['stop'] - ss['start']:7.2f}  {d['worker']}")
        print(f"stage: {s.tiles_written} tiles of {len(s.tiled)} inputs in {wall:.2f} s")
    finally:
        shutil.rmtree(run, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
