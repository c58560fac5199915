"""Where the tile stage's time goes: every Dask task of ``tile`` on a started local cluster, in order.

    python benchmarks/tile_tasks.py SLIDE... [--workers 2] [--decode fast] [--cpu] [--parts]

Prints, per task (prepare = the slide's preflight, its plan, its store group and in a streamed run its
first chunk of tiles; chunk = read, resample and write a chunk's tiles; a preflight task only for DICOM
series), when it started after the stage's start,
how long it ran and on which worker; then the stage's wall time. Used for the per-task figures in ``RESULTS.md`` section 9.

``--cpu`` adds, per task, the CPU its worker process spent while it ran (:func:`time.process_time`
around the task inside the worker: every thread of that process, so the plan's and the chunk's reads in
their deadline guard thread and zarr's I/O threads count), and then the CPU seconds each process of the
cluster spent during the stage: the client with the scheduler, each worker, each worker's preflight
child (with what it had spent before the stage: its start-up). A task whose wall time is far above its
CPU waited: for a core (the processes' CPU add up to the machine's cores), a lock, or the disk.

``--parts`` (with ``--cpu``) splits the prepare tasks as ``slide_overhead.py`` does, inside the workers:
for each part the median wall time per slide, CPU of its own thread (:func:`time.thread_time`: a part
that waits for a core or a lock has wall above it) and CPU of its worker process (zarr's I/O threads too).
What ``prepare (all)`` has beyond its parts is the thread that bounds the read in time
(:func:`cancernet_batch.deadline.bounded`) and the rest of the task.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slides", nargs="+")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--decode", default="fast")
    ap.add_argument("--cpu", action="store_true", help="also the CPU of each task and of each process")
    ap.add_argument("--parts", action="store_true", help="also the parts of the prepare tasks (implies --cpu)")
    a = ap.parse_args(argv)
    a.cpu = a.cpu or a.parts

    from distributed import get_task_stream

    from cancernet_batch.cluster import ClusterConfig, dask_client
    from cancernet_batch.config import TileConfig
    from cancernet_batch.stages.tile import tile_run

    run = tempfile.mkdtemp(prefix="tile-tasks-")
    try:
        with dask_client(ClusterConfig(workers=a.workers, dashboard=False)) as client:
            client.wait_for_workers(a.workers)
            if a.cpu:
                client.run(_time_tasks, a.parts)
            before = _process_cpu()
            with get_task_stream(client) as ts:
                t0 = time.time()
                s = tile_run(a.slides, run, TileConfig(decode=a.decode), client=client)
                wall = time.time() - t0
            after = _process_cpu()
            cpu = {k: c for v in client.run(_task_cpu).values() for k, c in v} if a.cpu else {}
            parts = [x for v in client.run(_part_times).values() for x in v] if a.parts else []
        print(f"{'task':<44} {'start s':>8} {'ran s':>7} {'CPU s':>7}  worker")
        for d in sorted(ts.data, key=lambda d: d["startstops"][0]["start"]):
            key = d["key"][0] if isinstance(d["key"], tuple) else d["key"]
            for ss in d["startstops"]:
                if ss["action"] == "compute":
                    c = cpu.get(str(d["key"]))
                    c = f"{c:7.3f}" if c is not None else f"{'':7}"
                    print(f"{key[:44]:<44} {ss['start'] - t0:8.3f} {ss['stop'] - ss['start']:7.3f} {c}  {d['worker']}")
        print(f"stage: {s.tiles_written} tiles of {len(s.tiled)} inputs in {wall:.2f} s, "
              f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
        if a.cpu:
            print("CPU s during the stage, per process (before the stage):")
            for pid, (name, c) in sorted(after.items(), key=lambda kv: kv[1][0]):
                c0 = before.get(pid, (name, 0.0))[1]
                # every client, worker and preflight child, idle or not (a worker that ran no slide has an idle
                # child); other processes (the forkserver, resource trackers) only when they worked
                if not name.startswith("other") or c - c0 >= 0.005:
                    print(f"  {name:<24} {c - c0:7.3f} ({c0:.3f})")
            print(f"  {'all':<24} {sum(c - before.get(p, ('', 0.0))[1] for p, (_, c) in after.items()):6.2f} "
                  f"in {wall:.2f} s of wall time")
        if parts:
            import statistics

            print(f"{'prepare, part by part: ms per slide, medians':<52} {'wall':>8} {'thread CPU':>11} "
                  f"{'process CPU':>12}")
            per: dict = {}  # (prepare task, part) -> summed [wall, thread CPU, process CPU]
            for task, name, *times in parts:
                acc = per.setdefault((task, name), [0.0, 0.0, 0.0])
                for i, v in enumerate(times):
                    acc[i] += v
            for name in PARTS:
                xs = [v for (_, n), v in per.items() if n == name]
                if xs:
                    w, t, p = (1000 * statistics.median(col) for col in zip(*xs))
                    print(f"  {name:<50} {w:8.1f} {t:11.1f} {p:12.1f}")
    finally:
        shutil.rmtree(run, ignore_errors=True)
    return 0


PARTS = ["prepare (all)", "preflight (its child's CPU not counted)", "open (reader, cached per worker)", "plan (all)",
         "plan: overview read", "plan: tissue mask", "group: open store", "group: create_input (with its data)",
         "group: data writes (coords, tissue, thumbnail)", "first chunk's tiles (tile_first)"]


def _time_tasks(parts: bool = False) -> None:
    """On a worker: time the tile stage's task functions (process CPU, by task key) as the worker runs them,
    and with ``parts`` the parts of the prepare tasks (wall, thread CPU, process CPU).

    The client submits them by name; a worker resolves the name in its module, so the wrappers are used."""
    import builtins
    import itertools
    import os
    import time

    import zarr

    from cancernet_batch import runfolder, store, tiling
    from cancernet_batch.stages import tile

    log = builtins.__dict__.setdefault("_tile_tasks_cpu", [])
    part_log = builtins.__dict__.setdefault("_tile_tasks_parts", [])
    inside = {"prepare": None}  # the prepare task running in this worker (one task at a time: --workers only)

    def part(name, fn, *, only_in_prepare=False):
        def timed(*args, **kwargs):
            task = inside["prepare"]
            if only_in_prepare and task is None:
                return fn(*args, **kwargs)
            w, t, p = time.perf_counter(), time.thread_time(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                part_log.append((task, name, time.perf_counter() - w, time.thread_time() - t, time.process_time() - p))
        timed.__wrapped__ = fn
        return timed

    def unwrapped(fn):
        return getattr(fn, "__wrapped__", fn)

    if parts:
        region_reader = unwrapped(tiling.region_reader)

        def timed_region_reader(*args, **kwargs):  # the plan's overview only (read_tiles uses it too)
            return part("plan: overview read", region_reader(*args, **kwargs), only_in_prepare=True)
        timed_region_reader.__wrapped__ = region_reader
        tiling.region_reader = timed_region_reader
        tiling.tissue_mask = part("plan: tissue mask", unwrapped(tiling.tissue_mask))
        tile.plan_slide = part("plan (all)", unwrapped(tile.plan_slide))
        tile._reader = part("open (reader, cached per worker)", unwrapped(tile._reader), only_in_prepare=True)
        # the prepare's look-up of the store's inputs group (kept per worker process; older versions: open_store)
        where = "inputs_group" if hasattr(runfolder.Run, "inputs_group") else "open_store"
        setattr(runfolder.Run, where, part("group: open store", unwrapped(getattr(runfolder.Run, where)),
                                           only_in_prepare=True))
        store.create_input = part("group: create_input (with its data)", unwrapped(store.create_input))
        writes = "group: data writes (coords, tissue, thumbnail)"  # inside create_input (older versions: after it)
        zarr.Array.__setitem__ = part(writes, unwrapped(zarr.Array.__setitem__), only_in_prepare=True)
        for name in ("write_whole", "_encode_whole"):  # older versions: written whole; newer: encoded, then in the batch
            if hasattr(store, name):
                setattr(store, name, part(writes, unwrapped(getattr(store, name)), only_in_prepare=True))

    def timed(fn):
        def task(*args, **kwargs):
            from distributed.worker import thread_state

            cpu = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                log.append((str(thread_state.key), time.process_time() - cpu))
        task.__wrapped__ = fn
        return task

    for name in ("preflight_task", "prepare_slide_task", "tile_chunk_task"):
        setattr(tile, name, timed(unwrapped(getattr(tile, name))))
    if parts:
        prepare, count = tile.prepare_slide_task, itertools.count()

        def prepare_task(*args, **kwargs):
            inside["prepare"] = (os.getpid(), next(count))
            try:
                return part("prepare (all)", prepare)(*args, **kwargs)
            finally:
                inside["prepare"] = None
        prepare_task.__wrapped__ = unwrapped(prepare)
        tile.prepare_slide_task = prepare_task
        # a slide's preflight runs inside its prepare task (the stream's one task a slide)
        tile.preflight_task = part("preflight (its child's CPU not counted)", tile.preflight_task,
                                   only_in_prepare=True)
        # and so may its first chunk (tile_first): its own part, its reads and writes not counted in the others
        # (the write that chunk tasks share: the prepare task calls it with the group and coords in hand)
        chunk_task = tile._write_chunk

        def first_chunk(*args, **kwargs):
            task = inside["prepare"]
            if task is None:
                return chunk_task(*args, **kwargs)
            inside["prepare"] = None
            w, t, p = time.perf_counter(), time.thread_time(), time.process_time()
            try:
                return chunk_task(*args, **kwargs)
            finally:
                inside["prepare"] = task
                part_log.append((task, "first chunk's tiles (tile_first)", time.perf_counter() - w,
                                 time.thread_time() - t, time.process_time() - p))
        first_chunk.__wrapped__ = unwrapped(chunk_task)
        tile._write_chunk = first_chunk


def _task_cpu() -> list:
    """On a worker: ``[(task key, CPU s)]`` of the tasks timed by :func:`_time_tasks`."""
    import builtins

    return list(builtins.__dict__.get("_tile_tasks_cpu", []))


def _part_times() -> list:
    """On a worker: ``[(prepare task, part, wall s, thread CPU s, process CPU s)]`` recorded by :func:`_time_tasks`."""
    import builtins

    return list(builtins.__dict__.get("_tile_tasks_parts", []))


def _process_cpu() -> dict:
    """``{pid: (role, CPU s)}`` of this process (client and scheduler) and every process below it (a preflight
    child's from its main thread in ns: :func:`_thread_cpu`)."""
    import psutil

    me = psutil.Process()
    out = {}
    procs = [me, *me.children(recursive=True)]
    parent = {}
    for p in procs:
        try:
            parent[p.pid] = p.ppid()
        except psutil.Error:
            pass

    def depth(pid: int) -> int:  # 0: this process, 1: its children (the forkserver)...
        n = 0
        while pid != me.pid and pid in parent and n < 8:
            pid, n = parent[pid], n + 1
        return n

    for p in procs:
        try:
            cmd = " ".join(p.cmdline())
            t = p.cpu_times()
        except psutil.Error:
            continue
        # workers are forked from the forkserver (this process's child); a worker's preflight child is forked from
        # the worker (cluster.FORKSERVER_PRELOAD's prefork) or started as `python -m cancernet_batch.preflight --serve`
        d = depth(p.pid)
        role = ("client + scheduler" if d == 0 else "preflight child" if "preflight --serve" in cmd or d >= 3
                else "other" if d == 1 else "worker")
        cpu = t.user + t.system
        if role == "preflight child":  # one thread, a few ms a slide: below the 10 ms ticks of cpu_times
            cpu = _thread_cpu(p.pid, cpu)
        out[p.pid] = (f"{role} {p.pid}", cpu)
    return out


def _thread_cpu(pid: int, default: float) -> float:
    """CPU seconds of process ``pid``'s main thread in nanoseconds' resolution (Linux ``/proc/PID/schedstat``),
    else ``default``."""
    try:
        with open(f"/proc/{pid}/schedstat") as fh:
            return int(fh.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return default


if __name__ == "__main__":
    sys.exit(main())
