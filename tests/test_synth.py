"""Synthetic patches and slides: layout, names, coordinates, resolution and truth that match the pixels."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
from PIL import Image

from cancernet_batch import PATCH_SIZE
from cancernet_batch.cli import main
from cancernet_batch.synth import TILE_UM, SlideSpec, SlideTruth, TissueModel, write_slide

NAME = re.compile(r"^(\d+)_idx5_x(\d+)_y(\d+)_class([01])\.png$")


def test_patches_layout_names_and_coordinates(synth_patch_dir):
    pids = sorted(p.name for p in synth_patch_dir.iterdir() if p.is_dir())
    assert len(pids) == 4
    rows = list(csv.DictReader(open(synth_patch_dir / "MANIFEST.csv")))
    assert len(rows) == 4 * 60
    for pid in pids:
        files = list((synth_patch_dir / pid).glob("*/*.png"))
        assert len(files) == 60
        for f in files:
            m = NAME.match(f.name)
            assert m, f.name
            assert m[1] == pid and m[4] == f.parent.name
            x, y = int(m[2]), int(m[3])
            assert (x - 1) % PATCH_SIZE == 0 and (y - 1) % PATCH_SIZE == 0  # 1-based, like Kaggle
            with Image.open(f) as im:
                assert im.size == (50, 50) and im.mode == "RGB"
    # both classes present overall, neither dominates completely
    labels = np.array([int(r["label"]) for r in rows])
    assert 0.15 < labels.mean() < 0.75


def test_patches_cut_from_one_coherent_image(synth_patch_dir):
    """Neighbouring patches continue each other: the edge columns of horizontal neighbours match better
    than unrelated patches do."""
    pid = sorted(p.name for p in synth_patch_dir.iterdir() if p.is_dir())[0]
    tiles = {}
    for f in (synth_patch_dir / pid).glob("*/*.png"):
        m = NAME.match(f.name)
        tiles[(int(m[3]) // 50, int(m[2]) // 50)] = np.asarray(Image.open(f), np.float32)
    pairs = [(k, (k[0], k[1] + 1)) for k in tiles if (k[0], k[1] + 1) in tiles]
    assert len(pairs) >= 5
    near = np.mean([np.abs(tiles[a][:, -1] - tiles[b][:, 0]).mean() for a, b in pairs])
    keys = list(tiles)
    far = np.mean([np.abs(tiles[keys[i]][:, -1] - tiles[keys[-1 - i]][:, 0]).mean() for i in range(len(pairs))])
    assert near < far


def test_idc_patches_darker_like_real_data(synth_patch_dir):
    """As in the real set (README pixel check), IDC patches are darker than benign ones."""
    means = {0: [], 1: []}
    for f in synth_patch_dir.glob("*/*/*.png"):
        means[int(f.parent.name)].append(np.asarray(Image.open(f), np.float32).mean())
    assert np.mean(means[1]) < np.mean(means[0]) - 5


def test_patches_deterministic(tmp_path):
    from cancernet_batch.synth import synth_patches

    synth_patches(tmp_path / "a", patients=1, per_patient=10, seed=9)
    synth_patches(tmp_path / "b", patients=1, per_patient=10, seed=9)
    fa = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    fb = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert fa == fb
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in fa)


@pytest.mark.parametrize("fmt,vendor", [("svs", "aperio"), ("tiff", "generic-tiff")])
@pytest.mark.parametrize("mpp", [0.25, 0.5, 1.0])
def test_slides_open_in_openslide_with_mpp(tmp_path, fmt, vendor, mpp):
    import openslide

    path = tmp_path / f"s.{fmt}"
    truth = write_slide(SlideSpec(path=path, width=2048, height=1536, mpp=mpp, seed=11, format=fmt))
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == vendor
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-4)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(mpp, rel=1e-4)
        assert s.dimensions == (2048, 1536)
        assert s.level_count == 2 and s.level_downsamples[1] == pytest.approx(4.0)
        region = np.asarray(s.read_region((0, 0), 1, (512, 384)).convert("RGB"))
    assert region.std() > 5  # real content, not a blank image
    rows, cols = int(1536 * mpp // TILE_UM), int(2048 * mpp // TILE_UM)
    assert truth.tissue_fraction.shape == (rows, cols)


def test_slide_truth_lines_up_with_pixels(tmp_path):
    """Tiles that the truth calls background are near-white in the slide, tissue tiles are not, and IDC
    tiles are darker than benign tissue; read through OpenSlide at the model grid."""
    import openslide

    mpp = 1.0
    path = tmp_path / "t.svs"
    truth = write_slide(SlideSpec(path=path, width=4096, height=4096, mpp=mpp, seed=21, idc_fraction=0.35))
    step = int(round(TILE_UM / mpp))  # 200 level-0 px per model tile
    with openslide.OpenSlide(str(path)) as s:
        lvl = s.get_best_level_for_downsample(4.0)
        ds = s.level_downsamples[lvl]
        img = np.asarray(s.read_region((0, 0), lvl, s.level_dimensions[lvl]).convert("RGB"), np.float32)
    side = int(step / ds)
    rows, cols = truth.tissue.shape
    means = img[: rows * side, : cols * side].reshape(rows, side, cols, side, 3).mean(axis=(1, 3, 4))
    bg = truth.tissue_fraction == 0
    tissue = truth.tissue_fraction >= 0.9
    idc = tissue & (truth.idc_fraction >= 0.9)
    benign = tissue & (truth.idc_fraction <= 0.1)
    assert bg.sum() > 5 and idc.sum() > 3 and benign.sum() > 5
    assert means[bg].min() > 220
    assert means[tissue].max() < 215
    assert means[idc].mean() < means[benign].mean() - 10


def test_truth_saved_and_loaded(synth_slide_dir):
    files = sorted(synth_slide_dir.glob("*.truth.npz"))
    assert len(files) == 2
    t = SlideTruth.load(files[0])
    assert t.mpp == 4.0 and t.tile == 50 and t.tissue.any() and t.idc.any()
    rows = list(csv.DictReader(open(synth_slide_dir / "slides.csv")))
    assert int(rows[0]["tissue_tiles"]) == int(t.tissue.sum())


@pytest.mark.parametrize("vignette", [False, True])
def test_specimen_edge_is_sharp(vignette):
    """A specimen's stain goes from none to full within about EDGE_UM of its edge, everywhere (a cut
    section), also where the vignette flattens the tissue field: no wide rim of faint stain that a
    tissue detector would rightly count as tissue and the truth (weight > 0.5) would not."""
    from cancernet_batch.synth import EDGE_UM

    step = 2.0
    m = TissueModel.random(33, 2000, 2000, vignette=vignette)
    X, Y = np.meshgrid(np.arange(0, 2000, step), np.arange(0, 2000, step))
    t = m.tissue_weight(X, Y)
    inside = t > 0.5
    assert 0.1 < inside.mean() < 0.9
    edge_um = (np.count_nonzero(inside[1:] != inside[:-1]) + np.count_nonzero(inside[:, 1:] != inside[:, :-1])) * step
    ramp_um2 = np.count_nonzero((t > 0.02) & (t < 0.98)) * step * step
    # mean width of the ramp across the edge (crossings counted along rows and columns overstate the
    # edge length by up to 4/pi, so this is a lower bound within that factor): about EDGE_UM
    assert ramp_um2 / edge_um < 1.5 * EDGE_UM


def test_render_is_resolution_consistent():
    """The same patch of tissue drawn at 1 µm/px and area-averaged to 4 µm/px matches a 4 µm/px render."""
    m = TissueModel.random(3, 4000, 4000)
    fine = m.render(0, 0, 800, 800, 1.0).astype(np.float32).reshape(200, 4, 200, 4, 3).mean(axis=(1, 3))
    coarse = m.render(0, 0, 200, 200, 4.0).astype(np.float32)
    assert np.abs(fine - coarse).mean() < 12


def test_cli_synth_commands(tmp_path, capsys):
    assert main(["synth", "patches", str(tmp_path / "p"), "--patients", "2", "--per-patient", "5"]) == 0
    assert len(list((tmp_path / "p").rglob("*.png"))) == 10
    assert main(["synth", "slides", str(tmp_path / "s"), "--count", "1", "--size", "1024", "--format", "tiff"]) == 0
    assert len(list((tmp_path / "s").glob("*.tiff"))) == 1
    assert "tissue tiles" in capsys.readouterr().out


@pytest.mark.slow
def test_big_slide_memory_is_bounded(tmp_path):
    """Writing is band by band: peak memory for an 8k x 8k slide stays below its raw size (192 MB).

    Drawn in the fast mode (``detail_mpp``, as ``bench`` and the 12k tiling test draw theirs): the same
    band-by-band writer at less than half the drawing time, and the higher peak of the two modes
    (about 110 MB against 80 MB measured, 2026-12-02)."""
    import subprocess
    import sys

    code = ("import resource, sys; from pathlib import Path; from cancernet_batch.synth import SlideSpec, write_slide; "
            f"write_slide(SlideSpec(path=Path(r'{tmp_path / 'big.svs'}'), width=8192, height=8192, mpp=2.0, seed=1, detail_mpp=4.0)); "
            # VmHWM is this program's own peak; ru_maxrss would also carry the peak of the (large) pytest
            # process it was forked from, since Linux keeps it across exec
            "import re; print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024)")
    peak_mb = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])
    assert peak_mb < 160, peak_mb  # raw level 0 alone is 192 MB


def _small_patient(idc_dir, tmp_path):
    """Patient 9175's patches (34, both classes) plus one edge patch cut to 30x40 px at the far corner."""
    import shutil

    src = idc_dir / "9175"
    dst = tmp_path / "9175"
    shutil.copytree(src, dst)
    one = sorted((dst / "1").iterdir())[0]
    img = np.asarray(Image.open(one).convert("RGB"))[:40, :30]
    Image.fromarray(img).save(dst / "1" / "9175_idx5_x2001_y801_class1.png")  # row 16, col 40: a new corner
    return dst


