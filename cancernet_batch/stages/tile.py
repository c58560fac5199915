"""``cancernet tile``: inputs into ``RUN/tiles.zarr`` with Dask, resumable, one bad input never stops the run.

The work, all on Dask workers (the client sends paths and receives counts; no pixels pass it):

1. **preflight** per slide: open it and decode a few pixels in a child process with a timeout
   (:mod:`cancernet_batch.preflight`). Files of one DICOM series are one slide: the first file (by
   name) stands for the series, the others are listed in its ``series_files``.
2. **prepare** per slide: plan it (:func:`cancernet_batch.tiling.plan_slide`: resolution, level,
   grid, tissue), then create its group in the store with its ``coords``, ``tissue`` map and
   ``thumbnail``; or, for an interrupted input with the same plan, keep it and list the chunks
   still missing.
3. **chunk** tasks: each reads the pixels of one store chunk of tiles (``chunk`` tiles; the last one
   shorter), writes the tiles, then the chunk's ``tiled`` flag.
4. The client marks an input ``complete`` (store attrs) once all its chunks are written.

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
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import store
from ..cluster import ClusterConfig, dask_client
from ..errors import CancerNetError, SlideReadError, StorageError
from ..failures import Failure, merge_failures, read_failures
from ..tiling import InputSpec, TileConfig, TilePlan, discover_some, plan_patches, plan_slide, read_tiles, source_stat

log = logging.getLogger(__name__)

FAILURES_CSV = "failures.csv"


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


def _reader(source: str):
    """An open reader for ``source``, kept per worker process (a few at a time) across tasks."""
    from ..slides import open_slide

    st = os.stat(source)
    key = f"{source}|{st.st_size}|{st.st_mtime_ns}"
    with _READERS_LOCK:
        r = _READERS.pop(key, None)
        if r is None:
            r = open_slide(source)
        _READERS[key] = r
        while len(_READERS) > _MAX_READERS:
            _, old = _READERS.popitem(last=False)
            old.close()
        return r


def _drop_reader(source: str) -> None:
    """Forget readers of ``source`` (OpenSlide errors are sticky: a failed handle stays failed)."""
    with _READERS_LOCK:
        for key in [k for k in _READERS if k.rsplit("|", 2)[0] == source]:
            _READERS.pop(key).close()


def _open_inputs(run_dir: str):
    import zarr

    return zarr.open_group(str(store.tiles_path(run_dir)), mode="r+", zarr_format=3)


def preflight_task(source: str, timeout: float) -> dict | Failure:
    """Worker: the preflight of one slide (in a child process). Slide metadata as JSON, or a Failure."""
    from ..preflight import preflight

    try:
        return preflight(source, timeout=timeout).to_json()
    except CancerNetError as exc:
        return Failure.from_exception(source, "preflight", exc)


def _same_plan(g, plan: TilePlan, chunk: int) -> bool:
    a = g.attrs
    return (a.get("source_size") == plan.source_size and a.get("source_mtime") == plan.source_mtime
            and a.get("target_mpp") == plan.target_mpp and a.get("level") == plan.level
            and a.get("tissue_threshold") == plan.tissue_threshold and a.get("n_tiles") == plan.n_tiles
            and a.get("chunk") == chunk and abs(float(a.get("level0_tile_px", 0)) - plan.level0_tile_px) < 1e-9
            and "tiled" in g and np.array_equal(np.asarray(g["coords"][:]), plan.coords))


def _store_chunk(n: int, chunk: int) -> int:
    return max(1, min(chunk, n)) if n else chunk


def prepare_slide_task(run_dir: str, source: str, cfg: TileConfig, series_files: list[str]) -> dict | Failure:
    """Worker: plan a slide and set up its group. Returns the chunks still to write, or a Failure."""
    try:
        plan = plan_slide(source, cfg, reader=_reader(source), series_files=series_files)
    except CancerNetError as exc:
        _drop_reader(source)
        return Failure.from_exception(source, "plan", exc)
    root = _open_inputs(run_dir)
    gid = store.input_id(source)
    c = _store_chunk(plan.n_tiles, cfg.chunk)
    bounds = store.chunk_bounds(plan.n_tiles, c)
    inputs = root["inputs"]
    kept = 0
    if gid in inputs and _same_plan(inputs[gid], plan, c):
        g = inputs[gid]
        g.attrs.update({**plan.attrs().to_json(), "complete": False})
        done = store.tiled_mask(g)
        todo = [(i, s, e) for i, (s, e) in enumerate(bounds) if not done[i]]
        kept = len(bounds) - len(todo)
    else:
        g = store.create_input(root, plan.attrs(), plan.n_tiles, chunk=cfg.chunk)
        if plan.n_tiles:
            g["coords"][:] = plan.coords
        rows, cols = plan.grid_shape
        g.create_array("tissue", shape=(rows, cols), chunks=(rows, cols), dtype="float32")[:] = plan.tissue
        th = plan.thumbnail
        g.create_array("thumbnail", shape=th.shape, chunks=(min(th.shape[0], 1024), min(th.shape[1], 1024), 3),
                       dtype="uint8")[:] = th
        todo = list((i, s, e) for i, (s, e) in enumerate(bounds))
    return {"gid": gid, "n": plan.n_tiles, "todo": todo, "kept": kept, "level": plan.level,
            "tile_px": plan.tile_px_level, "summary": plan.summary()}


def tile_chunk_task(run_dir: str, gid: str, source: str, index: int, start: int, stop: int, level: int,
                    tile_px: float) -> int:
    """Worker: read, resample and write tiles ``[start, stop)`` of one input, then the chunk's flag."""
    g = store.open_input(run_dir, gid)
    coords = np.asarray(g["coords"][start:stop])
    try:
        tiles = read_tiles(_reader(source), level, tile_px, coords)
    except CancerNetError:
        _drop_reader(source)
        raise
    g["tiles"][start:stop] = tiles
    g["tiled"][index] = True
    return stop - start


