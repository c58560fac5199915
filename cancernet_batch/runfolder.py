"""One run folder, owned by one object: :class:`Run`.

Every stage takes its locations and bookkeeping from a ``Run``; no other module spells a run-folder
path. A run folder holds::

    RUN/tiles.zarr/       the tile store (:mod:`cancernet_batch.store`): tiles, coords, probs, done flags
    RUN/failures.csv      one row per (input, stage) that failed; one merge rule (:meth:`Run.record_failures`)
    RUN/predict.json      the model, threshold and engine settings the scores were made with
    RUN/progress.json     what a running (or stopped) ``run`` has done so far, for ``cancernet status``
    RUN/report/           inputs.csv, patients.csv, failures.csv, index.html, viewer.js, and per reported
                          input the files of :class:`InputFiles` in maps/, geojson/ and pyramids/
    RUN/.lock             held (an OS file lock) by the one process writing to the run
    RUN/.tmp-claim-*      for the life of a run: which task makes a report part that two may make
                          (:meth:`Run.claim`)

Storage goes through a small filesystem seam: :class:`LocalFS` (local or shared disk, atomic by
writing a temporary name and renaming it) or :class:`FsspecFS` (object storage through fsspec:
``s3://``, ``gs://``, ``az://``...; an object PUT is atomic, so the final name is written directly,
the tile store is zarr's ``FsspecStore`` and the lock is a conditional PUT). Both have the same
methods (``write_bytes``, ``read_bytes``, ``exists``, ``isdir``, ``staged``, ``remove_unkept``,
``makedirs``, ``remove_stale_temps``, ``create_new``, ``remove_prefixed``, ``lock``, ``is_locked``, ``store_location``);
:meth:`Run.of` chooses by the location's URL scheme (``file://`` and plain paths are local).
A remote run's paths are :class:`ObjectPath` values: they join like paths and print as URLs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import ClassVar

from .errors import StorageError
from .failures import Failure, failures_from_csv, failures_to_csv

log = logging.getLogger(__name__)


class NoConditionalWrites(StorageError):
    """The storage cannot create an object only if it is absent (an old fsspec driver, a server without
    conditional PUTs)."""


CLAIM_PREFIX = ".tmp-claim-"
"""The names of a run's claims (:meth:`Run.claim`) in the run folder."""

STAGES = ("discover", "preflight", "plan", "tile", "predict", "report")
"""The stages an input goes through, in order; a failures row names one of them."""

FAILURES_CSV = "failures.csv"
"""The failures list's name, in the run folder and in its report."""
INPUTS_CSV = "inputs.csv"
PATIENTS_CSV = "patients.csv"
INDEX_HTML = "index.html"
"""The report's tables and page (``RUN/report/``): the report stage writes them, ``index.html`` links them."""
VIEWER_JS = "viewer.js"
"""The report's map viewer (``RUN/report/``, from the package's asset of the same name): ``index.html`` loads it."""


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """A file name made of ``[A-Za-z0-9._-]`` only, never hidden or ``..``; distinct texts stay distinct."""
    name = _SAFE.sub("_", text).strip("._-")[:80]
    if name != text or not name:
        name = f"{name or 'input'}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return name


def _input_file(folder: str, suffix: str, doc: str) -> property:
    """A property of :class:`InputFiles`: the file ``folder/<name><suffix>``."""
    return property(lambda self: f"{folder}/{self.name}{suffix}", doc=doc)


@dataclass(frozen=True)
class InputFiles:
    """One reported input's files in ``RUN/report/``, as paths relative to it (as ``inputs.csv``'s rows and
    ``index.html`` link them).

    ``name``: the input's file name (:meth:`of` makes it from the input's id);
    ``gzip``: the tiles' GeoJSON is gzipped (``--geojson-gzip``).
    """

    name: str
    gzip: bool = False

    MAPS: ClassVar[str] = "maps"
    GEOJSON: ClassVar[str] = "geojson"
    PYRAMIDS: ClassVar[str] = "pyramids"
    CLEANED: ClassVar[tuple[tuple[str, str], ...]] = (
        (MAPS, ".png"), (MAPS, ".thumb.jpg"), (MAPS, ".view.js"), (GEOJSON, ".geojson"), (GEOJSON, ".geojson.gz"),
        (PYRAMIDS, ".ome.zarr"), (PYRAMIDS, ".ome.tif"))
    """``(folder, suffix)`` of the files that :meth:`Run.remove_unreported` removes when no longer reported
    (``*.geojson`` takes in ``*.regions.geojson``)."""

    def __post_init__(self):
        if not self.name or self.name.startswith(".") or "/" in self.name or "\\" in self.name:
            raise ValueError(f"not a plain file name: {self.name!r}")

    @classmethod
    def of(cls, gid: str, *, gzip: bool = False) -> "InputFiles":
        """The files of the input with id ``gid``, named from the id made safe (:func:`safe_name`)."""
        return cls(safe_name(gid), gzip=gzip)

    heatmap = _input_file(MAPS, ".png", "The heatmap (PNG) of the IDC map over a thumbnail of the tissue.")
    thumb = _input_file(MAPS, ".thumb.jpg", "The thumbnail the zoomable map is drawn over (JPEG).")
    view = _input_file(MAPS, ".view.js", "The zoomable map's data (``cancernetView({...})``), for :data:`VIEWER_JS`.")
    regions = _input_file(GEOJSON, ".regions.geojson", "The IDC regions (merged tiles) for QuPath, as annotations.")
    ome_zarr = _input_file(PYRAMIDS, ".ome.zarr", "The probability map as an NGFF image (IDC mask as label image).")
    ome_tiff = _input_file(PYRAMIDS, ".ome.tif", "The same as a pyramidal OME-TIFF (probability, mask channels).")

    @property
    def geojson(self) -> str:
        """The IDC tiles for QuPath, as detections (gzipped with ``gzip``)."""
        return f"{self.GEOJSON}/{self.name}.geojson" + (".gz" if self.gzip else "")


# --------------------------------------------------------------------------------------------
# the filesystem seam
# --------------------------------------------------------------------------------------------

