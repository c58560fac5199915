"""Dask clusters: a local one by default, or an existing scheduler by address.

The local cluster runs worker *processes* bound to 127.0.0.1 (scheduler, workers and dashboard),
so nothing the tool starts listens on other interfaces unless ``host`` says so. For an existing
cluster (``dask scheduler`` + ``dask worker``, dask-jobqueue, Kubernetes...), pass its address;
``tls://`` addresses use certificates given here or in Dask's own configuration
(``distributed.comm.tls.*``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping

from .config import ClusterConfig
from .errors import ConfigError

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def security(cfg: ClusterConfig):
    """Dask ``Security`` for TLS, from explicit files or (when none given) Dask's configuration."""
    from distributed.security import Security

    files = (cfg.tls_ca_file, cfg.tls_cert, cfg.tls_key)
    if any(files):
        if not all(files):
            raise ConfigError("TLS needs all of --tls-ca-file, --tls-cert and --tls-key")
        for f in files:
            if not os.path.exists(f):
                raise ConfigError("TLS file not found", path=f, hint="check the certificate paths")
        return Security(tls_ca_file=cfg.tls_ca_file, tls_client_cert=cfg.tls_cert, tls_client_key=cfg.tls_key,
                        require_encryption=True)
    return Security()


def probe_scheduler(address: str, sec, timeout: float) -> None:
    """Connect to ``address`` and complete Dask's handshake within ``timeout`` seconds, or ConfigError.

    ``distributed.Client`` bounds the TCP connect but then waits for the peer's handshake without a
    limit: an HTTP server (the dashboard port) or any server that accepts and stays silent hangs it
    forever. This probe bounds the whole exchange.
    """
    import asyncio

    from distributed.comm import connect

    hint = ("check the address (tcp://HOST:8786 or tls://..., the scheduler's port, not the dashboard's), "
            "that the scheduler runs, the TLS certificates, or raise --connect-timeout")
    args = sec.get_connection_args("client") if sec is not None else {}

    async def handshake() -> None:
        comm = await asyncio.wait_for(connect(address, timeout=timeout, **args), timeout)
        await comm.close()

    try:
        asyncio.run(handshake())
    except (asyncio.TimeoutError, TimeoutError) as exc:
        raise ConfigError(f"no Dask scheduler answered at {address} within {timeout:g} s "
                          "(something accepts connections there but does not speak Dask's protocol)",
                          hint=hint) from exc
    except (OSError, TypeError, ValueError, EOFError) as exc:
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConfigError(f"cannot reach the Dask scheduler at {address}: {text}", hint=hint) from exc
    except Exception as exc:  # noqa: BLE001 - a peer that sends garbage makes the decoder raise anything
        raise ConfigError(f"{address} is not a Dask scheduler ({type(exc).__name__} in the handshake)",
                          hint=hint) from exc


PREFLIGHT_CHILDREN_ENV = "CANCERNET_PREFLIGHT_CHILDREN"
"""How many serving children a local worker forks as it starts (:func:`cancernet_batch.preflight.arm_prefork`): one
for each of its threads, since each thread preflights in a child of its own. A thread with none started a fresh
interpreter: with 2 threads a worker (a run on object storage), the second slide's preflight on each worker waited
about a second for its imports (RESULTS.md section 8)."""


