"""Tissue detection against the synthetic truth: on synthetic slides, the tiles kept by the default
tissue detection compared with the truth's tissue tiles, per slide and overall.

    python benchmarks/synthetic_tissue.py --work WORK [--results benchmarks/SYNTH_TISSUE.md]

The slides: the three of the test fixture ``mpp_slides`` (0.25, 0.5 and 1.0 µm/px) and four larger
ones at 0.5 µm/px (15 x 15 tiles of the model grid). Per slide: agreement (share of grid positions
where kept == truth), the mean absolute and signed error of the tissue fractions, and each
disagreeing tile's detected and true fractions (a disagreement on the cut is expected: a specimen
edge crossing the tile). ``tests/test_tissue.py::test_agrees_with_synthetic_truth`` asserts the same
on the fixture's three slides.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from pathlib import Path

import numpy as np


def specs(out: Path) -> list:
    from cancernet_batch.synth import SlideSpec

    fixture = [SlideSpec(path=out / "m025.tiff", width=4096, height=4096, mpp=0.25, seed=31, format="tiff"),
               SlideSpec(path=out / "m050.svs", width=4096, height=3072, mpp=0.5, seed=32),
               SlideSpec(path=out / "m100.svs", width=2048, height=2048, mpp=1.0, seed=33)]
    return fixture + [SlideSpec(path=out / f"s{s}.svs", width=6144, height=6144, mpp=0.5, seed=s) for s in range(40, 44)]


def measure(work: Path) -> list[dict]:
    from cancernet_batch.synth import slide_model, write_slide
    from cancernet_batch.tiling import TileConfig, plan_slide
    from cancernet_batch.tissue import DEFAULT_THRESHOLD

    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in specs(work):
        if not spec.path.is_file():
            write_slide(spec)
        _, truth_fraction, _ = slide_model(spec)
        plan = plan_slide(spec.path, TileConfig())
        kept = np.zeros(plan.grid_shape, bool)
        kept[plan.coords[:, 0], plan.coords[:, 1]] = True
        truth = truth_fraction >= DEFAULT_THRESHOLD
        err = plan.tissue - truth_fraction
        rows.append({"slide": spec.path.name, "mpp": spec.mpp, "grid": list(truth.shape), "tiles": int(truth.size),
                     "agree": int((kept == truth).sum()), "mae": float(np.abs(err).mean()), "bias": float(err.mean()),
                     "off": [(round(float(plan.tissue[r, c]), 2), round(float(truth_fraction[r, c]), 2))
                             for r, c in zip(*np.nonzero(kept != truth))]})
    return rows


def markdown(rows: list[dict], command: str) -> str:
    from cancernet_batch.machine import cpu_name

    cpu = cpu_name()
    out = [f"# Tissue detection against the synthetic truth ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
           f"Machine: {platform.node()}, {cpu}, {os.cpu_count()} cores (shared with other jobs while measured), "
           f"Python {platform.python_version()}.", f"Command: `{command}`", "",
           "Kept = tissue fraction >= the default threshold (0.25); truth = the synthetic truth's tissue fraction "
           ">= the same cut. Disagreements list (detected, true) tissue fractions.", "",
           "| slide | µm/px | grid | agreement | fraction MAE | fraction bias | disagreements |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        off = ", ".join(f"({a:.2f}, {b:.2f})" for a, b in r["off"]) or "-"
        out.append(f"| {r['slide']} | {r['mpp']:g} | {r['grid'][0]}x{r['grid'][1]} | {r['agree'] / r['tiles']:.3f} | "
                   f"{r['mae']:.3f} | {r['bias']:+.3f} | {off} |")
    agree, total = sum(r["agree"] for r in rows), sum(r["tiles"] for r in rows)
    lo = min(r["agree"] / r["tiles"] for r in rows)
    out += ["", f"All {len(rows)} slides: {agree} of {total} grid positions agree ({agree / total:.1%}); "
            f"lowest slide {lo:.1%}."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--results", type=Path, default=None)
    a = ap.parse_args(argv)
    rows = measure(a.work)
    text = markdown(rows, "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]))
    if a.results:
        from cancernet_batch.atomic import write_text

        write_text(a.results, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
