"""Preflight: open a slide and decode a few pixels in a child process, with a timeout.

Native readers (libopenslide, libtiff, libjpeg, OpenJPEG...) can crash the whole process or hang
on corrupt files. The child opens the slide with :func:`cancernet_batch.slides.open_slide`, reads
its metadata and decodes a small region (one stored tile where the reader knows its tiles) of the
smallest and the largest level, and answers in JSON. Starting an interpreter per slide cost about
0.17 s of CPU, so each thread keeps one child
(``python -m cancernet_batch.preflight --serve``: a path per line on stdin, an answer per line)
for up to :data:`SERVE_REQUESTS` slides. When that child dies or hangs, the slide is checked again
alone in a fresh child (``python -m cancernet_batch.preflight PATH --result FILE``), so a slide is
only ever recorded as failed by what it does on its own, never by damage an earlier file left.
The parent turns the outcome into a :class:`~cancernet_batch.slides.SlideInfo` or raises:

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
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import errors
from .child import child_env, module_command
from .errors import CancerNetError, InputError, SlideReadError
from .slides import SlideInfo

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
PROBE_PX = 16
"""Side of the probe region (level pixels). The reader decodes the whole stored tile the box lies in (OpenSlide,
tifffile and the DICOM reader decode tiles whole), so a 16 px box checks that tile as a 256 px one did; what a larger
box added was the copy into RGBA, then RGB, of its pixels: 4.9 against 1.4 CPU ms for the two probes and the open of
a 20,000 px synthetic slide (RESULTS.md section 9)."""
SERVE_REQUESTS = 500
"""Slides one serving child checks before it is replaced (bounds whatever a reader leaks)."""


def _check(path: str, storage_options: dict | None = None, stage_limit_gb: float | None = None) -> dict:
    """Child side: open, read metadata, decode two small regions. Returns the JSON answer."""
    from .slides import open_slide
    from .slides.base import probe_box

    try:
        with open_slide(path, storage_options=storage_options, stage_limit_gb=stage_limit_gb) as reader:
            info = reader.info()
            for level in sorted({reader.level_count - 1, 0}):
                reader.read_region(level, *probe_box(reader, level, PROBE_PX))
        # an object on object storage: where its header lies, so the worker's own open fetches it in one round
        return {"ok": True, "info": {**info.to_json(), "source_header": getattr(reader, "source_header", None)}}
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


def _same_env(a: dict, b: dict) -> bool:
    """Whether two environments read slides alike: equal but for ``PYTHONHASHSEED``, which only a new
    interpreter's start reads (a Dask nanny sets it in its worker after the worker's child was forked)."""
    return {**a, "PYTHONHASHSEED": None} == {**b, "PYTHONHASHSEED": None}


class _Server:
    """One serving child: ``ask(path)`` returns its JSON answer, or None when it died or hung (then it is gone)."""

    def __init__(self, python: str, forked: "_Forked | None" = None, env: dict | None = None):
        self.python = python
        self.served = 0
        self._buf = b""
        if forked is not None:  # a child forked ready to serve (see prefork): nothing to start
            self._err, self.env, self.proc = forked.err, env, forked
            return
        self._err = tempfile.TemporaryFile()  # the child's stderr, never a pipe that could fill and block it
        self.env = child_env()  # what it was started with: credentials and endpoints for objects come from it
        self.proc = subprocess.Popen(module_command("cancernet_batch.preflight", "--serve", python=python), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, env=self.env)

    def ask(self, path: str, timeout: float, request: dict | None = None) -> dict | None:
        try:
            self.proc.stdin.write((json.dumps({"path": path, **(request or {})}) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:  # it died earlier
            self.close()
            return None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                log.info("%s: the serving preflight child gave no answer within %g s", path, timeout)
                self.close()
                return None
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                log.info("%s: the serving preflight child died", path)
                self.close()
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        self.served += 1
        try:
            return json.loads(line)
        except ValueError:
            self.close()
            return None

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None and self.served < SERVE_REQUESTS

    def fits(self, python: str) -> bool:
        """Whether this child can serve the next request: running, this interpreter, and this process's
        environment as it is now (a child started before AWS_* or another variable changed would read
        objects with the old ones)."""
        return self.python == python and self.alive and _same_env(self.env, child_env())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self._err):
            try:
                f.close()
            except OSError:
                pass


_LOCAL = threading.local()
_SPARE: list[_Server] = []
_SPARE_LOCK = threading.Lock()


def warm(python: str | None = None) -> None:
    """Start a serving child now, in the background, for the next thread that needs one (a worker calls this
    when it starts, so the child's imports overlap the client's set-up instead of delaying the first slide).
    A worker forked from the local cluster's forkserver already has one, forked with it (:func:`arm_prefork`):
    that one is used while this process's environment is still the one it was forked with."""
    python = python or sys.executable
    preforked = _take_preforked()
    with _SPARE_LOCK:
        for forked in preforked:
            if forked.fits(python):
                _SPARE.append(forked)
            else:
                forked.close()
        if not _SPARE:
            try:
                _SPARE.append(_Server(python))
            except OSError:
                pass


