"""Probability pyramids (issue 18): OME-Zarr and OME-TIFF read back with the reference readers, values,
levels and the slide-aligned coordinate transform checked against independent computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from cancernet_batch.atomic import atomic_dir, remove_stale_temps
from cancernet_batch.pyramid import MIN_SIDE, write_pyramids

T, MPP0, THR = 199.6, 0.2505, 0.5  # a non-integer tile side in level-0 pixels


def _map(shape=(600, 270), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.random(shape).astype(np.float32)
    m[rng.random(shape) < 0.3] = np.nan  # background: not scored
    m[:40, :] = np.nan
    return m


def _files(folder):
    return folder / "x.ome.zarr", folder / "x.ome.tif"


def _down_by_hand(p: np.ndarray, mask: np.ndarray):
    h, w = -(-p.shape[0] // 2), -(-p.shape[1] // 2)
    pp, mm = np.full((h, w), np.nan, np.float32), np.zeros((h, w), np.uint8)
    for r in range(h):
        for c in range(w):
            block = p[2 * r:2 * r + 2, 2 * c:2 * c + 2]
            vals = block[~np.isnan(block)]
            if vals.size:
                pp[r, c] = vals.mean()
            mm[r, c] = mask[2 * r:2 * r + 2, 2 * c:2 * c + 2].max()
    return pp, mm


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    prob = _map()
    folder = tmp_path_factory.mktemp("pyr")
    z, t = write_pyramids(folder / "slide-a.ome.zarr", folder / "slide-a.ome.tif", prob, threshold=THR, tile_px=T,
                          mpp0=MPP0, name="slide a", model_id="m1")
    return prob, z, t


def test_ome_zarr_reads_back_with_ome_zarr_and_is_slide_aligned(written):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    prob, z, _ = written
    nodes = list(Reader(parse_url(str(z)))())
    image = nodes[0]
    data = [np.asarray(d) for d in image.data]
    assert [d.shape for d in data] == [(600, 270), (300, 135), (150, 68)]
    assert max(data[-1].shape) <= MIN_SIDE < max(data[-2].shape)
    np.testing.assert_array_equal(data[0], prob)  # NaN where not scored, same places
    mask0 = np.where(np.isnan(prob), 0, prob >= THR).astype(np.uint8)
    p1, m1 = _down_by_hand(prob, mask0)
    np.testing.assert_allclose(data[1], p1, rtol=1e-6)
    assert [a["name"] for a in image.metadata["axes"]] == ["y", "x"]
    assert {a["unit"] for a in image.metadata["axes"]} == {"micrometer"}
    # slide alignment: the centre of map pixel (r, c) of level k is the centre of the slide pixels it covers
    for k, ct in enumerate(image.metadata["coordinateTransformations"]):
        scale = next(t["scale"] for t in ct if t["type"] == "scale")
        shift = next(t["translation"] for t in ct if t["type"] == "translation")
        f = 2 ** k
        for r in (0, 7, data[k].shape[0] - 1):
            first, last = r * f * T, (r + 1) * f * T - 1  # level-0 slide pixels under this map pixel (centres)
            assert r * scale[0] + shift[0] == pytest.approx((first + last) / 2 * MPP0, rel=1e-9, abs=1e-9)
    labels = [n for n in nodes if "image-label" in (n.zarr.root_attrs or {})]
    assert len(labels) == 1
    lab = [np.asarray(d) for d in labels[0].data]
    np.testing.assert_array_equal(lab[0], mask0)
    np.testing.assert_array_equal(lab[1], m1)
    attrs = json.loads((z / ".zattrs").read_text())
    assert attrs["cancernet"]["model_id"] == "m1" and attrs["cancernet"]["threshold"] == THR
    assert (z / "labels" / "IDC" / ".zattrs").is_file()


def test_ome_tiff_is_pyramidal_with_physical_size(written):
    prob, _, t = written
    with tifffile.TiffFile(t) as tf:
        assert tf.is_ome
        s = tf.series[0]
        assert s.axes == "CYX"
        assert [lv.shape for lv in s.levels] == [(2, 600, 270), (2, 300, 135), (2, 150, 68)]
        level0 = s.levels[0].asarray()
        ome = tf.ome_metadata
    np.testing.assert_array_equal(level0[0], prob)
    expected_mask = np.where(np.isnan(prob), np.nan, (prob >= THR).astype(np.float32))
    np.testing.assert_array_equal(level0[1], expected_mask)
    import xml.etree.ElementTree as ET

    ns = {"ome": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}
    pixels = ET.fromstring(ome).find("ome:Image/ome:Pixels", ns)
    for axis in "XY":
        assert float(pixels.get(f"PhysicalSize{axis}")) == pytest.approx(T * MPP0)
        assert pixels.get(f"PhysicalSize{axis}Unit") == "µm"
    assert [c.get("Name") for c in pixels.findall("ome:Channel", ns)] == ["IDC probability", "IDC mask"]


def test_pyramid_rewrite_replaces_whole_and_a_failed_write_keeps_the_old(tmp_path):
    write_pyramids(*_files(tmp_path), _map((30, 20), 1), threshold=THR, tile_px=T, mpp0=MPP0, name="x")
    second = _map((30, 20), 2)
    z, t = write_pyramids(*_files(tmp_path), second, threshold=THR, tile_px=T, mpp0=MPP0, name="x")
    once = t.read_bytes()
    write_pyramids(*_files(tmp_path), second, threshold=THR, tile_px=T, mpp0=MPP0, name="x")
    assert t.read_bytes() == once  # the same map, the same file (the OME-XML UUID comes from the map)
    import zarr

    np.testing.assert_array_equal(np.asarray(zarr.open_group(str(z), mode="r")["0"][:]), second)
    with pytest.raises(RuntimeError):
        with atomic_dir(z) as tmp:
            (tmp / "half").write_text("half written")
            raise RuntimeError("killed mid-write")
    np.testing.assert_array_equal(np.asarray(zarr.open_group(str(z), mode="r")["0"][:]), second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ome.tif", "x.ome.zarr"]
    (tmp_path / ".tmp-x.ome.zarr.abc").mkdir()  # as a SIGKILLed writer leaves it
    assert remove_stale_temps(tmp_path) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["x.ome.tif", "x.ome.zarr"]


def test_bad_geometry_is_refused(tmp_path):
    with pytest.raises(ValueError):
        write_pyramids(*_files(tmp_path), _map((4, 4)), threshold=THR, tile_px=float("nan"), mpp0=MPP0, name="x")


def test_ome_zarr_made_in_memory_has_the_files_zarrs_local_store_writes(tmp_path):
    """The OME-Zarr is built in a zarr MemoryStore and its files written at once: the same file tree, byte for
    byte, as the same group written through zarr's own local store."""
    import zarr

    from cancernet_batch.pyramid import fill_ome_zarr, levels, write_ome_zarr

    lv = levels(_map(), THR)
    assert len(lv) > 1  # levels, chunks of several arrays and the label image all in the comparison
    kw = dict(threshold=THR, tile_px=T, mpp0=MPP0, name="x", model_id="m")
    write_ome_zarr(tmp_path / "memory.ome.zarr", lv, **kw)
    fill_ome_zarr(zarr.open_group(str(tmp_path / "local.ome.zarr"), mode="w", zarr_format=2), lv, **kw)

    def tree(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    memory, local = tree(tmp_path / "memory.ome.zarr"), tree(tmp_path / "local.ome.zarr")
    # the arrays' empty attribute documents are left out (optional in zarr format 2): everything else is zarr's own
    empty = {k for k, v in local.items() if k.endswith("/.zattrs") and json.loads(v) == {}}
    assert len(empty) == 2 * len(lv)  # one an array: each level of the map and of the label image
    assert len(local) > 10 and memory == {k: v for k, v in local.items() if k not in empty}
    # and zarr reads the same groups, attributes and arrays from both
    a, b = (zarr.open_group(str(tmp_path / n), mode="r", zarr_format=2) for n in ("memory.ome.zarr", "local.ome.zarr"))
    for key in ["", "labels", "labels/IDC"]:
        assert dict((a[key] if key else a).attrs) == dict((b[key] if key else b).attrs)
    for key in [str(i) for i in range(len(lv))] + [f"labels/IDC/{i}" for i in range(len(lv))]:
        assert dict(a[key].attrs) == {} and np.array_equal(a[key][:], b[key][:], equal_nan=True)
