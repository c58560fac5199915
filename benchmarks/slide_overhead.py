"""Per-slide overhead of ``tile``: CPU time of each fixed part of one slide, in one process, warm.

    python benchmarks/slide_overhead.py SLIDE... [--rounds 4] [--decode fast] [--mpp-override MPP]

Runs the worker side of the tile stage for every slide, round after round, in this one process (no
cluster): the preflight task (this process's part, and the serving child's CPU read from /proc),
opening the reader, the plan (overview read, tissue mask, tile fractions, the rest of the plan) and
the store group (opening the store; ``store.create_input``'s documents and files; of those, the ``coords``,
``tissue`` and ``thumbnail`` it writes before the group's attrs: since their chunks are written in one batch with the
documents, their encoding only) and the rest of the prepare task, each as :func:`time.process_time` (all threads of
this process: zarr's I/O thread counts) around the calls the worker makes. The chunk tasks (the tiles themselves) are timed too,
for scale; they are not overhead. Each round tiles into a fresh run folder, so every group is
created; round 0 is a warm-up and is left out. Prints the median CPU ms per slide of each part
(and wall ms; the preflight child's CPU is a mean, read in 10 ms clock ticks), with the date, the machine
and its load: figures for ``RESULTS.md`` section 9.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict

PARTS = ["preflight (worker)", "preflight (child)", "open", "plan: overview read", "plan: tissue mask",
         "plan: tile fractions", "plan: rest", "group: open store", "group: create_input",
         "group: coords, tissue, thumbnail", "prepare: rest"]


class _Clock:
    """Adds up CPU and wall time per part."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self.active: set[str] = set()

    @contextlib.contextmanager
    def part(self, name: str):
        c, w = time.process_time(), time.perf_counter()
        self.active.add(name)
        try:
            yield
        finally:
            self.active.discard(name)
            self.cpu[name] += time.process_time() - c
            self.wall[name] += time.perf_counter() - w

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.part(name):
                return fn(*args, **kwargs)
        return timed


def _child_cpu() -> float:
    """CPU seconds so far of this thread's serving preflight child (0 when there is none)."""
    import psutil

    from cancernet_batch import preflight

    server = getattr(preflight._LOCAL, "server", None)
    if server is None or server.proc.poll() is not None:
        return 0.0
    t = psutil.Process(server.proc.pid).cpu_times()
    return t.user + t.system


def one_slide(run, source: str, cfg, clock: _Clock) -> int:
    """The worker's tasks for one slide, as the tile stage runs them; returns the tiles written. The preflight runs in
    the prepare task, as the run's flow submits it (versions before that: a task of its own, then the prepare)."""
    import inspect

    from cancernet_batch.stages import tile

    tile._drop_reader(source)  # as a worker meeting this slide for the first time
    inside = "preflight" in inspect.signature(tile.prepare_slide_task).parameters
    with clock.part("prepare (all)"):
        if not inside:
            res = tile.preflight_task(source, cfg.preflight_timeout)
            if not isinstance(res, dict):
                raise SystemExit(f"{source}: preflight failed: {res}")
        res = tile.prepare_slide_task(run, source, cfg, [], **({"preflight": True} if inside else {}))
    if not isinstance(res, dict):
        raise SystemExit(f"{source}: plan failed: {res}")
    n = 0
    with clock.part("chunks (the tiles)"):
        for i, s, e in res["todo"]:
            n += tile.tile_chunk_task(run, res["gid"], source, i, s, e, res["level"], res["tile_px"], cfg)
    return n


def instrument(clock: _Clock) -> None:
    """Time the parts of ``prepare_slide_task`` by wrapping the functions it calls (this process only)."""
    from cancernet_batch import runfolder, slides, store, tiling
    from cancernet_batch.stages import tile

    slides.open_slide = clock.wrap("open", slides.open_slide)  # what tile._reader imports when it opens
    preflight_task = tile.preflight_task

    def timed_preflight(*args, **kwargs):  # this process's part, and the serving child's CPU read from /proc
        before = _child_cpu()
        with clock.part("preflight (worker)"):
            res = preflight_task(*args, **kwargs)
        after = _child_cpu()
        clock.cpu["preflight (child)"] += after - before if after >= before else after
        return res

    tile.preflight_task = timed_preflight
    region_reader = tiling.region_reader

    def timed_region_reader(*args, **kwargs):  # the plan's overview (read_tiles uses it too: not counted)
        scaled = region_reader(*args, **kwargs)
        return clock.wrap("plan: overview read", scaled) if "plan (all)" in clock.active else scaled

    if hasattr(tiling, "_overview"):  # the view read from a level or from the scanner's thumbnail
        tiling._overview = clock.wrap("plan: overview read", tiling._overview)
    else:  # older versions: always a level read
        tiling.region_reader = timed_region_reader
    tiling.tissue_mask = clock.wrap("plan: tissue mask", tiling.tissue_mask)
    tiling.tile_fractions = clock.wrap("plan: tile fractions", tiling.tile_fractions)
    tile.plan_slide = clock.wrap("plan (all)", tile.plan_slide)
    # the prepare task's look-up of the store's inputs group (kept per process: opened by a round's first slide;
    # older versions: open_store, each slide)
    where = "inputs_group" if hasattr(runfolder.Run, "inputs_group") else "open_store"
    setattr(runfolder.Run, where, clock.wrap("group: open store", getattr(runfolder.Run, where)))
    store.create_input = clock.wrap("group: create_input", store.create_input)
    # inside create_input: older versions write them with write_whole; newer ones encode them (_encode_whole), then
    # write their chunks in the batch of the arrays' documents (counted in create_input)
    name = "_encode_whole" if hasattr(store, "_encode_whole") else "write_whole"
    setattr(store, name, clock.wrap("group: coords, tissue, thumbnail", getattr(store, name)))


