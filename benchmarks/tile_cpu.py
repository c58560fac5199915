"""The CPU of a whole ``cancernet tile`` command, by process, split into what it costs once and what it costs per tile
(issue 17's CPU target: at most half the naive loop's CPU per tile).

    python benchmarks/tile_cpu.py SLIDE... --small SLIDE [--workers 2] [--repeat 3] [--baseline CHECKOUT] [--naive]
                                  [--decode fast|exact|reader] [--json FILE]

Runs ``cancernet tile`` as a user does (its own local cluster, ``--workers``), on ``--small`` alone (a slide of a few
tiles: what the command costs whatever it tiles) and on ``SLIDE...`` (the set), ``--repeat`` times each, alternating.
Every 10 ms it samples the CPU (user + system) of each process of the command's tree (psutil), grouped by role: the
command itself (the client, with the scheduler), the forkserver that local workers are forked from, the workers,
their preflight children, and any other (multiprocessing's resource tracker). Then the stage's own task functions
(:func:`~cancernet_batch.stages.tile.prepare_slide_task` and :func:`~cancernet_batch.stages.tile.tile_chunk_task`, as
the workers run them) on the set in this process, without Dask, warm, best of ``--repeat``: the CPU per tile of the
work itself. Prints, per role, the median CPU s of the small slide's command and of the set's, and the difference
per tile of the set (the marginal CPU per tile), against the in-process figure. ``--baseline CHECKOUT``: the same
commands with another checkout's package (run from it, as ``tiling_speed.py --baseline`` does), alternating with
this one's (which goes first alternates too), and its table beside this one's. ``--naive``: the naive loop of
``tiling_speed.py`` (OpenSlide ``read_region`` per tile and a Pillow box resize, one process, tiles held) on the set's
same tiles, once after each pass of the commands, and the whole command's CPU per tile against its median: issue 17's
target as a ratio (at most 0.5). ``--decode``: the commands' and the task functions' decode mode (default ``fast``,
the command's own default; ``reader`` times the path of the formats the direct decoder does not read: every region
through the slide's reader). Each checkout's package is compiled to bytecode first, as an installed copy is
(:mod:`installed`).

A process that ends between two samples loses its last few ms: figures are a little low, never high.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from installed import as_installed
from tiling_speed import naive, plans, tree_cpu

ROLES = ("command", "forkserver", "workers", "preflight children", "other")


def _roles(root_pid: int, parent: dict[int, int], cmdline: dict[int, str]) -> dict[int, str]:
    """The role of each process of the command's tree from the parent each was first seen with (a process
    orphaned as the command exits is reparented; a zombie's command line is empty): the command; a child of it
    that is the parent of others, the fork server (multiprocessing's, started, or forked from the command:
    ``cluster._fork_server_from_here``); its children, the workers; theirs, the preflight children; the rest
    (the resource tracker) other."""
    roles = {root_pid: "command"}
    servers = {pid for pid, par in parent.items() if par == root_pid and pid in parent.values()
               and "resource_tracker" not in cmdline.get(pid, "")}
    for pid, par in parent.items():
        if pid == root_pid:
            continue
        roles[pid] = ("forkserver" if pid in servers else "workers" if par in servers else
                      "preflight children" if roles.get(par) == "workers" or parent.get(par) in servers else "other")
    return roles


def command_cpu(slides: list[str], workers: int, package: str | None = None, decode: str = "fast") -> dict:
    """``cancernet tile SLIDES --decode DECODE`` in a fresh run folder: wall s, tiles written, CPU s by role.
    ``package``: a checkout to run it from (its package first on ``sys.path``); None: this interpreter's."""
    import psutil

    run = Path(tempfile.mkdtemp(prefix="tile-cpu-"))
    try:
        cmd = [sys.executable, "-m", "cancernet_batch.cli", "tile", *map(os.path.abspath, slides), "--out",
               str(run / "run"), "--workers", str(workers), "--decode", decode]
        env = {**os.environ, "PYTHONPATH": package} if package else None
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=package)
        root = psutil.Process(proc.pid)
        cpu: dict[int, float] = {}
        parent: dict[int, int] = {}
        cmdline: dict[int, str] = {}
        while proc.poll() is None:
            for p, c in tree_cpu(root):
                cpu[p.pid] = c
                try:
                    parent.setdefault(p.pid, p.ppid())
                    line = " ".join(p.cmdline())
                except Exception:  # noqa: BLE001 - gone meanwhile
                    continue
                if line:  # the last one seen (a child between its fork and its exec shows its parent's)
                    cmdline[p.pid] = line
            time.sleep(0.01)
        role = _roles(proc.pid, parent, cmdline)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"cancernet tile failed: {proc.stderr.read().decode()[-2000:]}")
        from cancernet_batch import store
        from cancernet_batch.runfolder import Run

        tiles = sum(int(g.attrs["n_tiles"]) for _, g in store.iter_inputs(Run.of(run / "run").open_store("r")))
        by_role = {r: 0.0 for r in ROLES}
        count = {r: 0 for r in ROLES}
        for pid, c in cpu.items():
            by_role[role.get(pid, "other")] += c
            count[role.get(pid, "other")] += 1
        return {"wall": wall, "tiles": tiles, "cpu": by_role, "processes": count}
    finally:
        shutil.rmtree(run, ignore_errors=True)