class LocalFS:
    """Local (or shared, NFS/Lustre) disk: writes are atomic by temporary name + rename."""

    kind = "local"

    def write_bytes(self, path: Path, data: bytes) -> Path:
        from .atomic import write_bytes

        return write_bytes(path, data)

    def read_bytes(self, path: Path) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read: {exc.strerror or exc}", path=path,
                               hint="check that the run folder is readable") from exc

    def exists(self, path: Path) -> bool:
        return Path(path).exists()

    def all_exist(self, paths) -> bool:
        """Whether every one of ``paths`` is there."""
        return all(Path(p).exists() for p in paths)

    def isdir(self, path: Path) -> bool:
        return Path(path).is_dir()

    @contextlib.contextmanager
    def staged(self, folder: Path) -> Iterator[Path]:
        """A local folder for outputs that local file code writes (PNG, GeoJSON, OME-Zarr...): here the
        run's own ``folder`` (those writers are atomic on disk)."""
        yield Path(folder)

    def remove_unkept(self, folder: Path, suffixes: tuple[str, ...], keep: set[str]) -> None:
        """Remove the entries of ``folder`` named ``*SUFFIX`` (any of ``suffixes``) but not in ``keep`` (files, or
        folders: an OME-Zarr)."""
        folder = Path(folder)
        if folder.is_dir():
            import shutil

            for p in folder.iterdir():
                if not p.name.endswith(suffixes) or p.name in keep or p.name.startswith(".tmp-"):
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.is_file():
                    p.unlink()

    def makedirs(self, path: Path) -> None:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the run folder: {exc.strerror or exc}", path=path,
                               hint="check that the location is writable") from exc

    def remove_stale_temps(self, *folders: Path) -> int:
        from .atomic import remove_stale_temps

        return remove_stale_temps(*folders)

    def create_new(self, path: Path) -> bool:
        """Create the empty file ``path`` only if nothing has that name (``O_EXCL``): True for the one call that
        made it, False for every other."""
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot write here: {exc.strerror or exc}", path=Path(path).parent,
                               hint="check that the run folder is writable and has free space") from exc
        return True

    def remove_prefixed(self, folder: Path, prefix: str) -> int:
        """Remove the files directly in ``folder`` whose names start with ``prefix``; how many went."""
        gone = 0
        for p in Path(folder).glob(f"{prefix}*"):
            if p.is_file():
                p.unlink(missing_ok=True)
                gone += 1
        return gone

    def store_location(self, path: Path) -> str:
        """What ``zarr.open_group`` takes for the tile store at ``path``."""
        return str(path)

    def cache_key(self, path: Path) -> tuple:
        """What names the store at ``path`` among those this process opened."""
        return ("file", str(path))

    @contextlib.contextmanager
    def lock(self, path: Path, holder: dict) -> Iterator[None]:
        """Hold an exclusive OS lock on ``path`` (released by the kernel if the process dies)."""
        import fcntl

        self.makedirs(Path(path).parent)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise StorageError(f"cannot lock the run folder: {exc.strerror or exc}", path=Path(path).parent,
                               hint="check that the run folder is writable") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise StorageError(f"cannot lock the run folder: {exc.strerror or exc}", path=Path(path).parent,
                                       hint="use a run folder on a file system with locks") from exc
                other = _holder_text(_read_holder(fd))
                raise StorageError(f"this run folder is in use by {other}", path=Path(path).parent,
                                   hint="wait for that command to finish (or stop it), or use another --out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def is_locked(self, path: Path) -> dict | None:
        """The holder's record when another process holds the lock on ``path``, else None."""
        import fcntl

        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return _read_holder(fd) or {"pid": "?"}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _holder_text(h: dict) -> str:
    if not h:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(h["started"])) if h.get("started") else "?"
    return f"`cancernet {h.get('command', '?')}` (pid {h.get('pid', '?')} on {h.get('host', '?')}, since {since})"


# --------------------------------------------------------------------------------------------
# object storage (fsspec)
# --------------------------------------------------------------------------------------------

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

LOCK_HEARTBEAT_S = 60.0
"""How often the holder of a lock on object storage rewrites it (its ``heartbeat`` time)."""
LOCK_STALE_S = 600.0
"""A lock on object storage whose heartbeat is older than this is stale: its holder is gone."""
UNLOCKED_ENV = "CANCERNET_UNLOCKED_OUT"
"""Set to ``1`` to write a run folder on a storage server that ignores conditional PUTs (If-None-Match),
which cannot hold the lock: the user then makes sure that one command at a time writes it."""


def _precondition_failed(exc: BaseException) -> bool:
    """True when ``exc`` (or an error it was raised from) is the server's 412 "PreconditionFailed": to a PUT whose one
    condition is ``If-None-Match: *``, the answer that an object of that name exists. s3fs turns that answer into
    ``FileExistsError`` only when the error names its condition (``<Condition>If-None-Match</Condition>``, as AWS
    S3 and moto write it); SeaweedFS leaves it out, and s3fs then raises ``OSError(EINVAL)`` with the 412 as
    its cause."""
    seen = 0
    while exc is not None and seen < 8:
        response = getattr(exc, "response", None)
        if isinstance(response, Mapping):
            code = str((response.get("Error") or {}).get("Code", ""))
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _driver_copy(options: Mapping) -> dict:
    """A deep copy of storage options for a driver to keep: botocore rewrites ``config_kwargs['retries']`` in
    place (``{"max_attempts": 3}`` becomes ``{"mode": "legacy", "total_max_attempts": 4}``), which changed the
    options' digest (:func:`options_digest`), and so the cache keys of this process's stores, after a run
    folder's first request."""
    import copy

    return copy.deepcopy(dict(options))


def options_digest(options: Mapping) -> str:
    """A digest of storage options (endpoint, credentials, ...): what tells apart two filesystems or stores
    of one protocol in a process's caches, without keeping the secrets themselves in a key."""
    import hashlib

    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()


AZURE_PROTOCOLS = ("az", "abfs", "abfss")
"""adlfs's schemes for Azure Blob Storage (``az://container/prefix``)."""


