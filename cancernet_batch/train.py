"""``cancernet train``: patient-level split, uint8 data pipeline with augmentation, training, threshold, artefacts.

Memory: patches stay one ``(N, 50, 50, 3) uint8`` array (the full Kaggle set is about 2.1 GB);
:class:`PatchBatches` gathers, augments and weights one batch at a time, so nothing is ever held as
float32 beyond a batch. The model scales pixels itself.

Steps of :func:`train`: read the folders; check both classes; split by patient
(:mod:`cancernet_batch.split`) and save the split; fit with Adam, class weights (each class weighs
half of the training loss), the 8 flips / 90° rotations, mild brightness / contrast / colour jitter
and H&E stain jitter; before each validation, set batch norm's statistics exactly on a fixed sample
of training patches (:class:`~cancernet_batch.model.BatchNormCalibrator`); stop early on the
(class-weighted) validation loss, keeping the best epoch's weights; choose the decision threshold
on the validation patches (:data:`~cancernet_batch.metrics.THRESHOLD_RULE`); assess validation (and
test) patients; write the model folder and export ONNX.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import write_text
from .config import TrainConfig
from .errors import ConfigError, InputError
from .evaluate import Assessment, assess, write_assessment
from .failures import Failure, write_failures
from .figures import plot_curves
from .metrics import THRESHOLD_RULE, choose_threshold
from .model import (CLASSES, THRESHOLD_RULE_DEFAULT, BatchNormCalibrator, ModelMeta, build_cancernet, export_onnx,
                    jsonable, predict_tiles, save_model_dir)
from .modelfolder import ModelFolder
from .quiet import import_keras
from .split import Split, class_counts, make_split

keras = import_keras()
log = logging.getLogger(__name__)

BN_SAMPLES = 2048
"""Training patches (un-augmented, drawn once) whose exact statistics set batch norm before each validation."""


# ----------------------------------------------------------------------------------------------
# augmentation and batches
# ----------------------------------------------------------------------------------------------

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, residual), unit length, and their inverse.
_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float32)
_STAINS /= np.linalg.norm(_STAINS, axis=1, keepdims=True)
_UNSTAIN = np.linalg.inv(_STAINS).astype(np.float32)


def augment_batch(tiles: np.ndarray, rng: np.random.Generator, jitter: float = 0.08, stain: float = 0.0) -> np.ndarray:
    """A randomly transformed copy of a uint8 batch: one of the 8 flips/rotations each, and colour jitter.

    Colour jitter (per tile): contrast around the tile mean x U(1-j, 1+j), brightness + U(-j, j) * 255,
    per-channel gain x U(1-j/2, 1+j/2). With ``stain`` > 0, also H&E stain jitter (Tellez et al. 2019):
    in optical density, each stain's amount is scaled by U(1-s, 1+s) and shifted by U(-s, s) * 0.1.
    The result is uint8 again, as the model expects.
    """
    out = np.empty_like(tiles)
    k = rng.integers(0, 4, len(tiles))
    flip = rng.random(len(tiles)) < 0.5
    for i in range(len(tiles)):
        t = tiles[i][:, ::-1] if flip[i] else tiles[i]
        out[i] = np.rot90(t, k[i])
    if jitter <= 0 and stain <= 0:
        return out
    n = len(tiles)
    x = out.astype(np.float32)
    if stain > 0:
        od = -np.log((x + 1.0) / 256.0)
        conc = od @ _UNSTAIN
        scale = rng.uniform(1 - stain, 1 + stain, (n, 1, 1, 3)).astype(np.float32)
        shift = rng.uniform(-stain, stain, (n, 1, 1, 3)).astype(np.float32) * 0.1
        x = 256.0 * np.exp(-((conc * scale + shift) @ _STAINS)) - 1.0
    if jitter > 0:
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        contrast = rng.uniform(1 - jitter, 1 + jitter, (n, 1, 1, 1)).astype(np.float32)
        bright = rng.uniform(-jitter, jitter, (n, 1, 1, 1)).astype(np.float32) * 255
        gain = rng.uniform(1 - jitter / 2, 1 + jitter / 2, (n, 1, 1, 3)).astype(np.float32)
        x = ((x - mean) * contrast + mean + bright) * gain
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def class_weights(labels: np.ndarray) -> tuple[float, float]:
    """Weights that make each class count half of the loss: ``n / (2 * n_c)``."""
    n1 = int(np.sum(labels == 1))
    n0 = int(np.sum(labels == 0))
    n = n0 + n1
    return (n / (2 * n0) if n0 else 0.0, n / (2 * n1) if n1 else 0.0)


class PatchBatches(keras.utils.PyDataset):
    """Batches ``(uint8 tiles, float32 labels (B, 1), sample weights (B,))`` drawn from a uint8 tile array.

    ``index`` selects the patches (e.g. the training patients'); ``weights`` are per class. Shuffled
    per epoch and augmented per batch with a generator seeded by ``(seed, epoch, batch)``, so a run is
    reproducible whatever order the batches are fetched in. Runs in-process (one worker): the
    backend's own threads already use the cores.
    """

    def __init__(self, tiles: np.ndarray, labels: np.ndarray, index: np.ndarray, batch_size: int, *,
                 weights: tuple[float, float] = (1.0, 1.0), augment: bool = False, jitter: float = 0.08,
                 stain: float = 0.0, shuffle: bool = False, seed: int = 0) -> None:
        super().__init__(workers=1, use_multiprocessing=False)
        self.tiles, self.labels = tiles, labels
        self.index = np.asarray(index, np.int64)
        self.batch_size = int(batch_size)
        self.weights = np.asarray(weights, np.float32)
        self.augment, self.jitter, self.stain, self.shuffle, self.seed = augment, jitter, stain, shuffle, seed
        self.epoch = 0
        self._order = self._make_order()

    def _make_order(self) -> np.ndarray:
        if not self.shuffle:
            return self.index
        return np.random.default_rng([self.seed, self.epoch, 1]).permutation(self.index)

    def __len__(self) -> int:
        return math.ceil(len(self.index) / self.batch_size)

    def __getitem__(self, i: int):
        if i >= len(self):
            raise IndexError(i)
        idx = self._order[i * self.batch_size:(i + 1) * self.batch_size]
        x = self.tiles[idx]
        if self.augment:
            x = augment_batch(x, np.random.default_rng([self.seed, self.epoch, 2, i]), self.jitter, self.stain)
        y = self.labels[idx].astype(np.float32)
        return x, y.reshape(-1, 1), self.weights[self.labels[idx].astype(np.int64)]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._order = self._make_order()


# ----------------------------------------------------------------------------------------------
# progress
# ----------------------------------------------------------------------------------------------

class TrainProgress:
    """Hooks for showing progress; the library calls them and prints nothing itself. Override what you need."""

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        """``epoch`` is 1-based."""

    def batch_end(self) -> None:
        """One training batch done."""

    def epoch_end(self, epoch: int, logs: dict[str, float], seconds: float) -> None:
        """Epoch finished (validation included) with Keras' logs."""

    def fold_start(self, fold: int, folds: int, held_out: Sequence[str]) -> None:
        """Cross-validation (``--cv``): fold ``fold`` (1-based) of ``folds`` starts; ``held_out`` are its patients."""


def _callback(progress: TrainProgress, epochs: int, steps: int, times: list[float], calibrate=None):
    """Progress hooks and epoch timing; ``calibrate()`` runs before each validation (precise batch norm)."""

    class _Hooks(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            if calibrate is not None:
                calibrate()

        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.perf_counter()
            progress.epoch_start(epoch + 1, epochs, steps)

        def on_train_batch_end(self, batch, logs=None):
            progress.batch_end()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self._t
            times.append(seconds)
            logs = {k: float(v) for k, v in (logs or {}).items()}
            log.info("epoch %d/%d: %s (%.1f s)", epoch + 1, epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in sorted(logs.items())), seconds)
            progress.epoch_end(epoch + 1, logs, seconds)

    return _Hooks()


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What ``cancernet train`` produced."""

    meta: ModelMeta
    out_dir: Path
    split: Split
    history: dict[str, list[float]]
    val: Assessment
    test: Assessment | None
    epoch_seconds: list[float]
    failures: list[Failure]
    onnx: Path | None


def _predict(model, tiles: np.ndarray, index: np.ndarray, chunk: int = 4096) -> np.ndarray:
    out = np.empty(len(index), np.float32)
    for s in range(0, len(index), chunk):
        out[s:s + chunk] = predict_tiles(model, tiles[index[s:s + chunk]])
    return out


def _data_summary(data: Sequence, patches, counts: dict[str, tuple[int, int]], split: Split) -> dict:
    per_role = {}
    for role in ("train", "val", "test", "excluded"):
        side = getattr(split, role)
        per_role[role] = {"patients": len(side), "non-IDC": sum(counts[p][0] for p in side),
                          "IDC": sum(counts[p][1] for p in side)}
    return {"sources": [str(d) for d in data], "patients": len(counts), "patches": len(patches),
            "non-IDC": int((patches.labels == 0).sum()), "IDC": int((patches.labels == 1).sum()),
            "padded_edge_patches": patches.padded, "failed_files": len(patches.failures),
            "duplicates": len(patches.duplicates), "per_role": per_role,
            "per_patient": {p: {"non-IDC": c[0], "IDC": c[1]} for p, c in counts.items()}}


def _load_labelled(data: Sequence[str | os.PathLike], load_progress=None):
    """Patches of ``data`` with 0/1 labels of both classes, else InputError."""
    from .patches import load

    patches = load(data, progress=load_progress)
    where = ", ".join(map(str, data))
    if (patches.labels < 0).any():
        raise InputError("some patches have no label (they are not in PATIENT/0 or PATIENT/1 folders)", path=where,
                         hint="training needs the Kaggle layout PATIENT/{0,1}/*.png")
    n0, n1 = int((patches.labels == 0).sum()), int((patches.labels == 1).sum())
    if n0 == 0 or n1 == 0:
        have, lack = ("IDC (class 1)", "non-IDC (class 0)") if n0 == 0 else ("non-IDC (class 0)", "IDC (class 1)")
        raise InputError(f"the data holds only {have} patches ({n0 + n1}), no {lack}", path=where,
                         hint="training needs both classes: give patient folders with both 0/ and 1/ patches")
    return patches


def _stain_normalise(patches, config: TrainConfig) -> dict:
    """Replace ``patches.tiles`` by their per-patient stain-normalised copy (``config.stain_norm``); returns the record.

    Each patient's statistics come from its own pixels only (no labels, no other patient), so a held-out
    patient of a fold is normalised exactly as it would be alone (:mod:`cancernet_batch.stain`).
    """
    if config.stain_norm == "none":
        return {}
    from .stain import normalise_by_patient

    t0 = time.perf_counter()
    patches.tiles, per_patient = normalise_by_patient(patches.tiles, patches.patients, config.stain_norm)
    skipped = sorted(p for p, v in per_patient.items() if v is None)
    if skipped:
        log.warning("stain normalisation: too little tissue to estimate from in %s; left as they are", ", ".join(skipped))
    log.info("stain-normalised (%s) %d patients in %.1f s", config.stain_norm, len(per_patient),
             time.perf_counter() - t0)
    return {"method": config.stain_norm, "statistics_from": "each patient's own pixels (a fixed-seed sample), no labels",
            "not_normalised": skipped, "per_patient": per_patient}


def _fit(model, patches, idx: dict[str, np.ndarray], config: TrainConfig, progress: TrainProgress, *,
         early_stopping: bool = True):
    """Compile and fit; returns (history, epoch seconds, class weights, batches per epoch).

    Without ``early_stopping`` the model trains for ``config.epochs`` epochs and keeps the last; the
    validation patches (if any) are then only monitored (cross-validation: nothing is chosen on them).
    Batch norm is calibrated on the training sample before each validation and once more at the end.
    """
    labels = patches.labels
    weights = class_weights(labels[idx["train"]]) if config.class_weights else (1.0, 1.0)
    train_batches = PatchBatches(patches.tiles, labels, idx["train"], config.batch_size, weights=weights,
                                 augment=config.augment, jitter=config.jitter, stain=config.stain_jitter, shuffle=True,
                                 seed=config.seed)
    val_batches = None
    if len(idx.get("val", ())):
        val_weights = class_weights(labels[idx["val"]]) if config.class_weights else (1.0, 1.0)
        val_batches = PatchBatches(patches.tiles, labels, idx["val"], max(config.batch_size, 128),
                                   weights=tuple(w if w > 0 else 1.0 for w in val_weights))
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss=keras.losses.BinaryCrossentropy(),
                  metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")])
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True)
    calib = np.random.default_rng([config.seed, 3]).choice(idx["train"], min(BN_SAMPLES, len(idx["train"])),
                                                           replace=False)
    calibrator = BatchNormCalibrator(model)
    times: list[float] = []
    hooks = _callback(progress, config.epochs, len(train_batches), times,
                      lambda: calibrator(patches.tiles[np.sort(calib)]))
    log.info("training on %d patches, validating on %d; class weights %.3f / %.3f",
             len(idx["train"]), len(idx.get("val", ())), *weights)
    fit = model.fit(train_batches, validation_data=val_batches, epochs=config.epochs, shuffle=False, verbose=0,
                    callbacks=[stopper, hooks] if early_stopping else [hooks])
    if not early_stopping:
        calibrator(patches.tiles[np.sort(calib)])  # the kept (last) weights' exact batch-norm statistics
    history = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
    return history, times, weights, len(train_batches)


def _wrap_single(model, val_tiles: np.ndarray, val_labels: np.ndarray, config: TrainConfig):
    """One-split training with ``--tta`` / ``--calibrate``: the scoring model and its ``scoring`` record.

    The calibration is fitted on the validation patients' logits (which also choose the threshold and
    the stopping epoch); with one class only there, it stays the identity, with a warning.
    """
    from . import calibration as cal
    from .cv import member_logits
    from .layers import scoring_model

    c = dict(cal.IDENTITY)
    if config.calibrate != "none":
        z = member_logits([model], val_tiles, tta=config.tta)
        try:
            c = cal.fit(z, val_labels, config.calibrate)
        except ValueError:
            log.warning("the validation patients have one class only: no calibration fitted")
    scoring = {"members": 1, "member_kind": "one model", "tta": bool(config.tta), "combine": "mean logit",
               "calibration": {k: v for k, v in c.items() if k in ("method", "a", "b", "temperature", "nll_before",
                                                                    "nll_after", "n")},
               "calibration_fitted_on": f"validation patients' logits ({len(val_labels)} patches)"}
    return scoring_model([model], tta=config.tta, calibration=c), scoring


def _input_field(config: TrainConfig) -> dict:
    """``ModelMeta.input`` for a model trained on stain-normalised patches (empty: the default raw input)."""
    if config.stain_norm == "none":
        return {}
    return {"input": f"RGB uint8 (N, 50, 50, 3), each patient's patches stain-normalised ({config.stain_norm}, "
                     "cancernet_batch.stain) with that patient's own statistics; scaling is inside the model"}


def _save_and_export(model, out: Path, meta: ModelMeta, export: bool) -> tuple[ModelMeta, Path | None]:
    """Write the model folder (model.json last but the ONNX: it marks a finished model), then the ONNX
    graph when asked; a failed export is a warning, since the Keras model is complete without it."""
    meta = save_model_dir(model, out, meta)
    onnx = None
    if export:
        try:
            onnx = export_onnx(out)
        except Exception as exc:  # noqa: BLE001 - the Keras model is complete; ONNX is an extra
            log.warning("ONNX export failed; `cancernet export %s` can retry: %s", out, exc)
    return meta, onnx


def _start(data, out_dir, config: TrainConfig, overwrite: bool, load_progress):
    """What training and cross-validation start from: the model folder (a ConfigError when it holds a trained model,
    unless ``overwrite``), the labelled patches, their stain record (each patient normalised from its own pixels
    only, so a held-out patient is normalised exactly as it would be alone) and the class counts per patient:
    ``(out, ModelFolder, patches, stain_record, counts)``."""
    out = Path(out_dir)
    mf = ModelFolder(out)
    if mf.meta.exists() and not overwrite:
        raise ConfigError("already holds a trained model", path=out, hint="choose another --out, or pass --overwrite")
    patches = _load_labelled(data, load_progress)
    stain_record = _stain_normalise(patches, config)
    return out, mf, patches, stain_record, class_counts(patches.patients, patches.labels)


def train(data: Sequence[str | os.PathLike], out_dir: str | os.PathLike, config: TrainConfig | None = None, *,
          progress: TrainProgress | None = None, load_progress=None, overwrite: bool = False) -> TrainResult:
    """Train CancerNet on Kaggle-layout patch folders and write the model folder ``out_dir``."""
    config = config or TrainConfig()
    if config.cv:
        from .cv import train_cv

        return train_cv(data, out_dir, config, progress=progress, load_progress=load_progress, overwrite=overwrite)
    out, mf, patches, stain_record, counts = _start(data, out_dir, config, overwrite, load_progress)
    split = make_split(counts, split_file=config.split_file, val_fraction=config.val_fraction,
                       test_fraction=config.test_fraction, seed=config.seed)
    for role in ("train", "val", "test"):
        if getattr(split, role):
            log.info("%s: %d patients (%s)", role, len(getattr(split, role)), ", ".join(getattr(split, role)))
    out.mkdir(parents=True, exist_ok=True)
    split.save(mf.split)

    keras.utils.set_random_seed(config.seed)
    idx = {role: np.flatnonzero(np.isin(patches.patients, getattr(split, role))) for role in ("train", "val", "test")}
    model = build_cancernet(config.width, config.dropout, config.separable, seed=config.seed)
    history, times, weights, steps = _fit(model, patches, idx, config, progress or TrainProgress())
    best_epoch = int(np.argmin(history["val_loss"])) + 1

    labels, roles = patches.labels, split.roles()
    scoring = {}
    if config.tta or config.calibrate != "none":  # the exported model: TTA and/or calibration fitted on validation
        model, scoring = _wrap_single(model, patches.tiles[idx["val"]], labels[idx["val"]], config)
    val_prob = _predict(model, patches.tiles, idx["val"])
    threshold = choose_threshold(labels[idx["val"]], val_prob)
    rule = THRESHOLD_RULE if threshold is not None else THRESHOLD_RULE_DEFAULT
    threshold = 0.5 if threshold is None else threshold
    val = assess(patches.patients[idx["val"]], labels[idx["val"]], val_prob, threshold, roles=roles,
                 bootstrap=config.bootstrap, seed=config.seed)
    test = None
    if len(idx["test"]):
        test = assess(patches.patients[idx["test"]], labels[idx["test"]], _predict(model, patches.tiles, idx["test"]),
                      threshold, roles=roles, bootstrap=config.bootstrap, seed=config.seed)

    plot_curves(history, mf.curves, best_epoch=best_epoch)
    write_assessment(mf.val, val, title="validation patients", threshold=threshold, report=False)
    if test is not None:
        write_assessment(mf.test, test, title="test patients", threshold=threshold, report=False)
    write_failures(mf.failures, patches.failures)
    training = {"config": config.to_dict(), "epochs_run": len(history["loss"]), "best_epoch": best_epoch,
                "stopped_early": len(history["loss"]) < config.epochs, "class_weights": list(weights),
                "seconds_per_epoch": float(np.mean(times)) if times else None, "epoch_seconds": times,
                "train_patches": int(len(idx["train"])), "batches_per_epoch": steps,
                "backend": keras.backend.backend(), "cpu_count": os.cpu_count(),
                **({"stain_norm": stain_record} if stain_record else {})}
    full = {"threshold": threshold, "threshold_rule": rule, "history": history, "training": training,
            "val": val.to_dict(), **({"test": test.to_dict()} if test is not None else {})}
    write_text(mf.metrics, json.dumps(jsonable(full), indent=2, allow_nan=False) + "\n")
    meta = ModelMeta(mpp=config.mpp, threshold=threshold, threshold_rule=rule, classes=CLASSES, width=config.width,
                     separable=config.separable, split=split.to_dict(), **_input_field(config),
                     data=_data_summary(data, patches, counts, split),
                     metrics={"val": val.summary(), **({"test": test.summary()} if test is not None else {})},
                     training=training, scoring=scoring)
    meta, onnx = _save_and_export(model, out, meta, config.export_onnx)
    return TrainResult(meta, out, split, history, val, test, times, list(patches.failures), onnx)
