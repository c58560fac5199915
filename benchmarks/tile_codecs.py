"""What compressing a chunk of tiles costs, per codec: the tile store's choice, measured on real chunks.

    python benchmarks/tile_codecs.py SLIDE... [--chunk 1024] [--repeat 3]

Plans each slide and reads its first chunk of tiles (``--decode fast``, as the tile stage does), then
encodes and decodes the chunk's bytes with each codec: zstd at zarr's default level (0, i.e. zstd's 3,
which the store's other arrays use), at faster levels (1: the tiles array), LZ4, and none. Prints, per
codec, the CPU ms to encode and to decode one chunk (the fastest of ``--repeat``,
:func:`time.process_time`, medians over the slides) and the compression ratio (the slides' raw bytes over their encoded bytes), with the date, the
machine and its load. The tiles a codec gives back are the tiles it was given (checked here);
only the chunk files' size and the CPU differ.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slides", nargs="+")
    ap.add_argument("--chunk", type=int, default=1024, help="tiles per chunk (the store's default)")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)

    import numpy as np
    from numcodecs import LZ4, Zstd

    from cancernet_batch.config import TileConfig
    from cancernet_batch.machine import cpu_name
    from cancernet_batch.slides import open_slide
    from cancernet_batch.tiling import plan_slide, read_tiles

    codecs = {"zstd level 0 (zstd's 3; zarr's default)": Zstd(level=0),
              "zstd level 1 (the tiles array)": Zstd(level=1), "zstd level -1": Zstd(level=-1), "lz4": LZ4(), "none": None}
    cfg = TileConfig()
    enc: dict = {k: [] for k in codecs}
    dec: dict = {k: [] for k in codecs}
    size: dict = {k: 0 for k in codecs}
    raw_total, tiles = 0, []
    for path in a.slides:
        reader = open_slide(path)
        try:
            plan = plan_slide(path, cfg, reader=reader)
            t = read_tiles(reader, plan.level, plan.tile_px_level, plan.coords[:a.chunk], decode=cfg.decode)
        finally:
            reader.close()
        raw = np.ascontiguousarray(t).tobytes()
        raw_total += len(raw)
        tiles.append(len(t))
        for name, codec in codecs.items():
            if codec is None:
                enc[name].append(0.0)
                dec[name].append(0.0)
                size[name] += len(raw)
                continue
            e, d, out = [], [], b""
            for _ in range(a.repeat):
                c = time.process_time()
                out = codec.encode(raw)
                e.append(time.process_time() - c)
                c = time.process_time()
                back = codec.decode(out)
                d.append(time.process_time() - c)
            if bytes(back) != raw:
                raise SystemExit(f"{name} did not give the tiles back")
            enc[name].append(min(e))
            dec[name].append(min(d))
            size[name] += len(out)
    one, five, _ = os.getloadavg()
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_name()}, load average "
          f"{one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores")
    print(f"{len(a.slides)} slides, first chunk of each: median {statistics.median(tiles):g} tiles, "
          f"{raw_total / len(a.slides) / 1e6:.2f} MB raw on average")
    print(f"{'codec':<42} {'encode ms':>10} {'decode ms':>10} {'ratio':>6}")
    for name in codecs:
        print(f"{name:<42} {1000 * statistics.median(enc[name]):10.1f} {1000 * statistics.median(dec[name]):10.1f} "
              f"{raw_total / size[name]:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