def dask_setup(worker) -> None:
    """Dask worker preload (local clusters): start this worker's serving child as the worker starts.
    A worker that only scores (Dask resource ``score`` alone) never preflights: none for it."""
    resources = dict(getattr(getattr(worker, "state", None), "total_resources", None) or {})
    if resources.get("score") and not resources.get("tile"):
        for forked in _take_preforked():
            forked.close()
        return
    warm()


def _take_preforked() -> "list[_Server]":
    """The serving children forked with this process (:func:`arm_prefork`), once: later calls get none."""
    global _PREFORKED
    with _SPARE_LOCK:
        forked, _PREFORKED = _PREFORKED, []
    return forked


class _Forked:
    """A serving child made by ``os.fork`` (the few calls of :class:`subprocess.Popen` that :class:`_Server` uses)."""

    def __init__(self, pid: int, stdin, stdout, err):
        self.pid, self.stdin, self.stdout, self.err = pid, stdin, stdout, err
        self.returncode: int | None = None

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:  # reaped elsewhere: it is gone
                pid, status = self.pid, 0
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self) -> int | None:
        return self._reap(0)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


_PREFORKED: "list[_Server]" = []
_ARMED = False


def arm_prefork() -> None:
    """In the local cluster's forkserver (``cancernet_batch.prefork``, one of its preloaded modules): every
    process forked from it then forks its own serving child first, before it runs anything else.

    A serving child started with ``python -m`` imports numpy and the readers anew: about 0.3 s of CPU, and on
    a machine whose cores are busy starting the cluster, a first slide's preflight waited 0.2-0.3 s for it.
    Forked, it has every module the forkserver imported and serves at once. The fork happens in
    multiprocessing's after-fork hook of the new process, while it has one thread (a fork never copies a
    lock another thread holds); the worker adopts the child in :func:`warm`."""
    global _ARMED
    import multiprocessing.util

    _ARMED = True
    multiprocessing.util.register_after_fork(_HOOK, _fork_server)


class _Hook:  # register_after_fork keeps a weak reference to an object
    pass


_HOOK = _Hook()


def _fork_server(_hook=None) -> None:
    """After-fork hook (see :func:`arm_prefork`): fork this process's serving children (one per worker thread:
    ``cluster.PREFLIGHT_CHILDREN_ENV``), once."""
    global _ARMED, _PREFORKED
    if not _ARMED:
        return
    _ARMED = False  # this process's own children (forked later, with threads) make none
    if threading.active_count() != 1:
        return
    import multiprocessing

    target = getattr(multiprocessing.current_process(), "_target", None)
    if target is not None and not str(getattr(target, "__module__", "")).startswith("distributed"):
        return  # not a Dask worker (from Python 3.14 a process pool's processes come from the forkserver too)
    from .cluster import PREFLIGHT_CHILDREN_ENV  # (set by cluster.worker_environ; a light module)

    env = child_env()
    try:
        n = max(1, min(8, int(os.environ.get(PREFLIGHT_CHILDREN_ENV) or 1)))
    except ValueError:
        n = 1
    for _ in range(n):
        server = _fork_one(env)
        if server is None:
            return
        _PREFORKED.append(server)


