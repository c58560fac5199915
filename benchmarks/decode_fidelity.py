"""Benchmark (issue 17): how close `--decode fast` and `--decode exact` tiles are to the pixels a slide was made from.

    python benchmarks/decode_fidelity.py --model MODEL [--slides 2] [--size 16000] [--sample 400]
        [--data ../shared/data/idc] [--patients 8863 8865 ...] [--rebuild-mpp 0.5] [--quality 90]
        [--scans NAME[=MPP] ...] [--slides-dir ../shared/data/slides]
        [--workers 2] [--work DIR] [--json OUT.json] [--results OUT.md]

``tiling_speed.py`` compares ``fast`` tiles with ``exact`` ones (the exact area averages of what the
JPEG decoder gives at full size, as the reader path gives them). Both come from the same lossy
JPEG tiles, so neither is the truth. Here each is compared with the pixels the slide was made from,
before compression. The slides are JPEG 4:2:0 YCbCr, as most scanners write them. Tiles are at the
model's µm/px, read from a level 2x finer, where ``fast`` decodes at 1/2 in the DCT:

* **synthetic**: ``--slides`` slides of ``--size`` px at 0.5 µm/px (``cancernet synth``'s drawing,
  Q90). The source of a tile is the level's own drawing (:class:`cancernet_batch.synth.LevelPixels`),
  area-averaged exactly like ``exact``. ``--sample`` tissue tiles a slide, at random.
* **real**: each of ``--patients`` (Kaggle folders under ``--data``) rebuilt as a slide at
  ``--rebuild-mpp`` (pixel repetition of the patches, ``synth.slide_from_patches``) with 4:2:0 JPEG
  tiles at ``--quality``. The source of a tile is the patient's patch at that grid position (whole
  50 x 50 patches only). The rebuilt level holds no detail finer than the patches, and its 2 x 2
  chroma samples are the patches' own pixels: a setting that favours no mode's upsampling more than
  the scanner's real detail would (see RESULTS section 9).
* **real scans**: each of ``--scans`` (real slides of ``--slides-dir``: by default CMU-1-Small-Region at its
  0.499 µm/px and the TCGA frozen section, which states no µm/px, at an assumed 0.499) decoded whole at level 0
  and written again as a slide at its µm/px (``synth.slide_from_image``: levels 4x apart by exact area
  averaging, JPEG tiles 4:2:0 at ``--quality``). Unlike the rebuilt patients, its levels hold a real 20x
  scan's detail at every scale. The source of a tile is the exact area average of the decoded level 0 over
  the tile. Tiles come from the 2 µm/px level, at a factor of 2, as on most 20x slides.

Per set and mode: mean absolute difference from the source (/255, all pixels and per channel),
the model's probabilities on the tiles against its probabilities on the source (correlation,
largest and mean difference), and ``fast`` against ``exact`` (what ``tiling_speed.py`` reports).
Prints a markdown table with the date and machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PATIENTS = ["8863", "8865", "8913", "8975", "9023", "8959"]
SCANS = ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs=0.499"]
"""The real scans of the shared data: CMU-1-Small-Region (Aperio, 20x, 0.499 µm/px, stated) and the TCGA frozen
section (Aperio JPEG 2000, a 20x scan that states no µm/px: CMU-1's 0.499 assumed, which puts its 4.003x level at
1.997 µm/px and its tiles at a factor of 2.003, as CMU-1's; at 0.5 the factor is 1.998, under 2)."""
MODES = ("fast", "exact")


def stored(run: Path) -> dict[str, tuple[dict, np.ndarray, dict]]:
    """Per input source: ``({(row, col): index}, tiles, attrs)`` of a run's tile store."""
    import zarr

    root = zarr.open_group(str(run / "tiles.zarr"), mode="r")
    out = {}
    for _, g in root["inputs"].groups():
        a = dict(g.attrs)
        index = {(int(r), int(c)): i for i, (r, c) in enumerate(np.asarray(g["coords"][:]))}
        out[a["source"]] = (index, np.asarray(g["tiles"][:]), a)
    return out


def synthetic_sources(specs, runs: dict[str, dict], sample: int, seed: int = 0):
    """``(source tiles, {mode: tiles}, decode paths)`` for up to ``sample`` random tissue tiles a slide."""
    from cancernet_batch.slides.base import area_resize
    from cancernet_batch.synth import LevelPixels

    src, tiles, paths = [], {m: [] for m in MODES}, set()
    for spec in specs:
        key = str(spec.path.resolve())
        per = {m: runs[m][key] for m in MODES}
        attrs = per["fast"][2]
        paths.add(attrs["extra"]["decode_path"])
        n = attrs["level0_tile_px"] / attrs["level_downsample"]  # model tile in level px
        lp = LevelPixels(spec, attrs["extra"]["level_mpp"])
        common = sorted(set(per["fast"][0]) & set(per["exact"][0]))
        rng = np.random.default_rng([seed, spec.seed])
        for j in sorted(rng.choice(len(common), min(sample, len(common)), replace=False)):
            r, c = common[j]
            x0, y0 = c * n, r * n
            ix, iy = int(x0), int(y0)
            w, h = min(int(np.ceil(x0 + n)), lp.width) - ix, min(int(np.ceil(y0 + n)), lp.height) - iy
            src.append(area_resize(lp.region(ix, iy, w, h), (x0 - ix, y0 - iy, x0 - ix + n, y0 - iy + n), (50, 50)))
            for m in MODES:
                tiles[m].append(per[m][1][per[m][0][(r, c)]])
    return np.stack(src), {m: np.stack(v) for m, v in tiles.items()}, sorted(paths)


def real_sources(patients: dict[str, Path], mosaics: dict, runs: dict[str, dict]):
    """``(source tiles, {mode: tiles}, decode paths)``: every grid position with a whole patch that both modes kept."""
    src, tiles, paths = [], {m: [] for m in MODES}, set()
    for name, path in patients.items():
        key = str(path.resolve())
        per = {m: runs[m][key] for m in MODES}
        paths.add(per["fast"][2]["extra"]["decode_path"])
        mosaic = mosaics[name]
        for (r, c) in sorted(set(per["fast"][0]) & set(per["exact"][0])):
            if mosaic.labels[r, c] < 0:
                continue
            box = (slice(r * 50, (r + 1) * 50), slice(c * 50, (c + 1) * 50))
            if mosaic.glass[box].any():  # an edge patch smaller than 50 x 50
                continue
            src.append(mosaic.image[box])
            for m in MODES:
                tiles[m].append(per[m][1][per[m][0][(r, c)]])
    return np.stack(src), {m: np.stack(v) for m, v in tiles.items()}, sorted(paths)


def scan_sources(scans: dict[str, tuple[Path, np.ndarray]], runs: dict[str, dict]):
    """``(source tiles, {mode: tiles}, decode paths)`` of the real scans written again as slides: every tissue tile both
    modes kept, its source the exact area average of the scan's decoded level 0 over the tile's box."""
    from cancernet_batch.slides.base import area_resize

    src, tiles, paths = [], {m: [] for m in MODES}, set()
    for name, (path, rgb) in scans.items():
        per = {m: runs[m][str(path.resolve())] for m in MODES}
        attrs = per["fast"][2]
        paths.add(attrs["extra"]["decode_path"])
        s0 = attrs["level0_tile_px"]
        for (r, c) in sorted(set(per["fast"][0]) & set(per["exact"][0])):
            src.append(area_resize(rgb, (c * s0, r * s0, (c + 1) * s0, (r + 1) * s0), (50, 50)))
            for m in MODES:
                tiles[m].append(per[m][1][per[m][0][(r, c)]])
    return np.stack(src), {m: np.stack(v) for m, v in tiles.items()}, sorted(paths)


def compare(src: np.ndarray, tiles: dict[str, np.ndarray], predict) -> dict:
    """The figures of one set: each mode against the source, and ``fast`` against ``exact``."""
    p_src = predict(src)
    p = {m: predict(t) for m, t in tiles.items()}
    row = {"tiles": int(len(src))}
    for m, t in tiles.items():
        d = np.abs(t.astype(np.int16) - src)
        row[m] = {"mad": float(d.mean()), "mad_channels": [float(v) for v in d.mean(axis=(0, 1, 2))],
                  "tile_mad_p95": float(np.percentile(d.mean(axis=(1, 2, 3)), 95)),
                  "p_corr": float(np.corrcoef(p[m], p_src)[0, 1]),
                  "p_max_diff": float(np.abs(p[m] - p_src).max()), "p_mean_diff": float(np.abs(p[m] - p_src).mean())}
    row["fast_vs_exact"] = {"mad": float(np.abs(tiles["fast"].astype(np.int16) - tiles["exact"]).mean()),
                            "p_corr": float(np.corrcoef(p["fast"], p["exact"])[0, 1]),
                            "p_max_diff": float(np.abs(p["fast"] - p["exact"]).max())}
    return row


def table(rows: list[dict]) -> str:
    out = ["| set | tiles | `fast` decodes | MAD from the source: fast / exact (per channel R, G, B) | "
           "p corr with the source's p: fast / exact | largest |p - source p|: fast / exact | "
           "fast vs exact: MAD, p corr, largest |dp| |",
           "|---|---:|---|---|---|---|---|"]
    for r in rows:
        f, e, fe = r["fast"], r["exact"], r["fast_vs_exact"]
        ch = lambda m: ", ".join(f"{v:.2f}" for v in m["mad_channels"])  # noqa: E731
        out.append(f"| {r['set']} | {r['tiles']} | {'; '.join(r['decode_paths'])} | {f['mad']:.2f} ({ch(f)}) / "
                   f"{e['mad']:.2f} ({ch(e)}) | {f['p_corr']:.5f} / {e['p_corr']:.5f} | {f['p_max_diff']:.3f} / "
                   f"{e['p_max_diff']:.3f} | {fe['mad']:.2f}, {fe['p_corr']:.5f}, {fe['p_max_diff']:.3f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model folder (its probabilities are compared)")
    ap.add_argument("--slides", type=int, default=2, help="synthetic slides (0: leave that set out)")
    ap.add_argument("--size", type=int, default=16000)
    ap.add_argument("--sample", type=int, default=400, help="synthetic tissue tiles compared per slide")
    ap.add_argument("--data", default=str(REPO / ".." / "shared" / "data" / "idc"))
    ap.add_argument("--patients", nargs="*", default=PATIENTS, help="patients rebuilt (none: leave that set out)")
    ap.add_argument("--scans", nargs="*", default=SCANS, metavar="NAME[=MPP]",
                    help="real slides of --slides-dir whose level 0 is written again as a 4:2:0 slide (=MPP: the "
                         "µm/px of one that states none); none: leave that set out")
    ap.add_argument("--slides-dir", default=str(REPO / ".." / "shared" / "data" / "slides"))
    ap.add_argument("--rebuild-mpp", type=float, default=0.5)
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of the rebuilt slides")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default=None, help="folder for slides and runs (kept; slides reused; default: temporary)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--results", default=None, help="also write the markdown here")
    a = ap.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from cancernet_batch.cluster import dask_client
    from cancernet_batch.config import ClusterConfig, TileConfig
    from cancernet_batch.engines import load_engine
    from cancernet_batch.machine import machine
    from cancernet_batch.model import read_meta
    from cancernet_batch.stages.tile import tile_run
    from cancernet_batch.slides import open_slide
    from cancernet_batch.synth import SlideSpec, patch_mosaic, slide_from_image, slide_from_patches, write_slide

    work = Path(a.work or tempfile.mkdtemp(prefix="decode-fidelity-"))
    specs = [SlideSpec(path=work / "synth" / f"s{i:02d}.svs", width=a.size, height=a.size, mpp=0.5, seed=170 + i,
                       detail_mpp=2.0) for i in range(a.slides)]
    for spec in specs:
        if not spec.path.exists():
            spec.path.parent.mkdir(parents=True, exist_ok=True)
            write_slide(spec)
    patients, mosaics = {}, {}
    for name in a.patients:
        path = work / f"real-{a.rebuild_mpp:g}-q{a.quality}" / f"{name}.svs"
        if path.exists():
            mosaics[name] = patch_mosaic(Path(a.data) / name)
        else:
            _, mosaics[name] = slide_from_patches(Path(a.data) / name, path, mpp=a.rebuild_mpp, quality=a.quality,
                                                  subsampling=(2, 2))
        patients[name] = path

    scans = {}
    for item in a.scans:
        name, _, mpp = item.partition("=")
        path = work / f"scans-q{a.quality}" / f"{Path(name).stem}.svs"
        with open_slide(Path(a.slides_dir) / name) as r:
            rgb = r.read_region(0, 0, 0, *r.level_dimensions[0])
            mpp = float(mpp) if mpp else r.info().mpp_x
        if not path.exists():
            slide_from_image(rgb, path, mpp=mpp, quality=a.quality, subsampling=(2, 2),
                             title=f"{name}'s level 0 written again")
        scans[name] = (path, rgb)

    meta = read_meta(a.model)
    inputs = [str(s.path) for s in specs] + [str(p) for p in patients.values()] + [str(p) for p, _ in scans.values()]
    runs = {}
    with dask_client(ClusterConfig(workers=a.workers)) as client:
        for m in MODES:
            run = work / f"run-{m}"
            ts = tile_run(inputs, run, TileConfig(target_mpp=meta.mpp, decode=m), client=client)
            if ts.failures:
                raise RuntimeError(f"tiling failed: {ts.failures[0].message}")
            runs[m] = stored(run)
    engine = load_engine(a.model)
    rows = []
    if specs:
        src, tiles, paths = synthetic_sources(specs, runs, a.sample)
        rows.append({"set": f"{len(specs)} synthetic SVS, {a.size} px at 0.5 µm/px, Q90 4:2:0", "decode_paths": paths,
                     **compare(src, tiles, engine.predict)})
    if patients:
        src, tiles, paths = real_sources(patients, mosaics, runs)
        rows.append({"set": f"{len(patients)} real patients rebuilt at {a.rebuild_mpp:g} µm/px, Q{a.quality} 4:2:0",
                     "decode_paths": paths, **compare(src, tiles, engine.predict)})

    for name, scan in scans.items():  # a row each: where a level is not exactly 4x, its factor is under 2
        src, tiles, paths = scan_sources({name: scan}, runs)
        rows.append({"set": f"real scan {name} written again at its µm/px, Q{a.quality} 4:2:0", "decode_paths": paths,
                     **compare(src, tiles, engine.predict)})

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    m = machine()
    text = (f"{when}, {m.get('cpu')}, {m.get('cores')} cores; tiles at {meta.mpp:g} µm/px; model `{a.model}`\n\n"
            + table(rows) + "\n")
    print("\n" + text)
    if a.results:
        Path(a.results).write_text(text)
    if a.json:
        Path(a.json).write_text(json.dumps({"date": when, "machine": m, "args": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