def _filesystem(path: str) -> str:
    """The type of the file system ``path`` is on (``ext4``, ``tmpfs``...), from ``/proc/mounts``; ``?`` elsewhere."""
    path, best, kind = os.path.realpath(path), -1, "?"
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                at = parts[1].replace("\\040", " ")
                if (path == at or path.startswith(at.rstrip("/") + "/")) and len(at) > best:
                    best, kind = len(at), parts[2]
    except OSError:
        pass
    return kind


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slides", nargs="+")
    ap.add_argument("--rounds", type=int, default=4, help="rounds over all slides; the first is a warm-up")
    ap.add_argument("--decode", default="fast")
    ap.add_argument("--mpp-override", type=float, default=None,
                    help="µm/px for slides that state none (the TCGA JPEG 2000 sample)")
    ap.add_argument("--work", default=None,
                    help="folder for the run folders (default: the temporary folder, TMPDIR). The store group's part "
                         "is file creations: on ext4, creating a file near many deleted within the last 1-5 minutes "
                         "costs CPU in the kernel's inode search (RESULTS.md section 9, 2026-12-07 15:04-15:11), so "
                         "for A/B passes a tmpfs (/dev/shm) shows the tool's own cost")
    a = ap.parse_args(argv)

    from cancernet_batch.config import TileConfig
    from cancernet_batch.machine import cpu_name
    from cancernet_batch.runfolder import Run
    from cancernet_batch.stages import tile

    cfg = TileConfig(decode=a.decode, mpp_override=a.mpp_override)
    per: dict[str, list[float]] = defaultdict(list)
    wall: dict[str, list[float]] = defaultdict(list)
    tiles = []
    start_load = _load()
    clock = _Clock()
    instrument(clock)
    if a.work:
        os.makedirs(a.work, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="slide-overhead-", dir=a.work)
    a.slides = [os.path.abspath(s) for s in a.slides]
    # the preflight child is `python -m cancernet_batch.preflight`, whose first import path is its working folder: run
    # it from one with no checkout in it, so that it imports the code this process does (PYTHONPATH, for an A/B)
    os.chdir(tmp)
    try:
        for r in range(a.rounds):
            run = Run.of(os.path.join(tmp, f"run{r}")).create()
            run.open_store("a").require_group("inputs")  # as the client does before any task
            for source in a.slides:
                clock.cpu.clear()
                clock.wall.clear()
                n = one_slide(run, os.path.abspath(source), cfg, clock)
                if r == 0:
                    continue
                c = defaultdict(float, clock.cpu)
                c["plan: rest"] = c["plan (all)"] - c["plan: overview read"] - c["plan: tissue mask"] \
                    - c["plan: tile fractions"]
                # what prepare does besides (e.g. its return value), then create_input without its data writes
                c["prepare: rest"] = c["prepare (all)"] - c["preflight (worker)"] - c["open"] - c["plan (all)"] \
                    - c["group: open store"] - c["group: create_input"]
                c["group: create_input"] -= c["group: coords, tissue, thumbnail"]
                for k, v in c.items():
                    per[k].append(v)
                w = defaultdict(float, clock.wall)
                w["group: create_input"] -= w.get("group: coords, tissue, thumbnail", 0.0)
                for k, v in w.items():
                    wall[k].append(v)
                tiles.append(n)
            # each round's run folder is kept until the end: deleting its files here would slow the next round's
            # creations on ext4 (see --work)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        tile._READERS.clear()

    def med(xs: list[float]) -> float:
        return 1000 * statistics.median(xs) if xs else 0.0

    # the child's CPU comes from /proc in clock ticks (10 ms): its mean over all slides, not a median of ticks
    per["preflight (child)"] = [statistics.mean(per["preflight (child)"])] * len(per["preflight (child)"])
    per["group (all)"] = [sum(v) for v in zip(*(per[p] for p in PARTS if p.startswith("group")))]

    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_name()}, "
          f"{start_load} at the start, {_load()} at the end")
    print(f"{len(a.slides)} slides x {a.rounds - 1} rounds (after a warm-up round), decode {a.decode}, "
          f"median tiles per slide {statistics.median(tiles):g}, run folders in {os.path.dirname(tmp)} "
          f"({_filesystem(os.path.dirname(tmp))})")
    print(f"{'part':<36} {'CPU ms':>8} {'wall ms':>8}")
    overhead = 0.0
    for name in PARTS:
        m = med(per[name])
        overhead += m
        print(f"{name:<36} {m:8.1f} {med(wall[name]) if name in wall else float('nan'):8.1f}")
    total = [sum(per[p][i] for p in PARTS) for i in range(len(tiles))]
    print(f"{'  of which group (all)':<36} {med(per['group (all)']):8.1f}")
    print(f"{'per-slide overhead (sum per slide)':<36} {med(total):8.1f}   (sum of the medians {overhead:.1f})")
    print(f"{'chunks (the tiles themselves)':<36} {med(per['chunks (the tiles)']):8.1f} "
          f"{med(wall['chunks (the tiles)']):8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
