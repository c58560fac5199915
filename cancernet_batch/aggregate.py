"""IDC maps and per-input / per-patient figures from a scored run, and map accuracy (Dice).

An input is *reported* when its tiling is complete and every chunk of its predictions is done;
any other input is *not scored* (with a note why) and is listed, never silently dropped.

Figures of one input, at decision threshold ``t`` (a tile is IDC when ``prob >= t``):

* tissue tiles: the tiles in the store (tiling keeps tissue tiles only, unless told otherwise);
* IDC tiles, IDC fraction = IDC tiles / tissue tiles;
* areas in mm²: tiles x ``(50 * target_mpp / 1000) ** 2`` (0.04 mm² per tile at 4.0 µm/px);
* mean and max probability over the tissue tiles;
* IDC regions (:mod:`cancernet_batch.regions`: IDC tiles joined through shared edges, those smaller
  than ``--min-region-mm2`` left out): their count and the area of the largest, in mm².

A patient's figures sum tiles and areas over the patient's reported inputs; its IDC fraction is
IDC tiles / tissue tiles over all of them, its mean probability the tile-weighted mean, its max
the max of the maxima; its region count the sum over its inputs, its largest region the largest of any.

Map accuracy against a synthetic slide's truth (:func:`compare_with_truth`): the predicted IDC
mask is ``map >= t`` (unscored / background tiles are not IDC), the true mask is ``truth.idc``, on
the same grid. Dice = 2 |P ∩ T| / (|P| + |T|), 1.0 when both masks are empty. Sensitivity and
precision use the same counts; specificity counts true negatives on the *tissue union* (tiles
that the truth or the tiling calls tissue), so the slide's empty background does not inflate it.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import PATCH_SIZE, store
from .errors import ConfigError, InputError, ModelError
from .modelfolder import META_FILE, ModelFolder
from .regions import find_regions, region_summary
from .store import InputAttrs

log = logging.getLogger(__name__)

REPORTED = "reported"
NOT_SCORED = "not scored"
FAILED = "failed"  # scored, but writing its report failed (listed in the run's failures list)
DEFAULT_THRESHOLD = 0.5


# --------------------------------------------------------------------------------------------
# threshold and patients
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Threshold:
    """The decision threshold of a report and where it came from."""

    value: float
    source: str  # "--threshold", the model folder's metadata file, the run's predict record file, or the default's note
    is_default: bool = False
    model_id: str | None = None  # the model id beside the threshold it came from, when known


def _load_json(path: Path, error: type[Exception]) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise error(f"cannot read {path.name}: {exc}", path=path, hint="give a file written by this tool") from exc
    if not isinstance(data, dict):
        raise error(f"{path.name} is not a JSON object", path=path, hint="give a file written by this tool")
    return data


def _checked_threshold(value: object, where: object) -> float:
    try:
        t = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        t = math.nan
    if not 0.0 <= t <= 1.0:
        raise ConfigError(f"decision threshold {value!r} is not in [0, 1]", path=where,
                          hint="give --threshold between 0 and 1")
    return t


def model_threshold(model_dir: str | os.PathLike) -> tuple[float | None, str | None]:
    """``(threshold, model_id)`` from the model folder's metadata (:class:`ModelFolder`); None for what it does not hold."""
    path = ModelFolder(model_dir).meta
    if not path.is_file():
        raise ModelError(f"no {META_FILE} in the model folder", path=model_dir,
                         hint="give the folder written by `cancernet train`, or --threshold")
    meta = _load_json(path, ModelError)
    value, model_id = meta.get("threshold"), meta.get("model_id")
    return (None if value is None else _checked_threshold(value, path)), (None if model_id is None else str(model_id))


