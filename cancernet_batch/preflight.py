"""Preflight: open a slide and decode a few pixels in a child process, with a timeout.

Native readers (libopenslide, libtiff, libjpeg, OpenJPEG...) can crash the whole process or hang
on corrupt files. :func:`preflight` runs ``python -m cancernet_batch.preflight PATH --result FILE``;
the child opens the slide with :func:`cancernet_batch.slides.open_slide`, reads its metadata and
decodes a small region of the smallest and the largest level, and writes JSON to ``FILE``. The
parent turns the outcome into a :class:`~cancernet_batch.slides.SlideInfo` or raises:

* the reader refused the file or its pixels do not decode: the child's own error class
  (:class:`UnsupportedFormatError`, :class:`SlideReadError`...) and message;
* the child died from a signal (segfault, abort): :class:`SlideReadError` "reader crashed";
* no answer within ``timeout`` seconds: the child is killed, :class:`SlideReadError` "reader hung".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from . import errors
from .errors import CancerNetError, InputError, SlideReadError
from .slides import SlideInfo

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
PROBE_PX = 256


def _check(path: str) -> dict:
    """Child side: open, read metadata, decode two small regions. Returns the JSON answer."""
    from .slides import open_slide

    try:
        with open_slide(path) as reader:
            info = reader.info()
            for level in sorted({reader.level_count - 1, 0}):
                w, h = reader.level_dimensions[level]
                pw, ph = min(w, PROBE_PX), min(h, PROBE_PX)
                reader.read_region(level, (w - pw) // 2, (h - ph) // 2, pw, ph)
        return {"ok": True, "info": info.to_json()}
    except CancerNetError as exc:
        return {"ok": False, "error_class": type(exc).__name__, "message": exc.message, "hint": exc.hint}
    except Exception as exc:  # noqa: BLE001 - a reader's own error: report it, do not crash
        return {"ok": False, "error_class": "SlideReadError", "message": f"{type(exc).__name__}: {exc}",
                "hint": "the file is probably corrupt; re-export it, or leave it out"}


def _error(answer: dict, path: str) -> CancerNetError:
    cls = getattr(errors, str(answer.get("error_class")), None)
    if not (isinstance(cls, type) and issubclass(cls, CancerNetError)):
        cls = InputError
    return cls(answer.get("message") or "preflight failed", path=path, hint=answer.get("hint"))


def preflight(path: str | os.PathLike, *, timeout: float = DEFAULT_TIMEOUT, python: str | None = None) -> SlideInfo:
    """Open ``path`` in a child process (``python``, default this interpreter) and return its metadata.

    Raises the reader's error, or :class:`SlideReadError` when the child crashes or exceeds ``timeout``.
    """
    path = str(path)
    fd, result = tempfile.mkstemp(prefix="cancernet-preflight-", suffix=".json")
    os.close(fd)
    try:
        cmd = [python or sys.executable, "-m", "cancernet_batch.preflight", path, "--result", result]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                        os.environ.get("PYTHONPATH")]))}
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise SlideReadError(f"the slide reader hung: no answer within {timeout:g} s", path=path,
                                 hint="the file may be corrupt or on a stalled disk; raise --preflight-timeout "
                                      "or leave it out") from exc
        try:
            answer = json.loads(Path(result).read_text(encoding="utf-8") or "null")
        except (OSError, json.JSONDecodeError):
            answer = None
        if proc.returncode < 0 or answer is None:
            how = (f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                   and -proc.returncode in signal.valid_signals() else f"exit status {proc.returncode}")
            tail = " ".join(proc.stderr.decode("utf-8", "replace").split())[-200:]
            raise SlideReadError(f"the slide reader crashed ({how}) while opening the file"
                                 + (f": {tail}" if tail else ""), path=path,
                                 hint="the file is probably corrupt; re-export or re-scan it, or leave it out")
        if not answer.get("ok"):
            raise _error(answer, path)
        log.debug("%s: preflight ok", path)
        return SlideInfo.from_json(answer["info"])
    finally:
        Path(result).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Child entry point: ``python -m cancernet_batch.preflight PATH --result FILE``."""
    ap = argparse.ArgumentParser(prog="python -m cancernet_batch.preflight")
    ap.add_argument("path")
    ap.add_argument("--result", required=True)
    args = ap.parse_args(argv)
    answer = _check(args.path)
    Path(args.result).write_text(json.dumps(answer), encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover - runs in the child
    sys.exit(main())
