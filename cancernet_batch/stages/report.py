"""The report stage: ``RUN/report/`` with CSV summaries, heatmaps, GeoJSON and ``index.html``.

Outputs (every file written atomically; re-running overwrites them and gives identical CSVs)::

    RUN/report/inputs.csv             one row per input in the store (reported, not scored, failed)
    RUN/report/patients.csv           the reported inputs aggregated per patient
    RUN/report/failures.csv           copy of RUN/failures.csv (this stage's failures merged in)
    RUN/report/index.html             static, offline page: the tables and every heatmap
    RUN/report/maps/<id>.png          heatmap of the IDC map over a thumbnail of the tissue
    RUN/report/geojson/<id>.geojson   the IDC tiles for QuPath (File > Import objects), as detections;
                                      <id>.geojson.gz with ReportConfig.geojson_gzip (--geojson-gzip)
    RUN/report/geojson/<id>.regions.geojson  the IDC regions (merged tiles) as QuPath annotations
    RUN/report/pyramids/<id>.ome.zarr the probability map as an NGFF image (IDC mask as its label image),
                                      slide-aligned, for napari / QuPath / ome-zarr (:mod:`..pyramid`)
    RUN/report/pyramids/<id>.ome.tif  the same as a pyramidal OME-TIFF (probability, mask channels)

and per reported input the array ``idc_map`` (float32, ``grid_shape``) in its group of
``RUN/tiles.zarr``. Output file names are built from the store's input ids, sanitised again here,
so no name or patient id can reach outside ``RUN/report/``; CSV cells cannot start a formula
(:func:`cancernet_batch.atomic.write_csv`) and the HTML escapes everything it shows.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import numpy as np

from .. import PATCH_SIZE, store
from ..aggregate import (FAILED, NOT_SCORED, REPORTED, InputFigures, PatientFigures, Threshold, find_input_regions,
                        input_figures, input_state, level0_tile_px, load_scored, patient_figures, patient_of, read_patient_map,
                        resolve_threshold, unmatched_keys, unscored_figures, write_idc_map)
from ..atomic import write_csv
from ..cluster import TILE, as_completed_windowed, work_split
from ..config import ReportConfig
from ..errors import STORAGE_ERRNOS, StorageError
from ..failures import Failure
from ..runfolder import INDEX_HTML, INPUTS_CSV, PATIENTS_CSV, InputFiles, Run
from ..geojson import idc_feature_lines, write_geojson
from ..regions import region_features, region_summary
from ..heatmap import thumbnail_for, write_heatmap
from ..pyramid import write_pyramids
from ..report_view import write_view, write_viewer
from ..store import InputAttrs

log = logging.getLogger(__name__)

STAGE = "report"


@dataclass(frozen=True)
class InputReport:
    """One input's row and, when reported, its files (paths relative to ``RUN/report``)."""

    figures: InputFigures
    heatmap: str | None = None
    geojson: str | None = None
    thumbnail: str = ""  # what the heatmap is drawn over
    view: str | None = None  # the zoomable map's data (InputFiles.view), see report_view
    regions: str | None = None  # the IDC regions' GeoJSON


@dataclass
class ReportSummary:
    """What a report call wrote."""

    out: Path
    threshold: Threshold
    inputs: list[InputReport]
    patients: list[PatientFigures]
    failures: list[Failure]

    @property
    def index(self) -> Path:
        return self.out / INDEX_HTML

    def count(self, status: str) -> int:
        return sum(r.figures.status == status for r in self.inputs)

    @property
    def reported(self) -> int:
        return self.count(REPORTED)

    @property
    def not_scored(self) -> int:
        return self.count(NOT_SCORED)

    @property
    def failed(self) -> int:
        """Distinct inputs in the failures list (any stage)."""
        return len({f.input for f in self.failures})


# --------------------------------------------------------------------------------------------
# one input
# --------------------------------------------------------------------------------------------