def worker_environ(cfg: ClusterConfig) -> dict[str, str]:
    """Environment the local cluster's worker processes must start with (read by libraries at start-up).

    Dask's nannies pin OMP/MKL/OpenBLAS to 1 thread per worker; the model engines (oneDNN under
    TensorFlow, MLAS under ONNX Runtime) should get this worker's share of the cores instead.
    Dask's nannies also set MALLOC_TRIM_THRESHOLD_=65536, which makes glibc map and zero-fill every
    large buffer afresh: reading slide regions (4 MB RGBA each) ran about 25 % slower. A 128 MiB trim
    threshold with buffers up to 32 MiB served from the heap measured as fast as glibc's defaults.
    """
    workers, threads = cfg.local_shape()
    per_task = str(max(1, usable_cores() // (workers * threads)))
    return {"MALLOC_TRIM_THRESHOLD_": str(128 * 2**20), "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
            "OMP_NUM_THREADS": per_task, "MKL_NUM_THREADS": per_task, "OPENBLAS_NUM_THREADS": per_task,
            PREFLIGHT_CHILDREN_ENV: str(threads)}  # a slide-preflight child forked ready for each thread


PIL_PLUGINS = ("PIL.BmpImagePlugin", "PIL.GifImagePlugin", "PIL.PngImagePlugin", "PIL.PpmImagePlugin", "PIL.ImageChops",
               "PIL.ImagePalette", "PIL.GimpGradientFile", "PIL.GimpPaletteFile", "PIL.PaletteFile", "PIL.ImageSequence")
"""What Pillow imports on a process's first ``Image.open`` (``Image.preinit``): each worker's first slide paid for it."""
FORKSERVER_PRELOAD = ("distributed", "numpy", "scipy.sparse", "zarr", "PIL.Image",
                      "PIL.JpegImagePlugin", "openslide", "tifffile", "cancernet_batch.stages.tile",
                      "cancernet_batch.tissue", "cancernet_batch.preflight", "cancernet_batch.slides.direct",
                      "cancernet_batch.slides.openslide_backend", "cancernet_batch.slides.tifffile_backend",
                      "cancernet_batch.remote", *PIL_PLUGINS, "cancernet_batch.prefork")
"""Modules imported once in the process local workers are forked from (each worker started with them; the last
makes each worker fork its slide-preflight child as it starts: :func:`cancernet_batch.preflight.arm_prefork`)."""
_FORKSERVER_ENV: dict[str, str] | None = None
CLIENT_PRELOAD = ("zarr", "cancernet_batch.store", "cancernet_batch.runfolder")
"""Modules the client of a run needs as soon as its cluster is up: imported while the local workers start."""


def import_in_background(modules: Iterable[str]) -> None:
    """Import ``modules`` in a daemon thread (errors are left to the import that needs the module), so that the
    caller's wait (a local cluster's start: 0.3 s and more of this process idle) covers their cost: zarr alone
    takes 0.25 s of CPU, which a run's client would otherwise pay after the cluster is up, before its first task."""
    import importlib
    import threading

    def run() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the real import says what is wrong, where it is needed
                return

    threading.Thread(target=run, name="cancernet imports", daemon=True).start()


_DRIVER_WARM = {"s3fs": ("cancernet_batch.s3warm",)}
"""What the forkserver imports after a storage driver: for S3, botocore's data read into the process's shared
session (:func:`cancernet_batch.runfolder.warm_s3_session`)."""


def storage_drivers(locations: Iterable[object]) -> tuple[str, ...]:
    """The fsspec driver modules (``s3fs``, ``gcsfs``, ``adlfs``...) that ``locations`` (inputs, ``--out``) on
    object storage need: each costs a worker about 0.3 s of CPU to import (s3fs with botocore and aiohttp)."""
    schemes = {str(x).split("://", 1)[0].lower() for x in locations if "://" in str(x)} - {"file", "local"}
    if not schemes:
        return ()
    from fsspec.registry import known_implementations

    return tuple(sorted({known_implementations[s]["class"].split(".", 1)[0]
                         for s in schemes if s in known_implementations}))


REMOTE_THREADS = 2
"""Threads per local worker, when none are given, for a command whose inputs or run folder are on object storage.
A task there waits through round trips (each GET and PUT of an object, one after another where order matters:
a tile chunk before its flag); with one thread a worker's core waits with it. Measured on 2 vCPUs against s3rver
behind 20 ms a request (``benchmarks/s3_latency.py``, RESULTS section 8): 40 small slides 27.0 s with 1 thread,
16.8 s with 2, 14.2 s with 3; two 16,384 px slides 6.98 -> 5.60 s; with no delay 9.54 -> 8.95 s (3: 9.51 s). At 50 ms
more threads gain more (1: 56.3 s, 2: 32.2 s, 4: 22.2 s): ``--threads-per-worker`` for a slow endpoint."""


def for_locations(cfg: ClusterConfig, locations: Iterable[object]) -> ClusterConfig:
    """``cfg`` with :data:`REMOTE_THREADS` threads per local worker when ``locations`` (the inputs and run folder)
    include object storage and neither a thread count nor a scheduler was given; else ``cfg`` itself. Apply it
    before :func:`start_forkserver`: the workers' environment depends on their threads (:func:`worker_environ`)."""
    if cfg.scheduler or cfg.threads_per_worker or not storage_drivers(locations):
        return cfg
    from dataclasses import replace

    return replace(cfg, threads_per_worker=REMOTE_THREADS)


def start_forkserver(cfg: ClusterConfig, also: Iterable[str] = ()) -> bool:
    """Start (in the background) the process that local Dask workers are forked from; True when it is used.

    A spawned worker starts a fresh interpreter and imports Dask, numpy, zarr and the readers itself:
    about a second of CPU per worker, twice over on two cores, before the first tile. Forked from one
    server that imported them once, a worker is ready in a few milliseconds. The server is started as
    early as the command knows it will start a local cluster: forked from this process once it has imported
    the stack (:func:`_fork_server_from_here`), or where that cannot be done, started as multiprocessing does (a
    fresh interpreter whose imports overlap the client's own). It keeps the environment it was started with
    (:func:`worker_environ`): a later cluster in the
    same process whose workers would start with another environment (other cluster settings, a variable
    set since, such as ``KERAS_BACKEND``) is spawned as before. Not on platforms without ``fork``
    (Windows), or with ``CANCERNET_SPAWN_WORKERS=1`` in the environment: spawned there. ``also``: more
    modules for it to import (a run on object storage: its fsspec driver, :func:`storage_drivers`; every
    worker and its preflight child would import it); only when this call starts the server.
    """
    global _FORKSERVER_ENV
    import multiprocessing

    if (cfg.scheduler or "forkserver" not in multiprocessing.get_all_start_methods()
            or os.environ.get("CANCERNET_SPAWN_WORKERS", "") not in ("", "0")):
        return False
    env = worker_environ(cfg)
    full = {**os.environ, **env}  # what a spawned worker would start with
    if _FORKSERVER_ENV is not None:
        return _FORKSERVER_ENV == full
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    more = [m for d in also for m in (d, *_DRIVER_WARM.get(d, ())) if m not in FORKSERVER_PRELOAD]
    preload = list(FORKSERVER_PRELOAD)
    preload[-1:-1] = more  # before cancernet_batch.prefork, which stays last
    ctx.set_forkserver_preload(preload)
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        if not _fork_server_from_here(preload, env):
            forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    _FORKSERVER_ENV = full
    return True


SPAWNED_FORKSERVER_ENV = "CANCERNET_SPAWNED_FORKSERVER"
"""Set to ``1`` to start the local workers' fork server as multiprocessing does (a fresh interpreter that imports
the preload itself) instead of forking it from the command's process (:func:`_fork_server_from_here`)."""


def _fork_server_from_here(preload: list[str], env: Mapping[str, str]) -> bool:
    """Make this process, once it has imported ``preload``, multiprocessing's fork server for the local workers:
    fork it, and run the server's loop in the child. True when done; False when it cannot be done here (then the
    caller starts the server as multiprocessing does).

    The server multiprocessing starts is a fresh interpreter that imports the stack (Dask, numpy, zarr, scipy,
    the readers) while this process imports most of it too: about 0.7 CPU s twice, and the workers waited for
    the server's imports, which ran beside this process's own on two cores (``benchmarks/startup_timeline.py``).
    Imported once here, in order, the workers fork from a server that is ready as soon as this process is.

    Only while this process has one thread (a fork copies no thread, nor a lock another thread holds) and has not
    imported numpy yet (the thread counts of ``env`` are read by the native libraries as they load: they are set
    here before the imports, for this process too), on Linux, with the multiprocessing this was written against
    (Python 3.11-3.13: no authentication key between the server and its clients), and not with
    :data:`SPAWNED_FORKSERVER_ENV` set. The child starts as a fresh server would: the workers' environment, their
    malloc settings (glibc reads ``MALLOC_*`` only as a process starts, so ``mallopt`` sets them), SIGTERM and the
    package's logger as Python starts, only the descriptors the server needs (the run folder's lock, this
    process's sockets and files stay here), and the last preload module (:mod:`cancernet_batch.prefork`, which
    arms the after-fork hook of the process it is imported in) imported there, not here."""
    import gc
    import socket
    import sys
    import threading
    from multiprocessing import connection, forkserver, resource_tracker

    server = getattr(forkserver, "_forkserver", None)
    if (os.environ.get(SPAWNED_FORKSERVER_ENV, "") not in ("", "0") or not sys.platform.startswith("linux")
            or not (3, 11) <= sys.version_info[:2] <= (3, 13) or "numpy" in sys.modules
            or threading.active_count() != 1 or server is None or getattr(server, "_forkserver_pid", 0) is not None
            or not all(hasattr(server, a) for a in ("_lock", "_forkserver_address", "_forkserver_alive_fd"))):
        return False
    import_preload(preload[:-1])
    if threading.active_count() != 1:  # an import started a thread: fork nothing
        return False
    with server._lock:
        resource_tracker.ensure_running()
        listener = socket.socket(socket.AF_UNIX)
        address = connection.arbitrary_address("AF_UNIX")
        listener.bind(address)
        os.chmod(address, 0o600)
        listener.listen()
        alive_r, alive_w = os.pipe()
        # everything imported so far lives as long as the processes: out of the collector's sight (in this process and,
        # through the fork, in the server and every worker), so no collection there walks it, and none writes to its
        # objects' headers, which would copy each page a worker shares with the server (Python's gc.freeze recipe)
        gc.freeze()
        pid = os.fork()
        if pid == 0:  # the server: never returns
            _serve_forks(listener.fileno(), alive_r, preload[-1], env)
        os.close(alive_r)
        listener.close()
        server._forkserver_address = address
        server._forkserver_alive_fd = alive_w
        server._forkserver_pid = pid
    return True


def import_preload(modules: Iterable[str]) -> None:
    """Import ``modules`` in order (a missing one is skipped, as multiprocessing's server skips it: its first use
    says what is missing), with the cyclic garbage collector paused.

    The imports make about a million objects that live as long as the process, and the collector, counting them as
    they come, walked them all a few times on the way (``benchmarks/preload_imports.py``: about 250 collections, 4-7 %
    of the fork server's import time). What they leave behind is collected once the collector runs again."""
    import gc
    import importlib

    was_on = gc.isenabled()
    gc.disable()
    try:
        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError:
                pass
    finally:
        if was_on:
            gc.enable()


def _serve_forks(listener_fd: int, alive_r: int, last: str, env: Mapping[str, str]) -> None:
    """The forked fork server (:func:`_fork_server_from_here`): made like a fresh one, then multiprocessing's
    server loop until the command's process is gone; exits, never returns."""
    import importlib
    import logging
    import signal
    import traceback
    from multiprocessing import forkserver

    code = 1
    try:
        os.environ.update(env)
        _mallopt_from(env)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the command's handler unwinds the command, not this
        package = logging.getLogger("cancernet_batch")  # as Python starts: the command's handlers stay there
        package.handlers[:], package.propagate = [], True
        package.setLevel(logging.NOTSET)
        keep = sorted({0, 1, 2, listener_fd, alive_r})
        low = 0
        for fd in keep:  # (closerange(0, 0) closes everything on some Pythons: ranges that are not empty only)
            if fd > low:
                os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, os.sysconf("SC_OPEN_MAX"))  # (Linux only: see _fork_server_from_here)
        try:
            importlib.import_module(last)
        except ImportError:
            pass
        forkserver.main(listener_fd, alive_r, [], None, None)
        code = 0
    except SystemExit:  # the server's way out: every client gone
        code = 0
    except BaseException:  # noqa: BLE001 - on stderr, as multiprocessing's server would print it
        traceback.print_exc()
    finally:
        os._exit(code)


_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3}
"""glibc's ``mallopt`` parameters (``M_TRIM_THRESHOLD``, ``M_MMAP_THRESHOLD``) of the variables it reads at start."""


