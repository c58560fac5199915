"""Slide readers: one small abstract class (:class:`SlideReader`), two backends and a factory.

:func:`open_slide` picks the backend: OpenSlide for every format it recognises (SVS, NDPI, MRXS,
SCN, Philips TIFF, generic tiled TIFF, DICOM...), tifffile for TIFFs OpenSlide refuses (strip
TIFFs such as ``kidney-48-5.tif``, OME-TIFF, BigTIFF). Anything else is an
:class:`~cancernet_batch.errors.UnsupportedFormatError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError, UnsupportedFormatError
from .base import MAX_READ_PX, SlideInfo, SlideReader, read_scaled
from .resolution import MPP_MAX, MPP_MIN, choose_level, resolve_mpp

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
                    ".dcm", ".btf", ".qptiff")
"""File extensions found when a folder is searched for slides (any file given by name is tried)."""

__all__ = ["SLIDE_EXTENSIONS", "MAX_READ_PX", "MPP_MAX", "MPP_MIN", "SlideInfo", "SlideReader", "choose_level",
           "detect", "open_slide", "read_scaled", "resolve_mpp"]


def detect(path: str | os.PathLike) -> str | None:
    """The backend that would read ``path``: ``"openslide"``, ``"tifffile"`` or ``None`` (unsupported)."""
    from .openslide_backend import detect_format
    from .tifffile_backend import is_tiff

    if detect_format(path) is not None:
        return "openslide"
    if is_tiff(path):
        return "tifffile"
    return None


def open_slide(path: str | os.PathLike) -> SlideReader:
    """Open a slide with the backend that reads it; :class:`UnsupportedFormatError` when none does.

    A TIFF that OpenSlide recognises but cannot open is tried with tifffile before giving up.
    """
    from .openslide_backend import OpenSlideReader, detect_format
    from .tifffile_backend import TiffFileReader, is_tiff

    p = Path(path)
    if not p.exists():
        raise InputError("no such file", path=p, hint="check the path")
    if p.is_dir():
        raise InputError("is a folder, not a slide file", path=p, hint="give the slide file, or tile the folder")
    if detect_format(p) is not None:
        try:
            return OpenSlideReader(p)
        except UnsupportedFormatError as os_exc:
            if not is_tiff(p):
                raise
            try:
                return TiffFileReader(p)
            except UnsupportedFormatError as tf_exc:
                raise UnsupportedFormatError(f"{os_exc.message}; tifffile: {tf_exc.message}", path=p,
                                             hint=tf_exc.hint) from tf_exc
    if is_tiff(p):
        return TiffFileReader(p)
    raise UnsupportedFormatError("not a slide format this tool reads", path=p,
                                 hint="supported: SVS, NDPI, MRXS, SCN, Philips/generic TIFF, OME-TIFF, DICOM WSI; "
                                      "check that the file is not truncated or mis-named")
