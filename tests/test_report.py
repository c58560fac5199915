"""The report stage: CSVs against hand computation, GeoJSON, heatmaps, index.html, safety, CLI."""

from __future__ import annotations

import csv
import gzip
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from browser import CHROMIUM, Browser
from reportdata import MODEL_ID, add_input

from cancernet_batch import store
from cancernet_batch.cli import main
from cancernet_batch.errors import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE
from cancernet_batch.failures import Failure, read_failures, write_failures
from cancernet_batch.stages.report import ReportConfig, make_report
from cancernet_batch.synth import SlideSpec, write_slide
from cancernet_batch.runfolder import Run, safe_name

COORDS = [(0, 0), (0, 1), (1, 1), (2, 3), (3, 4)]
PROBS = [0.9, 0.2, 0.6, 0.49, 0.5]  # at 0.5: IDC tiles (0,0) (1,1) (3,4)
B_COORDS = [(0, 0), (1, 0), (2, 2)]
B_PROBS = [0.1, 0.7, 0.3]  # at 0.5: IDC tile (1,0)
EVIL = '=HYPERLINK("http://e.x","<img src=x onerror=alert(1)>")'


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _by(rows: list[dict], key: str) -> dict[str, dict]:
    return {r[key]: r for r in rows}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """Two slides (one patient via --patients), a patient folder with an evil id, an unscored slide."""
    base = tmp_path_factory.mktemp("report")
    run_dir = base / "run"
    ids = {
        "a": add_input(run_dir, base / "slides" / "a.svs", COORDS, PROBS, chunk=2),
        "b": add_input(run_dir, base / "slides" / "b.svs", B_COORDS, B_PROBS),
        "evil": add_input(run_dir, base / "8863", COORDS, PROBS, kind="patches", patient=EVIL, tile_px=50,
                          source_mpp=None),
        "c": add_input(run_dir, base / "slides" / "c.svs", COORDS, PROBS, chunk=2, scored_chunks=1),
    }
    write_failures(run_dir / "failures.csv", [Failure("/data/broken.svs", "tile", "InputError", "truncated")])
    (base / "map.csv").write_text("input,patient\na.svs,P1\nb.svs,P1\n")
    rc = main(["report", str(run_dir), "--patients", str(base / "map.csv")])
    return {"base": base, "dir": run_dir, "out": run_dir / "report", "ids": ids, "rc": rc}


def test_exit_status_3_when_inputs_not_scored_or_failed(run, capsys):
    assert run["rc"] == EXIT_PARTIAL
    assert (run["out"] / "index.html").is_file()


def test_inputs_csv_against_hand_computation(run):
    rows = _by(_rows(run["out"] / "inputs.csv"), "input_id")
    a = rows[run["ids"]["a"]]
    assert (a["status"], a["patient"], a["tissue_tiles"], a["idc_tiles"]) == ("reported", "P1", "5", "3")
    assert float(a["idc_fraction"]) == pytest.approx(0.6)
    assert float(a["idc_area_mm2"]) == pytest.approx(3 * 0.04)
    assert float(a["tissue_area_mm2"]) == pytest.approx(5 * 0.04)
    assert float(a["mean_prob"]) == pytest.approx(0.538, abs=1e-6)
    assert float(a["max_prob"]) == pytest.approx(0.9, abs=1e-6)
    assert (a["model_id"], a["threshold"], a["target_mpp"], a["source_mpp"]) == (MODEL_ID, "0.5", "4.0", "0.5")
    b = rows[run["ids"]["b"]]
    assert (b["tissue_tiles"], b["idc_tiles"], b["idc_area_mm2"]) == ("3", "1", "0.04")


def test_unscored_input_is_listed_not_dropped(run):
    c = _by(_rows(run["out"] / "inputs.csv"), "input_id")[run["ids"]["c"]]
    assert (c["status"], c["note"], c["tissue_tiles"], c["idc_tiles"]) == ("not scored", "1 of 3 chunks scored", "", "")
    html = (run["out"] / "index.html").read_text()
    assert run["ids"]["c"] in html and "not scored" in html
    assert not (run["out"] / "maps" / f"{run['ids']['c']}.png").exists()


