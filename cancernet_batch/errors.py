"""One error hierarchy for the library.

Every error carries a one-line message that says what is wrong and, where one exists, how to fix it.
The CLI prints ``error: <message>`` on stderr and exits with :data:`EXIT_ERROR`; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import errno
import re

EXIT_OK = 0
"""Everything asked for was done."""
EXIT_ERROR = 1
"""A library error stopped the command (bad input, missing model, unwritable output...)."""
EXIT_USAGE = 2
"""The command line itself was wrong (unknown option, bad value); Click's own status."""
EXIT_PARTIAL = 3
"""The command finished, but some inputs failed; they are listed in the run's ``failures.csv``."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: object) -> str:
    """``text`` safe to print and to store as UTF-8, on one line.

    File names on POSIX are any bytes: Python decodes the bytes that are not UTF-8 as lone
    surrogates (``\\udcff``), which cannot be encoded and crash a print or a write. Those bytes
    become ``\\xff``, control characters (a newline in a name) ``\\x0a``; everything else is kept.
    """
    s = str(text)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        try:
            s = s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # surrogates that no file name decodes to
            s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", s)


class CancerNetError(Exception):
    """Base class of every error this library raises on purpose.

    ``hint`` is the fix-it advice; ``path`` the file or folder concerned, when there is one.
    ``str(err)`` is always one line: ``<path>: <message> (<hint>)``.
    """

    def __init__(self, message: str, *, path: object | None = None, hint: str | None = None):
        self.message = " ".join(printable(" ".join(str(message).split())).split())
        self.path = None if path is None else printable(path)
        self.hint = None if hint is None else " ".join(printable(" ".join(str(hint).split())).split())
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.message
        if self.path:
            text = f"{self.path}: {text}"
        if self.hint:
            text = f"{text} ({self.hint})"
        return text


class InputError(CancerNetError):
    """An input file or folder is missing, empty, unreadable or not what it claims to be."""


class UnsupportedFormatError(InputError):
    """No reader of this tool can open the file."""


class ResolutionError(InputError):
    """A slide's resolution (microns per pixel) is missing, implausible or does not match the model."""


class ModelError(CancerNetError):
    """A model artefact is missing, corrupt, foreign or unsafe."""


class ConfigError(CancerNetError):
    """Settings that contradict each other or the data (e.g. a split naming none of the patients)."""


class StorageError(CancerNetError):
    """The output location cannot be written (read-only, full) or a store is inconsistent."""


class SlideReadError(InputError):
    """A slide opens but its pixels cannot be read: a decode error, or the native reader crashed or hung."""


STORAGE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""errno values that mean "this location cannot take the write" (read-only, no permission, full, over quota,
file size limit)."""


def _linked(exc: BaseException) -> list[BaseException]:
    """The exceptions ``exc`` carries: an exception group's members, then its cause and context."""
    return [*getattr(exc, "exceptions", ()), *(e for e in (exc.__cause__, exc.__context__) if e is not None)]


def storage_oserror(exc: BaseException) -> OSError | None:
    """The first ``OSError`` with a :data:`STORAGE_ERRNOS` errno in ``exc``, its exception-group members,
    ``__cause__`` or ``__context__`` (searched breadth first), or None."""
    seen: set[int] = set()
    queue = [exc]
    while queue:
        e = queue.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return e
        queue.extend(_linked(e))
    return None


def as_one_line_error(exc: BaseException) -> CancerNetError | None:
    """The :class:`CancerNetError` to show for an exception that escaped a command, or None for a bug.

    A library error wrapped in an exception group or raised ``from`` another exception is unwrapped;
    an unwritable or full output location (an ``OSError`` with a storage errno anywhere in the
    exception's group, cause or context: zarr, Dask and asyncio wrap them) becomes a
    :class:`StorageError`. Anything else is left to show its traceback.
    """
    if isinstance(exc, CancerNetError):
        return exc
    queue, seen = [exc], set()
    while queue:
        e = queue.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CancerNetError):
            return e
        queue.extend([*getattr(e, "exceptions", ()), *([e.__cause__] if e.__cause__ is not None else [])])
    os_err = storage_oserror(exc)
    if os_err is None:
        return None
    where = os_err.filename if os_err.filename is not None else None
    return StorageError(f"cannot write: {os_err.strerror or os_err}", path=where,
                        hint="check that the output folder is writable and has free space")
