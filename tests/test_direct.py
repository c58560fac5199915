"""Tiles decoded straight from compressed TIFF tiles (``slides/direct.py``) against the readers' own pixels.

On the real slides of ``../shared/data/slides`` (Aperio JPEG with shared tables and RGB photometric,
Aperio JPEG 2000, deflate TIFF, a strip TIFF) and a synthetic YCbCr SVS: ``exact`` gives the reader's
tiles bit for bit, ``fast`` stays within 2/255 of them, and whatever the direct path cannot read
falls back to the reader.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cancernet_batch.config import TileConfig
from cancernet_batch.errors import SlideReadError
from cancernet_batch.slides import open_slide
from cancernet_batch.slides.direct import dct_scale
from cancernet_batch.tiling import plan_slide, read_tiles

SLIDES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "slides"


def _tiles(path, decode: str, reader_cls=None, **cfg):
    """The tiles of ``path`` (every grid tile unless ``tissue_filter=True``) decoded with ``decode``, the direct
    level and the plan."""
    with (reader_cls or open_slide)(path) as reader:
        plan = plan_slide(path, TileConfig(**{"tissue_filter": False, **cfg}), reader=reader)
        tiles = read_tiles(reader, plan.level, plan.tile_px_level, plan.coords, decode=decode)
        return tiles, reader.direct_level(plan.level), plan


@pytest.fixture(scope="module")
def synth_svs(tmp_path_factory):
    from cancernet_batch.synth import SlideSpec, write_slide

    spec = SlideSpec(path=tmp_path_factory.mktemp("direct") / "s.svs", width=3000, height=2600, mpp=0.5, seed=41)
    write_slide(spec)
    return spec.path


@pytest.fixture(scope="module")
def real_scan_svs(tmp_path_factory):
    """The real CMU-1-Small-Region's level 0 (a 20x scan, 0.499 µm/px) written again as most scanners write a slide:
    YCbCr 4:2:0 JPEG tiles at Q90, a level 4x coarser (1.996 µm/px) by exact area averaging. Its levels hold a real
    scan's detail at every scale, which synthetic slides and patients rebuilt from patches do not."""
    from cancernet_batch.synth import slide_from_image

    with open_slide(SLIDES / "cmu-1-small-region.svs") as r:
        rgb = r.read_region(0, 0, 0, *r.level_dimensions[0])
    return slide_from_image(rgb, tmp_path_factory.mktemp("scan") / "cmu420.svs", mpp=0.499)


@pytest.mark.parametrize("name, reader, cfg", [
    ("cmu-1-small-region.svs", None, {"target_mpp": 1.0}),  # JPEG, shared tables, photometric RGB; factor 2
    ("cmu-1-small-region.svs", None, {"target_mpp": 4.0}),  # factor 8
    ("tcga-cr-7395-01a-01-ts1.svs", None, {"target_mpp": 0.4, "mpp_override": 0.25}),  # Aperio JPEG 2000, level 0
    # level 1 of that file is 2221 px for 4443 (downsample 2.0005): OpenSlide takes level-0 coordinates and
    # lands up to a pixel off; tifffile reads the level's own pixel grid, as the direct path does
    ("tcga-cr-7395-01a-01-ts1.svs", "tifffile", {"target_mpp": 2.0, "mpp_override": 0.25}),
    ("boxes.tiff", None, {"target_mpp": 1.0, "mpp_override": 0.5}),  # deflate tiles, a 4-level pyramid
])
def test_exact_direct_tiles_are_the_readers_tiles(name, reader, cfg):
    from cancernet_batch.slides.tifffile_backend import TiffFileReader

    ref, _, _ = _tiles(SLIDES / name, "reader", TiffFileReader if reader else None, **cfg)
    got, level, plan = _tiles(SLIDES / name, "exact", **cfg)
    assert level is not None, "the level should be read directly"
    assert len(ref) == plan.n_tiles > 0
    np.testing.assert_array_equal(got, ref)


