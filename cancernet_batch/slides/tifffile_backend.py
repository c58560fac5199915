"""tifffile backend: plain, OME and other TIFFs that OpenSlide refuses (strip TIFFs, BigTIFF, OME-TIFF).

Pixels are read region by region through tifffile's zarr view of each pyramid level
(``series.aszarr(level=i)``), so only the tiles or strips a region touches are decoded.

Resolution, in order: OME-XML ``PhysicalSizeX/Y`` (with their units), an Aperio description
(``MPP = ...``), ImageJ's ``unit=micron`` with resolution tags, then the TIFF ``XResolution`` /
``YResolution`` tags with ``ResolutionUnit`` inch, centimetre (and the millimetre / micrometre
extensions). A ``ResolutionUnit`` of none, or no tags, means the resolution is unknown.
"""

from __future__ import annotations

import logging
import os
import re
import xml.etree.ElementTree as ET

import numpy as np

from ..errors import SlideReadError, UnsupportedFormatError
from .base import SlideReader, on_white

log = logging.getLogger(__name__)

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_UNIT_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "\\u00B5m": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4,
            "m": 1e6, "Å": 1e-4, "pm": 1e-6}
_RESUNIT_UM = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}  # inch, centimetre, millimetre, micrometre
_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")
_APERIO_MAG = re.compile(r"\|\s*AppMag\s*=\s*([0-9.]+)")


CACHED_PAGES = 64
"""A TIFF of at most this many pages in its main chain keeps each page once parsed (:func:`cache_pages`)."""


def cache_pages(tif) -> None:
    """Keep ``tif``'s pages once parsed: tifffile's series, the levels' look-up and the direct path's thumbnail
    look-up each walk them, and each walk parsed every page again (0.1-0.7 CPU ms of a 20,000 px synthetic SVS's
    plan, RESULTS.md section 9). Not for a file of more than :data:`CACHED_PAGES` pages (a stack, or a damaged chain):
    its pages are parsed again rather than held."""
    try:
        tif.pages.cache = len(tif.pages) <= CACHED_PAGES
    except Exception:  # noqa: BLE001 - a chain tifffile cannot count: left as it is, to fail where it is read
        pass


