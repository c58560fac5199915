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
    from .cluster import usable_cores

    cores = usable_cores()
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
    from .cluster import ClusterConfig, dask_client
    from .inference import PredictConfig, predict_run

    root = store.open_root(run_dir)
    for _, g in store.iter_inputs(root):  # forget earlier scores: measure a full pass
        for name in ("probs", "done"):
            if name in g:
                del g[name]
    cfg = PredictConfig(model_dir=str(model_dir), engine=engine, batch_size=batch_size,
                        cluster=ClusterConfig(workers=workers, threads_per_worker=threads, dashboard=False))
    with dask_client(cfg.cluster) as client:  # started before the clock: the stage, not the cluster's start
        client.wait_for_workers(workers)
        s = predict_run(run_dir, cfg, client=client)
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


# --------------------------------------------------------------------------------------------
# `cancernet bench`: every stage in one run
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchConfig:
    """What ``cancernet bench`` measures."""

    model_dir: str | None = None  # None: a CancerNet of the default width with random weights
    inputs: tuple[str, ...] = ()
    synthetic_slides: int = 2
    size: int = 10000
    slide_mpp: float = 0.5
    batch_sizes: tuple[int, ...] = (256, 1024, 4096)
    workers: tuple[int, ...] = (1, 2)
    naive_count: int = 100
    work_dir: str | None = None


@dataclass
class BenchResult:
    machine: dict
    settings: dict
    figures: list[Figure]
    best: dict

    def rate(self, stage: str) -> float:
        rates = [f.rate for f in self.figures if f.stage == stage]
        return max(rates) if rates else 0.0

    def ratios(self) -> dict:
        roof_rate, naive = self.rate("roof"), self.rate("naive")
        out = {}
        for stage in ("predict", "run"):
            r = self.rate(stage)
            out[f"{stage}_vs_roof"] = r / roof_rate if roof_rate else None
            out[f"{stage}_vs_naive"] = r / naive if naive else None
        return out

    def to_json(self) -> dict:
        return {"machine": self.machine, "settings": self.settings, "figures": [f.to_json() for f in self.figures],
                "roof_patches_per_second": self.rate("roof"), "naive_patches_per_second": self.rate("naive"),
                "ratios": self.ratios(), "best": self.best}

    def markdown(self) -> str:
        return markdown_table(self.figures, self.rate("roof") or None, self.rate("naive") or None)


def _random_model(d: Path) -> Path:
    from .model import ModelMeta, build_cancernet, export_onnx, save_model_dir

    m = build_cancernet(width=32, seed=0)
    m.predict_on_batch(np.zeros((1, PATCH_SIZE, PATCH_SIZE, 3), np.uint8))
    save_model_dir(m, d, ModelMeta(width=32))
    export_onnx(d)
    return d


def _source_bytes(paths: list[str]) -> int:
    total = 0
    for p in map(Path, paths):
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        total += sum(f.stat().st_size for f in files)
    return total


def _pngs_from_run(run: Path, out: Path, n: int) -> list[Path]:
    """Write ``n`` stored tiles as PNG files: the naive loop's input, one file per patch."""
    from PIL import Image

    from . import store

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for _, g in store.iter_inputs(store.open_root(run, mode="r")):
        tiles = g["tiles"][: n - len(files)]
        for i, t in enumerate(tiles):
            f = out / f"tile-{len(files):05d}.png"
            Image.fromarray(t).save(f)
            files.append(f)
        if len(files) >= n:
            break
    return files


