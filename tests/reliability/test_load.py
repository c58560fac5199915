"""One run over 1,000 small inputs (patient folders and small slides mixed): it completes, every input is
accounted for in the CSVs, and the client + scheduler process stays within bounded memory."""

from __future__ import annotations

import csv
import os
import threading
import shutil
import subprocess
import sys

import pytest

ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
pytestmark = pytest.mark.slow

N_FOLDERS, N_SLIDES = 900, 100


def _run_with_peak(cmd: list[str], stderr_path, *, timeout: float) -> tuple[int, float, str]:
    """Run ``cmd``; its exit code, the peak RSS in MiB of it and the processes it waited for (its workers), and its
    stderr. From ``wait4`` on this one child: ``getrusage(RUSAGE_CHILDREN)`` would also carry the peak of any earlier
    child of this test process (a TensorFlow import in another test under pytest-xdist: 2 GiB)."""
    with open(stderr_path, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)
        finally:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return p.returncode, usage.ru_maxrss / 1024, stderr_path.read_text()


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
    rc, peak_mb, stderr = _run_with_peak(cmd, tmp_path / "stderr.txt", timeout=1200)
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
    assert peak_mb < 1500, peak_mb
