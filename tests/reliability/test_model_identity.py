"""Model identity: model.json without model_id, an ONNX file naming another model, a model.keras replaced
after export and a forged ONNX (right id, other weights) are all refused at engine load with one clear
line; an exported pair is trusted without a probe, a hand-copied one is probed once and remembered."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cancernet_batch import identity
from cancernet_batch.engines import load_engine
from cancernet_batch.errors import ModelError
from cancernet_batch.modelfolder import ModelFolder

pytestmark = pytest.mark.slow  # two ONNX exports


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """A second tiny model (other weights) with its own export."""
    from cancernet_batch.model import ModelMeta, build_cancernet, export_onnx, save_model_dir

    d = tmp_path_factory.mktemp("other-model")
    m = build_cancernet(width=8, seed=2)
    m.predict_on_batch(np.zeros((1, 50, 50, 3), np.uint8))
    dense = m.get_layer("idc")  # the output layer
    w, b = dense.get_weights()
    dense.set_weights([w, b + 1.0])  # clearly another model, not just other random weights near 0.5
    save_model_dir(m, d, ModelMeta(width=8))
    export_onnx(d)
    return d


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(ModelFolder(src).verified.name))
    return dest


def _set_onnx_id(path: Path, model_id: str) -> None:
    import onnx

    proto = onnx.load(str(path))
    for entry in proto.metadata_props:
        if entry.key == "cancernet_model_id":
            entry.value = model_id
    onnx.save(proto, str(path))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_exported_pair_is_trusted_without_a_probe(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "m")
    eng = load_engine(d, engine="onnx")
    assert eng.verified == "probed"  # a copy without the record: compared once
    assert load_engine(d, engine="onnx").verified == "cached"  # and remembered
    assert ModelFolder(d).verified.is_file()
    assert load_engine(tiny_model_dir, engine="onnx").verified == "cached"  # export wrote its own record


def test_model_json_without_model_id_is_refused(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "m")
    meta = json.loads((d / "model.json").read_text())
    del meta["model_id"]
    (d / "model.json").write_text(json.dumps(meta))
    for engine in ("onnx", "keras", "auto"):
        with pytest.raises(ModelError) as ei:
            load_engine(d, engine=engine)
        assert "has no model_id" in _one_line(ei)


def test_onnx_naming_another_model_is_refused(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "m")
    _set_onnx_id(d / "model.onnx", "0123456789abcdef")
    with pytest.raises(ModelError) as ei:
        load_engine(d, engine="onnx")
    assert "exported from another model.keras" in _one_line(ei) and "cancernet export" in str(ei.value)


def test_model_keras_replaced_after_export_is_refused(tiny_model_dir, other_model, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "m")
    shutil.copy(other_model / "model.keras", d / "model.keras")  # json, onnx and their threshold are the old model's
    for engine in ("onnx", "keras", "auto"):
        with pytest.raises(ModelError) as ei:
            load_engine(d, engine=engine)
        assert "replaced after export" in _one_line(ei), engine


def test_forged_onnx_with_the_right_id_is_refused(tiny_model_dir, other_model, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "m")
    shutil.copy(other_model / "model.onnx", d / "model.onnx")
    _set_onnx_id(d / "model.onnx", json.loads((d / "model.json").read_text())["model_id"])
    with pytest.raises(ModelError) as ei:
        load_engine(d, engine="onnx")
    assert "does not compute what model.keras computes" in _one_line(ei) and "cancernet export" in str(ei.value)
    assert not identity.is_verified(d, __import__("cancernet_batch.model", fromlist=["read_meta"]).read_meta(d))
