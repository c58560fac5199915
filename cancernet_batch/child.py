"""Child interpreters that run this package's own code: ``python -m cancernet_batch.X`` made safe.

``python -m`` puts the working folder first on the child's import path, so a folder that holds another copy of the
package (a clone of another version, an unpacked release) would be imported instead of this one, and the child would
read slides or measure with other code than its parent. :func:`module_command` drops that entry (unless the
interpreter adds none: ``-P``, ``PYTHONSAFEPATH``), and :func:`child_env` puts the folder this process imported the
package from first on ``PYTHONPATH``, so the child imports what the parent did, installed or not.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_RUN = ("import runpy, sys\n"
        "if not getattr(sys.flags, 'safe_path', False):\n"
        "    del sys.path[0]\n"
        "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")


def module_command(module: str, *args: str, python: str | None = None) -> list[str]:
    """The command line of ``python -m module args`` without the working folder on the import path."""
    return [python or sys.executable, "-c", _RUN, module, *args]


def child_env(**extra: str) -> dict:
    """This environment with the folder this package was imported from first on ``PYTHONPATH`` (and ``extra``)."""
    here = str(Path(__file__).resolve().parents[1])
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
