"""What tiling does to one input: find inputs, plan the model grid, read tiles at the model's resolution.

**Grid contract.** At target resolution ``T`` µm/px the model grid of a slide starts at the slide's
level-0 origin; tile ``(row, col)`` covers ``[col * 50 * T, (col + 1) * 50 * T)`` µm in x (and the
same in y with ``row``). ``rows = floor(H0 * mpp0 / (50 * T))``, ``cols`` likewise: partial tiles
at the right and bottom edges are dropped. One tile is ``level0_tile_px = 50 * T / mpp0`` level-0
pixels a side. Tiles are read from the chosen pyramid level (see
:func:`cancernet_batch.slides.choose_level`) and area-averaged to exactly 50 x 50 px.

**Tissue.** A low-resolution view on the same grid (8 px per tile) gives each tile a tissue
fraction (:mod:`cancernet_batch.tissue`, sizes in µm of the view); a tile is kept when it is at
least the threshold (default a quarter of the tile), unless the filter is off. Background tiles are counted, not stored.

**Order.** Kept tiles are stored block by block (blocks of :attr:`TileConfig.block` x ``block``
tiles in raster order, raster order inside a block), so one store chunk covers a compact piece of
slide and its task reads few pixels twice. ``coords`` always gives each tile's ``(row, col)``.

**Patient folders** (Kaggle layout) are inputs too: one per patient; their 50 px patches are
assumed to be at the model's resolution (they carry none), and every patch is kept.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import PATCH_SIZE, deadline
from .config import TileConfig
from .errors import InputError
from .failures import Failure
from .slides import SLIDE_EXTENSIONS, MAX_READ_PX, SlideReader, choose_level, open_slide, read_scaled, resolve_mpp
from .slides.base import BACKGROUND, area_resize, resample_regions
from .store import InputAttrs
from .tissue import PX_PER_TILE, tile_fractions, tissue_mask

log = logging.getLogger(__name__)

MAX_VIEW_PX = 16_000_000
"""Largest low-resolution view (pixels) tiling makes for tissue detection and the stored thumbnail."""
_TCGA = re.compile(r"^(tcga-[a-z0-9]{2}-[a-z0-9]{4})", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputSpec:
    """One input: a slide file or a patient patch folder.

    ``path`` is the path as the user gave it (or as found under a folder they gave), made absolute but
    with its symbolic links kept: that is what every report, log and failures.csv row shows. The
    input's identity (:func:`cancernet_batch.store.input_id`, duplicates) is its real path.
    """

    path: Path
    kind: str  # "slide" | "patches"

    @property
    def source(self) -> str:
        return str(self.path)


def as_given(path: str | os.PathLike) -> Path:
    """``path`` as the user gave it, made absolute: ``os.path.abspath`` (``.`` and ``..`` folded, symbolic
    links kept), unless folding ``..`` after a link would name another file; then only made absolute."""
    p = Path(path)
    folded = Path(os.path.abspath(p))
    try:
        if ".." not in p.parts or folded.resolve() == p.resolve():
            return folded
    except (OSError, RuntimeError):  # a symlink loop: keep the path as it is
        pass
    return p.absolute()


def discover(paths: list[str | os.PathLike], storage_options: dict | None = None
             ) -> tuple[list[InputSpec], list[Failure]]:
    """Inputs named by ``paths``: files, folders searched recursively by extension, and patient folders.

    A folder that is a patient folder (Kaggle layout: ``0``/``1`` subfolders) is one input and is
    not searched further; run folders (``*.zarr``) and hidden folders are skipped. Missing paths and
    folders with nothing to tile come back as failures (stage ``discover``). Paths stay as given
    (made absolute, links kept); one file reached twice (through a link and directly) is one input,
    under the path met first.

    A URL (``s3://bucket/prefix/slide.svs``, or a prefix holding slides or patient folders) names objects
    on object storage, found through fsspec with ``storage_options`` (:mod:`cancernet_batch.remote`),
    searched like a local folder.
    """
    from .patches import is_patient_folder
    from .remote import as_path, find_inputs, is_url

    specs: dict[Path, InputSpec] = {}
    failures: list[Failure] = []

    def add(p: Path, kind: str) -> None:
        try:
            real = p.resolve(strict=True)
        except (OSError, RuntimeError) as exc:  # a symlink loop, a dangling link, a vanished file
            why = "a symlink loop" if "loop" in str(exc).lower() else f"cannot be resolved ({exc.__class__.__name__})"
            failures.append(Failure.from_exception(as_given(p), "discover", InputError(
                f"path is {why}", path=as_given(p), hint="fix or remove the link")))
            return
        specs.setdefault(real, InputSpec(as_given(p), kind))

    for raw in paths:
        if is_url(raw):
            try:
                found = find_inputs(str(raw), SLIDE_EXTENSIONS, storage_options)
            except InputError as exc:
                failures.append(Failure.from_exception(str(as_path(raw)), "discover", exc))
                continue
            if found == ([], []):
                failures.append(Failure.from_exception(str(as_path(raw)), "discover", InputError(
                    "no slides or patient folders found under this prefix", path=as_path(raw),
                    hint=f"slides end in {', '.join(SLIDE_EXTENSIONS)}; patient folders hold 0/ and 1/")))
            slides, patients = found if found is not None else ([str(raw)], [])
            for url in slides:
                specs.setdefault(as_path(url), InputSpec(as_path(url), "slide"))
            for url in patients:
                specs.setdefault(as_path(url), InputSpec(as_path(url), "patches"))
            continue
        p = Path(raw)
        if not p.exists():
            failures.append(Failure.from_exception(as_given(p), "discover", InputError(
                "no such file or folder", path=as_given(p), hint="check the path")))
            continue
        if p.is_file():
            add(p, "slide")
            continue
        if is_patient_folder(p):
            add(p, "patches")
            continue
        before = len(specs)
        for dirpath, dirnames, filenames in os.walk(p):
            d = Path(dirpath)
            if d != p and is_patient_folder(d):
                add(d, "patches")
                dirnames[:] = []
                continue
            dirnames[:] = sorted(x for x in dirnames if not x.startswith(".") and not x.endswith(".zarr"))
            for f in sorted(filenames):
                if f.lower().endswith(SLIDE_EXTENSIONS) and not f.startswith("."):
                    add(d / f, "slide")
        if len(specs) == before:
            failures.append(Failure.from_exception(as_given(p), "discover", InputError(
                "no slides or patient folders found in this folder", path=as_given(p),
                hint=f"slides end in {', '.join(SLIDE_EXTENSIONS)}; patient folders hold 0/ and 1/")))
    return sorted(specs.values(), key=lambda s: s.source), failures


def discover_some(paths: list[str | os.PathLike], storage_options: dict | None = None
                  ) -> tuple[list[InputSpec], list[Failure]]:
    """:func:`discover`, but :class:`InputError` when nothing at all is found (the command cannot do anything)."""
    specs, failures = discover([str(p) for p in paths], storage_options)
    if not specs:
        if failures:
            raise InputError(f"nothing to tile: {failures[0].message}")
        raise InputError("no slides or patient folders found", path=", ".join(map(str, paths)),
                         hint="give slide files, folders holding slides, or patient folders (PATIENT/0, PATIENT/1)")
    return specs, failures


def patient_of(path: str | os.PathLike) -> str:
    """Patient id of a slide: the TCGA participant (``TCGA-XX-XXXX``) when the name has one, else the file stem."""
    from .remote import is_url

    name = os.fspath(path).rstrip("/").rsplit("/", 1)[-1] if is_url(path) else Path(path).name
    stem = name.split(".")[0] if is_url(path) or Path(path).is_file() else name
    m = _TCGA.match(stem)
    return m.group(1).upper() if m else stem


# --------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------

@dataclass
class TilePlan:
    """Everything decided for one input before its pixels are tiled (used by ``inspect`` and ``tile``)."""

    source: str
    kind: str
    reader: str
    vendor: str | None
    patient: str
    source_size: int
    source_mtime: float
    target_mpp: float
    grid_shape: tuple[int, int]
    coords: np.ndarray  # (N, 2) int32 (row, col), in store order
    source_mpp: float | None = None
    mpp_source: str = "file"  # file | override | assumed
    level: int = 0
    level_downsample: float = 1.0
    level0_tile_px: float = 0.0
    levels: list[tuple[int, int, float]] = field(default_factory=list)
    tissue: np.ndarray | None = None  # (rows, cols) float32 tissue fraction per grid tile
    thumbnail: np.ndarray | None = None  # the low-resolution view, PX_PER_TILE px per tile
    tissue_threshold: float | None = None
    objective: str | None = None
    series_files: list[str] = field(default_factory=list)
    decode: str | None = None  # TileConfig.decode for slides (how their pixels are decoded)
    decode_path: str | None = None  # what that means for this slide's level ("direct jpeg, 1/2 in the DCT", "reader")
    source_etag: str | None = None  # an object on object storage: its ETag (with its size, its identity)
    source_header: list[int] | None = None  # an object's TIFF: the blocks its header lies in (remote.RangeFile)
    view_source: str | None = None  # where the overview (tissue mask, thumbnail) came from: "level 2", "thumbnail 574x768"

    @property
    def view_px(self) -> int:
        """Pixels per grid tile of the stored thumbnail (0 when there is none)."""
        rows = self.grid_shape[0]
        return 0 if self.thumbnail is None or rows == 0 else self.thumbnail.shape[0] // rows

    @property
    def n_tiles(self) -> int:
        return int(len(self.coords))

    @property
    def n_background(self) -> int:
        return self.grid_shape[0] * self.grid_shape[1] - self.n_tiles if self.kind == "slide" else 0

    @property
    def level_mpp(self) -> float | None:
        return None if self.source_mpp is None else self.source_mpp * self.level_downsample

    @property
    def scale(self) -> float:
        """Output pixels per pixel of the chosen level (1.0: no resampling; < 1: area averaging)."""
        return 1.0 if self.level_mpp is None else self.level_mpp / self.target_mpp

    @property
    def tile_px_level(self) -> float:
        """Side of one model tile in pixels of the chosen level."""
        return self.level0_tile_px / self.level_downsample

    @property
    def tissue_fraction(self) -> float | None:
        return None if self.tissue is None or self.tissue.size == 0 else float(self.tissue.mean())

    def attrs(self) -> InputAttrs:
        extra = {"mpp_source": self.mpp_source, "level_mpp": self.level_mpp, "scale": self.scale,
                 "levels": [list(x) for x in self.levels], "tissue_filter": self.tissue_threshold is not None,
                 "tissue_px_per_tile": self.view_px, "objective": self.objective,
                 "edge_tiles": "dropped", "order": "blocks" if self.kind == "slide" else "files"}
        if self.series_files:
            extra["series_files"] = list(self.series_files)
        if self.decode:
            extra["decode"] = self.decode
            extra["decode_path"] = self.decode_path
            if self.decode == "fast":
                from .slides.direct import DCT_RULE

                extra["dct_rule"] = DCT_RULE
        if self.view_source:
            extra["view_source"] = self.view_source
        if self.source_etag is not None:
            extra["source_etag"] = self.source_etag
        if self.source_header:  # where the chunk tasks find the header at once (they open the object again)
            extra["source_header"] = list(self.source_header)
        return InputAttrs(source=self.source, kind=self.kind, reader=self.reader, patient=self.patient,
                          source_size=self.source_size, source_mtime=self.source_mtime, target_mpp=self.target_mpp,
                          grid_shape=self.grid_shape, n_tiles=self.n_tiles, n_background=self.n_background,
                          source_mpp=self.source_mpp, level=self.level, level_downsample=self.level_downsample,
                          level0_tile_px=self.level0_tile_px, tissue_threshold=self.tissue_threshold,
                          tissue_fraction=self.tissue_fraction, vendor=self.vendor, extra=extra)

    def summary(self) -> dict:
        """A JSON-able description (what ``inspect`` shows)."""
        return {"source": self.source, "kind": self.kind, "reader": self.reader, "vendor": self.vendor,
                "patient": self.patient, "source_mpp": self.source_mpp, "mpp_source": self.mpp_source,
                "levels": [{"width": w, "height": h, "downsample": d,
                            "mpp": None if self.source_mpp is None else self.source_mpp * d}
                           for w, h, d in self.levels],
                "level": self.level, "level_downsample": self.level_downsample, "level_mpp": self.level_mpp,
                "scale": self.scale, "target_mpp": self.target_mpp, "level0_tile_px": self.level0_tile_px,
                "grid_shape": list(self.grid_shape), "grid_tiles": self.grid_shape[0] * self.grid_shape[1],
                "tissue_tiles": self.n_tiles, "background_tiles": self.n_background,
                "tissue_threshold": self.tissue_threshold, "tissue_fraction": self.tissue_fraction,
                "series_files": self.series_files, "decode": self.decode, "decode_path": self.decode_path,
                "view_source": self.view_source}


def _stat(path: str | os.PathLike, series_files: list[str] | None = None) -> tuple[int, float]:
    """Size and mtime of an input; a series counts all its files (total size, newest mtime)."""
    files = [Path(f) for f in (series_files or [path])]
    sts = [f.stat() for f in files]
    return int(sum(s.st_size for s in sts)), float(max(s.st_mtime for s in sts))


def view_px_per_tile(rows: int, cols: int) -> int:
    """Pixels per grid tile of the low-resolution view: :data:`PX_PER_TILE`, fewer when the view would
    exceed :data:`MAX_VIEW_PX` pixels (a very fine target on a huge slide), never fewer than 1."""
    return max(1, min(PX_PER_TILE, int(math.sqrt(MAX_VIEW_PX / max(1, rows * cols)))))


def block_order(coords: np.ndarray, block: int) -> np.ndarray:
    """Indices that sort ``(row, col)`` coords block by block (raster over blocks, raster inside)."""
    r, c = coords[:, 0], coords[:, 1]
    return np.lexsort((c, r, c // block, r // block))


def plan_slide(path: str | os.PathLike, cfg: TileConfig, *, reader: SlideReader | None = None,
               series_files: list[str] | None = None) -> TilePlan:
    """Plan one slide: resolution, level, grid, tissue. Reads only the low-resolution view."""
    own = reader is None
    reader = reader or open_slide(path)
    try:
        return _plan_slide(reader, cfg, series_files or [])
    finally:
        if own:
            reader.close()


THUMBNAIL_GAIN = 4.0
"""The plan's overview comes from the scanner's thumbnail (``decode`` ``fast`` only) when the pyramid level it
would otherwise read holds at least this many times the thumbnail's pixels: a slide with no coarse level (a
small single-level scan decodes its whole level, a JPEG 2000 scan its 2x level: 20 to 200 ms; RESULTS.md section 9)."""

THUMBNAIL_FINER = 4.0
"""... and only when the thumbnail is at least this many times finer than the view on each axis, so that each view
pixel is the exact average of 16 or more of its pixels, which averages out most of its own downsampling filter and
JPEG noise. Real patients rebuilt as slides (benchmarks/real_tissue.py) have thumbnails only about 2x finer than the view:
with them, patient 9175 lost a tile whose tissue fraction sits at the threshold (0.25 from the level, 0.22 from the
thumbnail); CMU-1's and the TCGA sample's are 11-13x finer."""


def _overview(reader: SlideReader, cfg: TileConfig, level: int, extent: tuple[float, float],
              size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """The low-resolution view of level 0's ``(0, 0)`` to ``extent`` at ``size`` (w, h), and where it came from.

    Read from pyramid ``level`` (exact area averages of its pixels), or from the scanner's thumbnail
    (:meth:`~cancernet_batch.slides.base.SlideReader.scanner_thumbnail_size`) when ``cfg.decode`` is ``fast``, the
    thumbnail is :data:`THUMBNAIL_FINER` times finer than the view and the level would decode :data:`THUMBNAIL_GAIN`
    times its pixels or more. The tissue mask is made from this view; the tiles are always read from the chosen
    level. On real scans the thumbnail keeps the same tissue tiles up to one at the threshold
    (``tests/test_tiling.py``)."""
    dv = reader.level_downsamples[level]
    lw, lh = extent[0] / dv, extent[1] / dv
    thumb_size = reader.scanner_thumbnail_size() if cfg.decode == "fast" else None
    if thumb_size is not None:
        tw, th = thumb_size
        w0, h0 = reader.level_dimensions[0]
        fx, fy = tw / w0, th / h0
        if (extent[0] * fx >= THUMBNAIL_FINER * size[0] and extent[1] * fy >= THUMBNAIL_FINER * size[1]
                and lw * lh >= THUMBNAIL_GAIN * tw * th):
            thumb = reader.read_scanner_thumbnail()
            if thumb is not None:
                return area_resize(thumb, (0.0, 0.0, extent[0] * fx, extent[1] * fy), size), f"thumbnail {tw}x{th}"
    return region_reader(reader, level, decode=cfg.decode, view=True)((0.0, 0.0, lw, lh), size), f"level {level}"


def _series_identity(reader: SlideReader, series_files: list[str]) -> tuple[int, str]:
    """``(total size, digest)`` of a DICOM series on object storage, from the folder listing its reader was staged
    with (:func:`cancernet_batch.remote.stage`): what :func:`cancernet_batch.remote.series_stat` finds on resume."""
    from .remote import identity

    beside = getattr(reader, "staged_objects", None) or {}
    for f in series_files:
        if str(f) not in beside:
            raise InputError("is in this DICOM series but was not beside its first file when that was staged",
                             path=f, hint="keep a DICOM slide's files in one folder, and run again")
    return identity({str(f): beside[str(f)] for f in series_files})


def _plan_slide(reader: SlideReader, cfg: TileConfig, series_files: list[str]) -> TilePlan:
    info = reader.info()
    path = reader.path
    mpp0, mpp_source = resolve_mpp(info, cfg.mpp_override)
    level = choose_level(mpp0, info.level_downsamples, cfg.target_mpp, path=path)
    w0, h0 = info.level_dimensions[0]
    tile_um = cfg.tile_um
    rows = int(math.floor(h0 * mpp0 / tile_um + 1e-9))
    cols = int(math.floor(w0 * mpp0 / tile_um + 1e-9))
    if rows == 0 or cols == 0:
        raise InputError(f"slide is {w0 * mpp0:.0f} x {h0 * mpp0:.0f} µm ({w0} x {h0} px at {mpp0:.4g} µm/px), "
                         f"smaller than one model tile ({tile_um:g} µm at {cfg.target_mpp:g} µm/px); nothing to tile",
                         path=path, hint=f"leave it out: a slide must be at least {tile_um:g} µm wide and high")
    if rows * cols > cfg.max_grid_tiles:
        raise InputError(f"slide declares {w0} x {h0} px at {mpp0:.4g} µm/px: a model grid of {rows} x {cols} = "
                         f"{rows * cols} tiles, more than the limit of {cfg.max_grid_tiles}", path=path,
                         hint="a small file that declares a huge image is damaged; leave it out (a real slide this "
                              "large needs a higher TileConfig.max_grid_tiles)")
    s0 = tile_um / mpp0
    # low-resolution view on the model grid: PX_PER_TILE px per tile, fewer on huge grids
    k = view_px_per_tile(rows, cols)
    view_level = choose_level(mpp0, info.level_downsamples, tile_um / k, path=path)
    dv = info.level_downsamples[view_level]
    decode = (cols * s0 / dv) * (rows * s0 / dv)
    if decode > cfg.max_plan_px:
        lw, lh = info.level_dimensions[view_level]
        raise InputError(f"planning would decode {decode:.3g} px of level {view_level} ({lw} x {lh} px): no pyramid "
                         f"level is small enough for the overview (limit {cfg.max_plan_px:.3g} px)", path=path,
                         hint="re-export the slide with a pyramid (e.g. `vips tiffsave --pyramid --tile`), or leave "
                              "it out; a small file that declares a huge image is damaged")
    view, view_source = _overview(reader, cfg, view_level, (cols * s0, rows * s0), (cols * k, rows * k))
    tissue = tile_fractions(tissue_mask(view, px_per_tile=k, um_per_px=tile_um / k), rows, cols, px_per_tile=k)
    keep = tissue >= cfg.tissue_threshold if cfg.tissue_filter else np.ones((rows, cols), bool)
    coords = np.argwhere(keep).astype(np.int32).reshape(-1, 2)
    coords = coords[block_order(coords, cfg.block)]
    identity = getattr(reader, "source_identity", None)  # (size, etag) of an object on object storage
    if identity is not None and series_files:
        identity = _series_identity(reader, series_files)
    if identity is not None:
        (size, etag), mtime = identity, 0.0
    else:
        (size, mtime), etag = _stat(path, series_files), None
    plan = TilePlan(source=str(path), kind="slide", reader=info.reader, vendor=info.vendor, patient=patient_of(path),
                    source_size=size, source_mtime=mtime, target_mpp=cfg.target_mpp, grid_shape=(rows, cols),
                    coords=coords, source_mpp=mpp0, mpp_source=mpp_source, level=level,
                    level_downsample=float(info.level_downsamples[level]), level0_tile_px=s0,
                    levels=[(int(w), int(h), float(d)) for (w, h), d in zip(info.level_dimensions, info.level_downsamples)],
                    tissue=tissue.astype(np.float32), thumbnail=view,
                    tissue_threshold=cfg.tissue_threshold if cfg.tissue_filter else None,
                    objective=info.objective, series_files=list(series_files), decode=cfg.decode,
                    source_etag=etag, source_header=getattr(reader, "source_header", None) if etag else None,
                    view_source=view_source)
    direct = reader.direct_level(level) if cfg.decode != "reader" else None
    plan.decode_path = "reader" if direct is None else direct.describe(plan.tile_px_level / PATCH_SIZE,
                                                                         cfg.decode == "fast")
    log.info("%s: level %d (x%.3g, %.4g µm/px), scale %.4g, grid %dx%d, %d tissue tiles", path, level,
             plan.level_downsample, plan.level_mpp, plan.scale, rows, cols, plan.n_tiles)
    return plan


def plan_patches(folder: str | os.PathLike, cfg: TileConfig, storage_options: dict | None = None) -> TilePlan:
    """Plan one patient folder from its file names (no pixels read); every patch is kept. A prefix on
    object storage is identified by its objects' total size and a digest of their names and ETags."""
    from .patches import grid_shape, scan
    from .remote import as_path, folder_stat, is_url

    remote = is_url(folder)
    folder = as_path(folder)
    records, _ = scan(folder, storage_options)
    coords = np.array([(r.row, r.col) for r in records], np.int32).reshape(-1, 2)
    if remote:
        (size, etag), mtime = folder_stat(str(folder), storage_options), 0.0
    else:
        (size, mtime), etag = _folder_stat(folder), None
    return TilePlan(source=str(folder), kind="patches", reader="patches", vendor=None,
                    patient=records[0].patient if records else folder.name, source_size=size, source_mtime=mtime,
                    target_mpp=cfg.target_mpp, grid_shape=grid_shape(coords), coords=coords,
                    source_mpp=cfg.target_mpp, mpp_source="assumed", level0_tile_px=float(PATCH_SIZE),
                    source_etag=etag)


