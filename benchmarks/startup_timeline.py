"""Benchmark (issue 17): where the time from a command's start to its first tile written goes, step by step.

    python benchmarks/startup_timeline.py [--package DIR] [--all] -- tile SLIDE... --out RUN --workers 2

Runs ``cancernet ARGS`` (``python -m cancernet_batch.cli``; with ``--package`` from that checkout) with a
``sitecustomize`` on its ``PYTHONPATH`` that every Python process of the command loads (the client, the
workers' forkserver and the workers forked from it, the preflight children). Each process appends
wall-clock events to one file: its start, a fork, the end of the imports that matter (with their own
duration), and the calls of the steps (forkserver start, discovery, the cluster, the loop, the preflight,
prepare and chunk tasks). The first tile written is the first chunk flag on disk under ``--out``, polled
every 10 ms, as in ``tiling_speed.py``. Prints the events relative to the command's start (``--all``: every
event, else the steps up to the first tile written) and a one-line summary. Instruments nothing in the
package itself: the wrappers live in the ``sitecustomize`` only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from installed import as_installed
from tiling_speed import first_chunk_flagged

SITE = r'''
import os, sys, time
_F = os.environ.get("CANCERNET_STARTUP_TRACE")
if _F:
    def _log(ev):
        with open(_F, "a") as fh:
            ev = " ".join(str(ev).split())  # one line an event (a ``python -c`` child's code holds newlines)
            fh.write(f"{time.time():.4f} {os.getpid()} {os.getppid()} {ev}\n")

    _log("start " + " ".join(getattr(sys, "orig_argv", sys.argv))[:160])
    os.register_at_fork(after_in_child=lambda: _log("fork"))
    import functools, importlib.abc, importlib.util
    IMPORTS = {"numpy", "scipy.ndimage", "zarr", "distributed", "dask", "openslide", "tifffile", "PIL.Image",
               "tensorflow", "keras", "matplotlib", "onnxruntime", "importlib.metadata"}
    STEPS = {"cancernet_batch.cluster": ["start_forkserver", "work_split"],
             "cancernet_batch.stages.tile": ["preflight_task", "prepare_slide_task", "tile_chunk_task", "_write_chunk"],
             "cancernet_batch.preflight": ["dask_setup"]}
    METHODS = {"cancernet_batch.stages.flow": ("Flow", ["discover", "execute", "_loop"]),
               "distributed.deploy.local": ("LocalCluster", ["__init__"])}

    def _wrap(owner, name, label):
        f = getattr(owner, name, None)
        if f is None:
            return
        @functools.wraps(f)
        def w(*a, **k):
            _log(f"call {label}")
            try:
                return f(*a, **k)
            finally:
                _log(f"done {label}")
        setattr(owner, name, w)

    class _Finder(importlib.abc.MetaPathFinder):
        busy = set()
        def find_spec(self, name, path=None, target=None):
            if name in self.busy or not (name in IMPORTS or name in STEPS or name in METHODS):
                return None
            self.busy.add(name)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                self.busy.discard(name)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return None
            orig = spec.loader.exec_module
            def exec_module(module, _orig=orig, _name=name):
                t = time.time()
                _orig(module)
                if _name in IMPORTS:
                    _log(f"import {_name} {time.time() - t:.3f}s")
                for fn in STEPS.get(_name, []):
                    _wrap(module, fn, fn)
                if _name in METHODS:
                    cls, names = METHODS[_name]
                    for m in names:
                        _wrap(getattr(module, cls), m, f"{cls}.{m}")
            spec.loader.exec_module = exec_module
            return spec
    sys.meta_path.insert(0, _Finder())
'''

STEP_WORDS = ("start ", "fork", "call ", "done ")


def timeline(args: list[str], package: str | None = None) -> tuple[list[tuple[float, str, str]], float | None, float]:
    """Run ``cancernet ARGS``; its events as ``(seconds from start, process, event)``, first tile s, wall s."""
    out = Path(args[args.index("--out") + 1])
    with tempfile.TemporaryDirectory(prefix="startup-trace-") as d:
        (Path(d) / "sitecustomize.py").write_text(SITE)
        trace = Path(d) / "events.txt"
        env = {**os.environ, "CANCERNET_STARTUP_TRACE": str(trace),
               "PYTHONPATH": os.pathsep.join(filter(None, [d, package, os.environ.get("PYTHONPATH")]))}
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "cancernet_batch.cli", *args], env=env, cwd=package,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        first = None
        while proc.poll() is None:
            if first is None and first_chunk_flagged(out):
                first = time.time() - t0
            time.sleep(0.01)
        wall = time.time() - t0
        if proc.returncode not in (0, 3):
            raise RuntimeError(f"cancernet {args[0]} failed: {proc.stderr.read().decode()[-2000:]}")
        names: dict[str, str] = {}
        kinds: dict[str, str] = {}
        events = []
        # a process forked (not started) is named by its parent: forked from the client, the workers' fork server
        # (cluster._fork_server_from_here); from the fork server, a worker; from a worker, its preflight child
        forked = {"client": "forkserver", "forkserver": "worker", "worker": "preflight"}
        for line in trace.read_text().splitlines():
            t, pid, ppid, ev = line.split(" ", 3)
            if pid not in names:
                kind = ("client" if not names else "forkserver" if "forkserver" in ev else
                        "preflight" if "preflight" in ev else
                        forked.get(kinds.get(ppid, ""), "process") if ev == "fork" else "process")
                kinds[pid] = kind
                names[pid] = f"{kind}:{pid}"
            events.append((float(t) - t0, names[pid], ev))
    return sorted(events), first, wall


def _at(events, who: str, what: str) -> float | None:
    return next((t for t, p, e in events if p.startswith(who) and e.startswith(what)), None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--package", default=None, help="a checkout to run the command from (e.g. a baseline)")
    ap.add_argument("--all", action="store_true", help="every event, imports included")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="-- then the cancernet command line")
    a = ap.parse_args(argv)
    as_installed(a.package)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    events, first, wall = timeline(args, a.package)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.1f}")
    until = (first or wall) + 0.05
    for t, p, e in events:
        if a.all or (e.startswith(STEP_WORDS) and t <= until):
            print(f"{t:7.3f} s  {p:18s} {e[:110]}")
    steps = {"forkserver started": _at(events, "forkserver", ""),  # started, or forked from the client
             "first worker forked": _at(events, "worker", "fork"),
             "loop": _at(events, "client", "call Flow._loop"),
             "first prepare": _at(events, "worker", "call prepare_slide_task"),
             "first chunk": _at(events, "worker", "call _write_chunk")}
    print("summary: " + ", ".join(f"{k} {v:.2f} s" for k, v in steps.items() if v is not None)
          + f", first tile written {first or float('nan'):.2f} s, wall {wall:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
