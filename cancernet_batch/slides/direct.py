"""Tiles decoded straight from a tiled TIFF's compressed tiles, with JPEG tiles scaled in the DCT domain.

Most slide files (Aperio SVS, generic and OME tiled TIFF, NDPI pyramids written as tiled TIFF) store
each pyramid level as a grid of compressed tiles. A reader such as OpenSlide decodes a whole tile
at full size, converts it to premultiplied ARGB, caches it and copies the region out; tiling then
area-averages it down to the model's resolution. This module skips all of that for TIFF pages
whose layout it can read:

- **byte ranges** of the tiles a region needs are read with ``os.pread`` (one per tile, from
  the page's ``TileOffsets`` / ``TileByteCounts``); nothing else of the file is touched. For a
  slide on object storage the same ranges come from the reader's
  :class:`~cancernet_batch.remote.RangeFile`: every tile a read needs is fetched first in one batch
  of coalesced range requests (:meth:`TiledLevel.prefetch`), then decoded from memory;
- **JPEG tiles** (compression 7, 8-bit, 3 samples) are decoded by libjpeg-turbo (simplejpeg's TurboJPEG
  binding, straight into an array), with the file's shared ``JPEGTables`` spliced in. When the model grid is at least 16x
  coarser than the level, the decoder's *scaled* IDCT produces the tile at 1/2, 1/4 or 1/8 of its size
  directly (at most an eighth of the factor, :func:`dct_scale`): each output pixel is a low-pass of the
  ``s x s`` block it covers, close to that block's mean once many of them are averaged (4 x 4 of them: 0.57/255
  mean absolute difference from exact area averages on CMU-1, and model probabilities correlated 0.9986 with
  exact ones, under issue 17's 0.999; at a factor of 2, where the block is the whole output pixel, 5/255 on real
  scans: hence an eighth). The rest of the scale is exact area averaging
  (:func:`~cancernet_batch.slides.base.area_resize`);
- **other codecs** (JPEG 2000, deflate, LZW, none, ...) are decoded by tifffile's own page codec,
  at full size, then area-averaged exactly.

Decoded tiles are kept in a small per-level LRU, so tiles that straddle two read windows are
decoded once. Pixels outside the level are white (bare glass), as the readers give them.

``mode``: ``"fast"`` uses DCT scaling where it applies; ``"exact"`` decodes at full size (tiles are
then bit-identical to the reader path's exact area averages, for 8-bit RGB JPEG tiles decoded by the
same libjpeg-turbo). The reader path (``"reader"``) does not use this module at all.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict

import numpy as np
import simplejpeg

from ..errors import SlideReadError
from .base import BACKGROUND, MAX_READ_PX, area_resize, opencv, resample_regions

log = logging.getLogger(__name__)

JPEG = 7
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
_DCT_SCALES = (8, 4, 2)
_THUMBNAIL = re.compile(r"^\s*(\d+)x(\d+) -> (\d+)x(\d+)(?: |$)", re.M)
"""An Aperio thumbnail page's description line: level 0's ``W x H`` scaled down to the page's ``w x h``."""
CACHE_TILES = 256
"""Decoded tiles kept per level (at most 256 x 256 x 3 bytes each: at most 48 MiB, usually far less)."""


DCT_RULE = 3
"""The version of :func:`dct_scale`'s rule for tiles, kept in each input tiled with ``--decode fast`` (``extra.dct_rule``):
1 (none kept), before 2026-12-06: YCbCr JPEG at most half the factor, from 2; 2 (2026-12-06): a quarter; 3
(2026-12-07): an eighth. An input whose tiles were scaled in the DCT under another rule is tiled again
(``stages.tile.is_fresh``)."""