def _folder_stat(folder: Path) -> tuple[int, float]:
    """Total size and newest mtime of the files below a folder (a changed or added patch changes them)."""
    size, mtime = 0, folder.stat().st_mtime
    for dirpath, _, files in os.walk(folder):
        mtime = max(mtime, os.stat(dirpath).st_mtime)
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            size += st.st_size
            mtime = max(mtime, st.st_mtime)
    return size, mtime


def source_stat(spec_source: str, kind: str, series_files: list[str] | None = None) -> tuple[int, float]:
    """Size and mtime recorded for an input (compared on re-runs to decide whether it changed); for an
    object on object storage see :func:`cancernet_batch.remote.stat` (size and ETag)."""
    return _folder_stat(Path(spec_source)) if kind == "patches" else _stat(spec_source, series_files)


# --------------------------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------------------------

def region_reader(reader: SlideReader, level: int, *, decode: str = "fast", max_read: int = MAX_READ_PX,
                  only: set[int] | None = None, view: bool = False):
    """``scaled(box, size)``: :func:`~cancernet_batch.slides.read_scaled` of ``level``, straight from the file's
    compressed tiles (:mod:`cancernet_batch.slides.direct`) unless ``decode`` is ``reader`` or the level is not
    a tiled TIFF page that module reads. ``only``: on that direct path, the compressed tiles to decode (the
    others are left white: :meth:`~cancernet_batch.slides.direct.TiledLevel.region`). ``view``: the plan's
    low-resolution view, not tiles (its own DCT scale rule: :func:`~cancernet_batch.slides.direct.dct_scale`)."""
    direct = reader.direct_level(level) if decode != "reader" else None
    if direct is not None:
        return lambda box, size: direct.read_scaled(box, size, fast=decode == "fast", max_read=max_read, only=only,
                                                    view=view)
    return lambda box, size: read_scaled(reader, level, box, size, max_read=max_read)


