"""Benchmark: `cancernet run`, or tiling per slide, on slides read from an S3 server whose every request takes a
round trip more, as on a real object store (AWS S3: tens of ms to the first byte), for one or more checkouts,
alternating.

    python benchmarks/s3_latency.py [--latency-ms 20] [--server s3rver|moto|seaweedfs] [--count 2] [--size 16384]
                                    [--mpp 0.5] [--repeat 3] [--baseline OLD_CHECKOUT ...] [--workers 2]
                                    [--variant NAME=ARGS ...] [--rerun]
                                    [--tiling [--target 4.0] [--tile-repeat 3]] [--out DIR]

On a server on the same machine a request costs a few ms, so what a run's requests cost one after another
(a TIFF's IFDs read one at a time, a look-up before each open) hardly shows; on a real endpoint each of them
is a round trip of tens of ms in a worker's task. The S3 server (``--server``: s3rver, as in
``s3_inputs.py``, SeaweedFS (``weed``, from the dev extras), or moto's app from ``tests/s3server.py``; moto copies
the whole object for each ranged GET)
runs in a child process, behind :class:`DelayProxy`: a TCP proxy that holds each byte the client sends for
``--latency-ms`` before passing it on, and counts the request lines.

Writes ``--count`` synthetic Aperio SVS slides (``cancernet_batch.synth``, ``--size`` px a side at ``--mpp``;
kept in ``--work`` for later calls) and a width-32 CancerNet with random weights (ONNX), uploads the slides,
then runs ``cancernet run s3://BUCKET/in/ --out s3://BUCKET/runs/...`` (its own local cluster, ``--workers``
processes; the run folder on the same server) with this checkout and each ``--baseline`` checkout in turn
(``PYTHONPATH``; from a folder with no checkout in it), ``--repeat`` rounds. Per run: the command's wall time,
the time to the first reported input, the HEAD and GET requests sent for the input objects (per slide), and
from the request lines the time from an input's first request to its report's GeoJSON and the interval between
inputs' first requests (medians: how long an input is in flight, how fast the stream takes new ones).
``--rerun``: after each run, the same command again over the finished run folder (every input complete and
scored: what a resumed night does first for the inputs it finished), timed with its requests.
Prints a markdown table; ``--out`` gets ``s3-latency-[tiling-]DATE.json`` and ``.md``.

``--tiling``: instead of whole runs, each checkout (in a child process) tiles each slide as one tile task
does (open, plan, every kept tile at ``--target`` µm/px, ``--decode fast``), from the object and from the
local file, best of ``--tile-repeat``: tiles/s and the s3/local ratio per slide (the issue's tiling figure,
with a real endpoint's round trip in each request).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
from installed import as_installed  # noqa: E402 - a sibling script
from results_files import write_results  # noqa: E402 - a sibling script


class DelayProxy:
    """A TCP proxy on 127.0.0.1 in front of an S3 server that holds every byte a client sends for ``latency``
    seconds before passing it on (a one-way delay, not a bandwidth limit: each request's round trip grows by
    ``latency``, requests in flight together wait together). It runs its own event loop in a thread of this
    process (its CPU is not the measured process's). ``counts`` tallies the request lines it saw by method and
    kind of object (for ``key_part`` objects: ``GET input``, ``HEAD input``...)."""

    def __init__(self, host: str, port: int, latency: float, key_part: str):
        import asyncio
        import threading

        self.host, self.port, self.latency, self.key_part = host, port, latency, key_part
        self.counts = collections.Counter()
        self.lines: list[tuple[float, str, str]] = []  # (monotonic time, method, path) of each request line
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve():
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.endpoint = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        ready.wait(30)

    _REQUEST = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.1\r\n")

    async def _handle(self, client_r, client_w):
        import asyncio

        try:
            server_r, server_w = await asyncio.open_connection(self.host, self.port)
        except OSError:
            client_w.close()
            return
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def take():
            while data := await client_r.read(1 << 16):
                for m in self._REQUEST.finditer(data):
                    kind = "input" if self.key_part.encode() in m.group(2) else "other"
                    with self._lock:
                        self.counts[f"{m.group(1).decode()} {kind}"] += 1
                        self.lines.append((time.monotonic(), m.group(1).decode(), m.group(2).decode(errors="replace")))
                queue.put_nowait((loop.time() + self.latency, data))
            queue.put_nowait((loop.time() + self.latency, b""))

        async def give():
            while True:
                due, data = await queue.get()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if not data:
                    break
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        async def back():
            while data := await server_r.read(1 << 16):
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        await asyncio.gather(take(), give(), back(), return_exceptions=True)

    def tally(self) -> collections.Counter:
        """The counts since the last tally (the request lines too are cleared: :meth:`take_lines` first)."""
        with self._lock:
            out, self.counts, self.lines = self.counts, collections.Counter(), []
        return out

    def take_lines(self) -> list[tuple[float, str, str]]:
        with self._lock:
            return list(self.lines)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def input_spans(lines: list[tuple[float, str, str]], t0: float, names: list[str]) -> dict:
    """Per input slide (``names``: their stems), from a run's request lines: when its first request for the object went out and
    when its report's GeoJSON was written, in s from ``t0``; with the median time from one to the other and the
    median interval between inputs' first requests (how fast the stream takes new inputs)."""
    import statistics

    first: dict[str, float] = {}
    reported: dict[str, float] = {}
    for t, method, path in lines:
        for n in names:
            if n in path:
                if "/in/" in path:  # the input object itself (the store's look-ups name its group too)
                    first.setdefault(n, t - t0)
                if method == "PUT" and "/report/geojson/" in path:
                    reported.setdefault(n, t - t0)
    starts = sorted(first.values())
    took = [reported[n] - first[n] for n in first if n in reported]
    return {"first_request_s": {n: round(v, 3) for n, v in first.items()},
            "report_s": {n: round(v, 3) for n, v in reported.items()},
            "median_input_s": round(statistics.median(took), 3) if took else None,
            "median_start_interval_s": round(statistics.median([b - a for a, b in zip(starts, starts[1:])]), 3)
            if len(starts) > 1 else None}



def _tile_child(spec: str) -> None:
    """Child (``--tile-child JSON``): tile each slide from the object and from the local file, best of ``repeat``;
    prints one JSON line ``{name: {"tiles": n, "s3_s": best, "local_s": best}}``."""
    from cancernet_batch.config import TileConfig
    from cancernet_batch.slides import open_slide
    from cancernet_batch.tiling import plan_slide, read_tiles

    a = json.loads(spec)
    cfg = TileConfig(target_mpp=a["target"], decode="fast")

    def once(source, options):
        t0 = time.perf_counter()
        with (open_slide(source, storage_options=options) if options else open_slide(source)) as reader:
            plan = plan_slide(source, cfg, reader=reader)
            read_tiles(reader, plan.level, plan.tile_px_level, plan.coords, decode=cfg.decode)
        return time.perf_counter() - t0, plan.n_tiles

    out = {}
    for url, local in a["slides"]:
        once(local, None), once(url, a["options"])  # warm: imports, page cache, connections
        s3 = [once(url, a["options"]) for _ in range(a["repeat"])]
        loc = [once(local, None) for _ in range(a["repeat"])]
        out[Path(local).name] = {"tiles": s3[0][1], "s3_s": min(t for t, _ in s3), "local_s": min(t for t, _ in loc)}
    print(json.dumps(out))


def _code(checkout: Path) -> dict:
    """Which code a checkout runs (``cancernet_batch.machine.code``, imported from it)."""
    p = subprocess.run([sys.executable, "-c", "import json; from cancernet_batch.machine import code; print(json.dumps(code()))"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(checkout)}, cwd="/")
    return json.loads(p.stdout) if p.returncode == 0 else {"folder": str(checkout)}


def _inputs(work: Path, args) -> tuple[list[Path], Path]:
    from cancernet_batch.bench import _random_model
    from cancernet_batch.synth import synth_slides

    slides = work / f"slides-{args.count}x{args.size}-{args.mpp}"
    if len(list(slides.glob("*.svs"))) < args.count:
        synth_slides(str(slides), count=args.count, size=args.size, mpp=args.mpp, seed=7)
    model = work / "model"
    if not (model / "model.json").exists():
        _random_model(model)
    return sorted(slides.glob("*.svs"))[:args.count], model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--server", choices=("s3rver", "moto", "seaweedfs"), default="s3rver")
    ap.add_argument("--count", type=int, default=2)
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--baseline", action="append", default=[], help="another checkout to run (PYTHONPATH)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="this checkout again with more `cancernet run` arguments, e.g. "
                         "'threads2=--threads-per-worker 2' (whole runs only; alternating with the others)")
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "s3-latency"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiling", action="store_true", help="time tiling per slide instead of whole runs")
    ap.add_argument("--rerun", action="store_true", help="after each run, time the same command over its finished folder")
    ap.add_argument("--target", type=float, default=4.0)
    ap.add_argument("--tile-repeat", type=int, default=3)
    ap.add_argument("--tile-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    as_installed(*args.baseline)
    if args.tile_child:
        _tile_child(args.tile_child)
        return 0

    if args.variant and args.tiling:
        ap.error("--variant adds `cancernet run` arguments: whole runs only, not --tiling")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files, model = _inputs(work, args)
    checkouts = [("this", HERE.parent)] + [(f"baseline{i}" if len(args.baseline) > 1 else "baseline", Path(b).resolve())
                                           for i, b in enumerate(args.baseline)]
    extra = {}  # --variant NAME=ARGS: this checkout again, with more `cancernet run` arguments
    for v in args.variant:
        name, _, more = v.partition("=")
        checkouts.append((name, HERE.parent))
        extra[name] = more.split()
    codes = {name: _code(path) for name, path in checkouts}
    from s3_inputs import _server

    runs = []
    with _server(args.server) as server:
        server.create_bucket("latency-bench")
        fs = server.fs()
        for f in files:
            fs.put(str(f), f"latency-bench/in/{f.name}")
        host, port = server.endpoint.rsplit("/", 1)[1].rsplit(":", 1)
        proxy = DelayProxy(host, int(port), args.latency_ms / 1000, "/latency-bench/in/")
        options = server.options()
        options["client_kwargs"] = {**options["client_kwargs"], "endpoint_url": proxy.endpoint}
        for rnd in range(args.repeat):
            order = checkouts if rnd % 2 == 0 else checkouts[::-1]
            for name, path in order:
                proxy.tally()
                if args.tiling:
                    spec = json.dumps({"slides": [(f"s3://latency-bench/in/{f.name}", str(f)) for f in files],
                                       "options": options, "target": args.target, "repeat": args.tile_repeat})
                    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--tile-child", spec],
                                       capture_output=True, text=True, cwd="/", env={**os.environ, "PYTHONPATH": str(path)})
                    if p.returncode != 0:
                        raise SystemExit(f"{name}: tiling failed ({p.returncode}): {p.stderr[-600:]}")
                    count = proxy.tally()  # every slide, 1 + 2 x tile-repeat times
                    for slide, r in json.loads(p.stdout.strip().splitlines()[-1]).items():
                        runs.append({"checkout": name, "round": rnd, "slide": slide, **r,
                                     "ratio": round(r["local_s"] / r["s3_s"], 3),
                                     "input_requests_per_tiling": sum(v for k, v in count.items() if k.endswith(" input"))
                                     / (len(files) * (1 + args.tile_repeat))})
                        print(f"{name} round {rnd}: {runs[-1]}", flush=True)
                    continue
                cmd = [sys.executable, "-m", "cancernet_batch.cli", "run", "s3://latency-bench/in/",
                       "--out", f"s3://latency-bench/runs/{name}-{rnd}", "--model", str(model),
                       "--workers", str(args.workers), "--storage-options", json.dumps(options), *extra.get(name, ())]
                t0, m0 = time.perf_counter(), time.monotonic()
                p = subprocess.run(cmd, capture_output=True, text=True, cwd="/",
                                   env={**os.environ, "PYTHONPATH": str(path)})
                wall = time.perf_counter() - t0
                spans = input_spans(proxy.take_lines(), m0, [f.stem for f in files])
                if p.returncode != 0:
                    raise SystemExit(f"{name}: `cancernet run` failed ({p.returncode}): {p.stderr[-600:]}")
                m = re.search(r"first input reported after ([\d.]+) s", p.stdout)
                count = proxy.tally()
                rerun = {}
                if args.rerun:  # the same command over the finished run: every input found complete and scored
                    proxy.take_lines()
                    t1 = time.perf_counter()
                    q = subprocess.run(cmd, capture_output=True, text=True, cwd="/", env={**os.environ, "PYTHONPATH": str(path)})
                    rerun = {"rerun_s": round(time.perf_counter() - t1, 3), "rerun_requests": sum(proxy.tally().values())}
                    proxy.take_lines()
                    if q.returncode != 0 or "0 tiled" not in q.stdout:
                        raise SystemExit(f"{name}: the re-run failed or did work ({q.returncode}): {q.stdout[-400:]} {q.stderr[-400:]}")
                runs.append({"checkout": name, "round": rnd, "wall_s": round(wall, 3), **rerun,
                             "first_report_s": float(m.group(1)) if m else None,
                             "input_heads_per_slide": count["HEAD input"] / len(files),
                             "input_gets_per_slide": count["GET input"] / len(files),
                             "requests": sum(count.values()), "median_input_s": spans["median_input_s"],
                             "median_start_interval_s": spans["median_start_interval_s"], "inputs": spans})
                print(f"{name} round {rnd}: { {k: v for k, v in runs[-1].items() if k != 'inputs'} }", flush=True)
        proxy.stop()

    def med(name, key):
        vals = [r[key] for r in runs if r["checkout"] == name and r[key] is not None]
        return statistics.median(vals) if vals else None

    when = datetime.datetime.now(datetime.timezone.utc)
    if args.tiling:
        return _tiling_report(args, files, checkouts, codes, runs, when)
    lines = [f"`cancernet run` with {len(files)} SVS slides ({args.size} px at {args.mpp} µm/px) on {args.server} behind "
             f"{args.latency_ms:g} ms a request, {args.workers} workers, {args.repeat} rounds alternating; "
             f"{when:%Y-%m-%d %H:%M} UTC; load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
             "", "| checkout (code) | wall s, median (all) | first report s, median | input HEADs / slide | input GETs / slide "
             "| an input, first request to its report, s (median) | between inputs' first requests, s (median) |"
             + (" re-run of the finished run, wall s (median) | its requests (median) |" if args.rerun else ""),
             "|---|---|---|---:|---:|---:|---:|" + ("---:|---:|" if args.rerun else "")]
    for name, _ in checkouts:
        c = codes[name]
        walls = ", ".join(f"{r['wall_s']:.2f}" for r in runs if r["checkout"] == name)
        lines.append(f"| {name} ({c.get('commit', c.get('folder'))}) | {med(name, 'wall_s'):.2f} ({walls}) | "
                     f"{med(name, 'first_report_s'):.2f} | {med(name, 'input_heads_per_slide'):g} | "
                     f"{med(name, 'input_gets_per_slide'):g} | {med(name, 'median_input_s'):.2f} | "
                     f"{med(name, 'median_start_interval_s'):.2f} |"
                     + (f" {med(name, 'rerun_s'):.2f} | {med(name, 'rerun_requests'):g} |" if args.rerun else ""))
    _save(args, "\n".join(lines), {"codes": codes, "runs": runs}, when)
    return 0


