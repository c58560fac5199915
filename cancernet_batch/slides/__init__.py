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
           "detect", "open_slide", "read_scaled", "readers", "resolve_mpp"]


def readers() -> list[type[SlideReader]]:
    """The registered reader classes, in the order they are tried: OpenSlide first (it reads the most
    formats, with vendor metadata), then tifffile (TIFFs OpenSlide refuses: strips, OME, BigTIFF)."""
    from .openslide_backend import OpenSlideReader
    from .tifffile_backend import TiffFileReader

    return [OpenSlideReader, TiffFileReader]


def detect(path: str | os.PathLike) -> str | None:
    """The reader that would be tried first for ``path`` (``"openslide"``, ``"tifffile"``), or ``None``."""
    return next((r.name for r in readers() if r.detect(path)), None)


def open_slide(path: str | os.PathLike) -> SlideReader:
    """Open a slide with the first registered reader that detects it and opens it.

    A reader that detects the file but cannot open it hands over to the next one that detects it
    (a TIFF OpenSlide recognises but refuses is tried with tifffile); when none can, the error
    names the file and every reader's reason. :class:`UnsupportedFormatError` when none detects it.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("no such file", path=p, hint="check the path")
    if p.is_dir():
        raise InputError("is a folder, not a slide file", path=p, hint="give the slide file, or tile the folder")
    errors: list[UnsupportedFormatError] = []
    for reader in readers():
        if not reader.detect(p):
            continue
        try:
            return reader(p)
        except UnsupportedFormatError as exc:
            errors.append(exc)
    if errors:
        if len(errors) == 1:
            raise errors[0]
        raise UnsupportedFormatError("; ".join(f"{r.name}: {e.message}" if i else e.message
                                               for i, (r, e) in enumerate(zip(_detecting(p), errors))),
                                     path=p, hint=errors[-1].hint) from errors[-1]
    raise UnsupportedFormatError("not a slide format this tool reads", path=p,
                                 hint="supported: SVS, NDPI, MRXS, SCN, Philips/generic TIFF, OME-TIFF, DICOM WSI; "
                                      "check that the file is not truncated or mis-named")


def _detecting(p: Path) -> list[type[SlideReader]]:
    return [r for r in readers() if r.detect(p)]
