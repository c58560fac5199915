"""What this machine is: CPU, usable cores, memory, GPUs and library versions (read without heavy imports).

``bench`` records it beside every figure; autotune compares it before using a saved choice.
"""

from __future__ import annotations

import os
import platform

from . import __version__


def gpus() -> list[dict]:
    """The NVIDIA GPUs ``nvidia-smi`` lists (name, memory, driver); empty where there is none."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
    return [{"name": r[0], "memory": r[1], "driver": r[2]} for r in rows if len(r) == 3]


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code() -> dict:
    """Which code measured: the package's folder and, in a git checkout, its commit (``+`` after it when tracked
    files differ from it). Figures of two checkouts compared side by side say which was which (``python -m``
    puts the current folder ahead of ``PYTHONPATH``: a run meant for another checkout can import this one)."""
    import subprocess
    from pathlib import Path

    pkg = Path(__file__).resolve().parent
    out: dict = {"package": str(pkg)}
    if not (pkg.parent / ".git").exists():  # installed, not a checkout (a venv inside a checkout is not its code)
        return out
    try:
        head = subprocess.run(["git", "-C", str(pkg.parent), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        changed = subprocess.run(["git", "-C", str(pkg.parent), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return out
    if head.returncode == 0:
        out["commit"] = head.stdout.strip() + ("+" if changed.returncode == 0 and changed.stdout.strip() else "")
    return out


def machine() -> dict:
    """What the figures were measured on: CPU, usable cores, memory, GPUs and library versions."""
    from .cluster import usable_cores

    cpu, cores = cpu_name(), usable_cores()
    memory = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):
        pass
    from importlib import metadata

    versions = {"cancernet_batch": __version__, "python": platform.python_version()}
    for dist in ("numpy", "onnxruntime", "onnxruntime-gpu", "keras", "tensorflow", "tensorflow-cpu", "jax", "jaxlib",
                 "torch", "dask", "distributed", "zarr", "openslide-python", "openslide-bin", "tifffile"):
        try:  # installed versions, read without importing anything heavy
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    providers = []
    try:
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    except ImportError:
        pass
    return {"cpu": cpu, "cores": cores, "memory_gib": memory, "gpus": gpus(), "onnxruntime_providers": providers,
            "platform": platform.platform(), "versions": versions, "code": code()}
