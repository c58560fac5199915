"""SIGKILL of `cancernet run` at seven points spread over tile, predict, report and the streaming phase; each re-run ends with
outputs identical to an uninterrupted run: no missing or duplicate rows, no partial files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cancernet_batch import store
from cancernet_batch.runfolder import Run

ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


def _args(inputs, run: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cancernet_batch.cli", "run", *map(str, inputs), "--out", str(run), "--model", str(model),
            "--workers", "1", "--chunk-size", "8", *extra]


def _flags(run: Path, name: str) -> int:
    try:
        root = Run.of(run).open_store("r")
        total = 0
        for _, g in store.iter_inputs(root, complete_only=False):
            if name in g:
                total += int(np.asarray(g[name][:]).sum())
        return total
    except Exception:  # noqa: BLE001 - mid-creation
        return 0


def _reported_rows(run: Path) -> int:
    p = run / "report" / "inputs.csv"
    try:
        return max(0, len(p.read_text().splitlines()) - 1)
    except OSError:
        return 0


def _progress_done(run: Path) -> int:
    import json

    try:
        return int(json.loads((run / "progress.json").read_text())["inputs"]["done"])
    except (OSError, ValueError, KeyError):
        return 0


KILL_POINTS = {
    "tile-started": lambda run: _flags(run, "tiled") >= 1,
    "predict-starting": lambda run: (run / "predict.json").exists(),
    "predict-middle": lambda run: _flags(run, "done") >= 3,
    "report-started": lambda run: any((run / "report" / "maps").glob("*.png")) if (run / "report" / "maps").exists() else False,
    "report-geojson": lambda run: len(list((run / "report" / "geojson").glob("*.geojson"))) >= 1
    if (run / "report" / "geojson").exists() else False,
    # inside the streaming phase: the report already lists finished inputs while others are still tiled/scored
    "streaming-first-row": lambda run: _reported_rows(run) >= 1,
    "streaming-progress": lambda run: _progress_done(run) >= 2,
}


def _outputs(run: Path) -> dict:
    rep = run / "report"
    out = {name: (rep / name).read_text() for name in ("inputs.csv", "patients.csv", "failures.csv")}
    root = Run.of(run).open_store("r")
    for gid, g in store.iter_inputs(root):
        out[gid] = np.asarray(g["probs"][:]).tobytes()
        out[gid + "/coords"] = np.asarray(g["coords"][:]).tobytes()
        assert store.done_mask(g).all() and store.tiled_mask(g).all()
    out["maps"] = sorted(p.name for p in (rep / "maps").iterdir())
    out["geojson"] = sorted(p.name for p in (rep / "geojson").iterdir())
    return out


def test_kills_at_seven_points_then_resume(model_dir, synth_slide_dir, synth_patch_dir, tmp_path):
    pid = sorted(p.name for p in synth_patch_dir.iterdir() if p.is_dir())[0]
    inputs = [synth_slide_dir, synth_patch_dir / pid]
    ref = tmp_path / "reference"
    r = subprocess.run(_args(inputs, ref, model_dir), capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    reference = _outputs(ref)
    killed_at = {}
    for name, reached in KILL_POINTS.items():
        run = tmp_path / name
        # batch size 1 slows scoring so each point is reached while the run is still going
        p = subprocess.Popen(_args(inputs, run, model_dir, "--batch-size", "1", "--max-inputs-in-flight", "1",
                                   "--report-every", "0"), env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None and not reached(run):
            time.sleep(0.01)
        assert p.poll() is None, f"{name}: the run ended before the kill point"
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        killed_at[name] = True
        r = subprocess.run(_args(inputs, run, model_dir), capture_output=True, text=True, env=ENV, timeout=600)
        assert r.returncode == 0, (name, r.stderr[-2000:])
        got = _outputs(run)
        assert got.keys() == reference.keys(), name
        for key, value in reference.items():
            assert got[key] == value, (name, key)
        leftovers = [p for p in run.rglob(".tmp-*")] + list(run.rglob("*.partial"))
        assert not leftovers, (name, leftovers)  # no partial file left anywhere, a chunk's included
    assert len(killed_at) == len(KILL_POINTS) == 7
