"""CancerNet definition, the model folder contract, safe loading, ONNX export and cross-backend equality."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cancernet_batch.errors import ModelError
from cancernet_batch.model import (BatchNormCalibrator, ModelMeta, build_cancernet, export_onnx, file_id,
                                   load_keras_model, predict_tiles, read_meta, save_model_dir)

RNG = np.random.default_rng(11)
TILES = RNG.integers(0, 256, (40, 50, 50, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small CancerNet with calibrated (non-default) batch-norm statistics, saved under TensorFlow."""
    model = build_cancernet(width=4, seed=1)
    BatchNormCalibrator(model, batch_size=20)(TILES)
    out = tmp_path_factory.mktemp("model")
    save_model_dir(model, out, ModelMeta(threshold=0.4, width=4, mpp=4.0))
    return out


def test_architecture():
    model = build_cancernet(width=8, seed=0)
    assert model.inputs[0].dtype == "uint8" and tuple(model.inputs[0].shape) == (None, 50, 50, 3)
    assert tuple(model.outputs[0].shape) == (None, 1)
    assert model.layers[1].__class__.__name__ == "Rescaling"
    kinds = [layer.__class__.__name__ for layer in model.layers]
    assert kinds.count("SeparableConv2D") == 6 and kinds.count("MaxPooling2D") == 3 and kinds.count("Dropout") == 4
    assert kinds.count("BatchNormalization") == 7
    p = predict_tiles(model, TILES[:5])
    assert p.shape == (5,) and p.dtype == np.float32 and np.all((p > 0) & (p < 1))
    plain = build_cancernet(width=8, separable=False, seed=0)
    assert "Conv2D" in [layer.__class__.__name__ for layer in plain.layers]
    assert build_cancernet(width=16).count_params() > 2 * model.count_params()  # width is the knob


def test_seed_fixes_initial_weights():
    a, b = build_cancernet(width=4, seed=5), build_cancernet(width=4, seed=5)
    c = build_cancernet(width=4, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))
    assert not all(np.array_equal(x, y) for x, y in zip(a.get_weights(), c.get_weights()))


def test_predict_rejects_float_or_wrong_shape():
    model = build_cancernet(width=4)
    with pytest.raises(ValueError, match="uint8"):
        predict_tiles(model, TILES.astype(np.float32))
    with pytest.raises(ValueError, match="50, 50, 3"):
        predict_tiles(model, TILES[:, :40])


def test_batchnorm_calibration_sets_exact_statistics():
    import keras

    model = build_cancernet(width=4, seed=2)
    BatchNormCalibrator(model, batch_size=16)(TILES)  # 40 tiles: two full batches and a padded one
    bn = model.get_layer("block1_conv1_bn")
    feat = np.asarray(keras.Model(model.inputs, bn.input).predict_on_batch(TILES), np.float64).reshape(-1, 4)
    np.testing.assert_allclose(np.asarray(bn.moving_mean), feat.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.moving_variance), feat.var(0), rtol=1e-3, atol=1e-6)


def test_model_folder_round_trip(model_dir):
    meta = read_meta(model_dir)
    assert meta.threshold == 0.4 and meta.patch_size == 50 and meta.mpp == 4.0
    assert meta.classes == ("non-IDC", "IDC") and meta.width == 4
    assert meta.model_id == file_id(model_dir / "model.keras") and len(meta.model_id) == 16
    assert meta.versions["keras"] and meta.versions["keras_backend"] == "tensorflow" and meta.created
    raw = json.loads((model_dir / "model.json").read_text())
    assert {"patch_size", "mpp", "threshold", "threshold_rule", "classes", "split", "data", "metrics", "versions",
            "model_id"} <= set(raw)
    model = load_keras_model(model_dir)
    assert getattr(model, "optimizer", None) is None  # saved without training state
    assert list(meta.predicted_class(np.array([0.39, 0.4, 0.9]))) == [0, 1, 1]


def _write_meta(d: Path, **changes) -> None:
    good = json.loads(ModelMeta().to_json())
    good.update(changes)
    (d / "model.json").write_text(json.dumps(good))


