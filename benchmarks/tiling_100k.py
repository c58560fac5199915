"""Benchmark: tile one 100,000 x 100,000 px synthetic slide and measure time and peak memory.

    python benchmarks/tiling_100k.py WORKDIR [--size 100000] [--mpp 0.5] [--workers 2] [--no-tissue-filter]

Writes ``WORKDIR/big.svs`` (fast synthetic mode, ``SlideSpec.detail_mpp=4``) and its truth once,
then runs ``cancernet tile WORKDIR/big.svs --out WORKDIR/run`` in a child process while sampling,
every 0.2 s, the memory of the whole process tree (client + scheduler, nannies, workers, preflight
children): the peak of the summed RSS (an upper bound: shared library pages count once per
process) and of the summed PSS (shared pages split between processes). Prints one JSON line.
Results are recorded in ``benchmarks/TILING.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from installed import as_installed


def _tree_memory(proc: psutil.Process) -> tuple[int, int, int, dict[int, int]]:
    procs = [proc]
    try:
        procs += proc.children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    rss = pss = n = 0
    per: dict[int, int] = {}
    for p in procs:
        try:
            r = p.memory_info().rss
            try:
                s = p.memory_full_info().pss
            except (psutil.AccessDenied, AttributeError):
                s = r
        except psutil.NoSuchProcess:
            continue
        rss += r
        pss += s
        n += 1
        per[p.pid] = r
    return rss, pss, n, per


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep-run", action="store_true")
    ap.add_argument("--no-tissue-filter", action="store_true", help="tile every grid tile (reads the whole level)")
    args = ap.parse_args()
    as_installed()
    from cancernet_batch.synth import SlideSpec, SlideTruth, write_slide

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    slide = work / "big.svs"
    truth_path = work / "big.truth.npz"
    out: dict = {"size": args.size, "mpp": args.mpp, "workers": args.workers, "tissue_filter": not args.no_tissue_filter}
    if not slide.exists():
        t = time.perf_counter()
        truth = write_slide(SlideSpec(path=slide, width=args.size, height=args.size, mpp=args.mpp, seed=100,
                                      detail_mpp=4.0))
        truth.save(truth_path)
        out["write_s"] = round(time.perf_counter() - t, 1)
    out["slide_bytes"] = slide.stat().st_size
    truth = SlideTruth.load(truth_path)
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "cancernet_batch.cli", "tile", str(slide), "--out", str(run),
           "--workers", str(args.workers)] + (["--no-tissue-filter"] if args.no_tissue_filter else [])
    t = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(child.pid)
    peak_rss = peak_pss = peak_n = 0
    peak_single = 0
    while child.poll() is None:
        rss, pss, n, per = _tree_memory(ps)
        peak_rss, peak_pss, peak_n = max(peak_rss, rss), max(peak_pss, pss), max(peak_n, n)
        peak_single = max([peak_single, *per.values()])
        time.sleep(0.2)
    stdout, stderr = child.communicate()
    out["tile_s"] = round(time.perf_counter() - t, 1)
    out["returncode"] = child.returncode
    out["peak_tree_rss_mb"] = round(peak_rss / 2**20)
    out["peak_tree_pss_mb"] = round(peak_pss / 2**20)
    out["peak_single_process_rss_mb"] = round(peak_single / 2**20)
    out["processes"] = peak_n
    out["raw_level0_mb"] = round(args.size * args.size * 3 / 2**20)
    out["stdout_tail"] = stdout.strip().splitlines()[-1:] if stdout else []
    import zarr

    root = zarr.open_group(str(run / "tiles.zarr"), mode="r")
    g = next(iter(root["inputs"].groups()))[1]
    coords = np.asarray(g["coords"][:])
    kept = np.zeros(truth.tissue.shape, bool)
    kept[coords[:, 0], coords[:, 1]] = True
    a = dict(g.attrs)
    out.update({"grid": a["grid_shape"], "level": a["level"], "scale": a["extra"]["scale"], "tiles": a["n_tiles"],
                "background": a["n_background"], "truth_tissue_tiles": int(truth.tissue.sum()),
                "tissue_agreement": round(float((kept == truth.tissue).mean()), 4),
                "store_mb": round(sum(f.stat().st_size for f in (run / "tiles.zarr").rglob("*") if f.is_file()) / 2**20)})
    if not args.keep_run:
        shutil.rmtree(run, ignore_errors=True)
    print(json.dumps(out))
    return 0 if child.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