@pytest.mark.parametrize("fmt,mpp", [("tiff", 1.0), ("svs", 0.5)])
def test_slide_from_patches_rebuilds_a_real_patient(idc_dir, tmp_path, fmt, mpp):
    """Every patch lands at its name position; read back at the patches' 4.0 µm/px the slide gives
    the patch pixels again (JPEG aside); glass is white-ish with slight noise; MPP and truth are right."""
    import openslide

    from cancernet_batch.patches import scan
    from cancernet_batch.slides import open_slide
    from cancernet_batch.synth import slide_from_patches
    from cancernet_batch.tiling import TileConfig, plan_slide, read_tiles

    pdir = _small_patient(idc_dir, tmp_path)
    path = tmp_path / f"9175.{fmt}"
    truth, mosaic = slide_from_patches(pdir, path, mpp=mpp, fmt=fmt)
    records, _ = scan(pdir)
    assert mosaic.small == 1
    rows, cols = max(r.row for r in records) + 2, max(r.col for r in records) + 2
    assert truth.tissue.shape == (rows, cols) == (18, 42)
    assert int(truth.tissue.sum()) == len(records) == 35
    assert int(truth.idc.sum()) == sum(r.label for r in records) == 11
    with openslide.OpenSlide(str(path)) as s:
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-3)
        assert s.dimensions == (round(cols * 50 * 4.0 / mpp), round(rows * 50 * 4.0 / mpp))
        assert s.level_count >= 2
    plan = plan_slide(path, TileConfig())
    assert plan.grid_shape == truth.tissue.shape
    coords = np.array([(r.row, r.col) for r in records if r.row < 16 or r.col < 40], np.int32)
    with open_slide(path) as reader:
        tiles = read_tiles(reader, plan.level, plan.tile_px_level, coords)
    for (r, c), t in zip(coords, tiles):
        patch = mosaic.image[r * 50:(r + 1) * 50, c * 50:(c + 1) * 50].astype(float)
        assert np.abs(t.astype(float) - patch).mean() < 6, (r, c)
    glass = mosaic.image[mosaic.glass]
    assert (glass.min(axis=-1) > 225).all()
    with open_slide(path) as reader:  # glass on the slide: white-ish, slightly noisy
        g = reader.read_region(0, 0, 0, 200, 200).astype(float)
    assert g.min() > 200 and 0.5 < g.std() < 6


