"""Honest evaluation: metrics on patches of patients the model was not trained on, written as JSON, CSV and PNGs.

:func:`assess` turns ``(patients, labels, probabilities, threshold)`` into an :class:`Assessment`
(patch-level metrics, per-patient table, patient summary, bootstrap intervals over patients);
:func:`write_assessment` writes it; :func:`evaluate` is ``cancernet evaluate``: it loads a model
folder and patch folders, drops the model's training patients, scores the rest with the fastest
engine available (ONNX Runtime when ``model.onnx`` is there: no Keras, no TensorFlow) and writes
the assessment.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .atomic import write_csv, write_text
from .errors import ConfigError, InputError
from .failures import Failure, write_failures
from .metrics import PatientRow, binary_metrics, bootstrap_ci, patient_rows, patient_summary
from .model import CLASSES, jsonable, read_meta, require_raw_input
from .modelfolder import Assessed, ModelFolder
from .split import Split

log = logging.getLogger(__name__)

EVAL_ROLES = ("held-out", "val", "test", "unseen")
"""Which patients ``evaluate`` scores: ``held-out`` = every patient not used to fit the weights."""


@dataclass
class Assessment:
    """Metrics of one set of scored patches."""

    patch: dict
    patient: dict
    rows: list[PatientRow]
    ci: dict
    bootstrap: dict
    y: np.ndarray = field(repr=False)
    prob: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        return jsonable({"patch": self.patch, "patient": self.patient, "ci": self.ci, "bootstrap": self.bootstrap,
                         "per_patient": [asdict(r) for r in self.rows]})

    def summary(self) -> dict:
        """The compact form kept in ``model.json``: no per-patient rows."""
        d = self.to_dict()
        d.pop("per_patient")
        return d


def assess(patients, y_true, prob, threshold: float, *, roles: dict[str, str] | None = None, bootstrap: int = 1000,
           seed: int = 0) -> Assessment:
    """Patch metrics, per-patient rows and summary, and bootstrap CIs (resampling patients)."""
    y = np.asarray(y_true).astype(np.int8)
    p = np.asarray(prob, np.float32)
    rows = patient_rows(patients, y, p, threshold, roles)
    ci = bootstrap_ci(patients, y, p, threshold, replicates=bootstrap, seed=seed) if bootstrap else {}
    info = {"replicates": bootstrap, "seed": seed, "level": 0.95, "unit": "patient", "method": "percentile"}
    return Assessment(binary_metrics(y, p, threshold), patient_summary(rows), rows, ci, info, y, p)


def classification_report_text(y_true, prob, threshold: float, classes: Sequence[str] = CLASSES) -> str:
    """scikit-learn's classification report at ``threshold``."""
    from sklearn.metrics import classification_report

    y = np.asarray(y_true).astype(int)
    pred = (np.asarray(prob) >= np.asarray(threshold)).astype(int)
    return classification_report(y, pred, labels=[0, 1], target_names=list(classes), digits=4, zero_division=0)


PER_PATIENT_COLUMNS = ("patient", "role", "n", "n_idc", "n_pred_idc", "true_idc_fraction", "pred_idc_fraction",
                       "mean_probability", "accuracy", "sensitivity", "specificity", "balanced_accuracy", "roc_auc")


def write_assessment(out: Assessed, a: Assessment, *, title: str, threshold: float,
                     classes: Sequence[str] = CLASSES, report: bool = True, extra: dict | None = None) -> list[Path]:
    """Write the confusion matrix, ROC and per-patient figures, the per-patient CSV, the classification
    report and (with ``report``) the JSON report into the folder ``out`` (:class:`Assessed`)."""
    from .figures import plot_confusion, plot_patients, plot_roc

    files = [
        plot_confusion(a.patch["confusion"], classes, out.confusion,
                       title=f"{title}: threshold {_thr_text(threshold)}"),
        plot_roc(a.y, a.prob, out.roc, threshold=threshold, auc=a.patch["roc_auc"]),
        plot_patients(a.rows, out.patients),
        write_csv(out.per_patient, PER_PATIENT_COLUMNS,
                  [[_fmt(getattr(r, c)) for c in PER_PATIENT_COLUMNS] for r in a.rows]),
        write_text(out.classification_report,
                   f"{title} ({a.patch['n']} patches of {len(a.rows)} patients; IDC when p >= {_thr_text(threshold, 4)})\n\n"
                   + classification_report_text(a.y, a.prob, threshold, classes)),
    ]
    if report:
        files.append(write_text(out.report,
                                json.dumps(jsonable({**(extra or {}), **a.to_dict()}), indent=2, allow_nan=False) + "\n"))
    return files


