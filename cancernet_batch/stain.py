"""Per-patient stain normalisation of uint8 H&E patches (``cancernet train --stain-norm``), plain numpy.

Each patient's patches are mapped to one fixed reference colour with statistics estimated from that
patient's own pixels only, **without labels**: a patient's normalised tiles depend on nothing but its
own tiles, whether it is a training or a held-out patient of a fold, so no fold can leak into another.
Statistics come from a deterministic sample of at most :data:`SAMPLE_PIXELS` pixels of the patient.

* ``macenko`` (Macenko et al. 2009): in optical density (OD, ``-ln((I + 1) / 256)``), the tissue
  pixels (every channel's OD >= :data:`BETA`) span a plane (their top-2 SVD directions); the
  haematoxylin and eosin vectors are the directions at the 1st and 99th percentiles of the pixel
  angles in that plane, and each stain's scale is the 99th percentile of its concentration. Each
  pixel's concentrations are rescaled to the reference maxima and re-stained with the reference
  vectors (:data:`MACENKO_STAINS`, :data:`MACENKO_MAX`: the reference of Macenko's published
  implementation). Stain directions and high percentiles depend on the class mix less than means
  do (an IDC patch has more nuclei, not other dyes), but the 99th-percentile concentration still
  rises with the share of dense tissue (measured: ``training/stain_by_patient.py --by-mix``).
* ``macenko-hue``: Macenko's stain vectors only: each pixel re-stained with the reference dyes, its
  amounts of each dye kept (no per-patient scale). Only the stain *directions* are estimated, which do
  not move with the class mix (measured within a few degrees); a patient's stain density is left as it is.
* ``reinhard`` (Reinhard et al. 2001, as HistomicsTK applies it to H&E): in Ruderman's lαβ space
  (natural log of LMS of 0-255 RGB), each channel's mean and standard deviation over the tissue pixels
  are mapped to :data:`REINHARD_MEAN` / :data:`REINHARD_STD` (HistomicsTK's documented default
  target). A mean is a class-mix statistic: a patient of dense IDC tissue and one of pale benign
  tissue are pulled to the same mean colour.

Not applied at inference yet: a model trained with ``--stain-norm`` other than ``none`` expects
normalised patches, which ``cancernet run`` does not produce (``training/RESULTS.md``).
"""

from __future__ import annotations

import numpy as np

METHODS = ("none", "macenko", "macenko-hue", "reinhard")
"""``cancernet train --stain-norm`` choices."""

SAMPLE_PIXELS = 200_000
"""Most pixels of one patient that its statistics are estimated from (a fixed-seed sample)."""
BETA = 0.15
"""OD below which a channel counts as unstained: pixels with any channel below it are not tissue."""
ANGLE_PERCENTILE = 1.0
CONC_PERCENTILE = 99.0
MACENKO_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
"""Reference OD vectors (columns: haematoxylin, eosin; rows R, G, B)."""
MACENKO_MAX = np.array([1.9705, 1.0308])
"""Reference 99th-percentile concentrations (haematoxylin, eosin)."""
REINHARD_MEAN = np.array([8.63234435, -0.11501964, 0.03868433])
REINHARD_STD = np.array([0.57506023, 0.10403329, 0.01364062])

_RGB2LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
_LMS2LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array([[1, 1, 1], [1, 1, -2], [1, -1, 0]])
_LMS2RGB = np.linalg.inv(_RGB2LMS)
_LAB2LMS = np.linalg.inv(_LMS2LAB)
_CHUNK = 256  # tiles normalised at a time (float64 intermediates stay ~15 MB)


def _od(rgb: np.ndarray) -> np.ndarray:
    return -np.log((rgb.astype(np.float64) + 1.0) / 256.0)


def _from_od(od: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)


def _lab(rgb: np.ndarray) -> np.ndarray:
    lms = np.maximum(rgb.astype(np.float64) @ _RGB2LMS.T, 1.0)  # log of 0 is -inf: black stays black-ish
    return np.log(lms) @ _LMS2LAB.T


def _from_lab(lab: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.exp(lab @ _LAB2LMS.T) @ _LMS2RGB.T), 0, 255).astype(np.uint8)


def sample_pixels(tiles: np.ndarray, n: int = SAMPLE_PIXELS) -> np.ndarray:
    """At most ``n`` RGB pixels ``(m, 3)`` of ``tiles``, a fixed-seed sample (the same tiles give the same pixels)."""
    px = tiles.reshape(-1, 3)
    if len(px) <= n:
        return px
    return px[np.sort(np.random.default_rng(0).choice(len(px), n, replace=False))]


def _tissue(od: np.ndarray) -> np.ndarray:
    return od[(od >= BETA).all(axis=1)]


