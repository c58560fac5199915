"""IDC maps, per-input and per-patient figures, the threshold rule, patient maps and Dice."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from reportdata import MODEL_ID, add_input

from cancernet_batch import store
from cancernet_batch.aggregate import (NOT_SCORED, REPORTED, input_figures, input_state, level0_tile_px, load_scored,
                                       patient_figures, patient_of, read_patient_map, resolve_threshold, tile_area_mm2,
                                       unmatched_keys)
from cancernet_batch.truth import compare_with_truth, dice, input_accuracy
from cancernet_batch.errors import ConfigError, InputError, ModelError
from cancernet_batch.store import InputAttrs
from cancernet_batch.synth import SlideSpec, SlideTruth, write_slide
from cancernet_batch.runfolder import Run

COORDS = [(0, 0), (0, 1), (1, 1), (2, 3), (3, 4)]
PROBS = [0.9, 0.2, 0.6, 0.49, 0.5]  # at 0.5: three IDC tiles (0.9, 0.6, 0.5); 0.49 is not


def _group(run, gid):
    return Run.of(run).open_store("r")["inputs"][gid]


def test_tile_area_is_200_um_squared_at_4_mpp():
    assert tile_area_mm2(4.0) == pytest.approx(0.04)
    assert tile_area_mm2(2.0) == pytest.approx(0.01)


def test_figures_match_hand_computation(tmp_path):
    gid = add_input(tmp_path / "run", tmp_path / "a.svs", COORDS, PROBS)
    s = load_scored(gid, _group(tmp_path / "run", gid), "P1")
    f = input_figures(s, 0.5)
    assert (f.tissue_tiles, f.idc_tiles, f.status, f.model_id) == (5, 3, REPORTED, MODEL_ID)
    assert f.idc_fraction == pytest.approx(0.6)
    assert f.idc_area_mm2 == pytest.approx(0.12)
    assert f.tissue_area_mm2 == pytest.approx(0.20)
    assert f.mean_prob == pytest.approx(np.mean(PROBS), abs=1e-6)
    assert f.max_prob == pytest.approx(0.9, abs=1e-6)
    assert input_figures(s, 0.95).idc_tiles == 0 and input_figures(s, 0.0).idc_tiles == 5


def test_idc_map_places_probabilities_and_nan_elsewhere(tmp_path):
    gid = add_input(tmp_path / "run", tmp_path / "a.svs", COORDS, PROBS, grid_shape=(4, 5))
    m = load_scored(gid, _group(tmp_path / "run", gid), "").idc_map()
    assert m.shape == (4, 5) and m.dtype == np.float32
    assert np.isfinite(m).sum() == 5
    for (r, c), p in zip(COORDS, PROBS):
        assert m[r, c] == pytest.approx(p)
    assert math.isnan(m[3, 0])


def test_tiles_without_grid_position_are_counted_but_not_mapped(tmp_path):
    gid = add_input(tmp_path / "run", tmp_path / "plain", [(-1, -1), (0, 0)], [0.7, 0.8], kind="patches",
                    grid_shape=(1, 1), tile_px=50)
    s = load_scored(gid, _group(tmp_path / "run", gid), "")
    assert input_figures(s, 0.5).idc_tiles == 2
    assert np.isfinite(s.idc_map()).sum() == 1


def test_input_state(tmp_path):
    run = tmp_path / "run"
    ok = add_input(run, tmp_path / "ok.svs", COORDS, PROBS, chunk=2)
    part = add_input(run, tmp_path / "part.svs", COORDS, PROBS, chunk=2, scored_chunks=2)
    raw = add_input(run, tmp_path / "raw.svs", COORDS, PROBS, complete=False)
    assert input_state(_group(run, ok)) == (REPORTED, "")
    assert input_state(_group(run, part)) == (NOT_SCORED, "2 of 3 chunks scored")
    assert input_state(_group(run, raw)) == (NOT_SCORED, "tiling incomplete")


def test_level0_tile_px_defaults():
    base = dict(source="x", reader="r", patient="p", source_size=0, source_mtime=0.0, target_mpp=4.0,
                grid_shape=(1, 1), n_tiles=1)
    assert level0_tile_px(InputAttrs(kind="slide", source_mpp=0.5, level0_tile_px=400.0, **base)) == 400.0
    assert level0_tile_px(InputAttrs(kind="slide", source_mpp=0.25, **base)) == pytest.approx(800.0)
    assert level0_tile_px(InputAttrs(kind="patches", **base)) == 50.0


def test_patient_aggregation(tmp_path):
    run = tmp_path / "run"
    a = add_input(run, tmp_path / "a.svs", COORDS, PROBS)
    b = add_input(run, tmp_path / "b.svs", COORDS[:3], [0.1, 0.2, 0.6])
    rows = [input_figures(load_scored(g, _group(run, g), "P1"), 0.5) for g in (a, b)]
    rows.append(input_figures(load_scored(a, _group(run, a), "P2"), 0.5))
    p1, p2 = patient_figures(rows)
    assert (p1.patient, p1.inputs, p1.tissue_tiles, p1.idc_tiles) == ("P1", 2, 8, 4)
    assert p1.idc_fraction == pytest.approx(4 / 8)
    assert p1.idc_area_mm2 == pytest.approx(4 * 0.04)
    assert p1.mean_prob == pytest.approx((sum(PROBS) + 0.9) / 8, abs=1e-6)
    assert p1.max_prob == pytest.approx(0.9, abs=1e-6)
    assert (p2.patient, p2.inputs, p2.idc_tiles) == ("P2", 1, 3)


# ---------------------------------------------------------------------------------------------
# threshold rule
# ---------------------------------------------------------------------------------------------

def _model(tmp_path, threshold, model_id="m-1"):
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.json").write_text(json.dumps({"threshold": threshold, "model_id": model_id}))
    return d


def test_threshold_explicit_wins(tmp_path):
    t = resolve_threshold(tmp_path, 0.3, _model(tmp_path, 0.7))
    assert (t.value, t.source, t.is_default) == (0.3, "--threshold", False)


def test_threshold_from_model_json(tmp_path):
    t = resolve_threshold(tmp_path, None, _model(tmp_path, 0.42))
    assert (t.value, t.model_id, t.is_default) == (0.42, "m-1", False)
    assert "model.json" in t.source


def test_threshold_from_predict_json(tmp_path):
    model = _model(tmp_path, 0.35)
    (tmp_path / "predict.json").write_text(json.dumps({"model_dir": str(model), "model_id": "m-1"}))
    assert resolve_threshold(tmp_path).value == 0.35
    (tmp_path / "predict.json").write_text(json.dumps({"model_dir": str(model), "threshold": 0.61}))
    assert resolve_threshold(tmp_path).value == 0.61


def test_threshold_default_says_so(tmp_path, caplog):
    t = resolve_threshold(tmp_path)
    assert (t.value, t.is_default) == (0.5, True)
    assert "default" in t.source and "default" in caplog.text


def test_threshold_errors(tmp_path):
    with pytest.raises(ModelError, match="no model.json"):
        resolve_threshold(tmp_path, None, tmp_path / "nomodel")
    with pytest.raises(ConfigError, match="not in"):
        resolve_threshold(tmp_path, None, _model(tmp_path, 1.5))


# ---------------------------------------------------------------------------------------------
# patient map
# ---------------------------------------------------------------------------------------------

def _attrs(source, patient=""):
    return InputAttrs(source=str(source), kind="slide", reader="r", patient=patient, source_size=0,
                      source_mtime=0.0, target_mpp=4.0, grid_shape=(1, 1), n_tiles=1)


def test_patient_map_matches_name_path_or_id(tmp_path):
    csv_path = tmp_path / "map.csv"
    csv_path.write_text(f"input,patient\na.svs,PA\n{tmp_path / 'dir' / 'b.svs'},PB\nc-1234abcd,PC\n")
    m = read_patient_map(csv_path)
    assert patient_of("a-0", _attrs(tmp_path / "a.svs"), m) == "PA"
    assert patient_of("b-0", _attrs(tmp_path / "dir" / "b.svs"), m) == "PB"
    assert patient_of("c-1234abcd", _attrs(tmp_path / "c.svs"), m) == "PC"
    assert patient_of("d-0", _attrs(tmp_path / "d.svs", "8863"), m) == "8863"  # Kaggle folder name
    assert patient_of("e-0", _attrs(tmp_path / "e.svs"), m) == "e"  # else the file stem
    assert unmatched_keys({**m, "typo.svs": "X"}, [("a-0", _attrs(tmp_path / "a.svs"))]) == [
        str(tmp_path / "dir" / "b.svs"), "c-1234abcd", "typo.svs"]


@pytest.mark.parametrize("text,match", [("file,who\na,b\n", "columns input,patient"),
                                         ("input,patient\na,P1\na,P2\n", "two patients"),
                                         ("input,patient\na,\n", "empty")])
def test_patient_map_errors(tmp_path, text, match):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(InputError, match=match):
        read_patient_map(tmp_path / "m.csv")
    with pytest.raises(InputError, match="cannot read"):
        read_patient_map(tmp_path / "missing.csv")
    (tmp_path / "bin.csv").write_bytes(b"input,patient\n\xff\xfe\x00,x\n")
    with pytest.raises(InputError, match="cannot read"):
        read_patient_map(tmp_path / "bin.csv")


# ---------------------------------------------------------------------------------------------
# Dice and map accuracy
# ---------------------------------------------------------------------------------------------

def test_dice_values():
    a = np.array([[1, 1, 0], [0, 0, 0]], bool)
    b = np.array([[1, 0, 0], [0, 1, 0]], bool)
    assert dice(a, b) == pytest.approx(2 * 1 / 4)
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    assert dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    with pytest.raises(ConfigError):
        dice(a, a[:1])


def test_compare_with_truth_counts():
    tissue = np.array([[1, 1, 1], [1, 1, 0]], float)
    idc = np.array([[1, 1, 0], [0, 0, 0]], float)
    truth = SlideTruth(tissue, idc)
    m = np.array([[0.9, np.nan, 0.7], [0.1, 0.2, np.nan]], np.float32)  # (0,1) true IDC but not scored
    acc = compare_with_truth(m, truth, 0.5)
    assert (acc.true_positive, acc.false_positive, acc.false_negative, acc.true_negative) == (1, 1, 1, 2)
    assert acc.dice == pytest.approx(2 / 4)
    assert acc.sensitivity == 0.5 and acc.precision == 0.5 and acc.specificity == pytest.approx(2 / 3)
    assert acc.tissue_dice == pytest.approx(2 * 4 / (4 + 5))
    with pytest.raises(ConfigError, match="differs"):
        compare_with_truth(m[:, :2], truth, 0.5)


def test_input_accuracy_against_synthetic_slide(tmp_path):
    slide = tmp_path / "s.svs"
    truth = write_slide(SlideSpec(slide, width=1024, height=1024, mpp=1.0, seed=1))
    truth.save(tmp_path / "s.truth.npz")
    rc = np.argwhere(truth.tissue)
    probs = np.where(truth.idc[rc[:, 0], rc[:, 1]], 0.9, 0.1).astype(np.float32)
    run = tmp_path / "run"
    gid = add_input(run, slide, rc, probs, grid_shape=truth.tissue.shape, tile_px=200, source_mpp=1.0)
    assert truth.idc.sum() > 0
    perfect = input_accuracy(run, gid, 0.5)
    assert perfect.dice == 1.0 and perfect.tissue_dice == 1.0
    wrong = int(np.flatnonzero(~truth.idc[rc[:, 0], rc[:, 1]])[0])  # one false positive
    probs[wrong] = 0.95
    gid = add_input(run, slide, rc, probs, grid_shape=truth.tissue.shape, tile_px=200, source_mpp=1.0)
    k = int(truth.idc.sum())
    assert input_accuracy(run, gid, 0.5).dice == pytest.approx(2 * k / (2 * k + 1))
    with pytest.raises(InputError, match="no input"):
        input_accuracy(run, "nope", 0.5)
