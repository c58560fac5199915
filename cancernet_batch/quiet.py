"""Keep TensorFlow's start-up chatter off the terminal without hiding real errors.

TensorFlow 2.21 writes absl INFO lines ("oneDNN custom operations are on", "This TensorFlow
binary is optimized...", "All log messages before absl::InitializeLog()...") straight to file
descriptor 2 while it is imported; ``TF_CPP_MIN_LOG_LEVEL`` no longer silences them.
:func:`import_keras` imports Keras (and through it the backend) with descriptor 2 sent to a
temporary file, then writes back every captured line that is not one of those known notices, so
warnings and errors still reach the user.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading

# absl's prefix: severity letter I/W/E/F, date, time, thread, file:line]
_ABSL_INFO = re.compile(r"^I\d{4} [\d:.]+\s+\d+ \S+:\d+\] ")
_NOISE = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "To enable the following instructions:",
    "rebuild TensorFlow with the appropriate compiler flags",
)
_LOCK = threading.Lock()


def is_noise(line: str) -> bool:
    """True for TensorFlow's INFO start-up notices (never for warnings or errors)."""
    s = line.strip()
    return not s or bool(_ABSL_INFO.match(s)) or any(n in s for n in _NOISE)


def import_keras():
    """``import keras`` (loading its backend), with TensorFlow's start-up INFO lines filtered out."""
    if "keras" in sys.modules:
        return sys.modules["keras"]
    with _LOCK:
        if "keras" in sys.modules:
            return sys.modules["keras"]
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # no real descriptor (captured by a test runner, IDLE)
            import keras

            return keras
        sys.stderr.flush()
        saved = os.dup(fd)
        with tempfile.TemporaryFile(mode="w+b") as capture:
            os.dup2(capture.fileno(), fd)
            try:
                import keras
            finally:
                sys.stderr.flush()
                os.dup2(saved, fd)
                os.close(saved)
                capture.seek(0)
                text = capture.read().decode("utf-8", "replace")
        kept = [line for line in text.splitlines() if not is_noise(line)]
        if kept:
            sys.stderr.write("\n".join(kept) + "\n")
            sys.stderr.flush()
        return keras
