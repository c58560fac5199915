"""Throughput measurements: the model-only roof, the predict stage over a tiles.zarr, the naive loop.

Every figure is patches per second measured in this process (or in the Dask cluster it starts),
with the machine recorded beside it, so ratios compare like with like: the predict stage against
the fastest engine's roof measured in the same run, and against the naive seed-style loop (read
one PNG, ``model.predict`` on one patch).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import PATCH_SIZE, __version__

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Figure:
    """One measurement."""

    stage: str  # roof | predict | naive | tile | run
    engine: str
    patches: int
    seconds: float
    settings: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.patches / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "patches_per_second": round(self.rate, 1)}


def machine() -> dict:
    """What the figures were measured on."""
    import sys

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {"cancernet_batch": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for name in ("onnxruntime", "keras", "tensorflow", "jax", "torch", "dask", "zarr"):
        mod = sys.modules.get(name)
        if mod is not None:
            versions[name] = str(getattr(mod, "__version__", "?"))
    return {"cpu": cpu, "cores": cores, "platform": platform.platform(), "versions": versions}


def random_tiles(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)


def roof(engine, tiles: np.ndarray, batch_size: int, *, min_seconds: float = 2.0) -> Figure:
    """Model-only throughput: in-memory uint8 batches straight into ``engine.predict``."""
    engine.batch_size = batch_size
    engine.predict(tiles[:batch_size])  # warm-up (graph build, allocations)
    n, t0 = 0, time.perf_counter()
    while True:
        for s in range(0, len(tiles), batch_size):
            n += len(engine.predict(tiles[s:s + batch_size]))
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return Figure("roof", engine.name, n, dt, {"batch_size": batch_size})


def naive_loop(model_dir: str | os.PathLike, pngs: list[Path], *, limit: int = 100) -> Figure:
    """The seed-style loop: open one PNG, ``model.predict`` on one patch, repeat (Keras, this process)."""
    from PIL import Image

    from .model import load_keras_model

    model = load_keras_model(model_dir)
    files = list(pngs)[:limit]
    x = np.asarray(Image.open(files[0]).convert("RGB").resize((PATCH_SIZE, PATCH_SIZE)))[None]
    model.predict(x, verbose=0)  # warm-up
    t0 = time.perf_counter()
    for f in files:
        x = np.asarray(Image.open(f).convert("RGB").resize((PATCH_SIZE, PATCH_SIZE)))[None]
        model.predict(x, verbose=0)
    return Figure("naive", "keras-predict-1", len(files), time.perf_counter() - t0, {"files": len(files)})


def predict_stage(run_dir: str | os.PathLike, model_dir: str | os.PathLike, *, workers: int, threads: int,
                  batch_size: int, engine: str = "onnx") -> Figure:
    """The ``predict`` stage over a run's tiles.zarr on a fresh local cluster, scoring everything anew."""
    from . import store
    from .cluster import ClusterConfig
    from .inference import PredictConfig, predict_run

    root = store.open_root(run_dir)
    for _, g in store.iter_inputs(root):  # forget earlier scores: measure a full pass
        for name in ("probs", "done"):
            if name in g:
                del g[name]
    cfg = PredictConfig(model_dir=str(model_dir), engine=engine, batch_size=batch_size,
                        cluster=ClusterConfig(workers=workers, threads_per_worker=threads, dashboard=False))
    s = predict_run(run_dir, cfg)
    return Figure("predict", engine, s.tiles_scored, s.seconds,
                  {"workers": workers, "threads_per_worker": threads, "batch_size": batch_size,
                   "worker_seconds": round(s.worker_seconds, 2)})


def markdown_table(figures: list[Figure], roof_rate: float | None, naive_rate: float | None) -> str:
    """A markdown table with patches/s and the ratios to the roof and to the naive loop."""
    lines = ["| stage | engine | settings | patches | seconds | patches/s | x roof | x naive |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for f in figures:
        r = f"{f.rate / roof_rate:.2f}" if roof_rate else ""
        nv = f"{f.rate / naive_rate:.0f}" if naive_rate else ""
        settings = ", ".join(f"{k}={v}" for k, v in f.settings.items() if k != "worker_seconds")
        lines.append(f"| {f.stage} | {f.engine} | {settings} | {f.patches} | {f.seconds:.2f} | {f.rate:.0f} | {r} | {nv} |")
    return "\n".join(lines) + "\n"
