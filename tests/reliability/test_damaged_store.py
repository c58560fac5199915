"""Damaged or hand-edited run folders: one damaged input costs that input only; a damaged root is one
clear error naming the file; inconsistent data (done flags without probabilities, positions off the
grid, tiles of the wrong dtype) are detected and never reported as 0 % IDC or drawn."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cancernet_batch import store
from cancernet_batch.runfolder import Run
from cancernet_batch.errors import StorageError
from cancernet_batch.store import InputAttrs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reportdata import add_input  # noqa: E402 - the report tests' store builder

ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
COORDS, PROBS = [(0, 0), (0, 1), (1, 1), (2, 3), (3, 4)], [0.9, 0.2, 0.7, 0.1, 0.6]


def _group_dir(run: Path, source: str) -> Path:
    return Run.of(run).store_path / "inputs" / store.input_id(source)


def _hostile_run(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A scored run: one good input and one of each kind of damage; returns it and {source: damage}."""
    run = tmp_path / "run"
    src = {k: str(tmp_path / f"{k}.svs") for k in ("good", "nan", "offgrid", "dtype", "metadata", "truncated")}
    for k, s in src.items():
        add_input(run, s, COORDS, PROBS, patient=k)
    root = Run.of(run).open_store()
    g = root["inputs"][store.input_id(src["nan"])]
    g["probs"][:] = np.nan  # done flags set, probabilities lost
    g = root["inputs"][store.input_id(src["offgrid"])]
    c = np.asarray(g["coords"][:])
    c[2] = (4000, 7)  # hand-edited: far off the 4 x 5 grid
    g["coords"][:] = c
    g = root["inputs"][store.input_id(src["dtype"])]
    del g["tiles"]
    g.create_array("tiles", shape=(5, 50, 50, 3), chunks=(4, 50, 50, 3), dtype="float32")[:] = 0.5
    (_group_dir(run, src["metadata"]) / "zarr.json").write_text('{"attributes": {"source": "' + src["metadata"]
                                                                 + '", "kind": "sli')  # truncated by a crash
    (_group_dir(run, src["truncated"]) / "zarr.json").write_bytes(b"\x00\x01 not json")
    return run, src


def test_iter_inputs_skips_damaged_groups_and_says_which(tmp_path):
    run, src = _hostile_run(tmp_path)
    damaged: list[store.DamagedInput] = []
    gids = [gid for gid, _ in store.iter_inputs(Run.of(run).open_store("r"), damaged=damaged)]
    assert len(gids) == 4
    assert {d.gid for d in damaged} == {store.input_id(src["metadata"]), store.input_id(src["truncated"])}
    by = {d.gid: d for d in damaged}
    assert by[store.input_id(src["metadata"])].source == src["metadata"]  # salvaged from the damaged text
    assert by[store.input_id(src["truncated"])].source is None
    for d in damaged:
        f = d.failure()
        assert d.path.endswith("zarr.json") and "zarr.json" in f.message and "\n" not in f.message


def test_validate_input_names_each_inconsistency(tmp_path):
    run, src = _hostile_run(tmp_path)
    root = Run.of(run).open_store("r")
    why = {Path(g.attrs["source"]).stem: store.validate_input(g) for _, g in store.iter_inputs(root)}
    assert why["good"] is None
    assert "flagged done" in why["nan"]
    assert "outside its 4 x 5 grid" in why["offgrid"]
    assert "float32" in why["dtype"]


def test_done_flags_without_probabilities_are_cleared_for_rescoring(tmp_path):
    run, src = _hostile_run(tmp_path)
    g = Run.of(run).open_store()["inputs"][store.input_id(src["nan"])]
    assert store.done_mask(g).all()
    assert store.clear_unproven_done(g) == 2
    assert not store.done_mask(g).any()
    assert store.validate_input(g) is None  # consistent again: nothing claims to be scored


def test_damaged_group_is_tiled_again(tmp_path):
    run, src = _hostile_run(tmp_path)
    root = Run.of(run).open_store()
    gone = store.drop_damaged(root)
    assert len(gone) == 2 and not _group_dir(run, src["metadata"]).exists()
    assert store.input_id(src["metadata"]) not in root["inputs"]  # zarr can look again
    attrs = InputAttrs(source=src["truncated"], kind="slide", reader="test", patient="p", source_size=0,
                       source_mtime=0.0, target_mpp=4.0, grid_shape=(4, 5), n_tiles=5)
    (_group_dir(run, src["truncated"])).mkdir(parents=True)
    (_group_dir(run, src["truncated"]) / "zarr.json").write_text("{")  # damaged again: create_input replaces it
    g = store.create_input(root, attrs, 5, chunk=4)
    assert g.attrs["source"] == src["truncated"] and g["tiles"].shape[0] == 5


