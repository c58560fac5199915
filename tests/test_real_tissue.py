"""Real tissue through the slide path (issue 14): three real patients rebuilt as slides at 1.0 µm/px,
tiled and scored like any slide, against the same patients' patch folders (benchmarks/real_tissue.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("real_tissue", REPO / "benchmarks" / "real_tissue.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_real_patients_as_slides_match_their_folders(idc_dir, tiny_model_dir, tmp_path):
    bench = _bench()
    dirs = [idc_dir / p for p in ("8957", "9175", "8863")]  # fatty edges, sparse fragments, both classes
    rows = bench.measure(dirs, tmp_path, tiny_model_dir, 1.0)
    assert [r["patient"] for r in rows] == ["8957", "9175", "8863"]
    for r in rows:
        assert r["kept"] >= 0.95, r
        assert r["extra"] <= 0.10, r
        # the IDC fraction the denominator gives (labels of the kept tiles); a random-weight model's
        # probabilities sit at its threshold, so its IDC fraction is not a test (REAL_TISSUE.md has a trained one's)
        assert abs(r["label_idc_slide"] - r["label_idc_folder"]) <= 0.03, r
        # the slide's tiles are the folder's patches again (a random-weight model's probabilities are too
        # flat to test resampling with; benchmarks/real_tissue.py measures them with a trained model)
        assert r["pixel_mae"] < 3 and r["pixel_corr"] > 0.99, r
        assert r["max_abs_prob_diff"] < 0.01, r
    # 8957 and 9175 have no 16x level, and their 4x level holds over 4 times their thumbnail's pixels, but the
    # thumbnail is only about 2x finer than the tissue view (tiling.THUMBNAIL_FINER): every view is read from a level
    # (with the thumbnail, 9175 lost a tile whose tissue fraction sits at the threshold)
    assert [r["view"] for r in rows] == ["level 1", "level 1", "level 2"], [r["view"] for r in rows]
    both = rows[2]
    assert 0.1 < both["label_idc_folder"] < 0.4  # 8863 has both classes: the denominator matters there
    text = bench.markdown(rows, "pytest", str(tiny_model_dir))
    assert "| 8863 | 1 | 48x57 | 979 |" in text and "cores" in text


@pytest.mark.slow
def test_a_real_patient_as_a_420_slide_through_the_dct(idc_dir, tiny_model_dir, tmp_path):
    """Rebuilt as most scanners write (4:2:0 JPEG, Q90) at 0.5 µm/px, a real patient's tiles come from the 2 µm/px
    level (``--decode fast``, the default, decodes it at full size: a factor of 2 is under the DCT's quarter rule),
    tissue detection keeps its patches, and the tiles are its patches again up to the JPEG's loss."""
    bench = _bench()
    [r] = bench.measure([idc_dir / "9175"], tmp_path, tiny_model_dir, 0.5, subsampling=(2, 2), quality=90)
    assert r["jpeg"] == "Q90 4:2:0" and r["decode_path"] == "direct jpeg", r
    assert (tmp_path / "slides-0.5-420-q90" / "9175.svs").is_file()
    assert r["kept"] >= 0.95 and r["extra"] <= 0.10, r
    assert r["pixel_mae"] < 5 and r["pixel_corr"] > 0.98, r
