"""Settings as frozen dataclasses, checked when they are made: the one home of every stage's settings.

Each stage owns one dataclass here (tile, predict, report, cluster, train); a bad value raises
:class:`~cancernet_batch.errors.ConfigError` with the option to change, so the CLI and the library
report it the same way. The names and bounds they check (engines, Keras backends, devices, batch
sizes, µm/px) are defined once, below, and the CLI offers its choices from them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import DEFAULT_MPP, PATCH_SIZE
from .errors import ConfigError

# ----------------------------------------------------------------------------------------------
# names and bounds, defined once
# ----------------------------------------------------------------------------------------------

ENGINES = ("onnx", "keras")
"""Scoring engines (``engines.py``); ``auto`` picks ONNX Runtime on CPU and Keras on GPU."""
ENGINE_CHOICES = ("auto", *ENGINES)
BACKENDS = ("tensorflow", "jax", "torch")
"""Keras backends the model runs under."""
DEVICES = ("cpu", "gpu")
MPP_MIN, MPP_MAX = 0.05, 20.0
"""Plausible resolutions, µm/px: anything outside is a wrong or missing value, not a scan."""
MAX_BATCH = 1 << 20
"""Largest batch (tiles per model call) accepted: 2^20 tiles are 7.9 GB of uint8 input."""
DEFAULT_BATCH = {"cpu": 256, "gpu": 2048}
"""Tiles per model call: 256 is the fastest and smallest on CPU (benchmarks/RESULTS.md)."""
DEFAULT_CHUNK = 1024
"""Tiles per store chunk: 1024 x 7.5 KB = 7.7 MB raw, a good unit of work for one predict task."""
DEFAULT_TISSUE_THRESHOLD = 0.25
"""Keep a tile when at least a quarter of it is tissue: what the Kaggle IDC set counts as a tissue patch
(see cancernet_batch/tissue.py and benchmarks/REAL_TISSUE.md)."""
MAX_THUMB_PX = 1024
DECODE_MODES = ("fast", "exact", "reader")
"""How tiling decodes slide pixels (``slides/direct.py``): ``fast`` decodes a tiled TIFF's compressed tiles
directly, JPEG tiles scaled in the DCT domain where the grid is 16x or more coarser; ``exact`` decodes them
directly at full size (tiles identical to the reader's exact area averages); ``reader`` goes through the
slide reader (OpenSlide or tifffile) for every pixel."""


def check_mpp(mpp: float, what: str = "--mpp-override") -> float:
    """``mpp`` when it is a plausible resolution; else a :class:`ConfigError` naming the option."""
    if not (isinstance(mpp, (int, float)) and MPP_MIN <= mpp <= MPP_MAX):
        raise ConfigError(f"{what} {mpp:g} µm/px is not a plausible resolution" if isinstance(mpp, (int, float))
                          else f"{what} {mpp!r} is not a resolution",
                          hint=f"use {MPP_MIN:g}-{MPP_MAX:g} µm/px, e.g. 0.25 (40x) or 0.5 (20x)")
    return mpp


def _choice(value, allowed: tuple, what: str, none_ok: bool = False):
    if value is None and none_ok:
        return
    if value not in allowed:
        raise ConfigError(f"{what} {value!r} is not one of {', '.join(allowed)}")


def _count(value, what: str, low: int = 1, high: int | None = None, none_ok: bool = True) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ConfigError(f"{what} must be a whole number {'from ' + str(low) if high is None else f'in {low}-{high}'},"
                          f" got {value!r}")


# ----------------------------------------------------------------------------------------------
# where to run
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClusterConfig:
    """Where to run: ``scheduler`` address, or the shape of a local cluster."""

    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str | None = "auto"
    host: str = "127.0.0.1"
    dashboard: bool = True
    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    connect_timeout: float = 30.0
    """Seconds to reach a ``scheduler``, Dask's handshake included (:func:`cluster.probe_scheduler`)."""
    score_workers: int | None = None
    """Local workers that only score (Dask resource ``score``); the others only decode and tile
    (resource ``tile``). None or 0: every worker does both kinds of work (a CPU-only machine)."""

    def __post_init__(self) -> None:
        _count(self.workers, "--workers")
        _count(self.threads_per_worker, "--threads-per-worker")
        _count(self.score_workers, "--score-workers", low=0)
        t = self.connect_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 24 * 3600:  # NaN fails too
            raise ConfigError(f"--connect-timeout {t!r} must be a number of seconds, positive and at most a day")
        workers, _ = self.local_shape()
        if self.score_workers and not self.scheduler and self.score_workers >= workers:
            raise ConfigError(f"--score-workers {self.score_workers} leaves no tiling worker out of {workers}",
                              hint="give --workers more than --score-workers, or leave --score-workers out")

    def local_shape(self) -> tuple[int, int]:
        """Workers and threads per worker for a local cluster, sized to this machine when not given."""
        from .cluster import usable_cores

        workers = self.workers or max(1, min(usable_cores(), 8))
        threads = self.threads_per_worker or 1
        return workers, threads


# ----------------------------------------------------------------------------------------------
# tile, predict, report
# ----------------------------------------------------------------------------------------------

MAX_GRID_TILES = 25_000_000
"""Default largest model grid (rows x cols) of one slide: 5,000 x 5,000 tiles, a 1 m² slide at 4 µm/px."""
MAX_PLAN_PX = 2_000_000_000
# seconds one per-input step that reads a source (a slide's plan, one tile chunk, a patient folder) may take
DEFAULT_READ_TIMEOUT = 600.0
"""Default most source pixels planning may decode for the low-resolution view (about a minute of JPEG
decoding); a slide without a small enough pyramid level is refused rather than planned for hours."""

@dataclass(frozen=True)
class TileConfig:
    """Settings of one tiling run."""

    target_mpp: float = DEFAULT_MPP
    mpp_override: float | None = None
    tissue_threshold: float = DEFAULT_TISSUE_THRESHOLD
    tissue_filter: bool = True
    chunk: int = DEFAULT_CHUNK
    preflight_timeout: float = 60.0
    read_timeout: float = DEFAULT_READ_TIMEOUT  # most seconds one plan, tile chunk or patient folder may take
    block: int = 32
    max_grid_tiles: int = MAX_GRID_TILES  # a larger slide grid fails its plan (a damaged header, usually)
    max_plan_px: float = MAX_PLAN_PX  # most source pixels the plan's overview may decode
    decode: str = "fast"  # one of DECODE_MODES
    stage_cache_gb: float = 20.0  # size limit of the local copies of object-storage slides only OpenSlide reads

    def __post_init__(self) -> None:
        check_mpp(self.target_mpp, "--mpp")
        _choice(self.decode, DECODE_MODES, "--decode")
        if self.mpp_override is not None:
            check_mpp(self.mpp_override)
        if not 0.0 <= self.tissue_threshold <= 1.0:
            raise ConfigError(f"--tissue-threshold {self.tissue_threshold} is not in [0, 1]")
        if self.chunk < 1 or self.block < 1:
            raise ConfigError("chunk and block sizes must be at least 1")
        if not 0 < self.preflight_timeout <= 24 * 3600:
            raise ConfigError(f"--preflight-timeout {self.preflight_timeout} must be positive and at most a day")
        if not 0 < self.read_timeout <= 24 * 3600:
            raise ConfigError(f"--read-timeout {self.read_timeout} must be positive and at most a day")
        if not (self.max_grid_tiles >= 1 and self.max_plan_px >= 1):
            raise ConfigError("max_grid_tiles and max_plan_px must be at least 1")

    @property
    def tile_um(self) -> float:
        """Physical side of one model tile in microns."""
        return PATCH_SIZE * self.target_mpp


@dataclass(frozen=True)
class PredictConfig:
    """How to score a run."""

    model_dir: str
    engine: str = "auto"  # one of ENGINE_CHOICES
    backend: str | None = None  # Keras backend for engine=keras, one of BACKENDS
    device: str = "cpu"  # one of DEVICES
    batch_size: int = DEFAULT_BATCH["cpu"]  # tiles per model call
    engine_threads: int | None = None  # intra-op threads per worker (ONNX); default cores / workers
    micro_batch: int | None = None  # ONNX Runtime: tiles per call within a batch; None: 8 per thread on CPU; 0: whole
    rescore: bool = False
    max_inflight_per_thread: int = 2  # bounded scheduler and client memory for huge archives
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        _choice(self.engine, ENGINE_CHOICES, "--engine")
        _choice(self.backend, BACKENDS, "--backend", none_ok=True)
        _choice(self.device, DEVICES, "--device")
        _count(self.batch_size, "--batch-size", high=MAX_BATCH, none_ok=False)
        _count(self.engine_threads, "engine threads")
        _count(self.micro_batch, "--micro-batch", low=0, high=MAX_BATCH)
        _count(self.max_inflight_per_thread, "tasks in flight per thread", none_ok=False)


@dataclass(frozen=True)
class ReportConfig:
    """What ``cancernet report`` was asked for."""

    threshold: float | None = None  # default: the model's (see aggregate.resolve_threshold)
    patients_csv: str | None = None  # CSV input,patient
    model_dir: str | None = None
    thumb_px: int = MAX_THUMB_PX
    min_region_mm2: float = 0.0  # IDC regions smaller than this are left out of regions.geojson and the counts
    region_smoothing: int = 0  # rounds of corner cutting of the region outlines (0: exact tile edges)
    geojson_gzip: bool = False  # per-tile GeoJSON as <id>.geojson.gz

    def __post_init__(self) -> None:
        if self.threshold is not None and not (isinstance(self.threshold, (int, float)) and 0.0 <= self.threshold <= 1.0):
            raise ConfigError(f"--threshold {self.threshold!r} is not in [0, 1]")
        _count(self.thumb_px, "thumbnail size", low=16, high=16384, none_ok=False)
        m = self.min_region_mm2
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < float("inf"):
            raise ConfigError(f"--min-region-mm2 must be a number >= 0, got {m!r}")
        _count(self.region_smoothing, "region smoothing", low=0, high=8, none_ok=False)


# ----------------------------------------------------------------------------------------------
# training (issue 4)
# ----------------------------------------------------------------------------------------------

CALIBRATIONS = ("none", "temperature", "platt")
"""``cancernet train --calibrate`` choices (see :mod:`cancernet_batch.calibration`)."""
STAIN_NORMS = ("none", "macenko", "macenko-hue", "reinhard")
"""``cancernet train --stain-norm`` choices (see :mod:`cancernet_batch.stain`; the same as ``stain.METHODS``)."""


@dataclass(frozen=True)
class TrainConfig:
    """How ``cancernet train`` splits the patients and fits CancerNet.

    Split: with ``split_file`` the published patient lists are used; otherwise whole patients are
    drawn, stratified by their IDC ratio, ``val_fraction`` of them for validation (early stopping
    and the decision threshold) and ``test_fraction`` for a test set that training never sees.
    """

    val_fraction: float = 0.2
    test_fraction: float = 0.0
    split_file: str | None = None
    seed: int = 42
    epochs: int = 3
    """Epochs (at most, with early stopping on a single split; exactly, with ``cv``). 3 at width 16 beat 10 at
    width 32 on pooled out-of-fold balanced accuracy and AUC in 5-fold cross-validation over patients
    (0.786 / 0.831 against 0.739 / 0.768, same folds; training/RESULTS.md, 2026-12-02)."""
    batch_size: int = 32
    learning_rate: float = 1e-3
    width: int = 16
    """Filters in the first block (CancerNet's original is 32); 16 chosen by cross-validation, see ``epochs``."""
    dropout: float = 0.25
    separable: bool = True
    mpp: float = DEFAULT_MPP
    patience: int = 3
    augment: bool = True
    jitter: float = 0.08
    """Colour jitter strength: brightness, contrast and per-channel gain vary by up to +-jitter."""
    stain_jitter: float = 0.2
    """H&E stain jitter strength (0 = off): each stain's optical density scaled by +-stain_jitter. On
    ``../shared/data/idc`` (validation patients) 0.2 beat 0, 0.1 and 0.3: see training/RESULTS.md."""
    class_weights: bool = True
    bootstrap: int = 1000
    export_onnx: bool = True
    cv: int = 0
    """K-fold cross-validation over patients (0 = off: one train/validation split). With ``cv`` each fold
    trains ``epochs`` epochs (no early stopping) and its held-out patients are only scored."""
    tta: bool = False
    """Test-time augmentation in the exported model: the mean logit over the 8 flips / rotations."""
    ensemble: bool = True
    """With ``cv``: the exported model averages the K fold models; otherwise one model retrained on all patients."""
    calibrate: str = "none"
    """``none``, ``temperature`` or ``platt``: fitted on the pooled out-of-fold logits (with ``cv``) or on the
    validation patients' logits, stored in ``model.json`` and baked into the exported model."""
    stain_norm: str = "none"
    """Per-patient stain normalisation of the training data (one of :data:`STAIN_NORMS`): every patch
    of a patient mapped to a fixed reference with statistics of that patient's own pixels, never labels
    (:mod:`cancernet_batch.stain`). Scoring does not normalise yet, so such a model is for cross-validation
    experiments only: ``cancernet run`` and ``evaluate`` refuse it (training/RESULTS.md)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}",
                              hint="0.2 holds out a fifth of the patients for validation")
        if not 0.0 <= self.test_fraction < 1.0 or self.val_fraction + self.test_fraction >= 0.9:
            raise ConfigError(f"--test-fraction {self.test_fraction} with --val-fraction {self.val_fraction} "
                              "leaves too few patients to train on", hint="keep val + test fractions below 0.9")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ConfigError("--epochs, --batch-size and --patience must be at least 1")
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning-rate must be positive, got {self.learning_rate}", hint="e.g. 1e-3")
        if self.width < 4:
            raise ConfigError(f"--width must be at least 4, got {self.width}", hint="32 is CancerNet's width")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        check_mpp(self.mpp, "--mpp")
        if not 0.0 <= self.jitter <= 0.5 or not 0.0 <= self.stain_jitter <= 0.5:
            raise ConfigError(f"colour and stain jitter must be in [0, 0.5], got {self.jitter} and {self.stain_jitter}")
        if self.cv and (self.cv < 2 or self.split_file is not None or self.test_fraction > 0):
            raise ConfigError(f"--cv {self.cv}: cross-validation needs at least 2 folds and takes no --split or "
                              "--test-fraction (every patient is held out once)",
                              hint="drop --split / --test-fraction, or leave out --cv for one split")
        if self.calibrate not in CALIBRATIONS:
            raise ConfigError(f"unknown calibration {self.calibrate!r}", hint=f"use one of {', '.join(CALIBRATIONS)}")
        _choice(self.stain_norm, STAIN_NORMS, "--stain-norm")
        if self.bootstrap < 0:
            raise ConfigError("--bootstrap must be 0 (off) or more")
        if self.split_file is not None and not Path(self.split_file).exists():
            raise ConfigError("split file not found", path=self.split_file, hint="give a folder with cases_{train,val,test}.txt, one such "
                              "file, or a split.json written by `cancernet train`")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["split_file"] is not None:
            d["split_file"] = os.fspath(d["split_file"])
        return d
