"""``cancernet tile``: inputs into ``RUN/tiles.zarr`` with Dask, resumable, one bad input never stops the run.

The work, all on Dask workers (the client sends paths and receives counts; no pixels pass it):

1. **prepare** per slide, one task: its **preflight** (open it and decode a few pixels in a child
   process with a timeout, :mod:`cancernet_batch.preflight`), then its plan
   (:func:`cancernet_batch.tiling.plan_slide`: resolution, level, grid, tissue), then its group in the
   store with its ``coords``, ``tissue`` map and ``thumbnail`` (and, in a run that scores, its
   ``probs``/``done`` arrays); or, for an interrupted input with the same plan, keep it and list the
   chunks still missing. Files of one DICOM series are one slide: they are preflighted first, each in
   its own task, then the first file (by name) stands for the series, the others listed in its
   ``series_files``.
2. **chunk** tasks: each reads the pixels of one store chunk of tiles (``chunk`` tiles; the last one
   shorter), writes the tiles, then the chunk's ``tiled`` flag.
3. The client marks an input ``complete`` (store attrs) once all its chunks are written (the prepare
   task does, when it wrote the only chunk itself).

Patient folders are one task each (load the patches, write all chunks).

Re-running skips inputs that are complete and whose source (size, mtime) and settings are
unchanged; interrupted inputs finish only their missing chunks; changed ones are redone. Failures
go to ``RUN/failures.csv`` (input, stage, error class, message); inputs that succeed on a retry
lose their old rows.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from .. import deadline, store
from ..cluster import ClusterConfig
from ..errors import CancerNetError, SlideReadError, StorageError
from ..failures import Failure
from ..runfolder import Run
from ..tiling import InputSpec, TileConfig, TilePlan, plan_patches, plan_slide, read_tiles, source_stat

log = logging.getLogger(__name__)

@dataclass
class TileSummary:
    """What one ``tile`` call did."""

    run_dir: str = ""
    tiled: list[str] = field(default_factory=list)  # inputs completed by this call
    resumed: list[str] = field(default_factory=list)  # of those, inputs that kept earlier chunks
    skipped: list[str] = field(default_factory=list)  # complete and unchanged: no work
    series_members: dict[str, str] = field(default_factory=dict)  # file -> the file standing for its series
    failures: list[Failure] = field(default_factory=list)
    plans: dict[str, dict] = field(default_factory=dict)  # source -> plan summary
    tiles_written: int = 0
    chunks_written: int = 0
    chunks_kept: int = 0  # chunks of interrupted inputs already on disk
    seconds: float = 0.0

    @property
    def failed_inputs(self) -> list[str]:
        return sorted({f.input for f in self.failures})


# --------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------

_READERS: "OrderedDict[str, object]" = OrderedDict()
_READERS_LOCK = threading.Lock()
_MAX_READERS = 4


def _local_key(source: str) -> str | None:
    """What a local file's reader is kept under (:func:`_reader`): its path, size and mtime; None for an object."""
    from ..remote import is_url

    if is_url(source):
        return None
    st = os.stat(source)
    return f"{source}|{st.st_size}|{st.st_mtime_ns}"


def _reader(source: str, storage_options: dict | None = None, stage_limit_gb: float | None = None,
            header: "list[int] | None" = None, identity: tuple[int, str] | None = None,
            preflighted: "tuple[str, dict] | None" = None):
    """An open reader for ``source``, kept per worker process (a few at a time) across tasks.

    Keyed by the source's identity: size and mtime, or for an object on object storage size and ETag, so a
    changed source is opened again. An object: ``identity``, when the caller knows it (the plan's, for a chunk
    task), finds the reader this process opened for it without a request; an object this process has no reader
    for is looked up in the same round of requests that fetches its header (``header``: where it lies, the
    plan's ``source_header``); else one HEAD finds which reader is current. ``preflighted``: ``(key, info)``, a local
    file's key (:func:`_local_key`) as it was when its preflight child read its metadata ``info`` (JSON): a reader this
    process opens for that same key is made from it (OpenSlide opens the file only if a read needs it)."""
    from ..remote import is_url, stat
    from ..slides import SlideInfo, open_slide

    def key_of(ident) -> str:
        return f"{source}|{ident[0]}|{ident[1]}"

    with _READERS_LOCK:
        ident = None
        if is_url(source):
            held = [k for k in _READERS if k.rsplit("|", 2)[0] == source]
            if identity is not None and key_of(identity) in held:
                ident = identity
            elif not held:  # open: its look-up is in the header's round
                r = open_slide(source, storage_options=storage_options, stage_limit_gb=stage_limit_gb, header=header)
                return _keep(key_of(r.source_identity), r)
            else:
                ident = stat(source, storage_options)
            key = key_of(ident)
        else:
            key = _local_key(source)
        r = _READERS.pop(key, None)
        if r is None:
            info = SlideInfo.from_json(preflighted[1]) if preflighted is not None and preflighted[0] == key else None
            r = open_slide(source, storage_options=storage_options, stage_limit_gb=stage_limit_gb, identity=ident,
                           header=header, info=info)
        return _keep(key, r)


