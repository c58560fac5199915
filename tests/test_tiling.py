"""Tiling: the real slides folder in one call, the model grid on synthetic slides, patient folders,
resume, failures, inspect, bounded memory."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from cancernet_batch import store
from cancernet_batch.cli import main
from cancernet_batch.errors import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL
from cancernet_batch.synth import slide_model
from cancernet_batch.stages.tile import tile_run
from cancernet_batch.tiling import TileConfig, discover
from cancernet_batch.runfolder import Run
from cancernet_batch.tissue import DEFAULT_THRESHOLD

# What ../shared/data/README.md implies for each broken or unusable file: (stage, error class, words)
EXPECTED_FAILURES = {
    "broken.svs": ("preflight", "UnsupportedFormatError", "not a slide format"),
    "unopenable.tiff": ("preflight", "UnsupportedFormatError", "compression 52479"),
    "unreadable.svs": ("preflight", "SlideReadError", "Bogus marker length"),
    "tcga-cr-7395-01a-01-ts1.svs": ("plan", "ResolutionError", "--mpp-override"),
    "kidney-48-5.tif": ("plan", "ResolutionError", "--mpp-override"),
    "boxes.tiff": ("plan", "ResolutionError", "--mpp-override"),
    "small.svs": ("plan", "InputError", "smaller than one model tile"),
    "boxes_0.dcm": ("plan", "InputError", "smaller than one model tile"),  # the DICOM series, once
}


def _group(run: Path, source) -> zarr.Group:
    root = Run.of(run).open_store("r")
    return root["inputs"][store.input_id(source)]


def _failures(run: Path) -> dict[str, dict]:
    with open(run / "failures.csv", newline="") as fh:
        return {Path(r["input"]).name: r for r in csv.DictReader(fh)}


def test_real_slides_folder_in_one_call(slides_dir, tmp_path, capsys):
    """One `cancernet tile` over the whole folder (default local cluster): CMU-1 tiles, every other file is
    recorded with its reason, and the exit status says some inputs failed."""
    run = tmp_path / "run"
    rc = main(["tile", str(slides_dir), "--out", str(run), "--workers", "2"])
    out = capsys.readouterr().out
    assert rc == EXIT_PARTIAL
    assert "1 inputs tiled" in out and "8 failed" in out
    fails = _failures(run)
    assert set(fails) == set(EXPECTED_FAILURES)  # boxes_1.dcm is part of boxes_0.dcm's series: no row
    for name, (stage, cls, words) in EXPECTED_FAILURES.items():
        row = fails[name]
        assert (row["stage"], row["error_class"]) == (stage, cls), name
        assert name in row["message"] and words in row["message"], row["message"]
    assert "boxes_1.dcm: same DICOM series as" in out
    g = _group(run, slides_dir / "cmu-1-small-region.svs")
    a = dict(g.attrs)
    assert a["complete"] and a["schema_version"] == store.SCHEMA_VERSION
    assert (a["reader"], a["vendor"], a["kind"]) == ("openslide", "aperio", "slide")
    assert a["source_mpp"] == pytest.approx(0.499) and a["target_mpp"] == 4.0
    assert a["level"] == 0 and a["level_downsample"] == 1.0
    assert a["extra"]["scale"] == pytest.approx(0.499 / 4.0) and a["extra"]["mpp_source"] == "file"
    assert a["level0_tile_px"] == pytest.approx(200 / 0.499)
    assert a["grid_shape"] == [7, 5]  # floor(2967 * 0.499 / 200) x floor(2220 * 0.499 / 200)
    assert a["n_tiles"] + a["n_background"] == 35 and 5 <= a["n_tiles"] <= 24  # 21: the strip and its edges at 0.25
    assert a["source_size"] == (slides_dir / "cmu-1-small-region.svs").stat().st_size
    tiles, coords = g["tiles"][:], g["coords"][:]
    assert tiles.shape == (a["n_tiles"], 50, 50, 3) and tiles.dtype == np.uint8
    assert coords.dtype == np.int32 and (coords >= 0).all() and (coords < [7, 5]).all()
    assert len({tuple(c) for c in coords}) == len(coords)
    assert g["tissue"].shape == (7, 5) and g["thumbnail"].shape == (56, 40, 3)
    assert (g["tissue"][:][coords[:, 0], coords[:, 1]] >= DEFAULT_THRESHOLD).all()
    assert tiles.reshape(len(tiles), -1).mean(axis=1).max() < 235  # tissue (>= a quarter of each tile), not glass (~244)


def test_overrides_make_the_unresolved_slides_tile(slides_dir, tmp_path, client):
    run = tmp_path / "run"
    names = ["tcga-cr-7395-01a-01-ts1.svs", "kidney-48-5.tif", "cmu-1-small-region.svs"]
    s = tile_run([slides_dir / n for n in names], run, TileConfig(mpp_override=0.25), client=client)
    assert not s.failures and len(s.tiled) == 3
    tcga = dict(_group(run, slides_dir / names[0]).attrs)
    assert tcga["level"] == 1 and tcga["level_downsample"] == pytest.approx(2.0005, abs=1e-3)
    assert tcga["grid_shape"] == [4, 5] and tcga["extra"]["mpp_source"] == "override"
    assert tcga["patient"] == "TCGA-CR-7395"
    kidney = dict(_group(run, slides_dir / names[1]).attrs)
    assert kidney["reader"] == "tifffile" and kidney["grid_shape"] == [1, 1] and kidney["source_mpp"] == 0.25
    cmu = dict(_group(run, slides_dir / names[2]).attrs)
    assert cmu["source_mpp"] == pytest.approx(0.499) and cmu["extra"]["mpp_source"] == "file"  # its own value wins
    # an implausible stated value is overridden the same way; 2.0 µm/px puts boxes.tiff's level 1 at 4.0
    s = tile_run([slides_dir / "boxes.tiff"], run, TileConfig(mpp_override=2.0), client=client)
    boxes = dict(_group(run, slides_dir / "boxes.tiff").attrs)
    assert boxes["level"] == 1 and boxes["grid_shape"] == [2, 3] and boxes["extra"]["scale"] == pytest.approx(1.0)


def test_synthetic_grid_lines_up_with_truth(mpp_slides, tmp_path, client):
    """Tile (row, col) is the square at (col, row) x 50 px x 4.0 µm/px: stored pixels match the slide's own
    tissue model drawn at 4.0 µm/px there, and the kept tiles are the truth's tissue tiles."""
    run = tmp_path / "run"
    s = tile_run([spec.path for spec in mpp_slides], run, TileConfig(), client=client)
    assert len(s.tiled) == 3 and not s.failures
    for spec in mpp_slides:
        model, truth_fraction, _ = slide_model(spec)
        g = _group(run, spec.path)
        a = dict(g.attrs)
        assert a["grid_shape"] == list(truth_fraction.shape)
        assert a["level0_tile_px"] * spec.mpp == pytest.approx(200.0)
        coords, tiles = g["coords"][:], g["tiles"][:]
        kept = np.zeros(truth_fraction.shape, bool)
        kept[coords[:, 0], coords[:, 1]] = True
        assert (kept == (truth_fraction >= DEFAULT_THRESHOLD)).mean() >= 0.9
        assert a["n_tiles"] == kept.sum() and a["n_background"] == kept.size - kept.sum()
        here, shifted = [], []
        for (r, c), t in list(zip(coords, tiles))[:12]:
            t = t.astype(float)
            here.append(np.abs(t - model.render(int(c) * 50, int(r) * 50, 50, 50, 4.0)).mean())
            shifted.append(np.abs(t - model.render(int(c) * 50 + 4, int(r) * 50 + 4, 50, 50, 4.0)).mean())
        assert np.mean(here) < 8 and np.mean(shifted) > 2 * np.mean(here), (spec.path.name, here, shifted)


