"""Wall-clock bounds on the per-input steps that read a slide (planning, each tile chunk).

A slide can be slow to read for hours without being "corrupt": a small file that declares an enormous
level with sparse tiles, a decoder stuck on a damaged tile, a stalled network disk. The preflight
child bounds opening a slide (:mod:`cancernet_batch.preflight`); this module bounds what comes after,
on the Dask worker, with two guards:

* **cooperative**: :func:`check` is called between region reads (:func:`~cancernet_batch.slides.base.read_scaled`,
  patch loading); once the step's deadline has passed it raises, so a long loop of small reads stops
  at the next read and its thread ends.
* **hard**: :func:`bounded` runs the step in its own thread and stops waiting at the deadline, so one
  native call that never returns (a hung read) still ends the step with a clear failure. The stuck
  thread is left behind (it cannot be killed from Python); its reader is forgotten, not closed.

Either way the step raises :class:`~cancernet_batch.errors.SlideReadError` naming the file, the step
and the bound, so the input gets one failure row and the rest of the batch goes on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import SlideReadError

T = TypeVar("T")

_local = threading.local()


def _error(path: str, what: str, seconds: float) -> SlideReadError:
    return SlideReadError(f"{what} took longer than {seconds:g} s: stopped", path=path,
                          hint="the file may be damaged (a small file that declares a huge image) or on a stalled "
                               "disk; leave it out, or raise --read-timeout for very large slides on slow storage")


def check() -> None:
    """Raise when the current thread's step is past its deadline (no-op outside :func:`bounded`)."""
    d = getattr(_local, "deadline", None)
    if d is not None and time.monotonic() > d[0]:
        raise _error(*d[1:])


def bounded(fn: Callable[[], T], seconds: float | None, *, path: str, what: str,
            on_timeout: Callable[[], None] | None = None) -> T:
    """``fn()``, or :class:`SlideReadError` once ``seconds`` have passed (``None``: no bound).

    ``on_timeout`` runs when the hard guard gives up on a thread that is still running (for example to
    forget the reader that thread holds, so the next task opens a fresh one).
    """
    if seconds is None:
        return fn()
    start = time.monotonic()
    box: dict = {}

    def target() -> None:
        _local.deadline = (start + seconds, path, what, seconds)
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc
        finally:
            _local.deadline = None

    t = threading.Thread(target=target, name=f"bounded {what}", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if on_timeout is not None:
            on_timeout()
        raise _error(path, what, seconds)
    if "error" in box:
        raise box["error"]
    return box["value"]