def test_patients_csv_aggregates_one_patient_over_two_slides(run):
    p1 = _by(_rows(run["out"] / "patients.csv"), "patient")["P1"]
    assert (p1["inputs"], p1["tissue_tiles"], p1["idc_tiles"]) == ("2", "8", "4")
    assert float(p1["idc_fraction"]) == pytest.approx(4 / 8)
    assert float(p1["idc_area_mm2"]) == pytest.approx(0.16)
    assert float(p1["mean_prob"]) == pytest.approx((sum(PROBS) + sum(B_PROBS)) / 8, abs=1e-6)
    assert float(p1["max_prob"]) == pytest.approx(0.9, abs=1e-6)
    c = _by(_rows(run["out"] / "patients.csv"), "patient")["c"]  # only an unscored slide
    assert (c["inputs"], c["inputs_not_reported"], c["idc_fraction"]) == ("0", "1", "")


def test_geojson_is_qupath_featurecollection_of_idc_tiles(run):
    for key, tile_px, expected in (("a", 400, {(0, 0), (1, 1), (3, 4)}), ("evil", 50, {(0, 0), (1, 1), (3, 4)}),
                                   ("b", 400, {(1, 0)})):
        gj = json.loads((run["out"] / "geojson" / f"{run['ids'][key]}.geojson").read_text())
        assert gj["type"] == "FeatureCollection"
        found = set()
        for f in gj["features"]:
            assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
            ring = f["geometry"]["coordinates"][0]
            assert len(ring) == 5 and ring[0] == ring[-1]
            xs, ys = {p[0] for p in ring}, {p[1] for p in ring}
            assert max(xs) - min(xs) == tile_px and max(ys) - min(ys) == tile_px
            col, row = min(xs) / tile_px, min(ys) / tile_px
            found.add((int(row), int(col)))
            props = f["properties"]
            assert props["objectType"] == "detection"
            assert props["classification"]["name"] == "IDC" and len(props["classification"]["color"]) == 3
            assert props["measurements"]["IDC probability"] >= 0.5
            assert (props["measurements"]["Tile row"], props["measurements"]["Tile col"]) == (row, col)
        assert found == expected


def test_patch_folder_geojson_matches_kaggle_names(run):
    """Tile (row, col) of a patient folder starts at x = col*50, y = row*50: the file name's X-1, Y-1."""
    gj = json.loads((run["out"] / "geojson" / f"{run['ids']['evil']}.geojson").read_text())
    corners = {tuple(f["geometry"]["coordinates"][0][0]) for f in gj["features"]}
    assert corners == {(0, 0), (50, 50), (200, 150)}


def test_probability_pyramids_of_reported_inputs_only(run):
    import zarr

    names = sorted(p.name for p in (run["out"] / "pyramids").iterdir())
    assert names == sorted(f"{safe_name(run['ids'][k])}{s}" for k in ("a", "b", "evil") for s in (".ome.tif", ".ome.zarr"))
    g = zarr.open_group(str(run["out"] / "pyramids" / f"{run['ids']['a']}.ome.zarr"), mode="r")
    m = np.asarray(g["0"][:])
    assert m.shape == (4, 5) and np.nansum(m) == pytest.approx(sum(PROBS), rel=1e-6)
    # patient folders: one map pixel is one 50 px Kaggle patch at the model's 4.0 µm/px: 200 µm
    g = zarr.open_group(str(run["out"] / "pyramids" / f"{safe_name(run['ids']['evil'])}.ome.zarr"), mode="r")
    assert g.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [200.0, 200.0]


def test_a_listing_of_the_report_keeps_every_part_file_and_drops_the_maps_arrays(run):
    """What a re-run on object storage keeps of its one listing of the report folder (``part_listing``): every file
    of every reported input's part that is there (``part_names``), without the OME-Zarr maps' arrays and chunks."""
    from cancernet_batch.stages.report import part_listing, part_names

    out = run["out"]
    listing = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    kept = part_listing(listing)
    for k in ("a", "b", "evil"):  # the reported inputs: each part whole, and whole in what is kept
        names = part_names(run["ids"][k], ReportConfig())
        assert names <= listing and names <= kept, sorted(names - kept)
    in_maps = {n for n in listing if ".ome.zarr/" in n}
    assert len(in_maps) >= 3 * 8  # the maps' groups, arrays and chunks, a few for each of the three
    assert kept == listing - in_maps | {n for n in in_maps if n.endswith(".ome.zarr/.zattrs")}