def test_exact_on_a_synthetic_ycbcr_slide(synth_svs):
    exact, level, plan = _tiles(synth_svs, "exact")  # 4.0 µm/px: level 1 (2 µm/px), factor 2
    reader, _, _ = _tiles(synth_svs, "reader")
    assert plan.level == 1 and not level.rgb
    np.testing.assert_array_equal(exact, reader)


@pytest.mark.parametrize("path, target", [
    (SLIDES / "cmu-1-small-region.svs", 1.0), (SLIDES / "cmu-1-small-region.svs", 2.0),  # factors 2, 4: no DCT
    (SLIDES / "cmu-1-small-region.svs", 4.0),  # factor 8: no DCT (an eighth of the factor is 1)
    (SLIDES / "cmu-1-small-region.svs", 8.0),  # factor 16: 1/2 in the DCT (RGB-coded JPEG)
    ("synth", 4.0),  # YCbCr JPEG, level 1 at 2.0 µm/px, factor 2: no DCT
    ("scan", 1.0), ("scan", 4.0),  # a real scan written as 4:2:0: level 0 and level 1 at a factor of 2, no DCT
])
def test_fast_tissue_tiles_stay_within_2_of_255_of_exact(path, target, synth_svs, real_scan_svs):
    path = {"synth": synth_svs, "scan": real_scan_svs}.get(path, path)
    exact, _, plan = _tiles(path, "exact", tissue_filter=True, target_mpp=target)
    fast, level, _ = _tiles(path, "fast", tissue_filter=True, target_mpp=target)
    scale = dct_scale(plan.tile_px_level / 50)
    diff = np.abs(fast.astype(np.int16) - exact).mean()
    assert len(exact) >= (3 if target == 8.0 else 10) and diff <= 2.0  # CMU-1 at 8 µm/px: 3 tissue tiles
    assert (diff > 0) == (scale > 1)  # identical exactly when the DCT does no scaling


def test_a_scaled_idct_from_a_factor_under_4_is_not_used_for_tiles_of_a_real_scan(real_scan_svs, monkeypatch):
    """Why tiles take at most a quarter of the factor in the DCT: on a real scan's 2 µm/px level read at 4 µm/px
    (factor 2), 1/2 in the DCT gives tissue tiles several grey levels from the exact area averages (about 5/255:
    RESULTS.md section 9, 2026-12-06), where synthetic slides showed 1.5. The rule makes them the exact tiles."""
    from cancernet_batch.slides import direct

    exact, _, _ = _tiles(real_scan_svs, "exact", tissue_filter=True, target_mpp=4.0)
    fast, _, _ = _tiles(real_scan_svs, "fast", tissue_filter=True, target_mpp=4.0)
    np.testing.assert_array_equal(fast, exact)
    monkeypatch.setattr(direct, "dct_scale", lambda factor, **kw: 2)  # 1/2 in the DCT, as the rule was
    half, _, plan = _tiles(real_scan_svs, "fast", tissue_filter=True, target_mpp=4.0)
    assert 1.99 < plan.tile_px_level / 50 < 2.01
    assert np.abs(half.astype(np.int16) - exact).mean() > 3.0


def test_dct_scale_rules():
    factors = (1.0, 1.9, 2.0, 3.9, 4.0, 7.9, 8.0, 16.0, 32.0, 40.0)
    tiles = [1, 1, 1, 1, 1, 1, 1, 2, 4, 4]  # an eighth of the factor
    assert [dct_scale(f) for f in factors] == [dct_scale(f, rgb=True) for f in factors] == tiles
    assert dct_scale(63.9) == 4 and dct_scale(64.0) == 8
    assert [dct_scale(f, view=True) for f in factors] == [1, 1, 2, 2, 2, 2, 4, 8, 8, 8]  # YCbCr view: a half
    assert [dct_scale(f, view=True, rgb=True) for f in factors] == [1, 1, 1, 1, 1, 1, 2, 4, 8, 8]  # RGB view: a quarter


