"""Benchmark (issue 17): the tile stage against the naive loop and the decode roof, in one run.

    python benchmarks/tiling_speed.py [--slides 8] [--size 30000] [--workers 2] [--work DIR]
                                      [--copies 20] [--model MODEL_DIR] [--json OUT.json]
    python benchmarks/tiling_speed.py --startup N --baseline DIR [--model MODEL_DIR] ...   # start-up only

On ``--slides`` synthetic Aperio SVS of ``--size`` px at 0.5 µm/px (tiles at 4.0 µm/px: level 1 at
2.0 µm/px, averaged 2x2) and on ``--copies`` copies of the real CMU-1-Small-Region
(``../shared/data/slides``, 0.499 µm/px: level 0 averaged about 8x8), rows of the same run:

* ``naive loop``: one process, OpenSlide ``read_region`` per tile at the level tiling uses, Pillow box
  resize to 50 px (the ten-line loop a user writes); tiles held in memory, not written;
* ``decode roof`` (:func:`cancernet_batch.bench.decode_roof`, as in ``cancernet bench``): the compressed
  tiles the slides' tissue tiles need, each decoded once at full size, nothing else, in ``--workers``
  processes: what any reader of these files must at least spend;
* ``tile floor`` (:func:`cancernet_batch.bench.tile_floor`, as in ``cancernet bench``): the same compressed tiles
  decoded and averaged by blocks as tiling does them, and the model tiles' bytes of their pixels encoded by the
  tile store's codec, nothing else, in ``--workers`` processes: what tiling must do to store these exact tiles as it
  stores them (its rate against the roof bounds the stage's);
* ``stage``: the tile stage alone with ``--decode fast`` on a started local cluster (``cancernet bench``'s figure);
* with ``--baseline DIR``: ``cancernet tile`` of an earlier version (run from its checkout, so its
  package comes first), to compare the whole command before and after;
* ``cancernet tile --decode fast|exact|reader``: the whole command (cluster start, preflight, plan,
  tiles written to the zarr store) as a user runs it, ``--workers`` worker processes.

CPU seconds are user + system of the command's whole process tree (client, workers, forkserver,
preflight children), sampled every 20 ms. ``first tile`` (``first tile written``) is the time from the
command's start to the first chunk flag on disk (polled every 10 ms). Accuracy: mean absolute
difference of the ``fast`` tiles from the ``exact`` ones (exact area averages), and with
``--model``, the correlation of the model's probabilities on both. Prints a markdown table with the
date and machine.

``--tia-python``: a Python with TIAToolbox (``tia_tiles.py`` runs there). TIAToolbox 2.1.3 pins ``torch<2.13``; where
only a newer CPU wheel of torch is at hand, install it with ``--no-deps`` beside that wheel and its other
requirements (its region reads do not use torch)::

    python -m venv /tmp/tia-venv && /tmp/tia-venv/bin/pip install TORCH_CPU_WHEEL psutil
    /tmp/tia-venv/bin/pip install --no-deps tiatoolbox==2.1.3
    /tmp/tia-venv/bin/python -c "from importlib.metadata import requires; print('\\n'.join(r for r in requires('tiatoolbox')
        if 'extra ==' not in r and r.split('<')[0].split('>')[0] not in ('torch', 'torchvision', 'timm', 'transformers',
        'jupyterlab', 'sphinx', 'umap-learn', 'ipywidgets')))" > /tmp/tia-reqs.txt
    /tmp/tia-venv/bin/pip install -r /tmp/tia-reqs.txt
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from installed import as_installed

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "slides" / "cmu-1-small-region.svs"


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def plans(paths, cfg):
    from cancernet_batch.tiling import plan_slide

    return [plan_slide(p, cfg) for p in paths]


def naive(paths, plans_) -> tuple[int, float, float]:
    """The naive loop: ``(tiles, wall s, cpu s)``."""
    import openslide
    from PIL import Image

    t0, c0, n = time.perf_counter(), _self_cpu(), 0
    for path, plan in zip(paths, plans_):
        slide = openslide.OpenSlide(str(path))
        s0 = plan.level0_tile_px
        side = int(round(plan.tile_px_level))
        for r, c in plan.coords:
            im = slide.read_region((int(c * s0), int(r * s0)), plan.level, (side, side)).convert("RGB")
            np.asarray(im.resize((50, 50), Image.BOX))
            n += 1
        slide.close()
    return n, time.perf_counter() - t0, _self_cpu() - c0


def tiatoolbox(python: str, plans_, jobs_file: Path, workers: int) -> dict:
    """TIAToolbox's fastest mode on the same tiles (``tia_tiles.py`` in ``python``): tiles and wall seconds."""
    jobs = [{"path": p.source, "mpp": p.target_mpp, "tile_px0": p.level0_tile_px, "coords": p.coords.tolist()}
            for p in plans_]
    jobs_file.write_text(json.dumps(jobs))
    out = subprocess.run([python, str(Path(__file__).with_name("tia_tiles.py")), str(jobs_file),
                          "--workers", str(workers)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"tia_tiles": r["tiles"], "tia_wall": r["wall"], "tia_version": r["version"]}


def first_chunk_flagged(run: Path) -> bool:
    """Whether some input of the run folder ``run`` has a chunk of tiles written and flagged: its ``tiled/c.I``
    (``store.CHUNK_KEYS``), or ``tiled/c/I`` in a store written by a checkout from before them (``--baseline``)."""
    inputs = run / "tiles.zarr" / "inputs"
    return any(p for k in ("*/tiled/c.*", "*/tiled/c/*") for p in inputs.glob(k))


def tree_cpu(root) -> list:
    """One sample of the CPU (user + system, s) of ``root`` (a ``psutil.Process``) and of every process below it, as
    ``[(process, cpu)]`` in the order of their pids (parents first, as a rule); those gone meanwhile are left out."""
    import psutil

    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    out = []
    for p in sorted(tree, key=lambda q: q.pid):
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        out.append((p, t.user + t.system))
    return out


def cancernet_tile(paths, run: Path, decode: str | None, workers: int, package: str | None = None,
                   model: str | None = None) -> dict:
    """Run ``cancernet tile`` (with ``model``: ``cancernet run``) as a user does; wall, CPU of the whole
    process tree, first tile written.

    CPU is sampled from the process tree every 20 ms (psutil): workers forked from a forkserver are
    not this process's children, so ``RUSAGE_CHILDREN`` would miss them.
    """
    import psutil

    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "cancernet_batch.cli", "run" if model else "tile", *map(str, paths), "--out", str(run),
           "--workers", str(workers)] + (["--decode", decode] if decode else []) + (["--model", model] if model else [])
    # an earlier version: run from its checkout, which `python -m` puts first on sys.path (workers inherit it)
    env = {**os.environ, "PYTHONPATH": package} if package else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=package)
    root, cpu, first = psutil.Process(proc.pid), {}, None
    while proc.poll() is None:
        cpu.update((p.pid, c) for p, c in tree_cpu(root))
        if first is None and first_chunk_flagged(run):
            first = time.perf_counter() - t0
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"cancernet {cmd[3]} failed: {proc.stderr.read().decode()[-2000:]}")
    return {"wall": wall, "cpu": sum(cpu.values()), "first_tile": first}