def _keep(key: str, r):
    """Keep reader ``r`` under ``key`` as the most recent (under ``_READERS_LOCK``), closing the oldest beyond
    :data:`_MAX_READERS`; ``r``."""
    _READERS.pop(key, None)
    _READERS[key] = r
    while len(_READERS) > _MAX_READERS:
        _, old = _READERS.popitem(last=False)
        old.close()
    return r


def _drop_reader(source: str, *, close: bool = True) -> None:
    """Forget readers of ``source`` (OpenSlide errors are sticky: a failed handle stays failed).

    ``close=False`` leaves them open: a thread still stuck in a read holds them (see :mod:`..deadline`).
    """
    with _READERS_LOCK:
        for key in [k for k in _READERS if k.rsplit("|", 2)[0] == source]:
            r = _READERS.pop(key)
            if close:
                r.close()


def _bounded_read(fn, source: str, what: str, cfg: TileConfig):
    """``fn()`` within ``cfg.read_timeout`` seconds (:func:`cancernet_batch.deadline.bounded`)."""
    return deadline.bounded(fn, cfg.read_timeout, path=source, what=what,
                            on_timeout=lambda: _drop_reader(source, close=False))


def preflight_task(source: str, timeout: float, storage_options: dict | None = None,
                   stage_limit_gb: float | None = None) -> dict | Failure:
    """Worker: the preflight of one slide (in a child process). Slide metadata as JSON, or a Failure."""
    from ..preflight import preflight

    try:
        return preflight(source, timeout=timeout, storage_options=storage_options,
                         stage_limit_gb=stage_limit_gb).to_json()
    except CancerNetError as exc:
        return Failure.from_exception(source, "preflight", exc)


def _same_plan(g, plan: TilePlan, chunk: int) -> bool:
    a = g.attrs
    return (a.get("source_size") == plan.source_size and a.get("source_mtime") == plan.source_mtime
            and a.get("target_mpp") == plan.target_mpp and a.get("level") == plan.level
            and a.get("tissue_threshold") == plan.tissue_threshold and a.get("n_tiles") == plan.n_tiles
            and (a.get("extra") or {}).get("source_etag") == plan.source_etag
            and _chunk_ok(a.get("chunk"), plan.n_tiles, chunk) and abs(float(a.get("level0_tile_px", 0)) - plan.level0_tile_px) < 1e-9
            and (a.get("extra") or {}).get("decode") == plan.decode
            and (a.get("extra") or {}).get("decode_path") == plan.decode_path  # the DCT's scale (its rule may change)
            and "tiled" in g and np.array_equal(np.asarray(g["coords"][:]), plan.coords))


