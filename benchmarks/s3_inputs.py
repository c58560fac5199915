"""Benchmark: tiling slides read in place from a local S3 server against the same slides on local disk.

    python benchmarks/s3_inputs.py [--count 2] [--size 8192] [--mpp 0.25] [--target 4.0] [--out DIR]

Writes ``--count`` synthetic Aperio SVS slides and as many generic tiled TIFFs (``cancernet_batch.synth``,
``--size`` px a side at ``--mpp``), uploads them to moto's S3 server on 127.0.0.1 (the app of
``ThreadedMotoServer``, behind a layer that logs every request: ``tests/s3server.py``), then for each slide
plans and reads every kept model tile at ``--target`` µm/px (:func:`cancernet_batch.tiling.plan_slide`,
:func:`~cancernet_batch.tiling.read_tiles`, one thread, as one Dask task does):

* **local**: the file on disk, with the reader ``open_slide`` picks (OpenSlide for SVS and generic TIFF);
* **local tifffile**: the file on disk with the tifffile reader (the reader used over S3);
* **s3**: the object, ``open_slide("s3://...")``: tifffile over :class:`cancernet_batch.remote.RangeFile`.

Per slide and mode: tiles/s (open + plan + tiles, best of ``--repeat``), and for s3 the GET requests
(open, plan, tiles) and bytes the server sent, against the compressed size of the TIFF tiles that tiling
needs (the tiles the plan's overview and the kept model tiles touch). The issue's targets: tiles/s
ratio s3/local >= 0.75, bytes read <= 1.2 x the compressed size of the tiles tiling needs.
Prints a markdown table; ``--out`` gets ``s3-inputs-DATE.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def _needed(reader, level: int, boxes) -> int:
    from cancernet_batch.slides.tifffile_backend import chunk_ranges

    lvl = reader._series.levels[level]
    ranges = set()
    for x, y, w, h in boxes:
        for page in lvl.pages:
            ranges.update(chunk_ranges(page.keyframe, page, x, y, w, h))
    return sum(n for _, n in ranges)


def _tile_boxes(plan, lw, lh):
    import math

    t = plan.tile_px_level
    for r, c in plan.coords:
        x0, y0 = int(math.floor(c * t)), int(math.floor(r * t))
        yield x0, y0, min(lw, int(math.ceil((c + 1) * t))) - x0, min(lh, int(math.ceil((r + 1) * t))) - y0


def _one(open_fn, source, cfg):
    from cancernet_batch.tiling import plan_slide, read_tiles

    t0 = time.perf_counter()
    with open_fn() as reader:
        t1 = time.perf_counter()
        plan = plan_slide(source, cfg, reader=reader)
        t2 = time.perf_counter()
        read_tiles(reader, plan.level, plan.tile_px_level, plan.coords)
        t3 = time.perf_counter()
    return plan, {"open_s": t1 - t0, "plan_s": t2 - t1, "tiles_s": t3 - t2, "total_s": t3 - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=2)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--target", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from s3server import CountingS3

    from cancernet_batch.config import TileConfig
    from cancernet_batch.slides import open_slide
    from cancernet_batch.slides.tifffile_backend import TiffFileReader
    from cancernet_batch.synth import SlideSpec, write_slide

    work = Path(args.work or tempfile.mkdtemp(prefix="s3-inputs-"))
    work.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(args.count):
        for fmt, ext in (("svs", "svs"), ("tiff", "tiff")):
            p = work / f"s{k}.{ext}"
            if not p.exists():
                write_slide(SlideSpec(path=p, width=args.size, height=args.size, mpp=args.mpp, seed=70 + k, format=fmt))
            files.append(p)
    server = CountingS3().start()
    server.create_bucket("bench-slides")
    fs = server.fs()
    for p in files:
        fs.put_file(str(p), f"bench-slides/{p.name}")
    opts = server.options()
    cfg = TileConfig(target_mpp=args.target)
    rows = []
    try:
        for p in files:
            url = f"s3://bench-slides/{p.name}"
            best = {}
            for _ in range(args.repeat):
                for mode, src, fn in (("local", p, lambda: open_slide(p)),
                                      ("local tifffile", p, lambda: TiffFileReader(p)),
                                      ("s3", url, lambda: open_slide(url, storage_options=opts))):
                    server.reset()
                    plan, t = _one(fn, src, cfg)
                    gets = server.gets(p.name)
                    if mode not in best or t["total_s"] < best[mode][1]["total_s"]:
                        best[mode] = (plan, t, gets)
            plan, t, _ = best["s3"]
            # where the s3 requests went: open (header), plan (overview), tiles; counted in a separate pass
            server.reset()
            reader = open_slide(url, storage_options=opts)
            g_open = server.gets(p.name)
            server.reset()
            from cancernet_batch.tiling import plan_slide, read_tiles

            plan = plan_slide(url, cfg, reader=reader)
            g_plan = server.gets(p.name)
            reader.close()
            reader = open_slide(url, storage_options=opts)  # a fresh reader: tiles not already prefetched by the plan
            server.reset()
            read_tiles(reader, plan.level, plan.tile_px_level, plan.coords)
            g_tiles = server.gets(p.name)
            lw, lh = reader.level_dimensions[plan.level]
            need_tiles = _needed(reader, plan.level, list(_tile_boxes(plan, lw, lh)))
            reader.close()
            n = plan.n_tiles
            row = {"slide": p.name, "bytes": p.stat().st_size, "tiles": n, "level": plan.level,
                   "tiles_per_s": {m: n / best[m][1]["total_s"] for m in best},
                   "seconds": {m: best[m][1] for m in best},
                   "gets": {"open": len(g_open), "plan": len(g_plan), "tiles": len(g_tiles),
                            "whole_run": len(best["s3"][2])},
                   "sent": {"open": sum(g.sent for g in g_open), "plan": sum(g.sent for g in g_plan),
                            "tiles": sum(g.sent for g in g_tiles), "whole_run": sum(g.sent for g in best["s3"][2])},
                   "needed_tile_bytes": need_tiles}
            row["ratio_s3_vs_local"] = row["tiles_per_s"]["s3"] / row["tiles_per_s"]["local"]
            row["ratio_s3_vs_local_tifffile"] = row["tiles_per_s"]["s3"] / row["tiles_per_s"]["local tifffile"]
            row["tile_bytes_over_needed"] = row["sent"]["tiles"] / max(1, need_tiles)
            rows.append(row)
    finally:
        server.stop()

    now = datetime.datetime.now(datetime.timezone.utc)
    machine = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "note": "shared VM: other engineers' jobs ran at the same time"}
    lines = [f"S3 inputs vs local disk, {now:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs ({machine['note']}); "
             f"{args.count} x (SVS, TIFF) of {args.size} px at {args.mpp} µm/px, tiled at {args.target} µm/px", "",
             "| slide | tiles | local tiles/s | local tifffile tiles/s | s3 tiles/s | s3/local | s3/local tifffile "
             "| GETs open/plan/tiles | tile bytes / needed |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tp = r["tiles_per_s"]
        lines.append(f"| {r['slide']} | {r['tiles']} | {tp['local']:.0f} | {tp['local tifffile']:.0f} | {tp['s3']:.0f} "
                     f"| {r['ratio_s3_vs_local']:.2f} | {r['ratio_s3_vs_local_tifffile']:.2f} "
                     f"| {r['gets']['open']}/{r['gets']['plan']}/{r['gets']['tiles']} "
                     f"| {r['tile_bytes_over_needed']:.3f} ({r['sent']['tiles']:,} / {r['needed_tile_bytes']:,}) |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"s3-inputs-{now:%Y%m%d-%H%M%S}"
        stem.with_suffix(".json").write_text(json.dumps({"date": now.isoformat(), "machine": machine, "args": vars(args),
                                                         "rows": rows}, indent=2))
        stem.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
