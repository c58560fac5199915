"""The zoomable maps of ``index.html``: per input a thumbnail and its map data, and one viewer script.

Files (in ``RUN/report/``, each written atomically):

    viewer.js                the viewer (``cancernet_batch/assets/viewer.js``, its colour table filled in
                             from the same matplotlib colour map as the PNG heatmaps); no network, no
                             dependency
    maps/<id>.thumb.jpg      the thumbnail the map is drawn over (at most 1024 px)
    maps/<id>.view.js        ``cancernetView({...})``: grid, tile side in level-0 px, µm/px, threshold,
                             P(IDC) per tile (uint16 little-endian, base64; 65535 = not scored) and the
                             IDC regions of :mod:`cancernet_batch.regions` (size, tiles, P, box)

The page loads a map's data only when its figure comes near the screen, so a report of thousands of
inputs stays light. Everything that comes from data reaches the page as JSON inside a script file
(``json.dumps`` with ASCII escapes) or escaped HTML; nothing is interpreted as markup.
"""

from __future__ import annotations

import base64
import functools
import json
from importlib import resources
from pathlib import Path

import numpy as np

from .atomic import atomic_path, write_text
from .runfolder import VIEWER_JS, InputFiles

NONE = 65535


@functools.lru_cache(maxsize=4)
def viewer_script(cmap: str = "inferno") -> str:
    """The viewer with its 256-colour table from ``cmap``."""
    from .heatmap import colour_table

    lut = colour_table(cmap)
    text = resources.files("cancernet_batch").joinpath("assets", VIEWER_JS).read_text(encoding="utf-8")
    return text.replace("__INFERNO__", lut.tobytes().hex())


def write_viewer(out: str | Path) -> Path:
    """``out/viewer.js``, rewritten only when its content changes."""
    path = Path(out) / VIEWER_JS
    text = viewer_script()
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        write_text(path, text)
    return path


def region_items(regions) -> list[dict]:
    """The viewer's list of :class:`~cancernet_batch.regions.Region`: size, tiles, mean and max P, tile box."""
    out = []
    for r in regions:
        x, y = r.shell[:, 0], r.shell[:, 1]  # grid corners: x = col, y = row
        out.append({"tiles": r.tiles, "area_mm2": r.area_mm2, "mean_p": r.mean_prob, "max_p": r.max_prob,
                    "bbox": [int(np.floor(y.min())), int(np.floor(x.min())), int(np.ceil(y.max())),
                             int(np.ceil(x.max()))]})
    return out


def view_data(gid: str, idc_map: np.ndarray, *, thumb_rel: str, thumb_w: float, thumb_h: float, tile_px: float,
              mpp0: float, threshold: float, regions=()) -> dict:
    """What ``maps/<id>.view.js`` hands to the viewer."""
    m = np.asarray(idc_map, np.float32)
    q = np.where(np.isfinite(m), np.clip(np.rint(np.nan_to_num(m) * (NONE - 1)), 0, NONE - 1), NONE)
    rows, cols = m.shape
    return {"id": gid, "rows": rows, "cols": cols, "tile": tile_px, "um": mpp0, "thr": threshold,
            "thumb": thumb_rel, "thumbW": thumb_w, "thumbH": thumb_h,
            "p": base64.b64encode(q.astype("<u2").tobytes()).decode("ascii"),
            "regions": region_items(regions)}


def write_view(out: str | Path, files: InputFiles, gid: str, idc_map: np.ndarray, thumb, *, tile_px: float,
               mpp0: float, threshold: float, regions=()) -> str:
    """Write the input's ``files.thumb`` and ``files.view`` (``maps/<name>.thumb.jpg``, ``maps/<name>.view.js``)
    under ``out``; returns the latter relative to ``out``."""
    from PIL import Image

    out = Path(out)
    with atomic_path(out / files.thumb) as tmp:
        Image.fromarray(np.asarray(thumb.image, np.uint8)).save(tmp, format="JPEG", quality=85)
    data = view_data(gid, idc_map, thumb_rel=files.thumb, thumb_w=thumb.width, thumb_h=thumb.height,
                     tile_px=tile_px, mpp0=mpp0, threshold=threshold, regions=regions)
    write_text(out / files.view, f"cancernetView({json.dumps(data, ensure_ascii=True, allow_nan=False)});\n")
    return files.view