def test_cli_synth_slides_from_patches(idc_dir, tmp_path, capsys):
    out = tmp_path / "slides"
    assert main(["synth", "slides", str(out), "--from-patches", str(idc_dir / "9259"), "--mpp", "1.0",
                 "--format", "tiff"]) == 0
    assert "4 patches" in capsys.readouterr().out
    truth = SlideTruth.load(out / "9259.truth.npz")
    assert truth.mpp == 4.0 and int(truth.tissue.sum()) == 4 and not truth.idc.any()
    with open(out / "slides.csv") as fh:
        [row] = list(csv.DictReader(fh))
    assert row["patient"] == "9259" and row["patches"] == "4"
    assert main(["synth", "slides", str(out), "--from-patches", str(tmp_path)]) != 0  # no patient folder there


@pytest.mark.parametrize("scale", [3.2, 14.0, 900.0])
def test_value_noise_is_the_corner_hash_interpolation_bit_for_bit(scale):
    """The lattice shortcuts of synth._value_noise (a row by a column: interpolated along x once per lattice row;
    scattered points: each lattice point hashed once) give the very values of hashing every point's four corners."""
    from cancernet_batch.synth import _hash01, _value_noise

    def reference(x, y):  # every point's four corners hashed, then the bilinear smoothstep interpolation
        fx, fy = x / scale, y / scale
        ix, iy = np.floor(fx), np.floor(fy)
        tx, ty = fx - ix, fy - iy
        tx, ty = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)
        a, b = _hash01(ix, iy, 7), _hash01(ix + 1, iy, 7)
        c, d = _hash01(ix, iy + 1, 7), _hash01(ix + 1, iy + 1, 7)
        return (a + (b - a) * tx) + ((c + (d - c) * tx) - (a + (b - a) * tx)) * ty

    rng = np.random.default_rng(3)
    px = ((-37 + np.arange(301) + 0.5) * 0.7)[None, :]
    py = ((1000 + np.arange(203) + 0.5) * 0.7)[:, None]
    X, Y = np.broadcast_arrays(px, py)
    scattered = rng.uniform(-500, 5000, (2, 999))
    for x, y in ((px, py), (X, Y), (scattered[0], scattered[1]), (scattered[0][:1], scattered[1][:1])):
        got, want = _value_noise(x, y, scale, 7), reference(x, y)
        assert got.shape == want.shape and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("detail_mpp", [None, 2.0])
