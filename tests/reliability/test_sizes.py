"""Absurd sizes and values: patch names claiming absurd positions, decompression bombs, non-8-bit images,
and a small TIFF that declares an enormous level 0 with no tiles. Each is one failure row (or a correct
conversion); the other files and inputs go on."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cancernet_batch import patches
from cancernet_batch.errors import InputError
from cancernet_batch.failures import read_failures

ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}


# --------------------------------------------------------------------------------------------
# generated hostile files
# --------------------------------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(path: Path, width: int = 30_000, height: int = 30_000) -> None:
    """A valid-looking PNG of a few hundred bytes that declares ``width x height`` 8-bit grey pixels."""
    rows = zlib.compress(b"\x00" * (width + 1) * 4)  # the first rows; the rest would follow
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + _chunk(b"IDAT", rows) + _chunk(b"IEND", b""))


def sparse_tiff(path: Path, width: int, height: int, tile: int = 1024, mpp: float = 0.25) -> None:
    """A tiled RGB TIFF of a few KB that declares ``width x height`` px with every tile absent (offset 0)."""
    n = -(-width // tile) * -(-height // tile)
    data = bytearray()

    def put(b: bytes) -> int:
        off = 8 + len(data)
        data.extend(b + b"\x00" * (len(b) % 2))
        return off

    bps = put(struct.pack("<3H", 8, 8, 8))
    offs = put(struct.pack(f"<{n}I", *([0] * n)))
    counts = put(struct.pack(f"<{n}I", *([0] * n)))
    res = put(struct.pack("<2I", int(round(1e4 / mpp)), 1))
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, bps), (259, 3, 1, 1), (262, 3, 1, 2),
            (277, 3, 1, 3), (282, 5, 1, res), (283, 5, 1, res), (284, 3, 1, 1), (296, 3, 1, 3),
            (322, 3, 1, tile), (323, 3, 1, tile), (324, 4, n, offs), (325, 4, n, counts)]
    out = bytearray(b"II*\x00" + struct.pack("<I", 8 + len(data))) + data + struct.pack("<H", len(tags))
    for tag, typ, count, value in tags:
        out += (struct.pack("<HHIHH", tag, typ, count, value, 0) if typ == 3 and count == 1
                else struct.pack("<HHII", tag, typ, count, value))
    path.write_bytes(bytes(out + struct.pack("<I", 0)))


def _patient(tmp_path: Path, synth_patch_dir: Path) -> Path:
    pid = sorted(p.name for p in synth_patch_dir.iterdir() if p.is_dir())[0]
    dest = tmp_path / "archive" / pid
    shutil.copytree(synth_patch_dir / pid, dest)
    return dest


def _copy_as(folder: Path, x: int, y: int) -> Path:
    """A copy of one of the folder's class-0 patches renamed to claim position (x, y)."""
    src = sorted((folder / "0").glob("*.png"))[0]
    dest = folder / "0" / f"{folder.name}_idx5_x{x}_y{y}_class0.png"
    shutil.copy(src, dest)
    return dest


# --------------------------------------------------------------------------------------------
# patch names
# --------------------------------------------------------------------------------------------

def test_absurd_positions_are_recorded_and_the_rest_kept(tmp_path, synth_patch_dir):
    folder = _patient(tmp_path, synth_patch_dir)
    n = len(list(folder.rglob("*.png")))
    huge = _copy_as(folder, 999_999_999_951, 51)  # beyond any grid
    far = _copy_as(folder, 51, 1_000_001)  # row 20,000: far outside this patient's few dozen rows
    ps = patches.load(folder)
    assert len(ps) == n
    failed = {Path(f.input): f.message for f in ps.failures}
    assert set(failed) == {huge, far}, failed
    assert "beyond the limit" in failed[huge] and "far outside" in failed[far]
    rows, cols = patches.grid_shape(ps.coords)
    assert rows * cols < 5_000_000  # the map stays the size of the real patches


def test_a_folder_of_only_absurd_positions_is_one_clear_error(tmp_path):
    d = tmp_path / "P9" / "0"
    d.mkdir(parents=True)
    Image.new("RGB", (50, 50), "white").save(d / "P9_idx5_x999999999999_y1_class0.png")
    with pytest.raises(InputError, match="no patch with a plausible position"):
        patches.scan(tmp_path / "P9")


# --------------------------------------------------------------------------------------------
# image sizes and modes
# --------------------------------------------------------------------------------------------