def _mallopt_from(env: Mapping[str, str]) -> None:
    """Set this process's malloc as glibc would have from ``env``'s ``MALLOC_*`` variables at its start."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        for name, param in _MALLOPT.items():
            if name in env:
                libc.mallopt(param, int(env[name]))
    except (OSError, AttributeError, ValueError):  # not glibc: its defaults
        pass


@contextlib.contextmanager
def dask_client(cfg: ClusterConfig, *, on_dashboard=None) -> Iterator[object]:
    """A connected ``distributed.Client``; a local cluster is started and closed around it.

    ``on_dashboard(url)`` is called with the dashboard address of a local cluster.
    """
    import dask
    from distributed import Client, LocalCluster

    if cfg.scheduler:
        sec = security(cfg) if cfg.scheduler.startswith("tls://") or any((cfg.tls_ca_file, cfg.tls_cert)) else None
        if cfg.scheduler.startswith("tls://") and not (sec.tls_client_cert and sec.tls_ca_file):
            raise ConfigError(f"{cfg.scheduler} needs TLS certificates",
                              hint="give --tls-ca-file, --tls-cert and --tls-key, or set distributed.comm.tls.* in Dask's config")
        probe_scheduler(cfg.scheduler, sec, cfg.connect_timeout)
        try:
            client = Client(cfg.scheduler, security=sec, timeout=f"{cfg.connect_timeout}s")
        except (OSError, TimeoutError, TypeError, ValueError) as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {cfg.scheduler}: {exc}",
                              hint="check the address (tcp://HOST:8786 or tls://...), that the scheduler runs, "
                                   "and the TLS certificates") from exc
        try:
            yield client
        finally:
            client.close()
        return
    workers, threads = cfg.local_shape()
    spawn_env = worker_environ(cfg)
    forkserver = start_forkserver(cfg)
    import_in_background(CLIENT_PRELOAD)
    with dask.config.set({**{f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in spawn_env.items()},
                          "distributed.worker.multiprocessing-method": "forkserver" if forkserver else "spawn",
                          # each worker starts its slide-preflight child as it starts (preflight.dask_setup)
                          "distributed.worker.preload": ["cancernet_batch.preflight"],
                          "distributed.worker.daemon": False,
                          "distributed.scheduler.allowed-failures": 5,
                          "distributed.admin.tick.limit": "60s",
                          "distributed.worker.memory.spill": False,
                          "distributed.worker.profile.enabled": worker_profiler()}):
        env = dict(os.environ)
        # Workers log a failed task at ERROR ("Compute Failed" and its traceback) on the terminal; the client
        # gets the same exception and the tool reports it as one line or a failures.csv row: only CRITICAL shows.
        try:
            cluster = LocalCluster(n_workers=0 if cfg.score_workers else workers, threads_per_worker=threads, processes=True, host=cfg.host,
                                   dashboard_address=f"{cfg.host}:0" if cfg.dashboard else None,
                                   memory_limit=cfg.memory_limit, silence_logs=logging.CRITICAL)
        finally:
            _restore_environ(env)
        try:
            if cfg.score_workers:
                try:
                    _split_workers(cluster, workers, cfg.score_workers, threads)
                finally:
                    _restore_environ(env)
            client = Client(cluster)
            if cfg.score_workers:
                client.wait_for_workers(workers, timeout=120)
            if on_dashboard is not None and cfg.dashboard:
                on_dashboard(client.dashboard_link)
            log.info("local Dask cluster: %d workers x %d threads at %s", workers, threads, cluster.scheduler_address)
            try:
                yield client
            finally:
                client.close()
        finally:
            cluster.close()
            _restore_environ(env)  # a nanny that restarted its worker during the run set them again


def worker_profiler() -> bool:
    """Whether the local workers run Dask's statistical profiler: only where the user's own Dask config (its YAML
    files or ``DASK_*`` variables, e.g. ``DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=True``) turns it on.

    Dask's default is on: every 10 ms it samples each thread's stack and reads the source lines of its frames
    (linecache). py-spy over a `cancernet run` with inputs and run folder on SeaweedFS found it among a worker's
    largest costs beside the work itself (RESULTS.md section 8), and only the dashboard's Profile page shows what it
    gathers."""
    import dask

    try:
        user = dask.config.collect()  # the user's config alone, without the packages' defaults
    except Exception:  # noqa: BLE001 - an unreadable config file: Dask itself says so when it loads it
        return False
    value = (((user.get("distributed") or {}).get("worker") or {}).get("profile") or {}).get("enabled")
    return bool(value) if value is not None else False


def _restore_environ(env: Mapping[str, str]) -> None:
    """Put back this process's environment as ``env`` after Dask's nannies started workers.

    Each nanny sets its workers' variables (malloc, thread counts, ``PYTHONHASHSEED``) and its own
    ``__DASK_PARENT_PID`` in ``os.environ`` of the process it runs in, this one, as it starts or restarts a worker.
    Kept out of this process and of the child processes it starts later (preflight, tests); and a later cluster
    of this process compares the environment with its fork server's (:func:`start_forkserver`): with them left
    in, every later cluster's workers were spawned, each importing the stack again in its first tasks."""
    if os.environ != env:
        os.environ.clear()
        os.environ.update(env)