def test_level_pixels_are_the_levels_own_drawing(tmp_path, detail_mpp):
    """``LevelPixels`` gives any region of a level exactly as ``write_slide`` drew it before compression
    (band parts with their own noise, pixel repetition in the fast mode, glass beyond the image), and the
    written file decodes to it up to its JPEG loss."""
    import tifffile

    from cancernet_batch.synth import LevelPixels, _tile_iter, slide_model

    spec = SlideSpec(path=tmp_path / "s.svs", width=2900, height=2100, mpp=0.5, seed=5, detail_mpp=detail_mpp)
    model = slide_model(spec)[0]
    for ds in (1, 4):
        lp = LevelPixels(spec, 0.5 * ds, model)
        assert (lp.width, lp.height) == (2900 // ds, 2100 // ds)
        tiles = list(_tile_iter(model, lp.width, lp.height, 0.5 * ds, 256, detail_mpp=detail_mpp))
        ntx = -(-lp.width // 256)
        drawn = np.concatenate([np.concatenate(tiles[i:i + ntx], axis=1) for i in range(0, len(tiles), ntx)])
        np.testing.assert_array_equal(lp.region(0, 0, lp.width, lp.height), drawn[:lp.height, :lp.width])
        x, y = (1000, 300) if ds == 1 else (117, 201)  # across band parts (1,024 columns) and tile rows
        np.testing.assert_array_equal(lp.region(x, y, 300, 250), drawn[y:y + 250, x:x + 300])
    with pytest.raises(ValueError, match="outside"):
        lp.region(lp.width - 10, 0, 20, 20)
    write_slide(spec)
    with tifffile.TiffFile(spec.path) as tif:
        level1 = tif.pages[2].asarray()  # Aperio order: level 0, thumbnail, level 1
    assert level1.shape[:2] == (2100 // 4, 2900 // 4)
    lp = LevelPixels(spec, 2.0, model)
    src = lp.region(0, 0, lp.width, lp.height).astype(np.int16)
    here = np.abs(level1 - src).mean()
    shifted = np.abs(level1[:, 1:] - src[:, :-1]).mean()  # the same drawing one pixel off
    assert here < 5 and here < 0.75 * shifted, (here, shifted)  # Q90 JPEG of noisy texture: a few grey levels


@pytest.mark.parametrize("subsampling", [(1, 1), (2, 2)])
def test_slide_from_patches_chroma_subsampling(idc_dir, tmp_path, subsampling):
    """Rebuilt slides are 4:4:4 by default; ``subsampling=(2, 2)`` writes 4:2:0 YCbCr JPEG tiles, as scanners do."""
    import tifffile

    from cancernet_batch.synth import slide_from_patches

    kw = {} if subsampling == (1, 1) else {"subsampling": subsampling}
    slide_from_patches(idc_dir / "9259", tmp_path / "9259.svs", mpp=1.0, quality=90, **kw)
    with tifffile.TiffFile(tmp_path / "9259.svs") as tif:
        page = tif.pages[0]
        assert page.compression == 7 and page.photometric == 6  # JPEG, YCbCr
        assert page.subsampling == subsampling