def bucket_word(protocol: str | None) -> str:
    """What the store calls the top of a URL: a container on Azure, a bucket elsewhere."""
    return "container" if protocol in AZURE_PROTOCOLS else "bucket"


def credentials_hint(protocol: str | None) -> str:
    """Where the credentials of ``protocol``'s driver come from, for an error's hint."""
    if protocol in AZURE_PROTOCOLS:
        return ("check the credentials: AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_ACCOUNT_NAME with "
                "AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, or --storage-options")
    if protocol in ("gs", "gcs"):
        return ("check the credentials: GOOGLE_APPLICATION_CREDENTIALS, gcloud's default login, or --storage-options "
                "token")
    return "check the credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or --storage-options"


def _delete_example(protocol: str, path) -> str:
    if protocol in AZURE_PROTOCOLS:
        container, _, name = str(path).split("://", 1)[-1].partition("/")
        return f"e.g. `az storage blob delete -c {container} -n {name}`"
    if protocol in ("gs", "gcs"):
        return f"e.g. `gcloud storage rm {path}`"
    return f"e.g. `aws s3 rm {path}`"


_SECRETS = re.compile(r"(?i)\b(sig|AccountKey|SharedAccessSignature|X-Amz-Signature|X-Amz-Credential|token|"
                      r"access_token)=[^&;\s'\"]+")


def scrub(text: str) -> str:
    """``text`` with the values of secret-bearing parameters (a SAS or presigned URL's signature, a connection
    string's account key) replaced by ``***``: a server or driver that echoes a request's URL in its error must not
    put a secret on the terminal or in the failures CSV."""
    return _SECRETS.sub(lambda m: f"{m.group(1)}=***", text)


def url_scheme(location: str | os.PathLike) -> str | None:
    """The scheme of a URL (``s3``, ``gs``, ``file``...), lower case; None for a plain path."""
    m = _SCHEME.match(os.fspath(location)) if isinstance(location, (str, os.PathLike)) else None
    return m.group(1).lower() if m else None


class ObjectPath(PurePosixPath):
    """A location on object storage that joins like a path and prints as its URL.

    ``ObjectPath("s3://bucket/run") / "report" / "index.html"`` prints as
    ``s3://bucket/run/report/index.html``; ``.name``, ``.suffix`` and ``.parent`` work as for paths.
    It names an object for :class:`FsspecFS`; no local file function may be given one.
    """

    def __str__(self) -> str:
        text = super().__str__()
        m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):/(?!/)", text)
        return f"{m.group(1)}://{text[m.end():]}" if m else text

    def __fspath__(self) -> str:
        return str(self)


_CHECKED: set[tuple[str, str, str]] = set()
"""Buckets found usable in this process, per (protocol, bucket, options digest): Dask tasks unpickle a
new :class:`FsspecFS` each and need not ask again."""


def _storage_defaults(protocol: str) -> dict:
    """S3: bounded network waits, so an unreachable endpoint is an error within seconds, never a hang; no
    listings cache (another process writes the same prefix); whole-object reads in one GET (without
    ``max_concurrency=1`` s3fs sends a HEAD for the size before every read: twice the requests for
    the store's small metadata objects). Every other object store: no listings cache either (gcsfs and adlfs
    keep one by default: a command that listed a prefix, the inputs of a new tile store, saw it empty for the rest
    of its life, and tiled every input again on a re-run in the same process)."""
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": 3}},
                "use_listings_cache": False, "max_concurrency": 1}
    return {} if protocol in (None, "file", "local") else {"use_listings_cache": False}


_S3_SESSIONS: dict = {}
_S3_SESSION_LOCK = threading.Lock()


def _process_session(protocol: str, options: Mapping) -> dict:
    """What this process adds to ``options`` when it makes a filesystem (never part of the options that travel
    to the workers): for S3, one aiobotocore session shared by all its ``S3FileSystem`` objects.

    s3fs makes a session per filesystem object, and each object's first request builds a botocore client from
    it: the service model, endpoint rules and partitions read from botocore's JSON files anew each time (the
    loader's cache lives in the session). A process has several such objects (one per thread that opens the
    tile store, the side files' and the inputs' own), and a run several processes: in a `cancernet run` on
    S3 these reads were a large share of the CPU beside the requests. With one session per process they are
    read once; the workers' forkserver reads them before it forks (:func:`warm_s3_session`), so local workers
    and their preflight children start with them.

    Only with fixed credentials (``key`` and ``secret`` in the options, ``anon``, or both in the environment
    without an expiry): a session shares the credentials it finds, and refreshable ones (a role from the
    instance, SSO, a profile) hold state of the event loop that refreshed them, while a process runs several
    loops (zarr's, fsspec's). Those, and options that name their own ``session`` or ``profile``, keep s3fs's
    session per filesystem object, as before."""
    if protocol not in ("s3", "s3a"):
        return {}
    share_ssl_contexts()
    if "session" in options or "profile" in options:
        return {}
    env = os.environ
    fixed = (bool(options.get("anon")) or (options.get("key") and options.get("secret"))
             or (env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")
                 and not env.get("AWS_CREDENTIAL_EXPIRATION")))
    return {"session": s3_session()} if fixed else {}


