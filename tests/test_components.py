"""components.label: scipy.ndimage.label's result (default structure, the cross), label for label, without scipy."""

import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from cancernet_batch.components import label


def _same_as_scipy(mask: np.ndarray) -> None:
    got, n = label(mask)
    ref, nref = ndimage.label(mask)
    assert got.dtype == np.int32 and got.shape == mask.shape and got.flags.c_contiguous
    assert n == nref
    np.testing.assert_array_equal(got, ref)  # the same numbers: raster order of each component's first pixel


def test_random_masks_are_labelled_as_scipy_labels_them():
    rng = np.random.default_rng(11)
    for i in range(1500):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        mask = rng.random((h, w)) < rng.uniform(0.0, 1.0)
        if i % 3 == 0 and h > 2 and w > 2:  # blobs with holes, as tissue masks are
            mask = ndimage.binary_closing(mask)
        _same_as_scipy(mask)


@pytest.mark.parametrize("mask", [
    np.zeros((5, 7), bool), np.ones((5, 7), bool), np.ones((1, 9), bool), np.ones((9, 1), bool),
    np.eye(6, dtype=bool),                                      # diagonal neighbours are not joined
    np.indices((8, 8)).sum(axis=0) % 2 == 0,                    # a checkerboard: 32 single pixels
    np.array([[1, 0, 1], [1, 0, 1], [1, 1, 1]], bool),          # a U: joined by its last row only
    np.array([[1, 1, 1], [0, 0, 1], [1, 1, 1], [1, 0, 0], [1, 1, 1]], bool),  # a snake
    np.zeros((0, 4), bool), np.zeros((3, 0), bool),
], ids=["empty", "full", "row", "column", "diagonal", "checkerboard", "u", "snake", "no rows", "no columns"])
def test_edge_cases(mask):
    _same_as_scipy(mask)


def test_a_spiral_is_one_component():
    """A long path that turns back on itself, where joining runs row by row needs many merges."""
    s = np.zeros((201, 201), bool)
    x0 = y0 = 0
    x1 = y1 = 200
    while x0 <= x1 and y0 <= y1:
        s[y0, x0:x1 + 1] = s[y0:y1 + 1, x1] = s[y1, x0:x1 + 1] = True
        s[y0 + 2:y1 + 1, x0] = True
        if y0 + 2 <= y1:
            s[y0 + 2, x0:x1 - 1] = True
        x0, y0, x1, y1 = x0 + 2, y0 + 2, x1 - 2, y1 - 2
    _same_as_scipy(s)
    assert label(s)[1] == 1


def test_a_non_2d_mask_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        label(np.zeros((2, 2, 2), bool))


def test_the_workers_stack_and_a_slides_plan_do_not_import_scipy_ndimage(tmp_path):
    """The local workers' fork server imports its preload before the first worker starts, on the way to every
    command's first tile: scipy.ndimage (with scipy.special) was about 0.1 s of it, for its ``label`` alone."""
    from cancernet_batch.synth import SlideSpec, write_slide

    slide = tmp_path / "s.svs"
    write_slide(SlideSpec(path=slide, width=4096, height=3072, mpp=0.5, seed=5, detail_mpp=2.0))
    code = f"""
import sys
from cancernet_batch.cluster import FORKSERVER_PRELOAD, import_preload
import_preload(FORKSERVER_PRELOAD[:-1])
from cancernet_batch.config import TileConfig
from cancernet_batch.tiling import plan_slide
plan = plan_slide({str(slide)!r}, TileConfig(target_mpp=4.0))
from cancernet_batch.regions import find_regions
find_regions(plan.grid_shape, plan.coords, [0.9] * len(plan.coords), 0.5, tile_area_mm2=0.04)
assert len(plan.coords) > 0, "no tissue"
print(sorted(m for m in sys.modules if m.startswith(("scipy.ndimage", "scipy.special"))))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"
