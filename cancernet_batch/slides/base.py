"""The abstract slide reader every backend implements, and area-averaged reads at any scale.

A reader exposes a pyramid: ``level_dimensions[i] = (width, height)`` in pixels of level ``i``,
``level_downsamples[i]`` (level-0 pixels per level-``i`` pixel) and the source resolution ``mpp``
(microns per level-0 pixel, ``None`` when the file does not state one). Pixels come out as
``(h, w, 3) uint8`` RGB; regions are given in *level* pixel coordinates, and whatever lies outside
the level is white (background), as a scanner shows bare glass.
"""

from __future__ import annotations

import abc
import functools
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import numpy as np

from .. import deadline

BACKGROUND = 255
"""Value of pixels outside the scanned area (white, like bare glass)."""

MAX_READ_PX = 1024
"""Largest side, in source pixels, of one native read: bounds memory whatever the slide's size."""


@dataclass(frozen=True)
class SlideInfo:
    """What a reader tells about a slide without reading its pixels (JSON-able: the preflight sends it)."""

    path: str
    reader: str
    vendor: str | None
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_x: float | None = None
    mpp_y: float | None = None
    objective: str | None = None
    series_key: str | None = None  # files sharing a key are one slide (a DICOM series)
    properties: dict = field(default_factory=dict)
    source_header: list[int] | None = None  # an object's TIFF: the blocks its header lies in (the preflight's open)

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def to_json(self) -> dict:
        d = asdict(self)
        d["level_dimensions"] = [list(x) for x in self.level_dimensions]
        d["level_downsamples"] = list(self.level_downsamples)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "SlideInfo":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["level_dimensions"] = tuple(tuple(int(v) for v in x) for x in known["level_dimensions"])
        known["level_downsamples"] = tuple(float(x) for x in known["level_downsamples"])
        return cls(**known)


def on_white(rgba: np.ndarray) -> np.ndarray:
    """RGB ``uint8`` of an RGBA image composited onto white (transparent = not scanned = glass)."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    if _opaque(rgba):
        return _rgb_of(rgba)
    a = alpha.astype(np.uint16)
    return ((rgb.astype(np.uint16) * a + BACKGROUND * (255 - a) + 127) // 255).astype(np.uint8)


OPENCV_RGB_PX = 64 * 64
"""RGBA images of at least this many pixels are copied to RGB by OpenCV (:func:`opencv`): a reader's region of a
model tile's window and more (a preflight's probe of 16 x 16 px does not import it)."""


def _opaque(rgba: np.ndarray) -> bool:
    """Whether every pixel of an ``(h, w, 4) uint8`` image has alpha 255. A C-contiguous one on a little-endian
    machine is read as 32-bit words, alpha in the top byte: opaque when the smallest word is ``0xFF000000`` or more
    (one pass over whole pixels instead of a strided one over the alphas)."""
    if not rgba.size:
        return True
    if _packed_rgba(rgba) and sys.byteorder == "little":
        return int(rgba.view(np.uint32).min()) >= 0xFF000000
    return int(rgba[..., 3].min()) == 255


def _packed_rgba(a: np.ndarray) -> bool:
    """Whether ``a`` is a C-contiguous ``(h, w, 4) uint8`` image: four bytes a pixel, one pixel after another."""
    return a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 4 and a.flags.c_contiguous


def _rgb_of(rgba: np.ndarray) -> np.ndarray:
    """The RGB channels of an ``(h, w, 4) uint8`` image, C-contiguous: by OpenCV from :data:`OPENCV_RGB_PX` pixels,
    else numpy's copy."""
    h, w = rgba.shape[:2]
    if h * w >= OPENCV_RGB_PX and _packed_rgba(rgba):
        cv2 = opencv()
        if cv2 is not None:
            return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    return np.ascontiguousarray(rgba[..., :3])


