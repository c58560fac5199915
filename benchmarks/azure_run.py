"""Benchmark: a whole `cancernet run` with inputs and run folder on Azure Blob Storage (Azurite on 127.0.0.1), its
requests through obstore (the default) and through adlfs alone (``CANCERNET_S3_NATIVE=0``), against the same run
on local disk.

    python benchmarks/azure_run.py [--count 2] [--size 16384] [--mpp 0.5] [--patients 9175 9259 8957 9022]
                                   [--rounds 3] [--workers 2] [--work DIR] [--out DIR]

Writes ``--count`` synthetic Aperio SVS slides (``cancernet_batch.synth``; kept in ``--work``) and a width-32
CancerNet with random weights (ONNX), takes the real IDC patients ``--patients`` from ``../shared/data/idc``,
uploads them all to a container of Azurite (``tests/azurite.py``: Microsoft's Blob service emulator, Node.js, in its
own process), then runs the ``cancernet run`` command (its own local cluster, ``--workers`` processes) in turn:
local inputs into a local folder, Azure into Azure through obstore, Azure into Azure through adlfs alone; ``--rounds``
rounds, each run into a new run folder. Per run: wall seconds and Azurite's CPU seconds over the run (from /proc: the
server shares the machine's cores with the run). Prints medians and ratios to the local run as a markdown table;
``--out`` gets ``azure-run-DATE.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))
from results_files import write_results  # noqa: E402 - a sibling script

CONTAINER = "bench-azure"


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (from /proc; 0 where it cannot be read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _inputs(work: Path, count: int, size: int, mpp: float, patients: list[str]) -> tuple[list[Path], Path]:
    from cancernet_batch.bench import _random_model
    from cancernet_batch.synth import synth_slides

    slides = work / f"slides-{count}x{size}-{mpp}"
    if len(list(slides.glob("*.svs"))) < count:
        synth_slides(str(slides), count=count, size=size, mpp=mpp, seed=7)
    model = work / "model"
    if not (model / "model.json").exists():
        _random_model(model)
    idc = HERE.parent.parent / "shared" / "data" / "idc"
    return sorted(slides.glob("*.svs"))[:count] + [idc / p for p in patients], model


def _run(args: list[str], env: dict, azurite_pid: int) -> dict:
    server0, t0 = _proc_cpu(azurite_pid), time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cancernet_batch.cli", "run", *args], env=env, capture_output=True,
                          text=True, cwd="/tmp")
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"cancernet run failed ({done.returncode}): {done.stderr[-2000:]}")
    scored = next((line for line in done.stdout.splitlines() if line.startswith("predict:")), "")
    return {"wall_s": round(wall, 3), "azurite_cpu_s": round(_proc_cpu(azurite_pid) - server0, 3),
            "patches": int(scored.split()[1] or 0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=2)
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--patients", nargs="*", default=["9175", "9259", "8957", "9022"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "azure-run"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from azurite import Azurite

    inputs, model = _inputs(Path(args.work), args.count, args.size, args.mpp, args.patients)
    server = Azurite().start()
    results: dict[str, list[dict]] = {"local": [], "azure, obstore": [], "azure, adlfs alone": []}
    try:
        fs = server.fs()
        fs.mkdir(CONTAINER)
        for p in inputs:
            if p.is_dir():
                for f in sorted(p.rglob("*.png")):
                    fs.put_file(str(f), f"{CONTAINER}/in/{p.name}/{f.relative_to(p).as_posix()}")
            else:
                fs.put_file(str(p), f"{CONTAINER}/in/{p.name}")
        opts = json.dumps(server.options())
        common = ["--model", str(model), "--workers", str(args.workers)]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        for r in range(args.rounds + 1):  # round 0 warms the page cache and the imports: not counted
            local = Path(args.work) / f"local-{r}"
            subprocess.run(["rm", "-rf", str(local)], check=True)
            runs = {"local": ([*map(str, inputs), "--out", str(local), *common], env),
                    "azure, obstore": ([f"az://{CONTAINER}/in/", "--out", f"az://{CONTAINER}/runs/n{r}", *common,
                                        "--storage-options", opts], env),
                    "azure, adlfs alone": ([f"az://{CONTAINER}/in/", "--out", f"az://{CONTAINER}/runs/a{r}", *common,
                                            "--storage-options", opts], {**env, "CANCERNET_S3_NATIVE": "0"})}
            for name, (a, e) in runs.items():
                got = _run(a, e, server.proc.pid)
                if r:
                    results[name].append(got)
                print(f"round {r} {name}: {got}", flush=True)
    finally:
        server.stop()

    now = datetime.datetime.now(datetime.timezone.utc)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("wall_s", "azurite_cpu_s", "patches")}
           for k, v in results.items()}
    lines = [f"`cancernet run`, {args.count} synthetic SVS of {args.size} px at {args.mpp} µm/px and patients "
             f"{', '.join(args.patients)}, {args.workers} workers; Azurite on 127.0.0.1; medians of {args.rounds} "
             f"rounds alternating; {now:%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, load average at the end {load}", "",
             "| run | patches | wall s | patches/s | / local | Azurite CPU s | each wall s |",
             "|---|---:|---:|---:|---:|---:|---|"]
    rate_local = med["local"]["patches"] / med["local"]["wall_s"]
    for name, m in med.items():
        rate = m["patches"] / m["wall_s"]
        lines.append(f"| {name} | {m['patches']:.0f} | {m['wall_s']:.2f} | {rate:.0f} | {rate / rate_local:.2f} | "
                     f"{m['azurite_cpu_s']:.2f} | "
                     f"{', '.join(str(x['wall_s']) for x in results[name])} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_results(args.out, f"azure-run-{now:%Y%m%d-%H%M}", text, {"date": now.isoformat(), "args": vars(args),
                      "runs": results, "host": platform.node(), "load": os.getloadavg()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
