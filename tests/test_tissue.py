"""Tissue detection: Otsu on saturation, cleaning, tile fractions; agreement with synthetic truth and on real H&E."""

from __future__ import annotations

import numpy as np
import pytest

from cancernet_batch.slides import open_slide
from cancernet_batch.synth import slide_model
from cancernet_batch.tiling import TileConfig, plan_slide
from cancernet_batch.tissue import otsu_threshold, tile_fractions, tissue_mask

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
    """The kept tiles (tissue >= 0.5) match the truth's tissue tiles at every source resolution."""
    agree, total = 0, 0
    for spec in mpp_slides:
        _, truth_fraction, _ = slide_model(spec)
        plan = plan_slide(spec.path, TileConfig())
        kept = np.zeros(plan.grid_shape, bool)
        kept[plan.coords[:, 0], plan.coords[:, 1]] = True
        truth = truth_fraction >= 0.5
        assert plan.grid_shape == truth.shape
        assert truth.any() and (~truth).any()
        assert (kept == truth).mean() >= 0.9, spec.path.name
        assert np.abs(plan.tissue - truth_fraction).mean() < 0.05  # fractions, not only the cut
        agree += int((kept == truth).sum())
        total += truth.size
    assert agree / total >= 0.95


def test_real_he_slides(slides_dir):
    cmu = plan_slide(slides_dir / "cmu-1-small-region.svs", TileConfig())
    # CMU-1 small region: a strip of tissue down the middle, glass on the left
    assert cmu.grid_shape == (7, 5)
    assert (cmu.tissue[:, 0] < 0.1).all()
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
