"""The slide reader contract: one suite, run against every registered reader (as zarr tests every store
with one ``StoreTests``). A new reader is correct when its subclass of :class:`ReaderContract` passes."""

from __future__ import annotations

import numpy as np
import pytest

from cancernet_batch.errors import SlideReadError, UnsupportedFormatError
from cancernet_batch.slides import SlideReader, open_slide, read_scaled, readers
from cancernet_batch.slides.openslide_backend import OpenSlideReader
from cancernet_batch.slides.tifffile_backend import TiffFileReader
from cancernet_batch.synth import SlideSpec, write_slide


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """A synthetic pyramidal TIFF both readers open (4 levels, 0.5 µm/px stated in the file)."""
    path = tmp_path_factory.mktemp("contract") / "s.tiff"
    write_slide(SlideSpec(path=path, width=1536, height=1024, mpp=0.5, seed=9, format="tiff"))
    return path


class ReaderContract:
    """What every slide reader does. Subclasses set ``reader``."""

    reader: type[SlideReader]

    def test_is_registered(self):
        assert self.reader in readers()

    def test_detects_its_file_and_not_others(self, pyramid, tmp_path):
        assert self.reader.detect(pyramid)
        other = tmp_path / "notes.txt"
        other.write_text("not a slide")
        assert not self.reader.detect(other)

    def test_metadata(self, pyramid):
        with self.reader(pyramid) as r:
            assert r.dimensions == (1536, 1024)
            assert r.level_count >= 2 and r.level_downsamples[0] == pytest.approx(1.0)
            assert all(b > a for a, b in zip(r.level_downsamples, r.level_downsamples[1:]))
            assert r.mpp == pytest.approx(0.5, rel=1e-3)
            info = r.info()
            assert info.level_dimensions[0] == (1536, 1024)

    def test_region_reads_are_rgb_uint8_and_consistent(self, pyramid):
        with self.reader(pyramid) as r:
            whole = r.read_region(0, 0, 0, 400, 300)
            part = r.read_region(0, 100, 50, 120, 90)
            assert whole.shape == (300, 400, 3) and whole.dtype == np.uint8
            assert np.array_equal(part, whole[50:140, 100:220])  # a region is the same pixels however it is cut
            outside = r.read_region(0, 1500, 1000, 100, 100)  # past the edge: on white, never garbage
            assert outside.shape == (100, 100, 3)

    def test_scaled_read_matches_a_reference_reader(self, pyramid):
        """Exact area averaging to 4.0 µm/px gives the same tile from every reader (same JPEG data)."""
        with self.reader(pyramid) as r, OpenSlideReader(pyramid) as ref:
            box = (0.0, 0.0, 400.0, 400.0)  # level-0 px of one 50x50 tile at 4.0 µm/px
            a = read_scaled(r, 1, tuple(v / r.level_downsamples[1] for v in box), (50, 50)).astype(int)
            b = read_scaled(ref, 1, tuple(v / ref.level_downsamples[1] for v in box), (50, 50)).astype(int)
            assert np.abs(a - b).mean() < 1.5

    def test_tile_shape_is_the_stored_tiles_and_the_preflight_probe_decodes_one(self, pyramid):
        """``tile_shape`` gives each level's stored tiles (as the TIFF's own tags say); the preflight's probe box
        of a level then lies inside the one tile at its centre (one tile decoded, not parts of four), however
        small the level; a reader that does not know its tiles gets a centred box, as before."""
        import tifffile

        from cancernet_batch.slides.base import probe_box

        with tifffile.TiffFile(pyramid) as tf:
            stored = [(int(lv.keyframe.tilewidth), int(lv.keyframe.tilelength)) for lv in tf.series[0].levels]
        with self.reader(pyramid) as r:
            assert [r.tile_shape(i) for i in range(r.level_count)] == stored
            for level in range(r.level_count):
                (w, h), (tw, th) = r.level_dimensions[level], stored[level]
                x, y, bw, bh = probe_box(r, level, 256)
                assert x % tw == 0 and y % th == 0 and x <= w // 2 < x + tw and y <= h // 2 < y + th
                assert 0 < bw <= min(256, tw, w - x) and 0 < bh <= min(256, th, h - y)
            r.tile_shape = lambda level: None  # a reader that does not say
            w, h = r.level_dimensions[0]
            assert probe_box(r, 0, 256) == ((w - 256) // 2, (h - 256) // 2, 256, 256)

    def test_scanner_thumbnail_is_found_sized_and_decoded(self, pyramid, tmp_path):
        """A generic TIFF has no scanner thumbnail; an Aperio SVS has one: its size without decoding it, and its
        pixels at that size, showing the slide (what a plan may read instead of a level: tiling._overview)."""
        with self.reader(pyramid) as r:
            assert r.scanner_thumbnail_size() is None and r.read_scanner_thumbnail() is None
        svs = tmp_path / "s.svs"
        write_slide(SlideSpec(path=svs, width=1536, height=1024, mpp=0.5, seed=9))
        with self.reader(svs) as r:
            assert r.scanner_thumbnail_size() == (768, 512)
            thumb = r.read_scanner_thumbnail()
            assert thumb.shape == (512, 768, 3) and thumb.dtype == np.uint8
            # the synthetic thumbnail is drawn with its own grain: compared where that averages out, 16 px a side
            from cancernet_batch.slides.base import area_resize

            small = area_resize(thumb, (0.0, 0.0, 768.0, 512.0), (96, 64)).astype(int)
            level = read_scaled(r, 0, (0.0, 0.0, 1536.0, 1024.0), (96, 64)).astype(int)
            assert np.abs(small - level).mean() < 2

    def test_refuses_a_truncated_file_with_a_clear_error(self, pyramid, tmp_path):
        bad = tmp_path / "cut.tiff"
        bad.write_bytes(pyramid.read_bytes()[:600])
        with pytest.raises((UnsupportedFormatError, SlideReadError)) as exc:
            with self.reader(bad) as r:
                r.read_region(0, 0, 0, 256, 256)
        assert str(bad) in str(exc.value) and "\n" not in str(exc.value)

    def test_refuses_a_non_slide(self, tmp_path):
        junk = tmp_path / "junk.tiff"
        junk.write_bytes(b"II*\x00" + b"\x00" * 100)
        with pytest.raises(UnsupportedFormatError) as exc:
            self.reader(junk)
        assert str(junk) in str(exc.value)


class TestOpenSlideReader(ReaderContract):
    reader = OpenSlideReader


class TestTiffFileReader(ReaderContract):
    reader = TiffFileReader


def test_open_slide_tries_readers_in_order(pyramid, slides_dir):
    assert [r.name for r in readers()] == ["openslide", "tifffile"]
    assert open_slide(pyramid).name == "openslide"
    assert open_slide(slides_dir / "kidney-48-5.tif").name == "tifffile"  # a strip TIFF OpenSlide refuses


def test_area_weights_are_the_matrix_scipy_builds_from_triplets():
    """area_weights builds its CSR matrix directly: the same rows, columns, weights and index types as scipy's
    csr_matrix of the (row, column, weight) triplets (its former construction), so resampling is bit for bit."""
    import scipy.sparse as sp

    from cancernet_batch.slides.base import area_resize, area_weights

    def triplets(a0, a1, n, length):
        edges = np.clip(a0 + (a1 - a0) * np.arange(n + 1) / n, 0.0, float(length))
        lo = np.floor(edges[:-1]).astype(np.int64)
        i = lo[:, None] + np.arange(max(int((np.ceil(edges[1:]).astype(np.int64) - lo).max()), 1))[None, :]
        w = (np.clip(np.minimum(i + 1, edges[1:, None]) - np.maximum(i, edges[:-1, None]), 0.0, None)
             / np.maximum(edges[1:] - edges[:-1], 1e-12)[:, None])
        keep = (w > 0) & (i < length)
        j = np.broadcast_to(np.arange(n)[:, None], i.shape)
        return sp.csr_matrix((w[keep].astype(np.float32), (j[keep], i[keep])), shape=(n, length))

    rng = np.random.default_rng(2)
    for _ in range(2000):
        length, n = int(rng.integers(1, 3000)), int(rng.integers(1, 400))
        a0 = float(rng.uniform(-5, length))
        a1 = float(rng.uniform(a0 + 1e-3, length + 5))
        got, ref = area_weights(a0, a1, n, length), triplets(a0, a1, n, length)
        assert got.shape == ref.shape and got.indptr.dtype == ref.indptr.dtype and got.indices.dtype == ref.indices.dtype
        assert np.array_equal(got.indptr, ref.indptr) and np.array_equal(got.indices, ref.indices)
        assert got.data.dtype == ref.data.dtype and np.array_equal(got.data, ref.data)
    src = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    out = area_resize(src, (3.3, 1.7, 120.9, 95.2), (17, 13))
    wy, wx = triplets(1.7, 95.2, 13, 97), triplets(3.3, 120.9, 17, 131)
    ref = np.stack([np.clip(np.rint((wx @ (wy @ src[..., c].astype(np.float32)).T).T), 0, 255) for c in range(3)], -1)
    assert np.array_equal(out, ref.astype(np.uint8))


@pytest.mark.parametrize("pages, cached", [(3, True), (70, False)])
def test_a_tiffs_pages_are_kept_once_parsed_unless_there_are_many(tmp_path, pages, cached):
    """``cache_pages`` keeps a slide's few pages once parsed (each walk of them parsed them all again); a file of more
    than ``CACHED_PAGES`` pages (a stack, or a long damaged chain) is walked as before, its pages not held in memory."""
    import tifffile

    from cancernet_batch.slides.tifffile_backend import CACHED_PAGES, cache_pages

    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as w:
        for i in range(pages):
            w.write(np.full((8, 8, 3), i, np.uint8), photometric="rgb")
    assert (pages > CACHED_PAGES) is not cached
    with tifffile.TiffFile(path) as tif:
        cache_pages(tif)
        first, again = list(tif.pages), list(tif.pages)  # both held: a page parsed again is another object
        assert tif.pages.cache is cached and all(a is b for a, b in zip(first, again)) is cached
        assert [int(p.asarray()[0, 0, 0]) for p in tif.pages] == list(range(pages))  # read the same either way


@pytest.mark.parametrize("name", ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs", "small.svs", "synthetic"])
def test_tifffile_states_the_objective_power_openslide_states(name, slides_dir, tmp_path):
    """A slide read in place on object storage goes through tifffile: its objective power (Aperio's AppMag) is
    recorded as OpenSlide records the same file's (it was None from tifffile: the local and remote runs of one
    slide differed in the input's attributes)."""
    path = tmp_path / "s.svs" if name == "synthetic" else slides_dir / name
    if name == "synthetic":
        write_slide(SlideSpec(path=path, width=1024, height=768, mpp=0.25, seed=3, format="svs"))
    with TiffFileReader(path) as t, OpenSlideReader(path) as o:
        assert t.objective == o.objective
        assert t.info().objective == o.info().objective
    if name != "tcga-cr-7395-01a-01-ts1.svs":  # the TCGA sample states none
        assert o.objective is not None


@pytest.mark.parametrize("shape", [(3, 5), (400, 625), (1022, 1024), (129, 1000), (1000, 129), (700, 701)])
def test_transposed_is_the_transpose_copied_by_blocks(shape):
    from cancernet_batch.slides.base import transposed

    a = np.random.default_rng(1).random(shape, dtype=np.float32)
    t = transposed(a)
    assert t.flags.c_contiguous and np.array_equal(t, a.T)


def test_area_resize_with_blocked_transposes_gives_the_former_products_bit_for_bit():
    """area_resize's column pass multiplies a C-contiguous copy of the rows' transpose made by blocks
    (base.transposed: numpy's strided copy of a large transpose missed the caches at every element): the same sums in the
    same order as the product with the strided transpose it used, so the same tiles bit for bit. Small products take
    the three channels in one product per axis, each pixel's values transposed together: the same sums again."""
    from cancernet_batch.slides.base import area_resize, area_weights

    rng = np.random.default_rng(7)
    for shape, box, size in [((1024, 1024), (0, 0, 1024, 1024), (1022, 1022)), ((1024, 1024), (0.5, 0.25, 1024, 1023.9),
                                                                              (1023, 1020)),
                             ((700, 1024), (3.3, 1.1, 1000.5, 690.2), (498, 345)), ((625, 625), (0, 0, 625, 625), (400, 400)),
                             # model tiles' windows and blocks of them at CMU-1's factor of 8.016, and a thumbnail's
                             # view: small products, the three channels in one (area_resize's other path)
                             ((402, 402), (0.37, 0.81, 401.17, 401.61), (50, 50)),
                             ((803, 803), (0.2, 0.6, 801.8, 802.2), (100, 100)),
                             ((402, 803), (0.9, 0.1, 802.5, 401.0), (100, 50)),
                             ((768, 574), (0, 0, 518.3, 725.6), (40, 56)), ((5, 7), (0.5, 0.5, 6.5, 4.5), (3, 2))]:
        src = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        wy, wx = area_weights(box[1], box[3], size[1], shape[0]), area_weights(box[0], box[2], size[0], shape[1])
        former = np.stack([np.clip(np.rint((wx @ (wy @ src[..., c].astype(np.float32)).T).T), 0, 255)
                           for c in range(3)], axis=-1).astype(np.uint8)
        np.testing.assert_array_equal(area_resize(src, box, size), former)


@pytest.mark.parametrize("shape", [(803, 803), (64, 64), (16, 16), (1, 5000)])
def test_on_white_is_the_rgb_channels_of_opaque_pixels_and_composites_the_others(shape, monkeypatch):
    """A reader's RGBA region becomes RGB: opaque pixels keep their channels (copied by OpenCV from 64 x 64 px, the
    same values as numpy's copy), transparent ones are white and partly transparent ones composited onto white.
    Read-only input (as Pillow's image gives it) and a strided view are taken as they are."""
    from cancernet_batch.slides import base

    rng = np.random.default_rng(sum(shape))
    rgba = rng.integers(0, 256, (*shape, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba.flags.writeable = False
    used = []
    real = base.opencv

    def counted():
        used.append(1)
        return real()

    monkeypatch.setattr(base, "opencv", counted)
    out = base.on_white(rgba)
    assert out.flags.c_contiguous and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgba[..., :3])
    assert bool(used) == (shape[0] * shape[1] >= base.OPENCV_RGB_PX)
    monkeypatch.setattr(base, "opencv", lambda: None)  # without OpenCV: numpy's copy, the same pixels
    np.testing.assert_array_equal(base.on_white(rgba), out)

    part = rgba.copy()
    part[0, 0, 3], part[-1, -1, 3] = 0, 100  # one pixel not scanned, one half transparent
    assert not base._opaque(part) and not base._opaque(part[:, ::-1])  # a strided view is looked at channel-wise
    got = base.on_white(part)
    a = part[..., 3:4].astype(np.uint16)
    want = ((part[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    np.testing.assert_array_equal(got, want)
    assert (got[0, 0] == 255).all()
    edge = rgba.copy()
    edge[shape[0] // 2, shape[1] // 2, 3] = 254  # the smallest step below opaque, in the middle of the words
    assert not base._opaque(edge) and base._opaque(rgba)