def _title(patient: str, gid: str) -> str:
    return f"patient {patient} · {gid}"


def input_files(gid: str, cfg: ReportConfig) -> InputFiles:
    """An input's report files (relative to ``RUN/report``), named from its id made safe."""
    return InputFiles.of(gid, gzip=cfg.geojson_gzip)


def report_input(out: Path, gid: str, group, patient: str, threshold: float, cfg: ReportConfig, *,
                 read: dict | None = None, scored=None) -> InputReport:
    """Write the map (zarr), heatmap (PNG), tile and region GeoJSON of one fully scored input (``read``: as
    :func:`~cancernet_batch.aggregate.load_scored`'s; ``scored``: its result, when the caller has it)."""
    scored = scored if scored is not None else load_scored(gid, group, patient, read=read)
    idc_map = scored.idc_map()
    write_idc_map(group, idc_map, scored.model_id)
    tile_px = level0_tile_px(scored.attrs)
    mpp0 = PATCH_SIZE * scored.attrs.target_mpp / tile_px  # µm per level-0 pixel
    files = input_files(gid, cfg)
    thumb = thumbnail_for(group, scored.attrs, tile_px, cfg.thumb_px, coords=scored.coords)
    write_heatmap(out / files.heatmap, idc_map, thumb, tile_px=tile_px,
                  um_per_px=mpp0, threshold=threshold, title=_title(patient, gid))
    write_geojson(out / files.geojson, idc_feature_lines(gid, scored.coords, scored.probs, threshold, tile_px),
                  gzip=cfg.geojson_gzip)
    regions = find_input_regions(scored, threshold, cfg.min_region_mm2, cfg.region_smoothing)
    write_geojson(out / files.regions, region_features(gid, regions, tile_px))
    write_pyramids(out / files.ome_zarr, out / files.ome_tiff, idc_map, threshold=threshold, tile_px=tile_px,
                   mpp0=mpp0, name=gid, model_id=scored.model_id)
    view = write_view(out, files, gid, idc_map, thumb, tile_px=tile_px, mpp0=mpp0, threshold=threshold,
                      regions=regions)
    return InputReport(input_figures(scored, threshold, region_summary(regions)), files.heatmap, files.geojson,
                       thumb.origin, view, files.regions)


def existing_row(run: Run, gid: str, group, attrs: InputAttrs, patient: str, thr: Threshold,
                 cfg: ReportConfig = ReportConfig()) -> InputReport:
    """The row of a scored input from its stored probabilities, drawing nothing (its files as they are): the row its
    part recorded when that part is whole and made from the same data (:func:`_kept_part`)."""
    scored = load_scored(gid, group, patient)
    kept = _kept_part(run, gid, group, cfg, _part_key(scored, group, patient, thr.value, cfg))
    if kept is not None:
        return kept
    files = input_files(gid, cfg)

    def there(rel: str) -> str | None:
        return rel if run.fs.exists(run.report_file(rel)) else None

    return InputReport(input_figures(scored, thr.value, min_region_mm2=cfg.min_region_mm2),
                       there(files.heatmap), there(files.geojson), view=there(files.view), regions=there(files.regions))


PART_STAMP = "report_part"
"""The attribute of an input's ``idc_map`` that says its report part is whole: what it was made from (a digest)
and its row. Written after every file of the part; a map made again is a new array, without it."""
PART_FORMAT = 1
"""The number of what a report part holds, in its digest: raise it with any change to the files a part is made
of or to its row, so that parts made before are drawn again. (Not the package's version: it stays the same
across such changes, and looking it up costs each worker about 20 ms before its first report.)"""


def _thumbnail_basis(group, attrs: InputAttrs) -> str:
    """What :func:`~cancernet_batch.heatmap.thumbnail_for` would draw the map over, as far as it can change: the
    view tiling stored (its shape), else the slide file (its size and time) or its absence."""
    if attrs.kind != "slide":
        return "tiles"
    try:
        return f"stored {tuple(group['thumbnail'].shape)}"
    except KeyError:
        pass
    try:
        st = Path(attrs.source).stat()
        return f"slide {st.st_size} {st.st_mtime_ns}"
    except (OSError, ValueError):
        return "no slide file"


