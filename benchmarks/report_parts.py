"""CPU time of an input's report part, piece by piece (issue 13: the report parts are worker time in a run).

    python benchmarks/report_parts.py RUN --model MODEL_DIR [--rounds 5]

``RUN`` is a scored run folder (``cancernet run`` or ``tile`` + ``predict``). Each round draws every
input's report part with :func:`cancernet_batch.stages.report.report_task` in this process (no cluster),
and times each piece of it (``time.process_time``: zarr's I/O threads count too): reading the scored
input, the IDC map, the thumbnail, the heatmap, the tile GeoJSON, the regions, the OME-Zarr and
OME-TIFF pyramids, the viewer's files. Prints the median CPU ms per input of each piece over the
rounds after a warm-up round, and the number of tiles and of IDC tiles per input. Before each round the
report folder and the stored IDC maps are removed (untimed), so each round draws them anew as a run does.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import shutil
import statistics
import sys
import time

PIECES = ("load_scored", "write_idc_map", "thumbnail_for", "write_heatmap", "write_geojson", "find_input_regions",
          "write_pyramids", "write_view")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)

    import numpy as np

    from cancernet_batch import store
    from cancernet_batch.aggregate import resolve_threshold
    from cancernet_batch.runfolder import Run
    from cancernet_batch.stages import report as report_module
    from cancernet_batch.stages.report import ReportConfig, report_task

    spent: dict[str, float] = collections.defaultdict(float)

    def timed(name, fn):
        def wrapper(*args, **kw):
            t = time.process_time()
            try:
                return fn(*args, **kw)
            finally:
                spent[name] += time.process_time() - t
        return wrapper

    for name in PIECES:
        setattr(report_module, name, timed(name, getattr(report_module, name)))
    run = Run.of(a.run)
    cfg = ReportConfig(model_dir=a.model)
    thr = resolve_threshold(run, None, a.model)
    groups = list(store.iter_inputs(run.open_store("r")))
    sizes = [(int(g["probs"].shape[0]), int((np.asarray(g["probs"][:]) >= thr.value).sum())) for _, g in groups]
    rounds: list[dict[str, float]] = []
    for r in range(a.rounds + 1):
        # as in a run: no report files and no IDC map yet (re-drawing one replaces it, which costs more)
        shutil.rmtree(run.report_dir, ignore_errors=True)
        for gid, _ in groups:
            g = run.open_store("r+", clean=False)["inputs"][gid]
            if "idc_map" in g:
                del g["idc_map"]
        spent.clear()
        t0 = time.process_time()
        for gid, _ in groups:
            report_task(run, gid, "p", thr, cfg)
        total = time.process_time() - t0
        if r:  # round 0 warms imports and caches
            rounds.append({**{k: spent[k] for k in PIECES}, "total": total})
    n = len(groups)
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {n} inputs, tiles / IDC tiles per input: "
          + ", ".join(f"{t}/{i}" for t, i in sizes))
    print(f"{'piece':<22} {'CPU ms per input (median of ' + str(a.rounds) + ' rounds)':>12}")
    for k in (*PIECES, "total"):
        print(f"{k:<22} {1000 * statistics.median(r[k] for r in rounds) / n:10.1f}")
    rest = statistics.median(r["total"] - sum(r[k] for k in PIECES) for r in rounds)
    print(f"{'(the rest)':<22} {1000 * rest / n:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