def _thr_text(threshold, digits: int = 3) -> str:
    """A threshold for titles: the number, or the range of per-fold thresholds."""
    t = np.unique(np.asarray(threshold, np.float64))
    return f"{t[0]:.{digits}f}" if len(t) == 1 else f"per fold {t.min():.{digits}f}-{t.max():.{digits}f}"


def _fmt(v):
    if isinstance(v, float):
        return "" if not np.isfinite(v) else round(v, 6)
    return v


def select_patients(patients: np.ndarray, split: Split, role: str) -> tuple[np.ndarray, dict[str, str], list[str]]:
    """Mask of the patches to evaluate, role per evaluated patient, and the training patients left out."""
    if role not in EVAL_ROLES:
        raise ConfigError(f"unknown patient set {role!r}", hint=f"use one of {', '.join(EVAL_ROLES)}")
    roles = {p: split.role_of(p) for p in sorted(set(patients.tolist()))}
    if role == "held-out":
        keep = {p for p, r in roles.items() if r != "train"}
    elif role == "unseen":
        keep = {p for p, r in roles.items() if r in ("unseen", "excluded")}
    else:
        keep = {p for p, r in roles.items() if r == role}
    trained = sorted(p for p, r in roles.items() if r == "train")
    if not keep:
        raise InputError(f"no {role} patient in the data: {len(trained)} of its {len(roles)} patients trained the "
                         "model", hint="evaluate on patients the model has not seen (see split.json in the model folder)")
    mask = np.isin(patients, sorted(keep))
    return mask, {p: roles[p] for p in sorted(keep)}, trained


@dataclass
class EvaluateResult:
    """What ``cancernet evaluate`` did."""

    assessment: Assessment
    out_dir: Path
    files: list[Path]
    engine: str
    roles: dict[str, str]
    excluded_training: list[str]
    failures: list[Failure]


def evaluate(model_dir: str | os.PathLike, data: Sequence[str | os.PathLike], *, out_dir: str | os.PathLike | None = None,
             role: str = "held-out", engine: str = "auto", bootstrap: int = 1000, seed: int = 0,
             load_progress=None, score_progress=None) -> EvaluateResult:
    """Score labelled patch folders with a model and write the honest (held-out patients only) assessment."""
    from .engines import load_engine
    from .patches import load

    meta = read_meta(model_dir)
    require_raw_input(meta, model_dir)
    eng = load_engine(model_dir, engine)  # a broken model fails before any patch is read
    split = Split.from_dict(meta.split) if meta.split else Split((), ())
    if not meta.split:
        log.warning("%s records no split: every patient counts as unseen", model_dir)
    patches = load(data, progress=load_progress)
    if (patches.labels < 0).any():
        raise InputError("some patches have no label (not in a PATIENT/0 or PATIENT/1 folder)",
                         path=", ".join(map(str, data)), hint="evaluation needs the Kaggle layout PATIENT/{0,1}/*.png")
    mask, roles, trained = select_patients(patches.patients, split, role)
    if trained:
        log.info("left out %d patient(s) the model was trained on: %s", len(trained), ", ".join(trained[:20]))
    sub = patches.select(mask)
    prob = np.empty(len(sub), np.float32)
    step = 2048
    for start in range(0, len(sub), step):
        prob[start:start + step] = eng.predict(sub.tiles[start:start + step])
        if score_progress is not None:
            score_progress(min(step, len(sub) - start))
    a = assess(sub.patients, sub.labels, prob, meta.threshold, roles=roles, bootstrap=bootstrap, seed=seed)
    out = ModelFolder(model_dir).evaluation(out_dir)
    extra = {"model": {"model_dir": str(model_dir), "model_id": meta.model_id, "threshold": meta.threshold,
                       "threshold_rule": meta.threshold_rule, "engine": eng.name},
             "data": {"sources": [str(d) for d in data], "patients": len(roles), "patches": len(sub),
                      "roles": roles, "left_out_training_patients": trained, "failed_files": len(patches.failures)}}
    files = write_assessment(out, a, title=f"{role} patients", threshold=meta.threshold, classes=meta.classes,
                             extra=extra)
    if patches.failures:
        files.append(write_failures(out.failures, patches.failures))
    return EvaluateResult(a, out.root, files, eng.name, roles, trained, list(patches.failures))
