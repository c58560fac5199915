"""Stain density of each patient's patches, by class: what a CancerNet trained on these patients can key on.

For every patient and class of a Kaggle-layout folder, the mean haematoxylin and eosin optical density
(Ruifrok & Johnston colour deconvolution, the stain vectors that ``cancernet train``'s stain jitter uses)
over all its patches. Printed as a markdown table for ``training/RESULTS.md``:

    python training/stain_by_patient.py ../shared/data/idc
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


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    print(stain_table(ap.parse_args().data))