def test_decompression_bomb_is_one_failure(tmp_path, synth_patch_dir):
    folder = _patient(tmp_path, synth_patch_dir)
    n = len(list(folder.rglob("*.png")))
    bomb = folder / "1" / f"{folder.name}_idx5_x3001_y3001_class1.png"  # a position no other patch has
    png_bomb(bomb)
    assert bomb.stat().st_size < 2000
    ps = patches.load(folder)  # the loader of `tile` and of `train`
    assert [Path(f.input) for f in ps.failures] == [bomb]
    assert "more pixels than any patch" in ps.failures[0].message
    assert len(ps) == n
    png_bomb(bomb, 10_000, 10_000)  # under PIL's own bomb limit: refused from its declared size, before decoding
    ps = patches.load(folder)
    assert [Path(f.input) for f in ps.failures] == [bomb]
    assert "10000x10000, larger than 50x50" in ps.failures[0].message


def _load_one(path: Path) -> np.ndarray:
    return patches._read_one(path)[0]


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    a = np.tile(np.linspace(0, 65535, 50).round().astype(np.uint16), (50, 1))
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = _load_one(tmp_path / "g16.png")
    want = np.rint(a / 257.0).astype(np.uint8)
    assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 2], want)
    assert 100 < got.mean() < 155  # a gradient, not a white square


