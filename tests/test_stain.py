"""Per-patient stain normalisation (``cancernet train --stain-norm``): what it maps to, what its statistics
depend on (own pixels only, never labels or other patients), and that scoring refuses a model trained on it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cancernet_batch import stain
from cancernet_batch.cli import main
from cancernet_batch.config import STAIN_NORMS, TrainConfig
from cancernet_batch.errors import EXIT_ERROR, EXIT_OK, ConfigError

# a source stain pair unlike the reference: Ruifrok & Johnston's haematoxylin and eosin (columns)
SOURCE = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]).T
SOURCE /= np.linalg.norm(SOURCE, axis=0, keepdims=True)


def _concentrations(n: int, seed: int) -> np.ndarray:
    """(n, 50, 50, 2) H and E amounts: a fifth of the pixels pure H, a fifth pure E, a fifth glass, the rest mixed."""
    rng = np.random.default_rng(seed)
    c = rng.gamma(2.0, 0.3, (n, 50, 50, 2))
    kind = rng.integers(0, 5, (n, 50, 50))
    c[kind == 0, 1] = 0.0
    c[kind == 1, 0] = 0.0
    c[kind == 2] = 0.0
    return c


def _render(conc: np.ndarray, stains: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(256.0 * np.exp(-(conc @ stains.T)) - 1.0), 0, 255).astype(np.uint8)


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


def test_macenko_recovers_a_known_stain_and_maps_it_to_the_reference():
    conc = _concentrations(40, seed=1)
    dense = _render(conc * 1.4, SOURCE)  # the same tissue, other dyes and 40 % denser
    s = stain.macenko_stats(dense)
    for j in range(2):  # haematoxylin first, eosin second, each within 3 degrees of the true dye
        assert _angle(s["stains"][:, j], SOURCE[:, j]) < 3.0
    # what the reference would look like: the same amounts, the reference dyes, scaled to the reference maxima
    want = _render(conc * stain.MACENKO_MAX / np.percentile(conc.reshape(-1, 2), stain.CONC_PERCENTILE, axis=0),
                   stain.MACENKO_STAINS)
    got = stain.macenko_apply(dense, s)
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.mean() < 3.0 and np.percentile(diff, 95) < 8
    raw = np.abs(dense.astype(int) - want.astype(int)).mean()
    assert raw > 5 * diff.mean()  # it did move the colours a long way
    # macenko-hue: the reference dyes, the patient's own amounts (the 40 % extra density stays)
    hue = stain.apply(dense, stain.estimate(dense, "macenko-hue"), "macenko-hue")
    diff = np.abs(hue.astype(int) - _render(conc * 1.4, stain.MACENKO_STAINS).astype(int))
    assert diff.mean() < 3.0 and np.percentile(diff, 95) < 8


def test_reinhard_maps_the_tissue_colour_statistics_to_the_reference():
    conc = _concentrations(40, seed=2)
    a, b = _render(conc, SOURCE), _render(conc * 1.4, stain.MACENKO_STAINS)
    na, nb = (stain.reinhard_apply(t, stain.reinhard_stats(t)) for t in (a, b))
    for t, n in ((a, na), (b, nb)):  # over the pixels that were tissue before: the reference mean and spread
        tissue = (stain._od(t.reshape(-1, 3)) >= stain.BETA).all(axis=1)
        lab = stain._lab(n.reshape(-1, 3)[tissue])
        np.testing.assert_allclose(lab.mean(axis=0), stain.REINHARD_MEAN, atol=0.03)
        np.testing.assert_allclose(lab.std(axis=0), stain.REINHARD_STD, rtol=0.2)
    before = np.abs(a.astype(int) - b.astype(int)).mean()
    after = np.abs(na.astype(int) - nb.astype(int)).mean()
    # two stainings of one tissue end up closer, though not equal: Reinhard matches each channel's mean and
    # spread, not the dyes, so pixels of other hue mixes stay apart (Macenko above: within 3 levels)
    assert after < 0.75 * before


def test_what_the_statistics_depend_on_when_the_tissue_mix_changes():
    """Stain *directions* do not depend on how much of a patient is dense tissue; the scale statistics do.

    One patient all dense tissue, another half dense, half pale (the same dyes): Macenko's stain vectors
    agree within a degree, but its 99th-percentile concentrations and Reinhard's mean do not, so a
    normaliser built on them treats a patient's class mix as a staining difference."""
    conc = _concentrations(40, seed=3)
    dense = _render(conc, SOURCE)
    mixed = _render(np.concatenate([conc[:20], conc[20:] * 0.4]), SOURCE)
    sd, sm = stain.macenko_stats(dense), stain.macenko_stats(mixed)
    for j in range(2):
        assert _angle(sd["stains"][:, j], sm["stains"][:, j]) < 1.0
    assert np.all(sm["max"] < 0.97 * sd["max"])
    rd, rm = stain.reinhard_stats(dense), stain.reinhard_stats(mixed)
    assert rm["mean"][0] - rd["mean"][0] > 0.05  # paler on average (l is log-brightness)