def run_bench(cfg: BenchConfig, *, step=lambda msg: None) -> BenchResult:
    """Measure the roof, tiling, the predict stage, end to end, and the naive loop, in this order."""
    import shutil
    import tempfile

    from .cluster import ClusterConfig
    from .engines import KerasEngine, OnnxEngine
    from .inference import PredictConfig
    from .pipeline import run_pipeline
    from .report import ReportConfig
    from .synth import synth_slides
    from .tile_run import tile_run
    from .tiling import TileConfig

    work = Path(cfg.work_dir or tempfile.mkdtemp(prefix="cancernet-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = Path(cfg.model_dir) if cfg.model_dir else _random_model(work / "model")
        inputs = list(cfg.inputs)
        if not inputs:
            step(f"making {cfg.synthetic_slides} synthetic slides of {cfg.size} px at {cfg.slide_mpp} µm/px")
            synth_slides(work / "slides", count=cfg.synthetic_slides, size=cfg.size, mpp=cfg.slide_mpp, seed=7,
                         detail_mpp=2.0)
            inputs = [str(work / "slides")]
        figures: list[Figure] = []

        step("model-only roof")
        sample = random_tiles(max(cfg.batch_sizes) * 2)
        onnx = OnnxEngine(model_dir)
        for bs in cfg.batch_sizes:
            figures.append(roof(onnx, sample, bs))
        try:
            keras_engine = KerasEngine(model_dir)
            figures.append(roof(keras_engine, sample, max(cfg.batch_sizes)))
        except Exception as exc:  # noqa: BLE001 - a scoring-only install has no Keras backend
            log.warning("Keras roof skipped: %s", exc)
        del onnx

        step("tiling")
        tile_cfg = TileConfig()
        run = work / "run-tile"
        t = tile_run(inputs, run, tile_cfg, cluster=ClusterConfig(workers=max(cfg.workers), dashboard=False))
        figures.append(Figure("tile", "dask", t.tiles_written, t.seconds,
                              {"workers": max(cfg.workers), "MB_read_per_s": round(_source_bytes(inputs) / 1e6 / t.seconds, 1)}))

        step("predict stage")
        for w in cfg.workers:
            for bs in cfg.batch_sizes:
                figures.append(predict_stage(run, model_dir, workers=w, threads=1, batch_size=bs))

        best = max((f for f in figures if f.stage == "predict"), key=lambda f: f.rate)
        step("end to end (cancernet run)")
        e2e = work / "run-e2e"
        pcfg = PredictConfig(model_dir=str(model_dir), batch_size=best.settings["batch_size"],
                             cluster=ClusterConfig(workers=best.settings["workers"], dashboard=False))
        t0 = time.perf_counter()
        s = run_pipeline(inputs, e2e, tile_cfg, pcfg, ReportConfig(model_dir=str(model_dir)))
        wall = time.perf_counter() - t0
        n_inputs = max(1, len(s.tile.tiled))
        figures.append(Figure("run", "onnx", s.predict.tiles_scored, wall,
                              {"workers": best.settings["workers"], "batch_size": best.settings["batch_size"],
                               "seconds_per_input": round(wall / n_inputs, 2)}))

        step("naive loop")
        pngs = _pngs_from_run(run, work / "pngs", cfg.naive_count)
        if pngs:
            figures.append(naive_loop(model_dir, pngs, limit=cfg.naive_count))
        settings = {**asdict(cfg), "model_dir": str(model_dir), "inputs": inputs}
        return BenchResult(machine(), settings, figures,
                           {"workers": best.settings["workers"], "threads_per_worker": 1,
                            "batch_size": best.settings["batch_size"], "patches_per_second": round(best.rate, 1)})
    finally:
        if cfg.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def autotune_path() -> Path:
    """Where ``bench`` saves the best predict settings for this machine."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cancernet-batch" / "autotune.json"


def save_autotune(best: dict) -> Path:
    import json

    from .atomic import write_text

    return write_text(autotune_path(), json.dumps({**best, "machine": machine()}, indent=2) + "\n")


def load_autotune() -> dict | None:
    """The saved choice, or None when ``bench`` has not run on this machine (or it ran elsewhere)."""
    import json

    p = autotune_path()
    if not p.exists():
        return None
    try:
        saved = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    here = machine()
    if saved.get("machine", {}).get("cpu") != here["cpu"] or saved.get("machine", {}).get("cores") != here["cores"]:
        log.warning("%s was measured on another machine; ignoring it (run `cancernet bench` here)", p)
        return None
    return saved
