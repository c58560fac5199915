"""Tissue detection: Otsu on saturation, cleaning, tile fractions; agreement with synthetic truth and on real H&E."""

from __future__ import annotations

import numpy as np
import pytest

from cancernet_batch.slides import open_slide
from cancernet_batch.synth import slide_model
from cancernet_batch.tiling import TileConfig, plan_slide
from cancernet_batch.tissue import DEFAULT_THRESHOLD, otsu_threshold, tile_fractions, tissue_mask

PINK = (200, 120, 170)
GLASS = (242, 241, 243)


def test_otsu_splits_two_modes():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(0.05, 0.01, 5000), rng.normal(0.4, 0.05, 3000)]).clip(0, 1)
    assert 0.08 < otsu_threshold(v) < 0.3


def _canvas(h=80, w=80):
    img = np.empty((h, w, 3), np.uint8)
    img[:] = GLASS
    return img


def test_glass_only_is_no_tissue():
    rng = np.random.default_rng(1)
    img = np.clip(_canvas().astype(float) + rng.normal(0, 3, (80, 80, 1)), 0, 255).astype(np.uint8)
    assert not tissue_mask(img).any()


def test_small_holes_filled_large_holes_and_specks_and_pen_dropped():
    img = _canvas(120, 120)
    img[10:110, 10:110] = PINK
    img[30:34, 30:34] = GLASS  # 16 px hole (< one 8x8 tile): a lumen, filled
    img[60:90, 60:90] = GLASS  # 900 px hole: real background, kept
    img[2:4, 115:117] = PINK  # 4 px speck (< a quarter tile): dust, dropped
    img[112:118, 20:60] = (20, 20, 30)  # pen mark: too dark to be tissue
    m = tissue_mask(img)
    assert m[30:34, 30:34].all()
    assert not m[62:88, 62:88].any()
    assert not m[2:4, 115:117].any()
    assert not m[113:117, 22:58].any()
    assert m[15:25, 15:100].all()


def test_tile_fractions():
    m = np.zeros((16, 24), bool)
    m[:8, :8] = True
    m[8:, 8:12] = True
    f = tile_fractions(m, 2, 3, px_per_tile=8)
    assert f.shape == (2, 3)
    assert f[0, 0] == 1.0 and f[1, 1] == 0.5 and f[0, 1] == 0.0


def test_agrees_with_synthetic_truth(mpp_slides):
    """The kept tiles (tissue >= the default threshold) match the truth's tissue tiles at every source resolution."""
    agree, total = 0, 0
    for spec in mpp_slides:
        _, truth_fraction, _ = slide_model(spec)
        plan = plan_slide(spec.path, TileConfig())
        kept = np.zeros(plan.grid_shape, bool)
        kept[plan.coords[:, 0], plan.coords[:, 1]] = True
        truth = truth_fraction >= DEFAULT_THRESHOLD
        assert plan.grid_shape == truth.shape
        assert truth.any() and (~truth).any()
        assert (kept == truth).mean() >= 0.98, spec.path.name
        # a tile the detector and the truth disagree on is one on the cut: a specimen edge crossing it
        assert (np.abs(truth_fraction[kept != truth] - DEFAULT_THRESHOLD) < 0.1).all(), spec.path.name
        assert np.abs(plan.tissue - truth_fraction).mean() < 0.03  # fractions, not only the cut
        agree += int((kept == truth).sum())
        total += truth.size
    assert agree / total >= 0.99


def test_real_he_slides(slides_dir):
    cmu = plan_slide(slides_dir / "cmu-1-small-region.svs", TileConfig())
    # CMU-1 small region: a strip of tissue down the middle, glass on the left but for one thin
    # pink strand reaching into row 2 (tissue, too little of the tile to keep it)
    assert cmu.grid_shape == (7, 5)
    assert (np.delete(cmu.tissue[:, 0], 2) < 0.1).all() and cmu.tissue[2, 0] < DEFAULT_THRESHOLD
    assert (cmu.tissue[5:, 2] > 0.9).all()
    assert 0.2 < cmu.tissue_fraction < 0.5
    tcga = plan_slide(slides_dir / "tcga-cr-7395-01a-01-ts1.svs", TileConfig(mpp_override=0.25))
    assert tcga.tissue_fraction > 0.6  # mostly tissue
    assert (tcga.tissue[1:3, 1:4] > 0.9).all()


def test_ihc_tissue_found(slides_dir):
    """kidney-48-5.tif (IHC, blue/brown on white): the small piece of tissue is found, the rest is glass."""
    with open_slide(slides_dir / "kidney-48-5.tif") as r:
        img = r.read_region(0, 0, 0, *r.dimensions)
    m = tissue_mask(img[::2, ::2])
    assert 0.001 < m.mean() < 0.05
    ys, xs = np.nonzero(m)
    assert 250 < ys.mean() < 320 and 100 < xs.mean() < 220  # the stained fragment on the left


