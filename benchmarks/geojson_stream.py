"""Benchmark: the GeoJSON of one input with 100,000 IDC tiles, and its IDC regions; time and peak memory.

    python benchmarks/geojson_stream.py [--tiles 100000] [--work DIR] [--json OUT.json]

One synthetic input (no model, no store): a grid of ``--tiles`` scored tiles (250 x 400 for
100,000) with a smooth random probability field. Rows:

* ``tiles: whole string`` — what the report did before issue 18: every feature in a list, the
  whole FeatureCollection joined into one string, then written;
* ``tiles: streamed`` / ``tiles: streamed, gzip`` — :func:`cancernet_batch.geojson.write_geojson`
  fed by :func:`~cancernet_batch.geojson.iter_idc_features` (features serialised 1,000 at a time);
* ``regions: trace`` — :func:`cancernet_batch.regions.find_regions` (label + boundary walk) and
  ``regions: shapely union`` — the same polygons by ``shapely.ops.unary_union`` of the tile
  boxes, for comparison (needs shapely);

at threshold 0 (all tiles IDC: the largest tile file; one region) and at the median (half the
tiles IDC, regions with holes); and the regions alone of a map of independent uniform noise at 0.5
(the worst case for tracing: thousands of small regions). Time is wall clock with tracemalloc off; peak is the
tracemalloc peak of Python allocations (numpy included) during the call, in a second run.
Prints a markdown table with the date and machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def synthetic(tiles: int, seed: int = 18) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """``(grid shape, coords, probs)`` of one input with ``tiles`` scored tiles, every grid cell scored."""
    from scipy import ndimage

    rows = max(1, int(round((tiles * 0.625) ** 0.5)))
    cols = -(-tiles // rows)
    field = ndimage.gaussian_filter(np.random.default_rng(seed).random((rows, cols)), 4.0)
    field = (field - field.min()) / (np.ptp(field) or 1.0)
    coords = np.argwhere(np.ones((rows, cols), bool))[:tiles].astype(np.int32)
    return (rows, cols), coords, field[coords[:, 0], coords[:, 1]].astype(np.float32)


def _old_write(path: Path, gid, coords, probs, thr, tile_px) -> None:
    from cancernet_batch.atomic import write_text
    from cancernet_batch.geojson import idc_features

    features = idc_features(gid, coords, probs, thr, tile_px)
    body = ",\n".join(json.dumps(f, separators=(",", ":"), allow_nan=False) for f in features)
    write_text(path, '{"type":"FeatureCollection","features":[\n' + body + "\n]}\n")


def _shapely_union(shape, coords, probs, thr, tile_px):
    from shapely import box
    from shapely.ops import unary_union

    rc = coords[probs >= thr]
    return unary_union(box(rc[:, 1] * tile_px, rc[:, 0] * tile_px, (rc[:, 1] + 1) * tile_px, (rc[:, 0] + 1) * tile_px))


def _measure(fn) -> tuple[float, float, object]:
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak / 2**20, out


def measure(tiles: int, work: Path) -> list[dict]:
    from cancernet_batch.geojson import iter_idc_features, write_geojson
    from cancernet_batch.regions import find_regions

    shape, coords, probs = synthetic(tiles)
    tile_px = 403.2  # 50 * 4.0 / 0.496 level-0 px per tile (a 0.496 µm/px slide)
    rows = []
    noise = np.random.default_rng(1).random(probs.size).astype(np.float32)
    for label, probs, thr in (("all IDC", probs, 0.0), ("half IDC", probs, float(np.median(probs))),
                              ("noise, half IDC", noise, 0.5)):
        idc = int((probs >= thr).sum())
        cases = {
            "tiles: whole string": (work / "old.geojson",
                                    lambda p: _old_write(p, "bench", coords, probs, thr, tile_px)),
            "tiles: streamed": (work / "new.geojson", lambda p: write_geojson(
                p, iter_idc_features("bench", coords, probs, thr, tile_px))),
            "tiles: streamed, gzip": (work / "new.geojson.gz", lambda p: write_geojson(
                p, iter_idc_features("bench", coords, probs, thr, tile_px), gzip=True)),
            "regions: trace": (None, lambda p: find_regions(shape, coords, probs, thr, tile_area_mm2=0.04)),
        }
        try:
            import shapely  # noqa: F401

            cases["regions: shapely union"] = (None, lambda p: _shapely_union(shape, coords, probs, thr, tile_px))
        except ImportError:
            pass
        if label.startswith("noise"):  # the worst case for regions: thousands of tiny ones
            cases = {k: v for k, v in cases.items() if k.startswith("regions")}
        for name, (path, fn) in cases.items():
            seconds, peak, out = _measure(lambda: fn(path))
            row = {"map": label, "case": name, "tiles": int(probs.size), "idc_tiles": idc,
                   "seconds": round(seconds, 3), "peak_mib": round(peak, 1),
                   "file_mib": round(path.stat().st_size / 2**20, 2) if path else None}
            if name == "regions: trace":
                row["regions"] = len(out)
                row["holes"] = sum(len(r.holes) for r in out)
            rows.append(row)
        if not label.startswith("noise"):
            old, new = (work / "old.geojson").read_bytes(), (work / "new.geojson").read_bytes()
            assert old == new, "streamed file differs from the whole-string file"
    return rows


def table(rows: list[dict]) -> str:
    out = ["| map | case | IDC tiles | regions (holes) | s | peak MiB | file MiB |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        reg = f"{r['regions']:,} ({r['holes']:,})" if "regions" in r else ""
        size = "" if r["file_mib"] is None else f"{r['file_mib']:.1f}"
        out.append(f"| {r['map']} | {r['case']} | {r['idc_tiles']:,} | {reg} | {r['seconds']:.2f} | "
                   f"{r['peak_mib']:.1f} | {size} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiles", type=int, default=100_000)
    ap.add_argument("--work", default=None, help="folder for the files (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the rows and machine as JSON here")
    args = ap.parse_args(argv)
    from cancernet_batch.machine import machine

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = measure(args.tiles, work)
    m = machine()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{when}; {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; python {m['versions']['python']}, "
          f"numpy {m['versions'].get('numpy')}")
    print(f"python benchmarks/geojson_stream.py --tiles {args.tiles}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"date": when, "machine": m, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