class SlideReader(abc.ABC):
    """One open slide. Subclasses fill the metadata in ``__init__`` and implement :meth:`_read`.

    To add a reader:

    1. Subclass ``SlideReader`` in a module of its own (``slides/<name>_backend.py``) with a ``name``,
       a classmethod :meth:`detect` that answers cheaply whether a file is for it (a header or
       the library's own format check, never a full open), an ``__init__`` that opens the file and
       fills ``level_dimensions``, ``level_downsamples``, ``mpp_x``/``mpp_y`` (None when the file
       does not state them), ``vendor`` and ``properties``, raising
       :class:`~cancernet_batch.errors.UnsupportedFormatError` when it cannot, and :meth:`_read`
       (RGB uint8, transparent areas on white; :class:`~cancernet_batch.errors.SlideReadError`
       for undecodable pixels). Where the format stores tiles, :meth:`tile_shape` too (the
       preflight then decodes one whole tile per level to check the pixels, not parts of four).
    2. Register it in ``slides/__init__.py``'s :data:`READERS`, in the order it should be tried.
    3. Add its class to ``tests/test_readers.py``: the reader contract suite runs against it.
    """

    name: ClassVar[str] = "?"

    @classmethod
    def detect(cls, path: str | os.PathLike) -> bool:
        """True when ``path`` looks like a file this reader opens (cheap: no full open)."""
        return False

    def __init__(self, path: str | os.PathLike):
        from ..remote import as_path

        self.path = as_path(path)  # a URL stays a URL (an ObjectPath) for an input on object storage
        self.vendor: str | None = None
        self.level_dimensions: tuple[tuple[int, int], ...] = ()
        self.level_downsamples: tuple[float, ...] = ()
        self.mpp_x: float | None = None
        self.mpp_y: float | None = None
        self.objective: str | None = None
        self.series_key: str | None = None
        self.properties: dict[str, str] = {}
        self._direct = None  # slides.direct.DirectSource, made on first use; False: none for this file

    # -- metadata ------------------------------------------------------------------------------

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def mpp(self) -> float | None:
        """Source µm per level-0 pixel (the mean of x and y), or ``None`` when the file states none."""
        vals = [v for v in (self.mpp_x, self.mpp_y) if v]
        return float(sum(vals) / len(vals)) if vals else None

    def info(self) -> SlideInfo:
        return SlideInfo(path=str(self.path), reader=self.name, vendor=self.vendor,
                         level_dimensions=tuple(self.level_dimensions),
                         level_downsamples=tuple(float(d) for d in self.level_downsamples), mpp=self.mpp,
                         mpp_x=self.mpp_x, mpp_y=self.mpp_y, objective=self.objective, series_key=self.series_key,
                         properties=dict(self.properties))

    @staticmethod
    def downsamples_of(dims: list[tuple[int, int]]) -> tuple[float, ...]:
        """Level downsamples as OpenSlide computes them: the mean of the width and height ratios."""
        w0, h0 = dims[0]
        return tuple((w0 / w + h0 / h) / 2.0 for w, h in dims)

    # -- pixels --------------------------------------------------------------------------------

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB ``(h, w, 3) uint8`` of the region at (x, y) in *level* pixels; white outside the level."""
        lw, lh = self.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x0 == x and y0 == y and x1 == x + w and y1 == y + h:
            return self._read(level, x, y, w, h)
        out = np.full((h, w, 3), BACKGROUND, np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self._read(level, x0, y0, x1 - x0, y1 - y0)
        return out

    @abc.abstractmethod
    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB ``(h, w, 3) uint8`` of a region that lies inside the level."""

    def reads_level_pixels(self, level: int) -> bool:
        """Whether a level pixel is the same whatever region it is read in (then a window can be read in parts: a
        reader that reads the level's own pixel grid). :class:`~.openslide_backend.OpenSlideReader` locates regions
        in level-0 pixels, which lands between a level's pixels where its downsample is not whole."""
        return True

    def tile_shape(self, level: int) -> tuple[int, int] | None:
        """The width and height of the tiles ``level`` is stored in, or None when it is not tiled or the reader
        does not say (a preflight then probes a region that may span several tiles: :func:`probe_box`)."""
        return None

    def direct_level(self, level: int):
        """The level as a :class:`~cancernet_batch.slides.direct.TiledLevel` (compressed tiles decoded
        without this reader), or ``None`` when the file's pages do not allow it."""
        direct = self._direct_source()
        return direct.level(level) if direct else None

    def scanner_thumbnail_size(self) -> tuple[int, int] | None:
        """``(width, height)`` of the scanner's own thumbnail of the whole slide, when the file has one that declares
        itself a downsample of level 0 (:meth:`~cancernet_batch.slides.direct.DirectSource.thumbnail_page`; nothing
        is decoded), or ``None``."""
        direct = self._direct_source()
        page = direct.thumbnail_page() if direct else None
        return None if page is None else (int(page.imagewidth), int(page.imagelength))

    def read_scanner_thumbnail(self) -> np.ndarray | None:
        """That thumbnail decoded, RGB ``(height, width, 3) uint8``, or ``None`` when there is none or it does not
        decode."""
        direct = self._direct_source()
        return direct.thumbnail() if direct else None

    def _direct_source(self):
        if self._direct is None:
            from .direct import direct_source

            self._direct = direct_source(self) or False
        return self._direct

    def close(self) -> None:
        """Release file handles (backends that hold more call this too)."""
        if self._direct:
            self._direct.close()
        self._direct = False

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} {self.vendor} levels={self.level_count} mpp={self.mpp}>"


