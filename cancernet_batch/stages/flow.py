"""The streaming machinery of ``cancernet run`` (and ``tile``): every input flows tile -> score -> report on its own.

One :class:`Flow` drives one Dask client. Inputs are admitted a window at a time; each goes on as
soon as its previous step is done:

    slide:          prepare (preflight, plan, group, predictions) -> tile chunk ... -> score chunk ... -> report
    patient folder: load and write all chunks ------------------------------> score chunk ... -> report
    already tiled:                                                           score chunk ... -> report

A tile chunk is scored as soon as it is written (in the same task, when the workers that tile also score);
an input's report part (maps, heatmap, GeoJSON, its CSV row) is made as soon as its last chunk is scored. Every few seconds (and at the end) the
run's failures list, ``inputs.csv``, ``patients.csv``, ``index.html`` and ``progress.json`` are
rewritten atomically, so at every moment the report folder is a valid report of every finished
input. Bounded whatever the archive: at most ``max_inputs`` inputs in flight (their task
descriptions only: no pixels pass the client), scoring tasks ahead of tiling tasks in Dask's
priorities (backpressure: tiles do not pile up unscored), report tasks ahead of both.

Work split: when the cluster's workers advertise the Dask resources ``tile`` and ``score``
(:func:`cancernet_batch.cluster.work_split`; ``--score-workers``, or one scoring worker per GPU),
decoding tasks go to the tiling workers and scoring to the scoring workers, so both run at once.
Otherwise every worker takes both kinds.

Resume: every step writes in the order that makes a re-run safe (tiles, then their chunk's flag;
probabilities, then their done flag; report files by rename), so a killed run re-run with the same
command finishes only what is missing. A deadline (``--until``/``--max-hours``) stops admitting
inputs; those in flight finish, the report covers every finished input and the rest stay for the
next run.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import store
from ..cluster import SCORE, TILE, ClusterConfig, dask_client, tiling_threads, tiling_workers, work_split
from ..errors import ModelError, StorageError
from ..failures import Failure
from ..runfolder import Run, safe_name
from ..remote import is_url
from ..tiling import InputSpec, TileConfig, discover_some, series_group
from .tile import (TileSummary, _worker_error, is_fresh, patches_task, preflight_task, prepare_slide_task,
                   tile_chunk_task)

log = logging.getLogger(__name__)

# Dask priorities (higher first): finish what is started before starting more
_REPORT, _SCORE, _TILE = 3_000_000, 2_000_000, 1_000_000
_FIRST = 3_000_000  # added to the first input's tasks: each of them goes before every other input's
_RATE_TILES = 256
"""With the work split, the tiles each kind of worker must have done before the flow places the tasks either kind
can run by their rates (:meth:`Flow._side_for`)."""


@dataclass
class _Input:
    """One input on its way through the flow."""

    seq: int
    source: str
    gid: str
    entry: str  # "tile" (tile it first) | "score" (already tiled: score and report it)
    spec: InputSpec | None = None
    series_files: list[str] = field(default_factory=list)
    preflighted: bool = False
    edge: bool = False  # first or last input of a scored flow: tiled in smaller chunks (stages.tile.edge_chunk)
    first: bool = False  # the flow's first input: its tasks go first (_FIRST), the report's first input comes early
    outstanding: int = 0  # its tasks submitted and not yet back
    to_tile: int = 0
    to_score: int = 0
    tiling_done: bool = False
    score_after_tile: set[int] = field(default_factory=set)  # chunks to score once their tiles are written
    reporting: bool = False
    reports_in_chunks: bool = False  # the chunk task that scores its last chunk makes its report (and marks it complete)
    reported: bool = False
    attrs: object = None  # InputAttrs: as discovery read them (an input tiled before), else once its report starts
    patient: str = ""
    failed: bool = False
    finished: bool = False


class Flow:
    """Tile (and, when given their settings, score and report) a run's inputs as a stream.

    ``scoring``: a :class:`~cancernet_batch.stages.score.Scoring` (from ``prepare_scoring``), or
    None to tile only. ``report_cfg``: a ``ReportConfig``, or None for no report.
    """

    def __init__(self, run: Run, *, tile_cfg: TileConfig, scoring=None, report_cfg=None, deadline: float | None = None,
                 max_inputs: int | None = None, flush_seconds: float = 5.0,
                 tile_progress: Callable[[int, int], None] | None = None,
                 score_progress: Callable[[int], None] | None = None,
                 report_progress: Callable[[int], None] | None = None):
        from .score import PredictSummary

        self.run, self.tile_cfg, self.scoring, self.report_cfg = run, tile_cfg, scoring, report_cfg
        self.deadline, self.max_inputs, self.flush_seconds = deadline, max_inputs, flush_seconds
        self._tile_progress = tile_progress or (lambda done, added: None)
        self._score_progress = score_progress or (lambda n: None)
        self._report_progress = report_progress or (lambda n: None)
        self.tile = TileSummary(run_dir=str(run.root))
        self.predict = PredictSummary()
        self.rows: dict = {}  # gid -> InputReport, of inputs finished in this flow
        self.report = None  # ReportSummary after the final flush
        self.threshold = None
        self.mapping: dict[str, str] = {}
        self.queue: collections.deque[_Input] = collections.deque()
        self.dicom: list[InputSpec] = []
        self.remaining = 0  # inputs not started because of the deadline
        self.stopped_by_deadline = False
        self.started = time.time()
        self.first_report_seconds: float | None = None
        self._report_listing: frozenset | None = None  # on object storage: the report folder's objects, listed once
        self._token = uuid.uuid4().hex[:12]  # this flow's, in the names of its claims (Run.claim)
        self._claimed = False  # whether this flow gave a claim out: its claims are removed as it ends, and again
        # once its own cluster is gone
        self._settles_left = 0  # inputs tiled before whose task has not started, for whom the listing is kept
        # (below 0: released)
        self.inputs_total = 0
        self.inputs_done = 0
        self._threads = 1  # worker threads of the cluster (set by execute)
        self._tile_threads = 1  # of which can tile (set by execute)
        self._tilers: list[str] = []  # the addresses of the workers that can tile (set by execute)
        self._score_threads = 1  # of which can score (set by execute)
        self._queued = {TILE: 0, SCORE: 0}  # with the work split: tasks submitted to each kind of worker, not back
        self._busy = {TILE: 0.0, SCORE: 0.0}  # ... the thread-seconds each kind had tasks to run (see _count_queued)
        self._busy_at = time.monotonic()
        self._busy_done = {TILE: 0.0, SCORE: 0.0}  # ... of them, those up to its last task back (no task in flight)
        self._done = {TILE: 0, SCORE: 0}  # ... and the tiles its tasks back tiled (TILE) or scored (SCORE)
        self._preparing = 0  # slides whose prepare task has not come back
        self._first_preparing = False  # the first input is a slide whose prepare task has not come back
        self.inputs_failed = 0
        self._new_failures: list[Failure] = []
        self._retried: dict[str, str] = {}  # input -> the stage it was tried again from (its older rows go)
        self._failed_sources: set[str] = set()
        self._seq = 0
        self._admitted = 0
        self._sources: list[str] = []
        self._last_flush = 0.0
        self._first_score_at: float | None = None
        self._loader: threading.Thread | None = None  # the background model load (see _start_model_load)
        self._load_error: BaseException | None = None

    # ---------------------------------------------------------------------------------------
    # what to do
    # ---------------------------------------------------------------------------------------
    def discover(self, paths) -> None:
        """Find the inputs named by ``paths``; those already tiled and unchanged go straight to scoring."""
        specs, failures = discover_some(paths, self.run.input_options)
        self._new_failures += failures
        self.tile.failures += failures
        root = self.run.create().open_store("a")
        inputs = root.require_group("inputs")
        # on object storage every input's group at once (one listing, the documents read together), not two
        # requests one after another for each input named (a thousand-slide archive's resume: minutes at S3's latency)
        look = store.NodeCache(inputs).load_members() if self.run.remote else inputs
        named = {str(s.source) for s in specs}
        for d in store.drop_damaged(root):  # their sources, when named here, are tiled again
            if d.source not in named:
                self._new_failures.append(d.failure("tile"))
        done_members: set[str] = set()
        todo: list[InputSpec] = []
        fresh: list[tuple[InputSpec, str]] = []
        for spec in specs:
            gid = store.input_id(spec.source)
            if gid in look and is_fresh(dict(look[gid].attrs), spec, self.tile_cfg, self.run.input_options):
                fresh.append((spec, gid))
                done_members.update((look[gid].attrs.get("extra") or {}).get("series_files") or [])
            else:
                todo.append(spec)
        for spec in todo:
            if spec.source in done_members:
                fresh.append((spec, ""))  # a member of a tiled DICOM series: nothing of its own to do
            elif spec.kind == "slide" and spec.path.suffix.lower() == ".dcm":
                self.dicom.append(spec)  # grouped into series after their preflight, before the stream
            else:
                self._enqueue(spec.source, store.input_id(spec.source), "tile", spec=spec)
        for spec, gid in fresh:
            self.tile.skipped.append(spec.source)
            if gid and self.scoring is not None:  # its attrs as discovery read them: the client reads nothing more
                self._enqueue(spec.source, gid, "score", attrs=store.InputAttrs.from_json(dict(look[gid].attrs)))
        if self.tile.skipped:
            log.info("%d inputs already complete and unchanged: not tiled again", len(self.tile.skipped))
        if self.scoring is not None:  # inputs of earlier calls, complete, that this call does not name
            named = {i.gid for i in self.queue} | {store.input_id(s.source) for s in self.dicom}
            for gid, g in store.iter_inputs(root, looked_up=look if self.run.remote else None):
                if gid not in named:
                    self._enqueue(str(g.attrs.get("source", gid)), gid, "score", attrs=store.InputAttrs.from_json(dict(g.attrs)))
        self.inputs_total = len(self.queue) + len(self.dicom)
        self._sources = [s.source for s in specs]

    def _enqueue(self, source: str, gid: str, entry: str, **kw) -> _Input:
        self._seq += 1
        inp = _Input(self._seq, source, gid, entry, **kw)
        self.queue.append(inp)
        self._settles_left += entry == "score"
        return inp

    # ---------------------------------------------------------------------------------------
    # the loop
    # ---------------------------------------------------------------------------------------
    def execute(self, client=None, cluster: ClusterConfig | None = None, *, on_dashboard=None) -> None:
        """Run every input through (a local cluster is made from ``cluster`` when no client is given)."""
        if not self.queue and not self.dicom and self.report_cfg is None:
            self.flush(final=True)
            return
        try:
            self._execute(client, cluster, on_dashboard)
        finally:
            # a chunk task still running as the run stopped (a signal, an error) can claim its report part after the
            # claims went and before its worker did: with a cluster of this flow's own, gone now, none can any more
            if client is None:
                self._release_claims()

    def _execute(self, client, cluster: ClusterConfig | None, on_dashboard) -> None:
        with contextlib.nullcontext(client) if client is not None else dask_client(
                cluster or ClusterConfig(), on_dashboard=on_dashboard) as c:
            self.client = c
            self.split = work_split(c)
            self._tile_threads = tiling_threads(c)
            self._tilers = tiling_workers(c)
            nthreads = sum(c.nthreads().values()) or 1
            self._score_threads = max(1, nthreads - self._tile_threads) if self.split else nthreads
            self.window = self.max_inputs or max(4, 2 * nthreads)
            self._threads = nthreads
            if self.report_cfg is not None:
                self._setup_report()
            if self.scoring is not None and (self.queue or self.dicom):
                self._start_model_load(c)
            try:
                self._preflight_dicom()
                self._loop()
                self._model_loaded()
            finally:
                if self._loader is not None:
                    self._loader.join(timeout=60)
                self._release_claims()
            if self.report_cfg is not None:
                self._report_leftovers()
            if self._staging:
                self._clear_staged(c)
        self.flush(final=True)

    def _release_claims(self) -> None:
        """Remove this flow's claims (:meth:`Run.claim`), and any a killed flow left; one left behind (storage
        gone) is harmless: the next flow's claims have other names."""
        if not self._claimed:
            return
        try:
            self.run.release_claims()
        except Exception as exc:  # noqa: BLE001
            log.info("could not remove this run's claims: %s", exc)

    @property
    def _staging(self) -> bool:
        """Whether an input of this flow is on object storage (its worker may have staged a local copy)."""
        return any(is_url(s) for s in self._sources)

    def _clear_staged(self, client) -> None:
        """The run is done: remove the local copies of object-storage slides on every worker (and here)."""
        from ..remote import clear_stage_cache

        try:
            client.run(clear_stage_cache)
        except Exception as exc:  # noqa: BLE001 - a worker gone: its copies are evicted by the size limit later
            log.info("could not clear the staging cache on every worker: %s", type(exc).__name__)
        clear_stage_cache()

    def _start_model_load(self, client) -> None:
        """Load the model on the scoring workers in the background: preflight, plans and the first tiles go on
        meanwhile (a score task that arrives first loads it itself: one load a process, under a lock)."""
        from .score import load_engines

        def load() -> None:
            try:
                self.predict.load_seconds = load_engines(client, self.scoring.cfg)
            except BaseException as exc:  # noqa: BLE001 - raised in the flow's thread by _model_loaded
                self._load_error = exc

        self._loader = threading.Thread(target=load, name="cancernet model load", daemon=True)
        self._loader.start()

    def _model_loaded(self, wait: bool = True) -> None:
        """Raise the model load's error (the whole run stops: no input could be scored); ``wait`` for it first."""
        if self._loader is not None and wait:
            self._loader.join()
        if self._load_error is not None:
            raise self._load_error

    def _loop(self) -> None:
        from distributed import as_completed

        self._ac = as_completed()
        self._meta: dict[str, tuple] = {}
        self._inflight = 0
        self._admit()
        for fut in self._ac:
            kind, inp, extra, side = self._meta.pop(fut.key)
            inp.outstanding -= 1
            if side is not None:
                self._count_queued(side, -1)
                self._busy_done[side] = self._busy[side]
            try:
                try:
                    res = fut.result()
                except StorageError:
                    raise  # the run folder itself is unwritable or full: stop, the report says what is done
                except Exception as exc:  # noqa: BLE001 - this input fails, the others go on
                    res = exc
            finally:
                fut.release()
            self._model_loaded(wait=False)
            had_rows = bool(self.rows)
            before = (self.tile.tiles_written, self.predict.tiles_scored)
            getattr(self, f"_on_{kind}")(inp, res, extra)
            if side is not None:
                self._done[side] += (self.tile.tiles_written - before[0] if side == TILE
                                     else self.predict.tiles_scored - before[1])
            first_report = not had_rows and bool(self.rows)  # a report (or settle) task added the first row
            self._maybe_finish(inp)
            if first_report or time.monotonic() - self._last_flush >= self.flush_seconds:
                self.flush()
                if first_report:  # in the report folder's tables from now on
                    self.first_report_seconds = time.time() - self.started

    def _admit(self) -> None:
        """Start queued inputs while the window has room. Until the first input is done, the window is one
        input per worker thread (a slow start), and a slide is started only when a tiling thread has no
        other slide's prepare task to run (with the work split, the prepares of the first inputs come one
        after another), one thread less while the first slide's prepare runs: the first inputs' steps then do
        not queue behind the preflights and plans of others (a later slide's prepare is submitted after an
        earlier slide's chunk tasks, which go first by priority), so the report has its first input early; the
        threads idle only for the client's round trips meanwhile (and one for the first slide's prepare)."""
        window = self.window if self.inputs_done else min(self.window, self._threads)
        while self._inflight < window and self.queue:
            # while the first slide's prepare runs, one tiling thread is left free for its chunks (with 2, no other
            # slide's prepare shares the cores with it: its plan comes back sooner, and both threads take its chunks)
            room = self._tile_threads - (1 if self._first_preparing else 0)
            if not self.inputs_done and self._preparing >= max(1, room):
                return
            if self.deadline is not None and time.time() >= self.deadline:
                self.stopped_by_deadline = True
                self.remaining = len(self.queue)
                log.info("deadline reached: %d inputs not started (re-run the same command to continue)",
                         self.remaining)
                return
            inp = self.queue.popleft()
            # the pipeline's fill and drain: the first input's first chunk is what scoring waits for at the
            # start, the last input's last chunk what the run waits for at the end. Only these two: small chunks
            # are more tasks (each a round trip through the client and the scheduler, its input opened again), and
            # small chunks for the second input too cost more than they gained (RESULTS.md section 6)
            inp.edge = self.scoring is not None and (self._admitted == 0 or not self.queue)
            inp.first = self._admitted == 0
            self._admitted += 1
            self._inflight += 1
            self._start(inp)
            self._maybe_finish(inp)

    def _submit(self, kind: str, inp: _Input, fn, *args, priority: int, scoring: bool = False, anywhere: bool = False,
                extra=None, worker: str | None = None, kwargs: dict | None = None) -> None:
        """``scoring``: on a scoring worker when the work is split (else on a tiling worker). ``anywhere``: CPU work
        that either kind of worker can do (the report), when scoring is on the CPU: see :meth:`_side_for`; a GPU's
        scoring worker is left to feed its GPU. ``worker``: the worker to queue it on (another may still take it).
        ``kwargs``: keyword arguments of ``fn``."""
        gpu = self.scoring is not None and self.scoring.cfg.device != "cpu"
        side = None
        if self.split:
            side = self._side_for() if anywhere and not gpu else SCORE if scoring else TILE
        # by kind of work (report, score, tile), then by input; the first input's tasks before all others (with
        # scoring before tiling, the second input's scoring would otherwise come between the first's chunks)
        priority += (_FIRST if inp.first else 0) - inp.seq
        fut = self.client.submit(fn, *args, pure=False, priority=priority, resources=side and {side: 1},
                                 workers=worker and [worker], allow_other_workers=worker is not None,
                                 key=f"{kind}-{inp.gid}-{extra if extra is not None else ''}-{time.monotonic_ns()}",
                                 **(kwargs or {}))
        self._meta[fut.key] = (kind, inp, extra, side)
        inp.outstanding += 1
        if side is not None:
            self._count_queued(side, 1)
        self._ac.add(fut)

    @property
    def _tilers_score(self) -> bool:
        """Whether the workers that tile also score (the run scores and its work is not split): then a chunk is
        scored, and an input's last one reported, in its tiling task."""
        return self.scoring is not None and not self.split

    def _count_queued(self, side: str, delta: int) -> None:
        """A task submitted to (``delta`` 1) or back from (-1) ``side``'s workers; first adds, for each kind, the
        thread-seconds since the last count in which it had tasks to run: its tasks waiting, at most one a thread.
        Tasks are submitted only once they can run, so those threads were busy (or about to be)."""
        now = time.monotonic()
        for s, threads in ((TILE, self._tile_threads), (SCORE, self._score_threads)):
            self._busy[s] += (now - self._busy_at) * min(self._queued[s], threads)
        self._busy_at = now
        self._queued[side] += delta

    def _side_for(self) -> str | None:
        """Where a task either kind of worker can run goes, with the work split on the CPU: to the faster kind, by
        the tiles each kind's workers have done per second of the time they had tasks to run, up to its last task back
        (:meth:`_count_queued`; the time of the reports it made counts too). Each tile is tiled once and scored once,
        so the slower kind bounds the run and the faster one has room.
        With scoring on one core the slower stage, the tiling worker otherwise idles between its chunks while the
        scorer draws the maps. Until both kinds have done :data:`_RATE_TILES` tiles: the kind with fewer of this
        flow's tasks waiting per thread; None (Dask's choice by occupancy) when they are even."""
        if min(self._done.values()) >= _RATE_TILES and min(self._busy_done.values()) > 0:
            tile, score = (self._done[s] / self._busy_done[s] * threads
                           for s, threads in ((TILE, self._tile_threads), (SCORE, self._score_threads)))
            if tile != score:
                return TILE if tile > score else SCORE
        tile = self._queued[TILE] / max(1, self._tile_threads)
        score = self._queued[SCORE] / max(1, self._score_threads)
        return None if tile == score else TILE if tile < score else SCORE

    # ---------------------------------------------------------------------------------------
    # steps
    # ---------------------------------------------------------------------------------------
    def _start(self, inp: _Input) -> None:
        self._retried.setdefault(inp.source, "discover" if inp.entry == "tile" else "predict")
        if inp.entry == "score":  # tiled before: what is left to score is found on a worker, not by the client
            from ..aggregate import patient_of
            from .score import settle_task

            if not inp.tiling_done:  # its first start, not a retry
                self._settles_left -= 1
            inp.tiling_done = True
            report = present = None
            if self.report_cfg is not None and inp.attrs is not None:  # reported in the same task if all is scored
                inp.patient = patient_of(inp.gid, inp.attrs, self.mapping)
                report = (inp.patient, self.threshold, self.report_cfg)
                present = self._report_files_present(inp.gid)
            self._submit("settle", inp, settle_task, self.run, inp.gid, self.scoring, report, present,
                         priority=_SCORE, anywhere=True)
        elif inp.spec is not None and inp.spec.kind == "patches":
            self._submit("patches", inp, patches_task, self.run, inp.source, self.tile_cfg, self.scoring,
                         priority=_TILE)
        else:  # a slide: its preflight (unless done with its DICOM series), plan and group, predictions set up
            self._preparing += 1
            self._first_preparing = self._first_preparing or inp.first
            # and its first chunk of tiles, only where the workers that tile do not score (`tile`, a split run): a
            # chunk tiled in the prepare task needs a score task after a round trip through the client, which reads
            # its tiles back, then a report task. Where they score, every chunk is a chunk task, tiled and scored in
            # one, and the last to be scored makes the input's report part in the same task: two tasks a one-chunk
            # input instead of three, its tiles never read back (stream / stage by stage 1.02-1.11 against
            # 0.97-1.01, four series each; RESULTS.md section 6, 2026-12-06 00:18). The first input's, too, as soon
            # as its plan is back: while its prepare runs the other tiling threads wait (see _admit)
            tile_first = not inp.first and not self._tilers_score
            # the first input, where its tilers score: one chunk a tiling thread, each tiled, scored and (the last)
            # reported in one task side by side (first report 0.88-1.13 s against 1.07-1.47 in eighths;
            # RESULTS.md section 10)
            parts = self._tile_threads if inp.first and self._tilers_score else 0
            self._submit("prepare", inp, prepare_slide_task, self.run, inp.source, self.tile_cfg, inp.series_files,
                         inp.edge, not inp.preflighted, self.scoring, tile_first, parts, priority=_TILE)

    def _report_files_present(self, gid: str) -> frozenset | None:
        """On object storage, which of the input's report files are there (:func:`~cancernet_batch.stages.report.
        part_names`), from one listing of the report folder made at the first call: a request per 1,000 objects for
        the whole run, instead of 7 look-ups in the task of each input tiled before (a re-run, a resumed night).
        The listing keeps only the names a part can have (:func:`~cancernet_batch.stages.report.part_listing`), and
        only until the last input tiled before has started; an input started again after that (a retry) gets None.
        None on local disk, where a look-up is a ``stat``."""
        from .report import part_listing, part_names

        if not self.run.remote or self._settles_left < 0:
            return None
        if self._report_listing is None:
            self._report_listing = part_listing(self.run.fs.find(self.run.report_dir))
        present = part_names(gid, self.report_cfg) & self._report_listing
        if self._settles_left == 0:  # the last: released
            self._report_listing, self._settles_left = None, -1
        return present

    def _on_settle(self, inp: _Input, res, extra) -> None:
        if isinstance(res, BaseException):  # e.g. tiled at another µm/px, or damaged arrays of this input only
            self._fail(inp, Failure.from_exception(inp.source, "predict", res))
            return
        self._start_scoring(inp, tiled_now=set(), chunks=res["score"])
        if "report" in res:  # nothing was left to score: its report part was made (or kept) by the same task
            inp.reporting = True
            self._on_report(inp, res["report"], extra)

    def _on_prepare(self, inp: _Input, res, extra) -> None:
        self._preparing -= 1
        if inp.first:
            self._first_preparing = False
        try:
            self._prepared(inp, res)
        finally:  # after this slide's chunk tasks: the next slide's prepare goes behind them (see _admit)
            self._admit()

    def _prepared(self, inp: _Input, res) -> None:
        if isinstance(res, BaseException):
            self._fail(inp, Failure.from_exception(inp.source, "plan", _worker_error(inp.source, res)))
            return
        if isinstance(res, Failure):
            self._fail(inp, res, drop_group=True)
            return
        self.tile.plans[inp.source] = res["summary"]
        if "attrs" in res:
            from ..store import InputAttrs

            inp.attrs = InputAttrs.from_json(res["attrs"])
        self.tile.chunks_kept += res["kept"]
        if res["kept"]:
            self.tile.resumed.append(inp.source)
        if "chunk_error" in res:  # its first chunk, tiled in the same task
            self._fail(inp, Failure.from_exception(inp.source, "tile", _worker_error(inp.source, res["chunk_error"])))
            return
        inp.to_tile = len(res["todo"])
        self._tile_progress(0, sum(e - s for _, s, e in res["todo"] + res["tiled"]))
        for _, start, stop in res["tiled"]:
            self._chunk_tiled(stop - start)
        if "score_error" in res:
            self._fail(inp, res["score_error"])
        elif self.scoring is not None:  # before the chunks: which of them to score (as their tiles land)
            self._start_scoring(inp, tiled_now={i for i, _, _ in res["todo"]}, chunks=res["score"])
        # the first input's chunks are queued on every tiling worker in turn: Dask would queue them on whichever
        # worker looks least busy when they are submitted, often all on one, while the others run other slides'
        # long tasks (their prepare, then their scoring) before they could help; queued on each, they go first
        # there (priority) and the first report comes earlier
        spread = self._tilers if inp.first and len(self._tilers) > 1 else []
        # every chunk left to write and to score goes to a chunk task that scores it (where the tilers score, the
        # prepare tiled none): the one that scores the last makes the report part too, with no round trip through
        # the client between the last chunk and the report (40-60 ms on the first report's path; RESULTS.md section 6)
        todo = {i for i, _, _ in res["todo"]}
        report = None
        if (self.report_cfg is not None and self._tilers_score and not inp.failed
                and inp.attrs is not None and not res["tiled"] and todo and todo == inp.score_after_tile
                and inp.to_score == len(todo)):
            from ..aggregate import patient_of

            inp.patient = patient_of(inp.gid, inp.attrs, self.mapping)
            inp.reports_in_chunks = True
            # one claim for the part (two chunk tasks that finish together may each see every chunk scored)
            self._claimed = True
            report = (inp.patient, self.threshold, self.report_cfg, f"report-{self._token}-{safe_name(inp.gid)}")
        for n, (index, start, stop) in enumerate(res["todo"]):
            # when the workers that tile also score, a chunk is scored in its tiling task: no round trip through
            # the client between the two (the worker would start another input's task meanwhile), no reading back
            scoring = None
            if self._tilers_score and index in inp.score_after_tile and not inp.failed:
                inp.score_after_tile.discard(index)
                scoring = self.scoring.cfg
            self._submit("chunk", inp, tile_chunk_task, self.run, inp.gid, inp.source, index, start, stop,
                         res["level"], res["tile_px"], self.tile_cfg, scoring, report if scoring else None,
                         priority=_TILE, extra=(index, start, stop), worker=spread[n % len(spread)] if spread else None,
                         kwargs={"preflighted": res.get("preflighted")})
        if not inp.to_tile:
            self._tiled(inp, marked=res.get("complete", False))

    def _on_chunk(self, inp: _Input, res, extra) -> None:
        index, start, stop = extra
        if isinstance(res, BaseException):
            self._fail(inp, Failure.from_exception(inp.source, "tile", _worker_error(inp.source, res)))
            return
        scored = report = None
        if isinstance(res, dict):  # tiled and scored in one task (and, when it was the last, reported)
            res, scored, report = res["n"], res["score"], res.get("report")
        if inp.failed:
            return
        self._chunk_tiled(res)
        inp.to_tile -= 1
        if scored is not None:
            self._on_score(inp, scored, index)
        if report is not None and not inp.failed and not inp.reported:  # (one claims it; where storage cannot
            # make a claim exclusive, two may come: the first counts)
            inp.reporting = True
            self._on_report(inp, report, None)
        if self.scoring is not None and index in inp.score_after_tile:
            self._submit_score(inp, (inp.gid, index, start, stop))
        if inp.to_tile == 0:
            self._tiled(inp)

    def _chunk_tiled(self, n: int) -> None:
        """A chunk of ``n`` tiles is written (by a chunk task, or by its input's prepare task)."""
        self.tile.tiles_written += n
        self.tile.chunks_written += 1
        self._tile_progress(n, 0)

    def _on_patches(self, inp: _Input, res, extra) -> None:
        if isinstance(res, BaseException):
            res = Failure.from_exception(inp.source, "tile", _worker_error(inp.source, res))
        if isinstance(res, Failure):
            self._fail(inp, res, drop_group=True)
            return
        self._new_failures += res["failures"]
        self.tile.failures += res["failures"]
        self.tile.plans[inp.source] = res["summary"]
        self.tile.tiles_written += res["n"]
        self.tile.chunks_written += res["chunks"]
        self._tile_progress(res["n"], res["n"])
        self._tiled(inp, marked=res.get("complete", False))
        if "score_error" in res:
            self._fail(inp, res["score_error"])
        elif self.scoring is not None:  # set up by the task (its group made with its predictions' arrays)
            self._start_scoring(inp, tiled_now=set(), chunks=res.get("score"))

    def _tiled(self, inp: _Input, marked: bool = False) -> None:
        """Every chunk of the input is written: mark it complete (unless its worker did: ``marked``)."""
        if inp.failed or inp.tiling_done:
            return
        if not marked and not inp.reports_in_chunks:  # (else the task that reports it marks it)
            store.mark_complete(self.run.open_input(inp.gid))
        inp.tiling_done = True
        if inp.entry == "tile":
            self.tile.tiled.append(inp.source)
            log.info("%s: tiled", inp.source)

    def _start_scoring(self, inp: _Input, tiled_now: set[int], chunks: tuple | None = None) -> None:
        """Set up the input's predictions (unless the worker that prepared it did: ``chunks``, as
        :func:`~cancernet_batch.stages.score.input_chunks_to_score` returns them); score its tiled chunks now and
        the others as their tiles land."""
        from .score import input_chunks_to_score

        try:
            chunks, nchunks = chunks or input_chunks_to_score(self.run.open_input(inp.gid), inp.gid, self.scoring)
        except Exception as exc:  # noqa: BLE001 - e.g. another µm/px, or damaged arrays of this input only
            self._fail(inp, Failure.from_exception(inp.source, "predict", exc))
            return
        inp.to_score = len(chunks)
        self.predict.inputs += 1
        self.predict.chunks_total += nchunks
        self.predict.chunks_skipped += nchunks - len(chunks)
        for item in chunks:
            if item[1] in tiled_now:
                inp.score_after_tile.add(item[1])
            else:
                self._submit_score(inp, item)

    def _submit_score(self, inp: _Input, item: tuple) -> None:
        from .score import score_chunk

        self._submit("score", inp, score_chunk, self.run, *item, self.scoring.cfg, priority=_SCORE, scoring=True,
                     extra=item[1])

    def _on_score(self, inp: _Input, res, extra) -> None:
        if isinstance(res, ModelError):  # the model does not load: say so once, for the run, not per input
            self._model_loaded()
            raise res
        if isinstance(res, BaseException):
            self._fail(inp, Failure.from_exception(inp.source, "predict", res))
            return
        if inp.failed:
            return
        if self._first_score_at is None:
            self._first_score_at = time.monotonic()
        self.predict.chunks_scored += 1
        self.predict.tiles_scored += res["n"]
        self.predict.worker_seconds += res["read_s"] + res["model_s"] + res["write_s"]
        self._score_progress(res["n"])
        inp.to_score -= 1

    def _ready_for_report(self, inp: _Input) -> bool:
        return (self.report_cfg is not None and inp.tiling_done and inp.to_tile == 0 and inp.to_score == 0
                and inp.outstanding == 0 and not inp.failed and not inp.reporting)

    def _start_report(self, inp: _Input) -> None:
        from ..aggregate import patient_of
        from ..store import InputAttrs
        from .report import report_task

        if inp.reports_in_chunks:  # every chunk is back and none made the report (none saw all scored): as usual
            inp.reports_in_chunks = False
            store.mark_complete(self.run.open_input(inp.gid))
        inp.reporting = True
        attrs = inp.attrs or InputAttrs.from_json(dict(self.run.open_input(inp.gid, "r").attrs))
        inp.attrs = attrs
        inp.patient = patient_of(inp.gid, attrs, self.mapping)
        self._submit("report", inp, report_task, self.run, inp.gid, inp.patient, self.threshold,
                     self.report_cfg, priority=_REPORT, anywhere=True)

    def _on_report(self, inp: _Input, res, extra) -> None:
        from .report import _failed_input

        if isinstance(res, BaseException):  # the worker died under it: this input only
            res = _failed_input(inp.gid, inp.attrs, inp.patient, self.threshold, "", res)
        row, failure = res
        self.rows[inp.gid] = row
        if failure is not None:
            self._new_failures.append(failure)
            self._failed_sources.add(inp.source)
        self._report_progress(1)
        inp.reported = True

    def _maybe_finish(self, inp: _Input) -> None:
        if inp.finished or inp.outstanding:
            return
        if self._ready_for_report(inp):
            self._start_report(inp)
            return
        done = (inp.failed or inp.reported
                or (self.report_cfg is None and inp.tiling_done and inp.to_tile == 0 and inp.to_score == 0))
        if not done:
            return
        inp.finished = True
        self.inputs_done += 1
        self.inputs_failed += inp.failed
        self._inflight -= 1
        self._admit()

    def _fail(self, inp: _Input, failure: Failure, *, drop_group: bool = False) -> None:
        if inp.failed:
            return
        inp.failed = True
        self._new_failures.append(failure)
        self._failed_sources.add(inp.source)
        (self.tile.failures if failure.stage in ("discover", "preflight", "plan", "tile") else self.predict.failures
         ).append(failure)
        log.info("%s failed at %s: %s", inp.source, failure.stage, failure.message)
        if drop_group:  # it no longer matches its source
            inputs = self.run.open_store("r+", clean=False)["inputs"]
            if inp.gid in inputs:
                store.remove_input(inputs, inp.gid)

    # ---------------------------------------------------------------------------------------
    # DICOM series: their files are grouped (one input per series) before the stream starts
    # ---------------------------------------------------------------------------------------
    def _preflight_dicom(self) -> None:
        if not self.dicom:
            return
        futs = {s.source: self.client.submit(preflight_task, s.source, self.tile_cfg.preflight_timeout,
                                             self.run.input_options, self.tile_cfg.stage_cache_gb, pure=False)
                for s in self.dicom}
        series: dict[str, list[str]] = {}
        for source, fut in futs.items():
            try:
                res = fut.result()
            except Exception as exc:  # noqa: BLE001 - a worker lost while preflighting
                res = Failure.from_exception(source, "preflight", exc)
            if isinstance(res, Failure):
                self._retried.setdefault(source, "discover")
                self._new_failures.append(res)
                self.tile.failures.append(res)
                self.inputs_done += 1
                self.inputs_failed += 1
                self._drop(store.input_id(source))
                continue
            series.setdefault(series_group(source, res.get("series_key")), []).append(source)
        by_source = {s.source: s for s in self.dicom}
        for files in series.values():
            files = sorted(files)
            for member in files[1:]:
                self.tile.series_members[member] = files[0]
                self._retried.setdefault(member, "discover")
                self.inputs_done += 1
                log.info("%s: same DICOM series as %s; tiled once", member, files[0])
            self._enqueue(files[0], store.input_id(files[0]), "tile", spec=by_source[files[0]],
                          series_files=files if len(files) > 1 else [], preflighted=True)
        self.dicom = []

    def _drop(self, gid: str) -> None:
        inputs = self.run.open_store("r+", clean=False)["inputs"]
        if gid in inputs:
            store.remove_input(inputs, gid)

    # ---------------------------------------------------------------------------------------
    # the report
    # ---------------------------------------------------------------------------------------
    def _setup_report(self) -> None:
        from ..aggregate import read_patient_map, resolve_threshold

        cfg = self.report_cfg
        self.threshold = resolve_threshold(self.run, cfg.threshold, cfg.model_dir)
        self.mapping = read_patient_map(cfg.patients_csv) if cfg.patients_csv else {}
        self.run.remove_stale_report_temps()

    def _report_leftovers(self) -> None:
        """Rows for the store's inputs this flow did not report: failed, unfinished, or left by the deadline."""
        from ..aggregate import REPORTED, input_state, patient_of, unmatched_keys
        from ..store import InputAttrs
        from .report import _one_input, _report_on_cluster, existing_row

        root = self.run.open_store("r+", clean=False)
        damaged: list = []
        groups = [(gid, g, InputAttrs.from_json(dict(g.attrs)))
                  for gid, g in store.iter_inputs(root, complete_only=False, damaged=damaged)]
        self._new_failures += [d.failure("report") for d in damaged]
        for key in unmatched_keys(self.mapping, [(gid, a) for gid, _, a in groups]):
            log.warning("patient map: %r names no input of this run", key)
        draw = []
        for gid, g, attrs in groups:
            if gid in self.rows:
                continue
            patient = patient_of(gid, attrs, self.mapping)
            if input_state(g)[0] == REPORTED and not self.stopped_by_deadline:
                draw.append((gid, patient, attrs))
            elif input_state(g)[0] == REPORTED:
                self.rows[gid] = existing_row(self.run, gid, g, attrs, patient, self.threshold, self.report_cfg)
            else:
                row, failure = _one_input(self.run, gid, g, attrs, patient, self.threshold,
                                          self.report_cfg)
                self.rows[gid] = row
                if failure is not None:
                    self._new_failures.append(failure)
        if draw:
            for (gid, _, attrs), (row, failure) in zip(draw, _report_on_cluster(
                    self.client, self.run, draw, self.threshold, self.report_cfg, self._report_progress)):
                self.rows[gid] = row
                self._retried.setdefault(attrs.source, "report")
                if failure is not None:
                    self._new_failures.append(failure)

    def flush(self, *, final: bool = False) -> None:
        """Write the failures list, the report tables, index.html and progress.json as they stand now."""
        from .report import finish_report, write_tables

        self._last_flush = time.monotonic()
        failures = self.run.record_failures(self._new_failures, retried=self._retried)
        self._new_failures, self._retried = [], {}
        if self.report_cfg is not None and self.threshold is not None:
            rows = [self.rows[gid] for gid in sorted(self.rows)]
            self.report = (finish_report if final else write_tables)(self.run, rows, self.threshold, failures)
        self.run.write_progress(self.progress_record(final))

    def progress_record(self, final: bool) -> dict:
        now = time.time()
        elapsed = now - self.started
        scored = self.predict.tiles_scored
        rate = 0.0
        if self._first_score_at is not None:
            rate = scored / max(1e-9, time.monotonic() - self._first_score_at)
        left = self.inputs_total - self.inputs_done
        eta = now + elapsed / self.inputs_done * left if self.inputs_done and left > 0 and not final else None
        state = "finished" if final and not self.stopped_by_deadline else ("stopped at the deadline" if final else "running")
        return {"state": state, "pid": os.getpid(), "host": socket.gethostname(), "started": self.started,
                "updated": now, "inputs": {"total": self.inputs_total, "done": self.inputs_done - self.inputs_failed,
                                           "failed": self.inputs_failed, "remaining": left},
                "patches": {"tiled": self.tile.tiles_written, "scored": scored},
                "patches_per_second": round(rate, 1), "eta": eta,
                "first_report_seconds": self.first_report_seconds}
