"""TIAToolbox's fastest way to the same tiles, for ``tiling_speed.py`` (run in a Python that has TIAToolbox).

    /path/to/python-with-tiatoolbox benchmarks/tia_tiles.py JOBS.json --workers 2

``JOBS.json``: ``[{"path": ..., "mpp": 4.0, "tile_px0": 400.0, "coords": [[row, col], ...]}, ...]`` (the
tiles ``cancernet tile`` keeps). TIAToolbox 2.x reads them in *regions*: the tiles are grouped in blocks
of 16 x 16 grid tiles, each block's bounding box is read once with ``WSIReader.read_bounds`` at the
target µm/px (``interpolation="optimize"``: TIAToolbox picks the pyramid level and resamples with
OpenCV's area filter when downsampling) and cut into 50 px tiles, in ``--workers`` processes, one
slide after another per process: regions in 2 processes is the mode issue 17 measured fastest for
TIAToolbox 2.1 on this kind of machine. Tiles are held in memory, not written. Prints one JSON line: tiles, wall
seconds (from the first job started to the last finished, process start-up excluded).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

BLOCK = 16


def _slide(job: dict) -> int:
    from tiatoolbox.wsicore.wsireader import WSIReader

    reader = WSIReader.open(job["path"])
    coords = np.asarray(job["coords"], np.int64).reshape(-1, 2)
    t, n = float(job["tile_px0"]), 0
    keys = (coords[:, 0] // BLOCK) * (1 << 32) + coords[:, 1] // BLOCK
    for key in np.unique(keys):
        rc = coords[keys == key]
        r0, c0 = rc.min(axis=0)
        r1, c1 = rc.max(axis=0) + 1
        img = reader.read_bounds((int(round(c0 * t)), int(round(r0 * t)), int(round(c1 * t)), int(round(r1 * t))),
                                 resolution=job["mpp"], units="mpp")
        for r, c in rc:
            y, x = (r - r0) * 50, (c - c0) * 50
            tile = img[y:y + 50, x:x + 50]
            n += tile.shape[0] == 50 and tile.shape[1] == 50
    return n


def _warm(_: int) -> int:
    from tiatoolbox.wsicore import wsireader

    return len(wsireader.__name__) * 0  # the import is the warm-up


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("jobs")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    with open(a.jobs) as fh:
        jobs = json.load(fh)
    with ProcessPoolExecutor(a.workers) as pool:
        list(pool.map(_warm, range(a.workers)))
        t0 = time.perf_counter()
        n = sum(pool.map(_slide, jobs))
        wall = time.perf_counter() - t0
    import tiatoolbox

    print(json.dumps({"tiles": int(n), "wall": wall, "version": tiatoolbox.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