@pytest.mark.parametrize("threshold,expect", [(0.0, "all"), (1.01, None)])
def test_threshold_extremes(mpp_slides, threshold, expect):
    spec = mpp_slides[-1]
    if expect is None:
        with pytest.raises(Exception):
            TileConfig(tissue_threshold=threshold)
        return
    plan = plan_slide(spec.path, TileConfig(tissue_threshold=threshold))
    assert plan.n_tiles == plan.grid_shape[0] * plan.grid_shape[1]


FAT_MEMBRANE = (214, 150, 190)


def _fat(img, y0, y1, x0, x1, cell=3):
    """Fat: white cells framed by thin pink membranes, every ``cell`` px (view of ~75 µm cells)."""
    img[y0:y1, x0:x1] = GLASS
    img[y0:y1:cell, x0:x1] = FAT_MEMBRANE
    img[y0:y1, x0:x1:cell] = FAT_MEMBRANE


def test_fat_inside_the_specimen_is_tissue():
    img = _canvas(120, 120)
    img[10:110, 10:110] = PINK
    _fat(img, 30, 90, 30, 90)  # a big lobule of fat inside stroma
    _fat(img, 100, 118, 100, 118)  # fat at the edge of the specimen too
    m = tissue_mask(img)
    assert m[30:90, 30:90].mean() > 0.97
    assert m[100:118, 100:118].mean() > 0.9
    assert not m[:6].any() and not m[:, :6].any()  # the glass around stays glass


def test_grey_tissue_counts_only_inside_a_stained_specimen():
    img = _canvas(120, 120)
    img[10:60, 10:60] = PINK
    img[10:60, 60:90] = (200, 198, 200)  # grey (poorly stained) tissue attached to pink stroma
    img[80:110, 80:110] = (200, 198, 200)  # a grey smudge alone on the glass
    m = tissue_mask(img)
    assert m[12:58, 62:88].all()
    assert not m[80:110, 80:110].any()


def test_dust_pen_and_fold():
    rng = np.random.default_rng(4)
    img = np.clip(_canvas(160, 160).astype(float) + rng.normal(0, 2, (160, 160, 1)), 0, 255).astype(np.uint8)
    img[20:140, 20:100] = PINK
    for y, x in rng.integers(0, 160, (25, 2)):  # dust: dark grey specks (1-2 view px, 25-50 µm) on the glass
        if not (15 < y < 145 and 15 < x < 105):
            img[y:y + 2, x:x + 2] = (90, 90, 95)
    img[30:36, 110:150] = (40, 90, 200)  # blue ink on glass
    img[60:66, 40:150] = (40, 90, 200)  # blue ink across tissue and glass
    img[90:96, 40:150] = (40, 160, 90)  # green ink across tissue and glass
    img[110:120, 20:100] = (120, 30, 90)  # a fold: twice the stain, a dark band across the tissue
    img[125:130, 40:150] = (25, 25, 30)  # black ink
    m = tissue_mask(img)
    assert not m[:, 105:].any()  # no dust, no ink on the glass
    assert not m[60:66, 40:].any() and not m[90:96, 40:].any() and not m[125:130, 40:].any()  # ink on tissue
    assert not m[110:120].any()  # the fold is not tissue
    assert m[20:58, 22:98].all() and m[70:88, 22:98].all() and m[60:66, 22:38].all()  # the tissue around is


# --- the rule's reference implementation, as first written (numpy median, hue over every pixel) ------------

def _reference_od(rgb: np.ndarray, w: np.ndarray) -> np.ndarray:
    od = np.clip(-np.log10((rgb.astype(np.float32) + 1.0) / (w.astype(np.float32) + 1.0)), 0.0, None)
    return od[..., 0] + od[..., 1] + od[..., 2]


def _reference_mask(rgb: np.ndarray, um: float) -> np.ndarray:
    """tissue_mask as it was before the faster glass median, optical density and pen hue: the result must stay
    bit for bit."""
    from scipy import ndimage

    from cancernet_batch import tissue as t

    flat = rgb.reshape(-1, 3).astype(np.float32)
    b = (flat[:, 0] + flat[:, 1] + flat[:, 2]) / np.float32(3)
    w = np.maximum(np.median(flat[b >= np.percentile(b, 99) - t.GLASS_BAND], axis=0), t.GLASS_MIN)
    od = _reference_od(rgb, w)
    sat, val = t.saturation(rgb)
    h = t.hue(rgb)
    pen = ((sat >= t.PEN_SATURATION) & (h >= t.PEN_HUE[0]) & (h < t.PEN_HUE[1])) | (val < t.MIN_VALUE)
    fg = (od > t.FOREGROUND_OD) & ~pen
    fold = t.fold_mask(od, fg)
    fg &= ~fold
    if not fg.any():
        return fg
    r = int(round(t.CLOSE_UM / um))
    mask = ndimage.binary_closing(np.pad(fg, r, mode="edge"), structure=t._disk(r))[r:-r, r:-r] | fg if r >= 1 else fg
    holes, nholes = ndimage.label(~mask)
    if nholes:
        small = np.bincount(holes.ravel()) * um * um < t.MAX_HOLE_UM2
        small[0] = False
        small[np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))] = False
        mask |= small[holes]
    objects, nobj = ndimage.label(mask)
    if nobj:
        sizes = np.bincount(objects.ravel(), minlength=nobj + 1)
        stained = np.bincount(objects.ravel(), weights=(fg & (sat >= t.STAIN_SATURATION)).ravel(), minlength=nobj + 1)
        keep = (sizes * um * um >= t.MIN_OBJECT_UM2) & (stained * um * um >= t.MIN_STAINED_UM2)
        keep[0] = False
        mask = keep[objects]
    return mask & ~pen & ~fold


