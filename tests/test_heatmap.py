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
    table = _blend_table(alpha)  # [colour, base]; the row after the last colour: no tile, the base itself
    assert table.shape == (257, 256) and np.array_equal(table[:256].T, expected)
    assert np.array_equal(table[256], np.arange(256))


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


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (67, 91), (300, 257)])
def test_png_bytes_decode_to_the_same_pixels(shape, tmp_path):
    """The heatmap's own PNG encoder: a PNG that Pillow reads back (and verifies: chunk CRCs, zlib stream) as the
    very pixels given, for sizes with one row, one column and odd widths, and noise that exercises the Up filter's
    wrap-around."""
    from PIL import Image

    from cancernet_batch.heatmap import png_bytes

    rng = np.random.default_rng(sum(shape))
    rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    rgb[: shape[0] // 2] = 255  # flat rows as well as noise
    for level in (1, 6):
        path = tmp_path / f"p{level}.png"
        path.write_bytes(png_bytes(rgb, level))
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (shape[1], shape[0])
            assert np.array_equal(np.asarray(im), rgb)


def test_written_heatmap_is_the_rendered_picture(tmp_path):
    """write_heatmap's file holds exactly the pixels render_heatmap draws."""
    from PIL import Image

    from cancernet_batch.heatmap import write_heatmap

    rng = np.random.default_rng(5)
    idc_map = rng.random((9, 13)).astype(np.float32)
    idc_map[rng.random((9, 13)) < 0.2] = np.nan
    thumb = Thumbnail(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8), 13 * 40.0, 9 * 40.0, "test")
    kw = dict(tile_px=40.0, um_per_px=0.5, threshold=0.5, title="patient 7 · slide 3")
    out = write_heatmap(tmp_path / "maps" / "h.png", idc_map, thumb, **kw)
    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im), np.asarray(render_heatmap(idc_map, thumb, **kw)))
    assert [p.name for p in (tmp_path / "maps").iterdir()] == ["h.png"]  # no temporary left


@pytest.mark.parametrize("cmap", ["inferno"])
def test_stored_colour_tables_are_matplotlibs(cmap):
    """The colour tables shipped with the package (so a report is drawn without importing matplotlib) are
    matplotlib's own samples; any other map still comes from matplotlib."""
    from cancernet_batch.heatmap import _STORED_TABLES, matplotlib_colour_table

    assert cmap in _STORED_TABLES
    stored = colour_table.__wrapped__(cmap)
    assert stored.shape == (256, 3) and stored.dtype == np.uint8
    assert np.array_equal(stored, matplotlib_colour_table(cmap))
    assert np.array_equal(colour_table.__wrapped__("viridis"), matplotlib_colour_table("viridis"))


def test_a_report_is_drawn_without_importing_matplotlib(tmp_path):
    """The heatmap (its colours and its font) and the viewer script need no matplotlib import: in a run, each
    process that draws a report (the workers, and the client's index) would otherwise pay about 0.2 s of CPU."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from cancernet_batch.heatmap import Thumbnail, write_heatmap\n"
            "from cancernet_batch.report_view import viewer_script\n"
            "t = Thumbnail(np.zeros((20, 30, 3), np.uint8), 300.0, 200.0, 'test')\n"
            f"write_heatmap({str(tmp_path / 'h.png')!r}, np.full((4, 6), 0.7, np.float32), t, tile_px=50.0,\n"
            "              um_per_px=0.5, threshold=0.5, title='µ ≥ ·')\n"
            "assert viewer_script()\n"
            "from cancernet_batch.heatmap import _font\n"
            "assert _font(12).path.endswith('DejaVuSans.ttf')\n"
            "print('matplotlib' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert (tmp_path / "h.png").stat().st_size > 0