def read_tiles(reader: SlideReader, level: int, tile_px: float, coords: np.ndarray, *,
               max_read: int = MAX_READ_PX, decode: str = "fast") -> np.ndarray:
    """Tiles ``(N, 50, 50, 3) uint8`` at ``coords`` (row, col); ``tile_px`` = tile side in level pixels.

    Tiles are gathered in windows of at most ``max_read`` source pixels a side; each window reads the
    bounding box of its tiles once and area-averages it to 50 px per tile. ``decode`` (one of
    :data:`~cancernet_batch.config.DECODE_MODES`): ``fast`` and ``exact`` decode a tiled TIFF
    level's compressed tiles directly (:mod:`cancernet_batch.slides.direct`; ``fast`` scales JPEG tiles
    in the DCT domain), falling back to the reader for any other level; ``reader`` always uses it.
    """
    n = len(coords)
    out = np.empty((n, PATCH_SIZE, PATCH_SIZE, 3), np.uint8)
    if n == 0:
        return out
    direct = reader.direct_level(level) if decode != "reader" else None
    # each window reads the bounding box of its tiles; of the compressed tiles in it, only those the tiles touch
    # are fetched and decoded (the rest, glass between tissue, is left white: no output pixel averages any of it)
    only = set(direct.needed(coords, tile_px).tolist()) if direct is not None else None
    scaled = region_reader(reader, level, decode=decode, max_read=max_read, only=only)
    per = max(1, int(max_read // tile_px))
    keys = (coords[:, 0] // per).astype(np.int64) * (1 << 32) + coords[:, 1] // per
    order = np.argsort(keys, kind="stable")
    bounds = np.flatnonzero(np.diff(keys[order])) + 1
    groups = np.split(order, bounds)
    # a slide on object storage: every window's compressed tiles in one batch of coalesced requests
    by_reader = getattr(reader, "prefetch", None)
    prefetch = ((lambda boxes: direct.prefetch(boxes, only)) if direct is not None
                else by_reader and (lambda boxes: by_reader(level, boxes)))
    if prefetch:
        boxes = []
        for idx in groups:
            (r0, c0), (r1, c1) = coords[idx].min(axis=0), coords[idx].max(axis=0) + 1
            boxes.append((c0 * tile_px, r0 * tile_px, c1 * tile_px, r1 * tile_px))
        prefetch(boxes)
    # through the reader, a window is read in the parts its tiles lie in (the glass between them not decoded) where
    # the reader gives a level pixel the same whatever region holds it: the same tiles, bit for bit
    parts = direct is None and reader.reads_level_pixels(level)
    for idx in groups:
        rc = coords[idx]
        r0, c0 = rc.min(axis=0)
        r1, c1 = rc.max(axis=0) + 1
        box, size = (c0 * tile_px, r0 * tile_px, c1 * tile_px, r1 * tile_px), (int(c1 - c0) * PATCH_SIZE,
                                                                              int(r1 - r0) * PATCH_SIZE)
        if parts and len(idx) < (r1 - r0) * (c1 - c0):  # through the reader, with tiles left out of the window
            img = read_scaled_parts(reader, level, box, size, tile_rects(rc, tile_px), max_read=max_read)
        else:
            img = scaled(box, size)
        for i, (r, c) in zip(idx, rc):
            y, x = (r - r0) * PATCH_SIZE, (c - c0) * PATCH_SIZE
            out[i] = img[y:y + PATCH_SIZE, x:x + PATCH_SIZE]
    return out


def tile_rects(rc: np.ndarray, tile_px: float) -> list[tuple[int, int, int, int]]:
    """The level-pixel boxes ``(x0, y0, x1, y1)`` that hold the tiles at grid ``rc`` (row, col): each run of adjacent
    tiles in a grid row, and the same run in the rows below it in the same box; each box one pixel wider on every
    side than the tiles' own footprint (an output pixel's area weights reach at most a rounding error past it)."""
    boxes: list[list[int]] = []  # [c0, c1, r0, r1] in grid tiles
    live: dict[tuple[int, int], list[int]] = {}  # the boxes that reach the previous row, by their columns
    for r in np.unique(rc[:, 0]):
        cols = np.sort(rc[rc[:, 0] == r, 1])
        here = {}
        for run in np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1):
            span = (int(run[0]), int(run[-1]) + 1)
            b = live.get(span)
            if b is not None and b[3] == r:
                b[3] = int(r) + 1
            else:
                b = [*span, int(r), int(r) + 1]
                boxes.append(b)
            here[span] = b
        live = here
    return [(math.floor(c0 * tile_px) - 1, math.floor(r0 * tile_px) - 1, math.ceil(c1 * tile_px) + 1,
             math.ceil(r1 * tile_px) + 1) for c0, c1, r0, r1 in boxes]


def read_scaled_parts(reader: SlideReader, level: int, box: tuple[float, float, float, float], size: tuple[int, int],
                      rects: list[tuple[int, int, int, int]], *, max_read: int = MAX_READ_PX) -> np.ndarray:
    """:func:`~cancernet_batch.slides.read_scaled` of ``box`` where only the level pixels inside ``rects`` (see
    :func:`tile_rects`) are read from the reader, the rest left white: the tiles whose footprints the boxes hold are
    the same pixels as a read of the whole box gives where the reader gives a level pixel the same whatever region
    holds it (:meth:`~cancernet_batch.slides.SlideReader.reads_level_pixels`), and the glass between tissue tiles is
    not decoded."""

    def read(x: int, y: int, w: int, h: int) -> np.ndarray:
        out = None
        for rx0, ry0, rx1, ry1 in rects:
            ax0, ay0, ax1, ay1 = max(x, rx0), max(y, ry0), min(x + w, rx1), min(y + h, ry1)
            if ax1 <= ax0 or ay1 <= ay0:
                continue
            if (ax0, ay0, ax1, ay1) == (x, y, x + w, y + h):
                return reader.read_region(level, x, y, w, h)
            if out is None:
                out = np.full((h, w, 3), BACKGROUND, np.uint8)
            out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = reader.read_region(level, ax0, ay0, ax1 - ax0, ay1 - ay0)
        return out if out is not None else np.full((h, w, 3), BACKGROUND, np.uint8)

    return resample_regions(read, box, size, max_read=max_read)


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------

def _info_summary(info) -> dict:
    return {"source": info.path, "kind": "slide", "reader": info.reader, "vendor": info.vendor,
            "source_mpp": info.mpp, "levels": [{"width": w, "height": h, "downsample": d,
                                                "mpp": None if info.mpp is None else info.mpp * d}
                                               for (w, h), d in zip(info.level_dimensions, info.level_downsamples)]}


def series_group(source: str, series_key: str | None) -> str:
    """What groups the files of one DICOM series into one input: its series key (``SlideInfo.series_key``) within
    one folder, where OpenSlide finds a DICOM slide's instances (a copy of the series in another folder is a
    slide of its own); a file with no series key is its own group."""
    return f"{series_key}|{str(source).rsplit('/', 1)[0]}" if series_key else str(source)


def inspect_inputs(paths: list[str | os.PathLike], cfg: TileConfig, storage_options: dict | None = None) -> list[dict]:
    """What ``tile`` would do for each input, without writing anything (one JSON-able dict per input).

    Slides go through the same preflight (child process, timeout) and plan as in ``tile``; an input
    that would fail carries ``error: {stage, error_class, message}``; a file of a DICOM series that
    another file stands for carries ``series_of``. ``storage_options`` reach inputs on object storage
    (as ``tile``'s ``--storage-options``).
    """
    from .errors import CancerNetError
    from .preflight import preflight

    specs, failures = discover_some(paths, storage_options)
    out: dict[str, dict] = {}

    def error(entry: dict, stage: str, exc: BaseException) -> dict:
        f = Failure.from_exception(entry["source"], stage, exc)
        entry["error"] = {"stage": stage, "error_class": f.error_class, "message": f.message}
        return entry

    for f in failures:
        out[f.input] = {"source": f.input, "kind": None,
                        "error": {"stage": f.stage, "error_class": f.error_class, "message": f.message}}
    infos = {}
    series: dict[str, list[str]] = {}
    for spec in specs:
        if spec.kind == "patches":
            try:
                out[spec.source] = plan_patches(spec.path, cfg, storage_options).summary()
            except CancerNetError as exc:
                out[spec.source] = error({"source": spec.source, "kind": "patches"}, "plan", exc)
            continue
        try:
            infos[spec.source] = info = preflight(spec.path, timeout=cfg.preflight_timeout,
                                                  storage_options=storage_options, stage_limit_gb=cfg.stage_cache_gb)
        except CancerNetError as exc:
            out[spec.source] = error({"source": spec.source, "kind": "slide"}, "preflight", exc)
            continue
        series.setdefault(series_group(spec.source, info.series_key), []).append(spec.source)
    for files in series.values():
        files = sorted(files)
        for member in files[1:]:
            out[member] = {**_info_summary(infos[member]), "series_of": files[0]}
        try:
            out[files[0]] = deadline.bounded(
                lambda files=files: _inspect_plan(files, cfg, storage_options),
                cfg.read_timeout, path=files[0], what="planning the slide")
        except CancerNetError as exc:
            out[files[0]] = error(_info_summary(infos[files[0]]), "plan", exc)
    return [out[k] for k in sorted(out)]


def _inspect_plan(files: list[str], cfg: TileConfig, storage_options: dict | None) -> dict:
    """The plan's summary of one slide (or DICOM series) for ``inspect``; an object read with ``storage_options``."""
    from .remote import is_url

    if storage_options is None or not is_url(files[0]):
        return plan_slide(files[0], cfg, series_files=files if len(files) > 1 else []).summary()
    reader = open_slide(files[0], storage_options=storage_options, stage_limit_gb=cfg.stage_cache_gb)
    try:
        return plan_slide(files[0], cfg, reader=reader, series_files=files if len(files) > 1 else []).summary()
    finally:
        reader.close()
