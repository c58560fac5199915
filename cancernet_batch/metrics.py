"""Patch- and patient-level metrics of IDC predictions, with bootstrap confidence intervals over patients.

Everything here is plain numpy on ``(y_true, probability, patient)`` arrays, so the same code
serves validation during training and ``cancernet evaluate``. A patch is predicted IDC when its
probability is ``>= threshold``.

* **Patch level**: accuracy, balanced accuracy, precision / recall / F1 per class, specificity,
  ROC AUC, confusion matrix ``[[tn, fp], [fn, tp]]`` (rows: truth non-IDC, IDC).
* **Patient level**: one row per patient (true and predicted IDC fraction, accuracy, sensitivity,
  specificity, balanced accuracy and AUC where the patient has both classes) and a summary: the
  mean per-patient accuracy and the mean absolute error of the predicted IDC fraction. "Does this
  patient have IDC" is not scored: in the Kaggle set nearly every patient has IDC patches, so it
  would be a degenerate classifier.
* **Bootstrap over patients**: patients (not patches) are resampled with replacement, because
  patches of one patient are strongly correlated; a patch-level interval would be far too narrow.
  A replicate in which a metric is undefined (e.g. no non-IDC patch drawn) does not count for that
  metric; ``n_valid`` says how many did.
* **Calibration**: expected calibration error (15 equal-width bins) and the reliability table
  behind the reliability diagram: does a probability of 0.7 mean 70 % IDC patches?
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CI_METRICS = ("accuracy", "balanced_accuracy", "f1", "precision", "recall", "specificity", "roc_auc",
              "patient_mean_accuracy", "idc_fraction_mae", "ece")
"""The metrics that get a bootstrap confidence interval."""


# ----------------------------------------------------------------------------------------------
# patch level
# ----------------------------------------------------------------------------------------------

def _div(a, b):
    """a / b elementwise, NaN where b == 0."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def _from_counts(tn, fp, fn, tp) -> dict[str, np.ndarray]:
    """Threshold metrics from (possibly weighted, possibly vectors of) confusion counts.

    Precision/recall/F1 follow scikit-learn, except that an undefined value is NaN (scikit-learn
    returns 0 with a warning).
    """
    tn, fp, fn, tp = (np.asarray(v, np.float64) for v in (tn, fp, fn, tp))
    n = tn + fp + fn + tp
    recall1 = _div(tp, tp + fn)  # sensitivity
    recall0 = _div(tn, tn + fp)  # specificity
    prec1 = _div(tp, tp + fp)
    prec0 = _div(tn, tn + fn)
    f1_1 = _div(2 * tp, 2 * tp + fp + fn)
    f1_0 = _div(2 * tn, 2 * tn + fn + fp)
    return {
        "accuracy": _div(tp + tn, n),
        "balanced_accuracy": (recall1 + recall0) / 2,
        "precision": prec1, "recall": recall1, "f1": f1_1, "specificity": recall0,
        "precision_0": prec0, "recall_0": recall0, "f1_0": f1_0,
    }


def confusion_counts(y_true, y_pred, weights=None) -> tuple[float, float, float, float]:
    """``(tn, fp, fn, tp)`` of 0/1 labels, optionally weighted."""
    y = np.asarray(y_true).astype(bool)
    yp = np.asarray(y_pred).astype(bool)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64)
    return (float(w[~y & ~yp].sum()), float(w[~y & yp].sum()), float(w[y & ~yp].sum()), float(w[y & yp].sum()))


class _RankIndex:
    """Scores sorted once, so that ROC AUC under many weightings costs O(N) each (used by the bootstrap)."""

    def __init__(self, y_true, scores):
        s = np.asarray(scores, np.float64)
        self.y = np.asarray(y_true).astype(bool)
        uniq, self.inv = np.unique(s, return_inverse=True)
        self.k = len(uniq)

    def auc(self, weights=None) -> float:
        w = np.ones(len(self.y)) if weights is None else np.asarray(weights, np.float64)
        pos = np.bincount(self.inv, weights=w * self.y, minlength=self.k)
        neg = np.bincount(self.inv, weights=w * ~self.y, minlength=self.k)
        p_tot, n_tot = pos.sum(), neg.sum()
        if p_tot <= 0 or n_tot <= 0:
            return float("nan")
        below = np.cumsum(neg) - neg  # negatives with a strictly lower score
        return float((pos * (below + 0.5 * neg)).sum() / (p_tot * n_tot))