@pytest.mark.parametrize("method", ["macenko", "macenko-hue", "reinhard"])
def test_each_patient_is_normalised_from_its_own_pixels_only_and_deterministically(method):
    tiles = np.concatenate([_render(_concentrations(12, seed=10 + i) * (0.6 + 0.3 * i), SOURCE) for i in range(3)])
    blank = np.full((4, 50, 50, 3), 250, np.uint8)  # glass only: nothing to estimate from
    tiles = np.concatenate([tiles, blank])
    patients = np.array(["a"] * 12 + ["b"] * 12 + ["c"] * 12 + ["glass"] * 4)
    out, record = stain.normalise_by_patient(tiles, patients, method)
    again, _ = stain.normalise_by_patient(tiles, patients, method)
    np.testing.assert_array_equal(out, again)
    for p in ("a", "b", "c"):  # alone (as a held-out patient of a fold) exactly as among the others
        sel = patients == p
        alone, _ = stain.normalise_by_patient(tiles[sel], patients[sel], method)
        np.testing.assert_array_equal(out[sel], alone)
        assert record[p] is not None
    assert record["glass"] is None
    np.testing.assert_array_equal(out[patients == "glass"], blank)
    assert not np.array_equal(out[:36], tiles[:36])
    none, rec = stain.normalise_by_patient(tiles, patients, "none")
    assert none is tiles and rec == {}


def test_the_option_is_validated_in_the_config_and_the_cli(capsys):
    with pytest.raises(ConfigError, match="--stain-norm 'vahadane'"):
        TrainConfig(stain_norm="vahadane")
    assert TrainConfig().stain_norm == "none"  # not the default: scoring does not normalise (RESULTS.md)
    from cancernet_batch.cli import cli

    opts = {o.name: o for o in cli.commands["train"].params}
    assert tuple(opts["stain_norm"].type.choices) == STAIN_NORMS == stain.METHODS
    assert main(["train", "x", "--out", "y", "--stain-norm", "vahadane"]) == 2
    assert "--stain-norm" in capsys.readouterr().err


def test_cv_held_out_patients_are_scored_normalised_with_their_own_statistics(synth_patch_dir, tmp_path, capsys,
                                                                              monkeypatch):
    """End to end: the fold models are scored on held-out tiles normalised with those patients' own statistics
    (the same as normalising them alone); the record is in model.json; scoring such a model is refused."""
    from cancernet_batch import cv as cv_mod
    from cancernet_batch.patches import load

    seen = []
    real = cv_mod.member_logits

    def recording(models, tiles, *, tta):
        seen.append(tiles.copy())
        return real(models, tiles, tta=tta)

    monkeypatch.setattr(cv_mod, "member_logits", recording)
    out = tmp_path / "m"
    rc = main(["train", str(synth_patch_dir), "--out", str(out), "--cv", "2", "--epochs", "1", "--width", "4",
               "--bootstrap", "10", "--seed", "1", "--stain-norm", "macenko"])
    assert rc == EXIT_OK, capsys.readouterr().err
    meta = json.loads((out / "model.json").read_text())
    rec = meta["training"]["stain_norm"]
    assert rec["method"] == "macenko" and set(rec["per_patient"]) == {p.name for p in synth_patch_dir.iterdir() if p.is_dir()}
    assert "stain-normalised (macenko" in meta["input"]
    raw = load([synth_patch_dir])
    for f, held in enumerate(meta["split"]["folds"]):
        sel = np.isin(raw.patients, held)
        alone, _ = stain.normalise_by_patient(raw.tiles[sel], raw.patients[sel], "macenko")
        np.testing.assert_array_equal(seen[2 * f], alone)  # single-model scoring of fold f's held-out patients
    capsys.readouterr()
    rc = main(["evaluate", str(out), str(synth_patch_dir)])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR and err.count("\n") == 1 and "--stain-norm macenko" in err


def test_run_refuses_a_stain_normalised_model_before_writing_anything(synth_patch_dir, tmp_path, capsys):
    """``cancernet run`` with a model trained with ``--stain-norm reinhard``: one line naming the model and the
    fix, and nothing tiled or scored (scoring feeds raw tiles)."""
    model = tmp_path / "m"
    rc = main(["train", str(synth_patch_dir), "--out", str(model), "--epochs", "1", "--width", "4",
               "--bootstrap", "10", "--seed", "1", "--stain-norm", "reinhard"])
    assert rc == EXIT_OK, capsys.readouterr().err
    assert json.loads((model / "model.json").read_text())["training"]["config"]["stain_norm"] == "reinhard"
    capsys.readouterr()
    out = tmp_path / "run"
    rc = main(["run", str(synth_patch_dir), "--out", str(out), "--model", str(model), "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR and err.count("\n") == 1, err
    assert str(model / "model.json") in err and "--stain-norm reinhard" in err and "--stain-norm none" in err
    assert not (out / "predict.json").exists() and not (out / "tiles.zarr").exists()