def _part_key(scored, group, patient: str, threshold: float, cfg: ReportConfig) -> str:
    """A digest of everything the report part of input ``group`` (``scored``: its figures' data) is made from: its
    probabilities and positions, its attrs, patient, model, threshold, what its map is drawn over
    (:func:`_thumbnail_basis`), the report settings that shape its files, and :data:`PART_FORMAT`."""
    import hashlib
    import json

    head = {"format": PART_FORMAT, "gid": scored.input_id, "patient": patient, "model_id": scored.model_id,
            "thumbnail": _thumbnail_basis(group, scored.attrs),
            "threshold": repr(float(threshold)), "attrs": scored.attrs.to_json(), "thumb_px": cfg.thumb_px,
            "min_region_mm2": repr(float(cfg.min_region_mm2)), "region_smoothing": cfg.region_smoothing,
            "geojson_gzip": cfg.geojson_gzip}
    h = hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(scored.coords, np.int32).tobytes())
    h.update(np.ascontiguousarray(scored.probs, np.float32).tobytes())
    return h.hexdigest()


_OME_ZARR_MARK = ".zattrs"
"""The object of an input's OME-Zarr map that stands for the whole map among its part's files (its root
attributes: the multiscales document)."""


def _unnamed_part_files(files: InputFiles) -> tuple[str, ...]:
    """The files of a reported input's part that its row does not name: the thumbnail and the pyramids."""
    return files.thumb, files.ome_tiff, f"{files.ome_zarr}/{_OME_ZARR_MARK}"


def _part_files(row: InputReport, gid: str, cfg: ReportConfig) -> list[str]:
    """The files of a reported input's part (relative to ``RUN/report``): its row's and the pyramids."""
    named = [rel for rel in (row.heatmap, row.geojson, row.view, row.regions) if rel]
    return named + list(_unnamed_part_files(input_files(gid, cfg)))


def part_names(gid: str, cfg: ReportConfig) -> frozenset[str]:
    """Every file a reported input's part has (relative to ``RUN/report``): those :func:`_part_files` names for
    the row a part of this input is made with."""
    files = input_files(gid, cfg)
    return frozenset((files.heatmap, files.geojson, files.view, files.regions, *_unnamed_part_files(files)))


def part_listing(names) -> frozenset[str]:
    """The names of a listing of the report folder (relative to ``RUN/report``) that can be one of an input's
    :func:`part_names`: the OME-Zarr maps' arrays and chunks (a dozen objects an input, more for a large map) are
    left out, each map's root ``.zattrs`` kept. What a re-run keeps of the listing for the run's life."""
    zattrs = f".ome.zarr/{_OME_ZARR_MARK}"
    return frozenset(n for n in names if ".ome.zarr/" not in n or n.endswith(zattrs))


def _kept_part(run: Run, gid: str, group, cfg: ReportConfig, key: str, present: frozenset | None = None
               ) -> InputReport | None:
    """The row of an input whose report part is whole and was made from what it would be made from now (``key``:
    :func:`_part_key`; a re-run over finished inputs, a resumed night): nothing to draw again. None: draw it.
    ``present``: which of its :func:`part_names` a listing of the report folder found (on object storage: one
    listing for the whole run instead of a look-up of each file here); None: look each one up."""
    try:
        stamp = group["idc_map"].attrs.get(PART_STAMP)
    except KeyError:
        return None
    if not isinstance(stamp, dict) or stamp.get("key") != key:
        return None
    try:
        r = stamp["row"]
        row = InputReport(InputFigures(**r["figures"]), r["heatmap"], r["geojson"], r["thumbnail"], r["view"],
                          r["regions"])
    except (KeyError, TypeError):
        return None
    rels = _part_files(row, gid, cfg)
    whole = (all(rel in present for rel in rels) if present is not None
             else run.fs.all_exist([run.report_file(rel) for rel in rels]))
    return row if whole else None