def roc_auc(y_true, scores, weights=None) -> float:
    """Area under the ROC curve (ties count half; NaN when only one class is present)."""
    return _RankIndex(y_true, scores).auc(weights)


ECE_BINS = 15
"""Equal-width probability bins of the expected calibration error and the reliability diagram."""


def _bin_index(prob, bins: int) -> np.ndarray:
    return np.clip((np.asarray(prob, np.float64) * bins).astype(np.int64), 0, bins - 1)


def reliability(y_true, prob, bins: int = ECE_BINS, weights=None) -> dict[str, np.ndarray]:
    """Per equal-width bin of the IDC probability: patch count (weighted), mean probability and IDC share.

    A bin without patches has NaN means. ``count``, ``mean_prob`` and ``frac_idc`` are arrays of ``bins``.
    """
    y = np.asarray(y_true).astype(np.float64)
    p = np.asarray(prob, np.float64)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64)
    b = _bin_index(p, bins)
    count = np.bincount(b, weights=w, minlength=bins)
    return {"count": count, "mean_prob": _div(np.bincount(b, weights=w * p, minlength=bins), count),
            "frac_idc": _div(np.bincount(b, weights=w * y, minlength=bins), count),
            "edges": np.linspace(0.0, 1.0, bins + 1)}


def expected_calibration_error(y_true, prob, bins: int = ECE_BINS, weights=None) -> float:
    """Expected calibration error of the IDC probability (Naeini et al. 2015; Guo et al. 2017).

    ``sum_b n_b / n * |mean probability_b - IDC share_b|`` over ``bins`` equal-width bins of [0, 1]:
    0 when a probability of 0.7 means 70 % IDC patches. NaN for no patches.
    """
    r = reliability(y_true, prob, bins, weights)
    n = r["count"].sum()
    if n <= 0:
        return float("nan")
    gap = np.where(r["count"] > 0, np.abs(np.nan_to_num(r["mean_prob"]) - np.nan_to_num(r["frac_idc"])), 0.0)
    return float((r["count"] * gap).sum() / n)


def binary_metrics(y_true, prob, threshold, weights=None) -> dict:
    """Patch-level metrics at ``threshold`` (IDC when ``prob >= threshold``); NaN where undefined.

    ``threshold`` is one number, or one per patch (e.g. each cross-validation fold's own).
    """
    y = np.asarray(y_true).astype(np.int8)
    p = np.asarray(prob, np.float64)
    tn, fp, fn, tp = confusion_counts(y, p >= np.asarray(threshold, np.float64), weights)
    out = {k: float(v) for k, v in _from_counts(tn, fp, fn, tp).items()}
    out["roc_auc"] = roc_auc(y, p, weights)
    out["ece"] = expected_calibration_error(y, p, weights=weights)
    out["confusion"] = [[tn, fp], [fn, tp]] if weights is not None else [[int(tn), int(fp)], [int(fn), int(tp)]]
    out["support"] = {"non-IDC": int((y == 0).sum()), "IDC": int((y == 1).sum())}
    out["n"] = int(len(y))
    out["threshold"] = _threshold_value(threshold)
    return out


def _threshold_value(threshold):
    """A scalar threshold as a float; per-patch thresholds (cross-fitted per fold) as their distinct values."""
    t = np.asarray(threshold, np.float64)
    return float(t) if t.ndim == 0 else [float(v) for v in np.unique(t)]


