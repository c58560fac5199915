"""Tissue detection on a low-resolution view of a slide.

The view is an RGB image on the model's tile grid with :data:`PX_PER_TILE` pixels per tile side
(at the default 4.0 µm/px and 50 px tiles: 25 µm per view pixel). Every size below is in microns
(converted with the view's µm/px), so the rule is the same at any scanner or target resolution.
The approach follows HistoQC (light/dark thresholds relative to the glass, pen detection by
colour, small-object removal) and TIAToolbox's ``MorphologicalMasker`` (threshold, then
morphological closing sized in physical units, then minimum region size).

How each class is decided, pixel by pixel of the view, then object by object:

* **glass**: the glass colour ``W`` is estimated per slide: the median colour of the brightest
  pixels (within :data:`GLASS_BAND` grey levels of the 99th percentile of brightness), at least
  :data:`GLASS_MIN` in every channel. Every pixel gets its optical density relative to the glass,
  ``OD = sum_c -log10(I_c / W_c)``. Glass has ``OD ≈ 0``; a pixel is *foreground* when
  ``OD > FOREGROUND_OD``. Pale stroma, loose tissue and grey (unstained-looking) tissue are
  foreground because they absorb some light, whatever their hue or saturation.
* **fat and loose tissue inside the specimen**: a fat lobule is white cells framed by thin pink
  membranes. In the view the membranes are averaged with the cell interiors (pale pink, above
  ``FOREGROUND_OD``); what is left white is closed by a morphological closing of radius
  :data:`CLOSE_UM` (bridges gaps between membranes) and by filling every hole that is enclosed
  by tissue and smaller than :data:`MAX_HOLE_UM2` (fat cells, lumens, small tears). Larger
  enclosed glass (a big tear, a hole between fragments) stays glass.
* **dust, specks and smudges**: connected foreground smaller than :data:`MIN_OBJECT_UM2` is
  dropped, and so is an object with less than :data:`MIN_STAINED_UM2` of stained pixels
  (saturation at least :data:`STAIN_SATURATION`): grey, unstained-looking tissue counts when it
  belongs to a stained specimen (grey fat next to pink stroma), a grey smudge on the glass does not.
* **pen marks**: ink is excluded by colour, after filling (so filling cannot bring it back):
  green, cyan and blue ink by hue (:data:`PEN_HUE`, saturation at least :data:`PEN_SATURATION`;
  H&E's eosin is pink-red and haematoxylin violet, outside that range), black ink and scanner
  borders by darkness (brightest channel below :data:`MIN_VALUE`).
* **folds**: a fold is tissue lying on itself: twice the thickness, about twice the optical
  density of the slide's tissue. Decision: a fold is *not* tissue (its pixels are out of focus
  and over-stained, so a model's score there is meaningless), like pen. A pixel is fold when its
  OD is above ``max(FOLD_OD_MIN, FOLD_FACTOR x the slide's median tissue OD)``. A tile that is
  part fold is still kept when the rest of it reaches the threshold.

A tile's tissue fraction is the mean of the mask over its footprint; tiling keeps a tile when that
fraction is at least the tissue threshold (default :data:`DEFAULT_THRESHOLD`, a quarter of the
tile). The cut is a quarter, not a half, because that is what "a tissue patch" means in practice:
the Kaggle IDC patches (``../shared/data/idc``) include specimen-edge patches down to about 20 %
tissue, and with a half-tile cut 5-20 % of some patients' patches were lost
(``benchmarks/real_tissue.py``). Synthetic truth uses the same cut (``synth.SlideTruth``).
"""

from __future__ import annotations

import numpy as np

from . import DEFAULT_MPP, PATCH_SIZE
from .components import label

PX_PER_TILE = 8
"""Pixels per model-tile side in the low-resolution view."""
from .config import DEFAULT_TISSUE_THRESHOLD as DEFAULT_THRESHOLD  # noqa: E402,F401 - with the tile settings
"""A tile is kept when at least this fraction of it is tissue."""
TILE_UM = PATCH_SIZE * DEFAULT_MPP
"""Side of one default model tile in microns (the view scale assumed when none is given)."""

