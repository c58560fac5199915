"""The README's two commands for a newcomer: CI runs the second one verbatim, and both install the same way."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    return [next(line for line in b.splitlines() if line.strip() and not line.startswith("#")) for b in blocks[:2]]


def test_ci_runs_the_readmes_test_command_verbatim():
    demo, tests = _readme_commands()
    ci = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == tests, "the last command of .ci/run must be the README's test command, verbatim"
    assert tests.endswith("python -m pytest -q") and "cancernet demo" in demo


def test_both_commands_install_alike():
    demo, tests = _readme_commands()
    install = re.compile(r"&& (pip install -q uv && uv pip install -q --compile-bytecode -e) ")
    # the same installer and options (pip settles for uv, which byte-compiles as pip does; --compile-bytecode matters
    # where PYTHONDONTWRITEBYTECODE is set: without it every process would compile the packages from source)
    assert install.search(demo) and install.search(tests)
    assert install.search(demo).group(1) == install.search(tests).group(1)
