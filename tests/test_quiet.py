"""TensorFlow's start-up notices are filtered from stderr; everything else written there survives."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from cancernet_batch.quiet import is_noise

NOTICE = ("I0000 00:00:1795634854.699390   26208 port.cc:153] oneDNN custom operations are on. You may see "
          "slightly different numerical results")


def test_is_noise_only_for_info_notices():
    assert is_noise(NOTICE)
    assert is_noise("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR")
    assert is_noise("To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with "
                    "the appropriate compiler flags.")
    assert not is_noise("E0000 00:00:1795634854.699390   26208 cuda_dnn.cc:8310] Could not load cudnn")
    assert not is_noise("W0000 00:00:1795634854.699390   26208 gpu_device.cc:2344] Cannot dlopen some GPU libraries.")
    assert not is_noise("Traceback (most recent call last):")


def test_import_keras_drops_notices_and_keeps_errors(tmp_path):
    # a stand-in "keras" that writes to descriptor 2 the way TensorFlow's C++ code does
    (tmp_path / "keras.py").write_text(textwrap.dedent(f"""
        import os
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
        os.write(2, {NOTICE!r}.encode() + b"\\n")
        os.write(2, b"E0000 00:00:1.0  1 cuda.cc:1] real problem here\\n")
    """))
    code = "from cancernet_batch.quiet import import_keras; k = import_keras(); print(k.__file__)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "keras.py")
    assert "real problem here" in r.stderr
    assert "oneDNN" not in r.stderr and "absl" not in r.stderr


def test_real_tensorflow_import_is_quiet():
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    code = "from cancernet_batch.quiet import import_keras; import sys; print(import_keras().backend.backend())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "tensorflow", r.stderr
    assert r.stderr.strip() == "", r.stderr
