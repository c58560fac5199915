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

:func:`write_geojson` streams: features are serialised and written a batch at a time under a
temporary name, then renamed, so a slide with 100,000 IDC tiles never has its whole collection in
memory; optionally gzipped. The merged IDC regions (annotations) are in :mod:`cancernet_batch.regions`.
"""

from __future__ import annotations

import gzip as _gzip
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .atomic import atomic_path

IDC_CLASS = {"name": "IDC", "color": [220, 20, 60]}
OBJECT_TYPE = "detection"
STREAM_BATCH = 1000  # features serialised and written at a time


def _num(v: float) -> float | int:
    """A coordinate as an int when it is whole, else rounded to 1/1000 px."""
    r = round(float(v), 3)
    return int(r) if r.is_integer() else r


def _corners(row: int, col: int, tile_px: float) -> tuple:
    """``(x0, y0, x1, y1)`` of one tile in level-0 pixels, as the GeoJSON writes them (:func:`_num`)."""
    return tuple(_num(v) for v in (col * tile_px, row * tile_px, (col + 1) * tile_px, (row + 1) * tile_px))


def tile_polygon(row: int, col: int, tile_px: float) -> list[list[list[float | int]]]:
    """The closed ring of one tile: top-left, top-right, bottom-right, bottom-left, top-left."""
    x0, y0, x1, y1 = _corners(row, col, tile_px)
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]


_URL_NAMESPACE = uuid.NAMESPACE_URL.bytes
# one feature's compact JSON (json.dumps with separators=(",", ":")), its numbers filled in with repr as json does
_FEATURE = ('{"type":"Feature","id":"%s","geometry":{"type":"Polygon","coordinates":[[[%r,%r],[%r,%r],[%r,%r],[%r,%r],'
            '[%r,%r]]]},"properties":{"objectType":' + json.dumps(OBJECT_TYPE) + ',"classification":'
            + json.dumps(IDC_CLASS, separators=(",", ":")) + ',"measurements":{"IDC probability":%r,"Tile row":%d,'
            '"Tile col":%d}}}')


def _feature_id(input_id: str, row: int, col: int) -> str:
    """``str(uuid5(NAMESPACE_URL, "cancernet-batch:ID/ROW/COL"))``, hashed directly (no UUID object per tile)."""
    d = bytearray(hashlib.sha1(_URL_NAMESPACE + f"cancernet-batch:{input_id}/{row}/{col}".encode("utf-8")).digest()[:16])
    d[6] = (d[6] & 0x0F) | 0x50  # version 5
    d[8] = (d[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = d.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def idc_feature_lines(input_id: str, coords: np.ndarray, probs: np.ndarray, threshold: float, tile_px: float
                      ) -> Iterator[str]:
    """One QuPath detection feature per IDC tile with a grid position, in (row, col) order, one at a time, each
    as its compact JSON text (what the report writes: made directly, about 5x faster than a dict through json)."""
    probs = np.asarray(probs, np.float32)
    coords = np.asarray(coords).reshape(-1, 2)
    keep = np.isfinite(probs) & (probs >= threshold) & (coords[:, 0] >= 0) & (coords[:, 1] >= 0)
    idx = np.flatnonzero(keep)
    idx = idx[np.lexsort((coords[idx, 1], coords[idx, 0]))]
    for (row, col), p in zip(coords[idx].tolist(), probs[idx].tolist()):
        x0, y0, x1, y1 = _corners(row, col, tile_px)
        yield _FEATURE % (_feature_id(input_id, row, col), x0, y0, x1, y0, x1, y1, x0, y1, x0, y0, round(p, 6), row, col)


def iter_idc_features(input_id: str, coords: np.ndarray, probs: np.ndarray, threshold: float, tile_px: float
                      ) -> Iterator[dict]:
    """:func:`idc_feature_lines` as GeoJSON feature objects."""
    return (json.loads(line) for line in idc_feature_lines(input_id, coords, probs, threshold, tile_px))


def idc_features(input_id: str, coords: np.ndarray, probs: np.ndarray, threshold: float, tile_px: float) -> list[dict]:
    """:func:`iter_idc_features` as a list (small inputs, tests)."""
    return list(iter_idc_features(input_id, coords, probs, threshold, tile_px))


_HEAD = b'{"type":"FeatureCollection","features":[\n'
_TAIL = b"\n]}\n"


def write_geojson(path: str | os.PathLike, features: Iterable[dict | str], *, gzip: bool = False,
                  batch: int = STREAM_BATCH) -> Path:
    """Atomically write a FeatureCollection, streamed: ``features`` (objects, or their compact JSON text as
    :func:`idc_feature_lines` makes it) is consumed ``batch`` features at a time.

    One feature per line (diffs and greps stay readable); the whole collection is never built in
    memory, so a slide with 100,000 IDC tiles costs a batch of lines, not a 50 MB string. With
    ``gzip`` the file is gzip-compressed (no name or time in its header: re-runs give the same bytes);
    give it a ``.gz`` name. Written under a temporary name and renamed (:func:`atomic_path`).
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        fh = _gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if gzip else raw
        try:
            fh.write(_HEAD)
            lines: list[str] = []
            first = True
            for f in features:
                lines.append(f if isinstance(f, str) else json.dumps(f, separators=(",", ":"), allow_nan=False))
                if len(lines) >= batch:
                    fh.write((("" if first else ",\n") + ",\n".join(lines)).encode("ascii"))
                    first, lines = False, []
            if lines:
                fh.write((("" if first else ",\n") + ",\n".join(lines)).encode("ascii"))
            fh.write(_TAIL)
        finally:
            if gzip:
                fh.close()
    return Path(path)
