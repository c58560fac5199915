"""Generated corrupt inputs, all in one `cancernet tile` call: each is recorded in failures.csv with a
one-line reason naming the file, nothing crashes or hangs, and the good inputs are tiled."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cancernet_batch.runfolder import Run

ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def archive(tmp_path_factory, synth_slide_dir, synth_patch_dir) -> tuple[Path, dict[str, str]]:
    """A folder of good and broken inputs; returns it and {name: what is wrong}."""
    d = tmp_path_factory.mktemp("archive")
    good = sorted(synth_slide_dir.glob("*.svs"))[0]
    shutil.copy(good, d / "good.svs")
    pid = sorted(p.name for p in synth_patch_dir.iterdir() if p.is_dir())[0]
    shutil.copytree(synth_patch_dir / pid, d / "patients" / pid)
    data = good.read_bytes()
    broken = {}
    (d / "zero.svs").write_bytes(b"")
    broken["zero.svs"] = "zero bytes"
    (d / "random.svs").write_bytes(os.urandom(4096))
    broken["random.svs"] = "random bytes"
    (d / "truncated.svs").write_bytes(data[: len(data) // 3])
    broken["truncated.svs"] = "truncated SVS"
    # corrupt tiles: the JPEG streams of the central tiles of every level lose their markers
    import tifffile

    bad = bytearray(data)
    with tifffile.TiffFile(good) as tf:
        for page in tf.pages:
            if not page.is_tiled:
                continue
            ntx = -(-page.imagewidth // page.tilewidth)
            nty = -(-page.imagelength // page.tilelength)
            for ty in range(nty // 3, nty - nty // 3):
                for tx in range(ntx // 3, ntx - ntx // 3):
                    off, n = page.dataoffsets[ty * ntx + tx], page.databytecounts[ty * ntx + tx]
                    bad[off:off + n] = b"\x00" * n
    (d / "corrupt-tile.svs").write_bytes(bytes(bad))
    broken["corrupt-tile.svs"] = "TIFF with corrupt tiles"
    (d / "notes.svs").write_text("this is a text file with a slide extension\n")
    broken["notes.svs"] = "wrong extension"
    (d / "folder.svs").mkdir()
    (d / "folder.svs" / "readme.txt").write_text("a directory named like a slide")
    os.symlink(d / "loop-b.svs", d / "loop-a.svs")
    os.symlink(d / "loop-a.svs", d / "loop-b.svs")
    broken["loop-a.svs"] = "symlink loop"
    # a truncated PNG inside a patient folder: that patch fails, the patient folder still tiles
    png = sorted((d / "patients" / pid).rglob("*.png"))[0]
    png.write_bytes(png.read_bytes()[:40])
    return d, broken


def test_one_tile_call_records_every_broken_input(archive, tmp_path):
    d, broken = archive
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "cancernet_batch.cli", "tile", str(d), "--out", str(run), "--workers", "1",
                        "--preflight-timeout", "30"], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 3, r.stderr[-2000:]  # finished, some inputs failed
    assert "Traceback" not in r.stderr
    rows = list(csv.DictReader(open(run / "failures.csv")))
    by_name = {}
    for row in rows:
        by_name.setdefault(Path(row["input"]).name, []).append(row)
    missing = [name for name in broken if name not in by_name and name != "loop-b.svs"]
    # the symlink loop is one input, whichever of its two names is recorded
    if "loop-a.svs" in missing and "loop-b.svs" in by_name:
        missing.remove("loop-a.svs")
    assert not missing, (missing, list(by_name))
    for name, rs in by_name.items():
        for row in rs:
            assert row["message"] and "\n" not in row["message"], row
            assert row["error_class"] and row["stage"] in ("discover", "preflight", "tile", "read"), row
    # the broken patch is recorded, its patient folder and the good slide are tiled
    assert any(row["input"].endswith(".png") for row in rows)
    from cancernet_batch import store

    tiled = {Path(g.attrs["source"]).name for _, g in store.iter_inputs(Run.of(run).open_store("r"))}
    assert "good.svs" in tiled
    assert any(name.startswith("9") for name in tiled)  # the synthetic patient folder
    assert "folder.svs" not in by_name or by_name["folder.svs"][0]["message"]
