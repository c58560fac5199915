"""Cross-validation over patients, the scoring model (ensemble + test-time augmentation + calibration), and
its equality across engines (issue 14, part 2)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cancernet_batch import calibration as cal
from cancernet_batch.config import TrainConfig
from cancernet_batch.errors import ConfigError, InputError
from cancernet_batch.metrics import PatientBootstrap, expected_calibration_error, reliability
from cancernet_batch.split import cv_folds

CV_TINY = dict(cv=3, epochs=1, width=4, batch_size=16, bootstrap=50, seed=7, tta=True, calibrate="platt")


def _dihedral(t: np.ndarray) -> list[np.ndarray]:
    """The 8 flips / rotations of a batch (numpy, independent of the model's keras.ops version)."""
    return [np.ascontiguousarray(np.rot90(v, k, axes=(1, 2))) for v in (t, t[:, :, ::-1]) for k in range(4)]


# ----------------------------------------------------------------------------------------------
# folds, ECE, calibration fits: plain numpy
# ----------------------------------------------------------------------------------------------

def _idc_counts(idc_dir: Path) -> dict[str, tuple[int, int]]:
    counts: dict[str, list[int]] = {}
    with open(idc_dir / "MANIFEST.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            counts.setdefault(row["patient"], [0, 0])[int(row["label"])] += 1
    return {p: (c[0], c[1]) for p, c in counts.items()}


def test_cv_folds_partition_patients_and_hold_out_both_classes(idc_dir):
    counts = _idc_counts(idc_dir)
    assert len(counts) == 19
    for k in (3, 5):
        folds = cv_folds(counts, k, seed=42)
        assert len(folds) == k
        held = [p for f in folds for p in f]
        assert sorted(held) == sorted(counts)  # every patient held out exactly once
        assert len(set(held)) == len(held)
        for f in folds:
            train = set(counts) - set(f)
            assert not train & set(f)  # no patient on both sides of a fold
            for side in (f, train):  # both classes on both sides (6 patients have non-IDC patches: possible)
                assert sum(counts[p][0] for p in side) > 0 and sum(counts[p][1] for p in side) > 0
        assert max(len(f) for f in folds) - min(len(f) for f in folds) <= 1
    assert cv_folds(counts, 5, seed=42) == cv_folds(counts, 5, seed=42)
    assert cv_folds(counts, 5, seed=42) != cv_folds(counts, 5, seed=43)


def test_cv_folds_refuse_impossible_requests():
    counts = {"a": (10, 0), "b": (0, 10), "c": (5, 5)}
    with pytest.raises(ConfigError, match="between 2 and 3"):
        cv_folds(counts, 4)
    with pytest.raises(ConfigError, match="between 2 and 3"):
        cv_folds(counts, 1)
    with pytest.raises(ConfigError, match="both classes"):
        cv_folds({"a": (10, 0), "b": (0, 10), "c": (0, 5)}, 3)  # holding out a leaves no non-IDC to train on
    with pytest.raises(ConfigError, match="--cv"):
        TrainConfig(cv=5, test_fraction=0.2)
    with pytest.raises(ConfigError, match="calibration"):
        TrainConfig(calibrate="isotonic")


def test_ece_and_reliability_by_hand():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 1])
    p = np.array([0.05, 0.1, 0.12, 0.9, 0.95, 0.5, 0.55, 0.52])
    r = reliability(y, p, bins=2)
    assert list(r["count"]) == [3, 5]
    assert r["frac_idc"][0] == pytest.approx(1 / 3) and r["mean_prob"][0] == pytest.approx(0.09)
    want = (3 * abs(0.09 - 1 / 3) + 5 * abs(np.mean([0.9, 0.95, 0.5, 0.55, 0.52]) - 4 / 5)) / 8
    assert expected_calibration_error(y, p, bins=2) == pytest.approx(want)
    assert expected_calibration_error(y, y.astype(float)) == 0.0  # certain and right
    # a bootstrap replicate's ECE equals recomputing on the resampled patients' patches
    patients = np.array(list("aabbccdd"))
    m = np.array([2, 0, 1, 1])
    idx = np.concatenate([np.flatnonzero(patients == pid) for pid, n in zip("abcd", m) for _ in range(n)])
    assert PatientBootstrap(patients, y, p, 0.5).replicate(m)["ece"] == pytest.approx(
        expected_calibration_error(y[idx], p[idx]))


