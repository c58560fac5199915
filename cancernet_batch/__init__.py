"""cancernet-batch: train CancerNet once, score whole-slide archives and patch folders in batch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cancernet-batch")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

PATCH_SIZE = 50
"""Side of the square RGB tile the model consumes, in pixels."""

DEFAULT_MPP = 4.0
"""Default model resolution in microns per pixel (Kaggle IDC patches: 40x scans read at about 2.5x)."""

__all__ = ["__version__", "PATCH_SIZE", "DEFAULT_MPP"]
