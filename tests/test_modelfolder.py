"""The model folder object, and the house rule it shares with ``Run``: one owner spells each folder's names.

``ModelFolder`` owns the training output's names, ``Run`` (with its module's report names) the run
folder's. The rule is checked on the package's source: no other module has one of those names as a
string (a file name anywhere; a folder name where a path is joined). The names come from the owners
themselves, so a name added there is checked without touching this test.
"""

from __future__ import annotations

import ast
from pathlib import Path, PurePath

import pytest

import cancernet_batch
from cancernet_batch import runfolder
from cancernet_batch.modelfolder import Assessed, ModelFolder
from cancernet_batch.runfolder import Run

PACKAGE = Path(cancernet_batch.__file__).parent
ROOT = PurePath("/M")


def _paths(obj) -> list[PurePath]:
    """Every location an owner object gives as an attribute (and those of the folders it gives)."""
    out = []
    for name in dir(obj):
        value = getattr(obj, name) if not name.startswith("_") else None
        if isinstance(value, PurePath):
            out.append(value)
        elif isinstance(value, Assessed):
            out += _paths(value)
    return out


def _model_folder_paths() -> list[PurePath]:
    mf = ModelFolder(ROOT)
    return [*_paths(mf), *_paths(mf.evaluation()), *_paths(mf.fold(1)), *_paths(mf.fold(1).held_out)]


def _names(paths: list[PurePath], root: PurePath) -> tuple[set[str], set[str]]:
    """(file names, folder names) under ``root``; a fold's numbered folder stands as its prefix ``fold``."""
    files, folders = set(), set()
    for p in paths:
        parts = p.relative_to(root).parts
        for i, part in enumerate(parts):
            last = i == len(parts) - 1 and PurePath(part).suffix
            (files if last else folders).add("fold" if part == "fold1" else part)
    return files, folders


def _owned() -> dict[str, tuple[set[str], set[str]]]:
    run = Run.of(ROOT)
    run_paths = [run.store_path, run.failures_csv, run.predict_json, run.progress_json, run.lock_path,
                 *(run.report_file(n) for n in (runfolder.INPUTS_CSV, runfolder.PATIENTS_CSV, runfolder.INDEX_HTML))]
    return {"modelfolder.py": _names(_model_folder_paths(), ROOT), "runfolder.py": _names(run_paths, ROOT)}


def _joined(node: ast.AST) -> list[ast.AST]:
    """String operands of a path join: ``x / "name"`` and ``x.joinpath("name", ...)``."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return [node.right]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "joinpath":
        return list(node.args)
    return []


def spellings(source: str, files: set[str], folders: set[str]) -> list[tuple[int, str]]:
    """``(line, name)`` for each owned name the source spells."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and node.value in files:
            found.append((node.lineno, node.value))
        for arg in _joined(node):
            if isinstance(arg, ast.Constant) and arg.value in folders:
                found.append((arg.lineno, arg.value))
            elif (isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant)
                  and arg.values[0].value in folders):  # f"fold{k}"
                found.append((arg.lineno, arg.values[0].value))
    return found


def test_owned_names_come_from_the_owners():
    owned = _owned()
    files, folders = owned["modelfolder.py"]
    assert {"model.keras", "model.json", "model.onnx", "onnx-check.json", "split.json", "curves.png", "metrics.json",
            "failures.csv", "confusion.png", "per_patient.csv", "evaluation.json", "oof.npz", "reliability.png"} <= files
    assert {"folds", "fold", "held-out", "cv", "test", "evaluation"} <= folders
    files, folders = owned["runfolder.py"]
    assert {"tiles.zarr", "failures.csv", "predict.json", "progress.json", "inputs.csv", "patients.csv",
            "index.html"} <= files and "report" in folders


def test_the_scan_finds_a_spelled_name():
    files, folders = _owned()["modelfolder.py"]
    src = ('out / "model.json"\nroot / "folds" / f"fold{k + 1}"\np.joinpath("cv", "x")\n'
           'roles = ("test", "held-out")  # words, not paths\nprint("no model.json here")\n')
    assert sorted(spellings(src, files, folders)) == [(1, "model.json"), (2, "fold"), (2, "folds"), (3, "cv")]


@pytest.mark.parametrize("owner", ["modelfolder.py", "runfolder.py"])
def test_no_module_but_the_owner_spells_its_names(owner):
    files, folders = _owned()[owner]
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == owner:
            continue
        other = _owned().get(rel, (set(), set()))  # the other owner may spell a shared name (failures.csv)
        hits = [(line, n) for line, n in spellings(path.read_text(encoding="utf-8"), files, folders)
                if n not in other[0]]
        if hits:
            found[rel] = hits
    assert not found, f"spelled outside {owner}: {found}"


def test_locations():
    mf = ModelFolder("m")
    assert mf.root == Path("m") and str(mf) == "m"
    assert mf.meta == Path("m/model.json") and mf.keras.parent == mf.onnx.parent == mf.root
    assert mf.val.root == mf.root and mf.test.per_patient == Path("m/test/per_patient.csv")
    assert mf.evaluation().report == Path("m/evaluation/evaluation.json")
    assert mf.evaluation("elsewhere").failures == Path("elsewhere/failures.csv")
    assert mf.fold(3).meta == Path("m/folds/fold3/model.json")
    assert mf.fold(3).held_out.confusion == Path("m/folds/fold3/held-out/confusion.png")
    assert mf.cv_oof.parent == mf.cv.root == Path("m/cv")