TILE, SCORE = "tile", "score"
"""Dask worker resources: a worker that advertises only one of them does only that kind of work."""


def _split_workers(cluster, workers: int, score_workers: int, threads: int) -> None:
    """Start ``score_workers`` workers with the ``score`` resource and the rest with ``tile``."""
    base = cluster.new_spec
    for i in range(workers):
        kind = SCORE if i < score_workers else TILE
        cluster.worker_spec[f"{kind}-{i}"] = {"cls": base["cls"],
                                             "options": {**base["options"], "resources": {kind: threads}}}
    cluster.sync(cluster._correct_state)


def _worker_records(client) -> dict[str, dict]:
    """The scheduler's record of every worker (``resources``, ``nthreads``...), by address."""
    try:
        info = client.scheduler_info(n_workers=-1)  # newer distributed lists only a few workers by default
    except TypeError:
        info = client.scheduler_info()
    return dict(info.get("workers", {}))


def _workers(client) -> list[dict]:
    return list(_worker_records(client).values())


def _split(workers: list[dict]) -> bool:
    kinds = [set((w.get("resources") or {})) for w in workers]
    return any(SCORE in k for k in kinds) and any(TILE in k for k in kinds)


def work_split(client) -> bool:
    """True when the cluster's workers are split into scoring and tiling workers (by resources)."""
    return _split(_workers(client))


