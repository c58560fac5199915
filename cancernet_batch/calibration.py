"""Probability calibration of IDC scores: temperature scaling and Platt scaling, fitted on logits.

A model trained with class weights (each class half of the loss) and stopped early is not
calibrated: its probability 0.7 need not mean 70 % IDC patches. Both methods map the model's
logit ``z`` (its pre-sigmoid output; for an ensemble or test-time augmentation the mean of the
members' logits) to ``sigmoid(a * z + b)``:

* **temperature** (Guo et al. 2017): ``a = 1 / T``, ``b = 0``; one parameter, keeps 0.5 at 0.5;
* **platt** (Platt 1999): ``a`` and ``b`` free; also corrects a shift of the prior (class weights).

Both minimise the (unweighted) negative log-likelihood of the labels, so the probabilities match the
class mix of the data they are fitted on (pooled out-of-fold predictions of ``cancernet train --cv``).
The pair ``(a, b)`` is stored in ``model.json`` (``scoring.calibration``) and baked into the exported
graph as its last layer (:class:`cancernet_batch.layers.CalibratedSigmoid`), so every engine
applies it identically. Plain numpy + scipy; no Keras.
"""

from __future__ import annotations

import numpy as np

from .config import CALIBRATIONS as METHODS  # ("none", "temperature", "platt")
IDENTITY = {"method": "none", "a": 1.0, "b": 0.0}
LOGIT_CLIP = 30.0
"""Logits beyond +-30 (probabilities within 1e-13 of 0 or 1) are clipped when fitting."""


def sigmoid(z) -> np.ndarray:
    z = np.asarray(z, np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def logit(p, eps: float = 1e-7) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def _nll(a: float, b: float, z: np.ndarray, y: np.ndarray) -> float:
    s = a * z + b
    return float(np.mean(np.logaddexp(0.0, s) - y * s))  # -log sigmoid(s) for y=1, -log(1-sigmoid(s)) for y=0


def fit(logits, y_true, method: str = "temperature") -> dict:
    """``{"method", "a", "b", "nll_before", "nll_after", "n"}`` minimising the NLL of ``sigmoid(a z + b)``.

    ``method`` ``none`` returns the identity. ValueError for an unknown method or labels of one class
    only (nothing to calibrate against).
    """
    from scipy.optimize import minimize

    if method not in METHODS:
        raise ValueError(f"unknown calibration {method!r}; use one of {', '.join(METHODS)}")
    z = np.clip(np.asarray(logits, np.float64).reshape(-1), -LOGIT_CLIP, LOGIT_CLIP)
    y = np.asarray(y_true, np.float64).reshape(-1)
    before = _nll(1.0, 0.0, z, y)
    if method == "none":
        return {**IDENTITY, "nll_before": before, "nll_after": before, "n": int(len(y))}
    if y.min() == y.max():
        raise ValueError("calibration needs labels of both classes")
    if method == "temperature":
        res = minimize(lambda v: _nll(np.exp(v[0]), 0.0, z, y), x0=[0.0], method="L-BFGS-B")
        a, b = float(np.exp(res.x[0])), 0.0
    else:
        res = minimize(lambda v: _nll(np.exp(v[0]), v[1], z, y), x0=[0.0, 0.0], method="L-BFGS-B")
        a, b = float(np.exp(res.x[0])), float(res.x[1])
    out = {"method": method, "a": a, "b": b, "nll_before": before, "nll_after": _nll(a, b, z, y), "n": int(len(y))}
    if method == "temperature":
        out["temperature"] = 1.0 / a
    return out


def apply(logits, calibration: dict | None) -> np.ndarray:
    """Calibrated probabilities ``sigmoid(a * z + b)`` (float64) of logits ``z``; identity when None."""
    c = calibration or IDENTITY
    return sigmoid(float(c.get("a", 1.0)) * np.asarray(logits, np.float64) + float(c.get("b", 0.0)))
