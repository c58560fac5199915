"""The failures list: one row per input that could not be processed, kept in ``RUN/failures.csv``."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from .atomic import csv_bytes, unsafe_cell, write_bytes
from .errors import StorageError


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


def failures_to_csv(failures: list[Failure]) -> bytes:
    """The failures list as CSV bytes (formula-safe cells)."""
    return csv_bytes(FAILURE_COLUMNS, [astuple(f) for f in failures])


def failures_from_csv(data: bytes, path: str | os.PathLike) -> list[Failure]:
    """Parse a failures CSV read from ``path`` (a spreadsheet's UTF-8 BOM is fine); a damaged one is a clear error."""
    text = data.decode("utf-8-sig", errors="surrogateescape")
    rows = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in FAILURE_COLUMNS if c not in (rows.fieldnames or [])]
    if missing:
        raise StorageError(f"{Path(path).name} has no column(s) {', '.join(missing)}", path=path,
                           hint="restore the file's header (input,stage,error_class,message) or delete the file")
    return [Failure(**{k: unsafe_cell(row[k] or "") for k in FAILURE_COLUMNS}) for row in rows]


def read_failures(path: str | os.PathLike) -> list[Failure]:
    """Read a failures CSV written by :func:`write_failures`; a missing file is an empty list."""
    p = Path(path)
    if not p.exists():
        return []
    return failures_from_csv(p.read_bytes(), p)


def write_failures(path: str | os.PathLike, failures: list[Failure]) -> Path:
    """Atomically write a failures CSV (always written, even when empty, so a run shows it checked)."""
    return write_bytes(path, failures_to_csv(failures))
