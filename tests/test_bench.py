"""`cancernet bench` in CI size: every figure in its JSON, ratios, and the autotune it saves."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_json_holds_every_figure(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3", "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "cancernet_batch.cli", "bench", "--synthetic-slides", "2", "--size", "10000",
                        "--batch-sizes", "256,1024", "--workers", "1", "--naive-count", "20", "--json", str(out),
                        "--markdown", str(tmp_path / "bench.md")],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    stages = {(f["stage"], f["engine"]) for f in data["figures"]}
    assert ("roof", "onnx-cpu") in stages and any(s == "roof" and e.startswith("keras") for s, e in stages)
    for stage in ("tile", "predict", "run", "naive"):
        assert any(s == stage for s, _ in stages), stage
    for f in data["figures"]:
        assert f["patches"] > 0 and f["seconds"] > 0 and f["patches_per_second"] > 0
    roofs = [f for f in data["figures"] if f["stage"] == "roof" and f["engine"] == "onnx-cpu"]
    assert sorted(f["settings"]["batch_size"] for f in roofs) == [256, 1024]
    tile = [f for f in data["figures"] if f["stage"] == "tile"][0]
    assert tile["settings"]["MB_read_per_s"] > 0
    assert data["machine"]["cores"] >= 1 and "onnxruntime" in data["machine"]["versions"]
    ratios = data["ratios"]
    assert ratios["predict_vs_roof"] > 0 and ratios["predict_vs_naive"] > 0 and ratios["run_vs_naive"] > 0
    best = data["best"]
    assert best["batch_size"] in (256, 1024) and best["workers"] == 1
    assert "| predict |" in (tmp_path / "bench.md").read_text()
    saved = json.loads((tmp_path / "cfg" / "cancernet-batch" / "autotune.json").read_text())
    assert saved["batch_size"] == best["batch_size"]


def test_predict_autotune_without_bench_is_clear_error(tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "empty")}
    r = subprocess.run([sys.executable, "-m", "cancernet_batch.cli", "predict", str(tmp_path), "--model", str(tmp_path),
                        "--autotune"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "cancernet bench" in r.stderr and "Traceback" not in r.stderr
