"""IDC regions: the thresholded map of one input as polygons (QuPath annotations in GeoJSON).

A *region* is a set of IDC tiles (``prob >= threshold``, on the grid) connected through shared
**edges** (4-connectivity): tiles that touch only at a corner are two regions, as QuPath's own
"merge" of square tiles and most pathologists' reading ("one focus" = contiguous tissue) would
have it. Each region is one exact polygon, the union of its tile squares, traced here from the
boolean grid (no geometry library: a vectorised edge walk, linear in the boundary length):

* the **shell** is the region's outline; **holes** (non-IDC tiles, background or unscored cells
  enclosed by the region) are kept as interior rings. A region that is not IDC but lies in a hole
  of another (an island in a lake) is a region of its own;
* where the region touches itself at a single corner (a hole touching the outline, or two holes
  touching, at one point) the rings touch at that point and stay separate rings, which keeps every
  polygon valid in the OGC / GeoJSON sense (shapely ``is_valid``);
* vertices are the corners only (no vertex on a straight run of tile edges); coordinates are
  **level-0 pixels** of the source, origin top left, y down: grid corner ``(row, col)`` is at
  ``(col * s, row * s)`` with ``s = level0_tile_px``, rounded to 1/1000 px exactly like the per-tile
  detections (:func:`cancernet_batch.geojson.tile_polygon`), so region outlines lie on the tile
  edges. For a patient folder "level 0" is the Kaggle patient image the patch names count in
  (``s = 50``: tile ``(row, col)`` is the patch named ``x{col*50}_y{row*50}``);
* rings follow RFC 7946: shells counter-clockwise, holes clockwise (in the numbers as written).

Measurements of a region (from its tiles, not the drawn outline, so they do not change with
smoothing): area in mm² (tiles x ``(50 * target_mpp / 1000) ** 2``; equal to the polygon's area in
level-0 px² times the level-0 µm/px ``50 * target_mpp / level0_tile_px`` squared), tile count, mean
and max probability of its tiles.

``min_area_mm2`` drops regions smaller than that (default 0: keep all). ``smooth`` (default 0: off)
rounds the outlines by that many rounds of Chaikin corner cutting, for display only: the smoothed
rings are no longer exact and are not checked for validity where rings touch at a corner.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from .components import label
from .geojson import IDC_CLASS, _num

OBJECT_TYPE = "annotation"

# directions of a boundary edge, y down: east, south, west, north
_DX = np.array([1, 0, -1, 0])
_DY = np.array([0, 1, 0, -1])


@dataclass(frozen=True)
class Region:
    """One IDC region: its rings in grid-corner units, and its measurements."""

    shell: np.ndarray  # (K, 2) float64 grid corners (x = col, y = row), closed (first == last)
    holes: tuple[np.ndarray, ...]
    tiles: int
    area_mm2: float
    mean_prob: float
    max_prob: float
    first_tile: tuple[int, int]  # (row, col) of its top-left-most tile (a stable id)


def idc_mask(shape: tuple[int, int], coords: np.ndarray, probs: np.ndarray, threshold: float
             ) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, prob_grid)``: IDC tiles on the grid and the probability of every grid cell (NaN: none)."""
    rows, cols = (int(v) for v in shape)
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    probs = np.asarray(probs, np.float32)
    grid = np.full((rows, cols), np.nan, np.float32)
    ok = (coords[:, 0] >= 0) & (coords[:, 1] >= 0) & (coords[:, 0] < rows) & (coords[:, 1] < cols)
    grid[coords[ok, 0], coords[ok, 1]] = probs[ok]
    mask = np.isfinite(grid) & (np.where(np.isfinite(grid), grid, 0.0) >= threshold)
    return mask, grid


def _boundary_edges(labels: np.ndarray):
    """Directed unit edges between IDC and non-IDC cells, the IDC cell on the right (y down).

    Returns ``(x, y, direction, label)`` of each edge's start corner.
    """
    fg = np.pad(labels > 0, 1)
    lab = np.pad(labels, 1)
    core = fg[1:-1, 1:-1]
    parts = []
    # (neighbour offset (dr, dc), start corner offset (dx, dy), direction)
    for (dr, dc), (sx, sy), d in (((-1, 0), (0, 0), 0),   # top side: east
                                  ((0, 1), (1, 0), 1),    # right side: south
                                  ((1, 0), (1, 1), 2),    # bottom side: west
                                  ((0, -1), (0, 1), 3)):  # left side: north
        nb = fg[1 + dr:fg.shape[0] - 1 + dr, 1 + dc:fg.shape[1] - 1 + dc]
        r, c = np.nonzero(core & ~nb)
        parts.append((c + sx, r + sy, np.full(r.size, d), lab[r + 1, c + 1]))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))


