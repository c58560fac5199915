"""Synthetic IDC-like H&E tissue: patient patch folders (Kaggle layout) and pyramidal slides.

Everything is drawn from one procedural tissue model (:class:`TissueModel`) defined in *physical*
space (microns), so the same patient looks the same at any resolution, a slide can be rendered
tile by tile in bounded memory, and the ground truth on the model's tile grid (50 px at 4.0 µm/px,
i.e. 200 µm squares) is computed from the same fields that draw the pixels.

The picture: white background; pink stroma (eosin) with sparse small nuclei (haematoxylin);
benign dense regions (lymphocyte-like clusters of small nuclei) as a confounder; IDC regions
with crowded, larger nuclei. Stain colours and intensities vary per patient. Labels come from the
IDC field (a tile is IDC when at least half its area is IDC), so tiles on region borders are
genuinely ambiguous and a model can be good but not perfect.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import DEFAULT_MPP, PATCH_SIZE
from .atomic import atomic_path, write_csv
from .errors import ConfigError

log = logging.getLogger(__name__)

TILE_UM = PATCH_SIZE * DEFAULT_MPP
"""Physical side of one model tile in microns (50 px x 4.0 µm/px = 200 µm)."""

_M = np.uint64(0xFFFFFFFF)


# --------------------------------------------------------------------------------------------
# procedural noise (deterministic, resolution independent)
# --------------------------------------------------------------------------------------------

def _hash01(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """A float in [0, 1) for each integer lattice point (ix, iy), fixed by ``seed``."""
    h = (ix.astype(np.int64).astype(np.uint64) * np.uint64(374761393)
         + iy.astype(np.int64).astype(np.uint64) * np.uint64(668265263)
         + np.uint64(seed % 2**32) * np.uint64(2246822519)) & _M
    h = ((h ^ (h >> np.uint64(13))) * np.uint64(1274126177)) & _M
    h = h ^ (h >> np.uint64(16))
    return h.astype(np.float64) / 4294967296.0


def _lattice(ix: np.ndarray, iy: np.ndarray, seed: int, points: int):
    """``(values, xi, yi)``: ``_hash01`` on the lattice spanning the points (ix, iy) and their +1 neighbours, and
    each point's index into it; None when that lattice has more nodes than the ``points`` it serves."""
    x0, y0 = float(ix.min()), float(iy.min())
    nx, ny = int(ix.max() - x0) + 2, int(iy.max() - y0) + 2
    if nx * ny > points:
        return None
    values = _hash01((x0 + np.arange(nx))[None, :], (y0 + np.arange(ny))[:, None], seed)
    return values, (ix - x0).astype(np.intp), (iy - y0).astype(np.intp)


