"""What an input's files cost on this machine's file system, by the chunk keys of its arrays: the tool's (zarr v3's
``default`` encoding with ``.``: ``tiles/c.3.0.0.0``, ``store.CHUNK_KEYS``) against zarr's default (``/``:
``tiles/c/3/0/0/0``, a folder per index).

    python benchmarks/store_layout.py [--inputs 40] [--chunks 4] [--chunk 256] [--rounds 6] [--dir DIR]

Per round and layout, in a fresh run folder under ``--dir`` (default: the system's temporary folder, the file system
the tile stage writes to in ``slide_overhead.py``): ``--inputs`` input groups made as a slide's prepare task makes
them (``store.create_input`` with its coords, tissue map and thumbnail: the shapes of a 20,000 px synthetic slide's),
then for each ``--chunks`` chunks of ``--chunk`` tiles written and flagged as a chunk task writes them
(``store.write_tiles``, ``store.set_flag``). The two layouts alternate round by round (the first round of each is
a warm-up), so that a file system that slows down or speeds up as it goes weighs on both alike. Prints the CPU ms
(:func:`time.process_time`: this process, its kernel time included) per input group and per chunk, median and range
of the rounds, with the folders each layout made, the date, the machine and its load: figures for ``RESULTS.md``
section 9.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time

LAYOUTS = {"nested (zarr's default, '/')": {"name": "default", "separator": "/"},
           "flat (store.CHUNK_KEYS, '.')": None}


def one_round(where: str, keys: dict | None, inputs: int, chunks: int, chunk: int) -> tuple[float, float, int]:
    """CPU s making ``inputs`` groups, CPU s writing their chunks and flags, folders made."""
    import numpy as np
    import zarr

    from cancernet_batch import store
    from cancernet_batch.store import InputAttrs

    saved = store.CHUNK_KEYS
    store.CHUNK_KEYS = keys or saved
    store._METADATA_TEMPLATES.clear()  # documents made anew with these keys
    try:
        rng = np.random.default_rng(0)
        root = zarr.open_group(os.path.join(where, "tiles.zarr"), mode="a", zarr_format=3)
        parent = root.require_group("inputs")
        n = chunks * chunk
        coords = np.argwhere(np.ones((50, 50), bool)).astype(np.int32)[:n]
        tissue = rng.random((50, 50)).astype(np.float32)
        thumb = rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)
        tiles = rng.integers(0, 256, (chunk, 50, 50, 3), dtype=np.uint8)
        arrays = {"tissue": dict(shape=tissue.shape, chunks=tissue.shape, dtype="float32"),
                  "thumbnail": dict(shape=thumb.shape, chunks=thumb.shape, dtype="uint8",
                                    compressors=store.tiles_compressor())}
        groups = []
        t0 = time.process_time()
        for i in range(inputs):
            attrs = InputAttrs(source=f"/slides/s{i:04d}.svs", kind="slide", reader="openslide", patient=f"p{i}",
                               source_size=1, source_mtime=1.0, target_mpp=4.0, grid_shape=(50, 50), n_tiles=n)
            groups.append(store.create_input(None, attrs, n, chunk=chunk, arrays=arrays, present=False, inputs=parent,
                                             data={"coords": coords, "tissue": tissue, "thumbnail": thumb}))
        made = time.process_time() - t0
        t0 = time.process_time()
        for g in groups:
            for k in range(chunks):
                store.write_tiles(g, k * chunk, (k + 1) * chunk, tiles)
                store.set_flag(g, "tiled", k)
        written = time.process_time() - t0
        folders = sum(len(d) for _, d, _ in os.walk(where))
        return made, written, folders
    finally:
        store.CHUNK_KEYS = saved
        store._METADATA_TEMPLATES.clear()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=int, default=40)
    ap.add_argument("--chunks", type=int, default=4, help="chunks written per input")
    ap.add_argument("--chunk", type=int, default=256, help="tiles per chunk")
    ap.add_argument("--rounds", type=int, default=6, help="rounds of each layout; the first is a warm-up")
    ap.add_argument("--dir", default=None, help="where the run folders are made (default: the temporary folder)")
    a = ap.parse_args(argv)

    from cancernet_batch.machine import cpu_name

    def load() -> str:
        one, five, _ = os.getloadavg()
        return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"

    start = load()
    per: dict[str, list[tuple[float, float, int]]] = {name: [] for name in LAYOUTS}
    base = tempfile.mkdtemp(prefix="store-layout-", dir=a.dir)
    try:
        for r in range(a.rounds):
            for name, keys in (LAYOUTS.items() if r % 2 == 0 else reversed(LAYOUTS.items())):
                where = os.path.join(base, f"r{r}-{len(per[name])}")
                out = one_round(where, keys, a.inputs, a.chunks, a.chunk)
                shutil.rmtree(where, ignore_errors=True)
                if r:
                    per[name].append(out)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_name()}, {os.cpu_count()} cores, "
          f"{start} at the start, {load()} at the end; file system of {a.dir or tempfile.gettempdir()}")
    print(f"{a.inputs} inputs x {a.chunks} chunks of {a.chunk} tiles a round, {a.rounds - 1} rounds a layout "
          "(after a warm-up round), alternating")
    print(f"{'layout':<32} {'CPU ms an input group':>28} {'CPU ms a chunk + flag':>28} {'folders':>8}")
    for name, rows in per.items():
        made = [1000 * m / a.inputs for m, _, _ in rows]
        written = [1000 * w / (a.inputs * a.chunks) for _, w, _ in rows]
        print(f"{name:<32} {statistics.median(made):>9.2f} ({min(made):.2f}-{max(made):.2f}){'':>7} "
              f"{statistics.median(written):>9.2f} ({min(written):.2f}-{max(written):.2f}){'':>7} {rows[0][2]:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