def dct_scale(factor: float, *, view: bool = False, rgb: bool = False) -> int:
    """The JPEG scaled-IDCT divisor (8, 4, 2 or 1) used when one output pixel spans ``factor`` level pixels.

    Tiles: at most an eighth of the factor, so that the rest, at least 8 x 8 decoded pixels an output pixel, is
    exact area averaging; for YCbCr JPEG and for JPEG whose components are RGB (``rgb``: TIFF photometric RGB, as
    Aperio writes CMU-1; there 1/2 from 2 gave 3.7/255, 1/4 from 4 7.0) alike: below a factor of 16, ``fast`` tiles
    are the ``exact`` ones. ``view``: the plan's low-resolution view (tissue detection, the stored thumbnail), which
    the model never sees: YCbCr JPEG at most half the factor and 1/2 from a factor of 2, RGB a quarter (the rule
    tiles had before 2026-12-06; the tissue kept on real slides was measured with it, and it keeps the plan's cost).

    A scaled IDCT is a low-pass of each 8 x 8 block, not its area average: it keeps the block's lowest
    frequencies at full strength and drops the rest, where an average weakens them and folds the rest in. On
    a real scan's detail that shows (``benchmarks/decode_fidelity.py``, real scans written again as 4:2:0 Q90
    slides; RESULTS.md section 9, 2026-12-06): at 1/2 from a factor of 2, the 2 µm/px level of a 20x scan read
    at 4 µm/px, tissue tiles were 4.9-5.0/255 from the exact ones and 6.5-7.8 from the scan's own pixels
    (exact: 3.4-4.8), and the model's probabilities correlated 0.946-0.966 with those on the source tiles
    (exact: 0.972-0.997); at 1/2 from 4, 2.0/255 from exact. Synthetic slides and the rebuilt patients, whose
    levels hold little detail at that scale, had hidden it (1.1-1.6/255). At a factor of 8, 1/2 (the quarter rule of
    2026-12-06) left CMU-1 copies' tissue tiles 0.57/255 from exact, and a model trained on the IDC patches gave
    probabilities on them correlated 0.9986 with those on exact tiles (issue 17 asks 0.999): hence an eighth.
    """
    limit = factor / 8 if not view else factor / 4 if rgb else max(factor / 2, min(factor, 2.0))
    return next((s for s in _DCT_SCALES if limit >= s - 1e-9), 1)


