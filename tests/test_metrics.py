"""Metrics equal scikit-learn's; the patient bootstrap equals recomputing on resampled patients; the threshold rule."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from cancernet_batch.metrics import (CI_METRICS, PatientBootstrap, binary_metrics, bootstrap_ci, choose_threshold,
                                     patient_rows, patient_summary, roc_auc)


@pytest.fixture()
def known():
    """Labels, scores with ties, and patients of unequal size (two with one class only)."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.35 * y + rng.normal(0.35, 0.2, 300), 0, 1).round(2)  # rounding makes ties
    patients = np.array(["a"] * 40 + ["b"] * 100 + ["c"] * 60 + ["d"] * 100)
    y[:40] = 1  # patient a: IDC only
    y[140:200] = 0  # patient c: non-IDC only
    return y, p, patients


def test_patch_metrics_equal_scikit_learn(known):
    y, p, _ = known
    thr = 0.5
    pred = (p >= thr).astype(int)
    m = binary_metrics(y, p, thr)
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert (m["precision_0"], m["precision"]) == pytest.approx(tuple(prec))
    assert (m["recall_0"], m["recall"]) == pytest.approx(tuple(rec))
    assert (m["f1_0"], m["f1"]) == pytest.approx(tuple(f1))
    assert m["specificity"] == pytest.approx(rec[0])
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["confusion"] == skm.confusion_matrix(y, pred, labels=[0, 1]).tolist()
    assert m["support"] == {"non-IDC": int(sup[0]), "IDC": int(sup[1])}


def test_weighted_metrics_equal_scikit_learn(known):
    y, p, _ = known
    w = np.random.default_rng(1).integers(0, 4, len(y)).astype(float)
    pred = (p >= 0.4).astype(int)
    m = binary_metrics(y, p, 0.4, weights=w)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred, sample_weight=w))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, sample_weight=w))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p, sample_weight=w))


def test_undefined_metrics_are_nan_not_zero():
    m = binary_metrics(np.ones(5), np.linspace(0, 1, 5), 0.5)
    assert np.isnan(m["roc_auc"]) and np.isnan(m["specificity"]) and np.isnan(m["balanced_accuracy"])
    assert m["recall"] == pytest.approx(3 / 5)
    assert np.isnan(roc_auc([0, 0], [0.1, 0.9]))


def test_patient_rows(known):
    y, p, patients = known
    rows = {r.patient: r for r in patient_rows(patients, y, p, 0.5, roles={"a": "val"})}
    assert list(rows) == ["a", "b", "c", "d"]
    a, b = rows["a"], rows["b"]
    assert a.role == "val" and a.n == 40 and a.n_idc == 40 and a.true_idc_fraction == 1.0
    assert np.isnan(a.specificity) and np.isnan(a.balanced_accuracy) and np.isnan(a.roc_auc)
    assert a.accuracy == pytest.approx(a.sensitivity)
    mb = slice(40, 140)
    assert b.balanced_accuracy == pytest.approx(skm.balanced_accuracy_score(y[mb], p[mb] >= 0.5))
    assert b.roc_auc == pytest.approx(skm.roc_auc_score(y[mb], p[mb]))
    assert b.pred_idc_fraction == pytest.approx(np.mean(p[mb] >= 0.5))
    s = patient_summary(list(rows.values()))
    assert s["n_patients"] == 4 and s["n_patients_both_classes"] == 2
    assert s["patient_mean_accuracy"] == pytest.approx(np.mean([r.accuracy for r in rows.values()]))
    assert s["idc_fraction_mae"] == pytest.approx(np.mean([r.fraction_error for r in rows.values()]))


def test_bootstrap_replicate_equals_recomputing_on_resampled_patients(known):
    y, p, patients = known
    boot = PatientBootstrap(patients, y, p, 0.5)
    m = np.array([2, 0, 1, 3])  # a twice, b never, c once, d three times
    got = boot.replicate(m)
    idx = np.concatenate([np.flatnonzero(patients == pid) for pid, k in zip("abcd", m) for _ in range(k)])
    direct = binary_metrics(y[idx], p[idx], 0.5)
    for key in ("accuracy", "balanced_accuracy", "f1", "precision", "recall", "specificity", "roc_auc"):
        assert got[key] == pytest.approx(direct[key]), key
    rows = {r.patient: r for r in patient_rows(patients, y, p, 0.5)}
    drawn = [rows[pid] for pid, k in zip("abcd", m) for _ in range(k)]
    assert got["patient_mean_accuracy"] == pytest.approx(np.mean([r.accuracy for r in drawn]))
    assert got["idc_fraction_mae"] == pytest.approx(np.mean([r.fraction_error for r in drawn]))


def test_bootstrap_intervals(known):
    y, p, patients = known
    ci = bootstrap_ci(patients, y, p, 0.5, replicates=300, seed=3)
    point = binary_metrics(y, p, 0.5)
    assert set(ci) == set(CI_METRICS)
    for key in ("accuracy", "balanced_accuracy", "roc_auc"):
        assert ci[key]["low"] <= point[key] <= ci[key]["high"], key
        assert ci[key]["high"] - ci[key]["low"] > 0.005  # patients differ, so the interval is not a point
    # replicates that drew only one-class patients (a and c) cannot give balanced accuracy
    assert ci["balanced_accuracy"]["n_valid"] < 300 and ci["accuracy"]["n_valid"] == 300
    assert ci == bootstrap_ci(patients, y, p, 0.5, replicates=300, seed=3)  # reproducible
    one = bootstrap_ci(np.array(["x"] * len(y)), y, p, 0.5, replicates=50, seed=0)
    assert one["accuracy"]["low"] == one["accuracy"]["high"] == pytest.approx(point["accuracy"])


def test_threshold_maximises_youden_j(known):
    y, p, _ = known
    thr = choose_threshold(y, p)
    fpr, tpr, cuts = skm.roc_curve(y, p)
    best_j = np.max(tpr - fpr)
    pred = p >= thr
    j = pred[y == 1].mean() - pred[y == 0].mean()
    assert j == pytest.approx(best_j)
    assert not np.any(np.isclose(p, thr))  # the cut sits between scores, never on one


def test_threshold_ties_go_to_half_and_one_class_gives_none():
    # two cuts reach J = 0.5: IDC from 0.2 up (sens 1, spec 0.5) and from 0.75 up (sens 0.5, spec 1)
    y = np.array([0, 1, 0, 1])
    assert choose_threshold(y, np.array([0.1, 0.3, 0.6, 0.9])) == pytest.approx(0.75)
    assert choose_threshold(y[[0, 2, 1, 3]], np.array([0.1, 0.2, 0.8, 0.9])) == pytest.approx(0.5)
    assert choose_threshold(np.ones(4), np.linspace(0, 1, 4)) is None
