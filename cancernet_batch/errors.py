"""One error hierarchy for the library.

Every error carries a one-line message that says what is wrong and, where one exists, how to fix it.
The CLI prints ``error: <message>`` on stderr and exits with :data:`EXIT_ERROR`; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

EXIT_OK = 0
"""Everything asked for was done."""
EXIT_ERROR = 1
"""A library error stopped the command (bad input, missing model, unwritable output...)."""
EXIT_USAGE = 2
"""The command line itself was wrong (unknown option, bad value); Click's own status."""
EXIT_PARTIAL = 3
"""The command finished, but some inputs failed; they are listed in the run's ``failures.csv``."""


class CancerNetError(Exception):
    """Base class of every error this library raises on purpose.

    ``hint`` is the fix-it advice; ``path`` the file or folder concerned, when there is one.
    ``str(err)`` is always one line: ``<path>: <message> (<hint>)``.
    """

    def __init__(self, message: str, *, path: object | None = None, hint: str | None = None):
        self.message = " ".join(str(message).split())
        self.path = None if path is None else str(path)
        self.hint = None if hint is None else " ".join(str(hint).split())
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
