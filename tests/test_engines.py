"""Scoring engines: ONNX Runtime and Keras agree; ``auto`` picks and exports; no TensorFlow where none is needed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cancernet_batch.engines import KerasEngine, OnnxEngine, load_engine
from cancernet_batch.errors import ConfigError, ModelError
from cancernet_batch.model import BatchNormCalibrator, ModelMeta, build_cancernet, export_onnx, save_model_dir

TILES = np.random.default_rng(5).integers(0, 256, (40, 50, 50, 3), dtype=np.uint8)


def _make_model_dir(path: Path, seed: int) -> Path:
    model = build_cancernet(width=4, seed=seed)
    BatchNormCalibrator(model, batch_size=20)(TILES)  # non-default statistics, so engines have something to get wrong
    save_model_dir(model, path, ModelMeta(threshold=0.5, width=4))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    d = _make_model_dir(tmp_path_factory.mktemp("engine-model"), seed=3)
    export_onnx(d)
    return d


def test_onnx_and_keras_engines_agree(exported):
    onnx = OnnxEngine(exported, batch_size=16)  # 40 tiles: sub-batches of 16, 16, 8
    keras_engine = KerasEngine(exported, batch_size=16)
    p1, p2 = onnx.predict(TILES), keras_engine.predict(TILES)
    assert p1.shape == p2.shape == (40,) and p1.dtype == p2.dtype == np.float32
    assert np.max(np.abs(p1 - p2)) < 1e-5
    assert np.std(p1) > 1e-4  # not a constant: the comparison means something
    assert onnx.name == "onnx-cpu" and keras_engine.name == "keras-tensorflow-cpu"
    assert onnx.predict(TILES[:0]).shape == (0,)
    assert np.allclose(onnx.predict(TILES[7:8]), p1[7:8], atol=1e-6)


class _CountingSession:
    """An ONNX Runtime session that records the number of tiles of each call."""

    def __init__(self, session):
        self.session, self.calls = session, []

    def run(self, outputs, feed):
        self.calls.append(len(next(iter(feed.values()))))
        return self.session.run(outputs, feed)


def test_onnx_on_cpu_runs_each_batch_in_cache_sized_calls_with_the_same_probabilities(exported, monkeypatch):
    """On CPU a batch goes to ONNX Runtime in calls of ``micro_batch`` tiles (8 per intra-op thread by default), and
    the probabilities are those of one call of the whole batch."""
    from cancernet_batch.engines import ONNX_CPU_TILES_PER_THREAD

    assert ONNX_CPU_TILES_PER_THREAD == 8
    assert OnnxEngine(exported, threads=1).micro_batch == 8
    assert OnnxEngine(exported, threads=3).micro_batch == 24
    assert OnnxEngine(exported).micro_batch == 8 * len(os.sched_getaffinity(0))  # ONNX Runtime's own pool: every core
    whole = OnnxEngine(exported, threads=1, batch_size=32, micro_batch=0)
    micro = OnnxEngine(exported, threads=1, batch_size=32, micro_batch=6)
    whole.session, micro.session = _CountingSession(whole.session), _CountingSession(micro.session)
    p_whole, p_micro = whole.predict(TILES), micro.predict(TILES)  # 40 tiles: batches of 32 and 8
    assert whole.session.calls == [32, 8]
    assert micro.session.calls == [6, 6, 6, 6, 6, 2, 6, 2]
    assert p_micro.dtype == np.float32 and p_micro.shape == (40,)
    np.testing.assert_allclose(p_micro, p_whole, atol=1e-6)
    assert np.std(p_whole) > 1e-4
    # through load_engine (the workers' path), 0 meaning whole batches; a Keras engine has no such setting
    assert load_engine(exported, "onnx", threads=1, micro_batch=0).micro_batch == 0
    assert load_engine(exported, "onnx", threads=2).micro_batch == 16
    assert not hasattr(load_engine(exported, "keras", micro_batch=4), "micro_batch")
    from cancernet_batch.config import PredictConfig
    from cancernet_batch.stages import score

    # (this process's engine cache and load count as they were: other tests check that a client never loads one)
    monkeypatch.setattr(score, "_ENGINES", {})
    monkeypatch.setattr(score, "ENGINE_LOADS", {"count": 0})
    cfg = PredictConfig(model_dir=str(exported), engine="onnx", engine_threads=1, micro_batch=5)
    assert score.get_engine(cfg).micro_batch == 5  # --micro-batch on the workers


def test_engines_refuse_bad_tiles(exported):
    eng = OnnxEngine(exported)
    with pytest.raises(ValueError, match="uint8"):
        eng.predict(TILES.astype(np.float32))
    with pytest.raises(ValueError):
        eng.predict(TILES[0])


def test_auto_prefers_onnx_on_cpu_and_keras_when_asked(exported):
    assert isinstance(load_engine(exported), OnnxEngine)
    assert isinstance(load_engine(exported, "keras"), KerasEngine)
    with pytest.raises(ConfigError, match="GPU|CUDA"):
        load_engine(exported, "keras", device="gpu")  # this machine has none
    with pytest.raises(ConfigError, match="unknown engine"):
        load_engine(exported, "tensorrt")
    with pytest.raises(ConfigError, match="unknown device"):
        load_engine(exported, device="tpu")


def test_auto_exports_a_missing_onnx(tmp_path):
    d = _make_model_dir(tmp_path / "m", seed=4)
    with pytest.raises(ModelError, match="cancernet export"):
        load_engine(d, "onnx")
    eng = load_engine(d, "auto")
    assert isinstance(eng, OnnxEngine) and (d / "model.onnx").is_file()


def test_stale_onnx_is_detected_and_replaced(tmp_path, exported):
    d = tmp_path / "m"
    shutil.copytree(exported, d)
    _make_model_dir(d, seed=8)  # a new model.keras/json: save_model_dir drops the old model.onnx ...
    shutil.copy(exported / "model.onnx", d / "model.onnx")  # ... so put a stale one back by hand
    with pytest.raises(ModelError, match="another model.keras"):
        OnnxEngine(d)
    eng = load_engine(d)  # auto: re-exports
    assert isinstance(eng, OnnxEngine)
    assert np.max(np.abs(eng.predict(TILES) - KerasEngine(d).predict(TILES))) < 1e-5


def test_backend_cannot_change_once_keras_runs(exported):
    import keras  # noqa: F401  (tensorflow backend, set in conftest)

    with pytest.raises(ConfigError, match="KERAS_BACKEND=jax"):
        load_engine(exported, "keras", backend="jax")
    with pytest.raises(ConfigError, match="unknown Keras backend"):
        load_engine(exported, "keras", backend="mxnet")


def test_corrupt_onnx_file(tmp_path, exported):
    d = tmp_path / "m"
    shutil.copytree(exported, d)
    (d / "model.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelError, match="ONNX Runtime cannot load"):
        OnnxEngine(d)


PROBE = textwrap.dedent("""
    import sys, numpy as np
    from cancernet_batch.engines import load_engine
    eng = load_engine(sys.argv[1], sys.argv[2])
    p = eng.predict(np.load(sys.argv[3]))
    np.save(sys.argv[3] + ".out.npy", p)
    print("ENGINE", eng.name)
    print("LOADED", sorted(m for m in ("keras", "tensorflow", "torch", "jax") if m in sys.modules))
