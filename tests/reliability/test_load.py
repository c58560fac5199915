"""One run over 1,000 small inputs (patient folders and small slides mixed): it completes, every input is
accounted for in the CSVs, and the client + scheduler process stays within bounded memory."""

from __future__ import annotations

import csv
import os
import signal
import shutil
import subprocess
import sys

import pytest

ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
pytestmark = pytest.mark.slow

N_FOLDERS, N_SLIDES = 900, 100


_PEAK = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, status, usage = os.wait4(p.pid, 0); "
         "open(sys.argv[1], 'w').write(str(usage.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(status))")


def _run_with_peak(cmd: list[str], tmp_path, *, timeout: float) -> tuple[int, float, str]:
    """Run ``cmd``; its exit code, the peak RSS in MiB of it and the processes it waited for (its workers), and its
    stderr. A small Python process starts it and reads its ``wait4``: a process's peak RSS counts from its fork, so a
    command forked from this test process (grown by TensorFlow and others under pytest-xdist: 2 GiB) would carry
    this process's size, and ``getrusage(RUSAGE_CHILDREN)`` the peak of any earlier child as well."""
    peak_file, err_file = tmp_path / "peak-kib.txt", tmp_path / "stderr.txt"
    with open(err_file, "w") as err:
        p = subprocess.Popen([sys.executable, "-c", _PEAK, str(peak_file), *cmd], stdout=subprocess.DEVNULL,
                             stderr=err, env=ENV, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise
    return rc, int(peak_file.read_text()) / 1024, err_file.read_text()


def test_thousand_inputs(tmp_path, synth_patch_dir, tiny_model_dir):
    from cancernet_batch.synth import SlideSpec, write_slide

    model = tiny_model_dir

    archive = tmp_path / "archive"
    pid = sorted(p.name for p in synth_patch_dir.iterdir() if p.is_dir())[0]
    pngs = sorted((synth_patch_dir / pid).rglob("*.png"))[:3]
    for i in range(N_FOLDERS):
        for f in pngs:
            dest = archive / "patients" / f"p{i:04d}" / f.parent.name
            dest.mkdir(parents=True, exist_ok=True)
            os.link(f, dest / f.name.replace(pid, f"p{i:04d}", 1))
    slide = tmp_path / "one.svs"
    write_slide(SlideSpec(path=slide, width=1024, height=1024, mpp=1.0, seed=3))
    (archive / "slides").mkdir()
    for i in range(N_SLIDES):
        shutil.copy(slide, archive / "slides" / f"s{i:03d}.svs")  # distinct files, distinct inputs

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "cancernet_batch.cli", "run", str(archive), "--out", str(run), "--model", str(model),
           "--workers", "2"]
    rc, peak_mb, stderr = _run_with_peak(cmd, tmp_path, timeout=1200)
    assert rc in (0, 3), stderr[-2000:]
    rows = list(csv.DictReader(open(run / "report" / "inputs.csv")))
    failures = list(csv.DictReader(open(run / "report" / "failures.csv")))
    sources = {row["source"] for row in rows} | {f["input"] for f in failures}
    assert len(rows) + len({f["input"] for f in failures} - {row["source"] for row in rows}) == N_FOLDERS + N_SLIDES
    assert sum(1 for row in rows if row["status"] == "reported") == N_FOLDERS + N_SLIDES, failures[:3]
    assert len(sources) == N_FOLDERS + N_SLIDES
    patients = list(csv.DictReader(open(run / "report" / "patients.csv")))
    assert len(patients) >= N_FOLDERS
    # the largest single process (the client, which also hosts the scheduler) stays bounded
    assert 50 < peak_mb < 1500, peak_mb  # above 50: the run's processes were measured, not the small one between