def test_no_tissue_filter_keeps_every_tile(mpp_slides, tmp_path, client):
    spec = mpp_slides[-1]
    s = tile_run([spec.path], tmp_path / "run", TileConfig(tissue_filter=False), client=client)
    a = dict(_group(tmp_path / "run", spec.path).attrs)
    assert a["n_tiles"] == 100 and a["n_background"] == 0 and a["tissue_threshold"] is None
    assert s.tiles_written == 100


def test_patient_folders(synth_patch_dir, idc_dir, tmp_path, client):
    from cancernet_batch.patches import load

    run = tmp_path / "run"
    s = tile_run([synth_patch_dir, idc_dir / "8918"], run, TileConfig(chunk=50), client=client)
    assert len(s.tiled) == 5 and not s.failures
    for folder in [*sorted(p for p in synth_patch_dir.iterdir() if p.is_dir()), idc_dir / "8918"]:
        g = _group(run, folder)
        a = dict(g.attrs)
        ps = load(folder)
        assert (a["kind"], a["reader"], a["patient"]) == ("patches", "patches", folder.name)
        assert a["source_mpp"] == a["target_mpp"] == 4.0 and a["extra"]["mpp_source"] == "assumed"
        assert a["n_tiles"] == len(ps) and a["chunk"] == 50
        assert np.array_equal(g["tiles"][:], ps.tiles) and np.array_equal(g["coords"][:], ps.coords)
        assert np.array_equal(g["labels"][:], ps.labels)
        assert store.tiled_mask(g).all()


def test_discover_folders(tmp_path, slides_dir, synth_patch_dir):
    root = tmp_path / "archive"
    (root / "a" / "b").mkdir(parents=True)
    shutil.copy(slides_dir / "small.svs", root / "a" / "b" / "s1.svs")
    shutil.copy(slides_dir / "small.svs", root / "s2.SVS")
    shutil.copytree(synth_patch_dir / "90000", root / "patients" / "90000")
    (root / "old-run" / "tiles.zarr").mkdir(parents=True)
    shutil.copy(slides_dir / "small.svs", root / "old-run" / "tiles.zarr" / "x.svs")
    (root / "notes.txt").write_text("not a slide")
    specs, failures = discover([root, root / "s2.SVS", tmp_path / "missing"])
    assert [(s.path.relative_to(root).as_posix(), s.kind) for s in specs] == [
        ("a/b/s1.svs", "slide"), ("patients/90000", "patches"), ("s2.SVS", "slide")]
    assert len(failures) == 1 and failures[0].stage == "discover" and "missing" in failures[0].message


def test_target_resolution_from_model_json(tmp_path):
    from cancernet_batch.errors import ConfigError
    from cancernet_batch.model import target_mpp

    (tmp_path / "model.json").write_text(json.dumps({"patch_size": 50, "mpp": 2.0, "threshold": 0.4,
                                                      "classes": ["non-IDC", "IDC"]}))
    assert target_mpp(tmp_path, None) == 2.0 and target_mpp(tmp_path, 2.0) == 2.0
    assert target_mpp(None, 8.0) == 8.0 and target_mpp(None, None) == 4.0
    with pytest.raises(ConfigError, match="contradicts the model's 2"):
        target_mpp(tmp_path, 4.0)


