"""``pytest --fresh-home`` (what CI runs): the tests and every subprocess see an empty home, so a green
run cannot lean on caches or settings (Keras, matplotlib, Dask, the bench's autotune file) that a
developer's machine happens to have."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import FRESH_HOME_VARS, REPO

PROBE = ("import json, os, pathlib, matplotlib; "
         "print(json.dumps({'home': str(pathlib.Path.home()), 'mpl': matplotlib.get_cachedir(), "
         "'env': {k: os.environ.get(k) for k in %r}}))" % (list(FRESH_HOME_VARS),))


def test_fresh_home(request, tmp_path):
    if not request.config.getoption("fresh_home"):
        # check the mode itself: this test, run by a pytest with --fresh-home (which runs the branch below)
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--fresh-home",
                            f"{Path(__file__).relative_to(REPO)}::test_fresh_home"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr
        return
    home = Path(os.environ["HOME"])
    assert home.name.startswith("cancernet-fresh-home-")
    seen = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                                     timeout=120).stdout)
    assert seen["home"] == str(home)
    assert Path(seen["mpl"]).is_relative_to(home)
    assert all(Path(v).is_relative_to(home) for v in seen["env"].values()), seen["env"]