def resolve_threshold(run, threshold: float | None = None,
                      model_dir: str | os.PathLike | None = None) -> Threshold:
    """``threshold`` if given; else the model's (``--model``, then the run's predict record); else 0.5.

    ``run``: the :class:`~cancernet_batch.runfolder.Run` (or its folder).
    """
    from .runfolder import Run

    if threshold is not None:
        return Threshold(_checked_threshold(threshold, None), "--threshold")
    run = Run.of(run)
    meta = run.predict_record() if model_dir is None else None
    if meta is not None:
        if meta.get("threshold") is not None:
            return Threshold(_checked_threshold(meta["threshold"], run.predict_json), run.predict_json.name,
                             model_id=meta.get("model_id"))
        if meta.get("model_dir") and ModelFolder(meta["model_dir"]).meta.is_file():
            model_dir = meta["model_dir"]
    if model_dir is not None:
        t, model_id = model_threshold(model_dir)
        if t is not None:
            return Threshold(t, f"{META_FILE} of {model_dir}", model_id=model_id)
    log.warning("no model threshold found; using the default %.2f (give --threshold or --model)", DEFAULT_THRESHOLD)
    return Threshold(DEFAULT_THRESHOLD, "default (no model threshold found)", True)


def read_patient_map(path: str | os.PathLike) -> dict[str, str]:
    """``{input: patient}`` from a CSV with columns ``input,patient`` (extra columns are ignored)."""
    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"input", "patient"} <= {f.strip() for f in reader.fieldnames}:
                raise InputError("the patient map needs the columns input,patient", path=p,
                                 hint="write a header line `input,patient`")
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read the patient map: {getattr(exc, 'strerror', None) or exc}", path=p,
                         hint="give an existing UTF-8 CSV with columns input,patient") from exc
    mapping: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        key, patient = row.get("input", ""), row.get("patient", "")
        if not key or not patient:
            raise InputError(f"line {line}: empty input or patient", path=p, hint="fill both columns on every line")
        if mapping.get(key, patient) != patient:
            raise InputError(f"line {line}: input {key!r} is mapped to two patients", path=p,
                             hint="keep one line per input")
        mapping[key] = patient
    return mapping


def _input_keys(gid: str, attrs: InputAttrs) -> tuple[str, ...]:
    """What a patient map may name an input by, most specific first: id, path, file name."""
    src = Path(attrs.source)
    return gid, str(src.resolve()), src.name


def _map_key(key: str) -> str:
    """A patient map key as compared: paths (with a separator) resolved, names and ids as they are."""
    return str(Path(key).resolve()) if ("/" in key or os.sep in key) else key


def patient_of(gid: str, attrs: InputAttrs, mapping: dict[str, str]) -> str:
    """The patient of an input: from ``mapping`` (by input id, source path or file name), else its attrs.

    Without either, the source's file stem stands for the patient.
    """
    by_key = {_map_key(k): v for k, v in mapping.items()}
    for key in _input_keys(gid, attrs):
        if key in by_key:
            return by_key[key]
    return attrs.patient or Path(attrs.source).stem or gid


def unmatched_keys(mapping: dict[str, str], inputs: list[tuple[str, InputAttrs]]) -> list[str]:
    """Keys of the patient map that name none of the inputs (probably a typo)."""
    known = {k for gid, a in inputs for k in _input_keys(gid, a)}
    return sorted(k for k in mapping if _map_key(k) not in known)


# --------------------------------------------------------------------------------------------
# inputs and maps
# --------------------------------------------------------------------------------------------

def input_state(group, read: dict | None = None) -> tuple[str, str]:
    """``(REPORTED, "")`` when tiling is complete and every chunk is scored, else ``(NOT_SCORED, why)``.
    ``read``: a dict that receives the done flags read here (``done``), for :func:`load_scored` next; flags it holds
    already (read by the caller just before) are used, not read again."""
    if not group.attrs.get("complete", False):
        return NOT_SCORED, "tiling incomplete"
    if "probs" not in group:
        return NOT_SCORED, "no predictions"
    done = read["done"] if read is not None and "done" in read else store.done_mask(group)
    if read is not None:
        read["done"] = done
    if not done.all():
        return NOT_SCORED, f"{int(done.sum())} of {done.size} chunks scored"
    return REPORTED, ""


def level0_tile_px(attrs: InputAttrs) -> float:
    """Side of one model tile in level-0 pixels (50 for patient folders: the Kaggle image's pixels)."""
    if attrs.level0_tile_px:
        return float(attrs.level0_tile_px)
    if attrs.kind == "slide" and attrs.source_mpp:
        return PATCH_SIZE * attrs.target_mpp / attrs.source_mpp
    return float(PATCH_SIZE)