def test_a_group_folder_left_without_its_document_is_no_failure(tmp_path, caplog):
    """What a run killed while it made (or removed) an input's group leaves: the arrays' documents written, the
    group's own not yet (they are written together). It is no damaged input: listings pass over it without a
    warning, a resume removes it without recording a failure, and the input is made again."""
    run, src = _hostile_run(tmp_path)
    (_group_dir(run, src["good"]) / "zarr.json").unlink()
    assert (_group_dir(run, src["good"]) / "tiles" / "zarr.json").exists()
    root = Run.of(run).open_store()
    damaged: list[store.DamagedInput] = []
    with caplog.at_level("WARNING", logger="cancernet_batch"):
        gids = [gid for gid, _ in store.iter_inputs(root, damaged=damaged)]
    assert store.input_id(src["good"]) not in gids and len(gids) == 3
    assert {d.gid for d in damaged} == {store.input_id(src["metadata"]), store.input_id(src["truncated"])}
    assert not [r for r in caplog.records if str(_group_dir(run, src["good"])) in r.getMessage()]
    gone = store.drop_damaged(root)
    assert {d.gid for d in gone} == {d.gid for d in damaged}  # the unfinished folder is removed, not a failure
    assert not _group_dir(run, src["good"]).exists()
    attrs = InputAttrs(source=src["good"], kind="slide", reader="test", patient="p", source_size=0,
                       source_mtime=0.0, target_mpp=4.0, grid_shape=(4, 5), n_tiles=5)
    g = store.create_input(root, attrs, 5, chunk=4)
    assert g.attrs["source"] == src["good"] and store.input_id(src["good"]) in root["inputs"]


def test_a_removal_cut_short_leaves_no_group_missing_arrays(tmp_path, monkeypatch):
    """An input's group is removed document first: cut off before its arrays go (here the folder's removal
    fails), what is left is a folder no listing shows, never a group whose arrays are partly gone."""
    from zarr.storage import LocalStore

    run, src = _hostile_run(tmp_path)
    root = Run.of(run).open_store()
    gid = store.input_id(src["good"])

    async def cut(self, prefix):
        raise OSError("cut short")

    monkeypatch.setattr(LocalStore, "delete_dir", cut)
    with pytest.raises(OSError, match="cut short"):
        store.remove_input(root["inputs"], gid)
    monkeypatch.undo()
    assert (_group_dir(run, src["good"]) / "tiles" / "zarr.json").exists()
    assert gid not in [g for g, _ in store.iter_inputs(root, complete_only=False)]
    store.drop_damaged(root)
    assert not _group_dir(run, src["good"]).exists()


def test_damaged_root_is_one_clear_error(tmp_path):
    run, _ = _hostile_run(tmp_path)
    store.check_root(Run.of(run).store_path)  # sound
    (Run.of(run).store_path / "zarr.json").write_text("{{{")
    with pytest.raises(StorageError) as ei:
        store.check_root(Run.of(run).store_path)
    assert str(Run.of(run).store_path / "zarr.json") in str(ei.value) and "\n" not in str(ei.value)
    (Run.of(run).store_path / "zarr.json").unlink()
    with pytest.raises(StorageError, match="missing"):
        store.check_root(Run.of(run).store_path)


def test_a_store_whose_making_was_cut_short_is_made_again_not_damaged(tmp_path):
    """A run killed between zarr's making of the store's folder and of its document leaves an empty ``tiles.zarr``
    (or one with only zarr's temporary files): nothing is lost, so it is no damaged store. A writer makes the store
    in it; a reader finds no store (the same error as with no folder)."""
    run = Run.of(tmp_path / "run").create()
    run.store_path.mkdir()
    (run.store_path / "zarr.json.partial").write_text("{")  # zarr's temporary, as a kill leaves it
    store.check_root(run.store_path)  # not damaged
    assert not run.exists()  # no store to resume from: a run makes it (as when there is no folder)
    with pytest.raises(StorageError, match="no tiles.zarr in this run folder"):
        run.open_store("r")
    run.open_store("a").require_group("inputs")  # as a run makes it
    assert (run.store_path / "zarr.json").exists() and not (run.store_path / "zarr.json.partial").exists()
    run.open_store("r")  # sound now
    assert run.exists()
    (run.store_path / "zarr.json").unlink()  # a store with its inputs group but no root document: damaged
    with pytest.raises(StorageError, match="missing"):
        store.check_root(run.store_path)


def test_report_goes_on_without_the_damaged_inputs(tmp_path):
    run, src = _hostile_run(tmp_path)
    r = subprocess.run([sys.executable, "-m", "cancernet_batch.cli", "report", str(run), "--threshold", "0.5"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 3, r.stderr[-3000:]  # finished, some inputs failed
    assert "Traceback" not in r.stderr
    rows = {Path(row["source"]).stem: row for row in csv.DictReader(open(run / "report" / "inputs.csv"))}
    assert rows["good"]["status"] == "reported" and rows["good"]["idc_tiles"] == "3"
    for k in ("nan", "offgrid", "dtype"):
        assert rows[k]["status"] == "failed" and rows[k]["idc_fraction"] == "", rows[k]  # never 0 % IDC
    failures = {Path(row["input"]).stem: row for row in csv.DictReader(open(run / "failures.csv"))}
    assert {"nan", "offgrid", "dtype"} <= set(failures)
    maps = {p.name for p in (run / "report" / "maps").iterdir()}
    good = store.input_id(src["good"])
    assert maps == {good + ".png", good + ".thumb.jpg", good + ".view.js"}  # nothing drawn from bad data
    assert str(_group_dir(run, src["metadata"]) / "zarr.json") in r.stderr  # the damaged group is named
