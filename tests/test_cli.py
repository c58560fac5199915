"""The CLI contract: commands listed, fast help, one-line errors and documented exit statuses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

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
    """The ``cancernet`` command is installed in the environment whose Python runs the tests (found beside that
    interpreter, so the test holds whether or not the environment is activated)."""
    script = Path(sys.executable).parent / ("cancernet.exe" if os.name == "nt" else "cancernet")
    assert script.is_file(), f"{script}: not installed in this environment (pip install -e .)"
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True)
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


def _efbig(name: str = "/run/tiles.zarr/inputs/a/zarr.json") -> OSError:
    import errno
    import os

    return OSError(errno.EFBIG, os.strerror(errno.EFBIG), name)


def _raised(make) -> BaseException:
    try:
        make()
    except BaseException as exc:  # noqa: BLE001 - the test inspects whatever was raised
        return exc
    raise AssertionError("nothing raised")


def _wrapped_from():
    try:
        raise _efbig()
    except OSError as exc:
        raise RuntimeError("zarr: write failed") from exc


def _wrapped_during():
    try:
        raise _efbig()
    except OSError:
        raise KeyError("cleanup failed too")


@pytest.mark.parametrize("make", [_wrapped_from, _wrapped_during])
def test_storage_oserror_anywhere_is_one_storage_error(make):
    from cancernet_batch.errors import StorageError, as_one_line_error

    err = as_one_line_error(_raised(make))
    assert isinstance(err, StorageError)
    assert err.one_line() == ("/run/tiles.zarr/inputs/a/zarr.json: cannot write: File too large "
                              "(check that the output folder is writable and has free space)")


def test_storage_oserror_inside_an_exception_group():
    import builtins

    from cancernet_batch.errors import ConfigError, StorageError, as_one_line_error

    group = getattr(builtins, "ExceptionGroup", None)
    if group is None:
        pytest.skip("ExceptionGroup is Python 3.11+")
    inner = RuntimeError("worker task failed")
    inner.__cause__ = _efbig()
    assert isinstance(as_one_line_error(group("tasks", [ValueError("x"), inner])), StorageError)
    lib = ConfigError("bad settings", hint="fix them")
    assert as_one_line_error(group("tasks", [lib])) is lib  # a library error inside a group is shown as itself
    assert as_one_line_error(group("tasks", [ValueError("x")])) is None  # a bug keeps its traceback
    assert as_one_line_error(KeyError("bug")) is None
    assert as_one_line_error(OSError(2, "No such file or directory", "x")) is None  # not a storage errno


def test_wrapped_full_disk_escaping_a_command_is_one_line(capsys):
    """Whatever wraps it (zarr, Dask, asyncio), an EFBIG / ENOSPC reaching the CLI is one line, exit 1."""
    import click

    from cancernet_batch.cli import cli

    @click.command("raise-wrapped-efbig")
    def raise_wrapped() -> None:
        _wrapped_from()

    cli.add_command(raise_wrapped)
    try:
        rc = main(["raise-wrapped-efbig"])
    finally:
        cli.commands.pop("raise-wrapped-efbig")
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR
    assert err.startswith("error: ") and err.count("\n") == 1 and "File too large" in err and "free space" in err
    with pytest.raises(RuntimeError):  # --debug still shows the traceback
        cli.add_command(raise_wrapped)
        try:
            main(["--debug", "raise-wrapped-efbig"])
        finally:
            cli.commands.pop("raise-wrapped-efbig")


def test_tile_imports_no_model_or_plotting_library(slides_dir, tmp_path):
    """`cancernet tile` is all start-up for a small batch: its process imports none of the model and plotting
    libraries (each costs seconds on a 2-core machine), nor importlib.metadata for the version nobody asked."""
    heavy = ("tensorflow", "keras", "jax", "torch", "onnxruntime", "matplotlib", "importlib.metadata")
    slide, run = str(slides_dir / "cmu-1-small-region.svs"), str(tmp_path / "run")
    code = ("import sys; from cancernet_batch.cli import main; before = [m for m in %r if m in sys.modules]; "
            "rc = main(['tile', %r, '--out', %r, '--workers', '1']); "
            "print('HEAVY', before, [m for m in %r[:-1] if m in sys.modules], rc)" % (heavy, slide, run, heavy))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600).stdout
    assert f"HEAVY [] [] {EXIT_OK}" in out, out
    assert "tiled    " in out  # it did tile
