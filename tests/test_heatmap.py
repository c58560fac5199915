"""The heatmap's drawing: the blend by table gives the bytes of the per-pixel formula."""

from __future__ import annotations

import numpy as np
import pytest

from cancernet_batch.heatmap import HeatmapStyle, Thumbnail, _blend_table, colour_table, render_heatmap


def _formula(base: np.ndarray, colour: np.ndarray, on: np.ndarray, alpha: float) -> np.ndarray:
    """The blend as it was written per pixel: float32 pixels, a float64 alpha of 0 where no tile is."""
    a = np.where(on, alpha, 0.0)[..., None]
    return np.rint(base.astype(np.float32) * (1.0 - a) + colour.astype(np.float32) * a).astype(np.uint8)


@pytest.mark.parametrize("alpha", [0.55, 0.3, 1.0, 0.0])
def test_blend_table_is_the_per_pixel_formula_for_every_pair_of_bytes(alpha):
    b, c = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    expected = _formula(b[..., None], c[..., None], np.ones(b.shape, bool), alpha)[..., 0]
    assert np.array_equal(_blend_table(alpha), expected)


def test_rendered_map_area_is_the_thumbnail_blended_with_the_colour_map():
    """Tiles of a map over a thumbnail: inside the map area each pixel is the formula's blend (or the outline's
    colour), outside any scored tile the thumbnail itself."""
    rng = np.random.default_rng(3)
    rows, cols, tile_px = 12, 16, 40.0
    idc_map = rng.random((rows, cols)).astype(np.float32)
    idc_map[rng.random((rows, cols)) < 0.3] = np.nan
    style = HeatmapStyle(map_px=cols * 10)  # 10 picture pixels a tile: exact tile boundaries
    image = rng.integers(0, 256, (rows * 10, cols * 10, 3), dtype=np.uint8)
    thumb = Thumbnail(image, cols * tile_px, rows * tile_px, "test")
    pic = np.asarray(render_heatmap(idc_map, thumb, tile_px=tile_px, um_per_px=0.5, threshold=2.0, title="t",
                                    style=style))  # threshold 2: no outline
    pad, head = 8, style.font_px + 12
    area = pic[head:head + rows * 10, pad:pad + cols * 10]
    cell = np.repeat(np.repeat(idc_map, 10, 0), 10, 1)
    on = np.isfinite(cell)
    colour = colour_table(style.cmap)[np.clip(np.rint(np.where(on, cell, 0) * 255), 0, 255).astype(int)]
    expected = _formula(image, colour, on, style.alpha)
    inner = np.ones(on.shape, bool)
    inner[-30:, :180] = False  # the scale bar's box, lower left
    assert np.array_equal(area[inner], expected[inner])
