"""Patient-level train / validation / test splits.

Patches of one patient are strongly correlated (same slide, same stain, neighbouring tissue), so a
split by patch would leak and flatter the metrics. Every split here puts whole patients on one
side, and no patient is ever on two sides.

**Stratified split** (:func:`stratified_split`). Patients are sorted by their IDC ratio (ties in
random order) and cut into as many consecutive groups as patients are wanted; one patient is drawn
at random from each group. So the held-out patients span the range of IDC ratios, from all-benign
to all-IDC. A draw is kept only if every side has patches of both classes and each held-out side
has at least :data:`MIN_CLASS_SHARE` of each class's patches; the draw is repeated (same seed,
next draw) until one passes. If no draw of :data:`MAX_DRAWS` can give a held-out side 10% of each
class, the first draw with both classes on every side is kept; if even that is impossible (e.g.
only one patient has non-IDC patches), a :class:`ConfigError` says so.

**Published split** (:func:`split_from_file`). A folder with ``cases_train.txt``,
``cases_val.txt``, ``cases_test.txt`` (Janowczyk & Madabhushi 2016), one such file, or a
``split.json`` written by ``cancernet train``. Patients of the data that no list names are left out
of training (role ``excluded``) with a warning; a split that names none of the patients present is
an error.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import write_text
from .errors import ConfigError, InputError

log = logging.getLogger(__name__)

ROLES = ("train", "val", "test", "excluded")
MIN_CLASS_SHARE = 0.10
MAX_DRAWS = 1000
SPLIT_FILES = {"train": "cases_train.txt", "val": "cases_val.txt", "test": "cases_test.txt"}


@dataclass(frozen=True)
class Split:
    """Patients per role. ``excluded``: present in the data but used for nothing (in no list of a split file)."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    method: str = ""

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for role in ROLES:
            for p in getattr(self, role):
                if p in seen:
                    raise ConfigError(f"patient {p} is in both the {seen[p]} and the {role} set",
                                      hint="a patient must be on one side of the split only")
                seen[p] = role

    def role_of(self, patient: str) -> str:
        """``train``, ``val``, ``test``, ``excluded``, or ``unseen`` for a patient the split does not know."""
        for role in ROLES:
            if patient in getattr(self, role):
                return role
        return "unseen"

    def roles(self) -> dict[str, str]:
        return {p: role for role in ROLES for p in getattr(self, role)}

    def to_dict(self) -> dict:
        return {"method": self.method, **{role: sorted(getattr(self, role)) for role in ROLES}}

    @classmethod
    def from_dict(cls, d: dict) -> "Split":
        return cls(**{role: tuple(str(p) for p in d.get(role, ())) for role in ROLES}, method=str(d.get("method", "")))

    def save(self, path: str | os.PathLike) -> Path:
        return write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def class_counts(patients: np.ndarray, labels: np.ndarray) -> dict[str, tuple[int, int]]:
    """``{patient: (n_non_idc, n_idc)}`` from per-patch patient ids and 0/1 labels."""
    out: dict[str, list[int]] = {}
    for p, lab in zip(np.asarray(patients).astype(str).tolist(), np.asarray(labels).tolist()):
        out.setdefault(p, [0, 0])[int(lab)] += 1
    return {p: (c[0], c[1]) for p, c in sorted(out.items())}


def _side_ok(counts: dict[str, tuple[int, int]], side: list[str], totals: tuple[int, int], share: float) -> bool:
    n0 = sum(counts[p][0] for p in side)
    n1 = sum(counts[p][1] for p in side)
    return n0 >= max(1, share * totals[0]) and n1 >= max(1, share * totals[1])