GLASS_MIN = 220.0
"""The glass colour estimate is at least this bright in every channel (a slide that is nearly all tissue)."""
GLASS_BAND = 12.0
"""Pixels this close (grey levels) to the 99th percentile of brightness are the glass sample."""
FOREGROUND_OD = 0.09
"""Optical density (summed over RGB, relative to the glass) above which a view pixel is foreground."""
CLOSE_UM = 50.0
"""Radius of the morphological closing (µm): bridges the gaps between fat-cell membranes."""
MAX_HOLE_UM2 = 40_000.0
"""Holes enclosed by tissue smaller than this (µm², one 200 µm tile) are filled: fat cells, lumens."""
MIN_OBJECT_UM2 = 10_000.0
"""Foreground objects smaller than this (µm², a 100 µm square) are dust, not tissue."""
STAIN_SATURATION = 0.08
MIN_STAINED_UM2 = 2_500.0
"""An object is tissue only if at least this much of it (µm²) is stained (saturation >= STAIN_SATURATION):
grey tissue (poorly stained fat) counts when it is part of a specimen that is stained somewhere, a grey
smudge or an out-of-focus blob on the glass does not."""
PEN_HUE = (70.0, 245.0)
"""Hue range (degrees) of green, cyan and blue ink; H&E lies outside it (eosin ~330-360, haematoxylin ~250-300)."""
PEN_SATURATION = 0.25
"""Minimum HSV saturation for a pixel to count as coloured ink."""
MIN_VALUE = 0.2
"""Darker than this (brightest channel / 255) is not tissue: black ink, scanner borders, dirt."""
FOLD_OD_MIN = 1.5
FOLD_FACTOR = 2.0
"""A pixel is fold when its OD exceeds ``max(FOLD_OD_MIN, FOLD_FACTOR * median tissue OD)``."""

# kept for callers of the former saturation rule
MIN_SATURATION = 0.05
MAX_SATURATION = 0.20


def otsu_threshold(values: np.ndarray, bins: int = 256, value_range: tuple[float, float] = (0.0, 1.0)) -> float:
    """Otsu's threshold of ``values``: the cut that maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=value_range)
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return float(value_range[0])
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * centres)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value in [0, 1] of an ``(h, w, 3) uint8`` image."""
    mx, mn = _max_min(rgb)
    sat = np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0)
    return sat, mx / 255.0