def share_ssl_contexts() -> None:
    """Make this process's S3 clients share their SSL contexts: built once per set of TLS settings (CA bundle, client
    certificate, proxy), not once per client.

    aiobotocore builds a new context for every client's connection pool, loading the CA bundle from its file each
    time (16 CPU ms here), for an ``http://`` endpoint too, where it is never used; and s3fs makes a client per
    filesystem object, of which a worker of a run on S3 has many (zarr's store per thread and event loop, the side
    files', each input's). py-spy over a `cancernet run` with inputs and run folder on SeaweedFS found 0.47 CPU s of
    such builds, about a tenth of the run's CPU (RESULTS.md section 8). A context is safe to share between
    connections, threads and event loops once it is set up, and nothing changes it after the build. Done once per
    process (the method, once wrapped, says so); without aiobotocore's ``AIOHTTPSession._build_ssl_contexts`` (another
    version), nothing is changed."""
    try:
        from aiobotocore.httpsession import AIOHTTPSession
    except ImportError:
        return
    with _S3_SESSION_LOCK:
        build = getattr(AIOHTTPSession, "_build_ssl_contexts", None)
        if build is None or getattr(build, "shared_by_cancernet", False):
            return
        built: dict = {}
        lock = threading.Lock()

        def shared(self, proxy_url):
            try:
                key = (repr(self._verify), self._cert_file, self._key_file, proxy_url,
                       repr(sorted((self._proxy_config.settings or {}).items())))
            except Exception:  # noqa: BLE001 - attributes of another version: build as aiobotocore does
                return build(self, proxy_url)
            with lock:  # built once a key: a second caller waits for the first's build
                if key not in built:
                    built[key] = build(self, proxy_url)
                return built[key]

        shared.shared_by_cancernet = True
        AIOHTTPSession._build_ssl_contexts = shared


def s3_session():
    """This process's shared aiobotocore session (see :func:`_process_session`): one per set of ``AWS_*``
    environment variables, since a session keeps the credentials it found (a process that changes them, as
    the tests do, gets a new one)."""
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    with _S3_SESSION_LOCK:
        session = _S3_SESSIONS.get(env)
        if session is None:
            from aiobotocore.session import AioSession

            session = _S3_SESSIONS[env] = AioSession()
        return session


def warm_s3_session() -> None:
    """Read botocore's data for an S3 client into the shared session now (a client made with placeholder
    credentials and closed at once: nothing is sent, no credentials are looked up)."""
    import asyncio

    async def make() -> None:
        async with s3_session().create_client("s3", region_name="us-east-1", aws_access_key_id="warm",
                                              aws_secret_access_key="warm"):
            pass

    asyncio.run(make())
    # and the default SSL context built once, before the workers fork (each client's first request built its own)
    from aiobotocore.httpsession import AIOHTTPSession

    share_ssl_contexts()
    AIOHTTPSession(verify=True)._build_ssl_contexts(None)


def _merged(defaults: dict, given: Mapping) -> dict:
    out = dict(defaults)
    for k, v in given.items():
        out[k] = _merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


STAGED_IN_MEMORY = 64 * 1024 * 1024
"""Bytes of staged report files held in memory at once for their PUTs (files over an eighth of it are streamed)."""