def is_tiff(path: str | os.PathLike) -> bool:
    """True when the file starts with a TIFF or BigTIFF header."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in TIFF_MAGIC
    except OSError:
        return False


def _ome_mpp(xml: str) -> tuple[float | None, float | None]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    pixels = root.find(".//{*}Pixels")
    if pixels is None:
        return None, None
    out = []
    for axis in ("X", "Y"):
        try:
            v = float(pixels.get(f"PhysicalSize{axis}", ""))
        except ValueError:
            out.append(None)
            continue
        factor = _UNIT_UM.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        out.append(v * factor if factor and v > 0 else None)
    return out[0], out[1]


def _tag_mpp(page, tags_unit_um: float | None = None) -> tuple[float | None, float | None]:
    tags = page.tags
    if "XResolution" not in tags:
        return None, None
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2  # TIFF default: inch
    um = tags_unit_um if tags_unit_um is not None else _RESUNIT_UM.get(unit)
    if um is None:
        return None, None
    out = []
    for name in ("XResolution", "YResolution"):
        tag = tags.get(name) or tags["XResolution"]
        num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
        res = num / den if den else 0
        out.append(um / res if res > 0 else None)
    return out[0], out[1]


def tiff_mpp(tif, page) -> tuple[tuple[float | None, float | None], str | None]:
    """``((mpp_x, mpp_y), where)`` of a TIFF: ``where`` names the metadata it came from, or ``None``."""
    if tif.is_ome and tif.ome_metadata:
        xy = _ome_mpp(tif.ome_metadata)
        if any(xy):
            return xy, "ome"
    desc = page.description or ""
    m = _APERIO_MPP.search(desc)
    if m:
        try:
            v = float(m.group(1))
        except ValueError:
            v = 0.0
        if v > 0:
            return (v, v), "aperio-description"
    if tif.is_imagej and (tif.imagej_metadata or {}).get("unit") in ("micron", "um", "µm", "\\u00B5m"):
        xy = _tag_mpp(page, tags_unit_um=1.0)
        if any(xy):
            return xy, "imagej"
    xy = _tag_mpp(page)
    if any(xy):
        return xy, "tiff-tags"
    return (None, None), None


def tiff_objective(tif, page) -> str | None:
    """The scanner's objective power as the file states it (Aperio's ``AppMag``, Hamamatsu's ``Magnification``
    tag), the value OpenSlide gives as ``openslide.objective-power``; ``None`` when it states none."""
    m = _APERIO_MAG.search(page.description or "") if tif.is_svs else None
    if m:
        return m.group(1)
    mag = (getattr(page, "ndpi_tags", None) or {}).get("Magnification") if tif.is_ndpi else None
    return f"{mag:g}" if isinstance(mag, (int, float)) and mag > 0 else None


class TiffFileReader(SlideReader):
    """A TIFF read with tifffile; the largest image series is the slide, its levels the pyramid."""

    name = "tifffile"

    @classmethod
    def detect(cls, path: str | os.PathLike) -> bool:
        return is_tiff(path)

    def __init__(self, path: str | os.PathLike, *, file=None):
        """Open ``path``; or, when ``file`` is given, read the TIFF from that seekable binary file object
        (a :class:`cancernet_batch.remote.RangeFile` over an object on S3/GCS/Azure), ``path`` naming it."""
        super().__init__(path)
        import tifffile

        self._file = file
        try:
            self._tf = tifffile.TiffFile(file if file is not None else str(self.path))
            cache_pages(self._tf)
            if file is not None:  # tasks of one worker share a reader: seek + read of the one file, locked
                self._tf.filehandle.set_lock(True)
        except Exception as exc:  # noqa: BLE001 - TiffFileError, struct errors, truncation...
            raise UnsupportedFormatError(f"not a TIFF that tifffile can read ({exc.__class__.__name__}: {exc})",
                                         path=self.path, hint="check that the file is an image and not truncated") from exc
        try:
            self._setup(tifffile)
        except BaseException:
            self._tf.close()
            raise

    def _setup(self, tifffile) -> None:
        tif = self._tf
        try:
            candidates = [s for s in tif.series if s.levels]
        except Exception as exc:  # noqa: BLE001
            raise UnsupportedFormatError(f"tifffile cannot parse the image structure ({exc})", path=self.path,
                                         hint="the file is corrupt or not an image TIFF") from exc
        if not candidates:
            raise UnsupportedFormatError("the TIFF holds no image", path=self.path, hint="check the file")
        series = max(candidates, key=lambda s: int(np.prod(s.levels[0].shape)))
        axes = series.axes
        if axes not in ("YXS", "YX", "SYX", "CYX"):
            raise UnsupportedFormatError(f"image axes {axes} (shape {series.shape}) are not one RGB or grey plane",
                                         path=self.path, hint="export one RGB brightfield image (e.g. OME-TIFF, YXS)")
        self._axes = axes
        nchan = 1 if axes == "YX" else series.shape[axes.index("S" if "S" in axes else "C")]
        if nchan not in (1, 3, 4):
            raise UnsupportedFormatError(f"image has {nchan} channels, not RGB", path=self.path,
                                         hint="tiling needs RGB brightfield images; fluorescence is not supported")
        if series.dtype not in (np.uint8, np.uint16):
            raise UnsupportedFormatError(f"pixel type {series.dtype} is not 8- or 16-bit", path=self.path,
                                         hint="convert the image to 8-bit RGB")
        for lvl in series.levels:
            page = lvl.keyframe
            if not isinstance(page.compression, tifffile.COMPRESSION):
                raise UnsupportedFormatError(f"unsupported TIFF compression {int(page.compression)}", path=self.path,
                                             hint="re-save the image with JPEG, deflate, LZW or no compression")
            if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
                raise UnsupportedFormatError("palette (indexed colour) TIFF", path=self.path,
                                             hint="convert the image to RGB")
        self._series = series
        self._arrays: list = [None] * len(series.levels)
        dims = []
        for lvl in series.levels:
            shp = dict(zip(axes, lvl.shape))
            dims.append((int(shp["X"]), int(shp["Y"])))
        self.level_dimensions = tuple(dims)
        self.level_downsamples = self.downsamples_of(dims)
        (self.mpp_x, self.mpp_y), where = tiff_mpp(tif, series.levels[0].keyframe)
        self.vendor = ("ome-tiff" if tif.is_ome else "aperio" if tif.is_svs else "imagej" if tif.is_imagej
                       else "ndpi" if tif.is_ndpi else "tiff")
        self.objective = tiff_objective(tif, series.levels[0].keyframe)
        self.properties = {"tifffile.series": series.name or "", "tifffile.axes": axes,
                           "tifffile.compression": series.levels[0].keyframe.compression.name,
                           "tifffile.mpp-source": where or ""}

    def tile_shape(self, level: int) -> tuple[int, int] | None:
        page = self._series.levels[level].keyframe
        return (int(page.tilewidth), int(page.tilelength)) if page.is_tiled else None

    def _level(self, level: int):
        if self._arrays[level] is None:
            import zarr

            self._arrays[level] = zarr.open(self._series.aszarr(level=level), mode="r")
        return self._arrays[level]

    @property
    def remote_tiff(self):
        """``(TiffFile, RangeFile)`` when the TIFF is read over a remote file (for direct tile decoding,
        :func:`cancernet_batch.slides.direct.direct_source`); None on local disk."""
        if self._file is None or not hasattr(self._file, "pread"):
            return None
        return self._tf, self._file

    @property
    def prefetch(self):
        """Over a remote file: ``prefetch(level, boxes)`` fetches the compressed tiles of every box
        ``(x0, y0, x1, y1)`` (level pixels, floats) in few concurrent range requests; None on local disk."""
        if self._file is None or not hasattr(self._file, "prefetch"):
            return None

        def prefetch(level: int, boxes) -> None:
            import math

            lw, lh = self.level_dimensions[level]
            ranges = []
            try:
                for x0, y0, x1, y1 in boxes:
                    x, y = max(0, math.floor(x0)), max(0, math.floor(y0))
                    w, h = min(lw, math.ceil(x1)) - x, min(lh, math.ceil(y1)) - y
                    if w > 0 and h > 0:
                        for page in self._series.levels[level].pages:
                            ranges += chunk_ranges(page.keyframe, page, x, y, w, h)
            except Exception:  # noqa: BLE001 - an unusual layout: each read fetches its own tiles
                return
            if ranges:
                self._file.prefetch(sorted(set(ranges)))

        return prefetch

    def _prefetch(self, level: int, x: int, y: int, w: int, h: int) -> None:
        """Over a remote file: fetch the compressed tiles (or strips) of the region beforehand, in few range
        requests, so tifffile's per-tile reads are served from memory."""
        try:
            ranges = []
            for page in self._series.levels[level].pages:
                ranges += chunk_ranges(page.keyframe, page, x, y, w, h)
        except Exception:  # noqa: BLE001 - an unusual layout: tifffile reads each chunk itself
            return
        if ranges:
            self._file.prefetch(ranges)

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if self._file is not None and hasattr(self._file, "prefetch"):
            self._prefetch(level, x, y, w, h)
        try:
            if self._axes == "YX":
                a = self._level(level)[y:y + h, x:x + w][..., None]
            elif self._axes == "YXS":
                a = self._level(level)[y:y + h, x:x + w]
            else:
                a = np.moveaxis(self._level(level)[:, y:y + h, x:x + w], 0, -1)
        except Exception as exc:  # noqa: BLE001 - codec errors come in many classes
            raise SlideReadError(f"pixels cannot be decoded (level {level}, x {x}, y {y}): "
                                 f"{exc.__class__.__name__}: {exc}", path=self.path,
                                 hint="the file is corrupt; re-export it, or leave it out") from exc
        a = np.asarray(a)
        if a.dtype == np.uint16:
            a = (a >> 8).astype(np.uint8)
        if a.shape[-1] == 1:
            a = np.repeat(a, 3, axis=-1)
        elif a.shape[-1] == 4:
            return on_white(a)
        return np.ascontiguousarray(a)

    def close(self) -> None:
        super().close()
        self._tf.close()
        if self._file is not None:
            self._file.close()


def chunk_ranges(keyframe, page, x: int, y: int, w: int, h: int) -> list[tuple[int, int]]:
    """``(offset, bytecount)`` of the compressed tiles (or strips) of ``page`` that the region
    ``(x, y, w, h)`` touches (geometry from ``keyframe``); contiguous 2-D planes only (else ``[]``)."""
    offsets, counts = page.dataoffsets, page.databytecounts
    if keyframe.is_tiled:
        tw, th = keyframe.tilewidth, keyframe.tilelength
        nx, ny = -(-keyframe.imagewidth // tw), -(-keyframe.imagelength // th)
        if len(offsets) != nx * ny:
            return []
        idx = [r * nx + c for r in range(y // th, min(ny, -(-(y + h) // th)))
               for c in range(x // tw, min(nx, -(-(x + w) // tw)))]
    else:
        rps = keyframe.rowsperstrip or keyframe.imagelength
        ns = -(-keyframe.imagelength // rps)
        if len(offsets) != ns:
            return []
        idx = list(range(y // rps, min(ns, -(-(y + h) // rps))))
    return [(int(offsets[i]), int(counts[i])) for i in idx if counts[i] > 0]