def _max_min(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel max and min over the 3 channels, as float32 (element-wise over the channel planes: a numpy
    reduction over a last axis of length 3 is several times slower)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (np.maximum(np.maximum(r, g), b).astype(np.float32),
            np.minimum(np.minimum(r, g), b).astype(np.float32))


def hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees [0, 360) of an ``(h, w, 3) uint8`` image (0 where the pixel is grey)."""
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    mx, mn = _max_min(rgb)
    d = np.where(mx > mn, mx - mn, 1.0)
    h = np.where(mx == r, (g - b) / d % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return np.where(mx > mn, h * 60.0, 0.0)


def glass_colour(rgb: np.ndarray) -> np.ndarray:
    """The slide's glass colour (per channel), estimated from a view: see the module doc."""
    raw = rgb.reshape(-1, 3)
    if len(raw) == 0:
        return np.full(3, 255.0)
    if raw.dtype == np.uint8:  # from the histogram of the channels' sums: the same values, about 40 % less CPU
        s = raw[:, 0].astype(np.uint16)
        s += raw[:, 1]
        s += raw[:, 2]
        counts = np.bincount(s, minlength=len(_BRIGHTNESS))
        cut = _percentile99(counts) - GLASS_BAND
        # brightness rises with the sum: the sample is every pixel whose sum reaches the first level at the cut
        return np.maximum(_median_u8(raw, s >= int(np.argmax(_BRIGHTNESS >= cut))), GLASS_MIN)
    flat = raw.astype(np.float32)
    b = (flat[:, 0] + flat[:, 1] + flat[:, 2]) / np.float32(3)  # the channels' mean, element-wise (fast)
    return np.maximum(np.median(flat[b >= np.percentile(b, 99) - GLASS_BAND], axis=0), GLASS_MIN)


_BRIGHTNESS = np.arange(766, dtype=np.float32) / np.float32(3)
"""A pixel's brightness (the mean of its channels, float32, as :func:`glass_colour` defines it) by the sum of its
8-bit channels."""


def _percentile99(counts: np.ndarray) -> np.float32:
    """``np.percentile(b, 99)`` of the brightness ``b`` of pixels whose channel sums have histogram ``counts``, bit
    for bit. The percentile lies between two neighbours in sorted order; when both have the same brightness (glass
    that fills more than 1 % of a view) it is that value whatever the interpolation, else numpy computes it from
    the sorted values themselves (as many as the pixels, one per pixel)."""
    n = int(counts.sum())
    k = int(np.floor((n - 1) * 0.99))
    cum = np.cumsum(counts)
    lo, hi = np.searchsorted(cum, [k, min(k + 1, n - 1)], side="right")
    if lo == hi:
        return _BRIGHTNESS[lo]
    return np.percentile(np.repeat(_BRIGHTNESS, counts), 99)


def _median_u8(values: np.ndarray, sel: np.ndarray | None = None) -> np.ndarray:
    """``np.median(values[sel].astype(np.float32), axis=0)`` of ``(n, 3) uint8`` values (``sel``: a boolean mask of
    the rows, at least one; None: every row), bit for bit: the middle value of each channel from its 256-bin
    histogram (the mean of the two middle ones when n is even, exact in float32 as numpy computes it). Each
    channel is selected on its own (one plane at a time: about half the time of selecting whole rows)."""
    n = len(values) if sel is None else int(np.count_nonzero(sel))
    out = np.empty(3, np.float32)
    for c in range(3):
        cum = np.cumsum(np.bincount(values[:, c] if sel is None else values[:, c][sel], minlength=256))
        hi = np.float32(np.searchsorted(cum, n // 2, side="right"))
        lo = hi if n % 2 else np.float32(np.searchsorted(cum, n // 2 - 1, side="right"))
        out[c] = (lo + hi) / np.float32(2)
    return out


def optical_density(rgb: np.ndarray, glass: np.ndarray | None = None) -> np.ndarray:
    """Optical density relative to the glass, summed over RGB (0 on glass, ~0.5-1 on H&E tissue)."""
    w = glass_colour(rgb) if glass is None else np.asarray(glass, np.float32)
    if rgb.dtype == np.uint8 and rgb.size > 3 * 256:
        # the same element-wise float32 formula, evaluated once per 8-bit level and channel, then looked up
        # (one contiguous table per channel: ``take`` costs a third of indexing a column of one table)
        lut = _clipped_od(np.arange(256, dtype=np.float32)[:, None], w).T.copy()
        return lut[0].take(rgb[..., 0]) + lut[1].take(rgb[..., 1]) + lut[2].take(rgb[..., 2])
    od = _clipped_od(rgb.astype(np.float32), w)
    return od[..., 0] + od[..., 1] + od[..., 2]  # summed over RGB, element-wise (fast)


def _clipped_od(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per-channel optical density of float32 ``values`` (last axis: RGB) relative to the glass ``w``, at least 0."""
    return np.clip(-np.log10((values + 1.0) / (w.astype(np.float32) + 1.0)), 0.0, None)


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Ink: green/cyan/blue by hue and saturation, black by darkness (see the module doc)."""
    return _pen_mask(rgb, *saturation(rgb))


def _pen_mask(rgb: np.ndarray, sat: np.ndarray, val: np.ndarray) -> np.ndarray:
    """:func:`pen_mask` given the view's saturation and value. The hue is looked at only for the pixels
    saturated enough to be ink (the others are not coloured ink whatever their hue), and only where
    :data:`PEN_HUE` can hold it (:func:`_hue_in_pen_range`)."""
    coloured = sat >= PEN_SATURATION
    if coloured.any():  # by flat index (``take`` of whole pixels: a quarter of the CPU of boolean indexing)
        at = np.flatnonzero(coloured)
        coloured.reshape(-1)[at] = _hue_in_pen_range(rgb.reshape(-1, 3).take(at, axis=0))
    return coloured | (val < MIN_VALUE)


def _hue_in_pen_range(rgb: np.ndarray) -> np.ndarray:
    """``(h >= PEN_HUE[0]) & (h < PEN_HUE[1])`` for ``h = hue(rgb)`` of coloured pixels (``(n, 3) uint8``, every
    one with max > min), bit for bit, without the hue of the red-max pixels: :func:`hue`'s red branch gives
    [0, 60] or (300, 360), outside the ink range, and its green and blue branches are evaluated here in the
    same float32 operations, in the same order, as there."""
    lo, hi = PEN_HUE
    assert 60.0 <= lo and hi <= 300.0, "the red branch must lie outside the ink range"
    r, g, b = (rgb[:, i].astype(np.float32) for i in range(3))
    mx, mn = _max_min(rgb)
    d = mx - mn  # > 0: coloured pixels
    green = (mx != r) & (mx == g)
    blue = (mx != r) & (mx != g)
    h_green = ((b - r) / d + 2) * 60.0
    h_blue = ((r - g) / d + 4) * 60.0
    return (green & (h_green >= lo) & (h_green < hi)) | (blue & (h_blue >= lo) & (h_blue < hi))


def fold_mask(od: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Folds: optical density well above the slide's typical tissue (see the module doc)."""
    if not foreground.any():
        return np.zeros_like(foreground)
    limit = max(FOLD_OD_MIN, FOLD_FACTOR * float(np.median(od[foreground])))
    return od > limit


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius + radius  # a round disk, not a diamond, at small radii


def _closing(mask: np.ndarray, radius: int) -> np.ndarray:
    """``scipy.ndimage.binary_closing(mask, structure=_disk(radius))`` (pixels outside the image are 0 for
    both the dilation and the erosion), the same pixels, made from the disk's rows: a run of
    ``2 w + 1`` pixels at each row offset ``dy``. Dilating by the disk is the OR over its rows of the mask
    dilated along x by the row's run and shifted by ``dy``; eroding is the AND of the same with erosions.
    O(radius) whole-array passes instead of one per element of the disk."""
    disk = _disk(radius)
    rows = [(dy - radius, int(disk[dy].sum()) // 2) for dy in range(2 * radius + 1)]
    return _by_rows(_by_rows(mask, rows, dilate=True), rows, dilate=False)


def _by_rows(mask: np.ndarray, rows: list[tuple[int, int]], *, dilate: bool) -> np.ndarray:
    h, w = mask.shape
    runs = {0: mask}
    for k in range(1, max(hw for _, hw in rows) + 1):  # along x, run 2k + 1: run 2k - 1 and its shifts by 1
        prev, cur = runs[k - 1], runs[k - 1].copy()
        if dilate:
            cur[:, 1:] |= prev[:, :-1]
            cur[:, :-1] |= prev[:, 1:]
        else:  # outside is 0: the edge columns erode
            cur[:, 1:] &= prev[:, :-1]
            cur[:, :-1] &= prev[:, 1:]
            cur[:, [0, -1]] = False
        runs[k] = cur
    out = np.zeros_like(mask) if dilate else np.ones_like(mask)
    for dy, hw in rows:  # out[y] op= run[y + dy]; rows beyond the image are 0
        run, n = runs[hw], h - abs(dy)
        inside = (slice(0, max(n, 0)), slice(dy, None)) if dy >= 0 else (slice(-dy, None), slice(0, max(n, 0)))
        if n > 0:
            if dilate:
                out[inside[0]] |= run[inside[1]]
            else:
                out[inside[0]] &= run[inside[1]]
        if not dilate and dy > 0:  # rows whose row y + dy is outside the image erode
            out[max(n, 0):] = False
        elif not dilate and dy < 0:
            out[:min(-dy, h)] = False
    return out


def tissue_mask(rgb: np.ndarray, *, px_per_tile: int = PX_PER_TILE, um_per_px: float | None = None) -> np.ndarray:
    """Boolean tissue mask of a low-resolution RGB view (see the module doc for the rule).

    ``um_per_px``: the view's pixel size; by default one default model tile (200 µm) per
    ``px_per_tile`` pixels.
    """
    um = float(um_per_px) if um_per_px else TILE_UM / max(1, px_per_tile)
    px_area = um * um
    od = optical_density(rgb)
    sat, val = saturation(rgb)
    pen = _pen_mask(rgb, sat, val)
    fg = (od > FOREGROUND_OD) & ~pen
    fold = fold_mask(od, fg)
    fg &= ~fold
    if not fg.any():
        return fg
    # closing: bridge membranes (padded so that tissue at the border is not eroded)
    r = int(round(CLOSE_UM / um))
    mask = fg
    if r >= 1:
        padded = np.pad(fg, r, mode="edge")
        mask = _closing(padded, r)[r:-r, r:-r] | fg
    # fill holes enclosed by tissue that are smaller than MAX_HOLE_UM2
    holes, nholes = label(~mask)
    if nholes:
        sizes = np.bincount(holes.ravel())
        border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        small = sizes * px_area < MAX_HOLE_UM2
        small[0] = False
        small[border] = False
        mask |= small.take(holes)  # (``take``: half the CPU of indexing by the label image)
    # drop dust (objects smaller than MIN_OBJECT_UM2) and unstained smudges (less than
    # MIN_STAINED_UM2 of stained pixels in the whole object)
    objects, nobj = label(mask)
    if nobj:
        sizes = np.bincount(objects.ravel(), minlength=nobj + 1)
        stained = np.bincount(objects[fg & (sat >= STAIN_SATURATION)], minlength=nobj + 1)  # counts, exact
        keep = (sizes * px_area >= MIN_OBJECT_UM2) & (stained * px_area >= MIN_STAINED_UM2)
        keep[0] = False
        mask = keep.take(objects)
    # ink and folds are not tissue, even where filling reached them
    return mask & ~pen & ~fold


def tile_fractions(mask: np.ndarray, rows: int, cols: int, px_per_tile: int = PX_PER_TILE) -> np.ndarray:
    """Tissue fraction of each tile of a ``rows`` x ``cols`` grid whose tiles are ``px_per_tile`` view pixels."""
    k = px_per_tile
    m = mask[: rows * k, : cols * k].astype(np.float32)
    return m.reshape(rows, k, cols, k).mean(axis=(1, 3))
