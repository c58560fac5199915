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


def open_slide(path: str | os.PathLike, *, storage_options: dict | None = None,
               stage_limit_gb: float | None = None, identity: tuple[int, str] | None = None,
               header: "list[int] | None" = None, info: SlideInfo | None = None) -> SlideReader:
    """Open a slide with the first registered reader that detects it and opens it.

    ``info``: the local file's metadata as a preflight child just read it (the caller has checked that the file is the
    same: size and mtime), from OpenSlide: that reader is made from it, and OpenSlide opens the file only when a read
    needs it (:class:`~.openslide_backend.OpenSlideReader`).

    A URL (``s3://bucket/slide.svs``...) is an object on object storage (:func:`open_remote`; ``identity``
    and ``header``, what is known of the object already, apply to it only).

    A reader that detects the file but cannot open it hands over to the next one that detects it
    (a TIFF OpenSlide recognises but refuses is tried with tifffile); when none can, the error
    names the file and every reader's reason. :class:`UnsupportedFormatError` when none detects it.
    """
    from ..remote import is_url

    if is_url(path):
        return open_remote(str(path), storage_options, stage_limit_gb, identity=identity, header=header)
    p = Path(path)
    if not p.exists():
        raise InputError("no such file", path=p, hint="check the path")
    if p.is_dir():
        raise InputError("is a folder, not a slide file", path=p, hint="give the slide file, or tile the folder")
    if info is not None and info.reader == "openslide":
        from .openslide_backend import OpenSlideReader

        return OpenSlideReader(p, info=info)
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


def open_remote(url: str, storage_options: dict | None = None, stage_limit_gb: float | None = None, *,
                identity: tuple[int, str] | None = None, header: "list[int] | None" = None) -> SlideReader:
    """Open a slide on object storage.

    A TIFF (Aperio SVS, generic and OME-TIFF, NDPI where tifffile reads it) is read in place by
    tifffile over range requests (:class:`cancernet_batch.remote.RangeFile`); anything else, or a
    TIFF tifffile refuses, is staged to this machine's bounded cache (:func:`cancernet_batch.remote.stage`)
    and opened locally, the copy held until the reader is closed (a DICOM object with the DICOM objects of its
    folder, where OpenSlide finds the other instances of its series: ``staged_objects``). Either way the reader's
    ``path`` is the URL, and ``source_identity`` is the object's ``(size, etag)``.

    ``identity``: the object's ``(size, etag)`` when the caller has just looked it up (no second HEAD).
    ``header``: the blocks its TIFF header lies in, as an earlier open found them (the reader's
    ``source_header``, kept with the slide's plan): fetched in one round of concurrent requests, where
    tifffile would otherwise follow the IFDs one request after another.
    """
    from .. import remote
    from ..errors import CancerNetError
    from .tifffile_backend import TIFF_MAGIC, TiffFileReader

    # one round: the object's look-up and its header's first blocks (or the blocks a header hint names)
    f, (size, etag) = remote.open_object(url, storage_options, identity=identity, blocks=header)
    if size == 0:
        f.close()
        raise UnsupportedFormatError("the object is empty", path=url, hint="upload the slide again")
    errors: list[str] = []
    try:
        if f.read(4) in TIFF_MAGIC:
            f.seek(0)
            try:
                reader = TiffFileReader(url, file=f)
            except UnsupportedFormatError as exc:
                errors.append(f"tifffile: {exc.message}")
            else:
                reader.source_identity = (size, etag)
                reader.source_header = f.blocks_read()  # before any pixels: where the header lies
                return reader
    except BaseException:
        f.close()
        raise
    f.close()
    staged = remote.stage(url, storage_options, limit_gb=stage_limit_gb, etag=etag)
    try:
        reader = open_slide(staged.path)
    except CancerNetError as exc:
        staged.release()
        msg = "; ".join(errors + [exc.message]) if errors else exc.message
        raise type(exc)(msg.replace(str(staged.path), url), path=url, hint=exc.hint) from None
    except BaseException:
        staged.release()
        raise
    reader.path = remote.as_path(url)
    reader.source_identity = (size, etag)
    reader.staged_objects = staged.together  # a DICOM object's folder, staged with it: its series' identity
    close = reader.close

    def close_and_release() -> None:
        try:
            close()
        finally:
            staged.release()

    reader.close = close_and_release
    return reader