@pytest.mark.parametrize("changes, message", [
    ({"patch_size": 64}, "patch_size"),
    ({"mpp": 0.0}, "mpp"),
    ({"mpp": "4"}, "mpp"),
    ({"threshold": 1.5}, "threshold"),
    ({"classes": ["IDC"]}, "classes"),
    ({"format_version": 99}, "newer"),
])
def test_read_meta_rejects_implausible_contents(tmp_path, changes, message):
    _write_meta(tmp_path, **changes)
    with pytest.raises(ModelError, match=message) as err:
        read_meta(tmp_path)
    assert "\n" not in str(err.value) and "(" in str(err.value)  # one line with a fix


def test_read_meta_missing_corrupt(tmp_path):
    with pytest.raises(ModelError, match="no such model folder"):
        read_meta(tmp_path / "nope")
    with pytest.raises(ModelError, match="no model.json"):
        read_meta(tmp_path)
    (tmp_path / "model.json").write_text('{"patch_size": 50, "mpp":')
    with pytest.raises(ModelError, match="not valid JSON"):
        read_meta(tmp_path)
    (tmp_path / "model.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ModelError, match="corrupt"):
        read_meta(tmp_path)
    _write_meta(tmp_path)
    del_key = json.loads((tmp_path / "model.json").read_text())
    del del_key["threshold"]
    (tmp_path / "model.json").write_text(json.dumps(del_key))
    with pytest.raises(ModelError, match="has no 'threshold'"):
        read_meta(tmp_path)


def test_corrupt_model_file(tmp_path, model_dir):
    for name in ("model.json",):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    (tmp_path / "model.keras").write_bytes(b"this is not a zip archive at all")
    with pytest.raises(ModelError, match="not a Keras model file"):
        load_keras_model(tmp_path)
    data = (model_dir / "model.keras").read_bytes()
    (tmp_path / "model.keras").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ModelError):
        load_keras_model(tmp_path)


def test_model_keras_from_another_run_is_refused(tmp_path, model_dir):
    other = build_cancernet(width=4, seed=9)
    save_model_dir(other, tmp_path, ModelMeta())
    (tmp_path / "model.json").write_bytes((model_dir / "model.json").read_bytes())
    with pytest.raises(ModelError, match="different runs"):
        load_keras_model(tmp_path)


def test_foreign_model_is_refused(tmp_path):
    import keras

    inp = keras.Input((64, 64, 3))
    foreign = keras.Model(inp, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(inp)))
    save_model_dir(foreign, tmp_path, ModelMeta())
    with pytest.raises(ModelError, match="not a CancerNet model: its input"):
        load_keras_model(tmp_path)
    inp = keras.Input((50, 50, 3))  # float input: would silently get unscaled pixels
    foreign = keras.Model(inp, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(inp)))
    save_model_dir(foreign, tmp_path, ModelMeta())
    with pytest.raises(ModelError, match="float32 input"):
        load_keras_model(tmp_path)


def test_lambda_layer_is_refused(tmp_path):
    import keras

    inp = keras.Input((50, 50, 3), dtype="uint8")
    x = keras.layers.Lambda(lambda t: keras.ops.cast(t, "float32") / 255.0)(inp)
    out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x))
    save_model_dir(keras.Model(inp, out), tmp_path, ModelMeta())
    with pytest.raises(ModelError, match="Lambda"):
        load_keras_model(tmp_path)


def test_onnx_export_equals_keras(model_dir):
    import onnxruntime as ort

    path = export_onnx(model_dir)
    assert path == model_dir / "model.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [50, 50, 3] and not isinstance(inp.shape[0], int)
    assert sess.get_modelmeta().custom_metadata_map["cancernet_model_id"] == read_meta(model_dir).model_id
    keras_p = predict_tiles(load_keras_model(model_dir), TILES)
    for n in (1, 13, 40):
        onnx_p = sess.run(None, {inp.name: TILES[:n]})[0].reshape(-1)
        assert np.max(np.abs(onnx_p - keras_p[:n])) < 1e-5
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".")]  # no temporary left behind
    import onnx

    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("BatchNormalization") == 6  # each post-ReLU batch norm of the 6 conv layers is one fused node