def _corner_values(ix: np.ndarray, iy: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    """``_hash01`` at the four lattice corners (ix, iy), (ix + 1, iy), (ix, iy + 1), (ix + 1, iy + 1) of each point.

    The points of a region share few lattice points (a feature is many pixels wide): each lattice point's value
    is computed once, on the lattice that spans them, and looked up per point; the same values bit for bit as
    hashing every point's corners. Points spread wider than their count are hashed one by one."""
    found = _lattice(ix, iy, seed, np.broadcast(ix, iy).size) if ix.size and iy.size else None
    if found is not None:
        lattice, xi, yi = found
        return lattice[yi, xi], lattice[yi, xi + 1], lattice[yi + 1, xi], lattice[yi + 1, xi + 1]
    return _hash01(ix, iy, seed), _hash01(ix + 1, iy, seed), _hash01(ix, iy + 1, seed), _hash01(ix + 1, iy + 1, seed)


def _value_noise(x: np.ndarray, y: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """Smooth value noise in [0, 1) with features about ``scale`` microns wide."""
    fx, fy = x / scale, y / scale
    ix, iy = np.floor(fx), np.floor(fy)
    tx, ty = fx - ix, fy - iy
    tx = tx * tx * (3 - 2 * tx)
    ty = ty * ty * (3 - 2 * ty)
    ix, iy = np.asarray(ix), np.asarray(iy)
    if ix.ndim == 2 and iy.ndim == 2 and ix.shape[0] == 1 and iy.shape[1] == 1 and ix.size and iy.size:
        # a row of x by a column of y (an image's pixels): interpolated along x once per lattice row, then
        # between the two lattice rows of each pixel row; the same operations on the same values, bit for bit
        found = _lattice(ix[0], iy[:, 0], seed, ix.size * iy.size)
        if found is not None:
            lattice, xi, yi = found
            left, right = lattice[:, xi], lattice[:, xi + 1]
            along_x = left + (right - left) * tx
            top, bottom = along_x[yi], along_x[yi + 1]
            return top + (bottom - top) * ty
    a, b, c, d = _corner_values(ix, iy, seed)
    return (a + (b - a) * tx) + ((c + (d - c) * tx) - (a + (b - a) * tx)) * ty


def _fbm(x: np.ndarray, y: np.ndarray, scale: float, seed: int, octaves: int = 4) -> np.ndarray:
    """Fractal value noise, normalised to roughly [0, 1]."""
    total = np.zeros(np.broadcast(x, y).shape)
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        total += amp * _value_noise(x, y, scale / 2**o, seed + 1013 * o)
        norm += amp
        amp *= 0.5
    return total / norm


def _smoothstep(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.0, 1.0)
    return v * v * (3 - 2 * v)


# --------------------------------------------------------------------------------------------
# the tissue model
# --------------------------------------------------------------------------------------------

EDGE_UM = 8.0
"""Width (µm) over which a synthetic specimen's stain goes from none to full at its edge: a section
is cut, so its edge is about a cell wide on the glass (see :meth:`TissueModel.tissue_weight`)."""
_GRAD_STEP_UM = 2.0
_EDGE_BAND = 0.1
"""``|raw - threshold|`` beyond which a point is fully in or out: the field's gradient stays under
0.02/µm (noise features of >= 225 µm: under 0.005/µm; the vignette adds 3/width: under 0.015/µm on
slides wider than 200 µm), so such a point is more than 5 µm (> EDGE_UM / 2) from the edge."""

# Optical density per unit stain (Ruifrok & Johnston H&E vectors).
_H_OD = np.array([0.650, 0.704, 0.286])
_E_OD = np.array([0.072, 0.990, 0.105])


@dataclass(frozen=True)
class TissueModel:
    """One synthetic patient (or slide): fields in microns and their rendering at any µm/px.

    ``width_um``/``height_um`` bound the specimen; with ``vignette`` the tissue thins out towards
    the edges (fewer and smaller pieces, glass around them), as on a glass slide. Each piece's own
    edge stays sharp (:meth:`tissue_weight`).
    """

    seed: int
    width_um: float
    height_um: float
    tissue_threshold: float = 0.45
    idc_threshold: float = 0.62
    vignette: bool = False
    h_od: tuple[float, float, float] = tuple(_H_OD)
    e_od: tuple[float, float, float] = tuple(_E_OD)
    h_strength: float = 1.0
    e_strength: float = 1.0
    background: float = 240.0
    idc_scale_um: float = 320.0
    """Feature size of the IDC field (µm): 320 makes islands of one or two 200 µm tiles (the patch
    sets); slides for maps use larger, tumour-sized regions (see :class:`SlideSpec`)."""

    @classmethod
    def random(cls, seed: int, width_um: float, height_um: float, *, vignette: bool = False) -> "TissueModel":
        """A patient with its own stain: H and E colours and intensities drawn from ``seed``."""
        rng = np.random.default_rng([seed, 7])
        h = _H_OD + rng.normal(0, 0.06, 3)
        e = _E_OD + rng.normal(0, 0.06, 3)
        h = np.clip(h, 0.05, None)
        e = np.clip(e, 0.02, None)
        return cls(seed=seed, width_um=width_um, height_um=height_um, vignette=vignette,
                   h_od=tuple(h / np.linalg.norm(h)), e_od=tuple(e / np.linalg.norm(e)),
                   h_strength=float(rng.uniform(0.8, 1.2)), e_strength=float(rng.uniform(0.75, 1.25)),
                   background=float(rng.uniform(230, 247)))

    # -- fields ------------------------------------------------------------------------------

    def tissue_raw(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        raw = _fbm(x, y, 900.0, self.seed * 31 + 1, octaves=3)
        if self.vignette:
            u = (x / self.width_um - 0.5) * 2
            v = (y / self.height_um - 0.5) * 2
            raw = raw * np.clip(1.25 - 0.75 * (u * u + v * v), 0, 1)
        return raw

    def tissue_weight(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tissue weight in [0, 1] at points (x, y) µm: 1 inside the specimen, 0 on glass, with an
        edge :data:`EDGE_UM` wide.

        The specimen is where ``tissue_raw`` is above ``tissue_threshold``; the weight ramps over
        the signed distance to that contour (``(raw - threshold) / |grad raw|``, in µm), not over
        ``raw`` itself, so the edge is equally sharp everywhere. A ramp in ``raw`` units made the
        edge as wide as the field is flat there: 40-90 µm typically and up to 400 µm where the
        vignette flattens it, a fading rim of faint stain that no section has.
        """
        raw = self.tissue_raw(x, y)
        d = raw - self.tissue_threshold
        near = np.abs(d) < _EDGE_BAND  # elsewhere the weight is 0 or 1 whatever the gradient
        if not near.any():
            return (d > 0).astype(np.float64)
        xb, yb = np.broadcast_arrays(x, y)
        xn, yn = xb[near], yb[near]
        h = _GRAD_STEP_UM
        gx = (self.tissue_raw(xn + h, yn) - self.tissue_raw(xn - h, yn)) / (2 * h)
        gy = (self.tissue_raw(xn, yn + h) - self.tissue_raw(xn, yn - h)) / (2 * h)
        dist = np.where(d > 0, 1.0, -1.0) * EDGE_UM  # far from the contour: fully in or out
        dist = np.broadcast_to(dist, d.shape).copy()
        dist[near] = d[near] / np.maximum(np.hypot(gx, gy), 1e-9)
        return _smoothstep(dist / EDGE_UM + 0.5)

    def fields(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tissue weight, IDC weight and benign-dense weight in [0, 1] at points (x, y) µm."""
        t = self.tissue_weight(x, y)
        idc_raw = _fbm(x, y, self.idc_scale_um, self.seed * 31 + 2, octaves=3)
        i = _smoothstep((idc_raw - self.idc_threshold) / 0.03 + 0.5) * t
        dense = _smoothstep((_fbm(x, y, 260.0, self.seed * 31 + 3, octaves=2) - 0.68) / 0.04 + 0.5) * t * (1 - i)
        return t, i, dense

    def idc_raw_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return _fbm(x, y, self.idc_scale_um, self.seed * 31 + 2, octaves=3)

    # -- truth on the model grid ------------------------------------------------------------

    def tile_truth(self, rows: int, cols: int, tile_um: float = TILE_UM, samples: int = 8
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Tissue fraction and IDC fraction of each ``tile_um`` square of a ``rows`` x ``cols`` grid."""
        off = (np.arange(samples) + 0.5) / samples * tile_um
        xs = (np.arange(cols)[:, None] * tile_um + off[None, :]).reshape(-1)
        tis = np.empty((rows, cols))
        idc = np.empty((rows, cols))
        band = max(1, 4096 // max(1, cols))  # tile rows per band: bounded memory on huge grids
        for r0 in range(0, rows, band):
            r1 = min(rows, r0 + band)
            ys = (np.arange(r0, r1)[:, None] * tile_um + off[None, :]).reshape(-1)
            t, i, _ = self.fields(xs[None, :], ys[:, None])  # a row by a column: separable noise (_value_noise)
            tis[r0:r1] = (t > 0.5).reshape(r1 - r0, samples, cols, samples).mean(axis=(1, 3))
            idc[r0:r1] = (i > 0.5).reshape(r1 - r0, samples, cols, samples).mean(axis=(1, 3))
        return tis, idc

    # -- pixels -------------------------------------------------------------------------------

    def render(self, x0: int, y0: int, width: int, height: int, mpp: float) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` of the region whose top-left pixel is (x0, y0) at ``mpp``.

        Coarse resolutions are supersampled (drawn at <= 2 µm/px and area-averaged), like a
        scanner image read at a lower pyramid level.
        """
        s = min(4, max(1, math.ceil(mpp / 2.0 - 1e-9)))  # capped: thumbnails need no finer grain
        out = np.empty((height, width, 3), np.uint8)
        band = max(1, 65536 // max(1, width * s * s))  # output rows per band: bounded memory
        for r0 in range(0, height, band):
            h = min(band, height - r0)
            fine = self._render_fine(x0 * s, (y0 + r0) * s, width * s, h * s, mpp / s)
            if s == 1:
                out[r0:r0 + h] = fine
            else:
                img = fine.reshape(h, s, width, s, 3).astype(np.float32).mean(axis=(1, 3))
                out[r0:r0 + h] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        return out

    def _render_fine(self, x0: int, y0: int, width: int, height: int, mpp: float) -> np.ndarray:
        # Slow fields on a coarse lattice (every ~4 µm), bilinearly upsampled to pixels.
        step = max(1, int(4.0 / mpp))
        gh, gw = height // step + 2, width // step + 2
        gy = (y0 + np.arange(gh) * step + 0.5) * mpp
        gx = (x0 + np.arange(gw) * step + 0.5) * mpp
        t, i, dense = self.fields(gx[None, :], gy[:, None])  # a row by a column: separable noise (_value_noise)
        rng = np.random.default_rng([self.seed, x0, y0, int(mpp * 1e4)])
        noise = rng.normal(0.0, 3.0, (height, width, 1))
        if t.max() < 1e-3:  # background only: skip the tissue texture
            img = np.full((height, width, 3), self.background) + noise
            return np.clip(np.rint(img), 0, 255).astype(np.uint8)
        fy = (np.arange(height) + 0.5) / step - 0.5
        fx = (np.arange(width) + 0.5) / step - 0.5

        def up(a: np.ndarray) -> np.ndarray:
            iy0 = np.clip(np.floor(fy).astype(int), 0, gh - 2)
            ix0 = np.clip(np.floor(fx).astype(int), 0, gw - 2)
            wy = np.clip(fy - iy0, 0, 1)[:, None]
            wx = np.clip(fx - ix0, 0, 1)[None, :]
            a00 = a[iy0][:, ix0]
            a01 = a[iy0][:, ix0 + 1]
            a10 = a[iy0 + 1][:, ix0]
            a11 = a[iy0 + 1][:, ix0 + 1]
            return (a00 * (1 - wx) + a01 * wx) * (1 - wy) + (a10 * (1 - wx) + a11 * wx) * wy

        T, I, D = up(t), up(i), up(dense)
        py = ((y0 + np.arange(height) + 0.5) * mpp)[:, None]
        px = ((x0 + np.arange(width) + 0.5) * mpp)[None, :]
        # Nuclei: thresholded noise whose grain and coverage depend on the region type.
        n_small = _value_noise(px, py, 3.2, self.seed * 31 + 5)
        n_large = _value_noise(px, py, 5.5, self.seed * 31 + 6)
        grain = n_small * (1 - I) + n_large * I
        thr = 0.78 - 0.16 * I - 0.12 * D
        nuclei = _smoothstep((grain - thr) / 0.06 + 0.5)
        stroma = _fbm(px, py, 14.0, self.seed * 31 + 7, octaves=2)
        e_conc = T * self.e_strength * (0.30 + 0.45 * stroma) * (1 - 0.35 * I)
        h_conc = T * self.h_strength * (0.08 + 1.35 * nuclei * (1 + 0.25 * I))
        od = e_conc[..., None] * np.asarray(self.e_od) + h_conc[..., None] * np.asarray(self.h_od)
        img = self.background * np.exp(-od) + noise
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def with_idc_fraction(self, tissue: np.ndarray, rows: int, cols: int, fraction: float) -> "TissueModel":
        """Move the IDC threshold so that about ``fraction`` of the tissue tiles are IDC."""
        if not np.any(tissue >= 0.5):
            return self
        ctr = (np.arange(rows)[:, None] + 0.5) * TILE_UM, (np.arange(cols)[None, :] + 0.5) * TILE_UM
        X, Y = np.broadcast_arrays(ctr[1], ctr[0])
        raw = self.idc_raw_at(X, Y)[tissue >= 0.5]
        thr = float(np.quantile(raw, 1 - min(max(fraction, 0.0), 1.0))) if fraction > 0 else 2.0
        return replace(self, idc_threshold=thr)


# --------------------------------------------------------------------------------------------
# patient patch folders (Kaggle layout)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatchSynthReport:
    """What ``synth patches`` wrote: per patient (id, class-0 count, class-1 count)."""

    out: Path
    patients: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(a + b for _, a, b in self.patients)


def synth_patient_id(index: int) -> str:
    """Synthetic patient ids: numeric like Kaggle's, but 90000+ so they never clash with real ones."""
    return str(90000 + index)


def synth_patches(out: str | os.PathLike, *, patients: int = 4, per_patient: int = 200,
                  idc_fraction: float = 0.35, seed: int = 0, first_id: int = 0, progress=None) -> PatchSynthReport:
    """Write synthetic patches in the Kaggle layout: ``OUT/{pid}/{c}/{pid}_idx5_x{X}_y{Y}_class{c}.png``.

    Each patient is one tissue image at 4.0 µm/px cut on its 50 px grid; ``X``/``Y`` are the
    1-based pixel position of the patch's top-left corner (``50*col + 1``, as in the Kaggle set).
    Only tissue patches are written (at least half the patch is tissue), like the Kaggle set.
    Patients get their own IDC ratio around ``idc_fraction`` and their own stain. Their ids are
    ``90000 + first_id + i``.
    """
    from PIL import Image

    if patients < 1 or per_patient < 1:
        raise ConfigError("--patients and --per-patient must be at least 1")
    if not 0.0 <= idc_fraction <= 1.0:
        raise ConfigError(f"--idc-fraction must be between 0 and 1, got {idc_fraction}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = PatchSynthReport(out=out)
    rng = np.random.default_rng(seed)
    manifest = []
    for p in range(patients):
        pid = synth_patient_id(first_id + p)
        frac = float(np.clip(idc_fraction * rng.uniform(0.4, 1.6), 0.0, 0.95)) if 0 < idc_fraction < 1 else idc_fraction
        side = int(math.ceil(math.sqrt(per_patient / 0.4))) + 2
        while True:
            model = TissueModel.random(seed * 1000 + p, side * TILE_UM, side * TILE_UM)
            tissue, _ = model.tile_truth(side, side)
            if int((tissue >= 0.5).sum()) >= per_patient:
                break
            side = int(side * 1.3) + 1
        model = model.with_idc_fraction(tissue, side, side, frac)
        tissue, idc = model.tile_truth(side, side)
        cand = np.argwhere(tissue >= 0.5)
        pick = cand[np.sort(rng.choice(len(cand), size=per_patient, replace=False))]
        image = model.render(0, 0, side * PATCH_SIZE, side * PATCH_SIZE, DEFAULT_MPP)
        counts = [0, 0]
        for d in ("0", "1"):
            (out / pid / d).mkdir(parents=True, exist_ok=True)
        for r, c in pick:
            label = int(idc[r, c] >= 0.5)
            x, y = c * PATCH_SIZE + 1, r * PATCH_SIZE + 1
            name = f"{pid}_idx5_x{x}_y{y}_class{label}.png"
            path = out / pid / str(label) / name
            tile = image[r * PATCH_SIZE:(r + 1) * PATCH_SIZE, c * PATCH_SIZE:(c + 1) * PATCH_SIZE]
            with atomic_path(path) as tmp:
                Image.fromarray(tile).save(tmp, format="PNG")
            counts[label] += 1
            manifest.append((f"{pid}/{label}/{name}", pid, x, y, label, float(idc[r, c]), float(tissue[r, c])))
        report.patients.append((pid, counts[0], counts[1]))
        log.info("patient %s: %d class-0, %d class-1 patches", pid, counts[0], counts[1])
        if progress is not None:
            progress(1)
    write_csv(out / "MANIFEST.csv", ["path", "patient", "x", "y", "label", "idc_fraction", "tissue_fraction"], manifest)
    return report


# --------------------------------------------------------------------------------------------
# pyramidal slides (Aperio SVS or generic tiled TIFF)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SlideTruth:
    """Ground truth of a synthetic slide on the model grid (50 px tiles at 4.0 µm/px)."""

    tissue_fraction: np.ndarray
    idc_fraction: np.ndarray
    mpp: float = DEFAULT_MPP
    tile: int = PATCH_SIZE

    @property
    def tissue(self) -> np.ndarray:
        """Tiles that are tissue: the same cut as tiling's default (:data:`tissue.DEFAULT_THRESHOLD`)."""
        from .tissue import DEFAULT_THRESHOLD

        return self.tissue_fraction >= DEFAULT_THRESHOLD

    @property
    def idc(self) -> np.ndarray:
        return (self.idc_fraction >= 0.5) & self.tissue

    def save(self, path: str | os.PathLike) -> Path:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, tissue_fraction=self.tissue_fraction, idc_fraction=self.idc_fraction,
                                    mpp=np.float64(self.mpp), tile=np.int64(self.tile))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SlideTruth":
        with np.load(path) as z:
            return cls(z["tissue_fraction"], z["idc_fraction"], float(z["mpp"]), int(z["tile"]))


@dataclass(frozen=True)
class SlideSpec:
    """One synthetic slide to write."""

    path: Path
    width: int
    height: int
    mpp: float
    seed: int
    format: str = "svs"  # "svs" (Aperio) or "tiff" (generic tiled pyramidal TIFF)
    tile: int = 256
    quality: int = 90
    level_downsample: int = 4
    idc_fraction: float = 0.3
    idc_scale_um: float = 320.0
    """Feature size of the IDC regions (µm); see :attr:`TissueModel.idc_scale_um`."""
    detail_mpp: float | None = None
    """Fast mode for big test slides: levels finer than this are drawn at it and enlarged (pixel
    repetition), so a 100k x 100k slide takes minutes, not an hour. Tissue layout and truth are
    unchanged; only fine texture is coarser. ``None``: full detail at every level."""


def _levels(width: int, height: int, ds: int, min_side: int = 256) -> list[tuple[int, int, int]]:
    levels = [(width, height, 1)]
    f = ds
    while min(width // f, height // f) >= min_side:
        levels.append((width // f, height // f, f))
        f *= ds
    return levels


def _detail_factor(mpp: float, tile: int, detail_mpp: float | None) -> int:
    """The pixel repetition of a level drawn in fast mode: the largest divisor ``f`` of ``tile`` with
    ``mpp * f <= detail_mpp`` (1 without ``detail_mpp``)."""
    if detail_mpp is None:
        return 1
    return max((k for k in range(1, tile + 1) if tile % k == 0 and mpp * k <= detail_mpp * (1 + 1e-9)), default=1)


def _band_part(model: TissueModel, cx: int, ty: int, cw: int, tile: int, mpp: float, f: int, detail: bool,
               w: int, h: int) -> np.ndarray:
    """Columns ``cx .. cx + cw`` of tile row ``ty`` of a ``w`` x ``h`` level, as the slide's file holds them
    before compression: pixels outside the image (right/bottom padding) are background, as a scanner writes them."""
    if not detail:
        part = model.render(cx, ty * tile, cw, tile, mpp)
    else:
        coarse = model._render_fine(cx // f, ty * tile // f, -(-cw // f), tile // f, mpp * f)
        part = coarse.repeat(f, axis=0).repeat(f, axis=1)[:, :cw] if f > 1 else coarse
    if (ty + 1) * tile > h:
        part[max(0, h - ty * tile):] = int(model.background)
    if cx + cw > w:
        part[:, max(0, w - cx):] = int(model.background)
    return part


def _tile_iter(model: TissueModel, w: int, h: int, mpp: float, tile: int, band_cols: int = 1024,
               detail_mpp: float | None = None) -> Iterator[np.ndarray]:
    """Tiles of one pyramid level in row-major order, rendered one band of tile rows at a time.

    With ``detail_mpp`` (fast mode) the band is drawn without supersampling, at ``f`` times the
    pixel size (``f`` the largest divisor of ``tile`` with ``mpp * f <= detail_mpp``, else 1), and
    each pixel is repeated ``f`` x ``f``.
    """
    f = _detail_factor(mpp, tile, detail_mpp)
    ntx, nty = -(-w // tile), -(-h // tile)
    for ty in range(nty):
        band = np.empty((tile, ntx * tile, 3), np.uint8)
        for cx in range(0, ntx * tile, band_cols):
            cw = min(band_cols, ntx * tile - cx)
            band[:, cx:cx + cw] = _band_part(model, cx, ty, cw, tile, mpp, f, detail_mpp is not None, w, h)
        for tx in range(ntx):
            yield band[:, tx * tile:(tx + 1) * tile]


class LevelPixels:
    """The pixels one level of a synthetic slide holds before JPEG compression, for any region.

    The same drawing as :func:`write_slide`'s (band parts of ``band_cols`` columns, each drawn from
    its own origin, so its noise is the file's). The parts of the last two tile rows read are kept
    (memory: two bands), so regions read in row order draw each part once. ``level_mpp`` is the
    level's µm/px (``spec.mpp`` times its downsample).
    """

    def __init__(self, spec: "SlideSpec", level_mpp: float, model: TissueModel | None = None,
                 band_cols: int = 1024) -> None:
        self.model = model or slide_model(spec)[0]
        self.tile, self.mpp, self.band_cols = spec.tile, level_mpp, band_cols
        self.detail = spec.detail_mpp is not None
        self.f = _detail_factor(level_mpp, spec.tile, spec.detail_mpp)
        ds = int(round(level_mpp / spec.mpp))  # the level's integer downsample, as _levels makes them
        self.width, self.height = spec.width // ds, spec.height // ds
        self._parts: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._keep = 2 * -(-self.width // band_cols)  # the parts of two tile rows

    def _part(self, ty: int, cx: int) -> np.ndarray:
        key = (ty, cx)
        if key in self._parts:
            self._parts.move_to_end(key)
        else:
            ntx = -(-self.width // self.tile)
            cw = min(self.band_cols, ntx * self.tile - cx)
            self._parts[key] = _band_part(self.model, cx, ty, cw, self.tile, self.mpp, self.f, self.detail,
                                          self.width, self.height)
            while len(self._parts) > self._keep:
                self._parts.popitem(last=False)
        return self._parts[key]

    def region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of the level's pixels from (x, y), inside the level."""
        if x < 0 or y < 0 or x + w > self.width or y + h > self.height:
            raise ValueError(f"region {x},{y} {w}x{h} is outside the {self.width} x {self.height} level")
        out = np.empty((h, w, 3), np.uint8)
        for ty in range(y // self.tile, (y + h - 1) // self.tile + 1):
            for cx in range(x // self.band_cols * self.band_cols, x + w, self.band_cols):
                part = self._part(ty, cx)
                y0, y1 = max(y, ty * self.tile), min(y + h, (ty + 1) * self.tile)
                x0, x1 = max(x, cx), min(x + w, cx + part.shape[1])
                out[y0 - y:y1 - y, x0 - x:x1 - x] = part[y0 - ty * self.tile:y1 - ty * self.tile, x0 - cx:x1 - cx]
        return out


def slide_model(spec: SlideSpec) -> tuple[TissueModel, np.ndarray, np.ndarray]:
    """The tissue model that draws ``spec``'s slide, and its tissue and IDC fractions on the model grid."""
    model = TissueModel.random(spec.seed, spec.width * spec.mpp, spec.height * spec.mpp, vignette=True)
    model = replace(model, idc_scale_um=spec.idc_scale_um)
    rows = int(spec.height * spec.mpp // TILE_UM)
    cols = int(spec.width * spec.mpp // TILE_UM)
    tissue, _ = model.tile_truth(rows, cols)
    model = model.with_idc_fraction(tissue, rows, cols, spec.idc_fraction)
    tissue, idc = model.tile_truth(rows, cols)
    return model, tissue, idc


def _write_pyramid(path: Path, fmt: str, width: int, height: int, mpp: float, level_tiles, thumbnail, *,
                   tile: int = 256, quality: int = 90, level_downsample: int = 4,
                   title: str = "cancernet-batch slide", subsampling: tuple[int, int] | None = None) -> None:
    """Write a pyramidal, tiled, JPEG-compressed slide (atomically).

    ``level_tiles(w, h, mpp)`` yields one level's ``tile`` x ``tile`` tiles in row-major order
    (memory: whatever one band costs); ``thumbnail(w, h, mpp)`` draws the SVS thumbnail. The
    resolution is stored so OpenSlide reports ``openslide.mpp-x/y``: in the Aperio
    ImageDescription (``MPP = ...``) for SVS, in the TIFF resolution tags (centimetre unit) for TIFF.
    ``subsampling``: YCbCr chroma subsampling of the JPEG tiles (tifffile's default: 2 x 2).
    """
    import tifffile

    extra = {} if subsampling is None else {"subsampling": subsampling}
    levels = _levels(width, height, level_downsample)
    bigtiff = width * height * 3 > 2**31
    res_cm = 1e4 / mpp
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
        for li, (w, h, f) in enumerate(levels):
            if fmt == "svs":
                if li == 0:
                    desc = (f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) "
                            f"JPEG/RGB Q={quality}|AppMag = {10.0 / mpp:g}|MPP = {mpp:.6f}"
                            f"|Filename = {path.stem}|Title = {title}")
                else:
                    desc = (f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] "
                            f"({tile}x{tile}) -> {w}x{h} JPEG/RGB Q={quality}")
                kw = dict(description=desc, metadata=None)
            else:
                kw = dict(resolution=(res_cm / f, res_cm / f), resolutionunit="CENTIMETER", metadata=None,
                          description=f"{title} level {li}" if li else None)
            tw.write(level_tiles(w, h, mpp * f), shape=(h, w, 3), dtype=np.uint8,
                     tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                     # Aperio marks its pyramid levels as full images (NewSubfileType 0), as tifffile expects
                     photometric="rgb", subfiletype=0 if li == 0 or fmt == "svs" else 1, **kw, **extra)
            if fmt == "svs" and li == 0:
                # Aperio puts a stripped thumbnail second; OpenSlide shows it as an associated image.
                tf = max(1, int(math.ceil(max(width, height) / 768)))
                tw_, th_ = width // tf, height // tf
                tw.write(thumbnail(tw_, th_, mpp * tf), photometric="rgb", compression="jpeg", metadata=None,
                         description=f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> {tw_}x{th_} - ")


def write_slide(spec: SlideSpec) -> SlideTruth:
    """Write one pyramidal, tiled, JPEG-compressed slide and return its truth on the model grid.

    Memory is bounded by one band of tiles (``tile`` rows x slide width), whatever the slide size.
    The resolution is stored as :func:`_write_pyramid` says.
    """
    if spec.format not in ("svs", "tiff"):
        raise ConfigError(f"unknown slide format {spec.format!r}", hint="use svs or tiff")
    if spec.width < spec.tile or spec.height < spec.tile:
        raise ConfigError(f"slide size must be at least {spec.tile} px", hint="give a larger --size")
    model, tissue, idc = slide_model(spec)

    def level_tiles(w: int, h: int, mpp: float):
        return _tile_iter(model, w, h, mpp, spec.tile, detail_mpp=spec.detail_mpp)

    def thumbnail(w: int, h: int, mpp: float) -> np.ndarray:
        return model.render(0, 0, w, h, mpp)

    _write_pyramid(spec.path, spec.format, spec.width, spec.height, spec.mpp, level_tiles, thumbnail,
                   tile=spec.tile, quality=spec.quality, level_downsample=spec.level_downsample,
                   title="cancernet-batch synthetic slide")
    truth = SlideTruth(tissue, idc)
    return truth


def synth_slides(out: str | os.PathLike, *, count: int = 2, size: int = 4096, mpp: float = 0.5, seed: int = 0,
                 fmt: str = "svs", idc_fraction: float = 0.3, detail_mpp: float | None = None,
                 idc_scale_um: float = 320.0, progress=None) -> list[tuple[Path, SlideTruth]]:
    """Write ``count`` synthetic slides of ``size`` x ``size`` px at ``mpp`` into ``out``.

    Beside each ``NAME.svs`` (or ``.tiff``) goes ``NAME.truth.npz`` (tissue and IDC fractions per
    model tile) and a ``slides.csv`` summary.
    """
    if count < 1:
        raise ConfigError("--count must be at least 1")
    if not 0.05 <= mpp <= 20:
        raise ConfigError(f"--mpp {mpp} is not a plausible scanner resolution", hint="use 0.05-20 µm/px, e.g. 0.25 or 0.5")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ext = "svs" if fmt == "svs" else "tiff"
    results = []
    rows = []
    for k in range(count):
        path = out / f"synth-{seed:04d}-{k:03d}.{ext}"
        spec = SlideSpec(path=path, width=size, height=size, mpp=mpp, seed=seed * 1000 + 500 + k, format=fmt,
                         idc_fraction=idc_fraction, detail_mpp=detail_mpp, idc_scale_um=idc_scale_um)
        truth = write_slide(spec)
        truth.save(out / f"{path.stem}.truth.npz")
        results.append((path, truth))
        rows.append((path.name, f"synth-{seed:04d}-{k:03d}", size, size, mpp, truth.tissue.shape[0],
                     truth.tissue.shape[1], int(truth.tissue.sum()), int(truth.idc.sum())))
        log.info("wrote %s (%d tissue tiles, %d IDC)", path, int(truth.tissue.sum()), int(truth.idc.sum()))
        if progress is not None:
            progress(1)
    write_csv(out / "slides.csv", ["file", "patient", "width", "height", "mpp", "grid_rows", "grid_cols",
                                   "tissue_tiles", "idc_tiles"], rows)
    return results


# --------------------------------------------------------------------------------------------
# real tissue: a patient's Kaggle patches rebuilt as a slide
# --------------------------------------------------------------------------------------------

REBUILD_QUALITY = 98
"""JPEG quality of rebuilt slides, with no chroma subsampling. The patches were JPEG-compressed once
already (by the scanner). A second pass moves a small trained model's probabilities up (its
sensitivity to JPEG, not the slide path's): patient 8957's IDC fraction by +0.05 at quality 90 with
4:2:0 chroma, +0.036 at 95 / 4:4:4, +0.012 at 98 / 4:4:4. Near-lossless tiles keep the comparison
about the slide path (grid, resolution, tissue detection)."""
GLASS_NOISE = 2.0
"""Standard deviation (grey levels) of the noise on the rebuilt slide's glass."""


@dataclass
class PatchMosaic:
    """A patient's patches placed at their name positions, at the patches' resolution.

    ``image`` is ``(rows + 1) * 50`` x ``(cols + 1) * 50`` px (one tile of glass beyond the last
    patch, so edge patches are whole tiles of the grid); ``glass`` marks pixels no patch covers.
    """

    patient: str
    image: np.ndarray
    glass: np.ndarray
    labels: np.ndarray  # (rows + 1, cols + 1) int8: -1 no patch, else the patch label
    glass_colour: np.ndarray
    small: int = 0  # edge patches smaller than 50 x 50


def _glass_colour(pixels: list[np.ndarray]) -> np.ndarray:
    """The scan's glass colour: the median of the brightest tenth of near-white patch pixels."""
    bright = [p[p.min(axis=-1) > 200] for p in pixels]
    bright = np.concatenate(bright) if bright else np.empty((0, 3), np.uint8)
    if len(bright) < 100:
        return np.array([242.0, 241.0, 243.0])
    b = bright.astype(np.float32).mean(axis=1)
    return np.median(bright[b >= np.percentile(b, 90)], axis=0).astype(np.float64)


def patch_mosaic(patient_dir: str | os.PathLike) -> PatchMosaic:
    """Place every patch of one patient folder (Kaggle layout) at its position (see :mod:`.patches`)."""
    from PIL import Image

    from .errors import InputError
    from .patches import is_patient_folder, scan

    patient_dir = Path(patient_dir)
    if not is_patient_folder(patient_dir):
        raise InputError("not a patient folder (no 0/ or 1/ subfolder)", path=patient_dir,
                         hint="give one patient's folder, e.g. ../shared/data/idc/8863")
    records, _ = scan(patient_dir)
    records = [r for r in records if r.row >= 0]
    if not records:
        raise InputError("no patch names with positions (PID_idx5_xX_yY_classC.png)", path=patient_dir,
                         hint="--from-patches needs the Kaggle names, which carry each patch's position")
    pixels = []
    for r in records:
        with Image.open(r.path) as im:
            pixels.append(np.asarray(im.convert("RGB")))
    rows = max(r.row for r in records) + 2
    cols = max(r.col for r in records) + 2
    glass_c = _glass_colour(pixels)
    image = np.empty((rows * PATCH_SIZE, cols * PATCH_SIZE, 3), np.uint8)
    image[:] = np.rint(glass_c).astype(np.uint8)
    glass = np.ones(image.shape[:2], bool)
    labels = np.full((rows, cols), -1, np.int8)
    small = 0
    for r, px in zip(records, pixels):
        h, w = min(px.shape[0], PATCH_SIZE), min(px.shape[1], PATCH_SIZE)
        small += (h, w) != (PATCH_SIZE, PATCH_SIZE)
        y, x = r.row * PATCH_SIZE, r.col * PATCH_SIZE
        image[y:y + h, x:x + w] = px[:h, :w]
        glass[y:y + h, x:x + w] = False
        labels[r.row, r.col] = r.label
    return PatchMosaic(records[0].patient, image, glass, labels, glass_c, small)


def _mosaic_tiles(mosaic: PatchMosaic, w: int, h: int, scale: float, tile: int, seed: int,
                  level: int) -> Iterator[np.ndarray]:
    """One level's tiles (row-major) of the mosaic drawn at ``scale`` output px per mosaic px.

    Upsampling (``scale >= 1``) repeats pixels (nearest neighbour: exactly the information the
    patches hold; reading back at their resolution by area averaging returns them), one band of
    tile rows at a time; downsampling area-averages the (small) mosaic once. Glass gets
    ``GLASS_NOISE`` of noise, drawn per band.
    """
    from PIL import Image

    src, glass = mosaic.image, mosaic.glass
    if scale < 1:
        sw, sh = max(1, round(src.shape[1] * scale)), max(1, round(src.shape[0] * scale))
        src = np.asarray(Image.fromarray(src).resize((sw, sh), Image.BOX))
        glass = np.asarray(Image.fromarray(glass.astype(np.uint8) * 255).resize((sw, sh), Image.BOX)) > 250
        scale = 1.0
    ntx, nty = -(-w // tile), -(-h // tile)
    xs = np.minimum(((np.arange(ntx * tile) + 0.5) / scale).astype(np.int64), src.shape[1] - 1)
    bg = np.rint(mosaic.glass_colour).astype(np.uint8)
    for ty in range(nty):
        ys = np.minimum(((np.arange(ty * tile, (ty + 1) * tile) + 0.5) / scale).astype(np.int64), src.shape[0] - 1)
        band = src[ys][:, xs]
        g = glass[ys][:, xs]
        if g.any():
            rng = np.random.default_rng([seed, level, ty])
            noise = rng.normal(0.0, GLASS_NOISE, (tile, ntx * tile, 1))
            # every pixel computed, glass kept: 3-4x faster than gathering and scattering the glass pixels
            band = np.where(g[..., None], np.clip(np.rint(band + noise), 0, 255).astype(np.uint8), band)
        if (ty + 1) * tile > h:
            band[h - ty * tile:] = bg
        if ntx * tile > w:
            band[:, w:] = bg
        for tx in range(ntx):
            yield band[:, tx * tile:(tx + 1) * tile]


def slide_from_patches(patient_dir: str | os.PathLike, path: str | os.PathLike, *, mpp: float = 1.0,
                       fmt: str = "svs", patch_mpp: float = DEFAULT_MPP, tile: int = 256,
                       quality: int = REBUILD_QUALITY, seed: int = 0,
                       subsampling: tuple[int, int] = (1, 1)) -> tuple[SlideTruth, PatchMosaic]:
    """Rebuild a real patient's tissue as a pyramidal slide at ``mpp`` µm/px, with its truth.

    Each patch of ``patient_dir`` (Kaggle layout) goes at its name position (``x``/``y``: 1-based
    pixels at the patches' ``patch_mpp``, about 4.0 µm/px), upsampled to ``mpp`` (4x at 1.0,
    16x at 0.25) by pixel repetition; where no patch is, glass (the scan's own glass colour, with
    slight noise). JPEG tiles at :data:`REBUILD_QUALITY`, 4:4:4 (``subsampling=(2, 2)``: 4:2:0, as most
    scanners write their JPEG tiles). The
    truth is on the model grid (one patch = one tile): tissue fraction 1 and IDC fraction = the
    patch label where a patch is, 0 elsewhere.
    """
    if fmt not in ("svs", "tiff"):
        raise ConfigError(f"unknown slide format {fmt!r}", hint="use svs or tiff")
    if not 0.05 <= mpp <= patch_mpp:
        raise ConfigError(f"--mpp {mpp} must be between 0.05 and the patches' {patch_mpp} µm/px",
                          hint="rebuild at a finer resolution than the patches, e.g. 1.0 or 0.25")
    mosaic = patch_mosaic(patient_dir)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scale0 = patch_mpp / mpp
    height = int(round(mosaic.image.shape[0] * scale0))
    width = int(round(mosaic.image.shape[1] * scale0))

    def level_tiles(w: int, h: int, level_mpp: float):
        level = int(round(math.log(level_mpp / mpp, 4))) if level_mpp > mpp else 0
        return _mosaic_tiles(mosaic, w, h, patch_mpp / level_mpp, tile, seed, level)

    def thumbnail(w: int, h: int, level_mpp: float) -> np.ndarray:
        tiles = list(_mosaic_tiles(mosaic, w, h, patch_mpp / level_mpp, max(w, h), seed, 99))
        return np.ascontiguousarray(tiles[0][:h, :w])

    _write_pyramid(path, fmt, width, height, mpp, level_tiles, thumbnail, tile=tile, quality=quality,
                   title=f"patient {mosaic.patient} rebuilt from its patches", subsampling=subsampling)
    lab = mosaic.labels
    truth = SlideTruth((lab >= 0).astype(np.float64), (lab == 1).astype(np.float64), patch_mpp, PATCH_SIZE)
    return truth, mosaic


def image_tiles(img: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """The ``tile`` x ``tile`` tiles of the RGB image ``img``, row by row; the edge tiles padded with white."""
    h, w = img.shape[:2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            t = np.full((tile, tile, 3), 255, np.uint8)
            part = img[y:y + tile, x:x + tile]
            t[:part.shape[0], :part.shape[1]] = part
            yield t


def slide_from_image(rgb: np.ndarray, path: str | os.PathLike, *, mpp: float, fmt: str = "svs", tile: int = 256,
                     quality: int = 90, subsampling: tuple[int, int] | None = (2, 2),
                     title: str = "an image written as a slide") -> Path:
    """Write the RGB image ``rgb`` (level 0, at ``mpp`` µm/px) as a pyramidal, tiled, JPEG-compressed slide:
    levels 4x apart down to 256 px, each the exact area average of level 0 (:func:`slides.base.area_resize`,
    as a box-filtering scanner makes its pyramid), JPEG tiles at ``quality`` with YCbCr ``subsampling``
    (``(2, 2)``: 4:2:0, as most scanners write them). Used to put a real scan's own pixels (a decoded level 0
    of a real slide, with all its detail) through the slide path again: the pixels are then the source that
    any tile of the new slide can be compared with (``benchmarks/decode_fidelity.py``)."""
    from .slides.base import area_resize

    if fmt not in ("svs", "tiff"):
        raise ConfigError(f"unknown slide format {fmt!r}", hint="use svs or tiff")
    rgb = np.ascontiguousarray(rgb[..., :3], np.uint8)
    height, width = rgb.shape[:2]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def scaled(w: int, h: int) -> np.ndarray:
        return rgb if (w, h) == (width, height) else area_resize(rgb, (0.0, 0.0, width, height), (w, h))

    def level_tiles(w: int, h: int, level_mpp: float):
        return image_tiles(scaled(w, h), tile)

    _write_pyramid(path, fmt, width, height, mpp, level_tiles, lambda w, h, level_mpp: scaled(w, h), tile=tile,
                   quality=quality, title=title, subsampling=subsampling)
    return path


def slides_from_patches(out: str | os.PathLike, patient_dirs: list[str | os.PathLike], *, mpp: float = 1.0,
                        fmt: str = "svs", seed: int = 0, progress=None) -> list[tuple[Path, SlideTruth]]:
    """:func:`slide_from_patches` for each patient folder: ``OUT/PID.svs`` (or ``.tiff``), its
    ``PID.truth.npz`` and a ``slides.csv`` summary (with the patient's patch counts)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ext = "svs" if fmt == "svs" else "tiff"
    results, rows = [], []
    for d in patient_dirs:
        d = Path(d)
        path = out / f"{d.name}.{ext}"
        truth, mosaic = slide_from_patches(d, path, mpp=mpp, fmt=fmt, seed=seed)
        truth.save(out / f"{path.stem}.truth.npz")
        results.append((path, truth))
        n = int(truth.tissue.sum())
        rows.append((path.name, mosaic.patient, *truth.tissue.shape, mpp, n, int(truth.idc.sum()), mosaic.small))
        log.info("wrote %s (%d patches, %d IDC, %d smaller than 50x50)", path, n, int(truth.idc.sum()), mosaic.small)
        if progress is not None:
            progress(1)
    write_csv(out / "slides.csv", ["file", "patient", "grid_rows", "grid_cols", "mpp", "patches", "idc_patches",
                                   "small_patches"], rows)
    return results