# ----------------------------------------------------------------------------------------------
# patient level
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatientRow:
    """Metrics of one patient's patches."""

    patient: str
    role: str
    n: int
    n_idc: int
    n_pred_idc: int
    true_idc_fraction: float
    pred_idc_fraction: float
    mean_probability: float
    accuracy: float
    sensitivity: float  # NaN when the patient has no IDC patch
    specificity: float  # NaN when the patient has no non-IDC patch
    balanced_accuracy: float  # NaN unless the patient has both classes
    roc_auc: float  # NaN unless the patient has both classes

    @property
    def fraction_error(self) -> float:
        return abs(self.pred_idc_fraction - self.true_idc_fraction)


def patient_rows(patients, y_true, prob, threshold: float, roles: dict[str, str] | None = None) -> list[PatientRow]:
    """One :class:`PatientRow` per patient, sorted by patient id."""
    patients = np.asarray(patients).astype(str)
    y = np.asarray(y_true).astype(np.int8)
    p = np.asarray(prob, np.float64)
    thr = np.broadcast_to(np.asarray(threshold, np.float64), p.shape)
    rows = []
    for pid in sorted(set(patients.tolist())):
        m = patients == pid
        yy, pp = y[m], p[m]
        pred = pp >= thr[m]
        c = _from_counts(*confusion_counts(yy, pred))
        rows.append(PatientRow(
            patient=pid, role=(roles or {}).get(pid, ""), n=int(m.sum()), n_idc=int(yy.sum()), n_pred_idc=int(pred.sum()),
            true_idc_fraction=float(yy.mean()), pred_idc_fraction=float(pred.mean()), mean_probability=float(pp.mean()),
            accuracy=float(c["accuracy"]), sensitivity=float(c["recall"]), specificity=float(c["specificity"]),
            balanced_accuracy=float(c["balanced_accuracy"]), roc_auc=roc_auc(yy, pp)))
    return rows


def patient_summary(rows: list[PatientRow]) -> dict:
    """Patient-level summary: counts, mean per-patient accuracy, IDC-fraction error and correlation."""
    acc = np.array([r.accuracy for r in rows])
    err = np.array([r.fraction_error for r in rows])
    true_f = np.array([r.true_idc_fraction for r in rows])
    pred_f = np.array([r.pred_idc_fraction for r in rows])
    both = [r for r in rows if 0 < r.n_idc < r.n]
    corr = float("nan")
    if len(rows) >= 3 and true_f.std() > 0 and pred_f.std() > 0:
        corr = float(np.corrcoef(true_f, pred_f)[0, 1])
    return {
        "n_patients": len(rows),
        "n_patients_both_classes": len(both),
        "patient_mean_accuracy": float(acc.mean()) if len(rows) else float("nan"),
        "patient_min_accuracy": float(acc.min()) if len(rows) else float("nan"),
        "idc_fraction_mae": float(err.mean()) if len(rows) else float("nan"),
        "idc_fraction_correlation": corr,
        "mean_balanced_accuracy_both_classes": float(np.mean([r.balanced_accuracy for r in both])) if both else float("nan"),
    }


# ----------------------------------------------------------------------------------------------
# bootstrap over patients
# ----------------------------------------------------------------------------------------------

