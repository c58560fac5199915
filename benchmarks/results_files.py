"""The raw files of a benchmark's call: its record as JSON and its table as Markdown, side by side in ``--out``."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: str | Path, stem: str, text: str, record: dict) -> Path:
    """Write ``OUT/STEM.json`` (``record``, values JSON cannot hold as their ``str``) and ``OUT/STEM.md`` (``text``,
    the table printed), making ``out``; returns ``OUT/STEM``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / stem
    path.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str))
    path.with_suffix(".md").write_text(text + "\n")
    return path
