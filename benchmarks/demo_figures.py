"""The demo's own figures: ``cancernet demo`` (library ``cancernet_batch.demo.run_demo``) over several
seeds, each slide's map Dice against the synthetic truth, into a markdown table the README quotes.

    python benchmarks/demo_figures.py --work WORK [--seeds 0 1 2 3 4] [--quick] [--workers 2] \
        [--results benchmarks/DEMO.md]

Seed ``s`` changes the training patients, the model's initialisation and the slides (seed 0 is what
``cancernet demo`` runs). Besides the Dice, each slide's sensitivity, precision and tissue Dice are
kept in ``WORK/demo_figures.json`` to see why a map is poor.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TARGET = 0.85


def one_seed(work: Path, seed: int, quick: bool, workers: int | None) -> dict:
    from cancernet_batch.truth import input_accuracy
    from cancernet_batch.demo import FULL, QUICK, run_demo
    from cancernet_batch.store import input_id

    t0 = time.perf_counter()
    r = run_demo(work / f"seed-{seed}", QUICK if quick else FULL, seed=seed, workers=workers)
    wall = time.perf_counter() - t0
    thr = r.run.report.threshold.value
    slides = {}
    for name in r.dice:
        acc = input_accuracy(r.run.run_dir, input_id(r.out / "slides" / name), thr)
        slides[name] = {"dice": acc.dice, "tissue_dice": acc.tissue_dice, "sensitivity": acc.sensitivity,
                        "precision": acc.precision, "specificity": acc.specificity}
    return {"seed": seed, "wall_s": round(wall, 1), "threshold": thr, "val_balanced_accuracy": r.val_balanced_accuracy,
            "slides": slides, "real": r.real}


def truth_stats(seeds: range, settings: list[tuple[int, float, float]]) -> str:
    """Model-free: for each (slide px, IDC feature µm, IDC share) the demo's synthetic slides' truth,
    the IDC tiles per slide and the border tiles (IDC 20-80 %: ambiguous to a patch classifier) per
    IDC tile, over ``seeds`` x 3 slides (the demo's slide seeds). How the demo's slide settings were chosen."""
    import numpy as np

    from cancernet_batch.synth import SlideSpec, slide_model

    out = [f"# Truth of the demo's synthetic slides over seeds {seeds.start}-{seeds.stop - 1} x 3 slides "
           f"({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
           f"Command: `python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`", "",
           "| slide px | IDC feature µm | IDC share | IDC tiles min | median | border tiles per IDC tile: mean | max |",
           "|---|---|---|---|---|---|---|"]
    for px, scale, frac in settings:
        n, ratio = [], []
        for seed in seeds:
            for k in range(3):
                spec = SlideSpec(path=Path("unused.svs"), width=px, height=px, mpp=1.0, seed=(1 + seed) * 1000 + 500 + k,
                                 idc_scale_um=scale, idc_fraction=frac)
                _, tissue, idc = slide_model(spec)
                t = tissue >= 0.25
                n.append(int(((idc >= 0.5) & t).sum()))
                ratio.append(int((t & (idc > 0.2) & (idc < 0.8)).sum()) / max(1, n[-1]))
        out.append(f"| {px} | {scale:g} | {frac:g} | {min(n)} | {int(np.median(n))} | {np.mean(ratio):.2f} | {max(ratio):.2f} |")
    return "\n".join(out) + "\n"


def markdown(rows: list[dict], command: str, quick: bool) -> str:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    n = max(len(r["slides"]) for r in rows)
    out = [f"# `cancernet demo{' --quick' if quick else ''}` figures ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)",
           "", f"Machine: {platform.node()}, {cpu}, {os.cpu_count()} cores (shared with other jobs while measured), "
           f"Python {platform.python_version()}.", f"Command: `{command}`", "",
           f"Map Dice of each synthetic slide against its truth (target >= {TARGET}); the real-tissue slide's "
           "tissue Dice (tiles kept vs the patient's patches) and IDC Dice (the demo's model is trained on "
           "synthetic tissue only: not a target).", "",
           "| seed | " + " | ".join(f"slide {k} Dice" for k in range(n)) + " | min | real tissue Dice | real IDC Dice | "
           "val bal. acc. | wall s |",
           "|---" * (n + 6) + "|"]
    for r in rows:
        d = [s["dice"] for s in r["slides"].values()]
        real = r.get("real") or {}
        out.append(f"| {r['seed']} | " + " | ".join(f"{x:.3f}" for x in d) + f" | {min(d):.3f} | "
                   f"{real.get('tissue_dice', float('nan')):.3f} | {real.get('idc_dice', float('nan')):.3f} | "
                   f"{(r['val_balanced_accuracy'] or float('nan')):.3f} | {r['wall_s']:.0f} |")
    alld = [s["dice"] for r in rows for s in r["slides"].values()]
    out += ["", f"All {len(alld)} slide maps: min Dice {min(alld):.3f}, mean {sum(alld) / len(alld):.3f}; "
            f"{sum(x >= TARGET for x in alld)} of {len(alld)} at or above {TARGET}."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--from-json", action="store_true",
                    help="Only re-render the table from WORK/demo_figures.json (the seeds finished so far).")
    ap.add_argument("--truth-stats", action="store_true",
                    help="Only the model-free truth statistics of the slides (seeds 0-14) for the old and the current settings.")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.truth_stats:
        from cancernet_batch.demo import FULL

        text = truth_stats(range(15), [(4000, 900.0, 0.3), (FULL.slide_px, FULL.idc_scale_um, FULL.idc_fraction)])
        if a.results:
            from cancernet_batch.atomic import write_text

            write_text(a.results, text)
        print(text)
        return 0
    if a.from_json:
        rows = json.loads((a.work / "demo_figures.json").read_text())
    else:
        rows = []
        for s in a.seeds:
            rows.append(one_seed(a.work, s, a.quick, a.workers))
            (a.work / "demo_figures.json").write_text(json.dumps(rows, indent=1))
    text = markdown(rows, "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]), a.quick)
    if a.results:
        from cancernet_batch.atomic import write_text

        write_text(a.results, text)
    print(text)
    return 0 if all(s["dice"] >= TARGET for r in rows for s in r["slides"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