def tile_area_mm2(target_mpp: float) -> float:
    """Area of one model tile in mm²: ``(50 * target_mpp / 1000) ** 2`` (0.04 at 4.0 µm/px)."""
    return (PATCH_SIZE * target_mpp / 1000.0) ** 2


@dataclass(frozen=True)
class ScoredInput:
    """One fully scored input: its tiles' grid positions and probabilities."""

    input_id: str
    attrs: InputAttrs
    patient: str
    coords: np.ndarray  # (N, 2) int32 (row, col)
    probs: np.ndarray  # (N,) float32
    model_id: str

    def on_grid(self) -> np.ndarray:
        """Mask of the tiles with a position inside the grid (plain folders may have none)."""
        rows, cols = self.attrs.grid_shape
        r, c = self.coords[:, 0], self.coords[:, 1]
        return (r >= 0) & (c >= 0) & (r < rows) & (c < cols)

    def idc_map(self) -> np.ndarray:
        """The probability map: float32 ``grid_shape``, NaN where no tile was scored (background)."""
        m = np.full(tuple(self.attrs.grid_shape), np.nan, np.float32)
        ok = self.on_grid()
        if not ok.all():
            log.warning("%s: %d tiles have no position on the grid and are left off the map",
                        self.input_id, int((~ok).sum()))
        m[self.coords[ok, 0], self.coords[ok, 1]] = self.probs[ok]
        return m


def find_input_regions(s: ScoredInput, threshold: float, min_region_mm2: float = 0.0, smooth: int = 0) -> list:
    """The IDC regions of a scored input (:func:`cancernet_batch.regions.find_regions`), largest first."""
    return find_regions(tuple(s.attrs.grid_shape), s.coords, s.probs, threshold,
                        tile_area_mm2=tile_area_mm2(s.attrs.target_mpp), min_area_mm2=min_region_mm2, smooth=smooth)


def load_scored(gid: str, group, patient: str, *, read: dict | None = None) -> ScoredInput:
    """Read the coords and probabilities of a reported input (small: 12 bytes a tile).

    :class:`~cancernet_batch.store.DamagedInputError` when its stored data are inconsistent (done
    flags without probabilities, positions off the grid, arrays of the wrong type or shape): such an
    input fails, it is never reported as 0 % IDC or drawn. Each array is read once: the check's reads
    are the figures' (``read``: the done flags :func:`input_state` has just read, if any).
    """
    read = dict(read or {})
    store.check_input(group, gid, done=read.get("done"), read=read)
    attrs = InputAttrs.from_json(dict(group.attrs))
    coords = np.asarray(read["coords"] if "coords" in read else group["coords"][:], np.int32).reshape(-1, 2)
    probs = np.asarray(read["probs"] if "probs" in read else group["probs"][:], np.float32)
    if probs.size and not np.isfinite(probs).all():
        log.warning("%s: %d scored tiles have no finite probability; they count as not IDC",
                    gid, int((~np.isfinite(probs)).sum()))
    return ScoredInput(gid, attrs, patient, coords, probs, str(group["probs"].attrs.get("model_id", "")))


def write_idc_map(group, idc_map: np.ndarray, model_id: str) -> None:
    """Save the map as array ``idc_map`` in the input's group (replacing an older one)."""
    rows, cols = idc_map.shape
    # its attributes go in with its metadata (one write), made by store.create_arrays (no parent HEADs);
    # an older map (a report made again) is replaced, which on object storage costs a listing: only then
    spec = {"idc_map": dict(shape=idc_map.shape, dtype="float32", fill_value=np.nan,
                            chunks=(max(1, min(rows, 1024)), max(1, min(cols, 1024))),
                            attributes={"model_id": model_id,
                                        "description": "P(IDC) per model tile; NaN: background or unscored"})}
    # one lookup; then its chunks and document in one batch (no parent read); a report made again: the old map goes
    # first (its chunks too)
    there = "idc_map" in group
    store.create_arrays(group, spec, absent=not there, overwrite=there, data={"idc_map": idc_map})


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------

