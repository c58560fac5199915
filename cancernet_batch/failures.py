"""The failures list: one row per input that could not be processed, kept in ``RUN/failures.csv``."""

from __future__ import annotations

import csv
import os
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from .atomic import write_csv


@dataclass(frozen=True)
class Failure:
    """Why one input (a file, folder or patch) failed at one stage."""

    input: str
    stage: str
    error_class: str
    message: str

    @classmethod
    def from_exception(cls, input: object, stage: str, exc: BaseException) -> "Failure":
        message = " ".join(str(exc).split()) or exc.__class__.__name__
        return cls(str(input), stage, exc.__class__.__name__, message)


FAILURE_COLUMNS = tuple(f.name for f in fields(Failure))


def read_failures(path: str | os.PathLike) -> list[Failure]:
    """Read a failures CSV written by :func:`write_failures`; a missing file is an empty list."""
    p = Path(path)
    if not p.exists():
        return []
    with open(p, newline="", encoding="utf-8") as fh:
        return [Failure(**{k: row[k] for k in FAILURE_COLUMNS}) for row in csv.DictReader(fh)]


def write_failures(path: str | os.PathLike, failures: list[Failure]) -> Path:
    """Atomically write the failures CSV (always written, even when empty, so a run shows it checked)."""
    return write_csv(path, FAILURE_COLUMNS, [astuple(f) for f in failures])


def merge_failures(path: str | os.PathLike, new: list[Failure], *, replace_stage_for: set[str] | None = None) -> list[Failure]:
    """Merge ``new`` into the CSV at ``path``, one row per (input, stage), newest wins.

    ``replace_stage_for`` lists inputs whose earlier rows are dropped first (they were retried).
    """
    merged: dict[tuple[str, str], Failure] = {}
    for f in read_failures(path):
        if replace_stage_for and f.input in replace_stage_for:
            continue
        merged[(f.input, f.stage)] = f
    for f in new:
        merged[(f.input, f.stage)] = f
    out = list(merged.values())
    write_failures(path, out)
    return out