def test_two_tasks_that_find_an_input_scored_at_once_make_its_part_once(tmp_path):
    """Two chunk tasks that finish together may each see every chunk of their input scored (``report_if_last``):
    with the input's claim, the one that claims it first makes the report part and the other returns None (nothing
    written, no failure), however their steps interleave; the claim holds for the rest of the run."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from cancernet_batch.aggregate import REPORTED, Threshold
    from cancernet_batch.stages.report import report_if_last

    run_dir = tmp_path / "run"
    gid = add_input(run_dir, tmp_path / "slides" / "a.svs", COORDS, PROBS, chunk=2)
    run = Run.of(run_dir)
    claim = f"report-test-{safe_name(gid)}"
    both = threading.Barrier(2)

    def task(_):
        group = run.open_input(gid)
        both.wait()  # at the same moment, as two workers' tasks
        return report_if_last(run, gid, group, "P1", Threshold(0.5, "--threshold"), ReportConfig(), claim)

    for _ in range(3):  # a few interleavings; the claim is dropped between them, as a new run's would differ
        with ThreadPoolExecutor(2) as pool:
            made = [r for r in pool.map(task, range(2)) if r is not None]
        assert len(made) == 1, made
        row, failure = made[0]
        assert failure is None and row.figures.status == REPORTED
        assert (run_dir / "report" / row.heatmap).is_file()
        assert run.claim(claim) is False  # still held: a third task would not make it either
        assert run.release_claims() == 1
    assert not list(run_dir.glob(".tmp-claim-*"))


def test_a_claim_is_the_first_callers_and_a_stale_one_goes_with_the_temporaries(tmp_path):
    """``Run.claim``: one caller of many gets True; ``release_claims`` frees them all; one a killed run left is
    removed with the run's temporary files as the next run starts; a name with a path in it is refused."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    run = Run.of(tmp_path / "run").create()
    start = threading.Barrier(8)

    def claim(_):
        start.wait()
        return run.claim("report-abc-x")

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(claim, range(8))) == [False] * 7 + [True]
    assert run.claim("report-abc-y") is True  # another name: its own claim
    (tmp_path / "run" / "kept.txt").write_text("not a claim")
    assert run.release_claims() == 2 and run.claim("report-abc-y") is True
    assert run.remove_stale_report_temps() >= 1 and not list((tmp_path / "run").glob(".tmp-claim-*"))
    assert (tmp_path / "run" / "kept.txt").is_file()
    with pytest.raises(ValueError):
        run.claim("../x")


def test_region_columns_and_regions_geojson(run):
    """At 0.5 the IDC tiles of a, b and evil touch only at corners: one region each (4-connectivity)."""
    rows = _by(_rows(run["out"] / "inputs.csv"), "input_id")
    got = {k: (rows[run["ids"][k]]["idc_regions"], rows[run["ids"][k]]["largest_region_mm2"]) for k in "abc"}
    assert got == {"a": ("3", "0.04"), "b": ("1", "0.04"), "c": ("", "")}
    p1 = _by(_rows(run["out"] / "patients.csv"), "patient")["P1"]
    assert (p1["idc_regions"], p1["largest_region_mm2"]) == ("4", "0.04")
    for key, corners in (("a", {(0, 0), (400, 400), (1600, 1200)}), ("evil", {(0, 0), (50, 50), (200, 150)})):
        gj = json.loads((run["out"] / "geojson" / f"{run['ids'][key]}.regions.geojson").read_text())
        assert {tuple(f["geometry"]["coordinates"][0][0]) for f in gj["features"]} == corners
        for f in gj["features"]:
            assert f["properties"]["objectType"] == "annotation"
            assert f["properties"]["measurements"]["Tile count"] == 1
            assert f["properties"]["measurements"]["Area mm^2"] == pytest.approx(0.04)


def test_idc_map_saved_in_store(run):
    g = Run.of(run["dir"]).open_store("r")["inputs"][run["ids"]["a"]]
    m = g["idc_map"][:]
    assert m.shape == (4, 5) and m.dtype == np.float32
    assert np.isfinite(m).sum() == 5 and m[0, 0] == pytest.approx(0.9) and np.isnan(m[3, 0])
    assert g["idc_map"].attrs["model_id"] == MODEL_ID


