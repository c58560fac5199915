"""Slide readers: backend choice on every real file, resolution metadata, region reads, resampling, level choice."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from cancernet_batch.errors import ConfigError, InputError, ResolutionError, SlideReadError, UnsupportedFormatError
from cancernet_batch.slides import SlideInfo, SlideReader, choose_level, detect, open_slide, read_scaled, resolve_mpp
from cancernet_batch.slides.tifffile_backend import TiffFileReader
from cancernet_batch.synth import SlideSpec, write_slide

# file -> (backend, vendor, level-0 size, level count, mpp) as ../shared/data/README.md describes them
READABLE = {
    "cmu-1-small-region.svs": ("openslide", "aperio", (2220, 2967), 1, 0.499),
    "tcga-cr-7395-01a-01-ts1.svs": ("openslide", "aperio", (4443, 3567), 2, None),
    "kidney-48-5.tif": ("tifffile", "tiff", (1493, 901), 1, None),
    "small.svs": ("openslide", "aperio", (16, 16), 1, 0.499),
    "boxes.tiff": ("openslide", "generic-tiff", (300, 250), 4, 352.78),
    "boxes_0.dcm": ("openslide", "dicom", (16, 16), 1, 0.499),
    "boxes_1.dcm": ("openslide", "dicom", (16, 16), 1, 0.499),
}


@pytest.mark.parametrize("name", sorted(READABLE))
def test_readable_files_open_with_the_right_backend(slides_dir, name):
    backend, vendor, dims, levels, mpp = READABLE[name]
    assert detect(slides_dir / name) == backend
    with open_slide(slides_dir / name) as r:
        assert r.name == backend and r.vendor == vendor
        assert r.dimensions == dims and r.level_count == levels
        assert r.mpp == (None if mpp is None else pytest.approx(mpp, rel=1e-3))
        w, h = r.level_dimensions[-1]
        region = r.read_region(r.level_count - 1, 0, 0, min(w, 64), min(h, 64))
    assert region.dtype == np.uint8 and region.shape == (min(h, 64), min(w, 64), 3)


def test_real_level_downsamples(slides_dir):
    with open_slide(slides_dir / "tcga-cr-7395-01a-01-ts1.svs") as r:
        assert r.level_dimensions[1] == (2221, 1783)
        assert r.level_downsamples[1] == pytest.approx(2.0005, abs=1e-3)
    with open_slide(slides_dir / "boxes.tiff") as r:
        assert r.level_downsamples == pytest.approx((1, 2, 4.016, 8.086), abs=1e-3)


def test_dicom_files_share_one_series_key(slides_dir):
    with open_slide(slides_dir / "boxes_0.dcm") as a, open_slide(slides_dir / "boxes_1.dcm") as b:
        assert a.series_key and a.series_key.startswith("dicom:") and a.series_key == b.series_key
    with open_slide(slides_dir / "cmu-1-small-region.svs") as c:
        assert c.series_key is None


@pytest.mark.parametrize("name,cls,words", [
    ("broken.svs", UnsupportedFormatError, "not a slide format"),
    ("unopenable.tiff", UnsupportedFormatError, "compression 52479"),
])
def test_unsupported_files_name_the_file(slides_dir, name, cls, words):
    with pytest.raises(cls) as ei:
        open_slide(slides_dir / name)
    msg = str(ei.value)
    assert name in msg and words in msg and "\n" not in msg


def test_unreadable_opens_but_pixels_fail(slides_dir):
    with open_slide(slides_dir / "unreadable.svs") as r:
        assert r.mpp == pytest.approx(0.499)
        with pytest.raises(SlideReadError, match="unreadable.svs.*Bogus marker length"):
            r.read_region(0, 0, 0, 16, 16)


def test_missing_and_folder_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(InputError, match="is a folder"):
        open_slide(tmp_path)


def test_kidney_regions_match_a_full_read(slides_dir):
    full = tifffile.imread(slides_dir / "kidney-48-5.tif")
    with open_slide(slides_dir / "kidney-48-5.tif") as r:
        assert np.array_equal(r.read_region(0, 300, 100, 200, 150), full[100:250, 300:500])
        # beyond the image: white, like bare glass
        edge = r.read_region(0, 1400, 850, 200, 100)
    assert np.array_equal(edge[:51, :93], full[850:, 1400:])
    assert (edge[51:] == 255).all() and (edge[:, 93:] == 255).all()


def test_tifffile_and_openslide_agree_on_a_pyramidal_tiff(tmp_path):
    path = tmp_path / "s.tiff"
    write_slide(SlideSpec(path=path, width=1024, height=1024, mpp=0.5, seed=4, format="tiff"))
    with open_slide(path) as o, TiffFileReader(path) as t:
        assert o.name == "openslide"
        assert t.mpp == pytest.approx(0.5, rel=1e-4) and t.properties["tifffile.mpp-source"] == "tiff-tags"
        assert t.level_dimensions == o.level_dimensions
        assert t.level_downsamples == pytest.approx(o.level_downsamples)
        for level in (0, 1):
            a = o.read_region(level, 30, 40, 100, 80).astype(int)
            b = t.read_region(level, 30, 40, 100, 80).astype(int)
            assert np.abs(a - b).mean() < 1.5  # same JPEG data, two decoders


@pytest.mark.parametrize("unit,res,expected", [
    ("INCH", 25400 / 0.5, 0.5),  # 50,800 dpi = 0.5 µm/px
    ("CENTIMETER", 1e4 / 0.25, 0.25),
    ("NONE", 2.0, None),
])
def test_tiff_resolution_tag_units(tmp_path, unit, res, expected):
    path = tmp_path / f"{unit}.tif"
    tifffile.imwrite(path, np.full((64, 64, 3), 200, np.uint8), photometric="rgb", resolution=(res, res),
                     resolutionunit=unit)
    with TiffFileReader(path) as r:
        assert r.mpp == (None if expected is None else pytest.approx(expected, rel=1e-6))


@pytest.mark.parametrize("size,unit,expected", [(0.5, "µm", 0.5), (250.0, "nm", 0.25)])
def test_ome_physical_size(tmp_path, size, unit, expected):
    path = tmp_path / "x.ome.tif"
    tifffile.imwrite(path, np.full((64, 64, 3), 200, np.uint8), photometric="rgb", ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeXUnit": unit,
                               "PhysicalSizeY": size, "PhysicalSizeYUnit": unit})
    with open_slide(path) as r:
        assert r.name == "tifffile" and r.vendor == "ome-tiff"
        assert r.mpp == pytest.approx(expected)


def test_tifffile_refuses_non_rgb(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((5, 32, 32), np.uint8))  # a stack of 5 planes, not one image
    with pytest.raises(UnsupportedFormatError, match="stack.tif"):
        open_slide(path)


def _info(mpp, mpp_x=None):
    return SlideInfo(path="x.svs", reader="openslide", vendor="aperio", level_dimensions=((100, 100),),
                     level_downsamples=(1.0,), mpp=mpp, mpp_x=mpp_x or mpp, mpp_y=mpp)


def test_resolution_rules():
    assert resolve_mpp(_info(0.25)) == (0.25, "file")
    assert resolve_mpp(_info(0.25), override=0.5) == (0.25, "file")  # a plausible stated value wins
    assert resolve_mpp(_info(None), override=0.5) == (0.5, "override")
    assert resolve_mpp(_info(352.78), override=0.5) == (0.5, "override")
    for mpp in (None, 352.78, 0.01):
        with pytest.raises(ResolutionError, match="--mpp-override") as ei:
            resolve_mpp(_info(mpp))
        assert "x.svs" in str(ei.value)
    with pytest.raises(ConfigError, match="--mpp-override 40"):
        resolve_mpp(_info(None), override=40.0)


@pytest.mark.parametrize("mpp0,downsamples,target,level", [
    (0.25, (1, 4, 16, 64), 4.0, 2),  # 4.0 exactly
    (0.5, (1, 4, 16), 4.0, 1),  # 2.0 µm/px, then area-averaged by 2
    (0.499, (1,), 4.0, 0),
    (1.0, (1, 4.016, 8.086), 4.0, 0),  # 4.016 µm/px would lack detail
    (0.2502, (1, 4, 16), 4.0, 2),  # within the 1e-3 tolerance
    (4.0, (1, 2), 4.0, 0),
])
def test_choose_level(mpp0, downsamples, target, level):
    assert choose_level(mpp0, downsamples, target) == level


def test_choose_level_refuses_a_coarser_slide():
    with pytest.raises(ResolutionError, match="coarser than the model"):
        choose_level(8.0, (1, 4), 4.0)


class ArrayReader(SlideReader):
    """A one-level slide held in memory; counts and bounds its reads."""

    name = "array"

    def __init__(self, image: np.ndarray):
        super().__init__("array")
        self.image = image
        self.level_dimensions = ((image.shape[1], image.shape[0]),)
        self.level_downsamples = (1.0,)
        self.largest = 0

    def _read(self, level, x, y, w, h):
        self.largest = max(self.largest, w, h)
        return self.image[y:y + h, x:x + w].copy()


def _area_mean(img: np.ndarray, box, size) -> np.ndarray:
    """Exact area average by integrating a piecewise-constant image (float reference)."""
    x0, y0, x1, y1 = box
    w, h = size

    def weights(a0, a1, n, length):
        edges = a0 + (a1 - a0) * np.arange(n + 1) / n
        px = np.arange(length)
        lo = np.clip(edges[:-1, None], px, px + 1)
        hi = np.clip(edges[1:, None], px, px + 1)
        wts = hi - lo
        return wts / wts.sum(axis=1, keepdims=True)

    wy = weights(y0, y1, h, img.shape[0])
    wx = weights(x0, x1, w, img.shape[1])
    rows = np.tensordot(wy, img.astype(np.float64), axes=(1, 0))  # (h, W, 3)
    return np.einsum("xj,yjc->yxc", wx, rows)


@pytest.mark.parametrize("box,size", [((0, 0, 400, 400), (50, 50)),  # integer factor 8
                                      ((13.3, 7.9, 413.3, 408.7), (50, 50)),  # scale 0.1247 like CMU-1
                                      ((0, 0, 100, 100), (100, 100))])  # scale 1: a plain copy
def test_read_scaled_is_an_exact_area_average(box, size):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (420, 420, 3)).astype(np.uint8)
    got = read_scaled(ArrayReader(img), 0, box, size).astype(float)
    assert np.abs(got - _area_mean(img, box, size)).max() <= 1.0


def test_read_scaled_in_blocks_bounds_reads_and_matches_one_read():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (1000, 1000, 3)).astype(np.uint8)
    one = read_scaled(ArrayReader(img), 0, (3.5, 1.25, 963.5, 961.25), (120, 120))
    r = ArrayReader(img)
    blocks = read_scaled(r, 0, (3.5, 1.25, 963.5, 961.25), (120, 120), max_read=100)
    assert r.largest <= 100
    assert np.abs(one.astype(int) - blocks.astype(int)).max() <= 1