def test_a_strip_tiff_falls_back_to_the_reader():
    path = SLIDES / "kidney-48-5.tif"  # strips, no tiles
    ref, _, _ = _tiles(path, "reader", target_mpp=4.0, mpp_override=1.0)
    got, level, _ = _tiles(path, "fast", target_mpp=4.0, mpp_override=1.0)
    assert level is None
    np.testing.assert_array_equal(got, ref)


def test_a_tile_cut_short_is_a_slide_read_error_naming_the_file(synth_svs, tmp_path):
    """The file is cut inside a tile the plan needs after it was opened (a copy still arriving, a share
    that dropped): one SlideReadError naming the file, not garbage tiles."""
    import tifffile

    cut = tmp_path / "cut.svs"
    shutil.copy(synth_svs, cut)
    with tifffile.TiffFile(cut) as tf:  # level 1 (the one tiled at 4.0 µm/px): cut inside its last tile
        page = next(p for p in tf.pages if p.is_tiled and p.imagewidth == 750)
        end = int(page.dataoffsets[-1] + page.databytecounts[-1] // 2)
    with open_slide(cut) as reader:
        plan = plan_slide(cut, TileConfig(tissue_filter=False), reader=reader)
        reader.direct_level(plan.level)
        with open(cut, "r+b") as fh:
            fh.truncate(end)
        with pytest.raises(SlideReadError) as err:
            read_tiles(reader, plan.level, plan.tile_px_level, plan.coords, decode="fast")
    assert "cut.svs" in str(err.value) and "cut short" in str(err.value)


@pytest.mark.parametrize("path", [SLIDES / "cmu-1-small-region.svs", "synth"])  # RGB-coded, YCbCr JPEG
def test_each_scale_is_libjpeg_turbos_scaled_idct_bit_for_bit(path, synth_svs):
    """Tiles decoded at 1, 1/2, 1/4 and 1/8 of their size are the pixels Pillow's ``draft`` gives from the same
    stream (the same ISLOW scaled IDCT and fancy upsampling of libjpeg-turbo), tables and colour transform
    spliced in as the file declares them."""
    import io

    from PIL import Image

    path = synth_svs if path == "synth" else path
    with open_slide(path) as reader:
        level = reader.direct_level(0)
        idx = [i for i in range(0, len(level.counts), max(1, len(level.counts) // 12)) if level.counts[i]][:12]
        assert level.jpeg and len(idx) >= 6
        for s in (1, 2, 4, 8):
            h, w = -(-level.th // s), -(-level.tw // s)
            for i in idx:
                im = Image.open(io.BytesIO(level._head + level._raw(i)[2:]))  # SOI, Adobe marker if RGB, tables
                im.draft("RGB", (w, h))
                want = np.asarray(im.convert("RGB"))
                got = level._decode(i, s)
                assert got.shape == want.shape == (h, w, 3)
                np.testing.assert_array_equal(got, want)


def test_a_tile_with_damaged_entropy_data_is_an_error_not_a_tile(tmp_path):
    """A JPEG tile whose coded data are damaged in the middle (a bad sector, a bit flip in a copy) still
    parses and a lenient decoder makes a tile of it; here, as in OpenSlide, libjpeg's "Corrupt JPEG data"
    is a SlideReadError naming the file and the tile."""
    import tifffile

    bad = tmp_path / "flip.svs"
    shutil.copy(SLIDES / "cmu-1-small-region.svs", bad)
    with tifffile.TiffFile(bad) as tf:
        off, n = int(tf.pages[0].dataoffsets[0]), int(tf.pages[0].databytecounts[0])
    with open(bad, "r+b") as fh:
        fh.seek(off + n // 2)
        damaged = bytes(b ^ 0x55 for b in fh.read(100))
        fh.seek(off + n // 2)
        fh.write(damaged)
    with pytest.raises(SlideReadError) as err:
        _tiles(bad, "fast", target_mpp=1.0)
    assert "flip.svs" in str(err.value) and "tile (0, 0) of the 2220 x 2967 px level" in str(err.value)
    assert "Corrupt JPEG data" in str(err.value)
    ok, _, _ = _tiles(SLIDES / "cmu-1-small-region.svs", "fast", target_mpp=1.0)  # the file it was copied from
    assert len(ok) > 0


@pytest.mark.parametrize("decode", ["fast", "exact"])
def test_read_tiles_decodes_only_the_compressed_tiles_its_tiles_touch(decode, synth_svs, monkeypatch):
    """A window of tiles reads their bounding box, but of the compressed tiles in it only those some tile touches
    are decoded (``needed``), each once; the tiles are the same as with every tile of the box decoded."""
    from cancernet_batch.slides import direct

    with open_slide(synth_svs) as reader:
        plan = plan_slide(synth_svs, TileConfig(tissue_filter=True), reader=reader)
        level = reader.direct_level(plan.level)
        coords = plan.coords[::3]  # gaps between the tiles: bounding boxes hold tiles no tile touches
        boxes = [(c * plan.tile_px_level, r * plan.tile_px_level, (c + 1) * plan.tile_px_level,
                  (r + 1) * plan.tile_px_level) for r, c in coords]
        (r0, c0), (r1, c1) = coords.min(axis=0), coords.max(axis=0) + 1
        in_box = level._tiles_in([(c0 * plan.tile_px_level, r0 * plan.tile_px_level, c1 * plan.tile_px_level,
                                   r1 * plan.tile_px_level)])
        needed = level.needed(coords, plan.tile_px_level)
        assert np.array_equal(needed, level._tiles_in(boxes)) and len(needed) < len(in_box)
        decoded = []
        real = direct.TiledLevel._decode
        monkeypatch.setattr(direct.TiledLevel, "_decode", lambda self, i, s, **kw: decoded.append(i) or real(self, i, s, **kw))
        level._cache.clear()
        got = read_tiles(reader, plan.level, plan.tile_px_level, coords, decode=decode)
        assert sorted(decoded) == needed.tolist()
        level._cache.clear()
        every = np.stack([level.read_scaled(b, (50, 50), fast=decode == "fast") for b in boxes])
        np.testing.assert_array_equal(got, every)


def test_a_scaled_read_is_cut_into_blocks_by_its_decoded_pixels(synth_svs, monkeypatch):
    """At 1/s in the DCT, ``max_read`` bounds the decoded pixels each block reads, as at full size: a 1,500 px
    level read at 1/2 into 400 px is one block of 750 decoded px (it was four, each at most 512: ``max_read`` was
    counted in the level's pixels); with ``max_read=300`` it is cut into blocks of at most 300 decoded px, and
    both give the same pixels."""
    from cancernet_batch.slides import direct

    with open_slide(synth_svs) as reader:
        level = reader.direct_level(0)
        box = (0.0, 0.0, 1500.0, 1500.0)
        assert level.dct_scale(1500 / 400, True, view=True) == 2  # the plan's view of a YCbCr slide
        reads = []
        real = direct.TiledLevel.region
        monkeypatch.setattr(direct.TiledLevel, "region",
                            lambda self, x, y, w, h, s, only=None, k=1: reads.append((w, h, s))
                            or real(self, x, y, w, h, s, only, k))
        whole = level.read_scaled(box, (400, 400), fast=True, view=True)
        assert reads == [(750, 750, 2)]
        reads.clear()
        blocks = level.read_scaled(box, (400, 400), fast=True, max_read=300, view=True)
        assert len(reads) > 1 and all(w <= 300 and h <= 300 and s == 2 for w, h, s in reads), reads
        np.testing.assert_array_equal(whole, blocks)


def test_tiles_in_is_the_union_of_each_boxs_tile_range(synth_svs):
    """``_tiles_in`` (vectorised) against the plain loop over each box's rows and columns of compressed tiles,
    boxes inside, across and outside the level's edges included."""
    with open_slide(synth_svs) as reader:
        level = reader.direct_level(0)
    rng = np.random.default_rng(7)
    for _ in range(200):
        m = int(rng.integers(0, 25))
        x0, y0 = rng.uniform(-600, level.width + 300, m), rng.uniform(-600, level.height + 300, m)
        boxes = list(zip(x0, y0, x0 + rng.uniform(0, 900, m), y0 + rng.uniform(0, 900, m)))
        want = set()
        for bx0, by0, bx1, by1 in boxes:
            tx0, ty0 = max(0, int(np.floor(bx0)) // level.tw), max(0, int(np.floor(by0)) // level.th)
            tx1 = min(level.ntx - 1, (min(int(np.ceil(bx1)), level.width) - 1) // level.tw)
            ty1 = min(level.nty - 1, (min(int(np.ceil(by1)), level.height) - 1) // level.th)
            want.update(ty * level.ntx + tx for ty in range(ty0, ty1 + 1) for tx in range(tx0, tx1 + 1))
        got = level._tiles_in(boxes)
        assert got.dtype == np.int64 and got.tolist() == sorted(want)


def test_inspect_says_how_each_slide_is_decoded():
    from cancernet_batch.tiling import inspect_inputs

    paths = [SLIDES / "cmu-1-small-region.svs", SLIDES / "kidney-48-5.tif", SLIDES / "tcga-cr-7395-01a-01-ts1.svs"]
    got = {Path(e["source"]).name: e.get("decode_path") for e in inspect_inputs(paths, TileConfig(mpp_override=0.5))}
    assert got == {"cmu-1-small-region.svs": "direct jpeg",  # factor 8: an eighth is 1, no DCT
                   "kidney-48-5.tif": "reader",  # strips
                   "tcga-cr-7395-01a-01-ts1.svs": "direct aperio_jp2000_rgb"}
    exact = inspect_inputs(paths[:1], TileConfig(decode="exact"))[0]
    assert exact["decode_path"] == "direct jpeg" and exact["decode"] == "exact"
    coarse = inspect_inputs(paths[:1], TileConfig(target_mpp=8.0))[0]  # factor 16, RGB-coded: 1/2
    assert coarse["decode_path"] == "direct jpeg, 1/2 in the DCT"


def test_a_plan_parses_each_tiff_page_once(synth_svs, monkeypatch):
    """Planning a slide looks for its scanner thumbnail and its levels' pages, and tifffile's series walk the
    pages too: each page is parsed once (``TiffPages.cache``), not once per walk (each page 3 times before: 0.1-0.7
    CPU ms of a 20,000 px synthetic SVS's plan, RESULTS.md section 9)."""
    import tifffile

    parsed = []
    real = tifffile.TiffPage.__init__
    monkeypatch.setattr(tifffile.TiffPage, "__init__",
                        lambda self, parent, index, **kw: parsed.append(index) or real(self, parent, index, **kw))
    with open_slide(synth_svs) as reader:
        plan = plan_slide(synth_svs, TileConfig(), reader=reader)
        assert reader.direct_level(plan.level) is not None and reader.direct_level(0) is not None
        n = len(reader._direct_source()._tif.pages)
    assert n >= 3 and sorted(parsed) == list(range(n)), parsed


@pytest.mark.parametrize("target", [4.0, 8.0, 2.5])
def test_tiles_averaged_as_they_are_decoded_are_the_windows_averages(synth_svs, target, monkeypatch):
    """Where the factor left after the DCT is an integer k and the read's k x k blocks lie within stored tiles (a
    level exactly 2x or 4x apart), each decoded tile is averaged by blocks before the window is assembled: the same
    tiles bit for bit as averaging the assembled window, for fast and exact, the plan's view included."""
    from cancernet_batch.slides import direct

    taken = []
    real = direct.TiledLevel._box_factor
    monkeypatch.setattr(direct.TiledLevel, "_box_factor", lambda self, *a: taken.append(real(self, *a)) or taken[-1])
    by_tiles = {d: _tiles(synth_svs, d, target_mpp=target) for d in ("fast", "exact")}
    monkeypatch.setattr(direct.TiledLevel, "_box_factor", lambda self, *a: 1)
    for d in ("fast", "exact"):
        tiles, _, plan = _tiles(synth_svs, d, target_mpp=target)
        np.testing.assert_array_equal(by_tiles[d][0], tiles)
        np.testing.assert_array_equal(by_tiles[d][2].thumbnail, plan.thumbnail)
        np.testing.assert_array_equal(by_tiles[d][2].coords, plan.coords)
    # 4 µm/px: level 1 (750 x 650 px) at 2; 8: at 4, but 750 is not whole blocks of 4; 2.5: 1.25, not an integer
    assert (max(taken) > 1) == (target == 4.0), taken


@pytest.mark.parametrize("decode", ["fast", "exact"])
@pytest.mark.parametrize("target", [4.0, 8.0, 2.5, 16.0])
def test_scales_are_how_tiling_decodes_and_averages_each_stored_tile(synth_svs, real_scan_svs, decode, target,
                                                                     monkeypatch):
    """TiledLevel.scales (what bench's tile floor does to each compressed tile) is the (1/s in the DCT, k x k blocks)
    with which read_tiles takes every stored tile, and ``reduced`` those tiles' pixels."""
    from cancernet_batch.slides import direct

    used = []
    real = direct.TiledLevel.tile
    monkeypatch.setattr(direct.TiledLevel, "tile", lambda self, tx, ty, s, k=1: used.append((s, k)) or real(self, tx, ty, s, k))
    for path in (synth_svs, real_scan_svs, SLIDES / "cmu-1-small-region.svs"):
        with open_slide(path) as reader:
            plan = plan_slide(path, TileConfig(target_mpp=target, decode=decode, tissue_filter=False), reader=reader)
            used.clear()  # the plan's view is read its own way (dct_scale's view rule)
            tiles = read_tiles(reader, plan.level, plan.tile_px_level, plan.coords, decode=decode)
            level = reader.direct_level(plan.level)
            assert used and set(used) == {level.scales(plan.tile_px_level, tiles.shape[1], decode == "fast")}, (path, used)
            s, k = used[0]
            np.testing.assert_array_equal(level.reduced(0, s, k), real(level, 0, 0, s, k))
    # e.g. at 4 µm/px the synthetic slide's level 1 (2 µm/px) in 2 x 2 blocks; at 8 and 16 CMU-1's only level (0.499
    # µm/px, factors 16 and 32) at 1/2 and 1/4 in the DCT with fast (an eighth of the factor), then no whole blocks


def test_opencvs_halving_is_pillows_reduce_by_2_bit_for_bit():
    """OpenCV's INTER_AREA at exactly 1/2 (slides/base.halved) gives Pillow's reduce(2) pixel for pixel: blocks whose
    sums take every remainder mod 4 (what rounding half up tells apart) from 0 to 1020, on stored tiles' sizes and on
    random and flat images."""
    from PIL import Image

    from cancernet_batch.slides.base import halved

    rng = np.random.default_rng(2)
    # every 2 x 2 block of the values 0, 15, ..., 255 (sums of each remainder mod 4, extremes included)
    sums = np.stack(np.meshgrid(*[np.arange(0, 256, 15)] * 4, indexing="ij"), -1).reshape(-1, 4).astype(np.uint8)
    blocks = np.repeat(sums[:, [[0, 1], [2, 3]]][..., None], 3, axis=-1)  # (n, 2, 2, 3)
    every = blocks.transpose(1, 0, 2, 3).reshape(2, -1, 3)
    cases = [every, rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), rng.integers(0, 256, (240, 240, 3), dtype=np.uint8),
             rng.integers(0, 256, (2, 512, 3), dtype=np.uint8), np.full((64, 32, 3), 255, np.uint8)]
    for a in cases:
        got = halved(a)
        want = np.asarray(Image.fromarray(a).reduce(2))
        assert got.shape == want.shape and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)


def test_importing_opencv_leaves_the_environment_as_it_was():
    """OpenCV's import prepends its library folder to LD_LIBRARY_PATH; opencv() puts the environment back (a
    worker's serving preflight child is replaced whenever the environment changes), in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import os, sys; e = dict(os.environ); from cancernet_batch.slides.base import opencv; "
            "assert opencv() is not None and 'cv2' in sys.modules; "
            "assert dict(os.environ) == e, {k: os.environ.get(k) for k in set(os.environ) ^ set(e)}")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_tiles_are_the_same_with_or_without_opencv(synth_svs, tmp_path, monkeypatch):
    """A level 2x from the target: each stored tile halved by OpenCV (decoded as RGB), or without it by Pillow
    (decoded as RGBX): the same tiles and plan, bit for bit. On the synthetic slide's level 1 at 4 µm/px, and on real
    tissue: CMU-1's scan (0.499 µm/px; cropped to whole blocks) written again as a 4:2:0 slide, level 0 at 0.998."""
    import cv2

    from cancernet_batch.slides import base
    from cancernet_batch.synth import slide_from_image

    with open_slide(SLIDES / "cmu-1-small-region.svs") as r:
        rgb = r.read_region(0, 0, 0, 2208, 2944)
    real_svs = slide_from_image(rgb, tmp_path / "cmu-crop.svs", mpp=0.499)
    calls = []
    real = cv2.resize
    monkeypatch.setattr(cv2, "resize", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    for path, target in ((synth_svs, 4.0), (real_svs, 0.998)):
        got = {}
        for use in (True, False):
            monkeypatch.setattr(base, "_OPENCV", [cv2 if use else None])
            tiles, _, plan = _tiles(path, "fast", target_mpp=target, tissue_filter=True)
            got[use] = tiles, plan
            assert (len(calls) > 0) == use and all(s[2] == 3 for s in calls)  # RGB tiles, halved by OpenCV
            calls.clear()
        assert len(got[True][0]) > 20
        np.testing.assert_array_equal(got[True][0], got[False][0])
        np.testing.assert_array_equal(got[True][1].coords, got[False][1].coords)


@pytest.mark.parametrize("k", [2, 4])
def test_block_mean_of_an_rgbx_tile_is_area_resizes_block_mean_of_its_rgb(k):
    """A JPEG tile averaged by blocks is decoded as RGBX and wrapped by Pillow without a copy (direct.block_mean): the
    same pixels as area_resize's integer path on its RGB, whatever the fourth byte holds, packed back to RGB."""
    from cancernet_batch.slides.base import area_resize
    from cancernet_batch.slides.direct import block_mean

    rgbx = np.random.default_rng(k).integers(0, 256, (64, 96, 4), dtype=np.uint8)
    rgb = np.ascontiguousarray(rgbx[..., :3])
    want = area_resize(rgb, (0.0, 0.0, 96.0, 64.0), (96 // k, 64 // k))
    got = block_mean(rgbx, k)
    np.testing.assert_array_equal(got, want)
    # packed RGB, not a strided view of RGBX (the region's copies of it are then plain row copies)
    assert got.shape == (64 // k, 96 // k, 3) and got.flags.c_contiguous
    np.testing.assert_array_equal(block_mean(rgb, k), want)


@pytest.mark.parametrize("photometric", ["rgb", "ycbcr"])
def test_jpeg_strips_decode_to_tifffiles_pixels(photometric, synth_svs, tmp_path):
    """A scanner's thumbnail (a stripped JPEG page) decoded strip by strip with libjpeg-turbo gives tifffile's own pixels
    bit for bit: the real scans' thumbnail and macro pages (Aperio: photometric RGB, shared tables, 16 rows a strip), a
    synthetic SVS's thumbnail, and stripped YCbCr JPEG pages with and without chroma subsampling and a short last strip.
    A page it does not read (LZW strips: the CMU-1 label) is refused, for tifffile to decode instead."""
    import os

    import tifffile

    from cancernet_batch.slides.direct import decode_jpeg_strips

    def same(path, page):
        fd = os.open(path, os.O_RDONLY)
        try:
            return np.array_equal(decode_jpeg_strips(page, fd), page.asarray()[..., :3])
        finally:
            os.close(fd)

    if photometric == "rgb":
        checked = 0
        for path in (SLIDES / "cmu-1-small-region.svs", SLIDES / "tcga-cr-7395-01a-01-ts1.svs", synth_svs):
            with tifffile.TiffFile(path) as tif:
                for page in tif.pages:
                    if not page.is_tiled and page.compression == 7:
                        assert same(path, page), (path, page.index)
                        checked += 1
                    elif not page.is_tiled:  # the CMU-1 label: LZW
                        with pytest.raises(ValueError):
                            decode_jpeg_strips(page, 0)
        assert checked == 4  # CMU-1's thumbnail and macro, the TCGA thumbnail, the synthetic thumbnail
        return
    rgb = np.random.default_rng(3).integers(0, 256, (203, 150, 3), np.uint8)
    rgb[:100] = 200  # some flat area as well as noise
    for subsampling in ((1, 1), (2, 2)):
        path = tmp_path / f"strips-{subsampling[0]}.tif"
        tifffile.imwrite(path, rgb, photometric="ycbcr", compression="jpeg", rowsperstrip=16,
                         subsampling=subsampling)
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            assert len(page.dataoffsets) == 13 and int(page.photometric) == 6
            assert same(path, page)


def test_a_jpeg_tiles_whole_stream_decodes_to_the_direct_decoders_pixels(slides_dir):
    """TiledLevel.jpeg_stream (what benchmarks/gpu_decode.py hands a GPU decoder): the tile's bytes with the page's
    shared tables spliced in, which any JPEG decoder decodes to the pixels the direct decoder gives."""
    import simplejpeg

    from cancernet_batch.slides import open_slide

    with open_slide(slides_dir / "cmu-1-small-region.svs") as reader:
        level = reader.direct_level(0)
        assert level.jpeg
        for idx in (0, level.ntx * level.nty - 1):
            stream = level.jpeg_stream(idx)
            assert stream[:2] == b"\xff\xd8" and stream[-2:] == b"\xff\xd9"
            np.testing.assert_array_equal(simplejpeg.decode_jpeg(stream, "RGB"), level._decode(idx, 1))


def test_a_local_source_is_the_readers_direct_source_without_a_reader(tmp_path):
    """``local_source`` (what ``bench``'s roof and floor parse a slide with) reads a TIFF's tiles as the reader's own
    direct source does. None for a file tifffile does not parse; a TIFF cut inside its header has no level to read."""
    from cancernet_batch.slides.direct import local_source

    path = SLIDES / "cmu-1-small-region.svs"
    with open_slide(path) as reader:
        dims = list(reader.level_dimensions)
        level = reader.direct_level(0)
        want = [level.tile(tx, ty, 1) for tx, ty in ((0, 0), (2, 1))]
    src = local_source(str(path), dims)
    try:
        got = src.level(0)
        assert (got.tw, got.th, got.width, got.height) == (level.tw, level.th, level.width, level.height)
        for (tx, ty), w in zip(((0, 0), (2, 1)), want):
            np.testing.assert_array_equal(got.tile(tx, ty, 1), w)
    finally:
        src.close()
    assert local_source(str(SLIDES / "broken.svs"), dims) is None  # base64 text named .svs
    cut = tmp_path / "cut.svs"
    cut.write_bytes(path.read_bytes()[:64])
    src = local_source(str(cut), dims)  # tifffile parses what there is of the header; no page of the level is in it
    try:
        assert src is None or src.level(0) is None
    finally:
        if src is not None:
            src.close()