def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


@dataclass(frozen=True)
class InputFigures:
    """One row of ``inputs.csv``; figures are None for inputs that are not scored."""

    input_id: str
    source: str
    patient: str
    kind: str
    status: str
    note: str
    tissue_tiles: int | None
    idc_tiles: int | None
    idc_fraction: float | None
    idc_area_mm2: float | None
    tissue_area_mm2: float | None
    mean_prob: float | None
    max_prob: float | None
    idc_regions: int | None  # IDC regions (edge-connected IDC tiles) at least the minimum size
    largest_region_mm2: float | None  # area of the largest of them (0.0 without any)
    model_id: str
    threshold: float
    target_mpp: float
    source_mpp: float | None


def input_figures(s: ScoredInput, threshold: float, regions: tuple[int, float] | None = None,
                  min_region_mm2: float = 0.0) -> InputFigures:
    """The figures of one scored input at ``threshold``.

    ``regions``: ``(count, largest area mm²)`` of its IDC regions when already found, else they are
    found here (regions smaller than ``min_region_mm2`` not counted).
    """
    if regions is None:
        regions = region_summary(find_input_regions(s, threshold, min_region_mm2))
    finite = s.probs[np.isfinite(s.probs)]
    n, k = int(s.probs.size), int((finite >= threshold).sum())
    area = tile_area_mm2(s.attrs.target_mpp)
    return InputFigures(
        s.input_id, s.attrs.source, s.patient, s.attrs.kind, REPORTED, "", n, k, _ratio(k, n), k * area, n * area,
        float(finite.mean()) if finite.size else None, float(finite.max()) if finite.size else None,
        regions[0], regions[1], s.model_id, threshold, s.attrs.target_mpp, s.attrs.source_mpp)


def unscored_figures(gid: str, attrs: InputAttrs, patient: str, status: str, note: str, threshold: float,
                     model_id: str = "") -> InputFigures:
    """The row of an input without figures (not scored, or its report failed)."""
    return InputFigures(gid, attrs.source, patient, attrs.kind, status, note, None, None, None, None, None,
                        None, None, None, None, model_id, threshold, attrs.target_mpp, attrs.source_mpp)


@dataclass(frozen=True)
class PatientFigures:
    """One row of ``patients.csv``: a patient's reported inputs aggregated."""

    patient: str
    inputs: int
    inputs_not_reported: int
    tissue_tiles: int
    idc_tiles: int
    idc_fraction: float | None
    idc_area_mm2: float
    tissue_area_mm2: float
    mean_prob: float | None
    max_prob: float | None
    idc_regions: int  # summed over its reported inputs
    largest_region_mm2: float | None  # the largest region of any of its reported inputs (empty: none reported)


def patient_figures(rows: list[InputFigures]) -> list[PatientFigures]:
    """Aggregate inputs per patient (sorted by patient id)."""
    by_patient: dict[str, list[InputFigures]] = {}
    for r in rows:
        by_patient.setdefault(r.patient, []).append(r)
    out = []
    for patient in sorted(by_patient):
        done = [r for r in by_patient[patient] if r.status == REPORTED]
        tissue = sum(r.tissue_tiles or 0 for r in done)
        idc = sum(r.idc_tiles or 0 for r in done)
        weighted = sum(((r.mean_prob or 0.0) * (r.tissue_tiles or 0) for r in done), 0.0)
        maxima = [r.max_prob for r in done if r.max_prob is not None]
        out.append(PatientFigures(
            patient, len(done), len(by_patient[patient]) - len(done), tissue, idc, _ratio(idc, tissue),
            sum((r.idc_area_mm2 or 0.0 for r in done), 0.0), sum((r.tissue_area_mm2 or 0.0 for r in done), 0.0),
            _ratio(weighted, tissue), max(maxima) if maxima else None,
            sum(r.idc_regions or 0 for r in done),
            max((r.largest_region_mm2 or 0.0 for r in done), default=None) if done else None))
    return out


# --------------------------------------------------------------------------------------------
# map accuracy against a synthetic slide's truth
# --------------------------------------------------------------------------------------------
