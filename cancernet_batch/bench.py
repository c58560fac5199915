"""Throughput measurements: the model-only roof, the predict stage over a tiles.zarr, the naive loop.

Every figure is patches per second measured in this process (or in the Dask cluster it starts),
with the machine recorded beside it, so ratios compare like with like: the predict stage against
the fastest engine's roof measured in the same run, and against the naive seed-style loop (read
one PNG, ``model.predict`` on one patch).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import PATCH_SIZE
from .machine import machine
from .runfolder import Run

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


def peak_rss(reset: bool = False) -> int:
    """This process's peak resident memory in bytes since it started or since the last ``reset``.

    Linux: ``VmHWM`` from /proc/self/status, reset by writing 5 to /proc/self/clear_refs, so one
    process can report its peak per stage. Elsewhere: ``ru_maxrss`` (never reset).
    """
    try:
        with open("/proc/self/status") as fh:
            hwm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
        if reset:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        return hwm
    except (OSError, StopIteration, ValueError):
        import resource
        import sys

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024


def bytes_read() -> int:
    """Bytes this process has read through system calls so far (Linux ``rchar``; 0 elsewhere)."""
    try:
        with open("/proc/self/io") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))
    except (OSError, StopIteration, ValueError):
        return 0


def worker_peaks(client, reset: bool = False) -> list[int]:
    """Peak resident memory of every Dask worker process (bytes, sorted by worker address)."""
    got = client.run(peak_rss, reset)
    return [int(got[k]) for k in sorted(got)]


def _mib(n: float) -> float:
    return round(n / 2**20, 1)


def _peaks(peaks: list[int]) -> dict:
    return {"peak_worker_rss_mib": _mib(max(peaks)) if peaks else None,
            "peak_rss_mib_per_worker": [_mib(p) for p in peaks]}


def random_tiles(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)


def roof(engine, tiles: np.ndarray, batch_size: int, *, min_seconds: float = 2.0) -> Figure:
    """Model-only throughput: in-memory uint8 batches straight into ``engine.predict``."""
    engine.batch_size = batch_size
    engine.predict(tiles[:batch_size])  # warm-up (graph build, allocations)
    n, t0, s = 0, time.perf_counter(), 0
    while True:  # whole batches until min_seconds have passed (a slow engine stops after one batch past it)
        n += len(engine.predict(tiles[s:s + batch_size]))
        s = s + batch_size if s + 2 * batch_size <= len(tiles) else 0
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            micro = getattr(engine, "micro_batch", None)  # ONNX Runtime: tiles per call within the batch
            return Figure("roof", engine.name, n, dt,
                          {"batch_size": batch_size, **({} if micro is None else {"micro_batch": micro})})


VARIANT_HELP = "tta (x8 flips/rotations), ensembleN (N members), ensembleN-tta"


def parse_variant(name: str) -> tuple[int, bool]:
    """``tta`` -> (1, True), ``ensemble5`` -> (5, False), ``ensemble5-tta`` -> (5, True); ValueError otherwise."""
    import re

    m = re.fullmatch(r"(?:ensemble(\d+))?(-?tta)?", name)
    if not name or m is None or (m.group(1) is None and m.group(2) != "tta") or (m.group(1) and m.group(2) == "tta"):
        raise ValueError(f"unknown model variant {name!r}; use {VARIANT_HELP}")
    members = int(m.group(1)) if m.group(1) else 1
    if members < 1:
        raise ValueError(f"an ensemble needs at least one member: {name!r}")
    return members, m.group(2) is not None


def variant_roofs(model_dir: str | os.PathLike, variants: tuple[str, ...], work: Path, *, batch_size: int = 256,
                  min_seconds: float = 2.0, device: str = "cpu") -> list[Figure]:
    """ONNX Runtime roof of scoring-model variants built from the model in ``model_dir``, against the single model.

    Each variant (:func:`parse_variant`) wraps N copies of the model (weights scaled by 1 + 1e-6 k, so
    that ONNX Runtime cannot merge identical members; the cost does not depend on the weights) with or without test-time augmentation into one graph
    (:func:`cancernet_batch.layers.scoring_model`), exported to ONNX as ``cancernet train --cv --tta``
    exports it; figures have stage ``variant`` and say their cost as ``x_single``.
    """
    from .engines import OnnxEngine
    from .layers import scoring_model
    from .model import ModelMeta, export_onnx, load_keras_model, read_meta, save_model_dir

    from .quiet import import_keras

    keras = import_keras()
    meta = read_meta(model_dir)
    if meta.scoring:
        log.warning("%s is already a scoring variant (%s); variants are built from plain single models", model_dir,
                    meta.scoring.get("member_kind"))
        return []
    single = load_keras_model(model_dir, meta)
    tiles = random_tiles(2 * batch_size)
    base = roof(OnnxEngine(model_dir, meta, device=device), tiles, batch_size, min_seconds=min_seconds)
    figs = [Figure("variant", base.engine, base.patches, base.seconds, {"variant": "single", "members": 1,
                                                                         "tta": False, "batch_size": batch_size,
                                                                         "x_single": 1.0})]
    copies = [single]
    for name in variants:
        members, tta = parse_variant(name)
        while len(copies) < members:  # distinct weights: ONNX Runtime would merge identical members into one
            twin = keras.models.clone_model(single)
            twin.set_weights([w * np.float32(1 + 1e-6 * len(copies)) for w in single.get_weights()])
            copies.append(twin)
        d = work / f"variant-{name}"
        save_model_dir(scoring_model(copies[:members], tta=tta), d, ModelMeta(width=meta.width, mpp=meta.mpp))
        export_onnx(d)
        f = roof(OnnxEngine(d, device=device), tiles, batch_size, min_seconds=min_seconds)
        figs.append(Figure("variant", f.engine, f.patches, f.seconds,
                           {"variant": name, "members": members, "tta": tta, "batch_size": batch_size,
                            "x_single": round(f.rate / base.rate, 4) if base.rate else None}))
    return figs


@contextlib.contextmanager
def _direct_level(job: dict):
    """The :class:`~cancernet_batch.slides.direct.TiledLevel` of ``job``'s slide and level, a local TIFF parsed by
    tifffile alone: no reader is opened (OpenSlide's open of a one-level SVS hashes its whole level: 15 CPU ms of a
    CMU-1 copy, more than its tiles' decode), since the roof and the floor time the tiles' work, not a slide's open.
    An object on object storage is opened by its reader (tifffile over its range file)."""
    from .remote import is_url
    from .slides import open_slide
    from .slides.direct import local_source

    if is_url(job["source"]):
        with open_slide(job["source"]) as reader:
            yield reader.direct_level(job["level"])
        return
    src = local_source(job["source"], job["dims"])
    if src is None:  # its reader's direct level was found when the jobs were made: the file changed since
        raise RuntimeError(f"{job['source']}: no longer a TIFF tifffile parses")
    try:
        yield src.level(job["level"])
    finally:
        src.close()


def _decode_job(job: dict) -> tuple[int, float, int]:
    """Decode roof: ``job``'s compressed tiles each decoded once at full size. ``(tiles decoded, CPU s, 0)``."""
    c0 = time.process_time()
    with _direct_level(job) as level:
        n = level.decode_each(job["idx"])
    return n, time.process_time() - c0, 0


def _floor_job(job: dict) -> tuple[int, float, int]:
    """Tile floor: ``job``'s compressed tiles decoded and averaged by blocks as tiling does them
    (:meth:`~cancernet_batch.slides.direct.TiledLevel.reduced` at ``s`` and ``k``), and ``nbytes`` of their pixels
    encoded by the tile store's codec in chunks of ``chunk_bytes``. ``(tiles decoded, CPU s, bytes encoded)``."""
    from numcodecs import Zstd

    from .store import TILES_ZSTD_LEVEL

    codec = Zstd(level=TILES_ZSTD_LEVEL)
    c0 = time.process_time()
    pending, size, left = [], 0, job["nbytes"]
    with _direct_level(job) as level:
        for i in job["idx"]:
            a = level.reduced(int(i), job["s"], job["k"]).reshape(-1)[:left]
            left -= a.size
            pending.append(a)
            size += a.size
            if size >= job["chunk_bytes"]:
                codec.encode(np.concatenate(pending))
                pending, size = [], 0
    if size:
        codec.encode(np.concatenate(pending))
    return len(job["idx"]), time.process_time() - c0, job["nbytes"] - left


def _direct_jobs(run: Path, workers: int) -> tuple[list[dict], int]:
    """The decode roof's and the tile floor's work: for each tiled slide of ``run`` whose level the direct decoder
    reads, the compressed tiles its stored tiles need, cut into ``workers`` parts per slide, each part a job: the
    slide's ``source``, ``dims`` (its levels' sizes) and ``level``; the part's tile indices ``idx``; ``s`` and ``k``
    (:meth:`~cancernet_batch.slides.direct.TiledLevel.scales`, ``fast`` where the slide was tiled with ``--decode
    fast``); ``nbytes``, the part's share of the bytes of the slide's model tiles, and ``chunk_bytes``, a store chunk's.
    And the model tiles of those slides."""
    from . import store
    from .slides import open_slide

    jobs, n = [], 0
    for _, g in store.iter_inputs(Run.of(run).open_store("r")):
        a = g.attrs
        if a.get("kind") != "slide" or not a.get("n_tiles"):
            continue
        tile_px = float(a["level0_tile_px"]) / float(a["level_downsample"])
        with open_slide(a["source"]) as reader:
            level = reader.direct_level(int(a["level"]))
            if level is None:
                continue
            idx = level.needed(np.asarray(g["coords"][:]), tile_px)
            side = int(g["tiles"].shape[1])
            s, k = level.scales(tile_px, side, (a.get("extra") or {}).get("decode") == "fast")
            dims = [tuple(d) for d in reader.level_dimensions]
        tiles = int(a["n_tiles"])
        n += tiles
        tile_bytes = side * side * 3
        step = max(1, -(-len(idx) // workers))
        jobs += [{"source": a["source"], "dims": dims, "level": int(a["level"]), "idx": idx[i:i + step].tolist(),
                  "s": s, "k": k, "nbytes": round(tiles * tile_bytes * len(idx[i:i + step]) / max(1, len(idx))),
                  "chunk_bytes": int(g["tiles"].chunks[0]) * tile_bytes}
                 for i in range(0, len(idx), step)]
    return jobs, n


def _timed_pool(fn, jobs: list[dict], workers: int) -> tuple[int, float, float, int]:
    """``fn`` over ``jobs`` in ``workers`` processes started and warmed first: ``(tiles decoded, wall s, CPU s, bytes
    encoded)``."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(fn, [{**jobs[0], "idx": [], "nbytes": 0}] * workers))  # processes started and warm
        t0 = time.perf_counter()
        done = list(pool.map(fn, jobs))
        dt = time.perf_counter() - t0
    return sum(d[0] for d in done), dt, sum(d[1] for d in done), sum(d[2] for d in done)


def decode_roof(run: Path, workers: int) -> Figure | None:
    """The decode roof of a tiled run: the compressed tiles its slides' stored tiles need, each decoded once
    at full size (nothing resampled, nothing written), in ``workers`` processes. Model tiles per second of
    that alone is the most any tiler of these files can reach on this machine; None when no stored slide
    is a tiled TIFF the direct decoder reads."""
    jobs, n = _direct_jobs(run, workers)
    if not jobs:
        return None
    k, dt, cpu, _ = _timed_pool(_decode_job, jobs, workers)
    return Figure("decode-roof", "libjpeg-turbo", n, dt, {"workers": workers, "compressed_tiles": k,
                                                          "cpu_ms_per_tile": round(1000 * cpu / max(1, n), 4)})


def tile_floor(run: Path, workers: int) -> Figure | None:
    """The floor of tiling a tiled run as it was tiled: the decode roof's compressed tiles decoded as tiling decodes
    them (with ``--decode fast``: at 1/s in the DCT where it does), each averaged by blocks where tiling averages them so
    (:meth:`~cancernet_batch.slides.direct.TiledLevel.scales`), and the model tiles' bytes of their pixels encoded
    by the tile store's codec; nothing planned, assembled, resampled further or written, in ``workers``
    processes. Work that tiling must do to store exact tiles as it stores them (a level not on the block grid
    adds its area averaging of whole windows, not counted here): the tile stage's rate against it is what its
    plans, windows, store, Python and Dask cost; its own rate against the decode roof bounds the stage's. None
    where :func:`decode_roof` is None."""
    jobs, n = _direct_jobs(run, workers)
    if not jobs:
        return None
    k, dt, cpu, encoded = _timed_pool(_floor_job, jobs, workers)
    return Figure("tile-floor", "libjpeg-turbo, block means, zstd", n, dt,
                  {"workers": workers, "compressed_tiles": k,
                   "dct_scales": sorted({j["s"] for j in jobs}), "blocks": sorted({j["k"] for j in jobs}),
                   "encoded_MB": round(encoded / 1e6, 3),
                   "cpu_ms_per_tile": round(1000 * cpu / max(1, n), 4)})


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


def installed_backends() -> list[str]:
    """Keras backends importable here (TensorFlow first: the default)."""
    import importlib.util

    return [b for b in ("tensorflow", "jax", "torch") if importlib.util.find_spec(b) is not None]


def keras_roofs(model_dir: str | os.PathLike, backend: str, batch_sizes: tuple[int, ...], *, device: str = "cpu",
                n_tiles: int = 8192, min_seconds: float = 2.0) -> list[Figure]:
    """The Keras roof under ``backend``, per batch size, measured in a child process.

    A process holds one Keras backend for its life, so each backend gets its own interpreter
    (``python -m cancernet_batch.bench roof ...``); the tiles are the same random ones as the
    ONNX roof's. Raises :class:`~cancernet_batch.errors.ConfigError` with the child's last line
    when the backend cannot run (not installed, no GPU).
    """
    import json
    import subprocess
    import tempfile

    from .child import child_env, module_command
    from .errors import ConfigError

    env = child_env(KERAS_BACKEND=backend)
    with tempfile.TemporaryDirectory(prefix="cancernet-roof-") as tmp:
        result = Path(tmp) / "figures.json"
        cmd = module_command("cancernet_batch.bench", "roof", str(model_dir), backend, device,
                             ",".join(map(str, batch_sizes)), str(n_tiles), str(min_seconds), str(result))
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if r.returncode != 0 or not result.is_file():
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(f"the Keras {backend} roof failed: {last}")
        return [Figure(**f) for f in json.loads(result.read_text())]


def _roof_child(argv: list[str]) -> None:
    """Entry of :func:`keras_roofs`' child: measure, then write the figures as JSON to the result file
    (a file, not stdout, which the backends' own start-up output may share)."""
    import json

    from .engines import KerasEngine

    model_dir, backend, device, sizes, n_tiles, min_seconds, result = argv
    engine = KerasEngine(model_dir, backend=backend, device=device)
    batch_sizes = [int(b) for b in sizes.split(",")]
    tiles = random_tiles(max(int(n_tiles), 2 * max(batch_sizes)))
    figs = [roof(engine, tiles, bs, min_seconds=float(min_seconds)) for bs in batch_sizes]
    Path(result).write_text(json.dumps([asdict(f) for f in figs]))


def _keras_backend(backend: str | None = None) -> str:
    """The Keras backend workers run under: ``backend``, else ``KERAS_BACKEND``, else TensorFlow."""
    return backend or os.environ.get("KERAS_BACKEND", "tensorflow")


def _engine_label(engine: str, backend: str | None) -> str:
    """How figures name an engine: ``onnx``, or ``keras-<backend>``."""
    return engine if engine != "keras" else f"keras-{_keras_backend(backend)}"


def predict_stage(run_dir: str | os.PathLike, model_dir: str | os.PathLike, *, workers: int, threads: int,
                  batch_size: int, engine: str = "onnx", backend: str | None = None, device: str = "cpu",
                  engine_threads: int | None = None) -> Figure:
    """The ``predict`` stage over a run's tiles.zarr on a fresh local cluster, scoring everything anew.

    ``engine_threads``: the engine's intra-op threads per worker (default: the cores shared out between the
    workers, so one worker alone uses every core).

    The figure's time is the whole stage (planning, loading the model on the workers, scoring);
    ``steady_patches_per_second`` leaves the model load out (the rate a long run approaches) and
    ``peak_worker_rss_mib`` is the largest worker process's peak resident memory during the stage.
    """
    from . import store
    from .cluster import ClusterConfig, dask_client
    from .stages.score import PredictConfig, predict_run

    root = Run.of(run_dir).open_store()
    for _, g in store.iter_inputs(root):  # forget earlier scores: measure a full pass
        for name in ("probs", "done"):
            if name in g:
                del g[name]
    cfg = PredictConfig(model_dir=str(model_dir), engine=engine, backend=backend, device=device, batch_size=batch_size,
                        engine_threads=engine_threads,
                        cluster=ClusterConfig(workers=workers, threads_per_worker=threads, dashboard=False))
    with dask_client(cfg.cluster) as client:  # started before the clock: the stage, not the cluster's start
        client.wait_for_workers(workers)
        worker_peaks(client, reset=True)
        s = predict_run(run_dir, cfg, client=client)
        peaks = worker_peaks(client)
    return Figure("predict", _engine_label(engine, backend), s.tiles_scored, s.seconds,
                  {"workers": workers, "threads_per_worker": threads, "batch_size": batch_size, "device": device,
                   **({"engine_threads": engine_threads} if engine_threads else {}),
                   "load_seconds": round(s.load_seconds, 2), "worker_seconds": round(s.worker_seconds, 2),
                   "steady_patches_per_second": round(s.steady_patches_per_second, 1), **_peaks(peaks)})


def _source_bytes(paths: list[str]) -> int:
    total = 0
    for p in map(Path, paths):
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        total += sum(f.stat().st_size for f in files)
    return total


def tile_stage(inputs: list[str], run_dir: str | os.PathLike, *, workers: int, tile_cfg=None) -> Figure:
    """Tiling ``inputs`` into a new tiles.zarr on a fresh local cluster: tiles/s, source MB/s, worker peaks."""
    from .cluster import ClusterConfig, dask_client
    from .stages.tile import tile_run
    from .tiling import TileConfig

    with dask_client(ClusterConfig(workers=workers, dashboard=False)) as client:
        client.wait_for_workers(workers)
        worker_peaks(client, reset=True)
        read0 = sum(client.run(bytes_read).values())
        t = tile_run(inputs, run_dir, tile_cfg or TileConfig(), client=client)
        read = sum(client.run(bytes_read).values()) - read0
        peaks = worker_peaks(client)
    return Figure("tile", "dask", t.tiles_written, t.seconds,
                  {"workers": workers, "inputs": len(t.tiled), "failed": len(t.failed_inputs),
                   "MB_read_per_s": round(read / 1e6 / t.seconds, 1), "KB_read_per_tile":
                   round(read / 1e3 / max(1, t.tiles_written), 1),
                   "source_MB_per_s": round(_source_bytes(inputs) / 1e6 / t.seconds, 1), **_peaks(peaks)})


def end_to_end(inputs: list[str], run_dir: str | os.PathLike, model_dir: str | os.PathLike, *, workers: int,
               threads: int = 1, batch_size: int = 256, engine: str = "onnx", backend: str | None = None,
               device: str = "cpu", tile_cfg=None, score_workers: int | None = None) -> Figure:
    """``cancernet run`` (the stream) on ``inputs``: wall time from cluster start to the written report.

    ``score_workers``: that many of the local workers only score, the others only tile (stage
    ``run-split``); otherwise every worker does both (stage ``run``).

    Settings hold the time per stage, the wall time per input, the workers' peak memory over tile and
    predict, and this (client) process's peak memory during the run.
    """
    from .cluster import ClusterConfig, dask_client
    from .stages.score import PredictConfig
    from .stages.run import run_pipeline
    from .stages.report import ReportConfig
    from .tiling import TileConfig

    pcfg = PredictConfig(model_dir=str(model_dir), engine=engine, backend=backend, device=device,
                         batch_size=batch_size,
                         cluster=ClusterConfig(workers=workers, threads_per_worker=threads, dashboard=False,
                                               score_workers=score_workers))
    peak_rss(reset=True)
    t0 = time.perf_counter()
    with dask_client(pcfg.cluster) as client:
        t1 = time.perf_counter()
        s = run_pipeline(inputs, run_dir, tile_cfg or TileConfig(), pcfg, ReportConfig(model_dir=str(model_dir)),
                         client=client)
        peaks = worker_peaks(client)
    wall = time.perf_counter() - t0
    n_inputs = max(1, len(s.tile.tiled) + len(s.tile.skipped))
    first = None if s.first_report_seconds is None else s.first_report_seconds + (t1 - t0)
    return Figure("run-split" if score_workers else "run", _engine_label(engine, backend), s.predict.tiles_scored, wall,
                  {"workers": workers, "score_workers": score_workers or 0,
                   "first_report_seconds": None if first is None else round(first, 2),
                   "first_report_fraction": None if first is None else round(first / wall, 3), "threads_per_worker": threads, "batch_size": batch_size, "inputs": n_inputs,
                   "seconds_per_input": round(wall / n_inputs, 2),
                   "stage_seconds": {k: round(v, 2) for k, v in s.seconds.items()},
                   "cluster_seconds": round(wall - sum(s.seconds.values()), 2),
                   "cluster_start_seconds": round(t1 - t0, 2),
                   "failed": len(s.failed_inputs), **_peaks(peaks), "client_peak_rss_mib": _mib(peak_rss())})


_HIDDEN = {"worker_seconds", "peak_rss_mib_per_worker", "stage_seconds", "steady_patches_per_second",
           "peak_worker_rss_mib", "device", "inputs", "failed", "cluster_seconds", "cluster_start_seconds",
           "client_peak_rss_mib"}


def end_to_end_barrier(inputs: list[str], run_dir: str | os.PathLike, model_dir: str | os.PathLike, *, workers: int,
                       threads: int = 1, batch_size: int = 256, engine: str = "onnx", backend: str | None = None,
                       device: str = "cpu", tile_cfg=None) -> Figure:
    """The same work stage by stage (``tile``, then ``predict``, then ``report`` on one cluster): the
    barrier version the stream replaced. Nothing is reported before every tile is scored."""
    from .cluster import ClusterConfig, dask_client
    from .stages.report import ReportConfig, make_report
    from .stages.score import PredictConfig, predict_run
    from .stages.tile import tile_run
    from .tiling import TileConfig

    pcfg = PredictConfig(model_dir=str(model_dir), engine=engine, backend=backend, device=device,
                         batch_size=batch_size,
                         cluster=ClusterConfig(workers=workers, threads_per_worker=threads, dashboard=False))
    peak_rss(reset=True)
    t0 = time.perf_counter()
    with dask_client(pcfg.cluster) as client:
        t1 = time.perf_counter()
        tile_run(inputs, run_dir, tile_cfg or TileConfig(), client=client)
        t2 = time.perf_counter()
        p = predict_run(run_dir, pcfg, client=client)
        t3 = time.perf_counter()
        make_report(run_dir, ReportConfig(model_dir=str(model_dir)), client=client)
        t4 = time.perf_counter()
        peaks = worker_peaks(client)
    wall = time.perf_counter() - t0
    first = t3 - t0  # the report's tables appear only after every tile is scored (and then all at once)
    return Figure("run-barrier", _engine_label(engine, backend), p.tiles_scored, wall,
                  {"workers": workers, "threads_per_worker": threads, "batch_size": batch_size,
                   "stage_seconds": {"tile": round(t2 - t1, 2), "predict": round(t3 - t2, 2), "report": round(t4 - t3, 2)},
                   "first_report_seconds": round(first, 2), "first_report_fraction": round(first / wall, 3),
                   **_peaks(peaks), "client_peak_rss_mib": _mib(peak_rss())})


def markdown_table(figures: list[Figure], roof_rate: float | None, naive_rate: float | None) -> str:
    """A markdown table: patches/s (and steady patches/s), ratios to the roof and the naive loop, peak MiB per worker."""
    lines = ["| stage | engine | settings | patches | seconds | patches/s | steady patches/s | x roof | x naive "
             "| peak MiB / worker |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for f in figures:
        steady = f.settings.get("steady_patches_per_second")
        r = f"{f.rate / roof_rate:.2f}" + (f" ({steady / roof_rate:.2f})" if steady and roof_rate else "") \
            if roof_rate else ""
        nv = f"{f.rate / naive_rate:.0f}" if naive_rate else ""
        settings = ", ".join(f"{k}={v}" for k, v in f.settings.items() if k not in _HIDDEN)
        peak = f.settings.get("peak_worker_rss_mib")
        lines.append(f"| {f.stage} | {f.engine} | {settings} | {f.patches} | {f.seconds:.2f} | {f.rate:.0f} | "
                     f"{f'{steady:.0f}' if steady else ''} | {r} | {nv} | {peak if peak is not None else ''} |")
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
    threads: tuple[int, ...] = (1,)
    engines: tuple[str, ...] = ("onnx", "keras")
    backends: tuple[str, ...] | None = None  # Keras backends for the roof; None: every installed one
    device: str = "cpu"
    naive_count: int = 100
    work_dir: str | None = None
    roof_seconds: float = 2.0  # each roof runs whole batches for at least this long
    variants: tuple[str, ...] = ("tta", "ensemble5", "ensemble5-tta")
    """Scoring-model variants whose ONNX roof is measured against the single model (:func:`variant_roofs`)."""


@dataclass
class BenchResult:
    machine: dict
    settings: dict
    figures: list[Figure]
    best: dict

    def rate(self, stage: str) -> float:
        rates = [f.rate for f in self.figures if f.stage == stage]
        return max(rates) if rates else 0.0

    def steady_rate(self) -> float:
        rates = [f.settings.get("steady_patches_per_second") or 0.0 for f in self.figures if f.stage == "predict"]
        return max(rates) if rates else 0.0

    def ratios(self) -> dict:
        """Best predict and end-to-end rates against the fastest roof of this run and the naive loop."""
        roof_rate, naive = self.rate("roof"), self.rate("naive")
        out = {}
        for stage in ("predict", "run"):
            r = self.rate(stage)
            out[f"{stage}_vs_roof"] = r / roof_rate if roof_rate else None
            out[f"{stage}_vs_naive"] = r / naive if naive else None
        out["predict_steady_vs_roof"] = self.steady_rate() / roof_rate if roof_rate else None
        decode = self.rate("decode-roof")
        out["tile_vs_decode_roof"] = self.rate("tile") / decode if decode else None
        floor = self.rate("tile-floor")
        out["tile_vs_tile_floor"] = self.rate("tile") / floor if floor else None
        out["tile_floor_vs_decode_roof"] = floor / decode if floor and decode else None
        barrier = self.rate("run-barrier")
        out["run_vs_barrier"] = self.rate("run") / barrier if barrier else None
        stream = self.fastest("run")  # the one the barrier version repeats
        out["first_report_fraction"] = stream.settings.get("first_report_fraction") if stream else None
        split = self.fastest("run-split")
        tile1 = [f for f in self.figures if f.stage == "tile" and f.settings.get("workers") == 1]
        # the split run gives each kind of work one core: each stage alone on one core (one worker, one thread,
        # the engine on one thread; a lone predict worker otherwise takes every core)
        pred1 = [f for f in self.figures if f.stage == "predict" and f.settings.get("workers") == 1
                 and f.settings.get("threads_per_worker") == 1 and f.settings.get("engine_threads") == 1]
        if split and tile1 and pred1 and split.patches:
            # each stage alone on one worker, for the split run's work (seconds per patch x its patches). The
            # stage figures time the stage on a cluster already up and stop before it closes, so the split run
            # is the run's own time too (its cluster's start and close are in the wall time and the
            # first-report fraction, not here)
            slower = max(min(f.seconds / f.patches for f in tile1 if f.patches),
                         min(f.seconds / f.patches for f in pred1 if f.patches)) * split.patches
            split_seconds = (split.settings.get("stage_seconds") or {}).get("total") or (
                split.seconds - split.settings.get("cluster_start_seconds", 0.0))
            out["split_vs_slower_stage_alone"] = split_seconds / slower if slower else None
        return out

    def fastest(self, stage: str) -> Figure | None:
        """The figure of ``stage`` with the highest patches/s (None when there is none)."""
        return max((f for f in self.figures if f.stage == stage), key=lambda f: f.rate, default=None)

    def to_json(self) -> dict:
        fastest = self.fastest("roof")
        return {"machine": self.machine, "settings": self.settings, "figures": [f.to_json() for f in self.figures],
                "roof_patches_per_second": self.rate("roof"),
                "roof_engine": fastest.engine if fastest else None,
                "predict_patches_per_second": self.rate("predict"),
                "predict_steady_patches_per_second": self.steady_rate(),
                "run_patches_per_second": self.rate("run"),
                "naive_patches_per_second": self.rate("naive"),
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


def _pngs_from_run(run: Path, out: Path, n: int) -> list[Path]:
    """Write ``n`` stored tiles as PNG files: the naive loop's input, one file per patch."""
    from PIL import Image

    from . import store

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for _, g in store.iter_inputs(Run.of(run).open_store("r")):
        tiles = g["tiles"][: n - len(files)]
        for i, t in enumerate(tiles):
            f = out / f"tile-{len(files):05d}.png"
            Image.fromarray(t).save(f)
            files.append(f)
        if len(files) >= n:
            break
    return files


def run_layouts(choice: dict, workers: tuple[int, ...]) -> list[tuple[int, int]]:
    """The ``(workers, threads per worker)`` of the streamed runs the bench times: the predict stage's fastest, and
    every worker of the largest count with one thread (``cancernet run``'s own default on that many cores) when that
    differs. The predict stage alone can be fastest on fewer workers (one engine with every core's threads), while a
    whole run also tiles, which more workers do in parallel."""
    layouts = [(int(choice["workers"]), int(choice["threads_per_worker"]))]
    if (max(workers), 1) not in layouts:
        layouts.append((max(workers), 1))
    return layouts


def run_choice(figures: list[Figure]) -> dict:
    """The whole run's fastest layout among the ``run`` (every worker tiles and scores) and ``run-split`` (some
    workers only score) figures, by patches/s over each run's own time (:func:`_own_rate`): what ``run --autotune``
    starts. The predict stage's choice stays the one for ``predict --autotune``."""
    runs = [f for f in figures if f.stage in ("run", "run-split")]
    if not runs:
        return {}
    f = max(runs, key=_own_rate)
    return {"workers": f.settings["workers"], "threads_per_worker": f.settings["threads_per_worker"],
            "score_workers": f.settings.get("score_workers") or 0, "patches_per_second": round(f.rate, 1)}


def _own_rate(f: Figure) -> float:
    """Patches/s over a run's own time, its cluster's start and close left out: the bench starts clusters of several
    shapes in one process, and one whose workers need another environment than the first's is spawned instead of
    forked from the warm forkserver (0.3-0.4 s to start instead of 0.1-0.2 s on a 2-vCPU VM), which a user's
    command, starting one cluster, does not pay."""
    own = (f.settings.get("stage_seconds") or {}).get("total") or (f.seconds - f.settings.get("cluster_start_seconds", 0.0))
    return f.patches / own if own > 0 else f.rate


def run_bench(cfg: BenchConfig, *, step=lambda msg: None) -> BenchResult:
    """Measure the roofs, tiling, the predict stage, end to end, and the naive loop, in this order.

    The best predict settings (by steady patches/s: what a long run gets) are the autotune choice for
    ``predict``; the whole run is timed with them and with every worker (:func:`run_layouts`), and with the work
    split, and its fastest layout is the choice for ``run`` (:func:`run_choice`).
    """
    import shutil
    import tempfile

    from .engines import OnnxEngine
    from .errors import CancerNetError
    from .synth import synth_slides

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
        backends = list(cfg.backends) if cfg.backends is not None else installed_backends()
        keras_backend = _keras_backend()

        step("model-only roof: ONNX Runtime" + "".join(f", Keras-{b}" for b in backends))
        try:
            onnx = OnnxEngine(model_dir, device=cfg.device)
            sample = random_tiles(max(cfg.batch_sizes) * 2)
            figures += [roof(onnx, sample, bs, min_seconds=cfg.roof_seconds) for bs in cfg.batch_sizes]
            if onnx.micro_batch:  # the same model in whole batches (one call each), as engines ran it before
                onnx.micro_batch = 0
                figures.append(roof(onnx, sample, min(cfg.batch_sizes), min_seconds=cfg.roof_seconds))
            del onnx
        except CancerNetError as exc:  # e.g. no CUDA provider for --device gpu
            log.warning("ONNX Runtime roof skipped: %s", exc)
        for b in backends:
            try:
                figures += keras_roofs(model_dir, b, cfg.batch_sizes, device=cfg.device, min_seconds=cfg.roof_seconds)
            except CancerNetError as exc:
                log.warning("%s", exc)

        if cfg.variants:
            step("variant roofs (ONNX Runtime): single, " + ", ".join(cfg.variants))
            try:
                figures += variant_roofs(model_dir, cfg.variants, work, batch_size=min(cfg.batch_sizes),
                                         min_seconds=cfg.roof_seconds,
                                         device=cfg.device)
            except CancerNetError as exc:
                log.warning("variant roofs skipped: %s", exc)

        step("tiling, and the decode roof and tile floor of the same tiles")
        run = work / "run-tile"
        figures.append(tile_stage(inputs, run, workers=max(cfg.workers)))
        figures += [f for f in (decode_roof(run, max(cfg.workers)), tile_floor(run, max(cfg.workers))) if f is not None]

        step("predict stage")
        for engine in cfg.engines:
            for w in cfg.workers:
                for t in cfg.threads:
                    for bs in cfg.batch_sizes:
                        try:
                            figures.append(predict_stage(run, model_dir, workers=w, threads=t, batch_size=bs,
                                                         engine=engine, device=cfg.device))
                        except CancerNetError as exc:
                            log.warning("predict stage with %s skipped: %s", engine, exc)
        stages = [f for f in figures if f.stage == "predict"]
        if not stages:
            raise CancerNetError("no engine could run the predict stage", hint="see the warnings above")
        best = max(stages, key=lambda f: f.settings["steady_patches_per_second"])
        engine = "keras" if best.engine.startswith("keras") else best.engine
        choice = {"engine": engine, "backend": keras_backend if engine == "keras" else None, "device": cfg.device,
                  "workers": best.settings["workers"], "threads_per_worker": best.settings["threads_per_worker"],
                  "batch_size": best.settings["batch_size"], "patches_per_second": round(best.rate, 1),
                  "steady_patches_per_second": best.settings["steady_patches_per_second"]}

        step("end to end (cancernet run, streaming) and the same stage by stage (the barrier version)")
        e2e = dict(batch_size=choice["batch_size"], engine=engine, device=cfg.device)
        streams = []
        for w, t in run_layouts(choice, cfg.workers):
            streams.append(end_to_end(inputs, work / f"run-e2e-{w}x{t}", model_dir, workers=w, threads=t, **e2e))
        figures += streams
        fastest = max(streams, key=lambda f: f.rate)  # the barrier version with the fastest stream's workers
        figures.append(end_to_end_barrier(inputs, work / "run-barrier", model_dir, workers=fastest.settings["workers"],
                                          threads=fastest.settings["threads_per_worker"], **e2e))
        if max(cfg.workers) >= 2:
            step("tiling and scoring on their own workers (each stage alone on one core for the overlap figure)")
            figures.append(tile_stage(inputs, work / "run-tile-1", workers=1))
            figures.append(predict_stage(run, model_dir, workers=1, threads=1, batch_size=choice["batch_size"],
                                         engine=engine, backend=choice["backend"], device=cfg.device,
                                         engine_threads=1))
            figures.append(end_to_end(inputs, work / "run-split", model_dir, workers=max(cfg.workers), threads=1,
                                      score_workers=1, **e2e))
        choice["run"] = run_choice(figures)

        step("naive loop")
        pngs = _pngs_from_run(run, work / "pngs", cfg.naive_count)
        if pngs:
            figures.append(naive_loop(model_dir, pngs, limit=cfg.naive_count))
        settings = {**asdict(cfg), "model_dir": str(model_dir), "inputs": inputs, "backends": backends,
                    "keras_backend": keras_backend}
        return BenchResult(machine(), settings, figures, choice)
    finally:
        if cfg.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":  # the child process of keras_roofs
    import sys

    if len(sys.argv) == 9 and sys.argv[1] == "roof":
        _roof_child(sys.argv[2:])
    else:
        sys.exit("usage: python -m cancernet_batch.bench roof MODEL_DIR BACKEND DEVICE BATCHES N_TILES MIN_SECONDS RESULT")
