"""Benchmarks time the package as a user's installed copy runs: with its modules' bytecode on disk.

``pip install`` writes the ``.pyc`` files of an installed package once, and an editable install writes them the first
time each module is imported, unless ``PYTHONDONTWRITEBYTECODE`` is set. These machines set it, so every process that
imported a checkout's package compiled its modules from source again: about 0.1 CPU s in each ``cancernet`` command
and each worker's first use of the scoring and report modules (RESULTS section 9, 2026-12-05), a cost no installed
copy pays. :func:`as_installed` compiles them once, into the checkout's own ``__pycache__`` folders (git-ignored),
which every later import reads whether or not that variable is set.
"""

from __future__ import annotations

import compileall
import os
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def as_installed(*checkouts: "str | os.PathLike | None") -> None:
    """Compile the ``cancernet_batch`` package of this checkout and of each of ``checkouts`` (None: left out) to
    bytecode, as an install does; files already compiled and unchanged are left as they are."""
    for c in (HERE, *(x for x in checkouts if x)):
        pkg = Path(c) / "cancernet_batch"
        if pkg.is_dir() and not compileall.compile_dir(str(pkg), quiet=1):
            raise RuntimeError(f"{pkg}: a module does not compile")