def edge_chunk(chunk: int, n: int = 0, parts: int = 0) -> int:
    """The smaller chunk (an eighth, at least 8 tiles) of the first and last inputs of a streamed run.

    Scoring can start only once a chunk is tiled, and the run ends only once the last chunk is scored:
    with whole-size chunks the scoring workers wait for the first input's first 1,024 tiles and the
    tiling workers for the last input's last scoring (the pipeline's fill and drain). Smaller chunks at
    both ends shorten both; in between, whole chunks keep the per-task cost low.

    ``parts`` (an input of ``n`` tiles that is first in a run whose ``parts`` tiling threads also score): the
    chunk that cuts it into ``parts`` equal chunks, one per thread, each tiled and scored in one task side by side
    (at most ``chunk``; one thread: whole chunks). Eighths spread unevenly over the threads (7 chunks: 4 on one, 3
    on the other) and, tiled in small pieces on alternate workers, decoded the source tiles at their edges twice
    (0.31-0.34 ms a tile against 0.18-0.19 in whole chunks): its first report came 0.1-0.2 s later (RESULTS.md
    section 10).
    """
    if parts > 0 and n > 0:
        return min(chunk, -(-n // parts))
    return min(chunk, max(8, chunk // 8))


def _chunk_ok(stored, n: int, chunk: int) -> bool:
    """Whether an input stored in chunks of ``stored`` tiles fits the settings ``chunk``: any size up to the whole
    (a resumed run keeps the layout an input has, whichever end of an earlier run it was at, and however many
    threads cut the first input)."""
    return isinstance(stored, int) and not isinstance(stored, bool) and 1 <= stored <= store.input_chunk(n, chunk)


def prepare_slide_task(run: Run, source: str, cfg: TileConfig, series_files: list[str], edge: bool = False,
                       preflight: bool = False, scoring=None, tile_first: bool = False,
                       parts: int = 0) -> dict | Failure:
    """Worker: plan a slide and set up its group. Returns the chunks still to write, or a Failure.

    ``edge``: a new group gets chunks of :func:`edge_chunk` tiles (an input at either end of a streamed run;
    with ``parts``, the first input cut into that many equal chunks); a group already there with the same plan
    keeps its chunks. ``preflight``: the slide's preflight first
    (:func:`preflight_task`): one task a slide instead of two. ``scoring`` (a
    :class:`~cancernet_batch.stages.score.Scoring`, when the run scores): the input's predictions are set up
    here as well, a new group's ``probs`` and ``done`` made with its other arrays; the result's ``score``
    holds ``(chunks to score, number of chunks)``, or ``score_error`` the Failure of an input that cannot be
    scored. ``tile_first``: the first chunk still to write is tiled here too (as :func:`tile_chunk_task` does), listed in
    ``tiled`` instead of ``todo`` (an input of one chunk needs no other task, and the worker does not wait for
    the client between the plan and the first tiles); a failure to read it comes back as ``chunk_error``. An
    input left with no chunk to write is marked complete here (``complete`` in the result). With ``scoring``,
    ``attrs`` holds the group's attributes (for its report)."""
    preflighted = None
    if preflight:
        seen = _local_key(source) if os.path.isfile(source) else None  # the file the child is about to read
        checked = preflight_task(source, cfg.preflight_timeout, run.input_options, cfg.stage_cache_gb)
        if isinstance(checked, Failure):
            return checked
        preflighted = (seen, checked) if seen is not None else None
    header = checked.get("source_header") if preflight else None  # the preflight child found the object's header
    try:
        plan = _bounded_read(lambda: plan_slide(source, cfg, reader=_reader(source, run.input_options, cfg.stage_cache_gb,
                                                                            header, preflighted=preflighted),
                                                series_files=series_files),
                             source, "planning the slide", cfg)
    except CancerNetError as exc:
        _drop_reader(source)
        return Failure.from_exception(source, "plan", exc)
    inputs = run.inputs_group()
    gid = store.input_id(source)
    kept = 0
    made = False  # the group made here, with its predictions' arrays
    try:
        stored = inputs[gid]  # one read of its document (was: the root's, inputs', and the group's twice)
    except KeyError:
        stored = None
    present = stored is not None
    if stored is not None and _same_plan(stored, plan, cfg.chunk):
        g = stored
        bounds = store.chunk_bounds(plan.n_tiles, int(g.attrs["chunk"]))
        g.update_attributes({**plan.attrs().to_json(), "complete": False})
        done = store.tiled_mask(g)
        todo = [(i, s, e) for i, (s, e) in enumerate(bounds) if not done[i]]
        kept = len(bounds) - len(todo)
    else:
        c = store.input_chunk(plan.n_tiles, edge_chunk(cfg.chunk, plan.n_tiles, parts) if edge else cfg.chunk)
        bounds = store.chunk_bounds(plan.n_tiles, c)
        rows, cols = plan.grid_shape
        th = plan.thumbnail
        arrays = {"tissue": dict(shape=(rows, cols), chunks=(rows, cols), dtype="float32"),
                  "thumbnail": dict(shape=th.shape, chunks=(min(th.shape[0], 1024), min(th.shape[1], 1024), 3),
                                    dtype="uint8", compressors=store.tiles_compressor())}
        if scoring is not None:
            arrays.update(store.prediction_specs(plan.n_tiles, c, scoring.model_id))
            made = True
        # coords, tissue map and thumbnail are on disk before the group's attrs (the plan _same_plan keeps)
        g = store.create_input(None, plan.attrs(), plan.n_tiles, chunk=c, arrays=arrays, present=present,
                               data={"coords": plan.coords, "tissue": plan.tissue, "thumbnail": th}, inputs=inputs)
        todo = list((i, s, e) for i, (s, e) in enumerate(bounds))
    out = {"gid": gid, "n": plan.n_tiles, "todo": todo, "kept": kept, "level": plan.level,
           "tile_px": plan.tile_px_level, "summary": plan.summary(), "tiled": [],
           "preflighted": preflighted}  # for its chunk tasks on other workers: no second open there either
    if scoring is not None:  # its report needs them: the client does not read them back
        out["attrs"] = {k: v for k, v in g.attrs.items() if k != store.ARRAY_DOCS}
    if tile_first and todo:
        try:
            index, start, stop = todo[0]  # the group and its coords are in hand: no reading them back
            _write_chunk(run, g, source, index, start, stop, plan.coords[start:stop], plan.level, plan.tile_px_level, cfg,
                         plan=plan.attrs().to_json())
        except Exception as exc:  # noqa: BLE001 - the input fails at its tiles, as a chunk task would
            out["chunk_error"] = exc
            return out
        out["tiled"], out["todo"] = todo[:1], todo[1:]
    if not out["todo"]:  # every chunk written (here, or before a resume): complete, without the client's write
        store.mark_complete(g)
        out["complete"] = True
    return _with_scoring(out, g, gid, source, scoring, made)


def _with_scoring(out: dict, g, gid: str, source: str, scoring, made: bool) -> dict:
    """``out`` with the input's chunks to score (``"score"``, as
    :func:`~cancernet_batch.stages.score.input_chunks_to_score` returns them) or why it cannot be scored
    (``"score_error"``: a failure of this input only, e.g. tiled at another µm/px); ``out`` alone without
    ``scoring``."""
    if scoring is not None:
        from .score import input_chunks_to_score

        try:
            out["score"] = input_chunks_to_score(g, gid, scoring, made=made)
        except Exception as exc:  # noqa: BLE001 - e.g. another µm/px: this input is not scored, the others go on
            out["score_error"] = Failure.from_exception(source, "predict", exc)
    return out


def tile_chunk_task(run: Run, gid: str, source: str, index: int, start: int, stop: int, level: int,
                    tile_px: float, cfg: TileConfig, scoring=None, report=None,
                    preflighted: "tuple[str, dict] | None" = None) -> int | dict:
    """Worker: read, resample and write tiles ``[start, stop)`` of one input, then the chunk's flag; the number
    of tiles. With ``scoring`` (a :class:`~cancernet_batch.stages.score.PredictConfig`; the workers that tile
    also score), the chunk is scored here too, from the tiles in hand: ``{"n": tiles, "score": score_chunk's
    result, or the exception that scoring raised}`` (tiles, flag, probabilities, done flag: the order of two tasks).
    ``report`` (``(patient, threshold, ReportConfig, claim)``, with ``scoring``): when this chunk is the input's last
    to be scored (and wins the claim), its report part is made here too (:func:`~cancernet_batch.stages.report.report_if_last`), in
    ``"report"``: ``report_task``'s result, None (not the last), or the exception it raised. ``preflighted``: the
    slide's preflight answer, as its prepare task returned it (``"preflighted"``): a worker that has no reader of the
    slide yet makes it from that (see :func:`_reader`)."""
    g = run.open_input(gid)
    tiles = _write_chunk(run, g, source, index, start, stop, np.asarray(g["coords"][start:stop]), level, tile_px, cfg,
                         plan=g.attrs, preflighted=preflighted)
    if scoring is None:
        return len(tiles)
    from .score import score_chunk

    try:
        scored = score_chunk(run, gid, index, start, stop, scoring, tiles=tiles, group=g)
    except Exception as exc:  # noqa: BLE001 - the tiles are written; the client fails the input at its scoring
        scored = exc
    out = {"n": len(tiles), "score": scored}
    if report is not None and not isinstance(scored, BaseException):
        from .report import report_if_last

        try:
            out["report"] = report_if_last(run, gid, g, *report)
        except StorageError:
            raise  # the output folder itself is unwritable or full: the run stops
        except Exception as exc:  # noqa: BLE001 - this input's report only (as for a report task)
            out["report"] = exc
    return out


def _write_chunk(run: Run, g, source: str, index: int, start: int, stop: int, coords: np.ndarray, level: int,
                 tile_px: float, cfg: TileConfig, plan: "dict | None" = None,
                 preflighted: "tuple[str, dict] | None" = None) -> np.ndarray:
    """Read the tiles at ``coords`` (those of ``[start, stop)``), write them into group ``g``, then the chunk's
    flag; the tiles. ``plan``: the input's attrs as its plan wrote them (an object's identity and where its TIFF
    header lies: see :func:`_reader`)."""
    extra = (plan or {}).get("extra") or {}
    identity = (plan["source_size"], extra["source_etag"]) if extra.get("source_etag") else None
    try:
        tiles = _bounded_read(lambda: read_tiles(_reader(source, run.input_options, cfg.stage_cache_gb,
                                                         extra.get("source_header"), identity, preflighted), level,
                                                 tile_px, coords, decode=cfg.decode), source,
                              f"reading tiles {start}-{stop}", cfg)
    except CancerNetError:
        _drop_reader(source)
        raise
    store.write_tiles(g, start, stop, tiles)
    store.set_flag(g, "tiled", index)
    return tiles


def patches_task(run: Run, source: str, cfg: TileConfig, scoring=None) -> dict | Failure:
    """Worker: load one patient folder and write all its chunks, then mark it complete (with its other attrs:
    one write). Bad patch files come back as failures. With ``scoring`` (a
    :class:`~cancernet_batch.stages.score.Scoring`), its predictions' arrays are made with its group and its
    chunks to score come back as ``"score"`` (as :func:`prepare_slide_task`'s): the client sets nothing up
    (on object storage: a listing and some ten requests an input, one input after the other)."""
    from ..patches import grid_shape, load

    try:
        ps = _bounded_read(lambda: load(source, storage_options=run.input_options), source,
                           "reading the patient's patches", cfg)
        plan = plan_patches(source, cfg, run.input_options)
    except CancerNetError as exc:
        return Failure.from_exception(source, "tile", exc)
    plan = replace(plan, coords=ps.coords, grid_shape=grid_shape(ps.coords), patient=str(ps.patients[0]))
    root = run.open_store("r+", clean=False)
    n = len(ps)
    c = store.input_chunk(n, cfg.chunk)
    arrays = store.prediction_specs(n, c, scoring.model_id) if scoring is not None else None
    g = store.create_input(root, plan.attrs(), n, chunk=c, labels=True, arrays=arrays)
    for i, (s, e) in enumerate(store.chunk_bounds(n, c)):
        store.write_tiles(g, s, e, ps.tiles[s:e])
        store.write_rows(g["coords"], s, e, ps.coords[s:e])
        store.write_rows(g["labels"], s, e, ps.labels[s:e])
        store.set_flag(g, "tiled", i)
    store.mark_complete(g, extra={**g.attrs["extra"], "padded": ps.padded, "duplicates": len(ps.duplicates)})
    failures = [Failure(f.input, "tile", f.error_class, f.message) for f in ps.failures]
    gid = store.input_id(source)
    out = {"gid": gid, "n": n, "chunks": len(store.chunk_bounds(n, c)), "failures": failures,
           "summary": plan.summary(), "complete": True}
    return _with_scoring(out, g, gid, source, scoring, made=True)


# --------------------------------------------------------------------------------------------
# client side
# --------------------------------------------------------------------------------------------

def is_fresh(attrs: dict, spec: InputSpec, cfg: TileConfig, storage_options: dict | None = None) -> bool:
    """True when a stored input is complete and matches the source (on disk: size and mtime; on object
    storage: size and ETag, one HEAD request; a patient folder or a DICOM series there: total size and a digest
    of its objects' names and ETags, one LIST) and these settings."""
    from ..remote import folder_stat, is_url, series_stat, stat

    if not attrs.get("complete"):
        return False
    extra = attrs.get("extra") or {}
    if is_url(spec.source):
        try:
            if extra.get("series_files"):  # a DICOM series: its files' total size and digest (one LIST)
                size, etag = series_stat(extra["series_files"], storage_options)
            else:
                size, etag = (folder_stat if spec.kind == "patches" else stat)(spec.source, storage_options)
        except CancerNetError:
            return False
        if size != attrs.get("source_size") or etag != extra.get("source_etag"):
            return False
    else:
        try:
            size, mtime = source_stat(spec.source, spec.kind, extra.get("series_files"))
        except OSError:
            return False
        if size != attrs.get("source_size") or mtime != attrs.get("source_mtime"):
            return False
    if attrs.get("target_mpp") != cfg.target_mpp or not _chunk_ok(attrs.get("chunk"), attrs.get("n_tiles", 0), cfg.chunk):
        return False
    if spec.kind == "slide":
        if attrs.get("tissue_threshold") != (cfg.tissue_threshold if cfg.tissue_filter else None):
            return False
        if extra.get("mpp_source") == "override" and attrs.get("source_mpp") != cfg.mpp_override:
            return False
        if extra.get("decode", "reader") != cfg.decode:
            return False
        if cfg.decode == "fast" and not _same_dct_rule(extra):
            return False
    return True


def _same_dct_rule(extra: dict) -> bool:
    """Whether an input tiled with ``--decode fast`` has the tiles the DCT's rule gives now: none of its tiles was
    scaled in the DCT, or they were under today's rule (:data:`~cancernet_batch.slides.direct.DCT_RULE`)."""
    from ..slides.direct import DCT_RULE

    return "in the DCT" not in str(extra.get("decode_path", "")) or extra.get("dct_rule", 1) == DCT_RULE


def tile_run(paths: list[str | os.PathLike], run_dir: "str | os.PathLike | Run", cfg: TileConfig, *,
             cluster: ClusterConfig | None = None, client=None,
             progress: Callable[[int, int], None] | None = None,
             on_dashboard: Callable[[str], None] | None = None) -> TileSummary:
    """Tile ``paths`` (files, folders, patient folders) into the run's tile store; see the module doc.

    ``progress(tiles_done, tiles_added)`` is called as work is planned and done. ``client``: an
    already connected ``distributed.Client``; otherwise one is made from ``cluster``. The work
    flows through the same machinery as ``cancernet run`` (:mod:`cancernet_batch.stages.flow`),
    with scoring and reporting left out.
    """
    from .flow import Flow

    import time

    t0 = time.perf_counter()
    run = Run.of(run_dir)
    with run.create().lock("tile"):
        flow = Flow(run, tile_cfg=cfg, tile_progress=progress)
        flow.discover(paths)
        flow.execute(client, cluster or ClusterConfig(), on_dashboard=on_dashboard)
    flow.tile.seconds = time.perf_counter() - t0
    log.info("tiled %d inputs (%d tiles), %d skipped, %d failed in %.1f s", len(flow.tile.tiled),
             flow.tile.tiles_written, len(flow.tile.skipped), len(flow.tile.failed_inputs), flow.tile.seconds)
    return flow.tile


def _worker_error(source: str, exc: BaseException) -> BaseException:
    if isinstance(exc, CancerNetError):
        return exc
    if type(exc).__name__ == "KilledWorker":
        return SlideReadError("the slide reader crashed: the worker process died reading this file", path=source,
                              hint="the file is probably corrupt in places; re-export it, or leave it out")
    return exc
