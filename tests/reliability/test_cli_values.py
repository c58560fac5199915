"""Hostile command lines: nan/inf/absurd numbers, a run folder inside an input, TLS without a scheduler,
and --scheduler addresses that are not a Dask scheduler. Usage errors exit 2 before any work; a bad
scheduler ends with one `error:` line (exit 1) instead of hanging."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading

import click
import pytest

from cancernet_batch import cli

ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}

BASE = {  # each command with its required arguments
    ("synth", "patches"): ["synth", "patches", "OUT"],
    ("synth", "slides"): ["synth", "slides", "OUT"],
    ("train",): ["train", "DATA", "--out", "OUT"],
    ("inspect",): ["inspect", "X"],
    ("tile",): ["tile", "X", "--out", "OUT"],
    ("predict",): ["predict", "RUN", "--model", "M"],
    ("report",): ["report", "RUN"],
    ("run",): ["run", "X", "--out", "OUT", "--model", "M"],
}


def _commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


def _number_options():
    out = []
    for path, cmd in _commands(cli.cli):
        for p in cmd.params:
            if isinstance(p, click.Option) and isinstance(p.type, cli.Number):
                out.append((path, p.opts[0]))
    return out


def test_every_float_option_is_validated():
    floats = [(path, p.opts[0]) for path, cmd in _commands(cli.cli) for p in cmd.params
              if isinstance(p.type, (click.types.FloatParamType, click.FloatRange)) and not isinstance(p.type, cli.Number)]
    assert not floats
    assert len(_number_options()) >= 15


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e300", "-1e300"])
def test_nan_inf_and_absurd_numbers_are_usage_errors(value, capsys):
    options = [(path, opt) for path, opt in _number_options() if path in BASE]
    assert options
    for path, opt in options:
        rc = cli.main([*BASE[path], f"{opt}={value}"])
        err = capsys.readouterr().err
        assert rc == 2, (path, opt, value, err)
        assert opt in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["tile", "X", "--out", "OUT", "--chunk-size", "1000000000"],
                                  ["predict", "RUN", "--model", "M", "--batch-size", "1000000000"],
                                  ["run", "X", "--out", "OUT", "--model", "M", "--workers", "100000"]])
def test_absurd_sizes_are_usage_errors(argv, capsys):
    assert cli.main(argv) == 2
    assert "Invalid value" in capsys.readouterr().err


def test_out_inside_an_input_is_a_usage_error(tmp_path, capsys):
    archive = tmp_path / "archive"
    (archive / "P1" / "0").mkdir(parents=True)
    (archive / "P1" / "1").mkdir()
    slide = tmp_path / "a.svs"
    slide.write_bytes(b"x")
    os.symlink(archive, tmp_path / "link")
    cases = [
        ["tile", str(archive), "--out", str(archive / "run")],
        ["tile", str(archive / "P1"), "--out", str(archive / "P1" / "0" / "run")],  # inside a label folder
        ["tile", str(tmp_path / "link"), "--out", str(archive / "run")],  # through a symlink
        ["run", str(archive / "P1"), "--out", str(archive / "P1" / "1"), "--model", "M"],
        ["run", str(archive), "--out", str(archive / "P1" / "run"), "--model", "M"],
    ]
    for argv in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "--out" in err and "inside the input" in err, err
    assert not (archive / "run").exists() and not (archive / "P1" / "0" / "run").exists()
    cli.check_out_not_inside_inputs(str(tmp_path / "run"), [str(archive), str(slide)])  # beside them: fine


@pytest.mark.parametrize("option", ["--tls-ca-file", "--tls-cert", "--tls-key"])
def test_tls_options_without_a_scheduler_are_usage_errors(option, tmp_path, capsys):
    assert cli.main(["tile", str(tmp_path / "x.svs"), "--out", str(tmp_path / "run"), option, "ca.pem"]) == 2
    err = capsys.readouterr().err
    assert option in err and "--scheduler" in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# --scheduler addresses that are no Dask scheduler
# --------------------------------------------------------------------------------------------

def _http_server() -> tuple[int, object]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv.server_address[1], srv.shutdown


def _silent_server() -> tuple[int, object]:
    """Accepts connections and never sends a byte."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    held = []

    def accept():
        while True:
            try:
                held.append(s.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return s.getsockname()[1], s.close


def _nothing() -> tuple[int, object]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port, lambda: None


@pytest.mark.parametrize("server", [_http_server, _silent_server, _nothing], ids=["http", "silent", "closed-port"])
def test_scheduler_that_is_not_dask_ends_with_one_line(server, tmp_path):
    port, stop = server()
    (tmp_path / "x.svs").write_bytes(b"not looked at: the scheduler is reached first")
    try:
        # the subprocess timeout is the bound: before the fix the http and silent cases hung forever
        r = subprocess.run([sys.executable, "-m", "cancernet_batch.cli", "tile", str(tmp_path / "x.svs"), "--out",
                            str(tmp_path / "run"), "--scheduler", f"tcp://127.0.0.1:{port}", "--connect-timeout", "3"],
                           capture_output=True, text=True, env=ENV, timeout=120)
    finally:
        stop()
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert f"127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
