"""cancernet-batch: train CancerNet once, score whole-slide archives and patch folders in batch."""

PATCH_SIZE = 50
"""Side of the square RGB tile the model consumes, in pixels."""

DEFAULT_MPP = 4.0
"""Default model resolution in microns per pixel (Kaggle IDC patches: 40x scans read at about 2.5x)."""

__all__ = ["__version__", "PATCH_SIZE", "DEFAULT_MPP"]


def __getattr__(name: str) -> str:
    """``__version__``, looked up on first use: ``importlib.metadata`` costs tens of ms in every process that
    imports the package (the client, the workers' forkserver, each preflight child) before it does anything."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        value = version("cancernet-batch")
    except PackageNotFoundError:  # running from a source tree that is not installed
        value = "0.0.0+unknown"
    globals()["__version__"] = value
    return value