def stratified_split(counts: dict[str, tuple[int, int]], val_fraction: float = 0.2, test_fraction: float = 0.0,
                     seed: int = 42) -> Split:
    """Whole patients to validation (and test), stratified by IDC ratio; see the module doc for the rule."""
    pids = sorted(counts)
    n = len(pids)
    n_val = max(1, round(val_fraction * n))
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise ConfigError(f"{n} patient(s) cannot be split into train, {n_val} validation and {n_test} test patients",
                          hint="a patient-level split needs at least 2 patients (3 with a test set); add patients")
    totals = (sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values()))
    ratio = {p: counts[p][1] / max(1, sum(counts[p])) for p in pids}
    rng = np.random.default_rng(seed)

    def pick(pool: list[str], k: int) -> list[str]:
        tiebreak = dict(zip(pool, rng.random(len(pool))))
        order = sorted(pool, key=lambda p: (ratio[p], tiebreak[p]))
        return [str(g[rng.integers(len(g))]) for g in np.array_split(np.array(order, dtype=object), k)] if k else []

    fallback = None
    for draw in range(MAX_DRAWS):
        test = pick(pids, n_test)
        val = pick([p for p in pids if p not in test], n_val)
        train = [p for p in pids if p not in test and p not in val]
        sides = [s for s in (train, val, test) if s]
        if not all(_side_ok(counts, s, totals, 0.0) for s in sides):
            continue
        how = (f"stratified by patient IDC ratio; seed {seed}, draw {draw + 1}; val_fraction {val_fraction}, "
               f"test_fraction {test_fraction}")
        split = Split(tuple(train), tuple(val), tuple(test), method=how)
        if all(_side_ok(counts, s, totals, MIN_CLASS_SHARE) for s in sides):
            return split
        fallback = fallback or split
    if fallback is not None:
        log.warning("no draw gives every side %.0f%% of each class's patches; kept the first with both classes "
                    "on every side", 100 * MIN_CLASS_SHARE)
        return fallback
    with_0 = [p for p in pids if counts[p][0]]
    with_1 = [p for p in pids if counts[p][1]]
    raise ConfigError(f"no patient-level split puts both classes on every side: {len(with_0)} patient(s) have "
                      f"non-IDC patches, {len(with_1)} have IDC patches",
                      hint="add patients with both kinds of patches, lower --test-fraction, or give --split")


def cv_folds(counts: dict[str, tuple[int, int]], k: int, seed: int = 42) -> list[tuple[str, ...]]:
    """``k`` disjoint groups of whole patients (the held-out patients of each cross-validation fold).

    Stratified as :func:`stratified_split`: patients sorted by IDC ratio (ties in random order) are
    cut into consecutive groups of ``k``, and each group's patients are dealt to the folds in random
    order, so every fold spans the range of IDC ratios. A draw is kept when every fold's held-out
    patients and its training patients (the other folds) have both classes; otherwise the draw is
    repeated (same seed, next draw), and after :data:`MAX_DRAWS` the first draw whose training sides
    all have both classes is kept with a warning (too few patients of one class to give every fold
    both). ConfigError when ``k`` is below 2 or above the number of patients, or when no draw gives
    every training side both classes.
    """
    pids = sorted(counts)
    n = len(pids)
    if k < 2 or k > n:
        raise ConfigError(f"--cv {k} needs between 2 and {n} folds ({n} patients)",
                          hint="use e.g. --cv 5; each fold holds out at least one whole patient")
    ratio = {p: counts[p][1] / max(1, sum(counts[p])) for p in pids}
    totals = (sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values()))
    rng = np.random.default_rng(seed)
    fallback = None
    for draw in range(MAX_DRAWS):
        tiebreak = dict(zip(pids, rng.random(n)))
        order = sorted(pids, key=lambda p: (ratio[p], tiebreak[p]))
        folds: list[list[str]] = [[] for _ in range(k)]
        start = int(rng.integers(k))  # which fold a short last group misses
        for g in range(0, n, k):
            group = order[g:g + k]
            slots = rng.permutation(k)[:len(group)] if len(group) == k else (start + np.arange(len(group))) % k
            for p, f in zip(group, slots):
                folds[int(f)].append(p)
        folds_t = [tuple(sorted(f)) for f in folds]
        trains = [[p for p in pids if p not in f] for f in folds_t]
        if not all(_side_ok(counts, t, totals, 0.0) for t in trains):
            continue
        if all(_side_ok(counts, list(f), totals, 0.0) for f in folds_t):
            return folds_t
        fallback = fallback or folds_t
    if fallback is not None:
        with_0 = sum(1 for p in pids if counts[p][0])
        log.warning("%d patient(s) have non-IDC patches and %d IDC patches: not every one of the %d folds can hold "
                    "out both classes", with_0, sum(1 for p in pids if counts[p][1]), k)
        return fallback
    raise ConfigError(f"no {k}-fold split by patient leaves both classes in every fold's training patients",
                      hint="use fewer folds (--cv), or add patients with both kinds of patches")