def startup(sets: dict, work: Path, a) -> list[dict]:
    """``--startup N``: only the whole command, ``N`` passes per set (``cancernet tile``, and with ``--model``
    ``cancernet run``), this checkout and ``--baseline`` alternating (which goes first alternates too).
    One row per pass and version: first tile written and wall seconds, with the 1-minute load average."""
    versions = [("this", None)] + ([("baseline", a.baseline)] if a.baseline else [])
    commands = [("tile", None)] + ([("run", a.model)] if a.model else [])
    rows = []
    for name, paths in sets.items():
        for i in range(a.startup):
            for command, model in commands:
                for who, package in (versions if i % 2 == 0 else versions[::-1]):
                    load = os.getloadavg()[0]
                    r = cancernet_tile(paths, work / f"run-startup-{who}", None, a.workers, package=package, model=model)
                    rows.append({"set": name, "command": command, "version": who, "pass": i, "load": load, **r})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def _range(values) -> str:
    v = sorted(values)
    return f"{float(np.median(v)):.2f} ({v[0]:.2f}-{v[-1]:.2f})"


def print_startup(rows: list[dict]) -> None:
    """Per set, command and version: first tile written and wall, median (range); with a baseline, the ratio
    this / baseline of the two runs of each pass (back to back, so under about the same load), median (range)."""
    print("| set | command | version | passes | first tile written, s: median (range) | wall s: median (range) | "
          "load average (1 min) | first tile, this / baseline of each pass |")
    print("|---|---|---|---:|---:|---:|---|---:|")
    keys = sorted({(r["set"], r["command"], r["version"]) for r in rows}, key=lambda k: (k[0], k[1], k[2] != "baseline"))
    for key in keys:
        rs = [r for r in rows if (r["set"], r["command"], r["version"]) == key]
        loads = [r["load"] for r in rs]
        base = {r["pass"]: r["first_tile"] for r in rows if (r["set"], r["command"], r["version"]) == (*key[:2], "baseline")}
        ratios = [r["first_tile"] / base[r["pass"]] for r in rs if key[2] != "baseline" and base.get(r["pass"])]
        print(f"| {key[0]} | `cancernet {key[1]}` | {key[2]} | {len(rs)} | {_range([r['first_tile'] for r in rs])} | "
              f"{_range([r['wall'] for r in rs])} | {min(loads):.1f}-{max(loads):.1f} | "
              f"{_range(ratios) if ratios else ''} |")


