"""Preflight: slides are opened in a child process; crashes and hangs become clean failures."""

from __future__ import annotations

import os
import stat
import time

import pytest

from cancernet_batch.errors import CancerNetError, InputError, SlideReadError, UnsupportedFormatError
from cancernet_batch.preflight import preflight
from cancernet_batch.slides import open_slide


def test_good_slide_metadata(slides_dir):
    info = preflight(slides_dir / "cmu-1-small-region.svs")
    assert info.reader == "openslide" and info.vendor == "aperio"
    assert info.level_dimensions == ((2220, 2967),) and info.mpp == pytest.approx(0.499)
    info = preflight(slides_dir / "kidney-48-5.tif")
    assert info.reader == "tifffile" and info.mpp is None


@pytest.mark.parametrize("name", ["broken.svs", "unopenable.tiff", "unreadable.svs"])
def test_child_reports_the_readers_own_error(slides_dir, name):
    """The parent raises the error class and one-line message the reader raises in-process."""
    with pytest.raises(CancerNetError) as direct:
        with open_slide(slides_dir / name) as r:
            r.read_region(0, 0, 0, 16, 16)
    with pytest.raises(type(direct.value)) as child:
        preflight(slides_dir / name)
    assert str(child.value) == str(direct.value) and name in str(child.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        preflight(tmp_path / "gone.svs")


def _fake_python(tmp_path, body: str) -> str:
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_reader_crash_is_a_failure_not_a_crash(tmp_path, slides_dir):
    python = _fake_python(tmp_path, "echo 'libfoo: corrupt tile' >&2; kill -SEGV $$")
    with pytest.raises(SlideReadError, match=r"crashed \(signal SIGSEGV\).*corrupt tile") as ei:
        preflight(slides_dir / "cmu-1-small-region.svs", python=python)
    assert "cmu-1-small-region.svs" in str(ei.value)


def test_reader_hang_times_out(tmp_path, slides_dir):
    python = _fake_python(tmp_path, "exec sleep 30")
    t = time.perf_counter()
    with pytest.raises(SlideReadError, match="hung: no answer within 1 s"):
        preflight(slides_dir / "cmu-1-small-region.svs", python=python, timeout=1)
    assert time.perf_counter() - t < 10


def test_child_leaves_no_temporary_files(slides_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    preflight(slides_dir / "small.svs")
    with pytest.raises(UnsupportedFormatError):
        preflight(slides_dir / "broken.svs")
    assert os.listdir(tmp_path) == []


def _server_pid():
    from cancernet_batch import preflight as pf

    server = getattr(pf._LOCAL, "server", None)
    return None if server is None else server.proc.pid


def test_one_serving_child_per_thread_is_reused_and_replaced(slides_dir, monkeypatch):
    import threading

    from cancernet_batch import preflight as pf

    good = slides_dir / "cmu-1-small-region.svs"
    preflight(good)
    first = _server_pid()
    assert first is not None
    with pytest.raises(UnsupportedFormatError):
        preflight(slides_dir / "broken.svs")  # a refusal is an answer: the child lives on
    assert preflight(slides_dir / "kidney-48-5.tif").reader and _server_pid() == first
    other = []
    t = threading.Thread(target=lambda: (preflight(good), other.append(_server_pid())))
    t.start()
    t.join()
    assert other and other[0] not in (None, first)  # each thread its own child
    monkeypatch.setattr(pf, "SERVE_REQUESTS", pf._LOCAL.server.served)
    preflight(good)  # the old child has served its quota: a new one
    assert _server_pid() not in (None, first)


def test_a_serving_child_started_before_the_environment_changed_is_not_reused(slides_dir, monkeypatch):
    """Objects are read with the credentials and endpoint of the child's environment: after AWS_* (or any
    variable) changes, the next preflight starts a child that has the new one."""
    good = slides_dir / "cmu-1-small-region.svs"
    preflight(good)
    first = _server_pid()
    preflight(good)
    assert _server_pid() == first  # unchanged environment: the same child
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    preflight(good)
    assert _server_pid() not in (None, first)


def test_a_dead_serving_child_costs_nothing_but_a_retry(slides_dir):
    import signal as sig

    good = slides_dir / "cmu-1-small-region.svs"
    preflight(good)
    os.kill(_server_pid(), sig.SIGKILL)  # as if an earlier file had broken it
    time.sleep(0.2)
    info = preflight(good)  # checked again alone, in a fresh child: no false failure
    assert info.mpp is not None
    preflight(good)
    assert _server_pid() is not None  # and the next slide has a serving child again


def test_a_worker_starts_its_serving_child_before_the_first_slide(slides_dir):
    """``dask_setup`` (the local workers' preload) starts a child that the first preflight of a thread then
    uses; a worker that only scores starts none."""
    import threading
    from types import SimpleNamespace

    from cancernet_batch import preflight as pf

    def worker(resources):
        return SimpleNamespace(state=SimpleNamespace(total_resources=resources))

    for spare in pf._SPARE:
        spare.close()
    pf._SPARE.clear()
    pf.dask_setup(worker({"score": 1}))
    assert pf._SPARE == []
    pf.dask_setup(worker({"tile": 1}))
    assert len(pf._SPARE) == 1
    started = pf._SPARE[0].proc.pid
    used = {}

    def first_slide():  # a fresh thread: no serving child of its own yet
        info = preflight(slides_dir / "cmu-1-small-region.svs", timeout=60)
        used["pid"], used["levels"] = pf._LOCAL.server.proc.pid, info.level_count
        pf._LOCAL.server.close()

    t = threading.Thread(target=first_slide)
    t.start()
    t.join()
    assert used == {"pid": started, "levels": 1} and pf._SPARE == []


_FORKED_CHILD_CHECK = """
import json, os, signal, sys
from cancernet_batch import preflight as pf
from cancernet_batch.cluster import TILE, ClusterConfig, dask_client


def serving_children():  # on a worker: its spare serving child (kind, pid) and its own child processes
    import psutil
    return {"spare": [(type(s.proc).__name__, s.proc.pid) for s in pf._SPARE],
            "children": sorted(p.pid for p in psutil.Process().children())}


def preflight_here(path):  # on a worker: a preflight, the child that answered it killed, two more preflights
    first = pf.preflight(path, timeout=60)
    server = pf._LOCAL.server
    kind, pid = type(server.proc).__name__, server.proc.pid
    os.kill(pid, signal.SIGKILL)  # as a reader's crash would: the slide is checked again alone, no false failure
    second = pf.preflight(path, timeout=60)  # alone, in a fresh child
    reaped = server.proc.poll() is not None
    third = pf.preflight(path, timeout=60)  # the thread's next serving child: started as before
    return {"kind": kind, "pid": pid, "levels": [first.level_count, second.level_count, third.level_count],
            "reaped": reaped, "next": type(pf._LOCAL.server.proc).__name__}


def plain(q):  # a process the forkserver forks that is not a Dask worker
    import psutil
    q.put({"preforked": bool(pf._PREFORKED), "children": len(psutil.Process().children())})


if __name__ == "__main__" and sys.argv[2:] == ["two"]:  # a worker of 2 threads, this interpreter's first cluster
    with dask_client(ClusterConfig(workers=1, threads_per_worker=2, dashboard=False)) as client:
        print(json.dumps(client.run(serving_children)))
elif __name__ == "__main__":
    import multiprocessing

    with dask_client(ClusterConfig(workers=2, score_workers=1, dashboard=False)) as client:
        records = client.scheduler_info()["workers"]
        kinds = {a: "tile" if TILE in (w.get("resources") or {}) else "score" for a, w in records.items()}
        found = client.run(serving_children)
        tiler = next(a for a, k in kinds.items() if k == "tile")
        used = client.submit(preflight_here, sys.argv[1], workers=[tiler], pure=False).result(timeout=120)
    ctx = multiprocessing.get_context("forkserver")  # the same forkserver, that the cluster started
    q = ctx.Queue()
    proc = ctx.Process(target=plain, args=(q,))
    proc.start()
    other = q.get(timeout=120)
    proc.join()
    print(json.dumps({"kinds": kinds, "found": found, "tiler": tiler, "used": used, "other": other}))
"""


def test_a_local_worker_forks_its_serving_child_ready_as_it_starts(slides_dir, tmp_path):
    """Each local tiling worker is forked with a serving child of its own, forked from it before it ran anything
    else (``cancernet_batch.prefork`` in the forkserver's preload): no interpreter to start and import for the
    first slide. The worker's first preflight uses it; it dies like any other child (the slide is then checked
    alone, the next child started); a worker that only scores keeps none, nor does a process of the same
    forkserver that is not a Dask worker (a process pool's, from Python 3.14). In a fresh interpreter: a process
    whose forkserver was started for other settings spawns its workers instead (``cluster.start_forkserver``)."""
    import json
    import subprocess
    import sys

    script = tmp_path / "forked_child_check.py"
    script.write_text(_FORKED_CHILD_CHECK)
    r = subprocess.run([sys.executable, str(script), str(slides_dir / "cmu-1-small-region.svs")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    found, tiler = out["found"], out["tiler"]
    for addr, kind in out["kinds"].items():
        if kind == "score":
            assert found[addr] == {"spare": [], "children": []}
        else:
            [(proc_kind, pid)] = found[addr]["spare"]
            assert proc_kind == "_Forked" and found[addr]["children"] == [pid]  # the worker's own child
    assert out["used"] == {"kind": "_Forked", "pid": found[tiler]["spare"][0][1], "levels": [1, 1, 1],
                           "reaped": True, "next": "Popen"}
    assert out["other"] == {"preforked": False, "children": 0}
    # a worker of 2 threads (as a run on object storage starts them) forks 2: its second thread's first slide does
    # not wait for an interpreter's imports
    r = subprocess.run([sys.executable, str(script), str(slides_dir / "cmu-1-small-region.svs"), "two"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    [two] = json.loads(r.stdout.strip().splitlines()[-1]).values()
    assert [k for k, _ in two["spare"]] == ["_Forked", "_Forked"] and sorted(p for _, p in two["spare"]) == two["children"]


def test_the_child_imports_this_package_even_from_a_folder_holding_another_copy(slides_dir, tmp_path, monkeypatch):
    """``python -m`` puts the working folder first on the child's import path: a folder with another copy of the
    package in it (a clone of another version) must not take the child over. Both children (the serving one and
    the one a slide gets alone) import the parent's package."""
    import sys

    from cancernet_batch import preflight as pf

    fake = tmp_path / "cancernet_batch"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('the copy in the working folder was imported')\n")
    monkeypatch.chdir(tmp_path)
    info = pf._preflight_alone(str(slides_dir / "cmu-1-small-region.svs"), 60.0, None)
    assert info.vendor == "aperio"
    server = pf._Server(sys.executable)
    try:
        answer = server.ask(str(slides_dir / "cmu-1-small-region.svs"), 60.0)
    finally:
        server.close()
    assert answer is not None and answer["ok"], answer
