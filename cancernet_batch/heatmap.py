"""Thumbnails of an input's tissue and PNG heatmaps of its IDC map over them.

A slide's thumbnail comes from the slide itself: OpenSlide for the files it opens, else tifffile
(the smallest pyramid level at least ``max_px`` wide), else PIL. A slide that cannot be read any
more (moved, changed since tiling, corrupt) gets the low-resolution view that tiling stored
(array ``thumbnail``) when there is one; such a slide without it, and every patient folder, get a
*mosaic* of the stored tiles at their grid positions. Thumbnails are at most ``max_px`` on their long
side. Everything is placed in level-0 pixel coordinates, so the map (one cell per model tile of
``level0_tile_px`` level-0 pixels) lies exactly over the thumbnail.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import PATCH_SIZE
from .atomic import atomic_path
from .errors import InputError, printable
from .store import InputAttrs

log = logging.getLogger(__name__)

from .config import MAX_THUMB_PX  # noqa: E402 - defined with the report's other settings
_MAX_LEVEL_PIXELS = 64_000_000  # a pyramid level larger than this is not read whole for a thumbnail


@dataclass(frozen=True)
class Thumbnail:
    """An RGB image covering ``width`` x ``height`` level-0 pixels from the origin."""

    image: np.ndarray  # (h, w, 3) uint8
    width: float
    height: float
    origin: str  # where it came from, for the report: "slide (openslide)", "stored tiles", ...


def _fit(image, max_px: int) -> np.ndarray:
    """A PIL image shrunk to at most ``max_px`` on its long side, as RGB uint8."""
    image = image.convert("RGB")
    image.thumbnail((max_px, max_px))
    return np.asarray(image, np.uint8)


def _openslide_thumbnail(path: Path, max_px: int) -> Thumbnail | None:
    import openslide

    if openslide.OpenSlide.detect_format(str(path)) is None:
        return None
    with openslide.OpenSlide(str(path)) as slide:
        w, h = slide.dimensions
        img = slide.get_thumbnail((max_px, max_px))
    return Thumbnail(_fit(img, max_px), float(w), float(h), "slide (openslide)")


def _rgb(arr: np.ndarray, axes: str) -> np.ndarray:
    """A tifffile level (axes such as ``YX``, ``YXS``, ``SYX``, ``ZYXS``) as (Y, X, 3) uint8."""
    if "S" in axes and axes.index("S") < axes.index("Y"):
        arr = np.moveaxis(arr, axes.index("S"), -1)
        axes = axes.replace("S", "") + "S"
    while arr.ndim > len(axes[axes.index("Y"):]):  # pages, planes, times: take the first
        arr, axes = arr[0], axes[1:]
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    elif arr.shape[-1] < 3:
        arr = np.repeat(arr[..., :1], 3, axis=-1)
    if arr.dtype != np.uint8:
        top = float(arr.max()) or 1.0
        arr = (arr.astype(np.float32) * (255.0 / top)).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


def _tifffile_thumbnail(path: Path, max_px: int) -> Thumbnail:
    import tifffile
    from PIL import Image

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        sizes = [(lv, lv.shape[lv.axes.index("Y")], lv.shape[lv.axes.index("X")]) for lv in series.levels]
        h0, w0 = sizes[0][1], sizes[0][2]
        big_enough = [s for s in sizes if max(s[1], s[2]) >= max_px] or sizes[:1]
        level, h, w = min(big_enough, key=lambda s: s[1] * s[2])
        if h * w > _MAX_LEVEL_PIXELS:
            raise InputError(f"no pyramid level small enough for a thumbnail ({w}x{h} px)", path=path)
        arr = _rgb(level.asarray(), level.axes)
    return Thumbnail(_fit(Image.fromarray(arr), max_px), float(w0), float(h0), "slide (tifffile)")


def _pil_thumbnail(path: Path, max_px: int) -> Thumbnail:
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        im.draft("RGB", (max_px, max_px))
        return Thumbnail(_fit(im, max_px), float(w), float(h), "slide (pillow)")


def slide_thumbnail(source: str | os.PathLike, max_px: int = MAX_THUMB_PX) -> Thumbnail:
    """A thumbnail of the whole slide at ``source`` (raises when no reader can open it)."""
    path = Path(source)
    if not path.is_file():
        raise InputError("the slide is not there any more", path=path)
    errors = []
    for reader in (_openslide_thumbnail, _tifffile_thumbnail, _pil_thumbnail):
        try:
            thumb = reader(path, max_px)
        except Exception as exc:  # noqa: BLE001 - try the next reader
            errors.append(f"{reader.__name__.strip('_').split('_')[0]}: {exc}")
            continue
        if thumb is not None:
            return thumb
    raise InputError(f"no reader makes a thumbnail: {'; '.join(errors)}", path=path)


def mosaic_thumbnail(group, attrs: InputAttrs, tile_px: float, max_px: int = MAX_THUMB_PX) -> Thumbnail:
    """The stored tiles laid out at their grid positions on white, at most ``max_px`` on a side."""
    from PIL import Image

    rows, cols = attrs.grid_shape
    s = max(1, min(PATCH_SIZE, max_px // max(rows, cols, 1)))
    pick = (np.arange(s) * PATCH_SIZE) // s + PATCH_SIZE // (2 * s)  # nearest-neighbour sample points
    canvas = np.full((max(rows, 1) * s, max(cols, 1) * s, 3), 255, np.uint8)
    tiles, coords = group["tiles"], group["coords"]
    step = int(tiles.chunks[0])
    for start in range(0, int(tiles.shape[0]), step):
        t = np.asarray(tiles[start:start + step])[:, pick][:, :, pick]
        rc = np.asarray(coords[start:start + step])
        ok = (rc[:, 0] >= 0) & (rc[:, 1] >= 0) & (rc[:, 0] < rows) & (rc[:, 1] < cols)
        for (r, c), tile in zip(rc[ok], t[ok]):
            canvas[r * s:(r + 1) * s, c * s:(c + 1) * s] = tile
    image = canvas if max(canvas.shape[:2]) <= max_px else _fit(Image.fromarray(canvas), max_px)
    return Thumbnail(image, cols * tile_px, rows * tile_px, "stored tiles")


def stored_thumbnail(group, attrs: InputAttrs, tile_px: float, max_px: int = MAX_THUMB_PX) -> Thumbnail | None:
    """The low-resolution view that tiling kept (array ``thumbnail``, k px per grid tile), if any."""
    from PIL import Image

    rows, cols = attrs.grid_shape
    if "thumbnail" not in group or rows * cols == 0:
        return None
    arr = group["thumbnail"]
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] * cols != arr.shape[1] * rows:
        log.warning("%s: stored thumbnail of shape %s does not fit the grid %s", attrs.source, arr.shape, (rows, cols))
        return None
    image = _fit(Image.fromarray(np.asarray(arr[...], np.uint8)), max_px)
    return Thumbnail(image, cols * tile_px, rows * tile_px, "stored thumbnail")


def thumbnail_for(group, attrs: InputAttrs, tile_px: float, max_px: int = MAX_THUMB_PX) -> Thumbnail:
    """What a map is drawn over: for a slide, the view tiling stored (no slide access: the report works
    on a run whose slides are offline, and costs no decoding); else the slide's own thumbnail when
    it can still be read unchanged; else (and always for patient folders) a mosaic of the stored tiles."""
    if attrs.kind == "slide":
        stored = stored_thumbnail(group, attrs, tile_px, max_px)
        if stored is not None:
            return stored
        try:
            if attrs.source_size and Path(attrs.source).is_file() and Path(attrs.source).stat().st_size != attrs.source_size:
                raise InputError("the slide changed since it was tiled (re-tile it)", path=attrs.source)
            return slide_thumbnail(attrs.source, max_px)
        except Exception as exc:  # noqa: BLE001 - the stored tiles always work
            log.warning("%s; the map is drawn over the stored tiles", exc)
    return mosaic_thumbnail(group, attrs, tile_px, max_px)


def _nice_length(span_um: float) -> float:
    """A round scale-bar length (1, 2 or 5 x 10^k µm) of about a fifth of ``span_um``."""
    target = max(span_um / 5.0, 1e-6)
    base = 10.0 ** np.floor(np.log10(target))
    return float(max(m * base for m in (1.0, 2.0, 5.0) if m * base <= target))


def _scale_label(um: float) -> str:
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"


def outline_segments(mask: np.ndarray, tile_px: float) -> np.ndarray:
    """Line segments ``(K, 2, 2)`` in level-0 px along the tile edges between ``mask`` and the rest."""
    m = np.pad(np.asarray(mask, bool), 1)
    vr, vc = np.nonzero(m[1:-1, 1:] != m[1:-1, :-1])  # vertical edge left of column vc, row vr
    hr, hc = np.nonzero(m[1:, 1:-1] != m[:-1, 1:-1])  # horizontal edge above row hr, column hc
    vertical = np.stack([np.stack([vc, vr], -1), np.stack([vc, vr + 1], -1)], 1)
    horizontal = np.stack([np.stack([hc, hr], -1), np.stack([hc + 1, hr], -1)], 1)
    return np.concatenate([vertical, horizontal]).astype(np.float64).reshape(-1, 2, 2) * tile_px


@dataclass(frozen=True)
class HeatmapStyle:
    cmap: str = "inferno"
    alpha: float = 0.55
    idc_colour: str = "#00e5ff"
    width_in: float = 7.0
    dpi: int = 110


def write_heatmap(path: str | os.PathLike, idc_map: np.ndarray, thumb: Thumbnail, *, tile_px: float,
                  um_per_px: float, threshold: float, title: str, style: HeatmapStyle = HeatmapStyle()) -> Path:
    """Write a PNG of the map over the thumbnail, with colour bar, scale bar and the IDC outline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
    import matplotlib

    rows, cols = idc_map.shape
    aspect = thumb.height / thumb.width if thumb.width else 1.0
    fig = Figure(figsize=(style.width_in, min(max(style.width_in * aspect, 3.0), 10.0)), dpi=style.dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(thumb.image, extent=(0, thumb.width, thumb.height, 0), interpolation="bilinear")
    cmap = matplotlib.colormaps[style.cmap].with_extremes(bad=(0, 0, 0, 0))
    extent = (0, cols * tile_px, rows * tile_px, 0)
    im = ax.imshow(np.ma.masked_invalid(idc_map), cmap=cmap, vmin=0.0, vmax=1.0, alpha=style.alpha,
                   extent=extent, interpolation="nearest")
    idc = np.where(np.isfinite(idc_map), idc_map, 0.0) >= threshold
    ax.add_collection(LineCollection(outline_segments(idc, tile_px), colors=style.idc_colour, linewidths=1.0))
    ax.set_xlim(0, max(thumb.width, cols * tile_px))
    ax.set_ylim(max(thumb.height, rows * tile_px), 0)
    ax.set_axis_off()
    ax.set_title(printable(title), fontsize=9)  # names that are not UTF-8 cannot be drawn as they are
    bar_um = _nice_length(thumb.width * um_per_px)
    ax.add_artist(AnchoredSizeBar(ax.transData, bar_um / um_per_px, _scale_label(bar_um), "lower left",
                                  pad=0.4, frameon=True, size_vertical=max(thumb.height / 150, 1e-9)))
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cbar.set_label(f"P(IDC); outline: p ≥ {threshold:.2f}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", metadata={"Software": None})
    return Path(path)