def test_calibration_fits_recover_known_scalings():
    rng = np.random.default_rng(0)
    true = rng.normal(0, 2, 20000)
    y = (rng.random(len(true)) < cal.sigmoid(true)).astype(int)
    over = 3.0 * true  # an overconfident model: temperature 3
    t = cal.fit(over, y, "temperature")
    assert t["temperature"] == pytest.approx(3.0, rel=0.05) and t["b"] == 0.0
    assert t["nll_after"] < t["nll_before"]
    shifted = true / 2 + 1.0  # underconfident and biased: Platt a = 2, b = -2
    pl = cal.fit(shifted, y, "platt")
    assert pl["a"] == pytest.approx(2.0, rel=0.05) and pl["b"] == pytest.approx(-2.0, abs=0.1)
    assert expected_calibration_error(y, cal.apply(shifted, pl)) < 0.02 < expected_calibration_error(
        y, cal.sigmoid(shifted))
    assert cal.fit(over, y, "none")["a"] == 1.0
    np.testing.assert_allclose(cal.apply(over, None), cal.sigmoid(over))
    with pytest.raises(ValueError):
        cal.fit(over, np.ones_like(y), "platt")


# ----------------------------------------------------------------------------------------------
# the scoring model (no training): TTA invariance, ONNX = Keras, calibration baked in
# ----------------------------------------------------------------------------------------------

TILES = np.random.default_rng(21).integers(0, 256, (24, 50, 50, 3), dtype=np.uint8)


def _predict(model, tiles: np.ndarray) -> np.ndarray:
    """``predict_tiles`` in one call of the tiles' own size (by default every call is padded to 256 tiles: with
    TTA's 8 transforms of every member, ten times the work for the same 24 probabilities)."""
    from cancernet_batch.model import predict_tiles

    return predict_tiles(model, tiles, batch_size=len(tiles))


@pytest.fixture(scope="module")
def members():
    from cancernet_batch.model import BatchNormCalibrator, build_cancernet

    out = []
    for seed in (1, 2):
        m = build_cancernet(width=4, seed=seed)
        BatchNormCalibrator(m, batch_size=24)(TILES)
        out.append(m)
    return out


def test_scoring_model_is_the_mean_logit_over_members_and_flips_then_calibration(members):
    from cancernet_batch.layers import scoring_model

    c = {"a": 0.7, "b": -0.4}
    net = scoring_model(members, tta=True, calibration=c)
    got = _predict(net, TILES)
    z = np.mean([cal.logit(_predict(m, v), eps=1e-12) for m in members for v in _dihedral(TILES)], axis=0)
    np.testing.assert_allclose(got, cal.apply(z, c), atol=2e-5)
    assert np.max(np.abs(got - cal.sigmoid(z))) > 1e-3  # the calibration did change the probabilities
    for v in _dihedral(TILES)[1:]:  # TTA output is invariant to flipping / rotating the input
        np.testing.assert_allclose(_predict(net, v), got, atol=1e-6)
    plain = _predict(scoring_model(members[:1]), TILES)  # one member, no TTA, identity = the model itself
    np.testing.assert_allclose(plain, _predict(members[0], TILES), atol=1e-6)


def test_bench_variant_roofs(members, tmp_path):
    from cancernet_batch.bench import parse_variant, variant_roofs
    from cancernet_batch.model import ModelMeta, export_onnx, save_model_dir

    assert parse_variant("tta") == (1, True) and parse_variant("ensemble5") == (5, False)
    assert parse_variant("ensemble3-tta") == (3, True)
    for bad in ("", "ensemble", "tta5", "ensemble0"):
        with pytest.raises(ValueError):
            parse_variant(bad)
    save_model_dir(members[0], tmp_path / "m", ModelMeta(width=4))
    export_onnx(tmp_path / "m")
    figs = variant_roofs(tmp_path / "m", ("tta", "ensemble2"), tmp_path, batch_size=16, min_seconds=0.05)
    assert [f.settings["variant"] for f in figs] == ["single", "tta", "ensemble2"]
    assert all(f.stage == "variant" and f.patches > 0 and f.seconds > 0 for f in figs)
    assert figs[0].settings["x_single"] == 1.0 and figs[1].settings["tta"] and figs[2].settings["members"] == 2