def _stamp_part(group, row: InputReport, key: str) -> None:
    """Record, once every file of the input's part is written, that the part is whole (see :data:`PART_STAMP`)."""
    import json
    from dataclasses import asdict

    plain = json.loads(json.dumps(asdict(row), default=lambda v: v.item() if hasattr(v, "item") else str(v)))
    group["idc_map"].update_attributes({PART_STAMP: {"key": key, "row": plain}})


def _one_input(run: Run, gid: str, group, attrs: InputAttrs, patient: str, thr: Threshold, cfg: ReportConfig,
               read: dict | None = None, present: frozenset | None = None) -> tuple[InputReport, Failure | None]:
    read = dict(read or {})  # the arrays read so far (input_state's done flags at least): not read again
    status, note = input_state(group, read)
    model_id = str(group["probs"].attrs.get("model_id", "")) if "probs" in group else ""
    if status != REPORTED:
        return InputReport(unscored_figures(gid, attrs, patient, status, note, thr.value, model_id)), None
    try:
        scored = load_scored(gid, group, patient, read=read)
        key = _part_key(scored, group, patient, thr.value, cfg)
        kept = _kept_part(run, gid, group, cfg, key, present)
        if kept is not None:
            return kept, None
        with run.fs.staged(run.report_dir) as out:  # on object storage: written here, then PUT
            row = report_input(out, gid, group, patient, thr.value, cfg, scored=scored)
        try:
            _stamp_part(group, row, key)  # last: every file of the part is in place
        except Exception as exc:  # noqa: BLE001 - the part is made; without its record a re-run draws it again
            log.warning("%s: its report part is made, but the record that it is whole could not be written (%s); "
                        "a re-run draws it again", attrs.source, exc)
        return row, None
    except StorageError:
        raise  # the output folder itself is unwritable or full: no other input would fare better
    except OSError as exc:
        if exc.errno in STORAGE_ERRNOS:
            raise StorageError(f"cannot write the report: {exc.strerror}", path=run.report_dir,
                               hint="check that the output folder is writable and has free space") from exc
        return _failed_input(gid, attrs, patient, thr, model_id, exc)
    except Exception as exc:  # noqa: BLE001 - one input never stops the report
        return _failed_input(gid, attrs, patient, thr, model_id, exc)


def _failed_input(gid: str, attrs: InputAttrs, patient: str, thr: Threshold, model_id: str, exc: BaseException
                  ) -> tuple[InputReport, Failure]:
    """The row and failure of an input whose own report could not be made (the others go on)."""
    log.warning("%s: report failed: %s", attrs.source, exc)
    failure = Failure.from_exception(attrs.source, STAGE, exc)
    return InputReport(unscored_figures(gid, attrs, patient, FAILED, failure.message, thr.value, model_id)), failure


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------

