"""What a chunk task costs besides its tiles (issue 13): one input's chunks tiled, scored and reported in one process.

    python benchmarks/chunk_tasks.py SLIDE... --model MODEL_DIR [--rounds 3] [--json FILE]

Runs the worker side of the stream where the tiling workers also score, in this process and without Dask: for each
slide its prepare task (plan, group, predictions), then each of its chunks as one chunk task
(:func:`~cancernet_batch.stages.tile.tile_chunk_task` with scoring and the report settings: tiled, scored and, the
last one, reported). Each round does it twice, in a fresh run folder each: the slides in whole chunks (as the middle
inputs of a run are cut) and in eighths (as the stream cuts its last input: :func:`~cancernet_batch.stages.tile.
edge_chunk`). Prints, per round and cut, the chunk tasks' CPU (all threads of this process: zarr's I/O thread
counts) and wall seconds, and their parts: the tiles' read, their write, the flag reads of the check for the
input's last chunk (``done_mask``), the report part, and the scoring's own read / model / write seconds. The
difference between the two cuts, over the extra tasks, is what a chunk task costs whatever its size. For
``RESULTS.md`` section 6; a comparison of two checkouts runs it with ``PYTHONPATH=CHECKOUT`` each.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

PARTS = ("read_tiles", "write_tiles", "done_mask", "report_task", "score read_s", "score model_s", "score write_s")


def _timed(module, name: str, acc: collections.Counter) -> None:
    """Replace ``module.name`` by a wrapper that adds its CPU seconds (this process) to ``acc[name]``."""
    fn = getattr(module, name)

    def timed(*args, **kwargs):
        c = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[name] += time.process_time() - c

    setattr(module, name, timed)


def one_cut(slides: list[str], model: str, edge: bool, acc: collections.Counter) -> dict:
    """Every slide's chunk tasks in a fresh run folder (``edge``: in eighths); tasks, tiles, CPU and wall seconds."""
    from cancernet_batch.aggregate import resolve_threshold
    from cancernet_batch.runfolder import Run
    from cancernet_batch.stages import tile
    from cancernet_batch.stages.report import ReportConfig
    from cancernet_batch.stages.score import PredictConfig, prepare_scoring
    from cancernet_batch.tiling import TileConfig

    cfg = TileConfig()
    work = Path(tempfile.mkdtemp(prefix="chunk-tasks-"))
    try:
        run = Run.of(work / "run").create()
        run.open_store("a").require_group("inputs")
        scoring = prepare_scoring(run, PredictConfig(model_dir=model, engine="onnx", batch_size=256, engine_threads=1))
        thr = resolve_threshold(run, None, model)
        report_cfg = ReportConfig(model_dir=model)
        acc.clear()
        tasks = tiles = 0
        cpu = wall = 0.0
        for s in slides:
            out = tile.prepare_slide_task(run, s, cfg, [], edge=edge, scoring=scoring)
            c, w = time.process_time(), time.perf_counter()
            for index, start, stop in out["todo"]:
                res = tile.tile_chunk_task(run, out["gid"], s, index, start, stop, out["level"], out["tile_px"], cfg,
                                           scoring.cfg, ("p", thr, report_cfg, f"claim-{out['gid']}"))
                tasks += 1
                tiles += res["n"]
                for k in ("read_s", "model_s", "write_s"):
                    acc[f"score {k}"] += res["score"][k]
            cpu += time.process_time() - c
            wall += time.perf_counter() - w
        return {"tasks": tasks, "tiles": tiles, "cpu_s": cpu, "wall_s": wall, **{p: acc[p] for p in PARTS}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slides", nargs="+")
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of both cuts; the first is a warm-up")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import cancernet_batch
    from cancernet_batch import store
    from cancernet_batch.stages import report, tile

    acc: collections.Counter = collections.Counter()
    _timed(tile, "read_tiles", acc)
    _timed(store, "write_tiles", acc)
    _timed(store, "done_mask", acc)
    _timed(report, "report_task", acc)
    slides = [os.path.abspath(s) for s in a.slides]
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f}; {len(slides)} slides; code {Path(cancernet_batch.__file__).parent}")
    rows = []
    for r in range(a.rounds):
        for edge in (False, True):
            row = {"round": r, "cut": "eighths" if edge else "whole", **one_cut(slides, a.model, edge, acc)}
            rows.append(row)
            print(f"round {r} {row['cut']:8s} {row['tasks']:3d} chunk tasks, {row['tiles']} tiles: CPU {row['cpu_s']:.3f} s, "
                  f"wall {row['wall_s']:.3f} s | " + ", ".join(f"{p} {row[p]:.3f}" for p in PARTS), flush=True)
    counted = [x for x in rows if x["round"] > 0] or rows
    whole = [x for x in counted if x["cut"] == "whole"]
    eighths = [x for x in counted if x["cut"] == "eighths"]
    extra = eighths[0]["tasks"] - whole[0]["tasks"]
    per_task = (statistics.median(x["cpu_s"] for x in eighths) - statistics.median(x["cpu_s"] for x in whole)) / max(1, extra)
    print(f"median CPU s: whole {statistics.median(x['cpu_s'] for x in whole):.3f}, eighths "
          f"{statistics.median(x['cpu_s'] for x in eighths):.3f}; {extra} more tasks: {per_task * 1000:.1f} CPU ms a task")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "cpu_ms_per_extra_task": per_task * 1000}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