def _fork_one(env: dict) -> "_Server | None":
    """One serving child forked from this process (a single thread), or None where the fork failed."""
    try:
        err = tempfile.TemporaryFile()
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        pid = os.fork()
    except OSError:
        return None
    if pid == 0:  # the serving child: requests on fd 0, answers on fd 1, its stderr in the file
        code = 1
        try:
            os.dup2(req_r, 0)
            os.dup2(ans_w, 1)
            os.dup2(err.fileno(), 2)
            os.closerange(3, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 1024)
            code = serve(os.fdopen(0, "r", encoding="utf-8"))
        finally:
            os._exit(code)
    os.close(req_r)
    os.close(ans_w)
    forked = _Forked(pid, os.fdopen(req_w, "wb"), os.fdopen(ans_r, "rb"), err)
    return _Server(sys.executable, forked, env)


def _new_server(python: str) -> _Server:
    with _SPARE_LOCK:
        spare = _SPARE.pop() if _SPARE else None
    if spare is not None and spare.fits(python):
        return spare
    if spare is not None:
        spare.close()
    return _Server(python)


def _ask_server(path: str, timeout: float, python: str, request: dict | None = None) -> dict | None:
    """The answer of this thread's serving child (started or replaced as needed); None when it failed."""
    server = getattr(_LOCAL, "server", None)
    if server is not None and not server.fits(python):
        server.close()
        server = None
    if server is None:
        try:
            server = _new_server(python)
        except OSError:
            _LOCAL.server = None
            return None
    _LOCAL.server = server
    answer = server.ask(path, timeout, request)
    if answer is None:
        _LOCAL.server = None
    return answer


def preflight(path: str | os.PathLike, *, timeout: float = DEFAULT_TIMEOUT, python: str | None = None,
              storage_options: dict | None = None, stage_limit_gb: float | None = None) -> SlideInfo:
    """Open ``path`` in a child process (``python``, default this interpreter) and return its metadata.

    ``path`` may be a URL on object storage: the child gets ``storage_options`` on its standard input
    (never on its command line, where other users could see them) and reads the object itself.

    Raises the reader's error, or :class:`SlideReadError` when the child crashes or exceeds ``timeout``
    (checked alone in a fresh child: a slide that fails in the shared one is tried once more by itself,
    so a hang costs up to twice ``timeout``).
    """
    path = str(path)
    request = {"storage_options": storage_options, "stage_limit_gb": stage_limit_gb}
    answer = _ask_server(path, timeout, python or sys.executable, request)
    if answer is None:
        return _preflight_alone(path, timeout, python, request)
    if not answer.get("ok"):
        raise _error(answer, path)
    log.debug("%s: preflight ok", path)
    return SlideInfo.from_json(answer["info"])


def _preflight_alone(path: str, timeout: float, python: str | None, request: dict | None = None) -> SlideInfo:
    """:func:`preflight` in a fresh child of its own: the verdict that counts when the shared child failed."""
    fd, result = tempfile.mkstemp(prefix="cancernet-preflight-", suffix=".json")
    os.close(fd)
    try:
        cmd = module_command("cancernet_batch.preflight", path, "--result", result, "--request-stdin", python=python)
        env = child_env()
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env,
                                  input=json.dumps(request or {}).encode())
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


def serve(requests=None) -> int:
    """Serving child: a JSON request ``{"path": ...}`` per line of ``requests`` (stdin), a JSON answer per
    stdout line."""
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything a native library prints goes to stderr, never into the answers
    for line in requests or sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        answers.write(json.dumps(_check(req["path"], req.get("storage_options"), req.get("stage_limit_gb"))) + "\n")
        answers.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Child entry point: ``python -m cancernet_batch.preflight PATH --result FILE``, or ``--serve``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--serve"]:
        return serve()
    ap = argparse.ArgumentParser(prog="python -m cancernet_batch.preflight")
    ap.add_argument("path")
    ap.add_argument("--result", required=True)
    ap.add_argument("--request-stdin", action="store_true",
                    help="read {storage_options, stage_limit_gb} as JSON from standard input")
    args = ap.parse_args(argv)
    req = json.loads(sys.stdin.read() or "{}") if args.request_stdin else {}
    answer = _check(args.path, req.get("storage_options"), req.get("stage_limit_gb"))
    Path(args.result).write_text(json.dumps(answer), encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover - runs in the child
    sys.exit(main())