def read_split_file(path: str | os.PathLike) -> tuple[dict[str, list[str]], str | None]:
    """Patient lists per role from a split folder, one ``cases_*.txt`` file, or a ``split.json``.

    Returns ``({role: [ids]}, other_role)`` where ``other_role`` is where patients of the data that
    a single list does not name go (``val`` for a train list, ``train`` for a val or test list), or
    None when the file gives every role.
    """
    p = Path(path)
    if p.is_dir():
        lists = {role: _read_ids(p / name) for role, name in SPLIT_FILES.items() if (p / name).is_file()}
        if not lists:
            raise ConfigError("no split lists in this folder", path=p,
                              hint=f"expected {', '.join(SPLIT_FILES.values())}")
        return lists, None
    if not p.is_file():
        raise ConfigError("split file not found", path=p, hint="give a folder with cases_{train,val,test}.txt")
    if p.suffix == ".json":
        try:
            d = json.loads(p.read_text(encoding="utf-8-sig"))
            lists = {role: [str(x) for x in d.get(role, [])] for role in ("train", "val", "test")}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as exc:
            raise ConfigError("not a split.json (expected {\"train\": [...], \"val\": [...], \"test\": [...]})",
                              path=p, hint="use the split.json that `cancernet train` wrote") from exc
        return lists, None
    name = p.name.lower()
    role = next((r for r in ("train", "val", "test") if r in name), None)
    if role is None:
        raise ConfigError("cannot tell which side this list is", path=p,
                          hint="name it cases_train.txt, cases_val.txt or cases_test.txt, or give the folder")
    return {role: _read_ids(p)}, ("val" if role == "train" else "train")


def _read_ids(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a list re-saved by a spreadsheet starts with a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the patient list ({exc.__class__.__name__})", path=path,
                          hint="a list holds one patient id per line") from exc
    return [t.strip() for t in text.splitlines() if t.strip() and not t.strip().startswith("#")]


def split_from_file(path: str | os.PathLike, counts: dict[str, tuple[int, int]]) -> Split:
    """Apply a published split to the patients present (``counts``); see the module doc."""
    lists, other = read_split_file(path)
    present = set(counts)
    listed = {p for ids in lists.values() for p in ids}
    known = listed & present
    if not known:
        sample = ", ".join(sorted(present)[:5])
        raise ConfigError(f"the split names none of the {len(present)} patients in the data ({sample}...); it lists "
                          f"{len(listed)} others", path=path, hint="check that the split belongs to this dataset")
    roles = {role: sorted(set(ids) & present) for role, ids in lists.items()}
    unlisted = sorted(present - listed)
    if other is not None:
        roles[other] = sorted(set(roles.get(other, [])) | set(unlisted))
        unlisted = []
    missing = len(listed - present)
    if missing or unlisted:
        log.warning("split %s: %d of its %d patients are in the data, %d are not; %d patient(s) of the data are in "
                    "no list and are left out%s", path, len(known), len(listed), missing, len(unlisted),
                    f" ({', '.join(unlisted[:10])})" if unlisted else "")
    split = Split(tuple(roles.get("train", [])), tuple(roles.get("val", [])), tuple(roles.get("test", [])),
                  tuple(unlisted), method=f"published patient lists from {path}")
    if not split.train:
        raise ConfigError("no training patient of the split is in the data", path=path,
                          hint="give data that holds the split's training patients, or use --val-fraction")
    if not split.val:
        raise ConfigError("no validation patient of the split is in the data; early stopping and the threshold need "
                          "them", path=path, hint="give a split with a val list, or use --val-fraction instead")
    return split


def check_training_classes(counts: dict[str, tuple[int, int]], split: Split) -> None:
    """InputError unless the training patients have both classes; warnings for one-class held-out sides."""
    for role in ("train", "val", "test"):
        side = getattr(split, role)
        if not side:
            continue
        n0 = sum(counts[p][0] for p in side)
        n1 = sum(counts[p][1] for p in side)
        if role == "train" and (n0 == 0 or n1 == 0):
            missing = "non-IDC (class 0)" if n0 == 0 else "IDC (class 1)"
            raise InputError(f"the training patients have no {missing} patches", path=", ".join(side[:5]),
                             hint="training needs both classes: add patients with PATIENT/0 and PATIENT/1 patches")
        if n0 == 0 or n1 == 0:
            log.warning("the %s patients have only %s patches (%d): balanced accuracy and AUC are undefined there%s",
                        role, "IDC" if n0 == 0 else "non-IDC", n0 + n1,
                        "; the threshold stays at 0.5" if role == "val" else "")


def make_split(counts: dict[str, tuple[int, int]], *, split_file: str | os.PathLike | None = None,
               val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 42) -> Split:
    """The split for training: from ``split_file`` when given, else stratified; classes checked."""
    if split_file is not None:
        split = split_from_file(split_file, counts)
    else:
        split = stratified_split(counts, val_fraction, test_fraction, seed)
    check_training_classes(counts, split)
    return split
