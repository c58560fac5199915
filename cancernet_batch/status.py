"""``cancernet status RUN``: how far a run is, read from the run folder alone.

The streaming run rewrites ``RUN/progress.json`` every few seconds; whether the run is still going
is told by the run folder's lock (held by the running process, released by the kernel when it
dies). Nothing here needs the cluster, the model or the inputs.
"""

from __future__ import annotations

import os
import time

from .errors import StorageError
from .runfolder import Run


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "?"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def run_status(run_dir: "str | os.PathLike | Run") -> dict:
    """The run's progress record plus ``running`` (a live process holds the run) and ``lines`` to print."""
    run = Run.of(run_dir)
    if not run.is_folder():
        raise StorageError("no such run folder", path=run.root, hint="give the --out folder of `cancernet run`")
    rec = run.progress() or {}
    holder = run.holder()
    stale = bool(holder and holder.get("stale"))  # object storage: a lock whose holder stopped renewing it
    running = holder is not None and not stale
    failed_inputs = len({f.input for f in run.failures()})
    lines = [f"run:       {run.root}"]
    if not rec:
        lines.append("progress:  none recorded (the run has not started streaming, or was made by tile/predict/report)")
    inputs = rec.get("inputs", {})
    patches = rec.get("patches", {})
    state = rec.get("state", "unknown")
    if running:
        state = f"running (`cancernet {holder.get('command', '?')}`, pid {holder.get('pid', '?')} on {holder.get('host', '?')})"
    elif stale:
        state = (f"stopped: `cancernet {holder.get('command', '?')}` (pid {holder.get('pid', '?')} on "
                 f"{holder.get('host', '?')}) stopped renewing its lock; if it is gone, delete {run.lock_path} "
                 "and re-run the same command to continue")
    elif state == "running":
        state = "stopped: the process is gone (killed or cut short); re-run the same command to continue"
    elif state == "stopped at the deadline":
        state += "; re-run the same command to continue"
    lines.append(f"state:     {state}")
    if rec:
        lines.append(f"inputs:    {inputs.get('done', 0)} done, {inputs.get('failed', 0)} failed, "
                     f"{inputs.get('remaining', 0)} remaining of {inputs.get('total', 0)}")
        lines.append(f"patches:   {patches.get('scored', 0)} scored, {patches.get('tiled', 0)} tiled; "
                     f"{rec.get('patches_per_second', 0):.0f} patches/s")
        age = time.time() - rec.get("updated", time.time())
        lines.append(f"updated:   {_when(rec.get('updated'))} ({_duration(age)} ago); started {_when(rec.get('started'))}")
        if running and rec.get("eta"):
            lines.append(f"finish:    about {_when(rec['eta'])} (in {_duration(rec['eta'] - time.time())})")
    lines.append(f"failures:  {failed_inputs} inputs in {run.failures_csv}")
    return {**rec, "running": running, "holder": holder, "failed_inputs": failed_inputs,
            "lines": lines}