def block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Each ``k`` x ``k`` block's mean of a decoded tile whose sides are whole blocks, rounded: :func:`~.base.area_resize`'s
    integer path (the same pixels as averaging the assembled window). An RGB tile goes there (at 2, OpenCV's halving:
    :func:`~.base.halved`); an RGBX one to Pillow's ``reduce``.

    An RGBX tile (:meth:`TiledLevel._decode`'s ``rgbx``: Pillow's own layout of RGB) is wrapped without a copy, and the
    mean comes back packed as RGB by Pillow's own packer, C-contiguous (read-only): no RGB -> RGBX copy into Pillow, and
    no strided copy of an RGB view of RGBX later (numpy copies such a view byte by byte: 0.46 ms a 256 px tile, more
    than the mean; the attempt of 6e57f12 lost there what it saved here). RESULTS.md section 9 has the figures."""
    h, w = a.shape[:2]
    if a.shape[2] != 4:
        return area_resize(a, (0.0, 0.0, float(w), float(h)), (w // k, h // k))
    from PIL import Image

    m = Image.frombuffer("RGBX", (w, h), a, "raw", "RGBX", 0, 1).reduce(k)
    return np.frombuffer(m.tobytes("raw", "RGB"), np.uint8).reshape(h // k, w // k, 3)


def _readers(fd):
    """``(pread(n, offset), prefetch(ranges) or None)`` of a local file descriptor or of a remote file object
    (:class:`~cancernet_batch.remote.RangeFile`: ``prefetch`` fetches ranges in one batch before they are read)."""
    if isinstance(fd, int):
        return (lambda n, off: os.pread(fd, n, off)), None
    return fd.pread, getattr(fd, "prefetch", None)


def _jpeg_head(page) -> bytes:
    """What goes before a JPEG tile's or strip's own bytes (less its SOI) to make one stream libjpeg-turbo decodes:
    SOI, then for TIFF photometric RGB an Adobe APP14 marker, then the page's shared ``JPEGTables`` less their SOI and
    EOI. TIFF photometric RGB: the JPEG data are RGB, not YCbCr (Aperio writes them so). libjpeg takes a stream
    without markers for YCbCr; an Adobe APP14 marker with transform 0 says RGB (a marker of the stream's own, read
    later, still wins)."""
    tables = page.jpegtables
    tables = bytes(tables[:-2]) if tables is not None and len(tables) > 4 else b""
    return b"\xff\xd8" + (_ADOBE_RGB if int(page.photometric) == 2 else b"") + tables[2:]


def decode_jpeg_strips(page, fd) -> np.ndarray:
    """A stripped JPEG page (8-bit, 3 samples, contiguous: a scanner's thumbnail) decoded strip by strip with
    libjpeg-turbo, as :class:`TiledLevel` decodes tiles: ``(h, w, 3) uint8``, the pixels tifffile's ``asarray``
    gives (its codec is libjpeg-turbo too), at less CPU: CMU-1's 574 x 768 thumbnail is 48 strips, and the plan's
    overview of a CMU-1 copy went from 12.5-13.1 to 11.5-11.7 CPU ms (RESULTS.md section 9). All strips are read in one
    batch first (one range request on object storage, none for those in the header's blocks already held).
    ``fd``: as :class:`TiledLevel`'s. Raises on anything it does not read (the caller falls back to tifffile)."""
    if page.is_tiled or int(page.compression) != JPEG or int(page.bitspersample) != 8 or \
            int(page.samplesperpixel) != 3 or int(page.planarconfig) != 1:
        raise ValueError("not a contiguous 8-bit RGB JPEG stripped page")
    w, h, rows = int(page.imagewidth), int(page.imagelength), int(page.rowsperstrip)
    offsets, counts = page.dataoffsets, page.databytecounts
    if rows <= 0 or len(offsets) != -(-h // rows):
        raise ValueError("strips do not cover the page")
    pread, fetch = _readers(fd)
    if fetch is not None:
        fetch([(int(o), int(n)) for o, n in zip(offsets, counts) if n])
    head, out = _jpeg_head(page), np.empty((h, w, 3), np.uint8)
    for i, (off, n) in enumerate(zip(offsets, counts)):
        data = pread(int(n), int(off))
        if len(data) != n or n < 4:
            raise ValueError(f"strip {i} is cut short")
        a = simplejpeg.decode_jpeg(head + data[2:], "RGB")
        y0, y1 = i * rows, min(h, (i + 1) * rows)
        if a.shape[1] != w or a.shape[0] < y1 - y0:
            raise ValueError(f"strip {i} is {a.shape[1]} x {a.shape[0]} px, not {w} x {y1 - y0}")
        out[y0:y1] = a[:y1 - y0]
    return out


class TiledLevel:
    """One tiled TIFF page (a pyramid level) read tile by tile from its byte ranges.

    ``fd``: a file descriptor of the local file (read with ``os.pread``), or a file object with
    ``pread(n, offset)`` and ``prefetch(ranges)`` (a :class:`~cancernet_batch.remote.RangeFile`).
    """

    def __init__(self, path: str, page, fd):
        self.path = path
        self.fd = fd
        self._pread, self._fetch = _readers(fd)
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.tw, self.th = int(page.tilewidth), int(page.tilelength)
        self.ntx = (self.width + self.tw - 1) // self.tw
        self.nty = (self.height + self.th - 1) // self.th
        self.offsets = np.asarray(page.dataoffsets, np.int64)
        self.counts = np.asarray(page.databytecounts, np.int64)
        self.jpeg = int(page.compression) == JPEG
        self.codec = getattr(page.compression, "name", str(page.compression)).lower()
        self.rgb = self.jpeg and int(page.photometric) == 2
        self._head = _jpeg_head(page) if self.jpeg else b""
        self._page = page
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def usable(page) -> bool:
        """True when this module can read ``page``: tiled, 8-bit, 3 contiguous samples, one plane."""
        try:
            return (page.is_tiled and int(page.bitspersample) == 8 and int(page.samplesperpixel) == 3
                    and int(page.planarconfig) == 1 and int(page.imagedepth) == 1
                    and len(page.dataoffsets) == ((page.imagewidth + page.tilewidth - 1) // page.tilewidth)
                    * ((page.imagelength + page.tilelength - 1) // page.tilelength))
        except Exception:  # noqa: BLE001 - any unreadable tag: not for this module
            return False

    def _raw(self, idx: int) -> bytes:
        n = int(self.counts[idx])
        if n == 0:
            return b""
        data = self._pread(n, int(self.offsets[idx]))
        if len(data) != n:
            raise SlideReadError(f"tile {idx} is cut short ({len(data)} of {n} bytes): the file is truncated",
                                 path=self.path, hint="copy the slide again, or leave it out")
        return data

    def jpeg_stream(self, idx: int) -> bytes:
        """JPEG tile ``idx`` as one whole stream a JPEG decoder takes (:meth:`_spliced`, as :meth:`_decode` decodes
        it); empty for a tile the scanner never wrote. JPEG pages only."""
        data = self._raw(idx)
        return self._spliced(data) if data else b""

    def _spliced(self, data: bytes) -> bytes:
        """A JPEG tile's own bytes (from its SOI) after the page's head (:func:`_jpeg_head`): one whole stream."""
        return self._head + data[2:]

    def _decode(self, idx: int, s: int, rgbx: bool = False) -> np.ndarray:
        """Tile ``idx`` as RGB at 1/``s`` of its size (``s`` > 1 only for JPEG tiles). ``rgbx``: a JPEG tile as
        ``(h, w, 4)`` RGBX, a fourth byte a pixel, the layout Pillow holds RGB in (:func:`block_mean` wraps it
        without a copy); other tiles are RGB whatever it says."""
        data = self._raw(idx)
        h, w = -(-self.th // s), -(-self.tw // s)
        if not data:  # a tile the scanner never wrote (sparse file): glass
            return np.full((h, w, 3), BACKGROUND, np.uint8)
        try:
            if self.jpeg:
                # libjpeg-turbo's TurboJPEG API straight into one array (simplejpeg): the same ISLOW IDCT and
                # fancy upsampling as Pillow's draft, bit for bit, at about half the CPU (no Pillow image per
                # tile). The scale is the largest of 1/8..1 that keeps w x h; strict: a libjpeg warning
                # ("Corrupt JPEG data") is an error, as in OpenSlide, not a tile decoded from damaged data
                a = simplejpeg.decode_jpeg(self._spliced(data), "RGBX" if rgbx else "RGB",
                                           min_width=w, min_height=h, min_factor=s)
            else:
                a, _, _ = self._page.decode(bytes(data), idx)
                a = np.asarray(a).reshape(a.shape[-3:])
        except SlideReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - codec errors come in many classes
            ty, tx = divmod(idx, self.ntx)
            why = ("not a JPEG stream" if str(exc).startswith("tjDecompressHeader")
                   else f"{exc}" if self.jpeg and isinstance(exc, ValueError)  # libjpeg's own words
                   else f"{exc.__class__.__name__}: {exc}")
            raise SlideReadError(f"tile ({tx}, {ty}) of the {self.width} x {self.height} px level cannot be "
                                 f"decoded ({why})", path=self.path,
                                 hint="the file is corrupt; re-export it, or leave it out") from exc
        if a.shape[:2] != (h, w):  # a JPEG whose own size is not the tile's, or an odd-sized tile
            from PIL import Image

            a = np.asarray(Image.fromarray(np.ascontiguousarray(a[..., :3])).resize((w, h), Image.BOX))
        return a if rgbx and self.jpeg and a.shape[2] == 4 else a[..., :3]

    def needed(self, coords: np.ndarray, tile_px: float) -> np.ndarray:
        """Indices of the compressed tiles that model tiles at ``coords`` (row, col; ``tile_px`` level px a
        side) touch: what any reader must decode to make them."""
        c = np.asarray(coords, np.int64).reshape(-1, 2)
        x0, y0, x1, y1 = c[:, 1] * tile_px, c[:, 0] * tile_px, (c[:, 1] + 1) * tile_px, (c[:, 0] + 1) * tile_px
        return self._tiles_in(zip(x0, y0, x1, y1))

    def _tiles_in(self, boxes, *, in_box_order: bool = False) -> np.ndarray:
        """Sorted indices of the compressed tiles that boxes ``(x0, y0, x1, y1)`` (level pixels, floats) touch; with
        ``in_box_order``, each once in the order of the first box that touches it (then by index)."""
        b = np.asarray(boxes if isinstance(boxes, np.ndarray) else list(boxes), np.float64).reshape(-1, 4)
        tx0 = np.maximum(0, np.floor(b[:, 0]).astype(np.int64) // self.tw)
        ty0 = np.maximum(0, np.floor(b[:, 1]).astype(np.int64) // self.th)
        tx1 = np.minimum(self.ntx - 1, (np.minimum(np.ceil(b[:, 2]).astype(np.int64), self.width) - 1) // self.tw)
        ty1 = np.minimum(self.nty - 1, (np.minimum(np.ceil(b[:, 3]).astype(np.int64), self.height) - 1) // self.th)
        keep = (tx1 >= tx0) & (ty1 >= ty0)
        tx0, ty0, tx1, ty1, box = tx0[keep], ty0[keep], tx1[keep], ty1[keep], np.flatnonzero(keep)
        if not len(tx0):
            return np.empty(0, np.int64)
        found, of = [], []  # one pass per offset within the widest box (a model tile touches 1-4 compressed tiles)
        for dy in range(int((ty1 - ty0).max()) + 1):
            for dx in range(int((tx1 - tx0).max()) + 1):
                ok = (ty0 + dy <= ty1) & (tx0 + dx <= tx1)
                found.append((ty0[ok] + dy) * self.ntx + tx0[ok] + dx)
                of.append(box[ok])
        idx = np.concatenate(found)
        if not in_box_order:
            return np.unique(idx)
        idx = idx[np.lexsort((idx, np.concatenate(of)))]
        _, first = np.unique(idx, return_index=True)
        return idx[np.sort(first)]

    def prefetch(self, boxes, only=None) -> None:
        """Fetch the compressed tiles of every box ``(x0, y0, x1, y1)`` (level pixels, floats) in one batch
        of coalesced range requests, when the file is remote (on local disk: nothing to do); with ``only``
        (a set of tile indices), just those of them. The boxes are given in the order they will be read: the
        requests are sent in that order (:meth:`cancernet_batch.remote.RangeFile.prefetch`)."""
        if self._fetch is None:
            return
        ranges = [(int(self.offsets[i]), int(self.counts[i])) for i in self._tiles_in(boxes, in_box_order=True)
                  if self.counts[i] > 0 and (only is None or int(i) in only)]
        if ranges:
            self._fetch(ranges)

    def decode_each(self, idx) -> int:
        """Decode compressed tiles ``idx`` once each at full size, keeping nothing (the decode roof)."""
        for i in idx:
            self._decode(int(i), 1)
        return len(idx)

    def reduced(self, idx: int, s: int, k: int = 1) -> np.ndarray:
        """Compressed tile ``idx`` decoded at 1/``s`` (in the DCT), then averaged in blocks of ``k`` x ``k`` pixels
        (area_resize's integer path, as on the assembled window: :func:`block_mean`); not cached (:meth:`tile` is).
        Decoded as RGBX for Pillow's mean, as RGB for OpenCV's at 2 (:func:`~.base.opencv`)."""
        a = self._decode(idx, s, rgbx=k > 2 or (k == 2 and opencv() is None))
        return block_mean(a, k) if k > 1 else a

    def scales(self, tile_px: float, out_px: int, fast: bool) -> tuple[int, int]:
        """``(s, k)``: how tiling reads model tiles of ``tile_px`` level px a side at ``out_px`` px (the windows of
        :func:`cancernet_batch.tiling.read_tiles` start on the model grid): 1/``s`` in the DCT (:meth:`dct_scale`),
        then each stored tile averaged in ``k`` x ``k`` blocks (:meth:`_box_factor`; 1 where the model grid is not
        on the block grid: then the windows are area-averaged whole)."""
        s = self.dct_scale(tile_px / out_px, fast)
        return s, self._box_factor((tile_px, tile_px, 2 * tile_px, 2 * tile_px), (out_px, out_px), s)

    def tile(self, tx: int, ty: int, s: int, k: int = 1) -> np.ndarray:
        """Tile ``(tx, ty)`` decoded at 1/``s`` (in the DCT), then averaged in blocks of ``k`` x ``k`` pixels
        (:meth:`reduced`), kept in this level's cache of recent tiles."""
        key = (ty * self.ntx + tx, s, k)
        with self._lock:
            a = self._cache.get(key)
            if a is not None:
                self._cache.move_to_end(key)
                return a
        a = self.reduced(key[0], s, k)
        with self._lock:
            self._cache[key] = a
            while len(self._cache) > CACHE_TILES:
                self._cache.popitem(last=False)
        return a

    def region(self, x: int, y: int, w: int, h: int, s: int, only=None, k: int = 1) -> np.ndarray:
        """RGB of ``[x, x + w) x [y, y + h)`` in pixels of this level *divided by* ``s`` (white outside); with ``k``,
        divided by ``s * k``, each tile averaged in ``k`` x ``k`` blocks after its decode (:meth:`tile`; only where
        :meth:`_box_factor` allows it).

        ``only``: a set of compressed tile indices; the others are left white, not read or decoded (the
        tiles a caller's output pixels do not touch: see :func:`cancernet_batch.tiling.read_tiles`)."""
        out = np.full((h, w, 3), BACKGROUND, np.uint8)
        r = s * k
        tws, ths = self.tw // r, self.th // r
        lw, lh = -(-self.width // r), -(-self.height // r)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        # remote: this window's tiles in one batch (none left to fetch after read_tiles' prefetch)
        self.prefetch([(x0 * r, y0 * r, x1 * r, y1 * r)], only)
        for ty in range(y0 // ths, (y1 - 1) // ths + 1):
            for tx in range(x0 // tws, (x1 - 1) // tws + 1):
                if only is not None and ty * self.ntx + tx not in only:
                    continue
                t = self.tile(tx, ty, s, k)
                ax0, ay0 = max(x0, tx * tws), max(y0, ty * ths)
                ax1, ay1 = min(x1, (tx + 1) * tws), min(y1, (ty + 1) * ths)
                out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = t[ay0 - ty * ths:ay1 - ty * ths, ax0 - tx * tws:ax1 - tx * tws]
        return out

    def dct_scale(self, factor: float, fast: bool, view: bool = False) -> int:
        """The scaled-IDCT divisor :meth:`read_scaled` uses at ``factor`` level px per output px (``view``: for
        the plan's view, :func:`dct_scale`)."""
        usable = fast and self.jpeg and self.tw % 8 == 0 and self.th % 8 == 0
        return dct_scale(factor, view=view, rgb=self.rgb) if usable else 1

    def describe(self, factor: float, fast: bool) -> str:
        """How tiles at ``factor`` level px per output px are decoded, for ``inspect`` and the attrs."""
        s = self.dct_scale(factor, fast)
        return f"direct {self.codec}" + (f", 1/{s} in the DCT" if s > 1 else "")

    def read_scaled(self, box: tuple[float, float, float, float], size: tuple[int, int], *, fast: bool,
                    max_read: int = MAX_READ_PX, only=None, view: bool = False) -> np.ndarray:
        """Like :func:`cancernet_batch.slides.base.read_scaled` on this level, decoding tiles directly
        (``only``: as in :meth:`region`). ``max_read`` bounds the decoded pixels a block reads, as at full size: at
        1/``s`` in the DCT a block spans ``s`` times more of the level. (It bounded the level's pixels before, which
        cut a plan's overview into four blocks where one holds 1.2 MB: 0.5 CPU ms more a slide, RESULTS.md section 9.)"""
        x0, y0, x1, y1 = box
        s = self.dct_scale(min((x1 - x0) / size[0], (y1 - y0) / size[1]), fast, view)
        k = self._box_factor(box, size, s)
        r = s * k
        return resample_regions(lambda x, y, w, h: self.region(x, y, w, h, s, only, k), (x0 / r, y0 / r, x1 / r, y1 / r),
                                size, max_read=max_read)

    def _box_factor(self, box: tuple[float, float, float, float], size: tuple[int, int], s: int) -> int:
        """``k`` > 1 when what is left of the factor after 1/``s`` in the DCT is the integer ``k`` on both axes and
        every ``k`` x ``k`` block of the read lies within one stored tile and within the level (the box starts on
        the block grid; tiles and level are whole blocks): then each decoded tile is averaged by blocks as it is
        decoded (:meth:`tile`), the same pixels as averaging the assembled window (:func:`~.base.area_resize`'s
        integer path, Pillow's ``reduce`` too), without assembling and averaging a window ``k`` x ``k`` times
        larger. Levels exactly 2x or 4x apart (synthetic slides, exact pyramids) read at 4 µm/px take it; 1 else."""
        x0, y0, x1, y1 = box
        fx, fy = (x1 - x0) / size[0] / s, (y1 - y0) / size[1] / s
        k = int(round(fx))
        if k < 2 or abs(fx - k) > 1e-9 or abs(fy - k) > 1e-9:
            return 1
        r = s * k
        whole = all(abs(v / r - round(v / r)) < 1e-9 for v in (x0, y0))
        if not whole or self.tw % r or self.th % r or self.width % r or self.height % r:
            return 1
        return k


class DirectSource:
    """The tiled TIFF pages behind a reader's pyramid levels, for reading tiles without the reader.

    Made with :func:`direct_source`; ``level(i)`` is a :class:`TiledLevel` or ``None`` when level ``i``
    is not a tiled page this module reads (the caller then uses the reader).

    ``file``: the reader's own remote file (a :class:`~cancernet_batch.remote.RangeFile`) and ``tif`` its
    parsed TIFF, both owned by the reader; without it the local file at ``path`` is opened here.
    """

    def __init__(self, path: str, tif, level_dimensions, file=None):
        self.path = path
        self._tif = tif
        self._own = file is None
        self._fd = os.open(path, os.O_RDONLY) if file is None else file
        self._levels: dict[int, TiledLevel | None] = {}
        self._dims = [tuple(d) for d in level_dimensions]
        self._thumb, self._thumb_looked = None, False  # thumbnail_page, found on first use
        self._lock = threading.Lock()

    def level(self, i: int) -> TiledLevel | None:
        with self._lock, self._tif.filehandle.lock:  # tasks of one worker share a reader; IFDs and tags are read
            if i not in self._levels:
                self._levels[i] = self._find(i)
            return self._levels[i]

    def _find(self, i: int) -> TiledLevel | None:
        if not 0 <= i < len(self._dims):
            return None
        want = self._dims[i]
        try:  # the main IFD chain (SVS, generic TIFF), then series levels (OME-TIFF sub-IFDs)
            found = {p.offset: p for p in self._tif.pages}
            for series in self._tif.series:
                for lvl in series.levels:
                    found.setdefault(lvl.keyframe.offset, lvl.keyframe)
            pages = [p for p in found.values() if (int(p.imagewidth), int(p.imagelength)) == want and p.is_tiled]
        except Exception:  # noqa: BLE001 - an IFD chain tifffile cannot walk: use the reader
            return None
        # one tiled page of the level's size (a stripped thumbnail or label of the same size does not count)
        if len(pages) != 1 or not TiledLevel.usable(pages[0]):
            return None
        return TiledLevel(self.path, pages[0], self._fd)

    def thumbnail_page(self):
        """The scanner's thumbnail of the whole level 0, or ``None``: a stripped 8-bit RGB page whose
        description declares it a downsample of level 0 (``W x H -> w x h``, as Aperio writes it; a label or
        macro image shows other things and declares no such thing). Nothing is decoded."""
        with self._lock:
            if not self._thumb_looked:
                self._thumb, self._thumb_looked = self._find_thumbnail(), True
            return self._thumb

    def _find_thumbnail(self):
        if not self._dims:
            return None
        try:
            with self._tif.filehandle.lock:
                pages = list(self._tif.pages)
            for page in pages:
                if page.is_tiled:
                    continue
                m = _THUMBNAIL.search(page.description or "")
                if m is None:
                    continue
                w0, h0, w, h = (int(v) for v in m.groups())
                if ((w0, h0) == self._dims[0] and (int(page.imagewidth), int(page.imagelength)) == (w, h)
                        and int(page.bitspersample) == 8 and int(page.samplesperpixel) in (3, 4)
                        and int(page.planarconfig) == 1 and int(page.imagedepth) == 1):
                    return page
        except Exception:  # noqa: BLE001 - tags tifffile cannot read: no thumbnail
            return None
        return None

    def thumbnail(self) -> np.ndarray | None:
        """The :meth:`thumbnail_page` decoded, RGB ``(h, w, 3) uint8``; ``None`` when there is none or it does not
        decode (the caller reads a pyramid level instead: a damaged thumbnail says nothing of the slide). tifffile
        reads its strips (contiguous, as scanners write them) in one read: on object storage one range request at
        most, none when they lie in the header's blocks already held."""
        page = self.thumbnail_page()
        if page is None:
            return None
        try:
            with self._tif.filehandle.lock:
                try:
                    return decode_jpeg_strips(page, self._fd)
                except Exception:  # noqa: BLE001 - not JPEG strips, or libjpeg-turbo refused: tifffile's own decode
                    pass
                a = np.asarray(page.asarray())
        except Exception as exc:  # noqa: BLE001 - codec errors come in many classes
            log.info("%s: the thumbnail page does not decode (%s); the plan reads a level", self.path, exc)
            return None
        if a.ndim != 3 or a.shape[:2] != (int(page.imagelength), int(page.imagewidth)) or a.dtype != np.uint8:
            return None
        return np.ascontiguousarray(a[..., :3])

    def close(self) -> None:
        if not self._own:  # the reader's file and TIFF: the reader closes them
            return
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._tif.close()


def direct_source(reader) -> DirectSource | None:
    """A :class:`DirectSource` for ``reader``'s file when it is a TIFF tifffile parses, else ``None``.

    The pyramid is the reader's (levels are matched to TIFF pages by their size), so plans, grids and
    levels are the same whichever path decodes the pixels. A tifffile reader over a remote file
    (``reader.remote_tiff``: an s3:// slide read in place) lends its parsed TIFF and its range file.
    """
    path = str(reader.path)
    remote = getattr(reader, "remote_tiff", None)
    if remote is not None:
        tif, file = remote
        return DirectSource(path, tif, reader.level_dimensions, file=file)
    return local_source(path, reader.level_dimensions)


def local_source(path: str, level_dimensions) -> DirectSource | None:
    """A :class:`DirectSource` for the local file ``path`` when it is a TIFF tifffile parses (its pages parsed once,
    :func:`~.tifffile_backend.cache_pages`), else ``None``; no reader is opened. ``level_dimensions``: the pyramid's
    ``(width, height)`` per level, as its reader gives them (levels are matched to pages by size)."""
    from .tifffile_backend import cache_pages, is_tiff

    if not is_tiff(path):
        return None
    tif = None
    try:
        import tifffile

        tif = tifffile.TiffFile(path)
        cache_pages(tif)
    except Exception:  # noqa: BLE001 - the reader reads it; this module does not
        if tif is not None:
            tif.close()
        return None
    return DirectSource(path, tif, level_dimensions)
