"""QuPath-importable GeoJSON of an input's IDC tiles (File > Import objects in QuPath >= 0.4).

One ``FeatureCollection``; one ``Feature`` per IDC tile (``prob >= threshold``), as QuPath writes
its own exports:

* ``geometry``: a closed 5-point ``Polygon`` in **level-0 pixel coordinates** of the source image,
  origin top left, y down: tile ``(row, col)`` spans x in ``[col*s, (col+1)*s]`` and y in
  ``[row*s, (row+1)*s]`` with ``s = level0_tile_px`` (50 for a Kaggle patient folder, whose
  "level 0" is the downsampled patient image the patch names count in);
* ``id``: a UUID derived from the input id and the tile position, so re-runs give the same ids;
* ``properties``: ``objectType`` ``"detection"`` (light, so tens of thousands of tiles stay fast in
  QuPath, and usable by *Measure > Show measurement maps*), ``classification``
  ``{"name": "IDC", "color": [r, g, b]}``, and ``measurements`` ``{"IDC probability": p,
  "Tile row": row, "Tile col": col}`` (QuPath >= 0.4 reads measurements as an object).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np

from .atomic import write_text

IDC_CLASS = {"name": "IDC", "color": [220, 20, 60]}
OBJECT_TYPE = "detection"


def _num(v: float) -> float | int:
    """A coordinate as an int when it is whole, else rounded to 1/1000 px."""
    r = round(float(v), 3)
    return int(r) if r.is_integer() else r


def tile_polygon(row: int, col: int, tile_px: float) -> list[list[list[float | int]]]:
    """The closed ring of one tile: top-left, top-right, bottom-right, bottom-left, top-left."""
    x0, y0, x1, y1 = (_num(v) for v in (col * tile_px, row * tile_px, (col + 1) * tile_px, (row + 1) * tile_px))
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]


def idc_features(input_id: str, coords: np.ndarray, probs: np.ndarray, threshold: float, tile_px: float) -> list[dict]:
    """One QuPath detection feature per IDC tile with a grid position, in (row, col) order."""
    probs = np.asarray(probs, np.float32)
    keep = np.isfinite(probs) & (probs >= threshold) & (coords[:, 0] >= 0) & (coords[:, 1] >= 0)
    idx = np.flatnonzero(keep)
    idx = idx[np.lexsort((coords[idx, 1], coords[idx, 0]))]
    features = []
    for i in idx:
        row, col = int(coords[i, 0]), int(coords[i, 1])
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"cancernet-batch:{input_id}/{row}/{col}")),
            "geometry": {"type": "Polygon", "coordinates": tile_polygon(row, col, tile_px)},
            "properties": {
                "objectType": OBJECT_TYPE,
                "classification": dict(IDC_CLASS),
                "measurements": {"IDC probability": round(float(probs[i]), 6), "Tile row": row, "Tile col": col},
            },
        })
    return features


def write_geojson(path: str | os.PathLike, features: list[dict]) -> Path:
    """Atomically write a FeatureCollection (one feature per line, so diffs and greps stay readable)."""
    body = ",\n".join(json.dumps(f, separators=(",", ":"), allow_nan=False) for f in features)
    return write_text(path, '{"type":"FeatureCollection","features":[\n' + body + "\n]}\n")
