"""Scoring: one Dask task per tile chunk of ``RUN/tiles.zarr``, one model per worker, resumable.

Each task opens the run's store *on the worker*, reads its chunk of uint8 tiles, runs the engine on
large batches and writes the chunk's probabilities and then its done flag straight into the store.
The client only sends small task descriptions and receives counts and timings: no pixels pass
through it. The model is loaded once per worker process (a ``WorkerPlugin`` warms a per-process
cache that every task uses), never shipped through the client.

Resume: chunks whose done flag is set are not submitted again. A chunk's write is atomic (zarr
writes whole chunk files by rename) and idempotent (the same model gives the same numbers), so a
chunk that was scored twice after a kill still holds exactly one set of probabilities.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import store
from ..cluster import SCORE, as_completed_windowed, dask_client, usable_cores, work_split
from ..config import PredictConfig
from ..errors import ModelError, ResolutionError, StorageError
from ..failures import Failure
from ..runfolder import Run

log = logging.getLogger(__name__)

STAGE = "predict"


@dataclass
class PredictSummary:
    """What a predict call did."""

    inputs: int = 0
    chunks_total: int = 0
    chunks_scored: int = 0
    chunks_skipped: int = 0
    tiles_scored: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0  # of ``seconds``: loading the model on the workers before the first chunk
    worker_seconds: float = 0.0
    failures: list[Failure] = field(default_factory=list)

    @property
    def patches_per_second(self) -> float:
        return self.tiles_scored / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_patches_per_second(self) -> float:
        """Patches/s once the workers hold the model: the rate a long run approaches."""
        busy = self.seconds - self.load_seconds
        return self.tiles_scored / busy if busy > 0 else 0.0


# --------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------

_ENGINES: dict[tuple, object] = {}
_ENGINE_LOCK = threading.Lock()
ENGINE_LOADS = {"count": 0}  # per process: how many times a model was loaded (tests check "once")


def _engine_key(cfg: PredictConfig) -> tuple:
    return (str(Path(cfg.model_dir).resolve()), cfg.engine, cfg.backend, cfg.device, cfg.engine_threads, cfg.batch_size,
            cfg.micro_batch)


def get_engine(cfg: PredictConfig):
    """The engine for ``cfg`` in this process, loaded on first use and then reused."""
    key = _engine_key(cfg)
    with _ENGINE_LOCK:
        eng = _ENGINES.get(key)
        if eng is None:
            from ..engines import load_engine

            if cfg.backend and cfg.engine != "onnx":
                os.environ.setdefault("KERAS_BACKEND", cfg.backend)
            if cfg.device == "gpu":
                # several workers may share one GPU: JAX must not grab 75 % of its memory in each of them
                os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
            eng = load_engine(cfg.model_dir, engine=cfg.engine, backend=cfg.backend, device=cfg.device,
                              threads=cfg.engine_threads, batch_size=cfg.batch_size, micro_batch=cfg.micro_batch)
            _ENGINES[key] = eng
            ENGINE_LOADS["count"] += 1
            log.info("loaded %s engine for %s in process %d", getattr(eng, "name", "?"), cfg.model_dir, os.getpid())
        return eng


try:
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    _WorkerPlugin = object


class EnginePlugin(_WorkerPlugin):
    """``WorkerPlugin`` that loads the model once when a worker starts (or joins later)."""

    name = "cancernet-engine"

    def __init__(self, cfg: PredictConfig):
        self.cfg = cfg

    async def setup(self, worker) -> None:  # noqa: D401 - distributed's hook
        """Load the model in a thread: the worker's event loop stays free meanwhile, so the worker takes and
        runs its first tasks (a slide's preflight and plan) while its model loads, not after."""
        import asyncio

        resources = getattr(worker.state, "total_resources", None) if hasattr(worker, "state") else None
        resources = resources if resources is not None else getattr(worker, "total_resources", {}) or {}
        if resources and SCORE not in resources:
            return  # a tiling-only worker never scores: no model in its memory (or on its GPU)
        await asyncio.to_thread(get_engine, self.cfg)

    def teardown(self, worker) -> None:
        pass


def score_chunk(run: Run, gid: str, index: int, start: int, stop: int, cfg: PredictConfig, *,
                tiles: np.ndarray | None = None, group=None) -> dict:
    """Score tiles ``[start, stop)`` of input ``gid`` and write probs, then the chunk's done flag.

    Runs on a worker. Returns only counts and timings. ``tiles`` and ``group``: that chunk's tiles and the
    input's group, when the caller has just written them (not read back).
    """
    t0 = time.perf_counter()
    engine = get_engine(cfg)
    g = group if group is not None else run.open_input(gid)
    tiles = g["tiles"][start:stop] if tiles is None else tiles
    t1 = time.perf_counter()
    out = engine.predict(tiles)  # in calls of cfg.batch_size tiles
    t2 = time.perf_counter()
    store.write_rows(store.data_array(g, "probs"), start, stop, out)
    store.set_flag(g, "done", index)
    return {"gid": gid, "index": index, "n": stop - start, "read_s": t1 - t0, "model_s": t2 - t1,
            "write_s": time.perf_counter() - t2, "pid": os.getpid()}


# --------------------------------------------------------------------------------------------
# client side
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scoring:
    """What scoring a run needs on the client: the settings (model path absolute, threads shared
    out) and the model's id, threshold and µm/px. Made by :func:`prepare_scoring`."""

    cfg: PredictConfig
    model_id: str
    threshold: float | None
    mpp: float


def prepare_scoring(run: Run, cfg: PredictConfig) -> Scoring:
    """Check the model and the run before anything is written, then record ``predict.json``.

    A run folder scored (in part) by another model is refused as a whole unless ``cfg.rescore``:
    one report must never mix one model's probabilities with another's threshold.
    """
    from ..modelfolder import META_FILE, ModelFolder

    if not ModelFolder(cfg.model_dir).meta.exists():
        raise ModelError(f"no {META_FILE} in the model folder", path=cfg.model_dir,
                         hint="give the folder written by `cancernet train`")
    from ..model import read_meta, require_raw_input

    meta = read_meta(cfg.model_dir)
    require_raw_input(meta, cfg.model_dir)
    cfg = replace(cfg, model_dir=str(Path(cfg.model_dir).resolve()))
    if not cfg.rescore and run.exists():
        others = sorted({str(m) for m in _scored_by(run) if m != meta.model_id})
        if others:
            raise StorageError(f"this run was scored by model {', '.join(others)}, not {meta.model_id}", path=run.root,
                               hint="score into a new run folder, or pass --rescore to score every input again")
    if cfg.engine_threads is None and not cfg.cluster.scheduler:
        # a local cluster (ours, or the one `run` shares): share the cores between workers instead of
        # letting each engine take them all
        workers, threads = cfg.cluster.local_shape()
        cfg = replace(cfg, engine_threads=max(1, usable_cores() // (workers * threads)))
    run.create().write_predict_record(
        {"model_dir": cfg.model_dir, "model_id": meta.model_id, "threshold": meta.threshold, "mpp": meta.mpp,
         "engine": cfg.engine, "backend": cfg.backend, "device": cfg.device, "batch_size": cfg.batch_size})
    return Scoring(cfg, meta.model_id, meta.threshold, meta.mpp)


def _scored_by(run: Run) -> set:
    """The models whose predictions the run's inputs hold (each input's ``probs`` document read once, all at once)."""
    root = run.open_store("r", clean=False)
    probs = store.member_attributes(root, [f"inputs/{gid}/probs" for gid, _ in store.iter_inputs(root, complete_only=False)])
    return {attrs.get("model_id") for attrs in probs.values() if attrs is not None}


def settle_task(run: Run, gid: str, scoring: Scoring, report: tuple | None = None,
                present: frozenset | None = None) -> dict:
    """Worker: for an input tiled before (a re-run, a resumed night), its predictions set up and the chunks still to
    score (``"score"``: :func:`input_chunks_to_score`), found here rather than by the client, one input after
    another. ``report``: ``(patient, threshold, ReportConfig)``; when nothing is left to score, the input's report
    part is made (or kept) here too (``"report"``: :func:`~cancernet_batch.stages.report.report_task`'s result),
    from the group this task has open: a finished input costs one task, not two. ``present``: which of its report
    files the client's listing found (see :func:`~cancernet_batch.stages.report.report_task`)."""
    g = run.open_input(gid)
    read: dict = {}  # its done flags, coords and probabilities as read here: the report reads them no more
    chunks = input_chunks_to_score(g, gid, scoring, read=read)
    if report is None or chunks[0]:
        return {"score": chunks}
    from .report import report_task

    return {"score": chunks, "report": report_task(run, gid, *report, group=g, read=read, present=present)}


def input_chunks_to_score(g, gid: str, scoring: Scoring, *, made: bool = False, read: dict | None = None
                          ) -> tuple[list[tuple[str, int, int, int]], int]:
    """The unscored chunks ``[(gid, index, start, stop)]`` of one tiled input (its predictions set up)
    and how many chunks it has.

    ``made``: ``g`` is a group just made with its ``probs``/``done`` (:func:`store.prediction_specs` given to
    :func:`store.create_input`, as the stream's prepare task does): every chunk is to score, nothing to look
    up or read back. Raises (for the input's failure row) when it was tiled at another µm/px than the
    model's, or when its predictions cannot be set up. ``read``: a dict that receives the arrays read here (done
    flags, coords, probabilities; as :func:`store.validate_input`), for the input's report next.
    """
    attrs = g.attrs
    tiled_mpp = attrs.get("target_mpp")
    mpp = scoring.mpp
    if mpp is not None and tiled_mpp is not None and abs(float(tiled_mpp) - mpp) > 1e-3 * mpp:
        raise ResolutionError(f"tiled at {float(tiled_mpp):g} µm/px but the model expects {mpp:g} µm/px",
                              path=attrs.get("source", gid), hint="re-tile into a new run folder with --model MODEL_DIR")
    if made:
        bounds = store.chunk_bounds(int(g["tiles"].shape[0]), int(attrs["chunk"]))
        return [(gid, i, s, e) for i, (s, e) in enumerate(bounds)], len(bounds)
    # the checks below look the same arrays up many times: all of them at once (one listing and concurrent
    # reads of their documents; on object storage this runs on the client, one input after the other)
    g = store.NodeCache(g).load_members()
    new = "probs" not in g and "done" not in g
    store.ensure_predictions(g, scoring.model_id, reset=scoring.cfg.rescore)
    n = int(g["tiles"].shape[0])
    if new:  # just made: no chunk is done, nothing to read back
        done = np.zeros(int(g["done"].shape[0]), bool)
    else:  # a done flag without probabilities is scored again, never reported as 0 %
        read = {} if read is None else read
        store.clear_unproven_done(g, read)  # each array read once: the flags and probabilities go on in `read`
        done = read["done"] if "done" in read else store.done_mask(g)
    store.check_input(g, gid, done=done, read=read)
    chunk = int(g.attrs.get("chunk", g["tiles"].chunks[0]))
    return [(gid, i, s, e) for i, (s, e) in enumerate(store.chunk_bounds(n, chunk)) if not done[i]], len(done)


def plan_chunks(run: Run, scoring: Scoring) -> tuple[list[tuple[str, int, int, int]], int, int, list[Failure]]:
    """Chunks still to score: ``[(gid, index, start, stop)]``, plus inputs, skipped count and failures."""
    root = run.open_store("r+")
    todo: list[tuple[str, int, int, int]] = []
    skipped = 0
    inputs = 0
    failures: list[Failure] = []
    damaged: list = []
    for gid, g in store.iter_inputs(root, damaged=damaged):
        inputs += 1
        try:
            chunks, nchunks = input_chunks_to_score(g, gid, scoring)
        except Exception as exc:  # noqa: BLE001 - one input never stops the batch
            failures.append(Failure.from_exception(g.attrs.get("source", gid), "predict", exc))
            continue
        todo += chunks
        skipped += nchunks - len(chunks)
    failures += [d.failure(STAGE) for d in damaged]
    return todo, inputs, skipped, failures


def predict_run(run_dir: "str | os.PathLike | Run", cfg: PredictConfig, *, progress: Callable[[int], None] | None = None,
                on_dashboard: Callable[[str], None] | None = None, client=None) -> PredictSummary:
    """Score every unscored tile chunk of the run with Dask and record failures.

    ``client``: an already connected ``distributed.Client``; otherwise one is made from ``cfg.cluster``.
    """
    run = Run.of(run_dir)
    run.open_store("r")  # a missing or foreign run folder fails here, before anything is written
    with run.lock("predict"):
        scoring = prepare_scoring(run, cfg)
        todo, inputs, skipped, failures = plan_chunks(run, scoring)
        summary = PredictSummary(inputs=inputs, chunks_total=len(todo) + skipped, chunks_skipped=skipped,
                                 failures=failures)
        t0 = time.perf_counter()
        if todo:
            with contextlib.nullcontext(client) if client is not None else dask_client(
                    scoring.cfg.cluster, on_dashboard=on_dashboard) as c:
                _run_tasks(c, run, scoring.cfg, todo, summary, progress)
        summary.seconds = time.perf_counter() - t0
        failed_inputs = {f.input for f in summary.failures}
        ok_inputs = {g.attrs.get("source", gid) for gid, g in store.iter_inputs(run.open_store("r"))
                     if store.done_mask(g).all()} - failed_inputs
        run.record_failures(summary.failures, retried=ok_inputs, from_stage=STAGE)
    log.info("scored %d tiles in %.1f s (%.0f patches/s); %d chunks skipped", summary.tiles_scored,
             summary.seconds, summary.patches_per_second, skipped)
    return summary


def load_engines(client, cfg: PredictConfig) -> float:
    """Load the model once on every (scoring) worker; returns the seconds it took."""
    t0 = time.perf_counter()
    try:
        client.register_plugin(EnginePlugin(cfg), name=EnginePlugin.name)
    except Exception as exc:  # noqa: BLE001 - a worker that cannot load the model
        raise ModelError(f"workers could not load the model: {exc}", path=cfg.model_dir,
                         hint="check the model folder is readable from every worker and the engine is installed") from exc
    return time.perf_counter() - t0


def submit_score(client, run: Run, item: tuple, cfg: PredictConfig, *, split: bool = False, priority: int = 0):
    """Submit :func:`score_chunk` for ``item = (gid, index, start, stop)``; on scoring workers when ``split``."""
    return client.submit(score_chunk, run, *item, cfg, pure=False, retries=2, priority=priority,
                         resources={SCORE: 1} if split else None,
                         key=f"score-{item[0]}-{item[1]}-{time.monotonic_ns()}")


def _run_tasks(client, run: Run, cfg: PredictConfig, todo, summary: PredictSummary, progress) -> None:
    summary.load_seconds = load_engines(client, cfg)
    split = work_split(client)
    nthreads = sum(client.nthreads().values()) or 1
    window = max(2, cfg.max_inflight_per_thread * nthreads)
    sources: dict[str, str] = {}
    for gid, g in store.iter_inputs(run.open_store("r")):
        sources[gid] = g.attrs.get("source", gid)
    failed_gids: set[str] = set()
    chunks = (item for item in todo if item[0] not in failed_gids)  # lazily: chunks of failed inputs are dropped

    for item, fut in as_completed_windowed(chunks, lambda item: submit_score(client, run, item, cfg, split=split),
                                           window):
        try:
            res = fut.result()
        except Exception as exc:  # noqa: BLE001 - record and go on with the other inputs
            gid = item[0]
            if gid not in failed_gids:
                failed_gids.add(gid)
                summary.failures.append(Failure.from_exception(sources.get(gid, gid), STAGE, exc))
                log.warning("%s: scoring failed: %s", sources.get(gid, gid), exc)
        else:
            summary.chunks_scored += 1
            summary.tiles_scored += res["n"]
            summary.worker_seconds += res["read_s"] + res["model_s"] + res["write_s"]
            if progress is not None:
                progress(res["n"])
