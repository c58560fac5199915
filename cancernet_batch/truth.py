"""Maps against a truth: Dice and counts of an input's IDC map against the truth file beside its slide.

Synthetic slides (``cancernet synth slides``) and slides rebuilt from real patches carry a truth on
the model grid (``NAME.truth.npz``); the demo and the benchmarks measure the slide path with it.
Kept apart from :mod:`cancernet_batch.aggregate` (the report's figures), which needs no truth.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .aggregate import REPORTED, _ratio, input_state, load_scored
from .errors import ConfigError, InputError


def dice(pred_mask: np.ndarray, truth_mask: np.ndarray) -> float:
    """Dice coefficient 2 |P ∩ T| / (|P| + |T|) of two boolean masks; 1.0 when both are empty."""
    p, t = np.asarray(pred_mask, bool), np.asarray(truth_mask, bool)
    if p.shape != t.shape:
        raise ConfigError(f"masks of different shapes {p.shape} and {t.shape}", hint="compare maps on the same grid")
    total = int(p.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total


@dataclass(frozen=True)
class MapAccuracy:
    """How a thresholded IDC map agrees with the truth, tile by tile."""

    dice: float
    tissue_dice: float  # scored tiles vs truth tissue: how well tiling found the tissue
    true_positive: int
    false_positive: int
    false_negative: int
    true_negative: int  # on the tissue union only
    sensitivity: float | None
    precision: float | None
    specificity: float | None


def compare_with_truth(idc_map: np.ndarray, truth, threshold: float) -> MapAccuracy:
    """Compare ``idc_map >= threshold`` with ``truth.idc`` (a :class:`~cancernet_batch.synth.SlideTruth`)."""
    m = np.asarray(idc_map, np.float32)
    if m.shape != truth.idc.shape:
        raise ConfigError(f"map grid {m.shape} differs from the truth grid {truth.idc.shape}",
                          hint=f"tile the slide at the truth's resolution, {truth.mpp} µm/px")
    scored = np.isfinite(m)
    pred = scored & (np.where(scored, m, 0.0) >= threshold)
    true = truth.idc
    union = scored | truth.tissue
    tp, fp, fn = int((pred & true).sum()), int((pred & ~true).sum()), int((~pred & true).sum())
    tn = int((union & ~pred & ~true).sum())
    return MapAccuracy(dice(pred, true), dice(scored, truth.tissue), tp, fp, fn, tn,
                       _ratio(tp, tp + fn), _ratio(tp, tp + fp), _ratio(tn, tn + fp))


def truth_path(source: str | os.PathLike) -> Path:
    """Where a synthetic slide's truth lies: ``NAME.truth.npz`` beside ``NAME.svs``."""
    p = Path(source)
    return p.with_name(f"{p.stem}.truth.npz")


def input_accuracy(run_dir: str | os.PathLike, gid: str, threshold: float) -> MapAccuracy:
    """Map accuracy of one scored input of a run against the truth file beside its source slide."""
    from .runfolder import Run
    from .synth import SlideTruth

    root = Run.of(run_dir).open_store("r")
    if "inputs" not in root or gid not in root["inputs"]:
        raise InputError(f"no input {gid} in this run", path=run_dir, hint="see the input ids in report/inputs.csv")
    group = root["inputs"][gid]
    status, note = input_state(group)
    if status != REPORTED:
        raise InputError(f"input {gid} is not scored ({note})", path=run_dir, hint="run `cancernet predict` first")
    scored = load_scored(gid, group, "")
    path = truth_path(scored.attrs.source)
    if not path.is_file():
        raise InputError("no truth file beside the slide", path=path, hint="only synthetic slides carry a truth")
    truth = SlideTruth.load(path)
    if not math.isclose(truth.mpp, scored.attrs.target_mpp):
        raise ConfigError(f"truth is at {truth.mpp} µm/px, the run at {scored.attrs.target_mpp}", path=path,
                          hint=f"tile at --mpp {truth.mpp}")
    return compare_with_truth(scored.idc_map(), truth, threshold)
