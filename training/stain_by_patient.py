"""Stain density of each patient's patches, by class: what a CancerNet trained on these patients can key on.

For every patient and class of a Kaggle-layout folder, the mean haematoxylin and eosin optical density
(Ruifrok & Johnston colour deconvolution, the stain vectors that ``cancernet train``'s stain jitter uses)
over all its patches. Printed as a markdown table for ``training/RESULTS.md``:

    python training/stain_by_patient.py ../shared/data/idc

With ``--by-mix``: how the per-patient statistics of ``cancernet train --stain-norm``
(:mod:`cancernet_batch.stain`) change with a patient's class mix. For each patient with both classes,
each statistic estimated from all its patches, from its non-IDC patches only and from its IDC patches
only (labels are used here only to show the dependence; training never gives them to the normaliser).
"""

from __future__ import annotations

import argparse

import numpy as np

from cancernet_batch.patches import load
from cancernet_batch.train import _UNSTAIN


def stain_table(data: str) -> str:
    ps = load([data])
    rows = ["| patient | class | patches | mean H OD | mean E OD |", "|---|---|---:|---:|---:|"]
    for p in sorted(set(ps.patients.tolist())):
        for c, name in ((0, "non-IDC"), (1, "IDC")):
            sel = (ps.patients == p) & (ps.labels == c)
            if not sel.any():
                continue
            od = -np.log((ps.tiles[sel].astype(np.float32) + 1.0) / 256.0)
            conc = (od @ _UNSTAIN).mean(axis=(0, 1, 2))
            rows.append(f"| {p} | {name} | {int(sel.sum())} | {conc[0]:.2f} | {conc[1]:.2f} |")
    return "\n".join(rows)


def mix_table(data: str) -> str:
    from cancernet_batch import stain

    ps = load([data])
    rows = ["| patient | patches from | n | Macenko H / E vector angle to all (deg) | Macenko 99th pct. H / E | "
            "Reinhard mean l / alpha / beta | Reinhard std l |", "|---|---|---:|---|---|---|---:|"]
    for p in sorted(set(ps.patients.tolist())):
        mine = ps.patients == p
        if len(set(ps.labels[mine].tolist())) < 2:
            continue
        ref = stain.macenko_stats(ps.tiles[mine])
        for name, sel in (("all", mine), ("non-IDC only", mine & (ps.labels == 0)), ("IDC only", mine & (ps.labels == 1))):
            if sel.sum() < 4:
                continue
            m, r = stain.macenko_stats(ps.tiles[sel]), stain.reinhard_stats(ps.tiles[sel])
            ang = [np.degrees(np.arccos(np.clip(m["stains"][:, j] @ ref["stains"][:, j], -1, 1))) for j in range(2)]
            rows.append(f"| {p} | {name} | {int(sel.sum())} | {ang[0]:.1f} / {ang[1]:.1f} | {m['max'][0]:.2f} / "
                        f"{m['max'][1]:.2f} | {r['mean'][0]:.3f} / {r['mean'][1]:.3f} / {r['mean'][2]:.3f} | "
                        f"{r['std'][0]:.3f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--by-mix", action="store_true", help="per-patient normalisation statistics by class mix")
    args = ap.parse_args()
    print(mix_table(args.data) if args.by_mix else stain_table(args.data))