def stored_tiles(run: Path) -> dict:
    """``{(source, row, col): index}`` and the tiles array of a run's store, inputs in source order."""
    import zarr

    root = zarr.open_group(str(run / "tiles.zarr"), mode="r")
    groups = sorted(root["inputs"].groups(), key=lambda kv: kv[1].attrs["source"])
    index, tiles = {}, []
    for _, g in groups:
        for r, c in np.asarray(g["coords"][:]):
            index[(g.attrs["source"], int(r), int(c))] = len(index)
        tiles.append(np.asarray(g["tiles"][:]))
    return index, np.concatenate(tiles)


def common_tiles(a: Path, b: Path) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The tiles both runs stored (same input, same grid position), side by side, and each run's count.

    ``fast`` also decodes the plan's tissue view in the DCT domain, so a few tiles at the tissue's
    edge can be kept by one run and not the other."""
    (ia, ta), (ib, tb) = stored_tiles(a), stored_tiles(b)
    both = sorted(set(ia) & set(ib))
    return ta[[ia[k] for k in both]], tb[[ib[k] for k in both]], len(ia), len(ib)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", type=int, default=30000)
    ap.add_argument("--copies", type=int, default=20, help="copies of CMU-1-Small-Region (0: leave that set out)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default=None, help="model folder: also compare the model's probabilities")
    ap.add_argument("--baseline", default=None,
                    help="a checkout of an earlier version (e.g. `git worktree add /tmp/base REV`): add its "
                         "`cancernet tile` to each set, same slides, same run")
    ap.add_argument("--tia-python", default=None,
                    help="a Python with TIAToolbox installed: add its fastest mode (benchmarks/tia_tiles.py)")
    ap.add_argument("--work", default=None, help="folder for the slides and runs (kept; default: temporary)")
    ap.add_argument("--startup", type=int, default=0, metavar="N",
                    help="only the start-up: N passes of the whole command per set (first tile written, wall), "
                         "alternating with --baseline; with --model also `cancernet run`")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    as_installed(a.baseline)

    from cancernet_batch.bench import decode_roof, tile_floor, tile_stage
    from cancernet_batch.config import TileConfig
    from cancernet_batch.machine import machine
    from cancernet_batch.synth import SlideSpec, write_slide

    work = Path(a.work or tempfile.mkdtemp(prefix="tiling-speed-"))
    sets = {}
    synth = [work / "synth" / f"s{i:02d}.svs" for i in range(a.slides)]
    for i, p in enumerate(synth):
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            write_slide(SlideSpec(path=p, width=a.size, height=a.size, mpp=0.5, seed=170 + i, detail_mpp=2.0))
    sets[f"{a.slides} synthetic SVS, {a.size} px at 0.5 µm/px"] = synth
    if a.copies:
        real = [work / "real" / f"cmu1-{i:02d}.svs" for i in range(a.copies)]
        for p in real:
            p.parent.mkdir(parents=True, exist_ok=True)
            if not p.exists():
                shutil.copy(REAL, p)
        sets[f"{a.copies} copies of CMU-1-Small-Region (0.499 µm/px)"] = real

    if a.startup:
        rows = startup(sets, work, a)
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        m = machine()
        print(f"\n{when}, {m.get('cpu')}, {m.get('cores')} cores; `--workers {a.workers}`, tiles at 4.0 µm/px\n")
        print_startup(rows)
        if a.json:
            Path(a.json).write_text(json.dumps({"date": when, "machine": m, "args": vars(a), "rows": rows}, indent=1))
        return 0

    cfg = TileConfig()
    rows = []
    for name, paths in sets.items():
        ps = plans(paths, cfg)
        n = sum(p.n_tiles for p in ps)
        row = {"set": name, "tiles": n}
        _, row["naive_wall"], row["naive_cpu"] = naive(paths, ps)
        if a.tia_python:
            row.update(tiatoolbox(a.tia_python, ps, work / "tia-jobs.json", a.workers))
        for mode in ("fast", "exact", "reader"):
            r = cancernet_tile(paths, work / f"run-{mode}", mode, a.workers)
            row.update({f"{mode}_{k}": v for k, v in r.items()})
        shutil.rmtree(work / "run-stage", ignore_errors=True)
        stage = tile_stage([str(p) for p in paths], work / "run-stage", workers=a.workers,
                           tile_cfg=TileConfig(decode="fast"))
        assert stage.patches == n, (stage.patches, n)  # every tile written by this stage run
        row["stage_wall"] = stage.seconds  # the tile stage on a started cluster (bench's figure)
        if a.baseline:
            r = cancernet_tile(paths, work / "run-baseline", None, a.workers, package=a.baseline)
            row.update({f"baseline_{k}": v for k, v in r.items()})
        roof = decode_roof(work / "run-fast", a.workers)
        row["compressed_tiles"], row["roof_wall"] = roof.settings["compressed_tiles"], roof.seconds
        floor = tile_floor(work / "run-fast", a.workers)
        row["floor_wall"], row["floor_cpu"] = floor.seconds, floor.settings["cpu_ms_per_tile"] * n / 1000
        fast, exact, row["fast_kept"], row["exact_kept"] = common_tiles(work / "run-fast", work / "run-exact")
        row["fast_mad"] = float(np.abs(fast.astype(np.int16) - exact).mean())
        if a.model:
            from cancernet_batch.engines import load_engine

            eng = load_engine(a.model)
            pf, pe = eng.predict(fast), eng.predict(exact)
            row["prob_corr"] = float(np.corrcoef(pf, pe)[0, 1])
        rows.append(row)
        print(json.dumps(row), flush=True)

    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    m = machine()
    print(f"\n{when}, {m.get('cpu')}, {m.get('cores')} cores; tiles at 4.0 µm/px, `--workers {a.workers}`\n")
    tia = bool(a.tia_python)
    print("| set | tiles | naive loop tiles/s (1 core) | " + ("TIAToolbox tiles/s | " if tia else "")
          + "decode roof tiles/s | tile floor tiles/s | stage (fast, cluster started) tiles/s | `cancernet tile` fast "
          "tiles/s | exact | reader | stage vs naive | "
          + ("stage vs TIAToolbox | " if tia else "") + "stage vs roof | floor vs roof | stage vs floor | "
          "CPU ms/tile: naive, floor, fast, exact, reader | "
          "first tile s (fast) | tiles kept fast / exact | fast MAD vs exact |" + (" p corr |" if a.model else ""))
    print("|---|---:|---:|" + ("---:|" if tia else "") + "---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if tia else "")
          + "---:|---:|---:|---|---:|---:|---:|" + ("---:|" if a.model else ""))
    for r in rows:
        n = r["tiles"]
        rate = {k: n / r[f"{k}_wall"] for k in ("naive", "roof", "floor", "stage", "fast", "exact", "reader")
                + (("tia",) if tia else ())}
        ms = ", ".join(f"{1000 * r[f'{k}_cpu'] / n:.3f}" for k in ("naive", "floor", "fast", "exact", "reader"))
        print(f"| {r['set']} | {n} | {rate['naive']:.0f} | " + (f"{rate['tia']:.0f} | " if tia else "")
              + f"{rate['roof']:.0f} | {rate['floor']:.0f} | {rate['stage']:.0f} | {rate['fast']:.0f} | {rate['exact']:.0f} | "
              f"{rate['reader']:.0f} | {rate['stage'] / rate['naive']:.2f} | "
              + (f"{rate['stage'] / rate['tia']:.2f} | " if tia else "") + f"{rate['stage'] / rate['roof']:.2f} | "
              f"{rate['floor'] / rate['roof']:.2f} | {rate['stage'] / rate['floor']:.2f} | {ms} | "
              f"{r['fast_first_tile'] or float('nan'):.2f} | "
              f"{r['fast_kept']} / {r['exact_kept']} | {r['fast_mad']:.2f} |"
              + (f" {r['prob_corr']:.5f} |" if a.model else ""))
    if a.baseline:
        print("\n| set | `cancernet tile` wall s: baseline, fast, exact, reader | CPU s: baseline, fast, exact, reader | "
              "first tile s: baseline, fast |")
        print("|---|---|---|---|")
        for r in rows:
            modes = ("baseline", "fast", "exact", "reader")
            print(f"| {r['set']} | " + ", ".join(f"{r[f'{m}_wall']:.2f}" for m in modes) + " | "
                  + ", ".join(f"{r[f'{m}_cpu']:.1f}" for m in modes) + " | "
                  + f"{r['baseline_first_tile'] or float('nan'):.2f}, {r['fast_first_tile'] or float('nan'):.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"date": when, "machine": m, "args": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
