"""``cancernet train --cv K``: K-fold cross-validation over patients, calibration, and the exported ensemble.

Steps of :func:`train_cv`:

1. **Folds by patient** (:func:`cancernet_batch.split.cv_folds`): every patient is held out by
   exactly one fold; no patient is ever in a fold's training and held-out sets.
2. **One model per fold**, trained ``epochs`` epochs on the other folds' patients (no early
   stopping: nothing is chosen on the held-out patients; their loss is only monitored for the
   curves). Each fold's model is a complete model folder ``folds/foldK`` whose ``split.json``
   names its training and held-out patients, so ``cancernet evaluate folds/foldK DATA`` scores
   its held-out patients only.
3. **Out-of-fold logits** of every patch from the model that never saw its patient, without and
   with test-time augmentation (the 8 flips / rotations).
4. **Honest pooled metrics** (``cv`` in ``model.json`` and ``metrics.json``): for each fold, the
   calibration and the decision threshold are fitted on the *other* folds' out-of-fold
   predictions (cross-fitting) and applied to its own; then patch- and patient-level metrics with
   patient-bootstrap intervals (:func:`cancernet_batch.evaluate.assess`), per fold and pooled, and
   the expected calibration error before and after, for each variant (single model / TTA) and each
   calibration (none / temperature / Platt).
5. **The exported model** (:func:`cancernet_batch.layers.scoring_model`): the K fold models
   averaged (``ensemble``; else one model retrained on all patients for the same epochs), with
   TTA if asked, and the calibration fitted on *all* pooled out-of-fold logits baked in as its last
   layer; the threshold maximises Youden's J on the pooled calibrated out-of-fold probabilities.
   One ``model.keras`` and one ``model.onnx``: every engine scores the variant in one pass and
   gives the same calibrated probability.

What cross-validation measures is *one fold model* (with or without TTA) on unseen patients. The
exported ensemble cannot be scored out of fold (each member saw 4/5 of the patients); averaging
models is expected to be at least as accurate, but its calibration was fitted on single models'
logits (averaging logits of similar models changes their scale little; see ``training/RESULTS.md``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import calibration as cal
from .atomic import atomic_path, write_text
from .config import TrainConfig
from .evaluate import Assessment, assess, write_assessment
from .failures import Failure, write_failures
from .figures import plot_curves, plot_reliability
from .metrics import choose_threshold, expected_calibration_error, reliability
from .model import CLASSES, ModelMeta, build_cancernet, jsonable, predict_tiles, save_model_dir
from .quiet import import_keras
from .split import Split, cv_folds

keras = import_keras()
log = logging.getLogger(__name__)

VARIANTS = ("single", "tta")
CV_THRESHOLD_RULE = ("maximises Youden's J (balanced accuracy) on the pooled out-of-fold calibrated probabilities "
                     "of {k}-fold cross-validation over patients; a patch is IDC when p >= threshold")


@dataclass
class CVResult:
    """What ``cancernet train --cv`` produced (``val`` is the pooled out-of-fold assessment of the chosen variant)."""

    meta: ModelMeta
    out_dir: Path
    split: Split
    folds: list[tuple[str, ...]]
    history: dict[str, list[float]]
    val: Assessment
    test: None
    per_fold: list[Assessment]
    cv: dict
    epoch_seconds: list[float]
    failures: list[Failure]
    onnx: Path | None


def member_logits(models: Sequence, tiles: np.ndarray, *, tta: bool, chunk: int = 4096) -> np.ndarray:
    """Mean logit of ``models`` (over the 8 transforms with ``tta``) for uint8 tiles, float64 ``(N,)``."""
    from .layers import scoring_model

    net = scoring_model(models, tta=tta, logits=True)
    out = np.empty(len(tiles), np.float64)
    for s in range(0, len(tiles), chunk):
        out[s:s + chunk] = predict_tiles(net, tiles[s:s + chunk], batch_size=256 if not tta else 64)
    return out


def cross_fit(z: np.ndarray, y: np.ndarray, fold_of: np.ndarray, k: int, method: str) -> tuple[np.ndarray, np.ndarray, list]:
    """Calibrated probabilities and per-patch thresholds where fold ``f``'s come from fits on the other folds only.

    Returns ``(prob, threshold per patch, [calibration of each fold])``. A fold whose other folds lack a
    class keeps the identity calibration and threshold 0.5.
    """
    prob = np.empty(len(z), np.float64)
    thr = np.empty(len(z), np.float64)
    fits = []
    for f in range(k):
        own, rest = fold_of == f, fold_of != f
        try:
            c = cal.fit(z[rest], y[rest], method)
        except ValueError:
            c = dict(cal.IDENTITY)
        t = choose_threshold(y[rest], cal.apply(z[rest], c))
        prob[own] = cal.apply(z[own], c)
        thr[own] = 0.5 if t is None else t
        fits.append({k2: v for k2, v in c.items() if k2 in ("method", "a", "b")} | {"threshold": thr[own][0] if own.any() else None})
    return prob, thr, fits


def _variant_summary(a: Assessment, ece_before: float) -> dict:
    keys = ("balanced_accuracy", "accuracy", "f1", "precision", "recall", "specificity", "roc_auc", "ece", "confusion")
    return {**{k: a.patch[k] for k in keys}, "ece_uncalibrated": ece_before,
            "ci": {k: a.ci.get(k) for k in ("balanced_accuracy", "f1", "roc_auc", "ece")},
            "patient": {k: a.patient[k] for k in ("patient_mean_accuracy", "idc_fraction_mae", "idc_fraction_correlation")}}


def train_cv(data: Sequence[str | os.PathLike], out_dir: str | os.PathLike, config: TrainConfig, *, progress=None,
             load_progress=None, overwrite: bool = False) -> CVResult:
    """K-fold cross-validation over patients, then the calibrated (ensemble / TTA) model; see the module doc."""
    from .train import TrainProgress, _data_summary, _fit, _input_field, _save_and_export, _start

    progress = progress or TrainProgress()
    out, mf, patches, stain_record, counts = _start(data, out_dir, config, overwrite, load_progress)
    k = config.cv
    folds = cv_folds(counts, k, config.seed)
    everyone = tuple(sorted(counts))
    out.mkdir(parents=True, exist_ok=True)
    labels, pids = patches.labels, patches.patients
    fold_of = np.full(len(labels), -1, np.int64)
    for f, held in enumerate(folds):
        fold_of[np.isin(pids, held)] = f
    assert (fold_of >= 0).all()

    z = {v: np.full(len(labels), np.nan) for v in VARIANTS}
    models, histories, fold_info, times_all = [], [], [], []
    for f, held in enumerate(folds):
        progress.fold_start(f + 1, k, held)
        train_p = tuple(p for p in everyone if p not in held)
        split_f = Split(train_p, tuple(held), method=f"cross-validation fold {f + 1} of {k} over patients "
                                                     f"(stratified by IDC ratio, seed {config.seed})")
        idx = {"train": np.flatnonzero(fold_of != f), "val": np.flatnonzero(fold_of == f)}
        assert not set(pids[idx["train"]]) & set(pids[idx["val"]]), "a patient on both sides of a fold"
        log.info("fold %d/%d: held out %s", f + 1, k, ", ".join(held))
        keras.utils.set_random_seed(config.seed + f)
        model = build_cancernet(config.width, config.dropout, config.separable, seed=config.seed + f)
        t0 = time.perf_counter()
        # no validation pass per epoch: nothing is chosen on the held-out patients, and on a small CPU the
        # per-epoch batch-norm calibration and scoring would cost a third of the time; they are scored once below
        history, times, weights, steps = _fit(model, patches, {"train": idx["train"]}, config, progress,
                                              early_stopping=False)
        fit_s = time.perf_counter() - t0
        times_all += times
        held_tiles = patches.tiles[idx["val"]]
        t0 = time.perf_counter()
        z["single"][idx["val"]] = member_logits([model], held_tiles, tta=False)
        z["tta"][idx["val"]] = member_logits([model], held_tiles, tta=True)
        score_s = time.perf_counter() - t0
        fold_mf = mf.fold(f + 1)
        fold_mf.root.mkdir(parents=True, exist_ok=True)
        split_f.save(fold_mf.split)
        plot_curves(history, fold_mf.curves, best_epoch=len(history["loss"]))
        info = {"fold": f + 1, "held_out": list(held), "train_patients": len(train_p),
                "train_patches": int(len(idx["train"])), "held_out_patches": int(len(idx["val"])),
                "epochs_run": len(history["loss"]), "class_weights": list(weights), "batches_per_epoch": steps,
                "fit_seconds": fit_s, "oof_scoring_seconds": score_s, "history": history}
        save_model_dir(model, fold_mf.root, ModelMeta(mpp=config.mpp, classes=CLASSES, width=config.width,
                                                  separable=config.separable, split=split_f.to_dict(),
                                                  **_input_field(config), training={"config": config.to_dict(), "cv_fold": info}))
        models.append(model)
        histories.append(history)
        fold_info.append(info)

    # ---- out-of-fold metrics: cross-fitted calibration and threshold, every variant x calibration
    y = labels.astype(np.int8)
    roles = {p: f"fold{f + 1}" for f, held in enumerate(folds) for p in held}
    variants: dict[str, dict] = {}
    chosen_v = "tta" if config.tta else "single"
    chosen = None
    for v in VARIANTS:
        raw = cal.sigmoid(z[v])
        ece_raw = expected_calibration_error(y, raw)
        for method in cal.METHODS:
            prob, thr, fits = cross_fit(z[v], y, fold_of, k, method)
            is_chosen = v == chosen_v and method == config.calibrate
            a = assess(pids, y, prob, thr, roles=roles, bootstrap=config.bootstrap if is_chosen else min(
                config.bootstrap, 200), seed=config.seed)
            variants[f"{v}/{method}"] = {**_variant_summary(a, ece_raw), "per_fold_calibration": fits}
            if is_chosen:
                chosen = (a, prob, thr)
    a_oof, prob_oof, thr_oof = chosen
    per_fold = [assess(pids[fold_of == f], y[fold_of == f], prob_oof[fold_of == f], thr_oof[fold_of == f],
                       roles=roles, bootstrap=config.bootstrap, seed=config.seed) for f in range(k)]

    # ---- the exported model: members, TTA, calibration fitted on all pooled out-of-fold logits
    final_cal = cal.fit(z[chosen_v], y, config.calibrate)
    final_prob = cal.apply(z[chosen_v], final_cal)
    threshold = choose_threshold(y, final_prob)
    threshold = 0.5 if threshold is None else threshold
    if config.ensemble:
        members, kind = models, f"the {k} fold models"
    else:
        progress.fold_start(k + 1, k + 1, ())
        keras.utils.set_random_seed(config.seed + k)
        one = build_cancernet(config.width, config.dropout, config.separable, seed=config.seed + k)
        _fit(one, patches, {"train": np.arange(len(labels))}, config, progress, early_stopping=False)
        members, kind = [one], "one model retrained on all patients"
    from .layers import scoring_model

    final = scoring_model(members, tta=config.tta, calibration=final_cal)
    split = Split(everyone, (), method=f"{k}-fold cross-validation over patients (stratified by IDC ratio, seed "
                                       f"{config.seed}); the exported model trained on every patient")
    split_dict = {**split.to_dict(), "folds": [list(h) for h in folds]}
    write_text(mf.split, json.dumps(split_dict, indent=2) + "\n")

    # ---- report: pooled and per-fold figures, reliability diagram, metrics.json
    mf.cv.root.mkdir(parents=True, exist_ok=True)
    with atomic_path(mf.cv_oof) as tmp:  # out-of-fold logits: re-fit calibrations without re-training
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, patient=pids.astype(str), label=y, fold=fold_of + 1, logit_single=z["single"],
                                logit_tta=z["tta"])
    write_assessment(mf.cv, a_oof, title=f"out-of-fold ({chosen_v}, {config.calibrate})", threshold=thr_oof,
                     report=False)
    for f, a in enumerate(per_fold):
        write_assessment(mf.fold(f + 1).held_out, a, title=f"fold {f + 1} held out",
                         threshold=thr_oof[fold_of == f], report=False)
    curves = {"uncalibrated": cal.sigmoid(z[chosen_v])}
    for m in ("temperature", "platt"):
        curves[f"{m} (cross-fitted)"] = cross_fit(z[chosen_v], y, fold_of, k, m)[0]
    curves = {label: {**reliability(y, p), "ece": expected_calibration_error(y, p)} for label, p in curves.items()}
    plot_reliability(curves, mf.cv_reliability,
                     title=f"out-of-fold reliability, {k} folds ({chosen_v})")
    plot_curves(_mean_history(histories), mf.curves, best_epoch=config.epochs)
    write_failures(mf.failures, patches.failures)

    cv_summary = {
        "folds": k, "method": split.method, "held_out": [list(h) for h in folds],
        "measures": "each patch scored by the fold model that never saw its patient; calibration and threshold of "
                    "each fold fitted on the other folds' out-of-fold predictions (cross-fitted)",
        "variant": chosen_v, "calibration": config.calibrate,
        "pooled": a_oof.summary(),
        "per_fold": [{"fold": f + 1, "held_out": list(folds[f]), **per_fold[f].summary()} for f in range(k)],
        "variants": variants,
        "ece_uncalibrated": float(curves["uncalibrated"]["ece"]),
    }
    scoring = {"members": len(members), "member_kind": kind, "tta": bool(config.tta), "combine": "mean logit",
               "calibration": {kk: final_cal[kk] for kk in final_cal if kk in ("method", "a", "b", "temperature",
                                                                                  "nll_before", "nll_after", "n")},
               "calibration_fitted_on": f"pooled out-of-fold logits ({chosen_v}) of {len(y)} patches, {k} folds"}
    training = {"config": config.to_dict(), "epochs_run": config.epochs, "best_epoch": config.epochs,
                "stopped_early": False, "folds": [{kk: v for kk, v in fi.items() if kk != "history"} for fi in fold_info],
                "seconds_per_epoch": float(np.mean(times_all)) if times_all else None, "epoch_seconds": times_all,
                "backend": keras.backend.backend(), "cpu_count": os.cpu_count(),
                **({"stain_norm": stain_record} if stain_record else {})}
    full = {"threshold": threshold, "threshold_rule": CV_THRESHOLD_RULE.format(k=k), "cv": {
        **cv_summary, "pooled": a_oof.to_dict(), "per_fold": [{"fold": f + 1, **per_fold[f].to_dict()} for f in range(k)],
        "reliability": curves}, "scoring": scoring, "training": training,
        "histories": histories}
    write_text(mf.metrics, json.dumps(jsonable(full), indent=2, allow_nan=False) + "\n")
    data_summary = _data_summary(data, patches, counts, split)
    meta = ModelMeta(mpp=config.mpp, threshold=threshold, threshold_rule=CV_THRESHOLD_RULE.format(k=k), classes=CLASSES,
                     width=config.width, separable=config.separable, split=split_dict, data=data_summary,
                     **_input_field(config),
                     metrics={"cv": cv_summary}, training=training, scoring=scoring)
    meta, onnx = _save_and_export(final, out, meta, config.export_onnx)
    return CVResult(meta, out, split, folds, _mean_history(histories), a_oof, None, per_fold, cv_summary, times_all,
                    list(patches.failures), onnx)


def _mean_history(histories: list[dict]) -> dict[str, list[float]]:
    """Per-epoch mean over the folds of each logged quantity (``val_*``: the held-out patients, monitored only)."""
    keys = set.intersection(*(set(h) for h in histories)) if histories else set()
    return {key: list(np.mean([h[key] for h in histories], axis=0)) for key in sorted(keys)}