def _fmt(value: object) -> object:
    """A CSV cell: None empty, floats rounded to 6 decimals (stable across re-runs)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(round(value, 6))
    return value


def write_table(path: Path, rows: list, columns: tuple[str, ...]) -> Path:
    """Write dataclass rows as CSV (formula-safe)."""
    return write_csv(path, columns, [[_fmt(v) for v in astuple(r)] for r in rows])


INPUT_COLUMNS = tuple(f.name for f in fields(InputFigures))
PATIENT_COLUMNS = tuple(f.name for f in fields(PatientFigures))


def _check_model(thr: Threshold, rows: list[InputReport]) -> None:
    if thr.model_id:
        other = sorted({r.figures.model_id for r in rows if r.figures.model_id and r.figures.model_id != thr.model_id})
        if other:
            log.warning("the threshold comes from model %s but inputs were scored by %s", thr.model_id, ", ".join(other))


def report_task(run: Run, gid: str, patient: str, thr: Threshold, cfg: ReportConfig, group=None,
                read: dict | None = None, present: frozenset | None = None) -> tuple[InputReport, Failure | None]:
    """Dask task: the report of one input (maps into its group, heatmap, GeoJSON), on a worker. ``group``: the input's
    group, when the calling task has it open (:func:`~cancernet_batch.stages.score.settle_task`); ``read``: the
    arrays that task has just read from it (done flags, coords, probabilities: not read again); ``present``: as
    for :func:`_kept_part`."""
    # not open_store: its clean-up would delete other workers' files in flight
    g = group if group is not None else run.open_input(gid)
    if run.remote and hasattr(g, "load_members"):  # its arrays' documents in two round trips, not one each
        g.load_members()
    return _one_input(run, gid, g, InputAttrs.from_json(dict(g.attrs)), patient, thr, cfg, read, present)


def report_if_last(run: Run, gid: str, group, patient: str, thr: Threshold, cfg: ReportConfig,
                   claim: str | None = None) -> tuple[InputReport, Failure | None] | None:
    """In a chunk task that has just scored its chunk (:func:`~cancernet_batch.stages.tile.tile_chunk_task` with
    ``report``): when every chunk of the input is now scored (its done flags, read after this chunk's was
    written), mark the input's tiling complete and make its report part, as :func:`report_task` does, in the same
    task: no round trip through the client, and no chunk results to fetch from other workers, between the last
    chunk and the report. Else None.

    Two chunk tasks that finish together may each see every chunk scored. With ``claim`` (a name for
    :meth:`Run.claim`, one per input and run) only the first to claim it goes on; the other returns None, as if it
    were not the last. Without, both would draw the whole part at the same time (twice the work), into the same
    files: an OME-Zarr folder renamed into place by both at once could fail one of them, and that result, reaching
    the client first, would fail a good input. When the task that claimed it dies, none of the others makes the
    part: the client submits a report task once every chunk is back."""
    done = store.done_mask(group)
    if not done.all() or (claim is not None and not run.claim(claim)):
        return None
    store.mark_complete(group)
    return report_task(run, gid, patient, thr, cfg, group=group, read={"done": done})


def submit_report(client, run: Run, gid: str, patient: str, thr: Threshold, cfg: ReportConfig, *,
                  split: bool = False, priority: int = 0):
    """Submit :func:`report_task` for one input; on the tiling workers when the work is split."""
    return client.submit(report_task, run, gid, patient, thr, cfg, pure=False, priority=priority,
                         resources={TILE: 1} if split else None, key=f"report-{gid}-{time.monotonic_ns()}")


def report_result(fut, gid: str, attrs: InputAttrs, patient: str, thr: Threshold
                  ) -> tuple[InputReport, Failure | None]:
    """The outcome of a report task; a worker lost under it fails that input only."""
    try:
        return fut.result()
    except StorageError:
        raise  # the output folder itself is unwritable or full: no other input would fare better
    except Exception as exc:  # noqa: BLE001 - e.g. the worker was killed for memory while drawing this input
        return _failed_input(gid, attrs, patient, thr, "", exc)


def _report_on_cluster(client, run: Run, work: list[tuple[str, str, InputAttrs]], thr: Threshold, cfg: ReportConfig,
                       progress: Callable[[int], None] | None) -> list[tuple[InputReport, Failure | None]]:
    """``report_task`` for each ``(gid, patient, attrs)`` on the cluster, a bounded number in flight, in order."""
    split = work_split(client)

    def submit(i: int):
        gid, patient, _ = work[i]
        return submit_report(client, run, gid, patient, thr, cfg, split=split)

    results: dict[int, tuple] = {}
    window = max(2, 2 * (sum(client.nthreads().values()) or 1))
    for i, fut in as_completed_windowed(range(len(work)), submit, window):
        gid, patient, attrs = work[i]
        results[i] = report_result(fut, gid, attrs, patient, thr)
        if progress is not None:
            progress(1)
    return [results[i] for i in range(len(work))]


def write_tables(run: Run, rows: list[InputReport], thr: Threshold, failures: list[Failure]) -> ReportSummary:
    """Write inputs.csv, patients.csv, the report's failures.csv and index.html for ``rows`` (atomically)."""
    from ..atomic import write_text
    from ..report_html import render_index

    out = run.report_dir
    figures = [r.figures for r in rows]
    summary = ReportSummary(out, thr, rows, patient_figures(figures), failures)
    with run.fs.staged(out) as local:  # on object storage: written here, then PUT
        write_table(local / INPUTS_CSV, figures, INPUT_COLUMNS)
        write_table(local / PATIENTS_CSV, summary.patients, PATIENT_COLUMNS)
        run.write_report_failures(failures, local)  # with the other tables (on object storage: one batch of PUTs)
        write_viewer(local)
        write_text(local / INDEX_HTML, render_index(summary))
    return summary