def _tiling(records: dict[str, dict]) -> dict[str, dict]:
    """The records of the workers that can run tiling tasks: those with the ``tile`` resource when the work is
    split, else all."""
    split = _split(list(records.values()))
    return {a: w for a, w in records.items() if not split or TILE in (w.get("resources") or {})}


def tiling_workers(client) -> list[str]:
    """The addresses of the workers that can run tiling tasks, in a stable order."""
    return sorted(_tiling(_worker_records(client)))


def tiling_threads(client) -> int:
    """Worker threads that can run tiling tasks: those of the tiling workers when the work is split, else all."""
    return max(1, sum(int(w.get("nthreads") or 1) for w in _tiling(_worker_records(client)).values()))


def as_completed_windowed(items: Iterable, submit: Callable[[object], object], window: int) -> Iterator[tuple]:
    """``(item, future)`` as futures finish, with at most ``window`` submitted and unfinished.

    ``submit(item)`` returns a ``distributed`` future. Items are drawn lazily, so a generator that
    skips items (e.g. of an input that already failed) sees the consumer's latest state. Each future
    is released once the consumer has handled it, which keeps scheduler and client memory bounded
    however many items there are.
    """
    from distributed import as_completed

    pending = iter(items)
    ac = as_completed()
    item_of: dict = {}

    def submit_next() -> None:
        for item in pending:
            fut = submit(item)
            item_of[fut.key] = item
            ac.add(fut)
            return

    for _ in range(max(1, window)):
        submit_next()
    for fut in ac:
        try:
            yield item_of.pop(fut.key), fut
        finally:
            fut.release()
        submit_next()
