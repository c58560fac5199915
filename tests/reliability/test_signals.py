"""The operator's signals: Ctrl-C (SIGINT) ends `cancernet run` with 130, SIGTERM (a job's time limit) with 143,
each with the re-run hint, the run folder's lock released, nothing half-written; the re-run finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cancernet_batch.runfolder import Run

ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
pytestmark = pytest.mark.slow


def _args(inputs, run: Path, model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cancernet_batch.cli", "run", *map(str, inputs), "--out", str(run),
            "--model", str(model), "--workers", "1", "--chunk-size", "8", *extra]


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_ends_cleanly_and_rerun_finishes(sig, code, word, synth_slide_dir, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    inputs = [synth_slide_dir]
    # a shell that starts pytest in the background (`cmd &` without job control) leaves SIGINT ignored, and
    # children inherit that; the operator's terminal does not: give the run the default disposition
    p = subprocess.Popen(_args(inputs, run, tiny_model_dir, "--batch-size", "1", "--report-every", "0"), env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not (run / "progress.json").exists():
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be interrupted"
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err[-2000:]
    assert err.strip().splitlines()[-1] == f"{word}; re-run the same command to resume"
    assert Run.of(run).holder() is None  # the lock went with the process
    assert not list(run.rglob(".tmp-*"))
    r = subprocess.run(_args(inputs, run, tiny_model_dir), capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 reported, 0 failed" in r.stdout