def _affine_graph(share_mul_output: bool):
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(3)
    scale = rng.normal(size=(1, 4, 1, 1)).astype(np.float32)  # negative scales too
    shift = rng.normal(size=(1, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "scale"], ["m"]),
             helper.make_node("Add", ["m", "shift"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 4, 5, 5])]
    if share_mul_output:
        outputs.append(helper.make_tensor_value_info("m", onnx.TensorProto.FLOAT, [None, 4, 5, 5]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4, 5, 5])],
                              outputs, [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(shift, "shift")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def test_fuse_channel_affines_is_exact_and_leaves_shared_outputs():
    import onnx
    import onnxruntime as ort

    from cancernet_batch.model import fuse_channel_affines

    x = np.random.default_rng(4).normal(size=(3, 4, 5, 5)).astype(np.float32)
    before = _affine_graph(False)
    want = ort.InferenceSession(before.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert fuse_channel_affines(before) == 1
    onnx.checker.check_model(before, full_check=True)
    assert [n.op_type for n in before.graph.node] == ["Relu", "BatchNormalization"]
    assert {t.name for t in before.graph.initializer}.isdisjoint({"scale", "shift"})  # no unused constants left
    got = ort.InferenceSession(before.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.max(np.abs(got - want)) < 1e-5 * max(1.0, float(np.max(np.abs(want))))
    shared = _affine_graph(True)  # the Mul's result is also a graph output: it must stay
    assert fuse_channel_affines(shared) == 0 and [n.op_type for n in shared.graph.node] == ["Relu", "Mul", "Add"]


def test_saving_a_new_model_drops_a_stale_onnx(tmp_path):
    save_model_dir(build_cancernet(width=4, seed=1), tmp_path, ModelMeta())
    export_onnx(tmp_path)
    assert (tmp_path / "model.onnx").exists()
    save_model_dir(build_cancernet(width=4, seed=2), tmp_path, ModelMeta())
    assert not (tmp_path / "model.onnx").exists()


CROSS = textwrap.dedent("""
    import sys, numpy as np
    from cancernet_batch.model import load_keras_model, predict_tiles
    import keras
    assert keras.backend.backend() == sys.argv[3], keras.backend.backend()
    p = predict_tiles(load_keras_model(sys.argv[1]), np.load(sys.argv[2]))
    np.save(sys.argv[2] + ".out.npy", p)
    print("tensorflow loaded:", "tensorflow" in sys.modules)
""")


def _predict_under(backend: str, model_dir: Path, tmp_path: Path) -> tuple[np.ndarray, str]:
    tiles = tmp_path / f"tiles-{backend}.npy"
    np.save(tiles, TILES)
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    r = subprocess.run([sys.executable, "-c", CROSS, str(model_dir), str(tiles), backend], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.load(str(tiles) + ".out.npy"), r.stdout


def test_same_predictions_under_jax(model_dir, tmp_path):
    pytest.importorskip("jax", reason="jax is in the dev extra: pip install -e '.[dev]'")
    expected = predict_tiles(load_keras_model(model_dir), TILES)
    got, out = _predict_under("jax", model_dir, tmp_path)
    assert np.max(np.abs(got - expected)) < 1e-5
    assert "tensorflow loaded: False" in out  # the JAX path never needs TensorFlow


def test_same_predictions_under_torch(model_dir, tmp_path):
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.skip("PyTorch is not installed here (optional: pip install -e '.[torch]'; .ci/run installs the CPU build)")
    expected = predict_tiles(load_keras_model(model_dir), TILES)
    got, out = _predict_under("torch", model_dir, tmp_path)
    assert np.max(np.abs(got - expected)) < 1e-5
    assert "tensorflow loaded: False" in out  # the PyTorch path never needs TensorFlow


def test_model_file_is_a_keras_zip(model_dir):
    with zipfile.ZipFile(model_dir / "model.keras") as z:
        assert {"config.json", "metadata.json"} <= set(z.namelist())