def macenko_stats(tiles: np.ndarray) -> dict:
    """Stain vectors ``stains`` (3, 2: H, E columns) and 99th-percentile concentrations ``max`` (2,) of ``tiles``.

    Raises ValueError when fewer than 100 sampled pixels are tissue (nothing to estimate stains from).
    """
    od = _od(sample_pixels(tiles))
    t = _tissue(od)
    if len(t) < 100:
        raise ValueError(f"only {len(t)} tissue pixels: no stain vectors can be estimated")
    # the top-2 right singular vectors of the tissue OD (Macenko's plane), signs fixed to point into positive OD
    _, _, vt = np.linalg.svd(t, full_matrices=False)
    plane = vt[:2].T * np.where(vt[:2].sum(axis=1) < 0, -1.0, 1.0)
    proj = t @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # haematoxylin absorbs red most (its R component is the larger); eosin is the other
    stains = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1], axis=1)
    stains /= np.linalg.norm(stains, axis=0, keepdims=True)
    conc = np.linalg.lstsq(stains, od.T, rcond=None)[0]
    return {"stains": stains, "max": np.percentile(conc, CONC_PERCENTILE, axis=1)}


def macenko_apply(tiles: np.ndarray, stats: dict, *, rescale: bool = True) -> np.ndarray:
    """``tiles`` re-stained with the reference: concentrations in ``stats['stains']``, scaled to :data:`MACENKO_MAX`
    (unless not ``rescale``: then only the dyes change, each pixel's amounts stay)."""
    unmix = np.linalg.pinv(stats["stains"])  # (2, 3)
    scale = MACENKO_MAX / np.maximum(stats["max"], 1e-6) if rescale else np.ones(2)
    out = np.empty_like(tiles)
    for s in range(0, len(tiles), _CHUNK):
        od = _od(tiles[s:s + _CHUNK])
        conc = (od @ unmix.T) * scale
        out[s:s + _CHUNK] = _from_od(conc @ MACENKO_STAINS.T)
    return out


def reinhard_stats(tiles: np.ndarray) -> dict:
    """Mean and standard deviation (3,) of the lαβ channels over the tissue pixels of ``tiles``."""
    px = sample_pixels(tiles)
    keep = (_od(px) >= BETA).all(axis=1)
    if keep.sum() < 100:
        raise ValueError(f"only {int(keep.sum())} tissue pixels: no colour statistics can be estimated")
    lab = _lab(px[keep])
    return {"mean": lab.mean(axis=0), "std": np.maximum(lab.std(axis=0), 1e-6)}


def reinhard_apply(tiles: np.ndarray, stats: dict) -> np.ndarray:
    """``tiles`` with each lαβ channel standardised by ``stats`` and mapped to the reference mean / std."""
    gain = REINHARD_STD / stats["std"]
    out = np.empty_like(tiles)
    for s in range(0, len(tiles), _CHUNK):
        lab = _lab(tiles[s:s + _CHUNK])
        out[s:s + _CHUNK] = _from_lab((lab - stats["mean"]) * gain + REINHARD_MEAN)
    return out


_STATS = {"macenko": macenko_stats, "macenko-hue": macenko_stats, "reinhard": reinhard_stats}
_APPLY = {"macenko": macenko_apply, "macenko-hue": lambda t, s: macenko_apply(t, s, rescale=False),
          "reinhard": reinhard_apply}


def estimate(tiles: np.ndarray, method: str) -> dict:
    """One input's (one patient's) statistics of ``method``, from its own pixels only."""
    return _STATS[method](tiles)


def apply(tiles: np.ndarray, stats: dict, method: str) -> np.ndarray:
    """``tiles`` normalised with one input's ``stats`` (from :func:`estimate`)."""
    return _APPLY[method](tiles, stats)


def normalise_by_patient(tiles: np.ndarray, patients: np.ndarray, method: str) -> tuple[np.ndarray, dict]:
    """A normalised copy of ``tiles`` where each patient's patches use that patient's own statistics.

    Labels are not an argument: nothing but a patient's own pixels decides its statistics. Returns the
    tiles and ``{patient: statistics as lists}`` (for the model's record). A patient without enough tissue
    to estimate from keeps its tiles unchanged and is recorded with ``None``.
    """
    if method == "none":
        return tiles, {}
    if method not in _STATS:
        raise ValueError(f"unknown stain normalisation {method!r}; use one of {', '.join(METHODS)}")
    out = np.empty_like(tiles)
    record: dict = {}
    for p in sorted(set(patients.tolist())):
        sel = np.flatnonzero(patients == p)
        try:
            stats = estimate(tiles[sel], method)
        except ValueError:
            out[sel] = tiles[sel]
            record[p] = None
            continue
        out[sel] = apply(tiles[sel], stats, method)
        record[p] = {k: np.asarray(v).round(6).tolist() for k, v in stats.items()}
    return out, record
