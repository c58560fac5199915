"""Patient patch folders: real Kaggle data and synthetic folders, edge patches, duplicates, bad input."""

from __future__ import annotations

import csv
import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from cancernet_batch import patches
from cancernet_batch.cli import main
from cancernet_batch.errors import EXIT_ERROR, InputError


def test_real_idc_counts_match_manifest(idc_dir):
    ps = patches.load(idc_dir)
    manifest = list(csv.DictReader(open(idc_dir / "MANIFEST.csv")))
    expected = Counter((r["patient"], int(r["label"])) for r in manifest)
    got = ps.counts()
    assert len(got) == 19
    for (pid, lab), n in expected.items():
        assert got[pid].get(lab, 0) == n, (pid, lab)
    assert len(ps) == len(manifest) == 6303
    assert ps.tiles.shape == (6303, 50, 50, 3) and ps.tiles.dtype == np.uint8
    assert ps.padded == 6  # the README's six edge patches
    assert not ps.failures and not ps.duplicates


def test_real_coordinates_are_one_based(idc_dir):
    ps = patches.load(idc_dir / "8863")
    i = ps.paths.index(str(idc_dir / "8863" / "0" / "8863_idx5_x2751_y1551_class0.png"))
    assert tuple(ps.coords[i]) == ((1551 - 1) // 50, (2751 - 1) // 50) == (31, 55)
    # that patch is 41x50: padded with white on the right
    assert (ps.tiles[i][:, 41:] == 255).all() and not (ps.tiles[i][:, :41] == 255).all()
    # a rebuilt map puts every patch at a distinct cell
    m = patches.patient_map(ps.coords, ps.labels.astype(float))
    assert np.isfinite(m).sum() == len(ps)


def test_synthetic_folder_roundtrip(synth_patch_dir):
    ps = patches.load(synth_patch_dir)
    manifest = list(csv.DictReader(open(synth_patch_dir / "MANIFEST.csv")))
    assert len(ps) == len(manifest)
    by_path = {str(synth_patch_dir / r["path"]): r for r in manifest}
    for i in range(0, len(ps), 17):
        r = by_path[ps.paths[i]]
        assert ps.labels[i] == int(r["label"])
        assert tuple(ps.coords[i]) == ((int(r["y"]) - 1) // 50, (int(r["x"]) - 1) // 50)
        assert np.array_equal(ps.tiles[i], np.asarray(Image.open(ps.paths[i])))


def test_single_patient_and_plain_folder(synth_patch_dir, tmp_path):
    pid = sorted(p.name for p in synth_patch_dir.iterdir() if p.is_dir())[0]
    one = patches.load(synth_patch_dir / pid)
    assert set(one.patients) == {pid}
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in list((synth_patch_dir / pid).rglob("*.png"))[:7]:
        shutil.copy(f, plain / f.name.replace("_class0", "").replace("_class1", ""))
    ps = patches.load(plain)
    assert len(ps) == 7 and set(ps.labels.tolist()) == {-1} and set(ps.patients) == {"plain"}
    assert (ps.coords >= 0).all()  # positions still read from _xX_yY


def test_bad_files_recorded_and_rest_loaded(synth_patch_dir, tmp_path):
    pid = sorted(p.name for p in synth_patch_dir.iterdir() if p.is_dir())[0]
    root = tmp_path / "data"
    shutil.copytree(synth_patch_dir / pid, root / pid)
    good = len(list((root / pid).rglob("*.png")))
    (root / pid / "0" / f"{pid}_idx5_x9001_y9001_class0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / pid / "0" / "notes.txt").write_text("hello")
    (root / pid / "1" / f"{pid}_idx5_x9051_y9001_class0.png").write_bytes(b"")  # name says 0, folder says 1
    big = root / pid / "0" / f"{pid}_idx5_x9101_y9001_class0.png"
    Image.new("RGB", (60, 60)).save(big)
    first = sorted((root / pid / "0").glob("*_class0.png"))[0]
    dup = root / pid / "0" / (first.stem + "_copy.png")  # same position, other name -> duplicate
    shutil.copy(first, root / pid / "0" / "zz" )  # a non-image without extension is ignored? -> recorded
    ps = patches.load(root)
    assert len(ps) == good
    reasons = {f.input.rsplit("/", 1)[-1]: f.message for f in ps.failures}
    assert "truncated" in " ".join(reasons.values()) or "cannot read image" in " ".join(reasons.values())
    assert any("not an image" in m for m in reasons.values())
    assert any("name says class0" in m for m in reasons.values())
    assert any("larger than 50x50" in m for m in reasons.values())
    assert all("\n" not in m for m in reasons.values())
    del dup


def test_duplicate_positions_detected(synth_patch_dir, tmp_path):
    pid = sorted(p.name for p in synth_patch_dir.iterdir() if p.is_dir())[0]
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(synth_patch_dir / pid, a / pid)
    shutil.copytree(synth_patch_dir / pid, b / pid)
    ps = patches.load([a, b])
    n = len(list((a / pid).rglob("*.png")))
    assert len(ps) == n and len(ps.duplicates) == n and ps.identical == 0


def test_identical_contents_counted(synth_patch_dir, tmp_path):
    pid = sorted(p.name for p in synth_patch_dir.iterdir() if p.is_dir())[0]
    root = tmp_path / "d"
    shutil.copytree(synth_patch_dir / pid, root / pid)
    src = sorted((root / pid).rglob("*.png"))[0]
    shutil.copy(src, src.parent / f"{pid}_idx5_x99951_y99951_class{src.parent.name}.png")
    assert patches.load(root).identical == 1


@pytest.mark.parametrize("case", ["missing", "empty", "file", "only_text"])
def test_bad_folders_raise_one_line(tmp_path, case):
    p = tmp_path / "x"
    if case == "empty":
        p.mkdir()
    elif case == "file":
        p.write_text("x")
    elif case == "only_text":
        p.mkdir()
        (p / "readme.txt").write_text("x")
    with pytest.raises(InputError) as ei:
        patches.load(p)
    msg = str(ei.value)
    assert str(p) in msg and "\n" not in msg


def test_cli_reports_bad_folder(tmp_path, capsys):
    """`evaluate`-style commands read folders; here the loader's error reaches the CLI as one line."""
    from cancernet_batch.errors import CancerNetError

    try:
        patches.load(tmp_path / "missing")
    except CancerNetError as exc:
        line = exc.one_line()
    assert "no such folder" in line and "\n" not in line
    assert main(["synth", "slides", str(tmp_path / "s"), "--mpp", "0.01"]) == EXIT_ERROR
