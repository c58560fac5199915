"""File names that are not UTF-8 (any bytes a POSIX name may hold) and CSVs re-saved with a UTF-8 BOM.

Names are made with bytes paths (``os.fsencode``): a slide and a patient folder named with 0xFF/0xFE
bytes are tiled under a safe id, a stray file with such a name inside ``PATIENT/0/`` is one failure row
with a printable message, the rows survive a second run, and the CSVs the tool reads back are still
read when a spreadsheet saved them with a BOM.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cancernet_batch import store
from cancernet_batch.runfolder import Run
from cancernet_batch.failures import Failure, read_failures, write_failures

ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reportdata import add_input  # noqa: E402 - the report tests' store builder

BAD = b"\xff\xfe"  # never valid UTF-8


def _bytes_path(*parts: bytes | str | os.PathLike) -> bytes:
    return os.path.join(*(os.fsencode(p) for p in parts))


def _touch(path: bytes, data: bytes = b"") -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_failures_csv_keeps_undecodable_names(tmp_path):
    name = os.fsdecode(_bytes_path(tmp_path, b"slide" + BAD + b".svs"))
    cr = os.fsdecode(_bytes_path(tmp_path, b"carriage\rreturn.svs"))  # found by the property test
    rows = [Failure(name, "preflight", "InputError", "cannot open"), Failure("plain.svs", "tile", "X", "a, \"quoted\" message"),
            Failure(cr, "tile", "X", "=1+1")]
    write_failures(tmp_path / "failures.csv", rows)
    assert read_failures(tmp_path / "failures.csv") == rows  # the same name, byte for byte
    assert BAD in (tmp_path / "failures.csv").read_bytes()


def test_csvs_with_a_bom_are_read(tmp_path):
    from cancernet_batch.aggregate import read_patient_map
    from cancernet_batch.split import read_split_file

    f = tmp_path / "failures.csv"
    f.write_bytes(b"\xef\xbb\xbfinput,stage,error_class,message\r\na.svs,tile,InputError,broken\r\n")
    assert read_failures(f) == [Failure("a.svs", "tile", "InputError", "broken")]
    p = tmp_path / "patients.csv"
    p.write_bytes(b"\xef\xbb\xbfinput,patient\r\na.svs,P1\r\n")
    assert read_patient_map(p) == {"a.svs": "P1"}
    (tmp_path / "cases_train.txt").write_bytes(b"\xef\xbb\xbfP1\r\nP2\r\n")
    (tmp_path / "cases_val.txt").write_bytes(b"\xef\xbb\xbfP3\r\n")
    lists, _ = read_split_file(tmp_path)
    assert lists == {"train": ["P1", "P2"], "val": ["P3"]}


def test_input_id_of_undecodable_names_is_safe_and_distinct(tmp_path):
    a = os.fsdecode(_bytes_path(tmp_path, b"s" + b"\xff" + b".svs"))
    b = os.fsdecode(_bytes_path(tmp_path, b"s" + b"\xfe" + b".svs"))
    ia, ib = store.input_id(a), store.input_id(b)
    assert ia != ib
    for i in (ia, ib):
        i.encode("ascii")
        assert "/" not in i and not i.startswith(".")


def test_report_of_inputs_with_undecodable_names(tmp_path):
    run = tmp_path / "run"
    src = os.fsdecode(_bytes_path(tmp_path, b"p" + BAD + b".svs"))
    add_input(run, src, [(0, 0), (1, 1)], [0.9, 0.1], patient="P" + os.fsdecode(BAD))
    r = subprocess.run([sys.executable, "-m", "cancernet_batch.cli", "report", str(run), "--threshold", "0.5"],
                       capture_output=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(run / "report" / "inputs.csv", encoding="utf-8", errors="surrogateescape")))
    assert [row["source"] for row in rows] == [src] and rows[0]["status"] == "reported"


@pytest.mark.slow
def test_tile_with_undecodable_names(tmp_path, synth_slide_dir, synth_patch_dir):
    archive = _bytes_path(tmp_path, b"archive")
    os.makedirs(archive)
    good = sorted(synth_slide_dir.glob("*.svs"))[0]
    shutil.copyfile(good, _bytes_path(archive, b"slide" + BAD + b".svs"))
    pid = sorted(p.name for p in synth_patch_dir.iterdir() if p.is_dir())[0]
    patient = _bytes_path(archive, b"patients", pid.encode() + BAD)
    shutil.copytree(os.fsencode(synth_patch_dir / pid), patient)
    stray = _bytes_path(patient, b"0", b"notes" + BAD + b"\n.txt")  # a newline in the name too
    _touch(stray, b"not an image")
    png = sorted(os.listdir(_bytes_path(patient, b"1")))[0]
    os.rename(_bytes_path(patient, b"1", png), _bytes_path(patient, b"1", png.replace(b".png", BAD + b".png")))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "cancernet_batch.cli", "tile", os.fsdecode(archive), "--out", str(run),
           "--workers", "1"]
    rows_by_run = []
    for attempt in range(2):
        r = subprocess.run(cmd, capture_output=True, env=ENV, timeout=600)
        err = r.stderr.decode("utf-8")  # printable: never raw bytes on the terminal
        # finished, the stray file failed (the re-run skips the unchanged inputs: nothing new failed)
        assert r.returncode == (3 if attempt == 0 else 0), err[-2000:]
        assert "Traceback" not in err
        r.stdout.decode("utf-8")
        rows = read_failures(run / "failures.csv")
        rows_by_run.append(rows)
        assert [f.input for f in rows] == [os.fsdecode(stray)], rows
        assert "\n" not in rows[0].message and "\\xff\\xfe" in rows[0].message
        rows[0].message.encode("utf-8")
    assert rows_by_run[0] == rows_by_run[1]  # the row survives the re-run
    tiled = {g.attrs["source"]: g for _, g in store.iter_inputs(Run.of(run).open_store("r"))}
    assert set(tiled) == {os.fsdecode(_bytes_path(archive, b"slide" + BAD + b".svs")), os.fsdecode(patient)}
    folder = tiled[os.fsdecode(patient)]
    assert int(folder.attrs["n_tiles"]) == 60  # every patch, the renamed one included