def test_heatmaps_are_bounded_non_blank_pngs(run):
    for key in ("a", "b", "evil"):
        img = np.asarray(Image.open(run["out"] / "maps" / f"{run['ids'][key]}.png").convert("RGB"))
        assert max(img.shape[:2]) <= 1200
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20


def test_failures_csv_is_copied(run):
    failures = read_failures(run["out"] / "failures.csv")
    assert failures == [Failure("/data/broken.svs", "tile", "InputError", "truncated")]


def test_formula_patient_is_neutralised_in_csv_and_escaped_in_html(run):
    inputs = _by(_rows(run["out"] / "inputs.csv"), "input_id")
    assert inputs[run["ids"]["evil"]]["patient"] == "'" + EVIL
    assert "'" + EVIL in _by(_rows(run["out"] / "patients.csv"), "patient")
    html = (run["out"] / "index.html").read_text()
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.scripts, self.views, self.other = [], [], [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        elif tag == "a" and not a.get("href", "#").startswith("#"):
            self.links.append(a["href"])
        elif tag == "script":
            self.scripts.append(a.get("src"))
        elif tag in ("link", "iframe", "object", "embed"):
            self.other += 1
        if "data-view" in a:
            self.views.append(a["data-view"])


def test_index_html_references_only_local_files_that_exist(run):
    refs = _Refs()
    refs.feed((run["out"] / "index.html").read_text())
    reported = ("a", "b", "evil")
    assert sorted(refs.imgs) == sorted(f"maps/{run['ids'][k]}.png" for k in reported)
    assert refs.scripts == ["viewer.js"] and refs.other == 0  # one local script, no inline code
    assert sorted(refs.views) == sorted(f"maps/{run['ids'][k]}.view.js" for k in reported)
    for ref in refs.imgs + refs.links + refs.scripts + refs.views:
        assert "://" not in ref and not ref.startswith("/")
        assert (run["out"] / ref).is_file(), ref
    viewer = (run["out"] / "viewer.js").read_text()
    assert "__INFERNO__" not in viewer and len(re.findall(r"\b[0-9a-f]{1536}\b", viewer)) == 1  # the colour table
    assert not re.search(r"\b(fetch|XMLHttpRequest|import\(|https?://)", viewer)  # nothing from the network


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_zoomable_map_in_headless_chromium(run):
    """Real mouse events through Chromium: pin a tile, zoom about the pointer, list the regions, draw."""
    from io import BytesIO

    gid = run["ids"]["a"]
    box = f'document.querySelector(\'div.zoom[data-id="{gid}"]\')'
    with Browser((run["out"] / "index.html").as_uri(), width=1200, height=1400) as b:
        b.eval(f"{box}.scrollIntoView()")
        b.wait_for(f"{box}.dataset.ready === '1'")

        def page_xy(r, c):  # centre of tile (r, c) in page CSS pixels
            return b.eval(f"""(() => {{ const v = {box}.viewer, q = v.toCanvas({r}, {c}),
                               rect = v.canvas.getBoundingClientRect();
                               return [rect.left + q[0] * rect.width / v.canvas.width,
                                       rect.top + q[1] * rect.height / v.canvas.height]; }})()""")

        def canvas_png():
            rect = b.eval(f"(() => {{ const r = {box}.querySelector('canvas').getBoundingClientRect();"
                          " return [r.left, r.top, r.right, r.bottom]; })()")
            img = np.asarray(Image.open(BytesIO(b.screenshot())).convert("RGB")).astype(int)
            x0, y0, x1, y1 = (int(round(v)) for v in rect)
            return img[y0 + 2:y1 - 2, x0 + 2:x1 - 2]

        before = canvas_png()
        assert len(np.unique(before.reshape(-1, 3), axis=0)) > 50  # thumbnail and map colours, not blank
        x, y = page_xy(0, 0)  # tile (0, 0) of input a: P = 0.9, IDC
        b.click(x, y)
        readout = b.eval(f"{box}.querySelector('.readout').textContent")
        assert "row 0, col 0" in readout and "P(IDC) = 0.900 (IDC)" in readout and readout.startswith("pinned")
        assert b.eval(f"{box}.dataset.pinned") == "0,0"
        b.click(*page_xy(0, 1))  # P = 0.2: not IDC
        assert b.eval(f"{box}.querySelector('.readout').textContent").endswith("P(IDC) = 0.200")
        b.click(*page_xy(0, 4))  # no tile there: background
        assert b.eval(f"{box}.querySelector('.readout').textContent").endswith("not scored")
        # the wheel zooms about the pointer: the tile under it stays under it
        x, y = page_xy(2, 3)
        b.mouse("mouseWheel", x, y, deltaX=0, deltaY=-600)
        assert float(b.eval(f"{box}.dataset.zoom")) > 4
        assert b.eval(f"""(() => {{ const v = {box}.viewer, rect = v.canvas.getBoundingClientRect();
                          return v.tileAt(({x} - rect.left) * v.canvas.width / rect.width,
                                          ({y} - rect.top) * v.canvas.height / rect.height); }})()""") == [2, 3]
        after = canvas_png()
        assert np.abs(after - before).mean() > 5  # the picture changed with the zoom
        # regions: at 0.5 the IDC tiles (0,0), (1,1), (3,4) touch only diagonally: three foci of one tile
        items = b.eval(f"Array.from({box}.querySelectorAll('.regions li')).map(li => li.textContent)")
        assert len(items) == 3 and all(t.startswith("0.040 mm², 1 tiles") for t in items), items
        b.eval(f"{box}.querySelector('.regions a').click()")
        assert float(b.eval(f"{box}.dataset.zoom")) > 1


# ---------------------------------------------------------------------------------------------
# re-runs, failures, stale files
# ---------------------------------------------------------------------------------------------

def test_rerun_gives_identical_csvs_and_drops_stale_maps(tmp_path):
    run_dir = tmp_path / "run"
    a = add_input(run_dir, tmp_path / "a.svs", COORDS, PROBS)
    b = add_input(run_dir, tmp_path / "b.svs", B_COORDS, B_PROBS)
    out = run_dir / "report"
    make_report(run_dir, ReportConfig(threshold=0.5))
    first = {n: (out / n).read_bytes() for n in ("inputs.csv", "patients.csv", "failures.csv", "index.html")}
    make_report(run_dir, ReportConfig(threshold=0.5))
    assert {n: (out / n).read_bytes() for n in first} == first
    assert not list(out.rglob(".tmp-*"))
    del Run.of(run_dir).open_store()["inputs"][b]
    make_report(run_dir, ReportConfig(threshold=0.5))
    assert sorted(p.name for p in (out / "maps").iterdir()) == [f"{a}.png", f"{a}.thumb.jpg", f"{a}.view.js"]
    assert sorted(p.name for p in (out / "geojson").iterdir()) == [f"{a}.geojson", f"{a}.regions.geojson"]
    assert sorted(p.name for p in (out / "pyramids").iterdir()) == [f"{a}.ome.tif", f"{a}.ome.zarr"]


def test_one_broken_input_fails_alone_and_recovers(tmp_path):
    run_dir = tmp_path / "run"
    add_input(run_dir, tmp_path / "a.svs", COORDS, PROBS)
    b = add_input(run_dir, tmp_path / "b.svs", B_COORDS, B_PROBS)
    g = Run.of(run_dir).open_store()["inputs"][b]
    del g["coords"]
    s = make_report(run_dir, ReportConfig(threshold=0.5))
    assert (s.reported, s.failed) == (1, 1)
    assert [f.stage for f in read_failures(run_dir / "failures.csv")] == ["report"]
    assert _by(_rows(run_dir / "report" / "inputs.csv"), "input_id")[b]["status"] == "failed"
    add_input(run_dir, tmp_path / "b.svs", B_COORDS, B_PROBS)  # fixed (re-tiled and re-scored)
    s = make_report(run_dir, ReportConfig(threshold=0.5))
    assert (s.reported, s.failed) == (2, 0)
    assert read_failures(run_dir / "failures.csv") == []


def test_names_and_patients_with_dot_dot_stay_inside_report(tmp_path):
    run_dir = tmp_path / "deep" / "run"
    evil_dir = tmp_path / "x" / ".." / ".." / "=evil name"
    gid = add_input(run_dir, str(evil_dir / ".." / "..") + "/../slide.svs", COORDS, PROBS)
    add_input(run_dir, tmp_path / "p" / "folder", COORDS, PROBS, kind="patches", patient="../../../outside",
              tile_px=50, source_mpp=None)
    (tmp_path / "map.csv").write_text("input,patient\nslide.svs,../../../../etc/evil\n")
    before = {p for p in tmp_path.rglob("*") if "tiles.zarr" not in p.parts}
    s = make_report(run_dir, ReportConfig(threshold=0.5, patients_csv=str(tmp_path / "map.csv")))
    new = {p for p in tmp_path.rglob("*") if "tiles.zarr" not in p.parts} - before
    report = (run_dir / "report").resolve()
    assert new and all(p.resolve() == report or report in p.resolve().parents or p in (run_dir / "failures.csv", run_dir / ".lock")
                       for p in new), new
    assert s.reported == 2 and "../../../../etc/evil" in {r.figures.patient for r in s.inputs}
    assert (run_dir / "report" / "maps" / f"{gid}.png").is_file()


@pytest.mark.parametrize("text", ["../../etc/passwd", "..", ".hidden", "a/b\\c", "=1+2", "", "ok-name_1.2"])
def test_safe_name(text):
    name = safe_name(text)
    assert name and "/" not in name and "\\" not in name and not name.startswith((".", "=", "-"))
    assert name == text or name != safe_name(text + "x")
    assert safe_name("ok-name_1.2") == "ok-name_1.2"


# ---------------------------------------------------------------------------------------------
# thumbnails
# ---------------------------------------------------------------------------------------------

def test_thumbnail_stored_view_first_then_slide_then_mosaic(tmp_path):
    slide = tmp_path / "s.svs"
    truth = write_slide(SlideSpec(slide, width=1024, height=1024, mpp=1.0, seed=1))
    rc = np.argwhere(truth.tissue)
    probs = np.where(truth.idc[rc[:, 0], rc[:, 1]], 0.9, 0.1)
    run_dir = tmp_path / "run"
    add_input(run_dir, slide, rc, probs, grid_shape=truth.tissue.shape, tile_px=200, source_mpp=1.0,
              source_size=slide.stat().st_size)
    s = make_report(run_dir, ReportConfig(threshold=0.5))
    assert [r.thumbnail for r in s.inputs] == ["slide (openslide)"]
    img = np.asarray(Image.open(run_dir / "report" / s.inputs[0].heatmap).convert("RGB"))
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 200  # the rendered tissue, not flat tiles
    slide.rename(tmp_path / "moved.svs")
    s = make_report(run_dir, ReportConfig(threshold=0.5))
    assert [r.thumbnail for r in s.inputs] == ["stored tiles"]
    assert (run_dir / "report" / s.inputs[0].heatmap).is_file()
    g = next(g for _, g in store.iter_inputs(Run.of(run_dir).open_store()))
    rows, cols = truth.tissue.shape
    g.create_array("thumbnail", shape=(rows * 8, cols * 8, 3), dtype="uint8", fill_value=200)  # tiling's view
    s = make_report(run_dir, ReportConfig(threshold=0.5))
    assert [r.thumbnail for r in s.inputs] == ["stored thumbnail"]
    (tmp_path / "moved.svs").rename(slide)  # the slide is back, but the stored view still comes first (no decoding)
    s = make_report(run_dir, ReportConfig(threshold=0.5))
    assert [r.thumbnail for r in s.inputs] == ["stored thumbnail"]


def test_a_report_made_again_keeps_the_parts_made_from_the_same_data_and_redraws_the_others(tmp_path, monkeypatch):
    """A re-run over finished inputs (a resumed night) does not draw their report parts again when each was made
    from what it would be made from now and all its files are there: the tables come out byte for byte the same.
    A changed threshold, changed probabilities, a missing file or a part cut short before its stamp (a kill
    between its files and the record that it is whole) are drawn again."""
    import cancernet_batch.stages.report as report

    run_dir = tmp_path / "run"
    gid_a = add_input(run_dir, tmp_path / "a.svs", COORDS, PROBS, patient="P1")
    gid_b = add_input(run_dir, tmp_path / "b.svs", B_COORDS, B_PROBS, patient="P2")
    drawn: list[str] = []
    real = report.report_input
    monkeypatch.setattr(report, "report_input", lambda out, gid, *a, **k: drawn.append(gid) or real(out, gid, *a, **k))
    out = run_dir / "report"

    def tables() -> dict:
        return {n: (out / n).read_bytes() for n in ("inputs.csv", "patients.csv", "index.html")}

    make_report(run_dir, ReportConfig(threshold=0.5))
    assert sorted(drawn) == sorted([gid_a, gid_b])
    first, stamps = tables(), {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    drawn.clear()
    make_report(run_dir, ReportConfig(threshold=0.5))
    assert drawn == [] and tables() == first  # the same rows, nothing drawn
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.parent.name != "report")  # parts untouched
    make_report(run_dir, ReportConfig(threshold=0.6))
    assert sorted(drawn) == sorted([gid_a, gid_b])  # another threshold: every part again
    make_report(run_dir, ReportConfig(threshold=0.5))
    drawn.clear()
    root = Run.of(run_dir).open_store()
    g = root["inputs"][gid_b]
    g["probs"][:] = np.asarray(B_PROBS, np.float32)[::-1]  # scored again, other probabilities
    (out / "maps" / f"{safe_name(gid_a)}.view.js").unlink()  # a file of the part gone
    make_report(run_dir, ReportConfig(threshold=0.5))
    assert sorted(drawn) == sorted([gid_a, gid_b])
    drawn.clear()
    attrs = dict(root["inputs"][gid_a]["idc_map"].attrs)
    attrs.pop(report.PART_STAMP)
    root["inputs"][gid_a]["idc_map"].attrs.put(attrs)  # cut short between its files and its stamp
    make_report(run_dir, ReportConfig(threshold=0.5))
    assert drawn == [gid_a]


def test_a_part_whose_record_cannot_be_written_is_still_reported_and_drawn_again_next_time(tmp_path, monkeypatch,
                                                                                           caplog):
    import cancernet_batch.stages.report as report

    run_dir = tmp_path / "run"
    add_input(run_dir, tmp_path / "a.svs", COORDS, PROBS, patient="P1")

    def refused(group, row, key):
        raise OSError("read-only attributes")

    monkeypatch.setattr(report, "_stamp_part", refused)
    s = make_report(run_dir, ReportConfig(threshold=0.5))
    assert [r.figures.status for r in s.inputs] == ["reported"] and s.inputs[0].heatmap  # not a failed input
    assert "a re-run draws it again" in caplog.text
    monkeypatch.undo()
    drawn: list[str] = []
    real = report.report_input
    monkeypatch.setattr(report, "report_input", lambda out, gid, *a, **k: drawn.append(gid) or real(out, gid, *a, **k))
    make_report(run_dir, ReportConfig(threshold=0.5))
    assert len(drawn) == 1  # no record: drawn again, and recorded this time
    make_report(run_dir, ReportConfig(threshold=0.5))
    assert len(drawn) == 1


def test_thumbnail_of_plain_tiff_uses_tifffile(tmp_path):
    import tifffile

    from cancernet_batch.heatmap import slide_thumbnail

    tifffile.imwrite(tmp_path / "plain.tif", np.full((300, 400, 3), 200, np.uint8))
    t = slide_thumbnail(tmp_path / "plain.tif", 100)
    assert (t.origin, t.image.shape, t.width, t.height) == ("slide (tifffile)", (75, 100, 3), 400.0, 300.0)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def test_cli_ok_run_prints_summary_and_exits_0(tmp_path, capsys):
    run_dir = tmp_path / "run"
    add_input(run_dir, tmp_path / "a.svs", COORDS, PROBS)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text(json.dumps({"threshold": 0.55, "model_id": MODEL_ID}))
    assert main(["report", str(run_dir), "--model", str(model)]) == EXIT_OK
    out = capsys.readouterr().out
    assert str(run_dir / "report" / "index.html") in out and "1 inputs reported, 0 not scored, 0 failed" in out
    assert "threshold 0.55" in out
    assert _rows(run_dir / "report" / "inputs.csv")[0]["idc_tiles"] == "2"  # 0.9, 0.6
    assert _rows(run_dir / "report" / "inputs.csv")[0]["idc_regions"] == "2"  # diagonal: not merged
    assert main(["report", str(run_dir), "--model", str(model), "--min-region-mm2", "0.05", "--geojson-gzip"]) == EXIT_OK
    assert (_rows(run_dir / "report" / "inputs.csv")[0]["idc_regions"],
            _rows(run_dir / "report" / "inputs.csv")[0]["largest_region_mm2"]) == ("0", "0.0")
    geo = run_dir / "report" / "geojson"
    assert sorted(p.suffixes[-1] for p in geo.iterdir()) == [".geojson", ".gz"]  # the plain tile file went
    tiles = json.loads(gzip.decompress(next(geo.glob("*.geojson.gz")).read_bytes()))
    assert len(tiles["features"]) == 2
    assert json.loads(next(geo.glob("*.regions.geojson")).read_text())["features"] == []


def test_cli_missing_run_is_exit_1(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "cancernet tile" in err


def test_cli_bad_threshold_is_usage_error(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--threshold", "2"]) == EXIT_USAGE


def test_report_on_a_dask_cluster_equals_the_serial_report(tmp_path):
    """`run` makes each input's maps, heatmap and GeoJSON on its workers; the files equal a serial report's."""
    import sys

    from cancernet_batch.cluster import ClusterConfig, dask_client

    rng = np.random.default_rng(8)
    run = tmp_path / "run"
    coords = np.argwhere(np.ones((4, 5), bool))
    for k in range(4):
        add_input(run, tmp_path / f"slide-{k}.svs", coords, rng.random(len(coords)), patient=f"p{k % 2}")
    add_input(run, tmp_path / "half.svs", coords, rng.random(len(coords)), scored_chunks=2)  # not fully scored

    def files() -> dict:
        rep = run / "report"
        out = {p.relative_to(rep).as_posix(): p.read_bytes() for p in rep.rglob("*") if p.is_file()
               and p.suffix in (".csv", ".geojson", ".png")}
        root = Run.of(run).open_store("r")
        for gid, g in store.iter_inputs(root):
            if "idc_map" in g:
                out[gid + "/idc_map"] = np.asarray(g["idc_map"][...]).tobytes()
        return out

    serial = make_report(run, ReportConfig(threshold=0.5))
    want = files()
    shutil.rmtree(run / "report")
    with dask_client(ClusterConfig(workers=2, dashboard=False)) as client:
        parallel = make_report(run, ReportConfig(threshold=0.5), client=client)
        rendered_there = client.run(lambda: "cancernet_batch.heatmap" in sys.modules)
    assert all(rendered_there.values())  # the heatmaps were drawn on the workers
    assert [(r.figures.input_id, r.figures.status, r.heatmap, r.geojson) for r in parallel.inputs] == \
        [(r.figures.input_id, r.figures.status, r.heatmap, r.geojson) for r in serial.inputs]
    got = files()
    assert got.keys() == want.keys() and sum(k.endswith(".png") for k in got) == 4
    for key in want:
        if key.endswith(".png"):  # compare pixels: PNG metadata may differ between processes
            import io

            assert np.array_equal(np.asarray(Image.open(io.BytesIO(got[key]))),
                                  np.asarray(Image.open(io.BytesIO(want[key])))), key
        else:
            assert got[key] == want[key], key


def test_worker_tasks_open_their_input_without_deleting_other_writers_temporaries(tmp_path):
    """Report tasks run side by side: one opening the store must not remove another's in-flight ``*.partial``
    file (that race failed one input in 1,000 of the load test). Only the client's open_root cleans up."""
    run = tmp_path / "run"
    coords = np.argwhere(np.ones((2, 2), bool))
    gid = add_input(run, tmp_path / "a.svs", coords, np.full(len(coords), 0.5))
    in_flight = run / "tiles.zarr" / "inputs" / gid / "zarr.json.1f2e3d.partial"
    in_flight.write_text("{}")
    g = Run.of(run).open_input(gid)
    assert g.attrs["source"].endswith("a.svs") and in_flight.exists()
    Run.of(run).open_store("r+")  # the client opening the run: whatever is left now is stale
    assert not in_flight.exists()
