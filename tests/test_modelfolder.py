"""The model folder object, and the house rule it shares with ``Run``: one owner spells each folder's names.

``ModelFolder`` owns the training output's names, ``Run`` (with its module's report names and
``InputFiles``, a reported input's files) the run folder's. The rule is checked on the package's source:
no other module has one of those names as a string (a file name anywhere, or as an HTML attribute's
value in a template; a folder name where a path is joined), nor spells a reported input's file (a string
that starts with its folder, ``"maps/"``, or ends with its own suffix, ``".ome.zarr"``). The names come
from the owners themselves, so a name added there is checked without touching this test.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath

import pytest

import cancernet_batch
from cancernet_batch import runfolder
from cancernet_batch.modelfolder import Assessed, ModelFolder
from cancernet_batch.runfolder import InputFiles, Run

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


STEM = "STEM"


def _input_files() -> list[str]:
    """Every file of a reported input (both GeoJSON forms), relative to the report, from ``InputFiles``."""
    kinds = [a for a in dir(InputFiles) if isinstance(getattr(InputFiles, a), property)]
    return sorted({getattr(InputFiles(STEM, gzip=g), a) for a in kinds for g in (False, True)})


@dataclass(frozen=True)
class Owned:
    """What one owner spells: whole names, and the parts of a reported input's file names."""

    files: set[str]
    folders: set[str]
    prefixes: frozenset[str] = frozenset()  # "maps/"
    suffixes: frozenset[str] = frozenset()  # ".ome.zarr": those of more than one dot, not a mere file type


def _owned() -> dict[str, Owned]:
    run = Run.of(ROOT)
    run_paths = [run.store_path, run.failures_csv, run.predict_json, run.progress_json, run.lock_path,
                 *(run.report_file(n) for n in (runfolder.INPUTS_CSV, runfolder.PATIENTS_CSV, runfolder.INDEX_HTML,
                                                runfolder.VIEWER_JS))]
    files, folders = _names(run_paths, ROOT)
    per_input = [PurePosixPath(rel) for rel in _input_files()]
    folders |= {str(p.parent) for p in per_input}
    suffixes = {p.name[len(STEM):] for p in per_input}
    return {"modelfolder.py": Owned(*_names(_model_folder_paths(), ROOT)),
            "runfolder.py": Owned(files, folders, frozenset(f"{p.parent}/" for p in per_input),
                                  frozenset(x for x in suffixes if x.count(".") > 1))}


def _joined(node: ast.AST) -> list[ast.AST]:
    """String operands of a path join: ``x / "name"`` and ``x.joinpath("name", ...)``."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return [node.right]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "joinpath":
        return list(node.args)
    return []


def _spelled_in(text: str, owned: Owned) -> list[str]:
    """The owned names a string (or a piece of an f-string) spells."""
    found = [p for p in owned.prefixes if text.startswith(p)]  # f"maps/{name}.png"
    found += [x for x in owned.suffixes if text.endswith(x)]  # f"{name}.ome.zarr"
    found += [n for n in owned.files if f'="{n}"' in text]  # <script src="viewer.js"> in a template
    found += [p for p in owned.prefixes if f'="{p}' in text]  # <img src="maps/...
    return found + ([text] if text in owned.files else [])  # "model.json"


def spellings(source: str, owned: Owned) -> list[tuple[int, str]]:
    """``(line, name)`` for each owned name the source spells."""
    files, folders = owned.files, owned.folders
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [(node.lineno, n) for n in _spelled_in(node.value, owned)]
        for arg in _joined(node):
            if isinstance(arg, ast.Constant) and arg.value in folders:
                found.append((arg.lineno, arg.value))
            elif (isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant)
                  and arg.values[0].value in folders):  # f"fold{k}"
                found.append((arg.lineno, arg.values[0].value))
    return found


def test_owned_names_come_from_the_owners():
    owned = _owned()
    files, folders = owned["modelfolder.py"].files, owned["modelfolder.py"].folders
    assert {"model.keras", "model.json", "model.onnx", "onnx-check.json", "split.json", "curves.png", "metrics.json",
            "failures.csv", "confusion.png", "per_patient.csv", "evaluation.json", "oof.npz", "reliability.png"} <= files
    assert {"folds", "fold", "held-out", "cv", "test", "evaluation"} <= folders
    run = owned["runfolder.py"]
    assert {"tiles.zarr", "failures.csv", "predict.json", "progress.json", "inputs.csv", "patients.csv",
            "index.html", "viewer.js"} <= run.files and {"report", "maps", "geojson", "pyramids"} <= run.folders
    assert _input_files() == ["geojson/STEM.geojson", "geojson/STEM.geojson.gz", "geojson/STEM.regions.geojson",
                              "maps/STEM.png", "maps/STEM.thumb.jpg", "maps/STEM.view.js", "pyramids/STEM.ome.tif",
                              "pyramids/STEM.ome.zarr"]
    assert run.prefixes == {"maps/", "geojson/", "pyramids/"}
    assert run.suffixes == {".thumb.jpg", ".view.js", ".geojson.gz", ".regions.geojson", ".ome.zarr", ".ome.tif"}


def test_the_report_cleans_every_kind_of_input_file():
    """Each file of a reported input is one that the clean-up of inputs no longer reported removes."""
    for rel in map(PurePosixPath, _input_files()):
        assert any(str(rel.parent) == folder and rel.name.endswith(suffix)
                   for folder, suffix in InputFiles.CLEANED), rel


def test_the_scan_finds_a_spelled_name():
    src = ('out / "model.json"\nroot / "folds" / f"fold{k + 1}"\np.joinpath("cv", "x")\n'
           'roles = ("test", "held-out")  # words, not paths\nprint("no model.json here")\n')
    assert sorted(spellings(src, _owned()["modelfolder.py"])) == [(1, "model.json"), (2, "fold"), (2, "folds"),
                                                                   (3, "cv")]


def test_the_scan_finds_a_spelled_report_file():
    src = ('out / "maps" / f"{name}.png"\n'
           'rel = f"geojson/{name}.geojson" + (".gz" if gz else "")\n'
           'write(folder / f"{stem}.ome.zarr", folder / (stem + ".ome.tif"))\n'
           'page = f"""<p>{x}</p>\\n<script src="viewer.js"></script>"""\n'
           'link = f\'<img src="maps/{name}.png">\'\n'
           'IMAGES = (".png", ".tif")\nname = f"tile-{k:05d}.png"\nprint("the maps of viewer.js")\n')
    assert sorted(spellings(src, _owned()["runfolder.py"])) == [
        (1, "maps"), (2, "geojson/"), (3, ".ome.tif"), (3, ".ome.zarr"), (4, "viewer.js"), (5, "maps/")]


@pytest.mark.parametrize("owner", ["modelfolder.py", "runfolder.py"])
def test_no_module_but_the_owner_spells_its_names(owner):
    owned = _owned()
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == owner:
            continue
        other = owned.get(rel, Owned(set(), set()))  # the other owner may spell a shared name (failures.csv)
        hits = [(line, n) for line, n in spellings(path.read_text(encoding="utf-8"), owned[owner])
                if n not in other.files]
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