""")


def _run(model_dir: Path, engine: str, tmp_path: Path, **env) -> tuple[np.ndarray, str]:
    tiles = tmp_path / f"tiles-{engine}.npy"
    np.save(tiles, TILES)
    r = subprocess.run([sys.executable, "-c", PROBE, str(model_dir), engine, str(tiles)],
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.load(str(tiles) + ".out.npy"), r.stdout


@pytest.mark.parametrize("engine", ["onnx", "auto"])
def test_onnx_scoring_imports_neither_keras_nor_tensorflow(exported, tmp_path, engine):
    got, out = _run(exported, engine, tmp_path)
    assert "ENGINE onnx-cpu" in out and "LOADED []" in out, out
    assert np.max(np.abs(got - KerasEngine(exported).predict(TILES))) < 1e-5


def test_scoring_only_copy_without_model_keras(exported, tmp_path):
    d = tmp_path / "scoring-only"
    d.mkdir()
    for name in ("model.json", "model.onnx"):
        shutil.copy(exported / name, d / name)
    _, out = _run(d, "auto", tmp_path)
    assert "ENGINE onnx-cpu" in out and "LOADED []" in out


@pytest.mark.parametrize("backend, why", [
    ("jax", "jax is in the dev extra: pip install -e '.[dev]'"),
    ("torch", "PyTorch is optional: pip install -e '.[torch]' (.ci/run installs the CPU build)"),
])
def test_keras_engine_under_jax_or_torch_never_imports_tensorflow(exported, tmp_path, backend, why):
    pytest.importorskip(backend, reason=why)
    got, out = _run(exported, "keras", tmp_path, KERAS_BACKEND=backend)
    assert f"ENGINE keras-{backend}-cpu" in out, out
    assert "tensorflow" not in out.split("LOADED")[1]
    assert np.max(np.abs(got - OnnxEngine(exported).predict(TILES))) < 1e-5
