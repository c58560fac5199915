"""Benchmark: `cancernet run` on slides read from an S3 server that answers each request after a delay, as a
real object store does (AWS S3: tens of ms to the first byte), for one or more checkouts, alternating.

    python benchmarks/s3_latency.py [--latency-ms 20] [--count 2] [--size 16384] [--mpp 0.5] [--repeat 3]
                                    [--baseline OLD_CHECKOUT ...] [--workers 2] [--out DIR]

On a server on the same machine a request costs a few ms, so what a run's requests cost one after another
(a TIFF's IFDs read one at a time, a look-up before each open) hardly shows; on a real endpoint each of them
is a round trip of tens of ms in a worker's task. This serves moto's S3 app (``tests/s3server.py``, which
logs every request) behind a layer that sleeps ``--latency-ms`` before answering each request (threaded:
requests in flight together wait together, as on S3).

Writes ``--count`` synthetic Aperio SVS slides (``cancernet_batch.synth``, ``--size`` px a side at ``--mpp``;
kept in ``--work`` for later calls) and a width-32 CancerNet with random weights (ONNX), uploads the slides,
then runs ``cancernet run s3://BUCKET/in/ --out s3://BUCKET/runs/...`` (its own local cluster, ``--workers``
processes) with this checkout and each ``--baseline`` checkout in turn (``PYTHONPATH``; from a folder with no
checkout in it), ``--repeat`` rounds. Per run: the command's wall time, the time to the first reported input,
and the HEAD and GET requests sent for the input objects (per slide). Prints a markdown table; ``--out`` gets
``s3-latency-DATE.json`` and ``.md``.
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


def _slow_server(latency: float):
    from s3server import CountingS3

    class SlowS3(CountingS3):
        def _app(self, app):
            inner = super()._app(app)

            def wrapped(environ, start_response):
                time.sleep(latency)
                return inner(environ, start_response)

            return wrapped

    return SlowS3().start()


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
    ap.add_argument("--count", type=int, default=2)
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--baseline", action="append", default=[], help="another checkout to run (PYTHONPATH)")
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "s3-latency"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from cancernet_batch.machine import machine

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files, model = _inputs(work, args)
    checkouts = [("this", HERE.parent)] + [(f"baseline{i}" if len(args.baseline) > 1 else "baseline", Path(b).resolve())
                                           for i, b in enumerate(args.baseline)]
    codes = {name: _code(path) for name, path in checkouts}
    server = _slow_server(args.latency_ms / 1000)
    runs = []
    try:
        server.create_bucket("latency-bench")
        fs = server.fs()
        for f in files:
            fs.put(str(f), f"latency-bench/in/{f.name}")
        for rnd in range(args.repeat):
            order = checkouts if rnd % 2 == 0 else checkouts[::-1]
            for name, path in order:
                server.reset()
                cmd = [sys.executable, "-m", "cancernet_batch.cli", "run", "s3://latency-bench/in/",
                       "--out", f"s3://latency-bench/runs/{name}-{rnd}", "--model", str(model),
                       "--workers", str(args.workers), "--storage-options", json.dumps(server.options())]
                t0 = time.perf_counter()
                p = subprocess.run(cmd, capture_output=True, text=True, cwd="/",
                                   env={**os.environ, "PYTHONPATH": str(path)})
                wall = time.perf_counter() - t0
                if p.returncode != 0:
                    raise SystemExit(f"{name}: `cancernet run` failed ({p.returncode}): {p.stderr[-600:]}")
                m = re.search(r"first input reported after ([\d.]+) s", p.stdout)
                with server._lock:
                    reqs = [r for r in server.requests if "/latency-bench/in/" in r.path and r.path.endswith(".svs")]
                count = collections.Counter(r.method for r in reqs)
                runs.append({"checkout": name, "round": rnd, "wall_s": round(wall, 3),
                             "first_report_s": float(m.group(1)) if m else None,
                             "input_heads_per_slide": count["HEAD"] / len(files),
                             "input_gets_per_slide": count["GET"] / len(files)})
                print(f"{name} round {rnd}: {runs[-1]}", flush=True)
    finally:
        server.stop()

    def med(name, key):
        vals = [r[key] for r in runs if r["checkout"] == name and r[key] is not None]
        return statistics.median(vals) if vals else None

    when = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"`cancernet run` with {len(files)} SVS slides ({args.size} px at {args.mpp} µm/px) on moto behind "
             f"{args.latency_ms:g} ms a request, {args.workers} workers, {args.repeat} rounds alternating; "
             f"{when:%Y-%m-%d %H:%M} UTC; load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())}",
             "", "| checkout (code) | wall s, median (all) | first report s, median | input HEADs / slide | input GETs / slide |",
             "|---|---|---|---:|---:|"]
    for name, _ in checkouts:
        c = codes[name]
        walls = ", ".join(f"{r['wall_s']:.2f}" for r in runs if r["checkout"] == name)
        lines.append(f"| {name} ({c.get('commit', c.get('folder'))}) | {med(name, 'wall_s'):.2f} ({walls}) | "
                     f"{med(name, 'first_report_s')} | {med(name, 'input_heads_per_slide'):g} | "
                     f"{med(name, 'input_gets_per_slide'):g} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"s3-latency-{when:%Y%m%d-%H%M%S}"
        stem.with_suffix(".json").write_text(json.dumps(
            {"date": when.isoformat(), "machine": machine(), "args": vars(args), "codes": codes, "runs": runs},
            indent=1, default=str))
        stem.with_suffix(".md").write_text(text + "\n")
        print(f"wrote {stem}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