def test_view_size_is_bounded():
    from cancernet_batch.tiling import MAX_VIEW_PX, view_px_per_tile

    assert view_px_per_tile(250, 250) == 8  # 100k px at 0.5 µm/px, 4.0 µm/px target
    assert view_px_per_tile(2000, 2000) == 2 and view_px_per_tile(20000, 20000) == 1
    assert view_px_per_tile(1000, 1500) ** 2 * 1000 * 1500 <= MAX_VIEW_PX


@pytest.mark.parametrize("name, mpp, level, thumb", [("cmu-1-small-region.svs", None, 0, "574x768"),
                                                     ("tcga-cr-7395-01a-01-ts1.svs", 0.5, 1, "956x768")])
def test_the_scanner_thumbnail_gives_the_tissue_of_a_level_read_on_real_scans(slides_dir, name, mpp, level, thumb):
    """Real scans with no coarse level (a single-level JPEG SVS, a JPEG 2000 SVS whose smallest level is 2x): the
    overview comes from the scanner's thumbnail, which keeps the tissue tiles of the level read (``exact``)."""
    from cancernet_batch.tiling import plan_slide

    fast = plan_slide(slides_dir / name, TileConfig(mpp_override=mpp))
    exact = plan_slide(slides_dir / name, TileConfig(mpp_override=mpp, decode="exact"))
    assert fast.view_source == f"thumbnail {thumb}" and exact.view_source == f"level {level}"
    assert fast.attrs().extra["view_source"] == fast.view_source and fast.summary()["view_source"] == fast.view_source
    # the tiles themselves still come from the level the resolution chose, on the same grid
    assert (fast.level, fast.grid_shape, fast.view_px) == (exact.level, exact.grid_shape, exact.view_px)
    assert np.abs(fast.thumbnail.astype(float) - exact.thumbnail).mean() < 2  # /255
    assert np.abs(fast.tissue - exact.tissue).mean() < 0.01
    differ = set(map(tuple, fast.coords.tolist())) ^ set(map(tuple, exact.coords.tolist()))
    assert exact.n_tiles >= 20 and len(differ) <= max(1, 0.02 * exact.n_tiles), (len(differ), exact.n_tiles)


def test_a_coarse_level_is_read_rather_than_the_thumbnail(synth_slide_dir):
    """A pyramid with a level near the view's resolution is read (exact area averages): the thumbnail would not
    save enough to change what the plan is made from."""
    from cancernet_batch.slides import open_slide
    from cancernet_batch.tiling import plan_slide

    slide = sorted(synth_slide_dir.glob("*.svs"))[0]
    with open_slide(slide) as reader:
        assert reader.scanner_thumbnail_size() is not None  # the synthetic SVS has one, as Aperio writes it
        plan = plan_slide(slide, TileConfig(target_mpp=4.0), reader=reader)
    assert plan.view_source == f"level {len(plan.levels) - 1}", plan.view_source


def test_a_damaged_thumbnail_falls_back_to_the_level(slides_dir, tmp_path):
    """A thumbnail that does not decode says nothing of the slide: the plan reads the level instead."""
    import tifffile

    from cancernet_batch.tiling import plan_slide

    src = slides_dir / "cmu-1-small-region.svs"
    copy = tmp_path / "cmu-1-bad-thumbnail.svs"
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[1]
        assert "2220x2967 -> 574x768" in page.description
        for off, n in zip(page.dataoffsets, page.databytecounts):
            data[off:off + n] = b"\x00" * n
    copy.write_bytes(bytes(data))
    plan = plan_slide(copy, TileConfig())
    good = plan_slide(src, TileConfig(decode="exact"))
    assert plan.view_source == "level 0" and np.array_equal(plan.coords, good.coords)


def _chunk_files(g) -> dict[str, float]:
    path = Path(g.store.root) / g.path / "tiles"
    return {str(p): p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}