def in_process(slides: list[str], repeat: int, decode: str = "fast") -> tuple[int, float]:
    """The stage's task functions on ``slides`` in this process (no Dask), best of ``repeat`` after a warm-up:
    (tiles, CPU s)."""
    from cancernet_batch.runfolder import Run
    from cancernet_batch.stages.tile import prepare_slide_task, tile_chunk_task
    from cancernet_batch.tiling import TileConfig as Cfg

    cfg = Cfg(decode=decode)
    best, n = float("inf"), 0
    for _ in range(repeat + 1):
        d = Path(tempfile.mkdtemp(prefix="tile-cpu-"))
        try:
            run = Run.of(d / "run").create()
            run.open_store("a").require_group("inputs")
            t0, n = time.process_time(), 0
            for s in slides:
                out = prepare_slide_task(run, s, cfg, [], tile_first=True)
                n += sum(e - b for _, b, e in out["tiled"])
                for i, b, e in out["todo"]:
                    n += tile_chunk_task(run, out["gid"], s, i, b, e, out["level"], out["tile_px"], cfg)
            best = min(best, time.process_time() - t0)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return n, best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("slides", nargs="+")
    ap.add_argument("--small", required=True, help="a slide of few tiles: the command's cost whatever it tiles")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", default=None, metavar="CHECKOUT",
                    help="another checkout: its commands alternate with this one's, its table printed too")
    ap.add_argument("--naive", action="store_true", help="also the naive loop on the set, after each pass")
    ap.add_argument("--decode", default="fast", choices=["fast", "exact", "reader"],
                    help="the decode mode of the commands and the task functions (default fast)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    as_installed(a.baseline)

    from cancernet_batch.machine import machine

    versions = [("this", None)] + ([("baseline", os.path.abspath(a.baseline))] if a.baseline else [])
    runs = {who: {"small": [], "set": []} for who, _ in versions}
    loops = []  # the naive loop's (tiles, wall s, CPU s), one per pass
    if a.naive:
        from cancernet_batch.tiling import TileConfig as Cfg

        planned = plans(a.slides, Cfg(decode=a.decode))
    for i in range(a.repeat):
        for who, package in (versions if i % 2 == 0 else versions[::-1]):
            runs[who]["small"].append(command_cpu([a.small], a.workers, package, a.decode))
            runs[who]["set"].append(command_cpu(a.slides, a.workers, package, a.decode))
        if a.naive:
            loops.append(naive(a.slides, planned))
    n_in, cpu_in = in_process(a.slides, a.repeat, a.decode)

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    m = machine()
    small, full = runs["this"]["small"], runs["this"]["set"]
    n_small, n_full = small[0]["tiles"], full[0]["tiles"]
    print(f"{when}, {m.get('cpu')}, {m.get('cores')} cores; `cancernet tile --workers {a.workers} --decode {a.decode}`, medians of "
          f"{a.repeat}; small: {n_small} tiles, set: {len(a.slides)} slides, {n_full} tiles")
    rows = {who: _table(who, r["small"], r["set"], a.baseline) for who, r in runs.items()}
    print(f"\nthe same task functions in one process (this checkout, no Dask, best of {a.repeat}): "
          f"{1000 * cpu_in / max(1, n_in):.3f} ms per tile ({n_in} tiles)")
    ratios = {}
    if loops:
        if any(n != n_full for n, _, _ in loops):
            raise RuntimeError(f"the naive loop read {loops[0][0]} tiles, the command wrote {n_full}")
        loop_ms = [1000 * c / n for n, _, c in loops]
        print(f"\nthe naive loop on the set's {n_full} tiles (1 process, tiles held), CPU ms per tile by pass: "
              + ", ".join(f"{x:.3f}" for x in loop_ms) + f"; median {statistics.median(loop_ms):.3f}")
        for who, r in rows.items():
            per_pass = [1000 * sum(x["cpu"].values()) / n_full / y for x, y in zip(runs[who]["set"], loop_ms)]
            ratios[who] = {"median": r["all"]["set_ms_per_tile"] / statistics.median(loop_ms), "per_pass": per_pass}
            print(f"{who}: the whole command's CPU per tile / the naive loop's (target <= 0.5): "
                  f"{ratios[who]['median']:.2f} (medians); by pass " + ", ".join(f"{x:.2f}" for x in per_pass))
    if a.json:
        out = {"date": when, "machine": m, "args": vars(a), "small": small, "set": full, "rows": rows["this"],
               "in_process": {"tiles": n_in, "cpu": cpu_in}, "naive": loops, "vs_naive": ratios}
        if a.baseline:
            out["baseline"] = {**runs["baseline"], "rows": rows["baseline"]}
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


def _table(who: str, small: list[dict], full: list[dict], baseline: str | None) -> dict:
    """Print one version's table (medians by role: the small slide's command, the set's, their difference per tile,
    and the set's whole command per tile); its rows."""
    def med(runs: list[dict], r: str) -> float:
        return statistics.median(sum(x["cpu"].values()) if r == "all" else x["cpu"][r] for x in runs)

    n_full = full[0]["tiles"]
    extra = max(1, n_full - small[0]["tiles"])
    print(f"\n{who}{f' ({baseline})' if who == 'baseline' else ''}:\n")
    print("| process | small slide, CPU s | the set, CPU s | set - small, CPU ms per tile | the set, CPU ms per tile |")
    print("|---|---:|---:|---:|---:|")
    rows = {}
    for r in (*ROLES, "all"):
        s, f = med(small, r), med(full, r)
        rows[r] = {"small": s, "set": f, "ms_per_tile": 1000 * (f - s) / extra, "set_ms_per_tile": 1000 * f / n_full}
        print(f"| {r} | {s:.2f} | {f:.2f} | {rows[r]['ms_per_tile']:.3f} | {rows[r]['set_ms_per_tile']:.3f} |")
    return rows


if __name__ == "__main__":
    sys.exit(main())
