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