# ----------------------------------------------------------------------------------------------
# cancernet train --cv end to end (tiny)
# ----------------------------------------------------------------------------------------------

FIT_CALLS: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
"""(patients trained on, patients whose labels the fit saw as validation) of every ``_fit`` call of ``cv_run``."""


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    """3-fold CV on 6 synthetic patients, 1 epoch, width 4, TTA, Platt: the model folder and the result.

    Every call of the real ``train._fit`` is recorded (which patients it trained on and validated on) in
    :data:`FIT_CALLS`; the fit itself runs unchanged."""
    from cancernet_batch import train as train_mod
    from cancernet_batch.synth import synth_patches
    from cancernet_batch.train import train

    data = tmp_path_factory.mktemp("cv-data")
    synth_patches(data, patients=6, per_patient=30, idc_fraction=0.4, seed=3)
    out = tmp_path_factory.mktemp("cv") / "model"
    real_fit = train_mod._fit
    FIT_CALLS.clear()

    def recording_fit(model, patches, idx, *args, **kwargs):
        side = {k: tuple(sorted(set(patches.patients[v].tolist()))) for k, v in idx.items() if len(v)}
        FIT_CALLS.append((side.get("train", ()), side.get("val", ())))
        return real_fit(model, patches, idx, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "_fit", recording_fit)
        res = train([data], out, TrainConfig(**CV_TINY))
    return data, out, res


def test_cv_fold_training_never_sees_its_held_out_patients(cv_run):
    """No leak through training: each fold model fits on the other folds' patients only, and no held-out
    patient is passed as validation data (nothing, e.g. early stopping, can be chosen on them)."""
    data, out, res = cv_run
    assert len(FIT_CALLS) == len(res.folds) == 3  # one fit per fold (the exported model is their ensemble)
    everyone = sorted(p.name for p in data.iterdir() if p.is_dir())
    for (trained, validated), held in zip(FIT_CALLS, res.folds):
        assert validated == ()
        assert not set(trained) & set(held)
        assert sorted(trained + tuple(held)) == everyone


