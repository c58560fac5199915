"""OpenSlide backend: every format ``openslide-bin`` opens (Aperio SVS, Hamamatsu NDPI/VMS, MIRAX MRXS,
Leica SCN, Philips TIFF, Sakura, Ventana BIF, generic tiled TIFF, DICOM WSI)."""

from __future__ import annotations

import os
import threading

import numpy as np

from ..errors import SlideReadError, UnsupportedFormatError
from .base import SlideInfo, SlideReader, on_white

_NOTABLE = ("openslide.vendor", "openslide.objective-power", "openslide.mpp-x", "openslide.mpp-y",
            "openslide.comment", "aperio.AppMag", "aperio.MPP", "tiff.ResolutionUnit", "dicom.SeriesInstanceUID")


def detect_format(path: str | os.PathLike) -> str | None:
    """OpenSlide's vendor name for the file (``aperio``, ``dicom``, ``generic-tiff``...), or ``None``."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - any failure means "not for OpenSlide"
        return None


def _float(props, key: str) -> float | None:
    try:
        v = float(props[key])
    except (KeyError, ValueError, TypeError):
        return None
    return v if v > 0 else None


class OpenSlideReader(SlideReader):
    """A slide opened with OpenSlide; errors become :class:`UnsupportedFormatError` / :class:`SlideReadError`."""

    name = "openslide"

    @classmethod
    def detect(cls, path: str | os.PathLike) -> bool:
        return detect_format(path) is not None

    def __init__(self, path: str | os.PathLike, info: SlideInfo | None = None):
        """``info``: this file's metadata as a preflight child just read it with OpenSlide (the same file: the caller
        checks its size and mtime). Then OpenSlide opens the file only when something needs it (a region the direct
        decoder does not read, tile shapes). Opening cost the worker 1.4-1.7 CPU ms a 20,000 px synthetic SVS and 7.1-7.8
        a CMU-1-Small-Region copy (OpenSlide hashes the smallest level's data as it opens: ``openslide.quickhash-1``;
        RESULTS.md section 9), and a TIFF whose levels ``slides/direct.py`` reads never needs it."""
        super().__init__(path)
        self._handle = None
        self._closed = False
        self._handle_lock = threading.Lock()
        if info is not None:  # a SlideInfo's levels are tuples of ints and floats already (SlideInfo.from_json)
            self.vendor, self.level_dimensions, self.level_downsamples = (info.vendor, info.level_dimensions,
                                                                          info.level_downsamples)
            self.mpp_x, self.mpp_y, self.objective = info.mpp_x, info.mpp_y, info.objective
            self.series_key = info.series_key
            self.properties = dict(info.properties)
            return
        props = self._slide.properties
        self.vendor = props.get("openslide.vendor")
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self.mpp_x, self.mpp_y = _float(props, "openslide.mpp-x"), _float(props, "openslide.mpp-y")
        self.objective = props.get("openslide.objective-power")
        uid = props.get("dicom.SeriesInstanceUID")
        self.series_key = f"dicom:{uid}" if self.vendor == "dicom" and uid else None
        self.properties = {k: str(props[k])[:200] for k in _NOTABLE if k in props}

    @property
    def opened(self) -> bool:
        """Whether OpenSlide has opened the file (a reader made from a preflight's ``info`` opens it on first need)."""
        return self._handle is not None

    @property
    def _slide(self):
        """The ``openslide.OpenSlide`` of the file, opened on first use (once, whichever thread asks first)."""
        if self._closed:
            raise ValueError(f"{self.path}: the reader is closed")
        if self._handle is None:
            with self._handle_lock:
                if self._closed:
                    raise ValueError(f"{self.path}: the reader is closed")
                if self._handle is None:
                    self._handle = self._open()
        return self._handle

    def _open(self):
        import openslide

        try:
            return openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise UnsupportedFormatError("OpenSlide does not recognise this file", path=self.path,
                                         hint="check that it is a whole-slide image and not truncated") from exc
        except openslide.OpenSlideError as exc:
            raise UnsupportedFormatError(f"OpenSlide cannot open it: {exc}", path=self.path,
                                         hint="the file is corrupt or uses a variant OpenSlide does not support") from exc

    def tile_shape(self, level: int) -> tuple[int, int] | None:
        props = self._slide.properties
        try:
            return int(props[f"openslide.level[{level}].tile-width"]), int(props[f"openslide.level[{level}].tile-height"])
        except (KeyError, ValueError):
            return None

    def reads_level_pixels(self, level: int) -> bool:
        """At a whole downsample only: OpenSlide takes a region's origin in level-0 pixels, and at a downsample such
        as a real scan's 4.0005 that origin falls between the level's pixels, which it then resamples by the
        fraction (the same level pixel differs by a few levels between two regions; ``tests/test_tiling.py``)."""
        ds = float(self.level_downsamples[level])
        return abs(ds - round(ds)) < 1e-9

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        import openslide

        ds = self.level_downsamples[level]
        try:
            img = self._slide.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h))
        except openslide.OpenSlideError as exc:
            raise SlideReadError(f"pixels cannot be decoded (level {level}, x {x}, y {y}): {exc}", path=self.path,
                                 hint="the file is corrupt; re-export or re-scan it, or leave it out") from exc
        return on_white(np.asarray(img))  # OpenSlide gives un-premultiplied RGBA; transparent = not scanned

    def close(self) -> None:
        super().close()
        with self._handle_lock:
            self._closed = True
            if self._handle is not None:
                self._handle.close()