def test_rerun_skips_and_interrupted_run_finishes_missing_chunks(mpp_slides, tmp_path, client):
    src = tmp_path / "slide.svs"
    shutil.copy(mpp_slides[-1].path, src)
    run = tmp_path / "run"
    cfg = TileConfig(chunk=8)
    first = tile_run([src], run, cfg, client=client)
    g = _group(run, src)
    n = int(g.attrs["n_tiles"])
    nchunks = -(-n // 8)
    assert first.chunks_written == nchunks >= 4
    tiles0, files0 = g["tiles"][:], _chunk_files(g)
    # a finished run: no work at all
    again = tile_run([src], run, cfg, client=client)
    assert again.skipped == [str(src)] and not again.tiled and again.tiles_written == 0
    assert _chunk_files(g) == files0
    # interrupted: not complete, chunks 1 and 3 never written
    g = zarr.open_group(str(Run.of(run).store_path), mode="r+")["inputs"][store.input_id(src)]
    g.attrs["complete"] = False

    def chunk_file(k: int) -> Path:  # chunk k of the tiles, named by the array's own chunk keys
        return Path(g.store.root) / g.path / "tiles" / g["tiles"].metadata.encode_chunk_key((k, 0, 0, 0))

    for k in (1, 3):
        g["tiled"][k] = False
        os.remove(chunk_file(k))
    resumed = tile_run([src], run, cfg, client=client)
    assert resumed.resumed == [str(src)] and resumed.chunks_written == 2 and resumed.chunks_kept == nchunks - 2
    assert resumed.tiles_written == 16
    g = _group(run, src)
    assert g.attrs["complete"] and np.array_equal(g["tiles"][:], tiles0)
    untouched = {k: v for k, v in _chunk_files(g).items() if k not in {str(chunk_file(1)), str(chunk_file(3))}}
    assert len([k for k in untouched if "/tiles/c." in k]) == nchunks - 2
    assert untouched == {k: v for k, v in files0.items() if k in untouched}
    # a changed source is tiled again
    os.utime(src, (1_000_000_000, 1_000_000_000))
    redo = tile_run([src], run, cfg, client=client)
    assert redo.tiled == [str(src)] and redo.chunks_written == nchunks and not redo.resumed


@pytest.mark.parametrize("decode, says", [("fast", "tile (0, 0) of the 2048 x 2048 px level cannot be decoded "
                                                  "(Corrupt JPEG data: "), ("reader", "Not a JPEG file")])
def test_corrupt_region_fails_at_tile_stage_and_the_rest_goes_on(mpp_slides, tmp_path, client, decode, says):
    """A slide whose preflight and plan pass but one level-0 tile does not decode: that input fails at the
    tile stage (not complete, not a crash), the other input of the run is tiled; the same through the
    direct decoder (``fast``) and through OpenSlide (``reader``)."""
    import tifffile

    bad = tmp_path / "bad.svs"
    shutil.copy(mpp_slides[-1].path, bad)
    with tifffile.TiffFile(bad) as tf:
        offset = tf.pages[0].dataoffsets[0]  # level 0, top-left JPEG tile: neither probed nor in the view
    with open(bad, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * 64)
    run = tmp_path / "run"
    cfg = TileConfig(target_mpp=2.0, tissue_filter=False, decode=decode)  # 2.0 µm/px: tiles come from level 0
    s = tile_run([bad, mpp_slides[-1].path], run, cfg, client=client)
    assert s.tiled == [str(mpp_slides[-1].path)]
    assert [(f.input, f.stage, f.error_class) for f in s.failures] == [(str(bad), "tile", "SlideReadError")]
    assert "bad.svs" in s.failures[0].message and says in s.failures[0].message
    assert not _group(run, bad).attrs["complete"]
    assert _failures(run)["bad.svs"]["stage"] == "tile"


def test_worker_death_is_a_reader_crash():
    from distributed.scheduler import KilledWorker

    from cancernet_batch.errors import SlideReadError
    from cancernet_batch.stages.tile import _worker_error

    err = _worker_error("/data/x.svs", KilledWorker("tile_chunk_task-1", None, 3))
    assert isinstance(err, SlideReadError) and "crashed" in str(err) and "/data/x.svs" in str(err)


def test_retry_drops_old_failure_rows(slides_dir, tmp_path, client):
    run = tmp_path / "run"
    src = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    s = tile_run([src], run, TileConfig(), client=client)
    assert [f.error_class for f in s.failures] == ["ResolutionError"]
    assert "tcga-cr-7395-01a-01-ts1.svs" in _failures(run)
    s = tile_run([src], run, TileConfig(mpp_override=0.25), client=client)
    assert s.tiled == [str(src)] and _failures(run) == {}


def test_paths_are_reported_as_given_through_a_symlink(slides_dir, tmp_path, client, monkeypatch):
    """Paths are reported as the user gave them (absolute, links kept); the input's identity is its real
    path, so the same slide through a link and directly is one input (docs/DESIGN.md, Contracts)."""
    link = tmp_path / "archive"
    link.symlink_to(slides_dir, target_is_directory=True)
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    given = ["archive/cmu-1-small-region.svs", "sub/../archive/tcga-cr-7395-01a-01-ts1.svs"]  # relative, with ..
    cmu, tcga = link / "cmu-1-small-region.svs", link / "tcga-cr-7395-01a-01-ts1.svs"
    specs, _ = discover([given[0], slides_dir / "cmu-1-small-region.svs"])
    assert [s.source for s in specs] == [str(cmu)]  # one input, under the path met first
    s = tile_run(given, run, TileConfig(), client=client)
    assert s.tiled == [str(cmu)] and [f.input for f in s.failures] == [str(tcga)]
    assert _failures(run)[tcga.name]["input"] == str(tcga)
    assert _group(run, cmu).attrs["source"] == str(cmu)
    assert store.input_id(cmu) == store.input_id(slides_dir / cmu.name)  # identity: the real path
    # ".." after a link is the OS's (the link target's parent), never folded into another file's name
    specs, failures = discover(["archive/../archive/" + cmu.name])
    assert not specs and failures[0].input == str(tmp_path / "archive/../archive" / cmu.name)
    # the same slides through their real paths: the tiled one is skipped, the failed one's retry clears its row
    s = tile_run([slides_dir / cmu.name, slides_dir / tcga.name], run, TileConfig(mpp_override=0.25), client=client)
    assert s.skipped == [str(slides_dir / cmu.name)] and s.tiled == [str(slides_dir / tcga.name)]
    assert _failures(run) == {}
    assert sorted(Run.of(run).open_store("r")["inputs"].group_keys()) == sorted(
        store.input_id(p) for p in (cmu, tcga))


def test_cli_run_through_a_symlinked_patient_folder(synth_patch_dir, tiny_model_dir, tmp_path, client):
    link = tmp_path / "patient-link"
    link.symlink_to(synth_patch_dir / "90000", target_is_directory=True)
    run = tmp_path / "run"
    args = ["run", str(link), "--out", str(run), "--model", str(tiny_model_dir), "--scheduler", client.scheduler.address]
    assert main(args) == EXIT_OK
    with open(run / "report" / "inputs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["source"], r["status"]) for r in rows] == [(str(link), "reported")]
    # the real folder is the same input: nothing to redo, still one row
    assert main([*args[:1], str(synth_patch_dir / "90000"), *args[2:]]) == EXIT_OK
    with open(run / "report" / "inputs.csv", newline="") as fh:
        assert [r["source"] for r in csv.DictReader(fh)] == [str(link)]


def test_cli_tile_rerun_exit_codes_and_messages(mpp_slides, tmp_path, client, capsys):
    run = tmp_path / "run"
    args = ["tile", str(mpp_slides[-1].path), "--out", str(run), "--scheduler", client.scheduler.address]
    assert main(args) == EXIT_OK
    out = capsys.readouterr().out
    assert "tiled    " in out and "level 1, scale 1" in out and "1 inputs tiled" in out
    assert main(args) == EXIT_OK
    assert "0 inputs tiled (0 tiles, 0 chunks), 1 skipped" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["tile", str(empty), "--out", str(run)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no slides or patient folders found" in err and err.count("\n") == 1
    assert main(["tile", str(tmp_path / "nope.svs"), "--out", str(run)]) == EXIT_ERROR
    assert "no such file or folder" in capsys.readouterr().err


def test_cli_inspect(slides_dir, tmp_path, capsys):
    assert main(["inspect", str(slides_dir), "--json"]) == EXIT_PARTIAL
    entries = {Path(e["source"]).name: e for e in json.loads(capsys.readouterr().out)}
    assert len(entries) == 10
    cmu = entries["cmu-1-small-region.svs"]
    assert (cmu["reader"], cmu["vendor"], cmu["level"], cmu["grid_shape"]) == ("openslide", "aperio", 0, [7, 5])
    assert cmu["scale"] == pytest.approx(0.12475) and cmu["levels"][0]["width"] == 2220
    assert cmu["tissue_tiles"] + cmu["background_tiles"] == 35 and "error" not in cmu
    assert cmu["view_source"] == "thumbnail 574x768"  # its one level is 15x the scanner's thumbnail
    assert entries["boxes_1.dcm"]["series_of"].endswith("boxes_0.dcm")
    for name, (stage, cls, words) in EXPECTED_FAILURES.items():
        assert entries[name]["error"]["error_class"] == cls and words in entries[name]["error"]["message"]
    tcga = entries["tcga-cr-7395-01a-01-ts1.svs"]
    assert tcga["levels"][1]["height"] == 1783 and tcga["levels"][1]["mpp"] is None
    assert main(["inspect", str(slides_dir / "tcga-cr-7395-01a-01-ts1.svs"), "--mpp-override", "0.25"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "chosen      level 1" in out and "grid        4 x 5" in out and "0.25 µm/px (override)" in out
    assert "(estimated on thumbnail 956x768)" in out  # its 2x JPEG 2000 level is not decoded to plan
    assert main(["inspect", str(tmp_path / "nope.svs")]) == EXIT_ERROR
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.slow
def test_big_slide_tiles_in_bounded_memory(tmp_path):
    """A 12k x 12k slide (raw level 0: 432 MB) read whole at level 0 (--mpp 1.0, scale 0.5, no tissue filter):
    the memory tiling adds (client, scheduler and worker in one process, after the imports) stays well
    below the raw size. The 100k x 100k figures are in benchmarks/TILING.md."""
    code = f"""
import threading, time
from pathlib import Path
import psutil
from distributed import Client
from cancernet_batch.synth import SlideSpec, write_slide
from cancernet_batch.stages.tile import tile_run
from cancernet_batch.tiling import TileConfig
import openslide, PIL.Image, scipy.sparse, tifffile, zarr  # imports are not working memory
if __name__ == "__main__":
    p = Path(r'{tmp_path}') / 'big.svs'
    write_slide(SlideSpec(path=p, width=12288, height=12288, mpp=0.5, seed=2, detail_mpp=4.0))
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as c:
        base = peak = psutil.Process().memory_info().rss
        done = threading.Event()
        def sample():
            global peak
            while not done.is_set():
                peak = max(peak, psutil.Process().memory_info().rss)
                time.sleep(0.01)
        t = threading.Thread(target=sample)
        t.start()
        s = tile_run([p], p.parent / 'run', TileConfig(target_mpp=1.0, tissue_filter=False), client=c)
        done.set()
        t.join()
    print(s.tiles_written, (peak - base) // 2**20)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]  # failed once on a loaded shared machine: keep the reason
    out = r.stdout.split()
    tiles, growth_mb = int(out[-2]), int(out[-1])
    assert tiles == 122 * 122  # every tile: 6144 µm / 50 µm
    assert growth_mb < 432 / 2, growth_mb


def _one_colour_tiff(path: Path, size: int, rgb: tuple[int, int, int], mpp: float = 0.5) -> str:
    import tifffile

    tifffile.imwrite(path, np.full((size, size, 3), rgb, np.uint8), photometric="rgb", tile=(128, 128),
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return str(path)


@pytest.mark.parametrize("case", ["synthetic", "no tiles", "one tile at (0, 0)"])
def test_a_prepare_killed_before_its_attrs_is_made_again_on_resume(case, synth_slide_dir, tmp_path, monkeypatch):
    """A prepare killed while writing its coords, tissue map and thumbnail never leaves a group that a resume
    keeps without them: they are written before the group's document (with the attrs that _same_plan compares). Coords alone
    cannot prove it: an input with no tiles has none, and one tile at (0, 0) equals their fill value (both
    were kept, with a zero tissue map and thumbnail, when coords were written last)."""
    from cancernet_batch.stages.tile import _drop_reader, prepare_slide_task
    from cancernet_batch.tiling import plan_slide

    if case == "synthetic":
        slide, cfg = str(sorted(synth_slide_dir.glob("*.svs"))[0]), TileConfig(target_mpp=4.0, chunk=16)
    elif case == "no tiles":  # glass only: the tissue filter keeps nothing
        slide, cfg = _one_colour_tiff(tmp_path / "glass.tif", 1024, (242, 242, 240)), TileConfig(target_mpp=4.0)
    else:  # 400 px at 0.5 µm/px = one 50 px tile at 4 µm/px, every tile kept
        slide = _one_colour_tiff(tmp_path / "one.tif", 400, (200, 120, 160))
        cfg = TileConfig(target_mpp=4.0, tissue_filter=False)
    plan = plan_slide(slide, cfg)
    _drop_reader(slide)
    assert plan.n_tiles == {"no tiles": 0, "one tile at (0, 0)": 1}.get(case, plan.n_tiles)
    if case == "one tile at (0, 0)":
        assert plan.coords.tolist() == [[0, 0]]
    run = Run.of(tmp_path / "run").create()
    run.open_store("a").require_group("inputs")

    class Killed(BaseException):
        pass

    writes = []
    write_objects = store._write_objects

    def killed(where, objects):  # the arrays and their data are written; killed before the group's document
        if writes:
            raise Killed
        writes.append((where.path, sorted(objects)))
        write_objects(where, objects)

    monkeypatch.setattr(store, "_write_objects", killed)
    with pytest.raises(Killed):
        prepare_slide_task(run, slide, cfg, [])
    monkeypatch.undo()
    gid = store.input_id(slide)
    at, keys = writes[0]  # the first batch, under the input's own path: its arrays, not the group's document
    assert at.endswith(f"inputs/{gid}") and "coords/zarr.json" in keys and "zarr.json" not in keys, writes
    assert (run.store_path / "inputs" / gid / "coords" / "zarr.json").is_file()  # left behind, with no group document
    damaged = []
    assert gid not in dict(store.iter_inputs(run.open_store("r"), complete_only=False, damaged=damaged)) and not damaged
    _drop_reader(slide)
    res = prepare_slide_task(run, slide, cfg, [])  # the resume: the group is made again
    assert res["kept"] == 0 and len(res["todo"]) == len(store.chunk_bounds(res["n"], int(run.open_input(res["gid"]).attrs["chunk"])))
    _drop_reader(slide)
    g = run.open_input(store.input_id(slide))
    assert np.array_equal(g["coords"][:], plan.coords) and np.array_equal(g["tissue"][:], plan.tissue)
    assert np.array_equal(g["thumbnail"][:], plan.thumbnail) and plan.thumbnail.any()


def test_a_dicom_series_is_one_slide_per_folder_and_a_copy_elsewhere_is_another(slides_dir, tmp_path, client, capsys):
    """OpenSlide finds a DICOM slide's instances beside the file it opens, so a series is grouped within its folder:
    the real CMU-1-Small-Region as a series of three instances, and a copy of the same series (the same UIDs) in
    another folder, are two slides, each tiled once from its own folder's pyramid (before: one input, its
    identity the six files')."""
    from PIL import Image

    from cancernet_batch.slides import open_slide
    from dicom_wsi import write_series

    with open_slide(slides_dir / "cmu-1-small-region.svs") as r:
        rgb = r.read_region(0, 0, 0, *r.level_dimensions[0])
    a, b = tmp_path / "scans" / "a", tmp_path / "scans" / "b"
    files = write_series(a, "cmu1", [rgb, np.asarray(Image.fromarray(rgb).reduce(4))], 0.499,
                         thumbnail=np.asarray(Image.fromarray(rgb).reduce(16)))
    shutil.copytree(a, b)
    run = tmp_path / "run"
    assert main(["tile", str(tmp_path / "scans"), "--out", str(run), "--scheduler", client.scheduler.address]) == EXIT_OK
    out = capsys.readouterr().out
    assert "2 inputs tiled (42 tiles" in out, out
    for folder in (a, b):
        for member in ("cmu1_1.dcm", "cmu1_thumb.dcm"):
            assert f"series   {folder / member}: same DICOM series as {folder / 'cmu1_0.dcm'}" in out, out
        g = _group(run, folder / "cmu1_0.dcm")
        assert g.attrs["extra"]["series_files"] == [str(folder / f.name) for f in files]
        assert g.attrs["source_size"] == sum(f.stat().st_size for f in files) and g.attrs["level"] == 1
    assert np.array_equal(_group(run, a / "cmu1_0.dcm")["tiles"][:], _group(run, b / "cmu1_0.dcm")["tiles"][:])
    assert main(["inspect", str(tmp_path / "scans"), "--json"]) == EXIT_OK
    entries = {e["source"]: e for e in json.loads(capsys.readouterr().out)}
    for folder in (a, b):
        assert entries[str(folder / "cmu1_1.dcm")]["series_of"] == str(folder / "cmu1_0.dcm")
        assert entries[str(folder / "cmu1_0.dcm")]["tissue_tiles"] == 21


def test_an_input_scaled_in_the_dct_under_the_former_rule_is_tiled_again(slides_dir, synth_slide_dir, tmp_path,
                                                                          client, capsys):
    """``--decode fast`` took 1/2 in the DCT from a factor of 2 until 2026-12-06 (``slides.direct.DCT_RULE`` 1), and
    from a factor of 8 until 2026-12-07 (2); a run tiled then, resumed, tiles such an input again instead of keeping
    tiles the rule no longer gives. An input scaled in the DCT under today's rule (CMU-1 at a factor of 16) is kept."""
    from cancernet_batch.slides.direct import DCT_RULE

    cmu, svs = slides_dir / "cmu-1-small-region.svs", sorted(synth_slide_dir.glob("*.svs"))[0]
    common = ["--scheduler", client.scheduler.address]
    kept = tmp_path / "kept"
    args = ["tile", str(cmu), "--out", str(kept), "--mpp", "8.0", *common]
    assert main(args) == EXIT_OK and main(args) == EXIT_OK
    assert "0 inputs tiled (0 tiles, 0 chunks), 1 skipped" in capsys.readouterr().out
    extra = dict(_group(kept, cmu).attrs["extra"])
    assert (extra["decode_path"], extra["dct_rule"]) == ("direct jpeg, 1/2 in the DCT", DCT_RULE)  # factor 16

    run = tmp_path / "run"
    args = ["tile", str(svs), "--out", str(run), "--mpp", "2.0", *common]  # YCbCr JPEG, factor 2
    assert main(args) == EXIT_OK
    first = _group(run, svs)["tiles"][:]
    assert _group(run, svs).attrs["extra"]["decode_path"] == "direct jpeg"
    capsys.readouterr()
    # as a run before the change left it: its tiles at 1/2 in the DCT, no rule kept
    g = Run.of(run).open_store("r+")["inputs"][store.input_id(svs)]
    n = g.attrs["n_tiles"]
    g.update_attributes({"extra": {**{k: v for k, v in g.attrs["extra"].items() if k != "dct_rule"},
                                   "decode_path": "direct jpeg, 1/2 in the DCT"}})
    g["tiles"][:] = 0
    assert main(args) == EXIT_OK
    out = capsys.readouterr().out
    assert f"1 inputs tiled ({n} tiles" in out, out
    g = _group(run, svs)
    assert g.attrs["extra"]["dct_rule"] == DCT_RULE and np.array_equal(g["tiles"][:], first)


@pytest.mark.parametrize("changed", [False, True])
def test_a_preflighted_slide_is_planned_and_tiled_without_opening_openslide_again(changed, slides_dir, tmp_path,
                                                                                monkeypatch):
    """The prepare task's preflight child reads a local slide's metadata with OpenSlide; the worker's reader is made
    from it, and OpenSlide does not open the file again (6-7 CPU ms a CMU-1 copy, its quick hash) while the direct
    decoder reads every pixel the plan and tiles need: the same plan and tiles as a reader that opened it. A pixel
    read the direct decoder does not serve opens it then. A file changed after its preflight is opened afresh."""
    import shutil

    from cancernet_batch.slides.openslide_backend import OpenSlideReader
    from cancernet_batch.stages import tile

    slide = tmp_path / "cmu.svs"
    shutil.copy(slides_dir / "cmu-1-small-region.svs", slide)
    slide = str(slide)
    cfg = TileConfig(target_mpp=4.0)
    if changed:  # the file touched between the child's look and the worker's open: not the file the child read
        preflight_task = tile.preflight_task

        def touched(*args, **kwargs):
            out = preflight_task(*args, **kwargs)
            st = os.stat(slide)
            os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
            return out

        monkeypatch.setattr(tile, "preflight_task", touched)
    runs = {}
    for how in ("preflighted", "opened"):
        run = runs[how] = Run.of(tmp_path / how).create()
        run.open_store("a").require_group("inputs")
        tile._drop_reader(slide)
        res = tile.prepare_slide_task(run, slide, cfg, [], preflight=how == "preflighted", tile_first=True)
        assert isinstance(res, dict) and res["n"] > 0 and not res["todo"], res
        [key] = [k for k in tile._READERS if k.startswith(slide + "|")]
        reader = tile._READERS.pop(key)  # kept open here, for the reads below
        assert isinstance(reader, OpenSlideReader)
        if how == "preflighted":
            assert reader.opened is changed
            lazy = reader
    a, b = (runs[h].open_input(store.input_id(slide)) for h in ("preflighted", "opened"))
    assert np.array_equal(a["tiles"][:], b["tiles"][:]) and np.array_equal(a["coords"][:], b["coords"][:])
    assert {k: v for k, v in a.attrs.items() if k != store.ARRAY_DOCS} == \
        {k: v for k, v in b.attrs.items() if k != store.ARRAY_DOCS}
    assert lazy.info() == reader.info()
    # OpenSlide's own pixels: opened on first need
    assert np.array_equal(lazy.read_region(0, 100, 100, 32, 32), reader.read_region(0, 100, 100, 32, 32))
    assert lazy.opened and lazy.tile_shape(0) == reader.tile_shape(0)
    lazy.close()
    reader.close()
    with pytest.raises(ValueError, match="closed"):
        lazy.read_region(0, 0, 0, 8, 8)


def _openslide_readers_of(prefix: str) -> list:
    """On a worker: ``(path, opened)`` of each OpenSlide reader it keeps of a file under ``prefix``."""
    from cancernet_batch.slides.openslide_backend import OpenSlideReader
    from cancernet_batch.stages import tile

    with tile._READERS_LOCK:
        return [(str(r.path), r.opened) for r in tile._READERS.values()
                if isinstance(r, OpenSlideReader) and str(r.path).startswith(prefix)]


def test_no_worker_opens_a_preflighted_slide_with_openslide_again(slides_dir, tmp_path, client):
    """Through the stream on a real cluster, real SVS slides whose chunks are spread over both workers: every worker's
    reader of them is made from the slide's preflight answer (the prepare task's, passed on to its chunk tasks on the
    other worker), and none opened the file with OpenSlide; the tiles are those read by opened readers."""
    import shutil

    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(3):
        shutil.copy(slides_dir / "cmu-1-small-region.svs", folder / f"cmu{i}.svs")
    cfg = TileConfig(target_mpp=4.0, chunk=8)  # 21 tiles a slide: 3 chunks each
    run = tmp_path / "run"
    s = tile_run(sorted(folder.glob("*.svs")), run, cfg, client=client)
    assert not s.failures and len(s.tiled) == 3
    held = [r for rs in client.run(_openslide_readers_of, str(folder)).values() for r in rs]
    assert len({p for p, _ in held}) == 3 and len(held) >= 4, held  # some slide read on both workers
    assert not any(opened for _, opened in held), held
    from cancernet_batch.slides import open_slide
    from cancernet_batch.tiling import plan_slide, read_tiles

    for path in sorted(folder.glob("*.svs")):
        g = _group(run, path)
        with open_slide(path) as reader:
            plan = plan_slide(path, cfg, reader=reader)
            assert reader.opened
            assert np.array_equal(g["tiles"][:], read_tiles(reader, plan.level, plan.tile_px_level, plan.coords,
                                                            decode=cfg.decode))


def test_tile_rects_hold_each_tiles_footprint_and_no_tile_left_out():
    """tile_rects: each run of adjacent tiles in a row, the same run in the rows below in one box, one pixel of margin
    on every side; a grid cell whose tile is left out lies in no box beyond that margin."""
    from cancernet_batch.tiling import tile_rects

    keep = np.zeros((6, 7), bool)
    keep[0, 0:3] = keep[1, 0:3] = True  # one box of 2 rows
    keep[1, 5] = keep[2, 5] = keep[3, 5] = True  # a column
    keep[4, 1:6] = True
    keep[5, 1:3] = keep[5, 4:6] = True  # two runs under one: new boxes
    rc = np.argwhere(keep)
    tp = 100.4
    rects = tile_rects(rc, tp)
    assert len(rects) == 5
    for r, c in rc:  # every kept tile's footprint, and its margin, is in one box
        fx0, fy0, fx1, fy1 = int(np.floor(c * tp)) - 1, int(np.floor(r * tp)) - 1, int(np.ceil((c + 1) * tp)) + 1, \
            int(np.ceil((r + 1) * tp)) + 1
        assert any(x0 <= fx0 and y0 <= fy0 and fx1 <= x1 and fy1 <= y1 for x0, y0, x1, y1 in rects), (r, c)
    for r, c in np.argwhere(~keep):  # the inside of a tile left out is in none
        cx0, cy0, cx1, cy1 = np.ceil(c * tp) + 2, np.ceil(r * tp) + 2, np.floor((c + 1) * tp) - 2, np.floor((r + 1) * tp) - 2
        assert not any(x0 < cx1 and cx0 < x1 and y0 < cy1 and cy0 < y1 for x0, y0, x1, y1 in rects), (r, c)


@pytest.mark.parametrize("which", ["synthetic", "cmu", "tcga"])
def test_windows_read_through_the_reader_in_parts_give_the_same_tiles(which, slides_dir, synth_slide_dir, monkeypatch):
    """Through the reader (``--decode reader``; formats the direct decoder does not read), a window of tiles with
    tiles left out is read only where its tiles lie: the same tiles bit for bit as a read of the whole window, fewer
    pixels decoded. Not where OpenSlide's level has a downsample that is not whole (the TCGA sample's level 1,
    2.0005): OpenSlide places a region's origin in level-0 pixels there and resamples by the fraction, so the same
    level pixel differs between two regions; such a level is read in whole windows, as before."""
    from cancernet_batch import tiling
    from cancernet_batch.slides import open_slide
    from cancernet_batch.slides.openslide_backend import OpenSlideReader

    path, cfg = {"synthetic": (sorted(synth_slide_dir.glob("*.svs"))[0], TileConfig(decode="reader", target_mpp=2.0)),
                 "cmu": (slides_dir / "cmu-1-small-region.svs", TileConfig(decode="reader", target_mpp=1.0)),
                 "tcga": (slides_dir / "tcga-cr-7395-01a-01-ts1.svs",
                          TileConfig(decode="reader", target_mpp=2.0, mpp_override=0.25))}[which]
    px = []
    read = OpenSlideReader._read

    def counted(self, level, x, y, w, h):
        px.append(w * h)
        return read(self, level, x, y, w, h)

    monkeypatch.setattr(OpenSlideReader, "_read", counted)
    with open_slide(path) as reader:
        assert isinstance(reader, OpenSlideReader)
        plan = tiling.plan_slide(path, TileConfig(**{**cfg.__dict__, "tissue_filter": False}), reader=reader)
        coords = plan.coords[(plan.coords[:, 0] + plan.coords[:, 1]) % 3 != 0]  # a third left out: gaps in every window
        px.clear()  # the plan's reads
        parts = tiling.read_tiles(reader, plan.level, plan.tile_px_level, coords, decode="reader")
        n_parts = sum(px)
        px.clear()
        monkeypatch.setattr(tiling, "read_scaled_parts", lambda r, level, box, size, rects, max_read:
                            tiling.read_scaled(r, level, box, size, max_read=max_read))
        whole = tiling.read_tiles(reader, plan.level, plan.tile_px_level, coords, decode="reader")
        n_whole = sum(px)
        np.testing.assert_array_equal(parts, whole)
        whole_ds = reader.reads_level_pixels(plan.level)
        assert whole_ds == (which != "tcga")
        if whole_ds:
            assert n_parts < 0.9 * n_whole
        else:  # not read in parts: the same pixels read
            assert n_parts == n_whole
            # the premise: a level pixel read in two regions of OpenSlide's level 1 differs
            x, y = 1001, 733
            a = reader.read_region(plan.level, x - 37, y - 41, 100, 100)[41, 37]
            b = reader.read_region(plan.level, x - 3, y - 2, 100, 100)[2, 3]
            c = [reader.read_region(plan.level, x - i, y - i, 64, 64)[i, i] for i in range(1, 9)]
            assert not all((v == a).all() for v in [b, *c])