def _rings(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Every boundary ring as ``(label, closed corner array)``; corners only, in walking order."""
    x, y, d, lab = _boundary_edges(labels)
    n = x.size
    if n == 0:
        return []
    rows, cols = labels.shape
    width = cols + 1
    start = y * width + x
    ex, ey = x + _DX[d], y + _DY[d]
    end = ey * width + ex
    key = start * 4 + d
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    out_count = np.bincount(start, minlength=(rows + 1) * width)

    # a corner with two outgoing edges is a pinch: two IDC cells touch there diagonally. Same region:
    # turn left (the cells stay joined, the rings around the two other cells stay apart); two regions:
    # turn right (each ring goes round its own cell)
    pinch = out_count[end] == 2
    nxt_dir = np.empty(n, np.int64)
    single = ~pinch
    if single.any():
        # the only outgoing edge at the end corner: look it up by corner
        first = np.searchsorted(sorted_key, end[single] * 4)
        nxt_dir[single] = sorted_key[first] % 4
    if pinch.any():
        pe, px, py, pd = np.flatnonzero(pinch), ex[pinch], ey[pinch], d[pinch]
        padded = np.pad(labels, 1)  # cell (r, c) at padded[r + 1, c + 1]; corner (x, y) touches rows y-1, y
        tl, br = padded[py, px], padded[py + 1, px + 1]
        tr, bl = padded[py, px + 1], padded[py + 1, px]
        a = np.where(tl > 0, tl, tr)
        b = np.where(tl > 0, br, bl)
        same = a == b
        nxt_dir[pe] = np.where(same, (pd - 1) % 4, (pd + 1) % 4)
    nxt = order[np.searchsorted(sorted_key, end * 4 + nxt_dir)]

    seen = np.zeros(n, bool)
    turn = nxt_dir != d  # the end corner of edge e is a vertex of the polygon
    rings = []
    nxt_l = nxt.tolist()
    for e0 in range(n):
        if seen[e0]:
            continue
        walk = []
        e = e0
        while True:
            walk.append(e)
            e = nxt_l[e]
            if e == e0:
                break
        idx = np.asarray(walk)
        seen[idx] = True
        corners = idx[turn[idx]]
        pts = np.stack([ex[corners], ey[corners]], axis=1).astype(np.float64)
        top_left = int(np.lexsort((pts[:, 0], pts[:, 1]))[0])  # start at the top-left corner, as tiles do
        pts = np.roll(pts, -top_left, axis=0)
        rings.append((int(lab[e0]), np.concatenate([pts, pts[:1]])))
    return rings


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _chaikin(ring: np.ndarray, rounds: int) -> np.ndarray:
    for _ in range(rounds):
        p = ring[:-1]
        q = np.roll(p, -1, axis=0)
        cut = np.empty((2 * len(p), 2))
        cut[0::2] = 0.75 * p + 0.25 * q
        cut[1::2] = 0.25 * p + 0.75 * q
        ring = np.concatenate([cut, cut[:1]])
    return ring


def find_regions(shape: tuple[int, int], coords: np.ndarray, probs: np.ndarray, threshold: float, *,
                 tile_area_mm2: float, min_area_mm2: float = 0.0, smooth: int = 0) -> list[Region]:
    """The IDC regions of one input, largest first (ties: top-left first)."""
    mask, grid = idc_mask(shape, coords, probs, threshold)
    labels, count = label(mask)  # 4-connected: tiles that share an edge
    if count == 0:
        return []
    flat = labels.ravel()
    on = flat > 0
    lab_on = flat[on]
    p_on = grid.ravel()[on].astype(np.float64)
    tiles = np.bincount(lab_on, minlength=count + 1)
    sums = np.bincount(lab_on, weights=p_on, minlength=count + 1)
    maxima = np.full(count + 1, -np.inf)
    np.maximum.at(maxima, lab_on, p_on)
    first_flat = np.full(count + 1, flat.size, np.int64)
    np.minimum.at(first_flat, lab_on, np.flatnonzero(on))
    keep = tiles * tile_area_mm2 >= min_area_mm2
    keep[0] = False
    shells: dict[int, np.ndarray] = {}
    holes: dict[int, list[np.ndarray]] = {}
    for k, ring in _rings(np.where(keep[labels], labels, 0)):
        if _signed_area(ring) > 0:
            shells[k] = ring
        else:
            holes.setdefault(k, []).append(ring)
    cols = labels.shape[1]
    out = []
    for k in np.flatnonzero(keep):
        k = int(k)
        shell, hs = shells[k], holes.get(k, [])
        if smooth:
            shell, hs = _chaikin(shell, smooth), [_chaikin(h, smooth) for h in hs]
        f = int(first_flat[k])
        out.append(Region(shell, tuple(sorted(hs, key=lambda h: (h[:, 1].min(), h[:, 0].min()))), int(tiles[k]),
                          float(tiles[k] * tile_area_mm2), float(sums[k] / tiles[k]), float(maxima[k]),
                          (f // cols, f % cols)))
    out.sort(key=lambda r: (-r.tiles, r.first_tile))
    return out


def region_summary(regions: list[Region]) -> tuple[int, float]:
    """``(count, largest area in mm²)`` (0 and 0.0 without regions)."""
    return len(regions), max((r.area_mm2 for r in regions), default=0.0)


def _ring_coords(ring: np.ndarray, tile_px: float) -> list[list[float | int]]:
    return [[_num(x * tile_px), _num(y * tile_px)] for x, y in ring.tolist()]


def region_features(input_id: str, regions: list[Region], tile_px: float) -> list[dict]:
    """One QuPath annotation feature per region (``IDC region 1`` the largest)."""
    feats = []
    for i, r in enumerate(regions, start=1):
        row, col = r.first_tile
        feats.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"cancernet-batch:{input_id}/region/{row}/{col}")),
            "geometry": {"type": "Polygon",
                         "coordinates": [_ring_coords(r.shell, tile_px)] + [_ring_coords(h, tile_px) for h in r.holes]},
            "properties": {
                "objectType": OBJECT_TYPE,
                "name": f"IDC region {i}",
                "classification": dict(IDC_CLASS),
                "measurements": {"Area mm^2": round(r.area_mm2, 6), "Tile count": r.tiles,
                                 "Mean IDC probability": round(r.mean_prob, 6),
                                 "Max IDC probability": round(r.max_prob, 6)},
            },
        })
    return feats
