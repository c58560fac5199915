"""Benchmark: the client CPU of one S3 request through s3fs/botocore and through obstore, against a local server
(or of one Azure Blob request through adlfs/azure-storage-blob and obstore, against Azurite).

    python benchmarks/s3_client_cpu.py [--server seaweedfs|moto|azurite] [--repeat 50] [--out DIR]

Starts the server on 127.0.0.1 (``tests/s3server.py``: SeaweedFS's ``weed server`` or moto's), PUTs a 6 MiB
object, then times requests one after another, each kind through the s3fs filesystem of
:func:`cancernet_batch.remote.filesystem` and through its native client (:func:`cancernet_batch.remote._native`):
ranged GETs of 1 KiB, 64 KiB and 5 MiB, PUTs of 1 KiB and 1 MiB, and (S3 only) fresh listings of a folder of
:data:`LISTED` objects, as ``ls`` (one level) and as ``find`` (every depth), through
s3fs and through :func:`cancernet_batch.remote.list_objects`. Prints the median CPU ms (this process,
every thread: the event loops' included) and wall ms per request, with the date, the machine and its load:
figures for ``RESULTS.md`` section 8. The server runs in its own process (SeaweedFS) or in a thread of this one
(moto: its CPU is counted too, so use SeaweedFS for the client's share). ``--server azurite``: Microsoft's Blob
service emulator (``tests/azurite.py``, Node.js, in its own process), the same requests on ``az://`` through
adlfs's filesystem and its native client (obstore's ``AzureStore``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))
from results_files import write_results  # noqa: E402 - a sibling script


LISTED = 40
"""Objects in the folder the listings list (an input's done flags of 40 chunks: 40,000 tiles)."""


def _time(fn, n: int) -> tuple[float, float]:
    fn()  # warm: connections, the client's first use
    cpu, wall = [], []
    for _ in range(n):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(cpu) * 1e3, statistics.median(wall) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default="seaweedfs", choices=("seaweedfs", "moto", "azurite"))
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import numpy as np

    from cancernet_batch import remote
    from s3server import CountingS3, SeaweedS3

    if args.server == "azurite":
        from azurite import Azurite

        server = Azurite().start()
    else:
        server = (SeaweedS3() if args.server == "seaweedfs" else CountingS3()).start()
    scheme, driver = ("az", "adlfs") if args.server == "azurite" else ("s3", "s3fs")
    rows = []
    try:
        bucket = "bench-client"
        if args.server == "azurite":
            server.fs().mkdir(bucket)
        else:
            server.create_bucket(bucket)
        blob = np.random.default_rng(0).integers(0, 256, 6 * 2**20, dtype=np.uint8).tobytes()
        url = f"{scheme}://{bucket}/blob.bin"
        opts = server.options()
        fs = remote.filesystem(url, opts)
        fs.pipe_file(url, blob)
        native = remote._native(fs)
        if native is None:
            raise SystemExit("no native client (obstore not installed, or CANCERNET_S3_NATIVE=0)")
        small, mib = blob[:1024], blob[:2**20]

        def s3fs_get(a, b):
            return lambda: fs.cat_file(url, start=a, end=b)

        def obstore_get(a, b):  # as the tile reads send them (remote._fetch_spans)
            return lambda: remote._native_spans_now(native, url, [(a, b)])

        kinds = [("GET 1 KiB", 1000, 1000 + 1024), ("GET 64 KiB", 1000, 1000 + 65536),
                 ("GET 5 MiB", 1000, 1000 + 5 * 2**20)]
        for name, a, b in kinds:
            n = args.repeat if b - a < 2**20 else max(5, args.repeat // 5)
            assert s3fs_get(a, b)() == remote._native_spans_now(native, url, [(a, b)])[0] == blob[a:b]
            rows.append({"request": name, driver: _time(s3fs_get(a, b), n), "obstore": _time(obstore_get(a, b), n)})
        for name, data in (("PUT 1 KiB", small), ("PUT 1 MiB", mib)):
            n = args.repeat if len(data) < 2**20 else max(5, args.repeat // 5)
            put_url = f"{scheme}://{bucket}/put-{len(data)}.bin"
            rows.append({"request": name,
                         driver: _time(lambda: fs.pipe_file(put_url, data), n),
                         "obstore": _time(lambda: remote._native_put_now(native, put_url, data), n)})
            assert fs.cat_file(put_url) == data
        if scheme == "s3":  # listings: Azure's stay on adlfs (remote.list_objects)
            folder = f"{bucket}/flags"
            for i in range(LISTED):
                fs.pipe_file(f"{folder}/{i}", bytes([i % 2]) * 16)
            for name, recursive, through in ((f"LIST {LISTED} objects (ls)", False, lambda: fs.ls(folder, detail=True)),
                                             (f"LIST {LISTED} objects (find)", True, lambda: fs.find(folder, detail=True))):
                def plain(through=through):
                    fs.invalidate_cache()  # a fresh listing each time, as the flags' and the run folder's are
                    return through()

                got = remote.list_objects(fs, folder, lambda: None, recursive=recursive)
                assert got is not None and len(got) == LISTED
                rows.append({"request": name, driver: _time(plain, args.repeat),
                             "obstore": _time(lambda r=recursive: remote.list_objects(fs, folder, lambda: None, recursive=r),
                                              args.repeat)})
    finally:
        server.stop()

    now = datetime.datetime.now(datetime.timezone.utc)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    lines = [f"{now:%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
             f"load average {load}; server {args.server} on 127.0.0.1; medians of {args.repeat} requests "
             f"(5 MiB and 1 MiB: of {max(5, args.repeat // 5)}), one at a time", "",
             f"| request | {driver} CPU ms | obstore CPU ms | {driver} / obstore CPU | {driver} wall ms | obstore wall ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        (sc, sw), (oc, ow) = r[driver], r["obstore"]
        lines.append(f"| {r['request']} | {sc:.2f} | {oc:.2f} | {sc / max(oc, 1e-9):.1f} | {sw:.2f} | {ow:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_results(args.out, f"{'azure' if scheme == 'az' else 's3'}-client-cpu-{now:%Y%m%d-%H%M}", text,
                      {"date": now.isoformat(), "args": vars(args), "rows": rows, "host": platform.node(),
                       "load": os.getloadavg()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
