"""The whole pipeline: `cancernet demo --quick` end to end, and `cancernet run` resumed after SIGKILL."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cancernet_batch import store
from cancernet_batch.runfolder import Run

ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
pytestmark = pytest.mark.slow


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cancernet_batch.cli", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo")
    p = _cli("demo", "--quick", "--out", str(out), "--workers", "1")
    stdout, stderr = p.communicate(timeout=900)
    assert p.returncode == 0, stderr[-3000:]
    return out, stdout


def test_demo_outputs(demo):
    out, stdout = demo
    model = out / "model"
    for name in ("model.keras", "model.json", "model.onnx", "curves.png", "confusion.png", "metrics.json"):
        assert (model / name).is_file(), name
    report = out / "run" / "report"
    rows = list(csv.DictReader(open(report / "inputs.csv")))
    assert len(rows) == 4  # two synthetic slides, one real-tissue slide (9175 rebuilt) and the held-out folder
    assert all(r["status"] == "reported" for r in rows)
    assert all(int(r["tissue_tiles"]) > 0 for r in rows)
    patients = list(csv.DictReader(open(report / "patients.csv")))
    assert {p["patient"] for p in patients} >= {"90900"}  # the held-out patient, not one of the training ids
    html = (report / "index.html").read_text()
    for src in re.findall(r'<img[^>]+src="([^"]+)"', html):
        assert (report / src).is_file(), src
    geo = sorted(p.name for p in (report / "geojson").glob("*.geojson"))
    assert len(geo) == 8 and sum(n.endswith(".regions.geojson") for n in geo) == 4  # tiles and regions per input
    # the demo reports map accuracy against the synthetic truth; the quick demo's maps are coarse
    # (12 x 12 tiles, 4 epochs), so only a floor is checked here: the full demo's figure is in the README
    dice = [float(v) for v in re.findall(r"map accuracy \S+: Dice ([0-9.]+)", stdout)]
    assert len(dice) == 2 and max(dice) >= 0.4, stdout
    assert "balanced accuracy" in stdout and "index.html" in stdout
    # the real-tissue slide: the slide path keeps the patient's patches (model-free tissue Dice)
    [real] = re.findall(r"real tissue real-9175.svs: tissue Dice ([0-9.]+)", stdout)
    assert float(real) >= 0.95, stdout


def _done_chunks(run: Path) -> int:
    try:
        root = Run.of(run).open_store("r")
        return sum(int(store.done_mask(g).sum()) for _, g in store.iter_inputs(root, complete_only=False))
    except Exception:  # noqa: BLE001 - the store may be mid-creation
        return 0


def _outputs(run: Path) -> dict[str, str]:
    rep = run / "report"
    return {name: (rep / name).read_text() for name in ("inputs.csv", "patients.csv")}


def test_run_killed_then_resumed_equals_uninterrupted(demo, tmp_path):
    out, _ = demo
    model, slides, holdout = out / "model", out / "slides", out / "holdout"
    base = ["--model", str(model), "--workers", "1", "--chunk-size", "16"]
    ref_run = tmp_path / "ref"
    p = _cli("run", str(slides), str(holdout), "--out", str(ref_run), *base)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    reference = _outputs(ref_run)

    run = tmp_path / "killed"
    # batch size 1: slow enough scoring to be killed between chunks
    p = _cli("run", str(slides), str(holdout), "--out", str(run), *base, "--batch-size", "1", start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and _done_chunks(run) < 2 and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, "run finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    # the stream's report is valid at every moment: it lists only inputs that were finished
    if (run / "report" / "inputs.csv").exists():
        rows = list(csv.DictReader(open(run / "report" / "inputs.csv")))
        assert all(r["status"] == "reported" for r in rows) and len(rows) < 3, rows
    p = _cli("run", str(slides), str(holdout), "--out", str(run), *base)
    stdout, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert "chunks already done" in stdout and " 0 chunks already done" not in stdout
    assert _outputs(run) == {k: v.replace(str(ref_run), str(run)) for k, v in reference.items()}
    pj = json.loads((run / "predict.json").read_text())
    assert pj["model_id"] == json.loads((model / "model.json").read_text())["model_id"]


def test_run_rerun_does_no_work(demo, tmp_path):
    out, _ = demo
    run = tmp_path / "again"
    args = ["run", str(out / "holdout"), "--out", str(run), "--model", str(out / "model"), "--workers", "1"]
    p = _cli(*args)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    p = _cli(*args)
    stdout, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert "0 tiled (0 tiles), 1 already complete" in stdout and "predict: 0 patches scored" in stdout