def _views(mpp_slides, slides_dir):
    """Low-resolution views as tiling makes them (synthetic and real slides), and odd random images."""
    import cancernet_batch.tiling as tiling

    seen = []
    real = tiling.tissue_mask
    tiling.tissue_mask = lambda rgb, **kw: seen.append((rgb, kw["um_per_px"])) or real(rgb, **kw)
    try:
        for path in [s.path for s in mpp_slides] + [slides_dir / "cmu-1-small-region.svs",
                                                    slides_dir / "tcga-cr-7395-01a-01-ts1.svs"]:
            plan_slide(path, TileConfig(mpp_override=0.25 if "tcga" in path.name else None))
    finally:
        tiling.tissue_mask = real
    rng = np.random.default_rng(5)
    for shape in [(1, 1), (2, 3), (31, 17), (120, 90)]:  # odd and even pixel counts for the glass median
        seen.append((rng.integers(0, 256, (*shape, 3), dtype=np.uint8), 25.0))
        seen.append((np.clip(rng.normal(200, 40, (*shape, 3)), 0, 255).astype(np.uint8), 12.5))
    return seen


def test_faster_glass_median_od_and_pen_hue_are_bit_identical(mpp_slides, slides_dir):
    from cancernet_batch import tissue as t

    views = _views(mpp_slides, slides_dir)
    assert len(views) >= 13
    for rgb, um in views:
        flat = rgb.reshape(-1, 3).astype(np.float32)
        glass = t.glass_colour(rgb)
        b = (flat[:, 0] + flat[:, 1] + flat[:, 2]) / np.float32(3)
        ref = np.maximum(np.median(flat[b >= np.percentile(b, 99) - t.GLASS_BAND], axis=0), t.GLASS_MIN)
        assert glass.dtype == ref.dtype and np.array_equal(glass, ref)
        od = t.optical_density(rgb, glass)
        assert od.dtype == np.float32 and np.array_equal(od, _reference_od(rgb, glass))
        sat, val = t.saturation(rgb)
        h = t.hue(rgb)
        ref_pen = ((sat >= t.PEN_SATURATION) & (h >= t.PEN_HUE[0]) & (h < t.PEN_HUE[1])) | (val < t.MIN_VALUE)
        assert np.array_equal(t.pen_mask(rgb), ref_pen)
        assert np.array_equal(tissue_mask(rgb, um_per_px=um), _reference_mask(rgb, um))
    # the 99th percentile from the histogram of channel sums: where its two neighbours in sorted order share a
    # level (glass) and where they do not (numpy interpolates), at the edges of the band and of small counts
    rng = np.random.default_rng(8)
    paths = set()
    for n in [1, 2, 3, 99, 100, 101, 250, 1000, 3001]:
        for share in [0.0, 0.5, 0.985, 0.995, 1.0]:
            v = rng.integers(0, 256, (n, 3), dtype=np.uint8)
            v[: int(n * share)] = 236 + rng.integers(0, 2, (int(n * share), 3), dtype=np.uint8)
            flat = v.astype(np.float32)
            b = (flat[:, 0] + flat[:, 1] + flat[:, 2]) / np.float32(3)
            counts = np.bincount(v.astype(np.uint16).sum(axis=1), minlength=766)
            k = int(np.floor((n - 1) * 0.99))
            paths.add(np.sort(b)[k] == np.sort(b)[min(k + 1, n - 1)])
            p = t._percentile99(counts)
            assert p.dtype == np.float32 and p == np.percentile(b, 99), (n, share)
            ref = np.maximum(np.median(flat[b >= np.percentile(b, 99) - t.GLASS_BAND], axis=0), t.GLASS_MIN)
            assert np.array_equal(t.glass_colour(v[:, None]), ref), (n, share)
    assert paths == {True, False}
    # the median of an even count is the mean of the two middle values, as numpy's
    two = np.array([[[10, 20, 30], [11, 25, 30]]], np.uint8)
    assert np.array_equal(t._median_u8(two.reshape(-1, 3)), np.median(two.reshape(-1, 3).astype(np.float32), axis=0))


def test_closing_by_rows_is_scipys_binary_closing():
    from scipy import ndimage

    from cancernet_batch.tissue import _closing, _disk

    rng = np.random.default_rng(11)
    for r in range(1, 9):
        for _ in range(40):
            h, w = (int(x) for x in rng.integers(1, 60, 2))
            m = rng.random((h, w)) < rng.choice([0.05, 0.3, 0.7, 0.95, 0.99])  # dense masks exercise the erosion
            assert np.array_equal(_closing(m, r), ndimage.binary_closing(m, structure=_disk(r))), (r, h, w)