class PatientBootstrap:
    """Resample patients with replacement; each replicate's metrics come from per-patient sums.

    ``replicate(m)`` gives every metric of :data:`CI_METRICS` for a multiplicity vector ``m``
    (how often each patient was drawn), equal to recomputing the metrics on the patches of the drawn
    patients, repeated as drawn.
    """

    def __init__(self, patients, y_true, prob, threshold: float):
        patients = np.asarray(patients).astype(str)
        self.ids, self.code = np.unique(patients, return_inverse=True)
        y = np.asarray(y_true).astype(bool)
        pred = np.asarray(prob, np.float64) >= np.asarray(threshold, np.float64)
        P = len(self.ids)
        cell = (y.astype(int) * 2 + pred.astype(int))  # 0 tn, 1 fp, 2 fn, 3 tp
        self.counts = np.zeros((P, 4))
        np.add.at(self.counts, (self.code, cell), 1)
        n = self.counts.sum(1)
        self.acc = (self.counts[:, 0] + self.counts[:, 3]) / n
        self.frac_err = np.abs(self.counts[:, 1] - self.counts[:, 2]) / n  # |predicted - true| IDC fraction = |fp - fn| / n
        self.ranks = _RankIndex(y, prob)
        p = np.asarray(prob, np.float64)
        self.bins = _bin_index(p, ECE_BINS)
        self.y, self.p = y.astype(np.float64), p

    def replicate(self, m: np.ndarray) -> dict[str, float]:
        m = np.asarray(m, np.float64)
        tn, fp, fn, tp = m @ self.counts
        out = {k: float(v) for k, v in _from_counts(tn, fp, fn, tp).items() if k in CI_METRICS}
        out["roc_auc"] = self.ranks.auc(m[self.code])
        out["patient_mean_accuracy"] = float(m @ self.acc / m.sum())
        out["idc_fraction_mae"] = float(m @ self.frac_err / m.sum())
        w = m[self.code]
        count = np.bincount(self.bins, weights=w, minlength=ECE_BINS)
        gap = np.abs(np.bincount(self.bins, weights=w * self.p, minlength=ECE_BINS)
                     - np.bincount(self.bins, weights=w * self.y, minlength=ECE_BINS))
        out["ece"] = float(gap.sum() / count.sum()) if count.sum() > 0 else float("nan")
        return out

    def intervals(self, replicates: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, dict]:
        """Percentile intervals: ``{metric: {"low", "high", "n_valid"}}`` (None bounds with < 2 valid replicates)."""
        P = len(self.ids)
        rng = np.random.default_rng(seed)
        draws = rng.multinomial(P, np.full(P, 1.0 / P), size=replicates) if replicates else np.zeros((0, P))
        values = {k: [] for k in CI_METRICS}
        for m in draws:
            for k, v in self.replicate(m).items():
                values[k].append(v)
        alpha = (1 - level) / 2
        out = {}
        for k in CI_METRICS:
            v = np.asarray(values[k], np.float64)
            v = v[np.isfinite(v)]
            if len(v) >= 2:
                lo, hi = np.quantile(v, [alpha, 1 - alpha])
                out[k] = {"low": float(lo), "high": float(hi), "n_valid": int(len(v))}
            else:
                out[k] = {"low": None, "high": None, "n_valid": int(len(v))}
        return out


def bootstrap_ci(patients, y_true, prob, threshold: float, *, replicates: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, dict]:
    """95% (``level``) percentile confidence intervals of :data:`CI_METRICS`, resampling patients."""
    return PatientBootstrap(patients, y_true, prob, threshold).intervals(replicates, seed, level)


# ----------------------------------------------------------------------------------------------
# threshold
# ----------------------------------------------------------------------------------------------

THRESHOLD_RULE = ("maximises Youden's J = sensitivity + specificity - 1 (equivalently balanced accuracy) on the "
                  "validation patches; ties go to the cut nearest 0.5; the cut lies midway between neighbouring "
                  "validation scores; a patch is IDC when p >= threshold")


def choose_threshold(y_true, prob) -> float | None:
    """The decision threshold by :data:`THRESHOLD_RULE`; None when ``y_true`` lacks a class."""
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(prob, np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    uniq, inv = np.unique(p, return_inverse=True)
    pos = np.bincount(inv, weights=y, minlength=len(uniq))
    neg = np.bincount(inv, weights=~y, minlength=len(uniq))
    # cut k: IDC when p >= uniq[k]; tpr/fpr count scores at or above the cut
    tpr = np.cumsum(pos[::-1])[::-1] / n_pos
    fpr = np.cumsum(neg[::-1])[::-1] / n_neg
    lower = np.concatenate([[0.0], uniq[:-1]])
    cuts = (uniq + lower) / 2  # midway to the next lower score: same decisions on these scores
    j = tpr - fpr
    best = np.flatnonzero(j >= j.max() - 1e-12)
    k = best[np.argmin(np.abs(cuts[best] - 0.5))]
    return float(cuts[k])