def test_float_and_int_images(tmp_path):
    f = np.tile(np.linspace(0, 1, 50, dtype=np.float32), (50, 1))
    Image.fromarray(f, mode="F").save(tmp_path / "f.tif")
    got = _load_one(tmp_path / "f.tif")
    assert got[0, 0, 0] == 0 and got[0, -1, 0] == 255 and 120 < got.mean() < 135
    Image.fromarray(np.full((50, 50), -3.0, np.float32), mode="F").save(tmp_path / "neg.tif")
    with pytest.raises(InputError, match="negative"):
        _load_one(tmp_path / "neg.tif")
    Image.fromarray(np.full((50, 50), np.nan, np.float32), mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(InputError, match="NaN"):
        _load_one(tmp_path / "nan.tif")


def test_transparency_and_palette_and_cmyk(tmp_path):
    clear = np.zeros((50, 50, 4), np.uint8)  # black, fully transparent
    Image.fromarray(clear, "RGBA").save(tmp_path / "clear.png")
    with pytest.raises(InputError, match="fully transparent"):
        _load_one(tmp_path / "clear.png")
    Image.fromarray(np.zeros((50, 50, 2), np.uint8), "LA").save(tmp_path / "clear-la.png")
    with pytest.raises(InputError, match="fully transparent"):
        _load_one(tmp_path / "clear-la.png")
    half = np.zeros((50, 50, 4), np.uint8)
    half[..., 3] = 255
    half[:25, :, 3] = 0  # top half transparent black: white background, not black
    Image.fromarray(half, "RGBA").save(tmp_path / "half.png")
    got = _load_one(tmp_path / "half.png")
    assert (got[:25] == 255).all() and (got[25:] == 0).all()
    pal = Image.fromarray(np.full((50, 50, 3), (200, 100, 50), np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    pal.save(tmp_path / "pal.png")
    assert (_load_one(tmp_path / "pal.png") == (200, 100, 50)).all()
    Image.new("CMYK", (50, 50), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    red = _load_one(tmp_path / "cmyk.jpg").reshape(-1, 3).mean(axis=0)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


# --------------------------------------------------------------------------------------------
# slides that declare an enormous level 0
# --------------------------------------------------------------------------------------------

def test_sparse_huge_tiff_plan_is_refused_quickly(tmp_path):
    from cancernet_batch.tiling import TileConfig, plan_slide

    big = tmp_path / "big.tif"
    sparse_tiff(big, 100_000, 100_000)
    assert big.stat().st_size < 100_000
    with pytest.raises(InputError, match="planning would decode"):
        plan_slide(big, TileConfig())


def test_grid_cap(synth_slide_dir):
    from cancernet_batch.tiling import TileConfig, plan_slide

    slide = sorted(synth_slide_dir.glob("*.svs"))[0]
    assert plan_slide(slide, TileConfig(target_mpp=4.0)).grid_shape == (10, 10)
    with pytest.raises(InputError, match="more than the limit of 99"):
        plan_slide(slide, TileConfig(target_mpp=4.0, max_grid_tiles=99))


@pytest.mark.slow
def test_one_tile_call_over_absurd_inputs(tmp_path, synth_patch_dir, synth_slide_dir):
    folder = _patient(tmp_path, synth_patch_dir)
    n = len(list(folder.rglob("*.png")))
    archive = folder.parent
    shutil.copy(sorted(synth_slide_dir.glob("*.svs"))[0], archive / "good.svs")
    sparse_tiff(archive / "sparse.tif", 100_000, 100_000)
    far = _copy_as(folder, 51, 1_000_001)
    bomb = folder / "1" / f"{folder.name}_idx5_x3001_y3001_class1.png"
    png_bomb(bomb)
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "cancernet_batch.cli", "tile", str(archive), "--out", str(run),
                        "--workers", "1"], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr[-2000:]
    rows = {Path(f.input).name: f for f in read_failures(run / "failures.csv")}
    assert set(rows) == {far.name, bomb.name, "sparse.tif"}, rows
    assert rows["sparse.tif"].stage == "plan"
    from cancernet_batch import store
    from cancernet_batch.runfolder import Run

    tiled = {Path(g.attrs["source"]).name: g for _, g in store.iter_inputs(Run.of(run).open_store("r"))}
    assert set(tiled) == {"good.svs", folder.name}
    assert int(tiled[folder.name].attrs["n_tiles"]) == n  # every patch but the two bad files
    rows_, cols_ = tiled[folder.name].attrs["grid_shape"]
    assert rows_ * cols_ < 5_000_000


# --------------------------------------------------------------------------------------------
# every per-input step that reads a slide is bounded in time
# --------------------------------------------------------------------------------------------

def _threads_named(prefix: str) -> list:
    import threading

    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def test_bounded_read_hard_guard_gives_up_on_a_call_that_never_returns():
    import threading
    import time

    from cancernet_batch import deadline
    from cancernet_batch.errors import SlideReadError

    release, gave_up = threading.Event(), []
    t0 = time.monotonic()
    with pytest.raises(SlideReadError, match=r"reading tiles 0-8 took longer than 0.3 s") as err:
        deadline.bounded(lambda: release.wait(60), 0.3, path="/x/hung.svs", what="reading tiles 0-8",
                         on_timeout=lambda: gave_up.append(True))
    assert time.monotonic() - t0 < 5
    assert gave_up == [True]
    assert "/x/hung.svs" in str(err.value) and "--read-timeout" in str(err.value)
    release.set()  # the stuck "native call" returns: its thread ends
    for _ in range(100):
        if not _threads_named("bounded reading tiles"):
            break
        time.sleep(0.05)
    assert not _threads_named("bounded reading tiles")
    # a step within its bound returns its value, errors pass through unchanged
    assert deadline.bounded(lambda: 41 + 1, 5, path="p", what="w") == 42
    with pytest.raises(ZeroDivisionError):
        deadline.bounded(lambda: 1 / 0, 5, path="p", what="w")
    deadline.check()  # outside a bounded step: no deadline


def test_plan_of_a_slide_that_reads_for_hours_stops_at_the_bound(tmp_path):
    """The sparse giant with the size guard lifted would read 10^10 px: the time bound stops it, and the
    cooperative check ends its thread too (no CPU left burning behind the failure)."""
    import time

    from cancernet_batch.errors import SlideReadError
    from cancernet_batch.stages.tile import _bounded_read
    from cancernet_batch.tiling import TileConfig, plan_slide

    big = tmp_path / "big.tif"
    sparse_tiff(big, 100_000, 100_000)
    cfg = TileConfig(max_plan_px=1e12, read_timeout=1.5)
    t0 = time.monotonic()
    with pytest.raises(SlideReadError, match="planning the slide took longer than 1.5 s"):
        _bounded_read(lambda: plan_slide(big, cfg), str(big), "planning the slide", cfg)
    assert time.monotonic() - t0 < 10
    for _ in range(200):
        if not _threads_named("bounded planning"):
            break
        time.sleep(0.05)
    assert not _threads_named("bounded planning"), "the planning thread kept reading after the bound"


def test_tile_records_a_slide_whose_plan_is_too_slow_and_tiles_the_rest(tmp_path, synth_slide_dir):
    from cancernet_batch import store
    from cancernet_batch.cluster import ClusterConfig
    from cancernet_batch.runfolder import Run
    from cancernet_batch.stages.tile import tile_run
    from cancernet_batch.tiling import TileConfig

    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copy(sorted(synth_slide_dir.glob("*.svs"))[0], archive / "good.svs")
    sparse_tiff(archive / "slow.tif", 100_000, 100_000)
    run = tmp_path / "run"
    # one thread: the good slide's plan never competes with the slow one for the CPU (or the GIL)
    s = tile_run([archive], run, TileConfig(target_mpp=4.0, max_plan_px=1e12, read_timeout=5),
                 cluster=ClusterConfig(workers=1, threads_per_worker=1, dashboard=False))
    rows = {Path(f.input).name: f for f in read_failures(run / "failures.csv")}
    assert set(rows) == {"slow.tif"}, rows
    assert rows["slow.tif"].stage == "plan" and "took longer than 5 s" in rows["slow.tif"].message
    tiled = {Path(g.attrs["source"]).name for _, g in store.iter_inputs(Run.of(run).open_store("r"))}
    assert tiled == {"good.svs"} and [Path(p).name for p in s.tiled] == ["good.svs"]
