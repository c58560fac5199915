"""Benchmark (issue 17): what the local workers' fork server costs to import, before the first worker exists.

    python benchmarks/preload_imports.py [--rounds 8] [--baseline DIR]

A command that starts a local cluster imports ``cluster.FORKSERVER_PRELOAD`` (Dask, numpy, zarr, scipy.sparse, the
readers) in its own process, on one core, and then forks the server every worker is forked from: that import is on
the way to every command's first tile (``startup_timeline.py`` shows it as "forkserver started"). Each round starts a
fresh interpreter per version (this checkout, and ``--baseline``'s, alternating, which goes first alternating too)
that imports that version's preload as its ``_fork_server_from_here`` does (``cluster.import_preload`` where the
version has it, else one module after another), and prints the wall and CPU seconds. A last pass of this checkout
times each module on its own, in order (each one's own cost beyond what the earlier ones imported), with the
garbage collector's count of collections. Prints markdown with the date, machine and load.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from installed import as_installed

HERE = Path(__file__).resolve().parents[1]

WHOLE = """
import gc, importlib, sys, time
from cancernet_batch import cluster
modules = list(cluster.FORKSERVER_PRELOAD[:-1])
t, c = time.perf_counter(), time.process_time()
if hasattr(cluster, "import_preload"):
    cluster.import_preload(modules)
else:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
print(time.perf_counter() - t, time.process_time() - c, sum(s["collections"] for s in gc.get_stats()))
"""

EACH = """
import gc, importlib, time
from cancernet_batch import cluster
for name in cluster.FORKSERVER_PRELOAD[:-1]:
    n0 = sum(s["collections"] for s in gc.get_stats())
    t = time.perf_counter()
    importlib.import_module(name)
    print(name, time.perf_counter() - t, sum(s["collections"] for s in gc.get_stats()) - n0)
"""


def _python(code: str, package: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(package)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/tmp", env=env, check=True)
    return r.stdout.split("\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--baseline", default=None, help="an earlier checkout to compare with (alternating)")
    a = ap.parse_args(argv)
    as_installed(a.baseline)
    versions = [("this", HERE)] + ([("baseline", Path(a.baseline).resolve())] if a.baseline else [])
    rows: dict[str, list[tuple[float, float, int]]] = {name: [] for name, _ in versions}
    for i in range(a.rounds):
        for name, package in (versions if i % 2 == 0 else versions[::-1]):
            wall, cpu, collections = _python(WHOLE, package)[0].split()
            rows[name].append((float(wall), float(cpu), int(collections)))
    each = [line.split() for line in _python(EACH, HERE) if line.strip()]

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{now}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}; {a.rounds} rounds, fresh interpreters\n")
    print("| version | fork server's imports, wall s: median (range) | CPU s: median | gc collections |")
    print("|---|---:|---:|---:|")
    for name, package in versions:
        r = rows[name]
        walls = [x[0] for x in r]
        print(f"| {name} ({package}) | {statistics.median(walls):.3f} ({min(walls):.3f}-{max(walls):.3f}) | "
              f"{statistics.median(x[1] for x in r):.3f} | {statistics.median(x[2] for x in r):.0f} |")
    if a.baseline:
        ratios = [t[0] / b[0] for t, b in zip(rows["this"], rows["baseline"])]
        print(f"\nthis / baseline, wall, per round: median {statistics.median(ratios):.3f} "
              f"({min(ratios):.3f}-{max(ratios):.3f})")
    print("\n| module (this checkout, in order, collector on) | its own import, s | gc collections during it |")
    print("|---|---:|---:|")
    for name, seconds, collections in each:
        print(f"| {name} | {float(seconds):.3f} | {collections} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