def finish_report(run: Run, rows: list[InputReport], thr: Threshold, failures: list[Failure]) -> ReportSummary:
    """The report's last step: drop files of inputs no longer reported, then write the tables."""
    _check_model(thr, rows)
    # an input with a heatmap keeps its other drawn files; its GeoJSON files as its row names them
    drawn = [InputFiles(Path(r.heatmap).stem) for r in rows if r.heatmap]
    run.remove_unreported([*(p for f in drawn for p in (f.heatmap, f.thumb, f.view, f.ome_zarr, f.ome_tiff)),
                           *(p for r in rows for p in (r.geojson, r.regions) if p)])
    summary = write_tables(run, rows, thr, failures)
    log.info("report: %d inputs reported, %d not scored, %d failed -> %s", summary.reported, summary.not_scored,
             summary.failed, summary.index)
    return summary


def make_report(run_dir: "str | os.PathLike | Run", cfg: ReportConfig = ReportConfig(),
                progress: Callable[[int], None] | None = None, client=None) -> ReportSummary:
    """Write ``RUN/report/`` for every input of the run's store; returns what was written.

    ``client``: a connected ``distributed.Client`` to make the inputs' maps, heatmaps and GeoJSON as
    Dask tasks in parallel; the tables and index.html are written here once all are done. Without
    one, inputs are reported one after another here.
    """
    run = Run.of(run_dir)
    run.open_store("r")  # a clear error when there is no store
    with run.lock("report"):
        root = run.open_store("r+")
        thr = resolve_threshold(run, cfg.threshold, cfg.model_dir)
        mapping = read_patient_map(cfg.patients_csv) if cfg.patients_csv else {}
        damaged: list = []
        groups = [(gid, g, InputAttrs.from_json(dict(g.attrs)))
                  for gid, g in store.iter_inputs(root, complete_only=False, damaged=damaged)]
        for key in unmatched_keys(mapping, [(gid, a) for gid, _, a in groups]):
            log.warning("patient map: %r names no input of this run", key)
        run.remove_stale_report_temps()  # left by a killed earlier report
        if client is not None and len(groups) > 1:
            done = _report_on_cluster(client, run, [(gid, patient_of(gid, attrs, mapping), attrs)
                                                    for gid, _, attrs in groups], thr, cfg, progress)
        else:
            done = []
            for gid, g, attrs in groups:
                done.append(_one_input(run, gid, g, attrs, patient_of(gid, attrs, mapping), thr, cfg))
                if progress is not None:
                    progress(1)
        rows = [row for row, _ in done]
        failures = run.record_failures([f for _, f in done if f] + [d.failure(STAGE) for d in damaged],
                                       retried={a.source for _, _, a in groups},
                                       from_stage=STAGE)
        return finish_report(run, rows, thr, failures)