def test_cross_fitted_threshold_and_calibration_ignore_the_folds_own_labels():
    """No leak through the decision threshold or the calibration: a fold's are fitted on the other folds'
    out-of-fold predictions only, so changing its own labels and logits changes neither (but does change
    the other folds')."""
    from cancernet_batch.cv import cross_fit

    rng = np.random.default_rng(5)
    n, k = 600, 3
    fold_of = np.repeat(np.arange(k), n // k)
    y = (rng.random(n) < 0.5).astype(int)
    z = rng.normal(0, 1, n) + 2.0 * (y - 0.5)
    y2, z2 = y.copy(), z.copy()
    own = fold_of == 0
    y2[own] = 1 - y2[own]  # fold 0's labels flipped and its logits shifted
    z2[own] = z2[own] * 3.0 + 1.0
    for method in ("none", "temperature", "platt"):
        p1, t1, f1 = cross_fit(z, y, fold_of, k, method)
        p2, t2, f2 = cross_fit(z2, y2, fold_of, k, method)
        assert f1[0] == f2[0]  # fold 0: same calibration and threshold
        np.testing.assert_array_equal(t1[own], t2[own])
        np.testing.assert_allclose(p2[own], cal.apply(z2[own], f1[0]))  # fold 0 scored with the others' fit
        assert any(f1[f] != f2[f] for f in (1, 2))  # the others' fits did use fold 0


def test_cv_folds_never_share_a_patient_between_train_and_held_out(cv_run):
    data, out, res = cv_run
    patients = sorted(p.name for p in data.iterdir() if p.is_dir())
    held = []
    for f in range(1, 4):
        s = json.loads((out / "folds" / f"fold{f}" / "split.json").read_text())
        assert s["train"] and s["val"]
        assert not set(s["train"]) & set(s["val"]), f"fold {f}: a patient in both train and held-out"
        assert sorted(s["train"] + s["val"]) == patients
        held += s["val"]
        info = res.meta.training["folds"][f - 1]
        assert info["held_out"] == s["val"] and info["train_patients"] == len(s["train"])
    assert sorted(held) == patients  # each patient held out by exactly one fold
    assert json.loads((out / "split.json").read_text())["folds"] == [sorted(h) for h in res.folds]


def test_oof_metrics_in_model_json_and_report(cv_run):
    data, out, res = cv_run
    meta = json.loads((out / "model.json").read_text())
    cv = meta["metrics"]["cv"]
    assert cv["folds"] == 3 and cv["variant"] == "tta" and cv["calibration"] == "platt"
    pooled = cv["pooled"]
    assert pooled["patch"]["n"] == 6 * 30
    for key in ("balanced_accuracy", "f1", "roc_auc", "ece", "confusion"):
        assert key in pooled["patch"]
    for key in ("balanced_accuracy", "f1", "roc_auc", "ece"):
        assert pooled["ci"][key]["n_valid"] > 0
    assert "patient_mean_accuracy" in pooled["patient"] and "idc_fraction_mae" in pooled["patient"]
    assert [f["fold"] for f in cv["per_fold"]] == [1, 2, 3]
    assert sum(f["patch"]["n"] for f in cv["per_fold"]) == pooled["patch"]["n"]
    assert set(cv["variants"]) == {f"{v}/{m}" for v in ("single", "tta") for m in ("none", "temperature", "platt")}
    assert cv["variants"]["tta/platt"]["balanced_accuracy"] == pytest.approx(pooled["patch"]["balanced_accuracy"])
    sc = meta["scoring"]
    assert sc["members"] == 3 and sc["tta"] is True and sc["calibration"]["method"] == "platt"
    assert 0 <= meta["threshold"] <= 1 and "out-of-fold" in meta["threshold_rule"]
    for name in ("model.keras", "model.onnx", "curves.png", "metrics.json", "cv/reliability.png", "cv/confusion.png",
                 "cv/roc.png", "cv/patients.png", "cv/per_patient.csv", "folds/fold1/model.keras",
                 "folds/fold1/held-out/confusion.png"):
        assert (out / name).is_file(), name
    oof = np.load(out / "cv" / "oof.npz")
    assert len(oof["logit_tta"]) == len(oof["label"]) == 6 * 30 and set(oof["fold"].tolist()) == {1, 2, 3}
    full = json.loads((out / "metrics.json").read_text())
    assert set(full["cv"]["reliability"]) == {"uncalibrated", "temperature (cross-fitted)", "platt (cross-fitted)"}


def test_exported_model_is_the_calibrated_fold_ensemble_in_every_engine(cv_run, tmp_path):
    from cancernet_batch.cv import member_logits
    from cancernet_batch.engines import KerasEngine, OnnxEngine, load_engine
    from cancernet_batch.model import load_keras_model

    data, out, res = cv_run
    c = res.meta.scoring["calibration"]
    folds = [load_keras_model(out / "folds" / f"fold{f}") for f in (1, 2, 3)]
    z = member_logits(folds, TILES, tta=True)
    want = cal.apply(z, c)
    onnx = OnnxEngine(out).predict(TILES)
    keras_tf = KerasEngine(out, batch_size=len(TILES)).predict(TILES)
    assert load_engine(out).name.startswith("onnx")
    np.testing.assert_allclose(onnx, want, atol=1e-5)  # ONNX: fold models averaged, x8 flips, Platt baked in
    np.testing.assert_allclose(keras_tf, onnx, atol=1e-5)
    assert np.max(np.abs(onnx - cal.sigmoid(z))) > 1e-4  # calibration moved the probabilities
    eng = OnnxEngine(out)
    for v in _dihedral(TILES)[1:]:  # TTA: invariant to flipping / rotating the input
        np.testing.assert_allclose(eng.predict(v), onnx, atol=1e-5)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_exported_model_under_jax_and_torch_equals_onnx(cv_run, tmp_path, backend):
    """Keras under the other backends (where installed) runs the same graph: same calibrated probabilities."""
    from cancernet_batch.engines import OnnxEngine

    pytest.importorskip(backend, reason=f"{backend} is optional (dev extra); the ONNX/TensorFlow test covers the rest")
    data, out, res = cv_run
    np.testing.assert_allclose(_score_under(backend, out, tmp_path), OnnxEngine(out).predict(TILES), atol=1e-5)


SCORE = textwrap.dedent("""
    import sys, numpy as np
    from cancernet_batch.engines import KerasEngine
    tiles = np.load(sys.argv[2])
    e = KerasEngine(sys.argv[1], backend=sys.argv[3], batch_size=len(tiles))
    np.save(sys.argv[2] + ".out.npy", e.predict(tiles))
""")


def _score_under(backend: str, model_dir: Path, tmp_path: Path) -> np.ndarray:
    tiles = tmp_path / f"tiles-{backend}.npy"
    np.save(tiles, TILES)
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    r = subprocess.run([sys.executable, "-c", SCORE, str(model_dir), str(tiles), backend], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.load(str(tiles) + ".out.npy")


def test_fold_model_evaluates_its_held_out_patients_and_the_ensemble_has_none(cv_run, tmp_path):
    from cancernet_batch.evaluate import evaluate

    data, out, res = cv_run
    r = evaluate(out / "folds" / "fold1", [data], out_dir=tmp_path / "ev", bootstrap=20)
    assert sorted(r.roles) == sorted(res.folds[0])
    with pytest.raises(InputError, match="no held-out patient"):
        evaluate(out, [data], out_dir=tmp_path / "ev2", bootstrap=0)


def test_old_model_folders_still_score(tiny_model_dir, tmp_path):
    """A model.json without ``scoring`` (written before cross-validation existed) reads and scores as before."""
    import shutil

    from cancernet_batch.engines import KerasEngine, OnnxEngine
    from cancernet_batch.model import read_meta

    d = tmp_path / "old"
    shutil.copytree(tiny_model_dir, d)
    raw = json.loads((d / "model.json").read_text())
    raw.pop("scoring", None)
    (d / "model.json").write_text(json.dumps(raw))
    meta = read_meta(d)
    assert meta.scoring == {}
    np.testing.assert_allclose(OnnxEngine(d).predict(TILES), KerasEngine(d, batch_size=len(TILES)).predict(TILES), atol=1e-5)


def test_one_split_with_tta_and_calibration_wraps_the_model(members):
    from cancernet_batch.train import _wrap_single

    labels = np.array([0, 1] * 12)
    net, scoring = _wrap_single(members[0], TILES, labels, TrainConfig(tta=True, calibrate="temperature"))
    assert scoring["tta"] and scoring["calibration"]["method"] == "temperature"
    from cancernet_batch.cv import member_logits

    z = member_logits([members[0]], TILES, tta=True)
    np.testing.assert_allclose(_predict(net, TILES), cal.apply(z, scoring["calibration"]), atol=2e-5)


def test_cv_tables_script_reports_the_runs_own_figures(cv_run):
    """``training/cv_tables.py`` (the source of the tables in training/RESULTS.md) prints the run's pooled
    figures and one row per fold, with ECEs recomputed from ``cv/oof.npz``."""
    import importlib.util

    data, out, res = cv_run
    spec = importlib.util.spec_from_file_location("cv_tables", Path(__file__).parents[1] / "training" / "cv_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.tables(out)
    pooled = res.cv["pooled"]["patch"]
    assert f"balanced accuracy **{pooled['balanced_accuracy']:.3f}**" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and ln.split("|")[1].strip().isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == [1, 2, 3]
    for r, held in zip(rows, res.folds):
        assert r.split("|")[2].strip() == ", ".join(held)
    pooled_row = next(ln for ln in text.splitlines() if ln.startswith("| pooled"))
    # the pooled Platt ECE column equals the run's own (tta/platt) figure
    assert pooled_row.rstrip(" |").split("|")[-1].strip() == f"{pooled['ece']:.3f}"
