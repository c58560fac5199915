"""One run over 1,000 small inputs (patient folders and small slides mixed): it completes, every input is
accounted for in the CSVs, and the client + scheduler process stays within bounded memory."""

from __future__ import annotations

import csv
import os
import resource
import shutil
import subprocess
import sys

import pytest

ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
pytestmark = pytest.mark.slow

N_FOLDERS, N_SLIDES = 900, 100


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
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=1200)
    assert r.returncode in (0, 3), r.stderr[-2000:]
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
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