def patches_task(run_dir: str, source: str, cfg: TileConfig) -> dict | Failure:
    """Worker: load one patient folder and write all its chunks. Bad patch files come back as failures."""
    from ..patches import grid_shape, load

    try:
        ps = load(source)
        plan = plan_patches(source, cfg)
    except CancerNetError as exc:
        return Failure.from_exception(source, "tile", exc)
    plan = replace(plan, coords=ps.coords, grid_shape=grid_shape(ps.coords), patient=str(ps.patients[0]))
    root = _open_inputs(run_dir)
    g = store.create_input(root, plan.attrs(), len(ps), chunk=cfg.chunk, labels=True)
    c = int(g.attrs["chunk"])
    for i, (s, e) in enumerate(store.chunk_bounds(len(ps), c)):
        g["tiles"][s:e] = ps.tiles[s:e]
        g["coords"][s:e] = ps.coords[s:e]
        g["labels"][s:e] = ps.labels[s:e]
        g["tiled"][i] = True
    g.attrs.update({"extra": {**g.attrs["extra"], "padded": ps.padded, "duplicates": len(ps.duplicates)}})
    failures = [Failure(f.input, "tile", f.error_class, f.message) for f in ps.failures]
    return {"gid": store.input_id(source), "n": len(ps), "chunks": len(store.chunk_bounds(len(ps), c)),
            "failures": failures, "summary": plan.summary()}


# --------------------------------------------------------------------------------------------
# client side
# --------------------------------------------------------------------------------------------

def is_fresh(attrs: dict, spec: InputSpec, cfg: TileConfig) -> bool:
    """True when a stored input is complete and matches the source on disk and these settings."""
    if not attrs.get("complete"):
        return False
    extra = attrs.get("extra") or {}
    try:
        size, mtime = source_stat(spec.source, spec.kind, extra.get("series_files"))
    except OSError:
        return False
    if size != attrs.get("source_size") or mtime != attrs.get("source_mtime"):
        return False
    if attrs.get("target_mpp") != cfg.target_mpp or attrs.get("chunk") != _store_chunk(attrs.get("n_tiles", 0), cfg.chunk):
        return False
    if spec.kind == "slide":
        if attrs.get("tissue_threshold") != (cfg.tissue_threshold if cfg.tissue_filter else None):
            return False
        if extra.get("mpp_source") == "override" and attrs.get("source_mpp") != cfg.mpp_override:
            return False
    return True


def tile_run(paths: list[str | os.PathLike], run_dir: str | os.PathLike, cfg: TileConfig, *,
             cluster: ClusterConfig | None = None, client=None,
             progress: Callable[[int, int], None] | None = None,
             on_dashboard: Callable[[str], None] | None = None) -> TileSummary:
    """Tile ``paths`` (files, folders, patient folders) into ``RUN/tiles.zarr``; see the module doc.

    ``progress(tiles_done, tiles_added)`` is called as work is planned and done. ``client``: an
    already connected ``distributed.Client``; otherwise one is made from ``cluster``.
    """
    t0 = time.perf_counter()
    specs, failures = discover_some(paths)
    run = Path(run_dir).resolve()
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the run folder: {exc.strerror or exc}", path=run,
                           hint="check that the location is writable") from exc
    root = store.open_root(run, mode="a")
    inputs = root.require_group("inputs")
    summary = TileSummary(run_dir=str(run), failures=list(failures))
    todo: list[InputSpec] = []
    done_members: set[str] = set()
    for spec in specs:
        gid = store.input_id(spec.source)
        if gid in inputs and is_fresh(dict(inputs[gid].attrs), spec, cfg):
            summary.skipped.append(spec.source)
            done_members.update((inputs[gid].attrs.get("extra") or {}).get("series_files") or [])
        else:
            todo.append(spec)
    for spec in [s for s in todo if s.source in done_members]:
        todo.remove(spec)
        summary.skipped.append(spec.source)
    if summary.skipped:
        log.info("%d inputs already complete and unchanged: skipped", len(summary.skipped))
    if todo:
        if client is not None:
            _execute(client, str(run), todo, cfg, summary, progress)
        else:
            with dask_client(cluster or ClusterConfig(), on_dashboard=on_dashboard) as c:
                _execute(c, str(run), todo, cfg, summary, progress)
    attempted = {s.source for s in todo}
    csv = run / FAILURES_CSV
    retried = attempted | {f.input for f in read_failures(csv)
                           if any(f.input.startswith(a + os.sep) for a in attempted)}
    merge_failures(csv, summary.failures, replace_stage_for=retried)
    summary.seconds = time.perf_counter() - t0
    log.info("tiled %d inputs (%d tiles), %d skipped, %d failed in %.1f s", len(summary.tiled),
             summary.tiles_written, len(summary.skipped), len(summary.failed_inputs), summary.seconds)
    return summary


