"""Markdown tables of a ``cancernet train --cv`` model folder, for ``training/RESULTS.md``.

Reads what the run wrote (``metrics.json``, ``model.json``, ``cv/oof.npz``) and prints, for the run's
own variant: the pooled out-of-fold figures with their patient-bootstrap intervals, one row per fold
(held-out patients, class counts, balanced accuracy, F1, AUC, and the expected calibration error
before and after each cross-fitted calibration), every variant x calibration, and the worst patients.
The per-fold ECEs are recomputed from the stored out-of-fold logits with the same cross-fitting as
the run (:func:`cancernet_batch.cv.cross_fit`), so nothing here is typed in by hand.

    python training/cv_tables.py RUN_DIR [RUN_DIR ...]
    python training/cv_tables.py --row 8863 RUN_DIR [RUN_DIR ...]   # one summary row per run

With ``--row PATIENT``: the figures of the runs table (pooled balanced accuracy, AUC, ECE with intervals,
the cross-fitted temperature / Platt ECE) and those of the fold that holds out PATIENT, and the share of
PATIENT's patches called IDC against the truth.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cancernet_batch import calibration as cal
from cancernet_batch.cv import cross_fit
from cancernet_batch.metrics import expected_calibration_error
from cancernet_batch.modelfolder import ModelFolder


def _f(v, nd: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}f}"


def _ci(ci: dict | None) -> str:
    return f"({_f(ci['low'])}-{_f(ci['high'])})" if ci and ci.get("low") is not None else ""


def tables(run: Path) -> str:
    mf = ModelFolder(run)
    metrics = json.loads(mf.metrics.read_text())
    meta = json.loads(mf.meta.read_text())
    cfg = meta["training"]["config"]
    cv = metrics["cv"]
    variant, method = cv["variant"], cv["calibration"]
    counts = meta["data"]["per_patient"]
    oof = np.load(mf.cv_oof)
    y, fold = oof["label"].astype(int), oof["fold"] - 1
    k = int(cv["folds"])
    lines = [f"### `{run.name}`: width {cfg['width']}, {cfg['epochs']} epochs, stain jitter {cfg['stain_jitter']}, "
             f"stain normalisation {cfg.get('stain_norm', 'none')}, seed {cfg['seed']}, variant {variant}, "
             f"calibration {method}", ""]
    pooled = cv["pooled"]
    p, ci = pooled["patch"], pooled["ci"]
    lines += [f"Pooled out-of-fold ({p['n']} patches): balanced accuracy **{_f(p['balanced_accuracy'])}** "
              f"{_ci(ci.get('balanced_accuracy'))}, F1 (IDC) {_f(p['f1'])} {_ci(ci.get('f1'))}, ROC AUC "
              f"**{_f(p['roc_auc'])}** {_ci(ci.get('roc_auc'))}, ECE **{_f(p['ece'])}** {_ci(ci.get('ece'))} "
              f"(uncalibrated {_f(cv['ece_uncalibrated'])}); sensitivity {_f(p['recall'])}, specificity "
              f"{_f(p['specificity'])}; confusion `{p['confusion']}`.", ""]
    secs = meta["training"].get("seconds_per_epoch")
    folds_info = meta["training"]["folds"]
    lines += [f"Mean {_f(secs, 1)} s per epoch; per fold fit + out-of-fold scoring: "
              + ", ".join(f"{fi['fit_seconds'] / 60:.1f} + {fi['oof_scoring_seconds'] / 60:.1f} min" for fi in folds_info)
              + ".", ""]
    z = oof[f"logit_{variant}"]
    ece = {"none": [], "temperature": [], "platt": []}
    for m in ece:
        prob = cal.sigmoid(z) if m == "none" else cross_fit(z, y, fold, k, m)[0]
        ece[m] = [expected_calibration_error(y[fold == f], prob[fold == f]) for f in range(k)] + [
            expected_calibration_error(y, prob)]
    lines += ["| fold | held out | non-IDC | IDC | bal. acc. | F1 | AUC | spec. | sens. | ECE raw | ECE temp. | ECE Platt |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f, pf in enumerate(cv["per_fold"]):
        held = pf["held_out"] if "held_out" in pf else cv["held_out"][f]
        n0 = sum(counts[h]["non-IDC"] for h in held)
        n1 = sum(counts[h]["IDC"] for h in held)
        q = pf["patch"]
        lines.append(f"| {f + 1} | {', '.join(held)} | {n0} | {n1} | {_f(q['balanced_accuracy'])} | {_f(q['f1'])} | "
                     f"{_f(q['roc_auc'])} | {_f(q['specificity'])} | {_f(q['recall'])} | "
                     + " | ".join(_f(ece[m][f]) for m in ece) + " |")
    lines.append(f"| pooled | | {int((y == 0).sum())} | {int((y == 1).sum())} | {_f(p['balanced_accuracy'])} | "
                 f"{_f(p['f1'])} | {_f(p['roc_auc'])} | {_f(p['specificity'])} | {_f(p['recall'])} | "
                 + " | ".join(_f(ece[m][k]) for m in ece) + " |")
    lines += ["", "| variant | balanced acc. | F1 (IDC) | ROC AUC | ECE |", "|---|---|---|---|---|"]
    for name, v in cv["variants"].items():
        c = v["ci"]
        lines.append(f"| {name} | {_f(v['balanced_accuracy'])} {_ci(c.get('balanced_accuracy'))} | {_f(v['f1'])} | "
                     f"{_f(v['roc_auc'])} {_ci(c.get('roc_auc'))} | {_f(v['ece'])} {_ci(c.get('ece'))} |")
    rows = sorted(metrics["cv"]["pooled"]["per_patient"], key=lambda r: r["accuracy"])
    lines += ["", "Per patient (worst first): " + "; ".join(
        f"{r['patient']} ({r['role']}, {r['n']} patches, true IDC {_f(r['true_idc_fraction'], 2)}, called IDC "
        f"{_f(r['pred_idc_fraction'], 2)}, accuracy {_f(r['accuracy'])}"
        + (f", AUC within the patient {_f(r['roc_auc'])}" if r.get("roc_auc") is not None and np.isfinite(r["roc_auc"])
           else "") + ")" for r in rows), ""]
    return "\n".join(lines)


def summary_row(run: Path, patient: str) -> str:
    """``| BA (CI) | AUC (CI) | ECE (CI) | ECE temp. / Platt | fold holding patient: BA / AUC; called IDC |``."""
    cv = json.loads(ModelFolder(run).metrics.read_text())["cv"]
    p, ci = cv["pooled"]["patch"], cv["pooled"]["ci"]
    v = cv["variant"]
    fold = next(f for i, f in enumerate(cv["per_fold"]) if patient in f.get("held_out", cv["held_out"][i]))
    row = next(r for r in cv["pooled"]["per_patient"] if r["patient"] == patient)
    return (f"| {_f(p['balanced_accuracy'])} {_ci(ci.get('balanced_accuracy'))} | {_f(p['roc_auc'])} "
            f"{_ci(ci.get('roc_auc'))} | {_f(p['ece'])} {_ci(ci.get('ece'))} | {_f(cv['variants'][v + '/temperature']['ece'])}"
            f" / {_f(cv['variants'][v + '/platt']['ece'])} | fold {fold['fold']}: {_f(fold['patch']['balanced_accuracy'])}"
            f" / {_f(fold['patch']['roc_auc'])}; {patient} called IDC {_f(row['pred_idc_fraction'], 2)} (true "
            f"{_f(row['true_idc_fraction'], 2)}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--row", metavar="PATIENT", help="one summary row per run, with the fold that holds out PATIENT")
    args = ap.parse_args()
    for run in args.runs:
        print(f"{run.name} " + summary_row(run, args.row) if args.row else tables(run))


if __name__ == "__main__":
    main()
