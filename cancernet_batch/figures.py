"""Training and evaluation figures (PNG), drawn with matplotlib's object API (no pyplot, no global state).

Every figure is written atomically, so a reader never sees half a PNG.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .atomic import atomic_path


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, path: str | os.PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def plot_curves(history: dict[str, Sequence[float]], path: str | os.PathLike, *, best_epoch: int | None = None) -> Path:
    """Loss, accuracy and AUC per epoch, training vs validation (``history`` as Keras returns it)."""
    fig = _figure(12, 3.6)
    axes = fig.subplots(1, 3)
    for ax, key, title in zip(axes, ("loss", "accuracy", "auc"), ("loss (class-weighted)", "accuracy", "ROC AUC")):
        for prefix, label, style in (("", "train", "-o"), ("val_", "validation", "-s")):
            values = history.get(prefix + key)
            if values:
                ax.plot(np.arange(1, len(values) + 1), values, style, label=label, markersize=4)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"kept (epoch {best_epoch})")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_confusion(confusion: Sequence[Sequence[float]], classes: Sequence[str], path: str | os.PathLike,
                   *, title: str = "") -> Path:
    """Confusion matrix: counts, and the share of each true class (row) in brackets."""
    cm = np.asarray(confusion, np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig = _figure(4.6, 4.0)
    ax = fig.subplots()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]:.0f}\n({share[i, j]:.1%})", ha="center", va="center",
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(classes)), [f"predicted\n{c}" for c in classes])
    ax.set_yticks(range(len(classes)), [f"true\n{c}" for c in classes])
    ax.set_title(title or "confusion matrix")
    return _save(fig, path)


def plot_roc(y_true, prob, path: str | os.PathLike, *, threshold, auc: float | None = None) -> Path:
    """ROC curve with the operating point at ``threshold`` marked."""
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(prob, np.float64)
    fig = _figure(4.6, 4.2)
    ax = fig.subplots()
    if y.any() and (~y).any():
        order = np.argsort(-p, kind="stable")
        tpr = np.concatenate([[0], np.cumsum(y[order]) / y.sum()])
        fpr = np.concatenate([[0], np.cumsum(~y[order]) / (~y).sum()])
        ax.plot(fpr, tpr, label=f"ROC (AUC {auc:.3f})" if auc is not None else "ROC")
        thr = np.asarray(threshold, np.float64)  # one number, or one per patch (per-fold thresholds)
        pred = p >= thr
        ax.plot([(pred & ~y).sum() / (~y).sum()], [(pred & y).sum() / y.sum()], "o", color="C3",
                label=f"threshold {float(thr):.3f}" if thr.ndim == 0 else "per-fold thresholds")
    else:
        ax.text(0.5, 0.5, "one class only:\nROC undefined", ha="center", va="center")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_patients(rows, path: str | os.PathLike) -> Path:
    """True vs predicted IDC fraction per patient (one labelled point each) and per-patient accuracy."""
    fig = _figure(10, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    true_f = [r.true_idc_fraction for r in rows]
    pred_f = [r.pred_idc_fraction for r in rows]
    ax1.plot([0, 1], [0, 1], ":", color="grey")
    ax1.scatter(true_f, pred_f, s=[10 + 60 * np.sqrt(r.n / max(x.n for x in rows)) for r in rows], alpha=0.7)
    for r in rows:
        ax1.annotate(r.patient, (r.true_idc_fraction, r.pred_idc_fraction), fontsize=7,
                     xytext=(3, 3), textcoords="offset points")
    ax1.set_xlim(-0.05, 1.05)
    ax1.set_ylim(-0.05, 1.05)
    ax1.set_xlabel("true IDC fraction")
    ax1.set_ylabel("predicted IDC fraction")
    ax1.set_title("IDC fraction per patient")
    names = [r.patient for r in rows]
    ax2.bar(range(len(rows)), [r.accuracy for r in rows], color=["C1" if 0 < r.n_idc < r.n else "C0" for r in rows])
    ax2.set_xticks(range(len(rows)), names, rotation=60, fontsize=7)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("accuracy")
    ax2.set_title("accuracy per patient (orange: both classes)")
    return _save(fig, path)


def plot_reliability(curves: dict[str, dict], path: str | os.PathLike, *, title: str = "") -> Path:
    """Reliability diagram: IDC share against mean probability per bin, one line per curve, with each curve's ECE.

    ``curves``: ``{label: {"mean_prob", "frac_idc", "count", "ece"}}`` as :func:`cancernet_batch.metrics.reliability`
    gives them (plus the ECE). Below: the patch count per bin of the first curve.
    """
    fig = _figure(5.2, 5.6)
    ax, hist = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    for i, (label, c) in enumerate(curves.items()):
        m = np.asarray(c["count"]) > 0
        ax.plot(np.asarray(c["mean_prob"])[m], np.asarray(c["frac_idc"])[m], "-o", markersize=4, color=f"C{i}",
                label=f"{label} (ECE {c['ece']:.3f})")
    first = next(iter(curves.values()))
    edges = np.linspace(0, 1, len(first["count"]) + 1)
    hist.bar(edges[:-1], first["count"], width=np.diff(edges), align="edge", color="C0", alpha=0.6)
    hist.set_ylabel("patches")
    hist.set_xlabel("predicted IDC probability")
    ax.set_ylabel("share of IDC patches")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title or "reliability")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)
