"""Scenario: how `cancernet run` scales with the number of slides and with slide size, and its memory.

    python benchmarks/scaling.py [--model MODEL_DIR] [--counts 1,4,16] [--count-size 20000]
                                 [--sizes 10000,20000,30000,40000,50000] [--workers 2] [--out benchmarks/results]

Every point is one end-to-end `cancernet run` (tile + predict + report, a fresh local Dask cluster
started inside the timing) over synthetic Aperio slides at 0.5 µm/px (made once per shape and
kept in the work folder). For each point: wall time, tiles, the time to the first reported input
(the run streams: stages overlap, so there is no time per stage), the peak resident memory of
each worker process and of the client. A least-squares line through wall time against
tiles gives the fixed cost and the cost per 1,000 tiles of each series, and R^2 says how straight
the line is. Prints markdown and writes JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = Path(__file__).resolve().parents[1]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def linear_fit(x: list[float], y: list[float]) -> dict:
    """Least squares ``y = a + b x``: intercept, slope and R^2."""
    import numpy as np

    xs, ys = np.asarray(x, float), np.asarray(y, float)
    if len(xs) < 2 or np.ptp(xs) == 0:
        return {"intercept": None, "slope": None, "r2": None}
    b, a = np.polyfit(xs, ys, 1)
    pred = a + b * xs
    ss_res, ss_tot = float(((ys - pred) ** 2).sum()), float(((ys - ys.mean()) ** 2).sum())
    return {"intercept": float(a), "slope": float(b), "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def slides(work: Path, count: int, size: int, mpp: float) -> str:
    """A folder of ``count`` synthetic slides of ``size`` px, made on first use."""
    from cancernet_batch.synth import synth_slides

    d = work / f"slides-{count}x{size}"
    done = d / ".complete"
    if not done.exists():
        t0 = time.perf_counter()
        synth_slides(d, count=count, size=size, mpp=mpp, seed=size + count, detail_mpp=2.0)
        done.write_text("ok\n")
        print(f"made {count} slides of {size} px in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return str(d)


def point(series: str, count: int, size: int, args, work: Path, model_dir: Path) -> dict:
    import shutil

    from cancernet_batch import bench

    inputs = [slides(work, count, size, args.mpp)]
    run = work / f"run-{series}-{count}x{size}"
    shutil.rmtree(run, ignore_errors=True)
    f = bench.end_to_end(inputs, run, model_dir, workers=args.workers, batch_size=args.batch_size, engine=args.engine)
    shutil.rmtree(run, ignore_errors=True)
    row = {"series": series, "slides": count, "size_px": size, "megapixels": count * size * size / 1e6,
           "tiles": f.patches, "wall_s": round(f.seconds, 2), "patches_per_second": round(f.rate, 1), **f.settings}
    print(f"{series}: {count} x {size} px -> {f.patches} tiles in {f.seconds:.1f} s "
          f"(peak {row['peak_worker_rss_mib']} MiB per worker)", file=sys.stderr)
    return row


def markdown(rows: list[dict], fits: dict) -> str:
    out = ["| series | slides | size (px) | tiles | wall (s) | first report (s) | cluster (s) "
           "| patches/s | s per slide | peak MiB per worker | client peak MiB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        first = r.get("first_report_seconds")
        out.append(f"| {r['series']} | {r['slides']} | {r['size_px']:,} | {r['tiles']:,} | {r['wall_s']:.1f} | "
                   f"{'-' if first is None else f'{first:.1f}'} | {r['cluster_seconds']:.1f} | {r['patches_per_second']:.0f} | {r['seconds_per_input']:.1f} | "
                   f"{' / '.join(f'{v:.0f}' for v in r['peak_rss_mib_per_worker'])} | {r['client_peak_rss_mib']:.0f} |")
    out.append("")
    out.append("| series | fixed cost (s) | s per 1,000 tiles | R^2 |")
    out.append("|---|---:|---:|---:|")
    for name, fit in fits.items():
        if fit["slope"] is not None:
            out.append(f"| {name} | {fit['intercept']:.1f} | {fit['slope'] * 1000:.2f} | {fit['r2']:.4f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: width-32 CancerNet, random weights)")
    ap.add_argument("--counts", default="1,4,16")
    ap.add_argument("--count-size", type=int, default=20000, help="slide side (px) of the count series")
    ap.add_argument("--sizes", default="10000,20000,30000,40000,50000")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=None, help="local workers (default: usable cores)")
    ap.add_argument("--engine", default="onnx")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--work", default=None, help="work folder (slides are kept there between runs)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()

    import tempfile

    from cancernet_batch import bench
    from cancernet_batch.cluster import usable_cores
    from cancernet_batch.modelfolder import ModelFolder

    args.workers = args.workers or usable_cores()
    work = Path(args.work or tempfile.mkdtemp(prefix="cancernet-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else work / "model"
    if not ModelFolder(model_dir).onnx.exists():
        bench._random_model(model_dir)
    rows = [point("slides", n, args.count_size, args, work, model_dir) for n in _ints(args.counts)]
    rows += [point("size", 1, s, args, work, model_dir) for s in _ints(args.sizes)]
    fits = {}
    for series in ("slides", "size"):
        sel = [r for r in rows if r["series"] == series]
        fits[series] = linear_fit([r["tiles"] for r in sel], [r["wall_s"] for r in sel])
        fits[f"{series}: first report"] = linear_fit([r["tiles"] for r in sel],
                                                     [r["first_report_seconds"] or 0.0 for r in sel])
    table = markdown(rows, fits)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"scaling-{stamp}.json").write_text(json.dumps(
        {"machine": bench.machine(), "settings": vars(args), "model": str(model_dir),
         "points": rows, "fits": fits}, indent=2) + "\n")
    (out / f"scaling-{stamp}.md").write_text(table)


if __name__ == "__main__":
    sys.exit(main())
