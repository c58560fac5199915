"""Settings as frozen dataclasses, checked when they are made.

Each stage owns one dataclass here; a bad value raises :class:`~cancernet_batch.errors.ConfigError`
with the option to change, so the CLI and the library report it the same way.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from . import DEFAULT_MPP
from .errors import ConfigError


# ----------------------------------------------------------------------------------------------
# training (issue 4)
# ----------------------------------------------------------------------------------------------

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
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    width: int = 32
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
        if not 0.05 < self.mpp < 20:
            raise ConfigError(f"--mpp {self.mpp} is not a plausible resolution", hint="use 0.05-20 µm/px; Kaggle IDC is 4.0")
        if not 0.0 <= self.jitter <= 0.5 or not 0.0 <= self.stain_jitter <= 0.5:
            raise ConfigError(f"colour and stain jitter must be in [0, 0.5], got {self.jitter} and {self.stain_jitter}")
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