def _save(args, text: str, record: dict, when) -> None:
    print(text)
    if args.out:
        from cancernet_batch.machine import machine

        stem = write_results(args.out, f"s3-latency-{'tiling-' if args.tiling else ''}{when:%Y%m%d-%H%M%S}", text,
                             {"date": when.isoformat(), "machine": machine(), "args": vars(args), **record})
        print(f"wrote {stem}.json, .md")


def _tiling_report(args, files, checkouts, codes, runs, when) -> int:
    lines = [f"Tiling per slide (open, plan, tiles at {args.target:g} µm/px, --decode fast; best of {args.tile_repeat}, "
             f"median over {args.repeat} rounds alternating) from {args.server} behind {args.latency_ms:g} ms a request vs "
             f"the local file; {len(files)} SVS of {args.size} px at {args.mpp} µm/px; {when:%Y-%m-%d %H:%M} UTC; "
             f"load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())}", "",
             "| checkout (code) | slide | tiles | local tiles/s | s3 tiles/s | s3/local, median (all rounds) |",
             "|---|---|---:|---:|---:|---|"]
    for name, _ in checkouts:
        c = codes[name]
        for f in files:
            rs = [r for r in runs if r["checkout"] == name and r["slide"] == f.name]
            n = rs[0]["tiles"]
            lines.append(f"| {name} ({c.get('commit', c.get('folder'))}) | {f.name} | {n} | "
                         f"{n / statistics.median(r['local_s'] for r in rs):.0f} | {n / statistics.median(r['s3_s'] for r in rs):.0f} | "
                         f"{statistics.median(r['ratio'] for r in rs):.3f} ({', '.join(str(r['ratio']) for r in rs)}) |")
    _save(args, "\n".join(lines), {"codes": codes, "runs": runs}, when)
    return 0


if __name__ == "__main__":
    sys.exit(main())
