"""Count the tests of the reliability suite per file (pytest items, parametrised cases included).

Run from the repository root: ``python benchmarks/reliability_counts.py``. Prints a Markdown table with
the date and machine; the README's reliability table quotes it.
"""

from __future__ import annotations

import collections
import platform
import subprocess
import sys
from datetime import datetime, timezone


def main() -> int:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/reliability"], capture_output=True, text=True, check=True).stdout
    counts = collections.Counter(line.split("::")[0] for line in out.splitlines() if "::" in line)
    print(f"reliability tests collected {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.node()} "
          f"({platform.machine()}, Python {platform.python_version()})\n")
    print("| file | tests |\n|---|---|")
    for name, n in sorted(counts.items()):
        print(f"| `{name}` | {n} |")
    print(f"| total | {sum(counts.values())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
