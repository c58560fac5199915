"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename.

A reader never sees a half-written file under the final name, and a killed process leaves at
most a ``.tmp-*`` file behind, which the next run ignores and overwrites.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .errors import StorageError

_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (0666 less the umask); mkstemp makes 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    The caller writes the temporary file however it likes (PIL, matplotlib, json...). On an
    exception the temporary file is removed and ``path`` is untouched.
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot write here: {exc.strerror or exc}", path=final.parent,
                           hint="check that the output folder exists, is writable and has free space") from exc
    tmp = None
    try:
        while tmp is None:
            # the temporary name is known before the file exists (unlike mkstemp's, returned after it made the
            # file), so a signal anywhere from here on still removes it
            name = final.parent / f".tmp-{final.name}.{secrets.token_hex(4)}{final.suffix}"
            try:
                tmp = name
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                tmp = None  # another writer's name: draw again
            except OSError as exc:
                tmp = None  # nothing was made
                raise StorageError(f"cannot write here: {exc.strerror or exc}", path=final.parent,
                                   hint="check that the output folder exists, is writable and has free space") from exc
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode())  # readable by workers running as other users, like any output file
        os.replace(tmp, final)
    except StorageError:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"writing failed: {exc.strerror or exc}", path=final,
                           hint="check that the output folder is writable and has free space") from exc
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path``; on success it replaces ``path`` (a folder).

    For outputs that are folders (an OME-Zarr). The new folder is renamed into place; an earlier
    one is first renamed aside and removed after, so ``path`` is always absent, the old folder
    whole, or the new folder whole, never half-written. On an exception (a signal included, at any
    moment) the temporary folder goes and an earlier folder moved aside is put back.
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot write here: {exc.strerror or exc}", path=final.parent,
                           hint="check that the output folder exists, is writable and has free space") from exc
    tmp = old = None
    try:
        while tmp is None:
            # as in atomic_path: the name is known before the folder exists, so a signal anywhere removes it
            tmp = final.parent / f".tmp-{final.name}.{secrets.token_hex(4)}"
            try:
                os.mkdir(tmp, 0o700)
            except FileExistsError:
                tmp = None  # another writer's name: draw again
            except OSError as exc:
                tmp = None
                raise StorageError(f"cannot write here: {exc.strerror or exc}", path=final.parent,
                                   hint="check that the output folder exists, is writable and has free space") from exc
        yield tmp
        os.chmod(tmp, _file_mode() | (_file_mode() & 0o444) >> 2)  # rwx where a file would be rw: like mkdir
        if final.exists():
            old = final.parent / f".tmp-{final.name}.old.{secrets.token_hex(4)}"
            os.replace(final, old)
        os.replace(tmp, final)
        tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and old.exists() and not final.exists():
                os.replace(old, final)  # the earlier folder, whole, back under its name
        if isinstance(exc, OSError):
            raise StorageError(f"writing failed: {exc.strerror or exc}", path=final,
                               hint="check that the output folder is writable and has free space") from exc
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def encode_text(text: str) -> bytes:
    """UTF-8 bytes of ``text``; the undecodable bytes of file names (surrogates) go back to the bytes they were.

    So a path read back (``errors="surrogateescape"``) is the same path. Any other lone surrogate is
    backslash-escaped rather than crashing the write.
    """
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write UTF-8 ``text`` to ``path`` (see :func:`encode_text` for file names that are not UTF-8)."""
    return write_bytes(path, encode_text(text))


def safe_cell(value: object) -> object:
    """Neutralise a spreadsheet formula: a string cell starting with ``= + - @`` gets a leading quote.

    Numbers are left alone (a negative number is data, not a formula).
    """
    if isinstance(value, str) and value.startswith(_FORMULA_PREFIXES):
        return "'" + value
    return value


def unsafe_cell(value: str) -> str:
    """Undo :func:`safe_cell` on a string read back from a CSV this tool wrote."""
    if value.startswith("'") and value[1:].startswith(_FORMULA_PREFIXES):
        return value[1:]
    return value


def csv_bytes(header: Sequence[str], rows: Iterable[Sequence[object]]) -> bytes:
    """CSV (UTF-8) whose string cells cannot start a spreadsheet formula."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    # with "\n" as line end the csv module does not quote a cell holding "\r" (a file name may), and
    # every reader would split the row there: such rows are written fully quoted
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    writer.writerow([safe_cell(h) for h in header])
    for row in rows:
        cells = [safe_cell(v) for v in row]
        (quoted if any(isinstance(c, str) and "\r" in c for c in cells) else writer).writerow(cells)
    return encode_text(buf.getvalue())


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    """Atomically write a CSV whose string cells cannot start a spreadsheet formula."""
    return write_bytes(path, csv_bytes(header, rows))


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a writer's temporary file: this module's ``.tmp-*`` or zarr's ``*.partial``."""
    return name.startswith(".tmp-") or name.endswith(".partial")


def remove_stale_temps(*folders: str | os.PathLike) -> int:
    """Delete temporary files that a killed writer left in ``folders`` (not recursive).

    Covers this module's ``.tmp-*`` files and zarr's ``*.partial`` files; returns how many went. Each folder is read
    once (``os.scandir``); only an entry with a temporary name is looked at further, so a folder of many chunk files
    costs its listing, not a ``stat`` per file (on a cluster's shared file system, a round trip each).
    """
    gone = 0
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for f in entries:
            if not is_temp_name(f.name):
                continue
            if f.is_file():
                Path(f.path).unlink(missing_ok=True)
                gone += 1
            elif f.is_dir() and not f.is_symlink() and f.name.startswith(".tmp-"):  # an atomic_dir's
                shutil.rmtree(f.path, ignore_errors=True)
                gone += 1
    return gone