def _execute(client, run_dir: str, todo: list[InputSpec], cfg: TileConfig, summary: TileSummary,
             progress: Callable[[int, int], None] | None) -> None:
    from distributed import as_completed

    root = store.open_root(run_dir, mode="a")
    report = progress or (lambda done, added: None)
    slides = [s for s in todo if s.kind == "slide"]
    folders = [s for s in todo if s.kind == "patches"]
    meta: dict[str, tuple] = {}
    ac = as_completed()

    def submit(kind: tuple, fn, *args) -> None:
        fut = client.submit(fn, *args, pure=False)
        meta[fut.key] = kind
        ac.add(fut)

    for spec in folders:
        submit(("patches", spec.source), patches_task, run_dir, spec.source, cfg)
    # 1. preflight every slide (in parallel), then one input per DICOM series
    pre = {s.source: client.submit(preflight_task, s.source, cfg.preflight_timeout, pure=False) for s in slides}
    series: dict[str, list[str]] = {}
    for source, fut in pre.items():
        try:
            res = fut.result()
        except Exception as exc:  # noqa: BLE001 - a worker lost while preflighting
            res = Failure.from_exception(source, "preflight", exc)
        if isinstance(res, Failure):
            _fail(root, summary, res)
            continue
        series.setdefault(res.get("series_key") or source, []).append(source)
    for files in series.values():
        files = sorted(files)
        for member in files[1:]:
            summary.series_members[member] = files[0]
            log.info("%s: same DICOM series as %s; tiled once", member, files[0])
        # 2. plan and set up the group
        submit(("prepare", files[0]), prepare_slide_task, run_dir, files[0], cfg, files if len(files) > 1 else [])
    remaining: dict[str, int] = {}
    failed: set[str] = set()
    for fut in ac:
        kind = meta.pop(fut.key)
        source = kind[1]
        try:
            res = fut.result()
        except Exception as exc:  # noqa: BLE001 - record, go on with the other inputs
            if source not in failed:
                failed.add(source)
                stage = "plan" if kind[0] == "prepare" else "tile"
                _fail(root, summary, Failure.from_exception(source, stage, _worker_error(source, exc)), keep=True)
            continue
        finally:
            fut.release()
        if isinstance(res, Failure):
            failed.add(source)
            _fail(root, summary, res)
        elif kind[0] == "patches":
            summary.failures.extend(res["failures"])
            summary.plans[source] = res["summary"]
            summary.tiles_written += res["n"]
            summary.chunks_written += res["chunks"]
            report(res["n"], res["n"])
            _complete(root, summary, source, res["gid"])
        elif kind[0] == "prepare":
            summary.plans[source] = res["summary"]
            summary.chunks_kept += res["kept"]
            if res["kept"]:
                summary.resumed.append(source)
            remaining[source] = len(res["todo"])
            report(0, sum(e - s for _, s, e in res["todo"]))
            for index, start, stop in res["todo"]:
                submit(("chunk", source, res["gid"]), tile_chunk_task, run_dir, res["gid"], source, index, start,
                       stop, res["level"], res["tile_px"])
            if not res["todo"]:
                _complete(root, summary, source, res["gid"])
        else:  # a chunk
            summary.tiles_written += res
            summary.chunks_written += 1
            report(res, 0)
            remaining[source] -= 1
            if remaining[source] == 0 and source not in failed:
                _complete(root, summary, source, kind[2])


def _worker_error(source: str, exc: BaseException) -> BaseException:
    if isinstance(exc, CancerNetError):
        return exc
    if type(exc).__name__ == "KilledWorker":
        return SlideReadError("the slide reader crashed: the worker process died reading this file", path=source,
                              hint="the file is probably corrupt in places; re-export it, or leave it out")
    return exc


def _complete(root, summary: TileSummary, source: str, gid: str) -> None:
    store.mark_complete(root["inputs"][gid])
    summary.tiled.append(source)
    log.info("%s: tiled", source)


def _fail(root, summary: TileSummary, failure: Failure, *, keep: bool = False) -> None:
    """Record a failed input; unless ``keep``, drop its old group (it no longer matches the source)."""
    summary.failures.append(failure)
    log.info("failed at %s: %s", failure.stage, failure.message)
    gid = store.input_id(failure.input)
    if not keep and gid in root["inputs"]:
        del root["inputs"][gid]