@functools.lru_cache(maxsize=256)
def area_weights(a0: float, a1: float, n: int, length: int):
    """Sparse ``(n, length)`` matrix whose row ``j`` averages ``[a0, a1)`` cut in ``n`` equal parts. Kept for the
    next call with the same arguments (the windows of a grid row share their rows' weights, those of a column their
    columns'): read only, never to be changed by a caller.

    A source pixel ``i`` is the unit interval ``[i, i + 1)``; its weight in output ``j`` is the
    length of their overlap divided by the part's length, so each output is an exact area average.
    """
    import scipy.sparse as sp

    edges = np.clip(a0 + (a1 - a0) * np.arange(n + 1) / n, 0.0, float(length))
    lo = np.floor(edges[:-1]).astype(np.int64)
    width = int((np.ceil(edges[1:]).astype(np.int64) - lo).max())
    i = lo[:, None] + np.arange(max(width, 1))[None, :]
    left = np.maximum(i, edges[:-1, None])
    right = np.minimum(i + 1, edges[1:, None])
    w = np.clip(right - left, 0.0, None) / np.maximum(edges[1:] - edges[:-1], 1e-12)[:, None]
    keep = (w > 0) & (i < length)
    # CSR straight from the rows (each row's columns already ascending, none twice): the matrix scipy builds
    # from the same (row, column, weight) triplets, without its sort and duplicate pass
    indptr = np.zeros(n + 1, np.int32)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    return sp.csr_matrix((w[keep].astype(np.float32), i[keep].astype(np.int32), indptr), shape=(n, length))


_OPENCV: list = []
"""OpenCV (``cv2``) once looked for: ``[module]``, ``[None]`` where it is not installed (:func:`opencv`)."""


def opencv():
    """OpenCV's module when it is installed (``opencv-python-headless``, a dependency), else None. Two uses, each the
    same pixels as without it:

    - its ``INTER_AREA`` resize at exactly 1/2 is its integer SIMD path, ``(a + b + c + d + 2) >> 2`` a channel, the
      same pixels as Pillow's ``reduce(2)`` bit for bit (``tests/test_direct.py``) at a fraction of its CPU, and it
      takes RGB as it is (Pillow wants RGBX): 7 % less of the workers' CPU on the issue 17 set (RESULTS.md section 9,
      2026-12-07 20:33) (:func:`halved`);
    - RGB out of a reader's RGBA (:func:`on_white`), a SIMD copy instead of numpy's strided one (with the windows
      read in parts, 29 % less of the workers' CPU through the reader on synthetic slides; RESULTS.md section 9,
      2026-12-07 23:17-23:29).

    Imported on first use, in the process that needs it (a worker), with OpenCV's own threads off: each Dask thread
    does its own tiles.

    OpenCV's import prepends its wheel's library folder to ``LD_LIBRARY_PATH`` (``PATH`` on Windows) for the
    process's children; the environment is put back as it was (every variable) at once: a changed environment would make each worker
    replace its serving preflight child (:mod:`cancernet_batch.preflight` keeps a child only while the environment is
    the one it started with: 0.3 CPU s a child started cold), and children need none of OpenCV's libraries."""
    if not _OPENCV:
        saved = dict(os.environ)
        try:
            import cv2

            cv2.setNumThreads(1)
        except ImportError:
            cv2 = None
        finally:
            for k in set(os.environ) - set(saved):
                del os.environ[k]
            for k, v in saved.items():
                if os.environ.get(k) != v:
                    os.environ[k] = v
        _OPENCV.append(cv2)
    return _OPENCV[0]


