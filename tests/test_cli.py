"""The CLI contract: commands listed, fast help, one-line errors and documented exit statuses."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from cancernet_batch.cli import main
from cancernet_batch.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE

COMMANDS = ["synth", "train", "evaluate", "export", "inspect", "tile", "predict", "report", "run", "bench", "demo"]


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == EXIT_OK
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert f"  {cmd} " in out, cmd


def test_version(capsys):
    from cancernet_batch import __version__

    assert main(["--version"]) == EXIT_OK
    assert __version__ in capsys.readouterr().out


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, time; t=time.perf_counter(); from cancernet_batch.cli import main; "
            "rc = main(['--help']); heavy = [m for m in ('numpy','keras','tensorflow','dask','zarr','openslide','jax') "
            "if m in sys.modules]; print('HEAVY', heavy, time.perf_counter()-t)")
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t
    assert "HEAVY []" in out, out
    assert wall < 5.0  # a whole interpreter start; the import itself is a few tens of ms


def test_console_script_installed():
    r = subprocess.run(["cancernet", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "synth" in r.stdout


@pytest.mark.parametrize("argv", [["nope"], ["synth", "patches"], ["synth", "patches", "x", "--patients", "0"],
                                  ["synth", "slides", "x", "--format", "bmp"], ["synth", "patches", "x", "--idc-fraction", "2"]])
def test_bad_usage_exits_2(argv, capsys):
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Error" in err and "Traceback" not in err


def test_library_error_is_one_line_exit_1(tmp_path, capsys):
    rc = main(["synth", "slides", str(tmp_path / "s"), "--mpp", "50"])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "--mpp" in err


def test_debug_shows_traceback(tmp_path):
    from cancernet_batch.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "synth", "slides", str(tmp_path / "s"), "--mpp", "50"])
