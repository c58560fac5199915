"""A read-only or full output folder: a clear one-line error, and earlier results left intact."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reportdata import add_input  # noqa: E402 - the report tests' store builder


def scored_run(run: Path) -> Path:
    """Two small scored inputs with known probabilities."""
    add_input(run, run.parent / "a.svs", [(0, 0), (0, 1), (1, 1)], [0.9, 0.2, 0.7], patient="p1")
    add_input(run, run.parent / "b.svs", [(2, 2), (3, 4)], [0.1, 0.95], patient="p2")
    return run

ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}


# `cancernet` on a slow file system: every link(2) takes 0.5 s (an audit hook; the calls themselves are real).
# zarr creates a new array's metadata and, concurrently, its parent groups' ("set if not exists": a
# *.partial file, then os.link; FileExistsError when the parent is there). On a fresh machine those parent
# writes were still in flight when the array's own write had failed for a full disk; the CLI printed its
# error and exited, zarr's exit handler stopped its event loop under them, and asyncio printed each one
# ("Future exception was never retrieved" + traceback): 31 lines of stderr, not 1. Whether asyncio prints
# depends on thread timing; that the writes are still in flight when the command returns does not, so
# the driver reports how many of zarr's tasks are unfinished then.
SLOW_LINKS = """
import asyncio, sys, time
sys.addaudithook(lambda event, args: time.sleep(0.5) if event == "os.link" else None)
from cancernet_batch.cli import main
rc = main()
async def unfinished():
    return sum(not t.done() for t in asyncio.all_tasks() if t is not asyncio.current_task())
from zarr.core import sync
loop = sync.loop[0]
print("unfinished zarr tasks:", asyncio.run_coroutine_threadsafe(unfinished(), loop).result(10) if loop else 0)
sys.exit(rc)
"""


def _report(run: Path, preexec=None, *, slow_links: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(["-c", SLOW_LINKS] if slow_links else ["-m", "cancernet_batch.cli"])]
    return subprocess.run([*cmd, "report", str(run), "--threshold", "0.5"],
                          capture_output=True, text=True, env=ENV, timeout=300, preexec_fn=preexec)


@pytest.fixture
def reported_run(tmp_path) -> tuple[Path, dict[str, bytes]]:
    run = scored_run(tmp_path / "run")
    r = _report(run)
    assert r.returncode == 0, r.stderr
    files = {str(p.relative_to(run)): p.read_bytes() for p in (run / "report").rglob("*") if p.is_file()}
    assert "report/inputs.csv" in files
    return run, files


def _unchanged(run: Path, files: dict[str, bytes]) -> None:
    now = {str(p.relative_to(run)): p.read_bytes() for p in (run / "report").rglob("*") if p.is_file()}
    assert now == files


def test_read_only_output_folder(reported_run):
    run, files = reported_run
    # a real read-only folder even for root: the immutable attribute on the run's folders (ext4)
    folders = [run, *[p for p in run.rglob("*") if p.is_dir()]]
    subprocess.run(["chattr", "+i", *map(str, folders)], check=True)
    try:
        r = _report(run)
    finally:
        subprocess.run(["chattr", "-i", *map(str, folders)], check=True)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "writable" in r.stderr
    _unchanged(run, files)


def test_full_disk(reported_run):
    run, files = reported_run
    (run / "report" / "inputs.csv").unlink()  # so the re-run must write real bytes again

    def tiny_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))

    r = _report(run, tiny_disk, slow_links=True)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "File too large" in r.stderr and "free space" in r.stderr
    assert "unfinished zarr tasks: 0" in r.stdout, r.stdout
    assert not list((run / "tiles.zarr").rglob("*.partial"))
    files.pop("report/inputs.csv")
    now = {str(p.relative_to(run)): p.read_bytes() for p in (run / "report").rglob("*") if p.is_file()}
    # files of the earlier report are either untouched or (for those already rewritten) complete
    assert not [k for k in now if Path(k).name.startswith(".tmp-")]
    for k, v in files.items():
        assert now.get(k) == v, k
