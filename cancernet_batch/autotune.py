"""Autotune: the predict settings ``cancernet bench`` measured fastest on this machine, saved for
``predict --autotune`` and ``run --autotune``, with the whole run's fastest layout under ``run`` (workers,
threads, scoring workers), which ``run --autotune`` starts instead of the predict stage's workers.

Its own small room, so the CLI does not import the benchmark module to read one JSON file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .machine import cpu_name, machine

log = logging.getLogger(__name__)


def autotune_path() -> Path:
    """Where ``bench`` saves the best predict settings for this machine."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cancernet-batch" / "autotune.json"


def save_autotune(best: dict) -> Path:
    import json

    from .atomic import write_text

    return write_text(autotune_path(), json.dumps({**best, "machine": machine()}, indent=2) + "\n")


def load_autotune() -> dict | None:
    """The saved choice, or None when ``bench`` has not run on this machine (or it ran elsewhere)."""
    import json

    p = autotune_path()
    if not p.exists():
        return None
    try:
        saved = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    from .cluster import usable_cores

    # only what decides the choice: no nvidia-smi call or ONNX Runtime import at the start of every predict
    if saved.get("machine", {}).get("cpu") != cpu_name() or saved.get("machine", {}).get("cores") != usable_cores():
        log.warning("%s was measured on another machine; ignoring it (run `cancernet bench` here)", p)
        return None
    return saved
