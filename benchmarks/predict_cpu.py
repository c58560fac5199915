"""Scenario: the predict stage on CPU against the model-only roof and the naive loop, in one run.

    python benchmarks/predict_cpu.py [--model MODEL_DIR] [--tiles 40000] [--out benchmarks/results]

Tiles are the real IDC patches of ../shared/data/idc (repeated to reach --tiles) written into a
tiles.zarr like `cancernet tile` does, so the store compresses like real H&E. Without --model a
CancerNet of the default width with random weights is used: throughput does not depend on the
weights. Prints a markdown table and writes JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from cancernet_batch.runfolder import Run

REPO = Path(__file__).resolve().parents[1]


def build_store(run: Path, tiles: np.ndarray, total: int, per_input: int = 10000) -> None:
    from cancernet_batch import store

    root = Run.of(run).open_store()
    k = 0
    while k * per_input < total:
        n = min(per_input, total - k * per_input)
        idx = np.arange(k * per_input, k * per_input + n) % len(tiles)
        cols = int(np.ceil(np.sqrt(n)))
        attrs = store.InputAttrs(source=str(run / f"bench-{k}.svs"), kind="slide", reader="bench", patient=f"b{k}",
                                 source_size=0, source_mtime=0.0, target_mpp=4.0, grid_shape=(-(-n // cols), cols),
                                 n_tiles=n, level0_tile_px=400.0)
        g = store.create_input(root, attrs, n)
        g["tiles"][:] = tiles[idx]
        g["coords"][:] = np.stack([np.arange(n) // cols, np.arange(n) % cols], 1)
        store.mark_complete(g)
        k += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tiles", type=int, default=40000)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--shapes", default="1x1,1x2,2x1", help="workers x threads per worker for the predict stage")
    ap.add_argument("--engines", default="onnx,keras", help="engines for the predict stage")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()

    from cancernet_batch import bench, patches
    from cancernet_batch.engines import OnnxEngine, KerasEngine
    from cancernet_batch.model import ModelMeta, build_cancernet, export_onnx, save_model_dir

    work = Path(tempfile.mkdtemp(prefix="cancernet-bench-"))
    model_dir = Path(args.model) if args.model else work / "model"
    if not args.model:
        m = build_cancernet(width=32, seed=0)
        m.predict_on_batch(np.zeros((1, 50, 50, 3), np.uint8))
        save_model_dir(m, model_dir, ModelMeta(width=32))
        export_onnx(model_dir)
    idc = REPO.parent / "shared" / "data" / "idc"
    ps = patches.load(idc)
    run = work / "run"
    build_store(run, ps.tiles, args.tiles)

    figures = []
    sample = ps.tiles[np.arange(8192) % len(ps.tiles)]
    onnx = OnnxEngine(model_dir)
    for bs in (256, 1024, 4096):
        figures.append(bench.roof(onnx, sample, bs))
    keras_engine = KerasEngine(model_dir)
    for bs in (256, 1024, 4096):
        figures.append(bench.roof(keras_engine, sample, bs))
    roof_rate = max(f.rate for f in figures)
    del onnx, keras_engine
    for engine in args.engines.split(","):
        for shape in args.shapes.split(","):
            w, t = (int(v) for v in shape.split("x"))
            figures.append(bench.predict_stage(run, model_dir, workers=w, threads=t, batch_size=args.batch_size,
                                               engine=engine))
    pngs = sorted(idc.glob("*/*/*.png"))[::50]
    naive = bench.naive_loop(model_dir, pngs, limit=100)
    figures.append(naive)
    table = bench.markdown_table(figures, roof_rate, naive.rate)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"predict-cpu-{stamp}.json").write_text(json.dumps(
        {"machine": bench.machine(), "tiles": args.tiles, "model": str(model_dir),
         "figures": [f.to_json() for f in figures], "roof_patches_per_second": roof_rate,
         "naive_patches_per_second": naive.rate}, indent=2))
    (out / f"predict-cpu-{stamp}.md").write_text(table)


if __name__ == "__main__":
    sys.exit(main())