class FsspecFS:
    """Object storage through fsspec (``s3://``, ``gs://``, ``az://``, ...).

    An object PUT is atomic: every file is written under its final name, never a temporary one,
    so there is nothing to clean after a kill. The tile store is zarr's ``FsspecStore``. The
    run-folder lock is an object created by a conditional PUT (``If-None-Match: *``) and rewritten
    by its holder every :data:`LOCK_HEARTBEAT_S` seconds. ``storage_options`` (credentials,
    endpoint) stay in memory: never in a message, a log record or a file of the run
    (``repr`` shows the protocol only).
    """

    kind = "fsspec"

    def __init__(self, protocol: str, storage_options: Mapping | None = None):
        self.protocol = protocol
        self.storage_options = _merged(_storage_defaults(protocol), storage_options or {})
        self._fs = None

    def __repr__(self) -> str:
        return f"FsspecFS({self.protocol!r})"  # never the options: they may hold secrets

    def __getstate__(self) -> dict:
        return {"protocol": self.protocol, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["protocol"])
        self.storage_options = state["storage_options"]

    @property
    def fs(self):
        if self._fs is None:
            import fsspec

            try:
                self._fs = fsspec.filesystem(self.protocol, **_driver_copy(self.storage_options),
                                             **_process_session(self.protocol, self.storage_options))
            except ImportError as exc:
                raise StorageError(f"no fsspec driver for {self.protocol}:// ({exc})", path=f"{self.protocol}://",
                                   hint=f"install the package for {self.protocol}:// (s3fs, gcsfs or adlfs)") from None
            except (TypeError, ValueError) as exc:
                raise StorageError(f"bad storage options for {self.protocol}:// ({type(exc).__name__})",
                                   path=f"{self.protocol}://",
                                   hint="check --storage-options against the fsspec driver's arguments") from None
        return self._fs

    # errors ------------------------------------------------------------------------------------
    def _endpoint(self) -> str:
        o = self.storage_options
        if self.protocol in AZURE_PROTOCOLS:
            from . import remote

            cs = remote._connection_string(o.get("connection_string")
                                           or os.environ.get("AZURE_STORAGE_CONNECTION_STRING") or "")
            account = o.get("account_name") or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
            return (cs.get("BlobEndpoint") or str(o.get("account_host") or "")
                    or (f"https://{account}.blob.core.windows.net" if account else "the default endpoint"))
        ck = o.get("client_kwargs") or {}
        return str(o.get("endpoint_url") or ck.get("endpoint_url")
                   or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint")

    def _error(self, exc: BaseException, path, doing: str) -> StorageError:
        """One clear error for a failed storage call (never the options: they may hold secrets, and the
        server's text is scrubbed of any it echoes: a SAS signature, an account key)."""
        name = type(exc).__name__
        text = scrub(" ".join(str(exc).split()))[:200]
        status = getattr(exc, "status_code", None)
        if (isinstance(exc, PermissionError) or status in (401, 403) or "AccessDenied" in text or "Forbidden" in text
                or "failed to authenticate" in text or "AuthorizationFailure" in text):
            return StorageError(f"access denied while {doing} ({text})", path=path,
                                hint=credentials_hint(self.protocol))
        if isinstance(exc, FileNotFoundError):
            word = bucket_word(self.protocol)
            return StorageError(f"not found while {doing} ({text})", path=path,
                                hint=f"check the {word} name in the URL, or create the {word}")
        if "connect" in name.lower() or "connect" in text.lower() or isinstance(exc, (TimeoutError, ConnectionError)):
            where = ("AZURE_STORAGE_CONNECTION_STRING's BlobEndpoint or --storage-options connection_string / "
                     "account_host" if self.protocol in AZURE_PROTOCOLS
                     else "AWS_ENDPOINT_URL or --storage-options endpoint_url")
            return StorageError(f"cannot reach the storage endpoint {self._endpoint()} ({name})", path=path,
                                hint=f"check {where}, and the network")
        return StorageError(f"storage error while {doing}: {name}: {text}", path=path,
                            hint="check the URL, the credentials and the endpoint")

    def _call(self, path, doing: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - s3fs/botocore/aiohttp raise many kinds; each becomes one line
            raise self._error(exc, path, doing) from None

    def check(self, path) -> None:
        """A clear error now when the bucket is missing, the credentials are refused or the endpoint is down."""
        import hashlib

        from . import remote

        bucket = remote._bucket_key(str(path))[0]
        digest = hashlib.sha256(json.dumps(self.storage_options, sort_keys=True, default=str).encode()).hexdigest()
        key = (self.protocol, bucket, digest)
        if key in _CHECKED:
            return
        try:
            self.fs.info(f"{self.protocol}://{bucket}")
        except FileNotFoundError:
            word = bucket_word(self.protocol)
            raise StorageError(f"the {word} {bucket!r} does not exist", path=path,
                               hint=f"create the {word}, or fix the {word} name in the URL") from None
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, path, f"opening the {bucket_word(self.protocol)}") from None
        _CHECKED.add(key)

    # the seam ----------------------------------------------------------------------------------
    def write_bytes(self, path, data: bytes):
        from . import remote

        self.check(path)
        data = bytes(data)
        remote.put_objects(self.fs, [(str(path), data)],
                           lambda: self._call(path, "writing", self.fs.pipe_file, str(path), data))
        return path

    def read_bytes(self, path) -> bytes | None:
        from . import remote

        self.check(path)

        def by_s3fs() -> bytes | None:
            try:
                return self.fs.cat_file(str(path))
            except FileNotFoundError:
                return None
            except Exception as exc:  # noqa: BLE001
                raise self._error(exc, path, "reading") from None

        return remote.get_object(self.fs, str(path), by_s3fs)

    def exists(self, path) -> bool:
        self.check(path)
        return bool(self._call(path, "looking up", self.fs.exists, str(path)))

    def isdir(self, path) -> bool:
        self.check(path)
        return bool(self._call(path, "looking up", self.fs.isdir, str(path)))

    def all_exist(self, paths) -> bool:
        """Whether every one of ``paths`` is there: their look-ups all at once (one round of HEADs), not one after
        another."""
        paths = [str(p) for p in paths]
        if not paths:
            return True
        self.check(paths[0])
        if not getattr(self.fs, "async_impl", False):
            return all(self._call(p, "looking up", self.fs.exists, p) for p in paths)
        import asyncio

        from fsspec.asyn import sync

        async def every() -> list:
            return await asyncio.gather(*(self.fs._exists(p) for p in paths))

        return all(self._call(paths[0], "looking up", sync, self.fs.loop, every))

    @contextlib.contextmanager
    def staged(self, folder) -> Iterator[Path]:
        """A local temporary folder for outputs that local file code writes; when the block ends without
        an error, each of its files is PUT under ``folder`` (same relative name), then it is removed."""
        import tempfile

        self.check(folder)
        with tempfile.TemporaryDirectory(prefix="cancernet-stage-") as tmp:
            local = Path(tmp)
            yield local
            from . import remote

            files = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))
            names = {p: f"{folder}/{p.relative_to(local).as_posix()}" for p in files}

            def put(some: list[Path]) -> None:
                if some:
                    self._call(folder, "writing", self.fs.put, [str(p) for p in some], [names[p] for p in some])

            # small files (most of a report) in memory through the native client; large ones (a big slide's
            # OME-TIFF or GeoJSON) streamed from disk by s3fs, so memory holds at most STAGED_IN_MEMORY bytes of them
            def send(batch: list[Path]) -> None:
                remote.put_objects(self.fs, [(names[q], q.read_bytes()) for q in batch], lambda: put(batch))

            sizes = {p: p.stat().st_size for p in files}
            batch, held = [], 0
            for p in (p for p in files if sizes[p] <= STAGED_IN_MEMORY // 8):
                if batch and held + sizes[p] > STAGED_IN_MEMORY:
                    send(batch)
                    batch, held = [], 0
                batch.append(p)
                held += sizes[p]
            if batch:
                send(batch)
            put([p for p in files if sizes[p] > STAGED_IN_MEMORY // 8])

    def _entries(self, folder, *, fresh: bool = False) -> list[tuple[str, bool]]:
        """``(first name part, is a prefix)`` of each entry under ``folder`` (one listing; none when there is nothing
        there). ``fresh``: not from the driver's listing cache (objects other processes wrote)."""
        from .remote import list_objects

        self.check(folder)
        try:
            if fresh:
                self.fs.invalidate_cache(str(folder))
            entries = list_objects(self.fs, str(folder), lambda: self.fs.ls(str(folder), detail=True), recursive=False)
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, folder, "listing") from None
        return [(str(e["name"]).rstrip("/").rsplit("/", 1)[-1], e.get("type") == "directory") for e in entries]

    def remove_unkept(self, folder, suffixes: tuple[str, ...], keep: set[str]) -> None:
        """Remove the objects under ``folder`` whose first name part ends in one of ``suffixes`` and is not in
        ``keep``: one listing of the folder, its objects removed together (S3: one bulk delete), each prefix (an
        OME-Zarr) with what lies under it."""
        objects, prefixes = [], []
        for name, is_prefix in self._entries(folder):
            if name.endswith(suffixes) and name not in keep:
                (prefixes if is_prefix else objects).append(f"{folder}/{name}")
        if objects:
            self._call(folder, "removing", self.fs.rm, objects)
        for p in prefixes:
            self._call(folder, "removing", self.fs.rm, p, recursive=True)

    def find(self, folder) -> set[str]:
        """Every object under ``folder``, at any depth, as a path relative to it: one listing (a request per 1,000
        objects); nothing when there is none."""
        from .remote import list_objects

        self.check(folder)
        base = self.fs._strip_protocol(str(folder)).rstrip("/") + "/"
        try:
            found = [e["name"] for e in list_objects(self.fs, base, lambda: [{"name": n} for n in self.fs.find(base)],
                                                     recursive=True)]
        except FileNotFoundError:
            return set()
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, folder, "listing") from None
        return {p[len(base):] for p in found if p.startswith(base)}

    def makedirs(self, path) -> None:
        self.check(path)  # object stores have no folders: a prefix exists once an object lies under it

    def remove_stale_temps(self, *folders) -> int:
        return 0  # nothing is written under a temporary name

    def cache_key(self, path) -> tuple:
        """What names the store at ``path`` among those this process opened (endpoint and credentials
        included: the same URL on another server is another store)."""
        return (self.protocol, str(path), options_digest(self.storage_options))

    def store_location(self, path):
        """zarr's ``FsspecStore`` for the tile store at ``path`` (its own asynchronous client; its whole-object GETs
        and PUTs through obstore where :func:`cancernet_batch.remote._native` allows: :mod:`.native_store`)."""
        from .native_store import NativeFsspecStore

        self.check(path)
        return self._call(path, "opening the tile store", NativeFsspecStore.from_url, str(path),
                          storage_options={**_driver_copy(self.storage_options),
                                           **_process_session(self.protocol, self.storage_options)})

    # the lock ----------------------------------------------------------------------------------
    def _read_lock(self, path) -> dict | None:
        data = self.read_bytes(path)
        if data is None:
            return None
        try:
            out = json.loads(data.decode("utf-8") or "{}")
            return out if isinstance(out, dict) else {}
        except ValueError:
            return {}

    @staticmethod
    def _stale(holder: dict) -> bool:
        beat = holder.get("heartbeat") or holder.get("started") or 0
        return time.time() - float(beat) > LOCK_STALE_S

    def _create(self, path, data: bytes, doing: str = "locking the run folder") -> bool:
        """Create ``path`` only if no object has that name (a conditional PUT); False when one has.
        :class:`NoConditionalWrites` when the driver or the server cannot make the PUT conditional."""
        try:
            self.fs.pipe_file(str(path), data, mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError, ValueError) as exc:
            raise NoConditionalWrites(f"this storage cannot create an object only if it is absent "
                                      f"({type(exc).__name__})", path=path,
                                      hint="update the fsspec driver (s3fs >= 2025.5), or use a local --out") from None
        except Exception as exc:  # noqa: BLE001
            if _precondition_failed(exc):
                return False
            if "NotImplemented" in str(exc) or "not implemented" in str(exc).lower():
                raise NoConditionalWrites("the storage server does not support conditional writes (If-None-Match), "
                                          "so the run folder cannot be locked", path=path,
                                          hint="use a server with conditional PUTs (AWS S3, MinIO, ...) or a local "
                                               "--out") from None
            raise self._error(exc, path, doing) from None
        return True

    def create_new(self, path) -> bool:
        """Create the empty object ``path`` only if none has that name (a conditional PUT): True for the one call
        that made it, False for every other. Where writes cannot be conditional (an old driver, a server without
        them) every call gets True; a server that ignores the condition (s3rver) gives True to every call too."""
        self.check(path)
        try:
            return self._create(path, b"", "writing")
        except NoConditionalWrites:
            return True

    def remove_prefixed(self, folder, prefix: str) -> int:
        """Remove the objects directly under ``folder`` whose names start with ``prefix`` (one listing, not from
        the driver's cache: other processes wrote them), in one batch (on S3 a ``DeleteObjects`` request per 1,000
        names, not a request each: a run's claims are one per input); how many went."""
        gone = [f"{folder}/{n}" for n, _ in self._entries(folder, fresh=True) if n.startswith(prefix)]
        if not gone:
            return 0
        try:
            try:
                self.fs.rm(gone)
            except FileNotFoundError:  # a driver that checks each name, and one went meanwhile: the others one by one
                for path in gone:
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(path)
        except Exception as exc:  # noqa: BLE001
            raise self._error(exc, folder, "removing") from None
        return len(gone)

    @contextlib.contextmanager
    def lock(self, path, holder: dict) -> Iterator[None]:
        """Hold ``RUN/.lock``, created by a conditional PUT; released (deleted) on exit.

        The holder rewrites it every :data:`LOCK_HEARTBEAT_S` seconds; a lock whose heartbeat is
        older than :data:`LOCK_STALE_S` is stale (its holder was killed). A stale lock is never taken
        over silently: the error says who held it and how to remove it.
        """
        import threading
        import uuid

        self.check(path)
        token = uuid.uuid4().hex
        record = {**holder, "token": token, "heartbeat": time.time()}
        if not self._create(path, json.dumps(record).encode()):
            other = self._read_lock(path) or {}
            run = ObjectPath(str(path)).parent
            how = _delete_example(self.protocol, path)
            if other and self._stale(other):
                age = (time.time() - float(other.get("heartbeat") or other.get("started") or 0)) / 60
                raise StorageError(f"this run folder is locked by {_holder_text(other)}, whose lock has not been "
                                   f"renewed for {age:.0f} min (it was stopped or killed)", path=run,
                                   hint=f"if that command is gone, delete {path} ({how}) and re-run") from None
            raise StorageError(f"this run folder is in use by {_holder_text(other)}", path=run,
                               hint="wait for that command to finish (or stop it), or use another --out; "
                                    f"if it was killed, delete {path} once it is gone ({how})") from None
        # No read-back of what was created: on a server that honours the condition the PUT alone says the lock is
        # ours; on one that ignores it, a read-back proves nothing (a second writer may PUT just after it), and the
        # probe below finds that server out either way.
        if self._create(path, json.dumps({**record, "token": token + "-probe"}).encode()):
            # the same conditional PUT again succeeded over our own lock: the server ignores If-None-Match
            # (s3rver 3.7 does), so a second writer would take the folder unnoticed
            if os.environ.get(UNLOCKED_ENV) == "1":
                self.fs.pipe_file(str(path), json.dumps(record).encode())
                log.warning("%s: the storage server ignores conditional writes; %s=1: the run folder is not "
                            "locked, make sure no other command writes it", path, UNLOCKED_ENV)
            else:
                try:
                    self.fs.rm_file(str(path))
                except Exception:  # noqa: BLE001 - the error below says what matters
                    pass
                raise StorageError("the storage server ignores conditional writes (If-None-Match), so the run "
                                   "folder cannot be locked", path=ObjectPath(str(path)).parent,
                                   hint=f"use a server that honours conditional PUTs (AWS S3, MinIO, ...) or a local "
                                        f"--out; or set {UNLOCKED_ENV}=1 if you make sure only one command writes it")
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(LOCK_HEARTBEAT_S):
                try:
                    current = self._read_lock(path) or {}
                    if current.get("token") != token:
                        return  # removed (or taken) by hand: do not write it back
                    self.fs.pipe_file(str(path), json.dumps({**record, "heartbeat": time.time()}).encode())
                except Exception:  # noqa: BLE001 - a missed beat; the next one tries again
                    pass

        thread = threading.Thread(target=beat, name="cancernet-lock-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
            try:
                if (self._read_lock(path) or {}).get("token") == token:
                    self.fs.rm_file(str(path))
            except Exception:  # noqa: BLE001 - a lock left behind is reported (stale) by the next command
                log.warning("%s: could not remove the run folder's lock; delete it by hand", path)

    def is_locked(self, path) -> dict | None:
        """The holder's record when a command holds the lock on ``path`` (``stale: True`` when its
        heartbeat stopped), else None."""
        h = self._read_lock(path)
        if h is None:
            return None
        h = {k: v for k, v in h.items() if k != "token"} or {"pid": "?"}
        return {**h, "stale": True} if self._stale(h) else h


# --------------------------------------------------------------------------------------------
# the run folder
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One run folder: its locations, failures list, records and lock.

    Small and picklable: worker tasks receive it and open the tile store through it.
    """

    root: Path
    fs: "LocalFS | FsspecFS" = field(default_factory=LocalFS, compare=False)
    input_options: Mapping | None = field(default=None, compare=False, repr=False)
    """fsspec options for inputs given as URLs (``--storage-options``); None: the standard places.
    Never shown (``repr``) or written: they may hold secrets."""

    @classmethod
    def of(cls, location: "str | os.PathLike | Run", storage_options: Mapping | None = None, *,
           input_options: Mapping | None = None) -> "Run":
        """The ``Run`` for a user's ``--out``, or ``location`` itself.

        A local path is made absolute (symbolic links kept as given); ``file://PATH`` is the local
        ``PATH``. Another URL (``s3://bucket/prefix/run``, ``gs://``, ``az://``...) is a run on
        object storage, reached through fsspec with ``storage_options`` (credentials, endpoint),
        else the standard places (``AWS_*`` environment, profiles, ``AWS_ENDPOINT_URL``).
        ``input_options``: fsspec options for inputs given as URLs (kept as :attr:`input_options`).
        """
        if isinstance(location, Run):
            return location
        from .remote import hidden

        input_options = hidden(input_options)  # shown nowhere, not even in a failed Dask task's log line
        text = os.fspath(location)
        scheme = url_scheme(text)
        if scheme == "file":
            text = text[len("file://"):] or "/"
        elif scheme is not None:
            return cls(ObjectPath(text.rstrip("/")), FsspecFS(scheme, storage_options), input_options)
        return cls(Path(os.path.abspath(text)), input_options=input_options)

    @property
    def remote(self) -> bool:
        return self.fs.kind != "local"

    def __str__(self) -> str:
        return str(self.root)

    # locations -----------------------------------------------------------------------------
    @property
    def store_path(self) -> Path:
        return self.root / "tiles.zarr"

    @property
    def failures_csv(self) -> Path:
        return self.root / FAILURES_CSV

    @property
    def predict_json(self) -> Path:
        return self.root / "predict.json"

    @property
    def progress_json(self) -> Path:
        return self.root / "progress.json"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def report_file(self, *parts: str) -> Path:
        """A file of the report (``parts`` are names this tool made safe, never user text)."""
        return self.report_dir.joinpath(*parts)

    # the folder and its store ---------------------------------------------------------------
    def create(self) -> "Run":
        self.fs.makedirs(self.root)
        return self

    def exists(self) -> bool:
        """Whether the run folder holds a tile store: on object storage, whether its root's document is there (one
        GET, where a look-up of the prefix costs a HEAD, then a LIST, one after another)."""
        if self.remote:
            return self.fs.read_bytes(self.store_path / "zarr.json") is not None
        from .store import creation_cut_short

        return self.fs.exists(self.store_path) and not creation_cut_short(self.store_path)

    def is_folder(self) -> bool:
        """Whether the run folder is there (on object storage: whether any object lies under it)."""
        return self.fs.isdir(self.root)

    def open_store(self, mode: str = "a", *, clean: bool = True):
        """The tile store's root group (created with ``mode='a'``).

        When writing, a killed writer's temporary files go first, unless ``clean`` is false (worker
        tasks: other workers' files in flight are not stale).
        """
        from . import store

        location = self.fs.store_location(self.store_path)  # on object storage no store to read: one clear error
        store.check_root(location)  # a damaged root is one clear error naming its file
        return store.open_root(location, mode=mode, run_dir=self.root, clean=clean)

    def inputs_group(self):
        """The tile store's ``inputs`` group, for tasks on workers: kept per process (see
        :func:`cancernet_batch.store.open_inputs_group`); removes nothing, as :meth:`open_input`."""
        from . import store

        return store.open_inputs_group(lambda: self.open_store("r+", clean=False), self.fs.cache_key(self.store_path))

    def open_input(self, gid: str, mode: str = "r+"):
        """One input's group, for tasks on workers (removes nothing: other workers write beside it)."""
        from . import store

        return store.open_input(lambda: self.fs.store_location(self.store_path), gid, mode=mode,
                                cache_key=self.fs.cache_key(self.store_path))

    def claim(self, name: str) -> bool:
        """Claim ``name`` (a plain file name) for this run: True for the one call, in any process, that claimed
        it first; False for every later one. For work that two tasks may both find theirs (two chunk tasks that
        finish together, each seeing every chunk scored), so that one does it. A claim is made by an exclusive
        create (``RUN/.tmp-claim-NAME``: on disk ``O_EXCL``, on object storage a conditional PUT); a run removes
        claims as it ends (:meth:`release_claims`), those a killed run left with them (and, on disk, as the next
        run starts: :meth:`remove_stale_report_temps`). Storage without conditional writes gives True to every
        call."""
        if safe_name(name) != name:
            raise ValueError(f"not a plain file name: {name!r}")
        return self.fs.create_new(self.root / f"{CLAIM_PREFIX}{name}")

    def release_claims(self) -> int:
        """Remove every claim in the run folder (:meth:`claim`): a run's own as it ends, and any a killed run left
        (one listing of the run folder on object storage); how many went."""
        return self.fs.remove_prefixed(self.root, CLAIM_PREFIX)

    def remove_stale_report_temps(self) -> int:
        r = self.report_dir
        return self.fs.remove_stale_temps(self.root, r, r / InputFiles.MAPS, r / InputFiles.GEOJSON,
                                          r / InputFiles.PYRAMIDS)

    def remove_unreported(self, kept: Iterable[str]) -> None:
        """Remove the report's per-input files (:attr:`InputFiles.CLEANED`) but those in ``kept`` (paths
        relative to the report, as :class:`InputFiles` gives them): the files of inputs no longer reported."""
        keep: dict[str, set[str]] = {}
        for rel in kept:
            folder, _, name = rel.partition("/")
            keep.setdefault(folder, set()).add(name)
        suffixes: dict[str, tuple[str, ...]] = {}
        for folder, suffix in InputFiles.CLEANED:
            suffixes[folder] = (*suffixes.get(folder, ()), suffix)
        for folder, ends in suffixes.items():  # one listing a folder
            self.fs.remove_unkept(self.report_dir / folder, ends, keep.get(folder, set()))

    # failures --------------------------------------------------------------------------------
    def failures(self) -> list[Failure]:
        data = self.fs.read_bytes(self.failures_csv)
        return failures_from_csv(data, self.failures_csv) if data is not None else []

    def record_failures(self, new: Iterable[Failure], *, retried: Iterable[str] | Mapping[str, str] = (),
                        from_stage: str = "discover") -> list[Failure]:
        """Merge ``new`` into ``failures.csv`` by the run's one rule, and return the list.

        Rows are keyed by (input, stage), the newest winning. Inputs in ``retried`` were tried
        again from ``from_stage`` on (or, when ``retried`` maps inputs to stages, from each
        one's own stage): their earlier rows at that stage or a later one go first, and so do the
        rows of files inside them (a patient folder's patch files), whichever path (a link or the
        real one) named them (:func:`store.input_key`). The file is rewritten
        (atomically) only when the list changed.
        """
        stages = dict(retried) if isinstance(retried, Mapping) else dict.fromkeys(retried, from_stage)
        if any(s not in STAGES for s in stages.values()):
            raise ValueError(f"unknown stage in {sorted(set(stages.values()))}")
        from . import store

        # matched by identity (real path): an earlier row may name the input through a link
        stages = {store.input_key(k): v for k, v in stages.items()}

        def cleared(f: Failure) -> bool:
            path = store.input_key(f.input)
            while True:
                stage = stages.get(path)
                if stage is not None and STAGES.index(f.stage) >= STAGES.index(stage):
                    return True
                parent = os.path.dirname(path)
                if not parent or parent == path:
                    return False
                path = parent

        data = self.fs.read_bytes(self.failures_csv)  # one read: the rows, and whether the file is there
        old = failures_from_csv(data, self.failures_csv) if data is not None else []
        merged: dict[tuple[str, str], Failure] = {}
        for f in old:
            if not (stages and f.stage in STAGES and cleared(f)):
                merged[(f.input, f.stage)] = f
        for f in new:
            merged[(f.input, f.stage)] = f
        out = list(merged.values())
        if out != old or data is None:
            self.fs.write_bytes(self.failures_csv, failures_to_csv(out))
        return out

    def write_report_failures(self, failures: list[Failure], staged: Path | None = None) -> Path:
        """The report's ``failures.csv``; into ``staged`` (the local folder of ``fs.staged(report_dir)``: PUT
        with the report's other tables, in one batch, when that block ends) when given."""
        if staged is not None:
            from .atomic import write_bytes

            return write_bytes(Path(staged) / FAILURES_CSV, failures_to_csv(failures))
        return self.fs.write_bytes(self.report_file(FAILURES_CSV), failures_to_csv(failures))

    # records -----------------------------------------------------------------------------------
    def _read_json(self, path: Path) -> dict | None:
        data = self.fs.read_bytes(path)
        if data is None:
            return None
        try:
            out = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise StorageError(f"{path.name} is damaged: {exc}", path=path,
                               hint=f"delete {path.name} and re-run the same command") from exc
        if not isinstance(out, dict):
            raise StorageError(f"{path.name} is damaged: not a JSON object", path=path,
                               hint=f"delete {path.name} and re-run the same command")
        return out

    def _write_json(self, path: Path, record: dict) -> Path:
        return self.fs.write_bytes(path, (json.dumps(record, indent=2) + "\n").encode("utf-8"))

    def predict_record(self) -> dict | None:
        """What the run was scored with (model id, threshold, engine), or None before scoring."""
        return self._read_json(self.predict_json)

    def write_predict_record(self, record: dict) -> Path:
        return self._write_json(self.predict_json, record)

    def progress(self) -> dict | None:
        return self._read_json(self.progress_json)

    def write_progress(self, record: dict) -> Path:
        return self._write_json(self.progress_json, record)

    # the one writer ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, command: str) -> Iterator["Run"]:
        """Hold the run folder for one writing command; a second one fails at once, naming the holder."""
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": time.time()}
        with self.fs.lock(self.lock_path, holder):
            yield self

    def holder(self) -> dict | None:
        """Who holds the run folder now (a live process), or None."""
        return self.fs.is_locked(self.lock_path)
