"""Scenario: what test-time augmentation and fold ensembles cost, against the single model (ONNX Runtime roof).

    python benchmarks/variants.py [--model MODEL_DIR] [--width 16] [--batch-size 256] [--out benchmarks/results]

Each variant is the scoring model `cancernet train --cv 5 --tta` exports (one graph: the members'
mean logit over the 8 flips / rotations, then the calibration), built from a single CancerNet
(--model, or one of --width with random weights: throughput does not depend on the weights) and
timed as `cancernet bench` times its roofs (in-memory uint8 batches into the engine). Prints a
markdown table with the date and the machine and writes JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--variants", default="tta,ensemble5,ensemble5-tta")
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    from cancernet_batch.bench import variant_roofs
    from cancernet_batch.machine import machine
    from cancernet_batch.model import ModelMeta, build_cancernet, export_onnx, save_model_dir

    with tempfile.TemporaryDirectory(prefix="cancernet-variants-") as tmp:
        work = Path(tmp)
        model_dir = args.model
        if model_dir is None:
            model_dir = work / "single"
            m = build_cancernet(width=args.width, seed=0)
            m.predict_on_batch(np.zeros((1, 50, 50, 3), np.uint8))
            save_model_dir(m, model_dir, ModelMeta(width=args.width))
            export_onnx(model_dir)
        figs = variant_roofs(model_dir, tuple(v for v in args.variants.split(",") if v), work,
                             batch_size=args.batch_size, min_seconds=args.min_seconds)
    mach = machine()
    when = datetime.now(timezone.utc).isoformat(timespec="minutes")
    lines = [f"ONNX Runtime, batch {args.batch_size}, {when}, {mach.get('cpu')} ({mach.get('cores')} cores; "
             "shared with other jobs)", "",
             "| variant | members | TTA | networks run per tile | patches/s | x single |",
             "|---|---:|---|---:|---:|---:|"]
    for f in figs:
        s = f.settings
        lines.append(f"| {s['variant']} | {s['members']} | {'yes' if s['tta'] else 'no'} | "
                     f"{s['members'] * (8 if s['tta'] else 1)} | {f.rate:.0f} | {s['x_single']:.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "variants.json").write_text(json.dumps({"date": when, "machine": mach, "settings": vars(args),
                                                    "figures": [f.to_json() for f in figs]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