def halved(a: np.ndarray) -> np.ndarray | None:
    """Each 2 x 2 block's mean of an ``(h, w, 3) uint8`` array with even sides, rounded half up (Pillow's
    ``reduce(2)``), by OpenCV (:func:`opencv`); None where OpenCV is not installed."""
    cv2 = opencv()
    if cv2 is None:
        return None
    h, w = a.shape[:2]
    return cv2.resize(a, (w // 2, h // 2), interpolation=cv2.INTER_AREA)


def area_resize(src: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """``(h, w, 3) uint8`` exact area average of ``box`` (x0, y0, x1, y1, in pixels of ``src``) at ``size`` (w, h).

    Integer factors on the pixel grid use an exact block mean, fast (Pillow's ``reduce``; at 2, OpenCV's, the same
    pixels: :func:`halved`); any other scale is a product of sparse overlap-weight matrices (:func:`area_weights`),
    one per axis.
    """
    from PIL import Image

    x0, y0, x1, y1 = box
    w, h = size
    fx, fy = (x1 - x0) / w, (y1 - y0) / h
    ints = [x0, y0, fx, fy]
    if all(abs(v - round(v)) < 1e-9 for v in ints) and round(fx) == round(fy) >= 1:
        k = int(round(fx))
        crop = src[int(round(y0)):int(round(y0)) + h * k, int(round(x0)):int(round(x0)) + w * k]
        if crop.shape[:2] == (h * k, w * k):
            if k == 1:
                return crop.copy()
            half = halved(crop) if k == 2 else None
            return half if half is not None else np.asarray(Image.fromarray(crop).reduce(k))
    wy = area_weights(y0, y1, h, src.shape[0])
    wx = area_weights(x0, x1, w, src.shape[1])
    sh, sw = src.shape[:2]
    if h * sw * 3 <= TRANSPOSE_DIRECT:
        # the three channels in one product per axis: scipy's sparse-dense product sums each output element over
        # the row's weights in column order, whatever the number of columns, so each value is the one a channel's
        # own product gives, bit for bit, at less CPU where the products are small (model tiles' windows: 8 % less
        # of the workers' CPU on the CMU-1 copies, RESULTS.md section 9, 2026-12-07 23:06); larger ones copy more in
        # their transposes than they save
        rows = wy @ src.reshape(sh, sw * 3).astype(np.float32)  # (h, W x 3)
        cols = wx @ _pixels_transposed(rows, h, sw).reshape(sw, h * 3)  # (w, h x 3)
        return np.clip(np.rint(_pixels_transposed(cols, w, h)), 0, 255).astype(np.uint8)
    out = np.empty((h, w, 3), np.uint8)
    for c in range(3):  # one channel at a time: transient memory is one float32 plane
        rows = wy @ src[..., c].astype(np.float32)  # (h, W)
        out[..., c] = np.clip(np.rint(transposed(wx @ transposed(rows))), 0, 255)
    return out


_PIXEL = np.dtype((np.void, 12))
"""Three float32 values as one item: a pixel that :func:`transposed` moves whole."""


def _pixels_transposed(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """``(w, h, 3)`` float32: the ``(h, w)`` pixels of ``a`` (``(h, w x 3)`` float32, C-contiguous) transposed, each
    pixel's three values kept together (:func:`transposed`'s block copy)."""
    return transposed(a.view(_PIXEL).reshape(h, w)).view(np.float32).reshape(w, h, 3)


TRANSPOSE_BLOCK = 64
"""Side of the blocks :func:`transposed` copies one at a time."""
TRANSPOSE_DIRECT = 512 * 512
"""Arrays of at most this many elements :func:`transposed` copies with numpy's own transpose (the plan's 625 x 400 px
overview: 0.6 ms less than by blocks)."""


def transposed(a: np.ndarray) -> np.ndarray:
    """``a.T`` of a 2-D array, as a C-contiguous copy made block by block (:data:`TRANSPOSE_BLOCK`): numpy's own
    copy of a large transpose walks one array with a stride of a whole row and misses the caches and the TLB at
    every element (7.6 ms for a 1022 x 1024 float32 plane here, against 1.1 ms by blocks). The values are the
    same: only where they are copied changes."""
    h, w = a.shape
    b = TRANSPOSE_BLOCK
    if h * w <= TRANSPOSE_DIRECT or h <= 2 * b or w <= 2 * b:  # fits the caches: numpy's copy is as fast
        return np.ascontiguousarray(a.T)
    out = np.empty((w, h), a.dtype)
    for i in range(0, h, b):
        for j in range(0, w, b):
            out[j:j + b, i:i + b] = a[i:i + b, j:j + b].T
    return out


def read_scaled(reader: SlideReader, level: int, box: tuple[float, float, float, float],
                size: tuple[int, int], *, max_read: int = MAX_READ_PX) -> np.ndarray:
    """Area-averaged resample of ``box`` (x0, y0, x1, y1 in *level* pixels, floats) to ``size`` (w, h).

    Each output pixel is the exact area average of its footprint in the source (:func:`area_resize`),
    so non-integer scales are handled without drift. The output is made in blocks whose source read
    is at most ``max_read`` pixels a side, so memory stays bounded however large the box is.
    """
    return resample_regions(lambda x, y, w, h: reader.read_region(level, x, y, w, h), box, size, max_read=max_read)


def resample_regions(read, box: tuple[float, float, float, float], size: tuple[int, int], *,
                     max_read: int = MAX_READ_PX) -> np.ndarray:
    """:func:`read_scaled` over any source: ``read(x, y, w, h)`` gives RGB of that integer region."""
    out_w, out_h = size
    x0, y0, x1, y1 = box
    fx, fy = (x1 - x0) / out_w, (y1 - y0) / out_h
    bw = max(1, min(out_w, int(max_read // max(fx, 1e-9)) - 1))
    bh = max(1, min(out_h, int(max_read // max(fy, 1e-9)) - 1))
    out = np.empty((out_h, out_w, 3), np.uint8)
    for oy in range(0, out_h, bh):
        oh = min(bh, out_h - oy)
        sy0, sy1 = y0 + oy * fy, y0 + (oy + oh) * fy
        iy0, iy1 = math.floor(sy0 + 1e-9), math.ceil(sy1 - 1e-9)
        for ox in range(0, out_w, bw):
            ow = min(bw, out_w - ox)
            sx0, sx1 = x0 + ox * fx, x0 + (ox + ow) * fx
            ix0, ix1 = math.floor(sx0 + 1e-9), math.ceil(sx1 - 1e-9)
            deadline.check()
            src = read(ix0, iy0, ix1 - ix0, iy1 - iy0)
            out[oy:oy + oh, ox:ox + ow] = area_resize(src, (sx0 - ix0, sy0 - iy0, sx1 - ix0, sy1 - iy0), (ow, oh))
    return out


def probe_box(reader: SlideReader, level: int, size: int) -> tuple[int, int, int, int]:
    """``(x, y, w, h)``, at most ``size`` x ``size`` level pixels, that checks that ``level``'s pixels decode: inside
    the stored tile at the level's centre when the reader knows its tiles (one tile decoded), else centred on
    the level. A centred box spans up to four tiles, partial ones too at a small level: 5.6 against 1.2 CPU ms on
    the 312 px top level of a 20,000 px synthetic slide (RESULTS.md section 9)."""
    w, h = reader.level_dimensions[level]
    tile = reader.tile_shape(level)
    if tile and tile[0] > 0 and tile[1] > 0:
        tw, th = tile
        x, y = (w // 2) // tw * tw, (h // 2) // th * th
        return x, y, max(1, min(size, tw, w - x)), max(1, min(size, th, h - y))
    pw, ph = min(w, size), min(h, size)
    return (w - pw) // 2, (h - ph) // 2, pw, ph

