from __future__ import annotations

import csv
import pytest

from cancernet_batch.atomic import atomic_path, safe_cell, write_csv, write_text
from cancernet_batch.errors import StorageError
from cancernet_batch.failures import Failure, read_failures, write_failures


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.txt"
    write_text(p, "one")
    write_text(p, "two")
    assert p.read_text() == "two"
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]


def test_written_files_get_normal_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        p = write_text(tmp_path / "m.json", "{}")
    finally:
        os.umask(mask)
    assert (p.stat().st_mode & 0o777) == 0o644


def test_failed_write_keeps_old_file(tmp_path):
    p = tmp_path / "a.txt"
    write_text(p, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]


def test_unwritable_parent_is_storage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError) as ei:
        write_text(blocker / "x.txt", "x")
    assert "writable" in str(ei.value)


def test_csv_neutralises_formulas(tmp_path):
    p = write_csv(tmp_path / "t.csv", ["id", "v"], [["=cmd|' /C calc'!A0", -1.5], ["+1", 2], ["@SUM(A1)", 3], ["ok", 4]])
    rows = list(csv.reader(open(p)))
    assert rows[1] == ["'=cmd|' /C calc'!A0", "-1.5"]
    assert rows[2][0] == "'+1" and rows[3][0] == "'@SUM(A1)" and rows[4][0] == "ok"
    assert safe_cell(-3) == -3


def test_failures_roundtrip(tmp_path):
    p = tmp_path / "failures.csv"
    rows = [Failure("a.svs", "tile", "InputError", "a.svs: bad"), Failure("b.svs", "tile", "InputError", "b, \"quoted\"\nnewline"),
            Failure("=c.svs", "plan", "X", "-1 is not a size")]
    write_failures(p, rows)
    assert read_failures(p) == rows  # formula guards are undone on reading
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())  # re-saved by a spreadsheet with a BOM
    assert read_failures(p) == rows
    f = Failure.from_exception("x", "read", ValueError("multi\nline  message"))
    assert f.message == "multi line message" and f.error_class == "ValueError"


def test_a_signal_as_the_temporary_file_is_made_leaves_nothing_behind(tmp_path, monkeypatch):
    """Ctrl-C can land between the temporary file's creation and the write (the report tables are rewritten
    all through a run): the temporary name is known before the file exists, so it is removed whatever the moment."""
    import os

    from cancernet_batch import atomic

    real_close = os.close
    calls = {"n": 0}

    def interrupted_close(fd):
        real_close(fd)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # the signal, just after the temporary file was made

    target = tmp_path / "inputs.csv"
    target.write_text("old\n")
    monkeypatch.setattr(atomic.os, "close", interrupted_close)
    with pytest.raises(KeyboardInterrupt):
        write_text(target, "new\n")
    monkeypatch.undo()
    assert calls["n"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs.csv"] and target.read_text() == "old\n"


@pytest.mark.parametrize("where", ["mkdir", "replace-aside", "replace-in"])
def test_a_signal_at_any_step_of_a_folder_write_leaves_the_old_folder_or_the_new_one(tmp_path, monkeypatch, where):
    """A folder output (an OME-Zarr) interrupted as its temporary folder is made, as the old folder is moved
    aside, or as the new one is renamed in: no ``.tmp-*`` folder is left and the old folder is whole under its name."""
    import os

    from cancernet_batch import atomic
    from cancernet_batch.atomic import atomic_dir

    final = tmp_path / "a.ome.zarr"
    final.mkdir()
    (final / "old").write_text("old")
    real_mkdir, real_replace = os.mkdir, os.replace
    replaces = {"n": 0}

    def mkdir(p, *a, **kw):
        real_mkdir(p, *a, **kw)
        if where == "mkdir":
            raise KeyboardInterrupt

    def replace(src, dst):
        replaces["n"] += 1
        if where == "replace-in" and replaces["n"] == 2:
            raise KeyboardInterrupt  # the old folder is aside, the new one not yet in
        real_replace(src, dst)
        if where == "replace-aside" and replaces["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "mkdir", mkdir)
    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            (tmp / "new").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ome.zarr"]
    assert sorted(p.name for p in final.iterdir()) == ["old"]


def test_a_folder_write_replaces_the_old_folder_whole(tmp_path):
    from cancernet_batch.atomic import atomic_dir

    final = tmp_path / "a.ome.zarr"
    for text in ("first", "second"):
        with atomic_dir(final) as tmp:
            (tmp / text).write_text(text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ome.zarr"]
    assert sorted(p.name for p in final.iterdir()) == ["second"]
