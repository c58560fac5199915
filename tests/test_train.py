"""Training end to end on tiny synthetic data, the uint8 batch pipeline, and ``cancernet train/evaluate/export``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cancernet_batch.cli import main
from cancernet_batch.config import TrainConfig
from cancernet_batch.errors import EXIT_ERROR, EXIT_OK, ConfigError, InputError
from cancernet_batch.model import read_meta
from cancernet_batch.train import PatchBatches, augment_batch, class_weights

TINY = dict(epochs=3, width=8, batch_size=16, bootstrap=200, seed=7)


@pytest.fixture(scope="module")
def trained(synth_patch_dir, tmp_path_factory):
    """A tiny CancerNet trained on 4 synthetic patients (3 train, 1 validation)."""
    from cancernet_batch.train import train

    out = tmp_path_factory.mktemp("trained") / "model"
    return train([synth_patch_dir], out, TrainConfig(**TINY)), None


# ----------------------------------------------------------------------------------------------
# batches and augmentation
# ----------------------------------------------------------------------------------------------

def _dihedral(t):
    return [np.rot90(v, k) for v in (t, t[:, ::-1]) for k in range(4)]


def test_augmentation_geometry_and_colour():
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (16, 50, 50, 3), dtype=np.uint8)
    geo = augment_batch(tiles, np.random.default_rng(1), jitter=0.0)
    assert geo.dtype == np.uint8 and geo.shape == tiles.shape
    assert all(any(np.array_equal(g, d) for d in _dihedral(t)) for g, t in zip(geo, tiles))
    assert not np.array_equal(geo, tiles)  # some tile was actually turned
    col = augment_batch(tiles, np.random.default_rng(1), jitter=0.08, stain=0.1)
    assert col.dtype == np.uint8
    diff = np.abs(col.astype(int) - geo.astype(int)).mean()
    assert 1 < diff < 40  # colours move, mildly
    assert np.array_equal(col, augment_batch(tiles, np.random.default_rng(1), jitter=0.08, stain=0.1))


def test_batches_cover_each_patch_once_per_epoch_and_stay_uint8():
    tiles = np.arange(30, dtype=np.uint8)[:, None, None, None] * np.ones((1, 50, 50, 3), np.uint8)
    labels = np.array([0, 1] * 15, np.int8)
    index = np.arange(3, 30)
    b = PatchBatches(tiles, labels, index, 8, weights=(2.0, 0.5), shuffle=True, seed=1)
    assert len(b) == 4

    def epoch():
        seen = []
        for i in range(len(b)):
            x, y, w = b[i]
            assert x.dtype == np.uint8 and y.shape == (len(x), 1) and y.dtype == np.float32
            assert np.array_equal(w, np.where(y[:, 0] == 1, 0.5, 2.0))
            assert np.array_equal(y[:, 0], labels[x[:, 0, 0, 0]])
            seen.extend(x[:, 0, 0, 0].tolist())
        return seen

    first = epoch()
    assert sorted(first) == list(range(3, 30))
    b.on_epoch_end()
    second = epoch()
    assert sorted(second) == list(range(3, 30)) and second != first
    with pytest.raises(IndexError):
        b[len(b)]


def test_class_weights_make_each_class_half_the_loss():
    w0, w1 = class_weights(np.array([0] * 30 + [1] * 10))
    assert w0 * 30 == pytest.approx(w1 * 10) == pytest.approx(20)


def test_config_is_checked():
    with pytest.raises(ConfigError, match="--val-fraction"):
        TrainConfig(val_fraction=1.5)
    with pytest.raises(ConfigError, match="too few patients"):
        TrainConfig(val_fraction=0.5, test_fraction=0.45)
    with pytest.raises(ConfigError, match="split file not found"):
        TrainConfig(split_file="/no/such/split")


# ----------------------------------------------------------------------------------------------
# training end to end
# ----------------------------------------------------------------------------------------------

def test_tiny_training_writes_every_artefact(trained):
    res, _ = trained
    out = res.out_dir
    for name in ("model.keras", "model.json", "model.onnx", "curves.png", "confusion.png", "roc.png", "patients.png",
                 "classification_report.txt", "metrics.json", "split.json", "per_patient.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "non-IDC" in (out / "classification_report.txt").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["history"]) >= {"loss", "val_loss", "accuracy", "val_accuracy", "auc", "val_auc"}
    assert len(metrics["history"]["loss"]) == res.meta.training["epochs_run"] <= 3
    assert metrics["val"]["patch"]["n"] == sum(r.n for r in res.val.rows)


def test_no_patient_on_both_sides(trained, synth_patch_dir):
    res, _ = trained
    split = json.loads((res.out_dir / "split.json").read_text())
    train, val = set(split["train"]), set(split["val"])
    assert train and val and not train & val
    assert train | val == {p.name for p in synth_patch_dir.iterdir() if p.is_dir()}
    meta = json.loads((res.out_dir / "model.json").read_text())
    assert meta["split"]["val"] == sorted(val)
    assert {r.patient for r in res.val.rows} == val  # validation metrics come from validation patients only
    assert meta["data"]["per_role"]["val"]["patients"] == len(val)


def test_model_json_contract(trained):
    from cancernet_batch.model import file_id, read_meta

    res, _ = trained
    meta = read_meta(res.out_dir)
    assert meta.model_id == file_id(res.out_dir / "model.keras")
    assert 0 < meta.threshold < 1 and "Youden" in meta.threshold_rule
    assert meta.mpp == 4.0 and meta.patch_size == 50 and meta.width == 8
    assert {"keras", "numpy", "cancernet_batch", "keras_backend"} <= set(meta.versions)
    assert meta.metrics["val"]["patch"]["balanced_accuracy"] == pytest.approx(res.val.patch["balanced_accuracy"])
    assert meta.training["seconds_per_epoch"] > 0 and meta.training["config"]["seed"] == 7


def test_trained_model_is_sane_in_inference_mode(trained, synth_patch_dir):
    """Precise batch norm: after a few dozen steps the model must already separate the classes at inference."""
    from cancernet_batch.engines import load_engine
    from cancernet_batch.metrics import roc_auc
    from cancernet_batch.patches import load

    res, _ = trained
    val = load([synth_patch_dir / p for p in res.split.val])
    prob = load_engine(res.out_dir, "keras").predict(val.tiles)
    assert roc_auc(val.labels, prob) > 0.85
    assert res.val.patch["balanced_accuracy"] > 0.75
    assert 0.05 < float(np.mean(prob >= res.meta.threshold)) < 0.95  # not one class for everything


def test_same_seed_same_split_and_start(synth_patch_dir, tmp_path):
    from cancernet_batch.train import train

    cfg = TrainConfig(epochs=1, width=4, batch_size=32, bootstrap=0, export_onnx=False, seed=3)
    a = train([synth_patch_dir], tmp_path / "a", cfg)
    b = train([synth_patch_dir], tmp_path / "b", cfg)
    assert a.split == b.split
    assert a.history["loss"] == pytest.approx(b.history["loss"], rel=1e-3)
    assert a.history["val_loss"] == pytest.approx(b.history["val_loss"], rel=1e-3)


def test_refuses_to_overwrite_a_model(trained, synth_patch_dir):
    from cancernet_batch.train import train

    res, _ = trained
    with pytest.raises(ConfigError, match="already holds a trained model"):
        train([synth_patch_dir], res.out_dir, TrainConfig(**TINY))


def test_folder_without_both_classes(synth_patch_dir, tmp_path):
    from cancernet_batch.train import train

    one_class = tmp_path / "idc-only"
    for patient in synth_patch_dir.iterdir():
        if patient.is_dir():
            shutil.copytree(patient / "1", one_class / patient.name / "1")
    with pytest.raises(InputError, match="only IDC \\(class 1\\) patches"):
        train([one_class], tmp_path / "m", TrainConfig(**TINY))


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------

def test_evaluate_scores_held_out_patients_only(trained, synth_patch_dir, tmp_path):
    from cancernet_batch.evaluate import evaluate

    res, _ = trained
    ev = evaluate(res.out_dir, [synth_patch_dir], out_dir=tmp_path / "ev", bootstrap=100)
    assert set(ev.roles) == set(res.split.val) and set(ev.excluded_training) == set(res.split.train)
    assert ev.engine == "onnx-cpu"
    # same patients, same threshold: the same metrics as training recorded (ONNX vs Keras within 1e-5)
    for key in ("balanced_accuracy", "accuracy", "f1", "roc_auc"):
        assert ev.assessment.patch[key] == pytest.approx(res.val.patch[key], abs=1e-3), key
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert report["data"]["left_out_training_patients"] == sorted(res.split.train)
    assert report["model"]["model_id"] == res.meta.model_id
    assert {"patch", "patient", "ci", "per_patient"} <= set(report)
    for name in ("confusion.png", "roc.png", "patients.png", "per_patient.csv", "classification_report.txt"):
        assert (tmp_path / "ev" / name).is_file()


def test_evaluate_on_training_patients_only_is_refused(trained, synth_patch_dir):
    from cancernet_batch.evaluate import evaluate

    res, _ = trained
    with pytest.raises(InputError, match="no held-out patient"):
        evaluate(res.out_dir, [synth_patch_dir / p for p in res.split.train], bootstrap=0)


# ----------------------------------------------------------------------------------------------
# the CLI
# ----------------------------------------------------------------------------------------------

def test_cli_evaluate_prints_a_summary(trained, synth_patch_dir, tmp_path, capsys):
    res, _ = trained
    rc = main(["evaluate", str(res.out_dir), str(synth_patch_dir), "--out", str(tmp_path / "ev"), "--bootstrap", "50"])
    out = capsys.readouterr().out
    assert rc == EXIT_OK
    assert "balanced accuracy" in out and "95% CI" in out and "ROC AUC" in out
    assert f"left out {len(res.split.train)} training patient(s)" in out
    for patient in res.split.val:
        assert f"    {patient} " in out


def test_cli_export_rewrites_the_onnx(trained, tmp_path, capsys):
    res, _ = trained
    d = tmp_path / "copy"
    shutil.copytree(res.out_dir, d)
    (d / "model.onnx").unlink()
    assert main(["export", str(d)]) == EXIT_OK
    assert (d / "model.onnx").is_file() and "within 1e-5" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"not a zip", b""])
def test_cli_corrupt_model_is_one_line_error(trained, synth_patch_dir, tmp_path, capsys, content):
    res, _ = trained
    d = tmp_path / "broken"
    shutil.copytree(res.out_dir, d)
    (d / "model.keras").write_bytes(content)
    (d / "model.onnx").unlink()
    rc = main(["evaluate", str(d), str(synth_patch_dir), "--engine", "keras", "--bootstrap", "0"])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR and err.startswith("error: ") and err.count("\n") == 1
    assert "model.keras" in err and "Traceback" not in err


def test_cli_foreign_model_json_is_one_line_error(tmp_path, synth_patch_dir, capsys):
    (tmp_path / "model.json").write_text(json.dumps({"patch_size": 96, "mpp": 0.5, "threshold": 0.5,
                                                     "classes": ["a", "b"]}))
    rc = main(["evaluate", str(tmp_path), str(synth_patch_dir)])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR and "patch_size is 96" in err and err.count("\n") == 1


def test_cli_train_errors(synth_patch_dir, tmp_path, capsys):
    lists = tmp_path / "split"
    lists.mkdir()
    (lists / "cases_train.txt").write_text("8863\n8865\n")
    (lists / "cases_val.txt").write_text("8913\n")
    rc = main(["train", str(synth_patch_dir), "--out", str(tmp_path / "m"), "--split", str(lists)])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR and "names none of the 4 patients" in err and err.count("\n") == 1
    empty = tmp_path / "empty"
    (empty / "90000" / "0").mkdir(parents=True)
    rc = main(["train", str(empty), "--out", str(tmp_path / "m2")])
    assert rc == EXIT_ERROR and "error: " in capsys.readouterr().err


def test_cli_train_end_to_end(synth_patch_dir, tmp_path, capsys):
    out = tmp_path / "m"
    rc = main(["train", str(synth_patch_dir), "--out", str(out), "--epochs", "1", "--width", "4",
               "--batch-size", "32", "--bootstrap", "20", "--seed", "1"])
    text = capsys.readouterr().out
    assert rc == EXIT_OK, text
    assert "epoch 1:" in text and "threshold" in text and "balanced accuracy" in text and f"wrote {out}" in text
    assert (out / "model.onnx").is_file() and f"wrote {out} (model {read_meta(out).model_id}, model.onnx)" in text
