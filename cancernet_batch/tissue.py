"""Tissue detection on a low-resolution view of a slide.

The view is an RGB image on the model's tile grid with :data:`PX_PER_TILE` pixels per tile side
(at the default 4.0 µm/px and 50 px tiles: 25 µm/px). A pixel is tissue when its HSV saturation is
above an Otsu threshold (bounded to [:data:`MIN_SATURATION`, :data:`MAX_SATURATION`] so that an
all-background or all-tissue view still splits sensibly) and it is neither near-black (pen marks,
scanner borders) nor near-white. The mask is then cleaned: holes smaller than one tile are filled
(lumens, fat cells inside tissue) and specks smaller than a quarter tile are dropped (dust).
A tile's tissue fraction is the mean of the mask over its footprint; tiling keeps a tile when that
fraction is at least the tissue threshold (default :data:`DEFAULT_THRESHOLD`).
"""

from __future__ import annotations

import numpy as np

PX_PER_TILE = 8
"""Pixels per model-tile side in the low-resolution view."""
from .config import DEFAULT_TISSUE_THRESHOLD as DEFAULT_THRESHOLD  # noqa: E402,F401 - with the tile settings
"""A tile is kept when at least this fraction of it is tissue."""
MIN_SATURATION = 0.05
MAX_SATURATION = 0.20
MIN_VALUE = 0.15  # darker than this (max channel / 255) is not tissue: pen, dust, borders
MAX_WHITE = 235  # every channel above this is glass, whatever its saturation


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
    a = rgb.astype(np.float32)
    mx = a.max(axis=-1)
    mn = a.min(axis=-1)
    sat = np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0)
    return sat, mx / 255.0


def tissue_mask(rgb: np.ndarray, *, px_per_tile: int = PX_PER_TILE) -> np.ndarray:
    """Boolean tissue mask of a low-resolution RGB view (see the module doc for the rule)."""
    from scipy import ndimage

    sat, val = saturation(rgb)
    candidates = (val >= MIN_VALUE) & ~(rgb.min(axis=-1) > MAX_WHITE)
    thr = otsu_threshold(sat[candidates]) if candidates.any() else MAX_SATURATION
    thr = min(max(thr, MIN_SATURATION), MAX_SATURATION)
    mask = (sat > thr) & candidates
    if not mask.any():
        return mask
    if px_per_tile >= 4:  # a coarser view has no pixel to spare
        mask = ndimage.binary_opening(mask, structure=np.ones((2, 2), bool))
    # fill holes smaller than one tile
    holes, nholes = ndimage.label(~mask)
    if nholes:
        sizes = np.bincount(holes.ravel())
        border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        small = sizes < px_per_tile * px_per_tile
        small[0] = False
        small[border] = False
        mask |= small[holes]
    # drop specks smaller than a quarter tile
    objects, nobj = ndimage.label(mask)
    if nobj:
        sizes = np.bincount(objects.ravel())
        keep = sizes >= max(1, px_per_tile * px_per_tile // 4)
        keep[0] = False
        mask = keep[objects]
    return mask


def tile_fractions(mask: np.ndarray, rows: int, cols: int, px_per_tile: int = PX_PER_TILE) -> np.ndarray:
    """Tissue fraction of each tile of a ``rows`` x ``cols`` grid whose tiles are ``px_per_tile`` view pixels."""
    k = px_per_tile
    m = mask[: rows * k, : cols * k].astype(np.float32)
    return m.reshape(rows, k, cols, k).mean(axis=(1, 3))
