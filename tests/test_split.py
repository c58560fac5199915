"""Patient-level splits: no patient on two sides, stratified by IDC ratio, both classes held out, published lists."""

from __future__ import annotations

import csv
import json
import logging

import pytest

from cancernet_batch.errors import ConfigError, InputError
from cancernet_batch.split import Split, class_counts, make_split, split_from_file, stratified_split

# 20 patients whose IDC ratios span 0..1, of unequal size
COUNTS = {f"p{i:02d}": (int(100 * (1 - i / 19)) + 3 * i, int(100 * i / 19) + i) for i in range(20)}


def _real_counts(idc_dir):
    counts: dict[str, list[int]] = {}
    with open(idc_dir / "MANIFEST.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            counts.setdefault(row["patient"], [0, 0])[int(row["label"])] += 1
    return {p: tuple(c) for p, c in counts.items()}


def _sides(split: Split):
    return [set(split.train), set(split.val), set(split.test), set(split.excluded)]


def _assert_disjoint_cover(split: Split, counts):
    sides = _sides(split)
    assert sum(len(s) for s in sides) == len(set().union(*sides)) == len(counts)  # no patient twice, none lost


def test_stratified_split_is_disjoint_deterministic_and_stratified():
    s = stratified_split(COUNTS, 0.2, 0.0, seed=1)
    _assert_disjoint_cover(s, COUNTS)
    assert len(s.val) == 4 and not s.test
    assert s == stratified_split(COUNTS, 0.2, 0.0, seed=1)
    assert s != stratified_split(COUNTS, 0.2, 0.0, seed=2)
    # one patient from each fifth of the IDC-ratio range
    order = sorted(COUNTS, key=lambda p: COUNTS[p][1] / sum(COUNTS[p]))
    fifths = [set(order[i:i + 5]) for i in range(0, 20, 5)]
    assert all(len(f & set(s.val)) == 1 for f in fifths)
    for side in (s.train, s.val):
        n0 = sum(COUNTS[p][0] for p in side)
        n1 = sum(COUNTS[p][1] for p in side)
        assert n0 > 0 and n1 > 0


def test_three_way_split():
    s = stratified_split(COUNTS, 0.2, 0.2, seed=0)
    _assert_disjoint_cover(s, COUNTS)
    assert len(s.val) == 4 and len(s.test) == 4 and len(s.train) == 12
    assert "seed 0" in s.method


def test_real_data_split_holds_out_both_classes(idc_dir):
    counts = _real_counts(idc_dir)
    for seed in range(5):
        s = stratified_split(counts, 0.2, 0.0, seed)
        _assert_disjoint_cover(s, counts)
        total0 = sum(c[0] for c in counts.values())
        val0 = sum(counts[p][0] for p in s.val)
        assert val0 >= 0.1 * total0 and sum(counts[p][1] for p in s.val) > 0  # enough non-IDC to measure specificity
        assert sum(counts[p][0] for p in s.train) > 0


def test_impossible_split_is_a_clear_error():
    counts = {"a": (50, 10), "b": (0, 40), "c": (0, 30)}  # only one patient has non-IDC patches
    with pytest.raises(ConfigError, match="1 patient\\(s\\) have non-IDC"):
        stratified_split(counts, 0.3)
    with pytest.raises(ConfigError, match="cannot be split"):
        stratified_split({"a": (5, 5)}, 0.2)


def test_janowczyk_lists_partial_overlap_warns_with_counts(idc_dir, caplog):
    counts = _real_counts(idc_dir)
    with caplog.at_level(logging.WARNING, logger="cancernet_batch"):
        s = split_from_file(idc_dir / "janowczyk_split", counts)
    _assert_disjoint_cover(s, counts)
    assert set(s.excluded) == {"8863", "8950", "8984"}  # in none of the published lists
    assert s.test == ("8918",) and "8865" in s.train and "8917" in s.val
    msg = caplog.text
    assert "16 of its 162 patients are in the data, 146 are not" in msg and "3 patient(s)" in msg


def test_janowczyk_validation_has_one_class_only_warns(idc_dir, caplog):
    counts = _real_counts(idc_dir)
    with caplog.at_level(logging.WARNING, logger="cancernet_batch"):
        make_split(counts, split_file=idc_dir / "janowczyk_split")
    assert "val patients have only IDC patches" in caplog.text and "threshold stays at 0.5" in caplog.text


def test_split_naming_none_of_the_patients_is_an_error(tmp_path):
    (tmp_path / "cases_train.txt").write_text("1\n2\n")
    (tmp_path / "cases_val.txt").write_text("3\n")
    with pytest.raises(ConfigError, match="names none of the 20 patients"):
        split_from_file(tmp_path, COUNTS)


def test_single_list_and_split_json(tmp_path):
    f = tmp_path / "cases_val.txt"
    f.write_text("p03\n\n# comment\np17\n")
    s = split_from_file(f, COUNTS)
    assert s.val == ("p03", "p17") and len(s.train) == 18
    s.save(tmp_path / "split.json")
    assert json.loads((tmp_path / "split.json").read_text())["val"] == ["p03", "p17"]
    assert split_from_file(tmp_path / "split.json", COUNTS).val == s.val
    with pytest.raises(ConfigError, match="which side"):
        (tmp_path / "patients.txt").write_text("p01\n")
        split_from_file(tmp_path / "patients.txt", COUNTS)


def test_overlapping_lists_are_refused(tmp_path):
    (tmp_path / "cases_train.txt").write_text("p01\np02\n")
    (tmp_path / "cases_val.txt").write_text("p02\n")
    with pytest.raises(ConfigError, match="p02 is in both"):
        split_from_file(tmp_path, COUNTS)


def test_training_side_needs_both_classes():
    counts = {"a": (0, 10), "b": (0, 20), "c": (30, 5)}
    split = Split(("a", "b"), ("c",))
    from cancernet_batch.split import check_training_classes

    with pytest.raises(InputError, match="no non-IDC"):
        check_training_classes(counts, split)


def test_class_counts():
    import numpy as np

    assert class_counts(np.array(["x", "y", "x"]), np.array([1, 0, 0])) == {"x": (1, 1), "y": (1, 0)}
