"""Inputs on object storage (``s3://bucket/prefix/slide.svs``, ``gs://``, ``az://``...), read through fsspec.

* :func:`is_url` / :func:`as_path`: an input given as a URL (``file://`` and plain paths are local).
* :func:`stat`: an object's identity for resume, ``(size, etag)`` (object stores have no useful mtime).
* :func:`find`: the slides under a prefix, by extension (like a local folder); :func:`patient_places`: the
  one walker over a listing that places each object in the Kaggle layout (``PATIENT/0/``, ``PATIENT/1/``);
  :func:`find_inputs`: slides and patient folders under a prefix, from one listing and that walk;
  :func:`folder_stat`: a patient folder's identity (total size, digest of names and ETags);
  :func:`read_objects`: many small objects (patches) fetched concurrently.
* :func:`open_object`: a seekable file object (:class:`RangeFile`) for tifffile, with the object's look-up
  and its header's first blocks in one round of requests: small reads (the TIFF
  header, its IFDs and tag arrays) go through a block cache of :data:`HEADER_BLOCK` bytes; the
  compressed tiles a region needs are fetched beforehand with :meth:`RangeFile.prefetch`, near
  ranges coalesced into one request (:func:`read_ranges`), so reading a region costs one or a few
  GETs of exactly its tiles, never a request per pixel or per tile.
* :func:`read_ranges`: many ``(offset, size)`` byte ranges of one object in few requests.
* :func:`stage`: a local copy of an object (for formats only OpenSlide reads) in a bounded cache on
  this machine, shared by threads and processes: downloaded under a temporary name and renamed,
  one lock file per entry (``flock``: exclusive while downloading or evicting, shared while in use);
  entries nobody uses are evicted oldest first beyond the size limit, and :func:`clear_stage_cache`
  removes them all when a run is done.

``storage_options`` (credentials, endpoint) are never put in a message, a log record or a file;
without them the standard places apply (``AWS_*`` environment, profiles, ``AWS_ENDPOINT_URL``).
Errors are :class:`~cancernet_batch.errors.InputError` naming the URL: one input fails, the run goes on.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import CancerNetError, InputError

log = logging.getLogger(__name__)

HEADER_BLOCK = 256 * 1024
"""Block size (bytes) of the cache that serves tifffile's small reads (header, IFDs, tag arrays)."""
MAX_GAP = 4 * 1024
"""Ranges closer than this are always fetched in one request (the gap is read and dropped)."""
MAX_WASTE = 0.1
"""Wider gaps are bridged too, smallest first, while the bytes dropped stay within this fraction of the bytes asked for."""
MAX_REQUEST = 64 * 1024 * 1024
"""Largest single coalesced request."""
PREFETCH_KEEP = 64 * 1024 * 1024
"""Bytes of prefetched tiles a :class:`RangeFile` keeps (oldest dropped first)."""
PIPELINE_IN_FLIGHT = 16
"""Range requests of one :meth:`RangeFile.prefetch` in flight at once, sent in the order the tiles will be read:
the first tiles are decoded while the later ones arrive. (Fewer at once brought the first sooner from a server on
the same machine, by a few ms, but on an endpoint with a round trip of tens of ms each wave of requests costs one.)"""
PIPELINE_SPAN = 2 * 1024 * 1024
"""Largest coalesced request of a prefetch fetched in the background (a smaller first request: decoding starts
sooner)."""
DEFAULT_STAGE_GB = 20.0
"""Default size limit of the local staging cache (``--stage-cache-gb``)."""

COUNTS = {"requests": 0, "bytes": 0}
"""Requests and bytes this process fetched for inputs (every :class:`RangeFile` and :func:`read_ranges`)."""
_COUNTS_LOCK = threading.Lock()


def _count(requests: int, nbytes: int) -> None:
    with _COUNTS_LOCK:
        COUNTS["requests"] += requests
        COUNTS["bytes"] += nbytes


class HiddenOptions(dict):
    """Storage options whose ``repr``/``str`` show no value (Dask logs a failed task's arguments)."""

    def __repr__(self) -> str:
        return f"HiddenOptions({len(self)} keys)"

    __str__ = __repr__


def hidden(options: Mapping | None) -> HiddenOptions | None:
    """``options`` as :class:`HiddenOptions` (None stays None)."""
    return None if options is None else HiddenOptions(options)


def is_url(source: object) -> bool:
    """True for an input on object storage (a URL whose scheme is not ``file``)."""
    from .runfolder import url_scheme

    if not isinstance(source, (str, os.PathLike)):
        return False
    return url_scheme(source) not in (None, "file")


def as_path(source: str | os.PathLike):
    """``source`` as a path: an :class:`~cancernet_batch.runfolder.ObjectPath` (prints as its URL) for a URL."""
    from .runfolder import ObjectPath

    return ObjectPath(os.fspath(source).rstrip("/")) if is_url(source) else Path(source)


# --------------------------------------------------------------------------------------------
# the filesystem and its errors
# --------------------------------------------------------------------------------------------

_FS: dict[tuple[str, str], object] = {}
_FS_LOCK = threading.Lock()


def _defaults(protocol: str) -> dict:
    if protocol in ("s3", "s3a"):  # bounded waits: an unreachable endpoint is an error within seconds
        return {"config_kwargs": {"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": 3}},
                "use_listings_cache": False}
    # no listings cache on any object store (gcsfs and adlfs keep one by default): inputs change between listings
    return {} if protocol in (None, "file", "local") else {"use_listings_cache": False}


def _seam(url: str, options: Mapping | None):
    """The run folder's :class:`FsspecFS` for ``url`` (for its error messages and bucket check)."""
    from .runfolder import FsspecFS, url_scheme

    fs = FsspecFS(url_scheme(url) or "file", {})
    fs.storage_options = _merge(_defaults(fs.protocol), options or {})
    return fs


def _merge(defaults: dict, given: Mapping) -> dict:
    out = dict(defaults)
    for k, v in given.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def filesystem(url: str, options: Mapping | None = None):
    """The fsspec filesystem for ``url`` (one per protocol and options in this process)."""
    from .runfolder import options_digest, url_scheme

    protocol = url_scheme(url) or "file"
    key = (protocol, options_digest(_merge(_defaults(protocol), options or {})))
    with _FS_LOCK:
        fs = _FS.get(key)
        if fs is None:
            seam = _seam(url, options)
            try:
                fs = seam.fs
            except CancerNetError as exc:
                raise InputError(exc.message, path=url, hint=exc.hint) from None
            _FS[key] = fs
    return fs


def _input_error(exc: BaseException, url: str, doing: str, options: Mapping | None = None) -> InputError:
    """One clear line for a failed storage call on an input (never the options: they may hold secrets)."""
    if isinstance(exc, CancerNetError):
        return InputError(exc.message, path=url, hint=exc.hint)
    if isinstance(options, Mapping) and "session" in options:
        # a filesystem's own options hold the process's shared session (runfolder._process_session), which
        # ``filesystem`` adds itself: without it they name the same filesystem (with it, s3fs cannot copy them,
        # and the bucket looked missing whenever an object was)
        options = {k: v for k, v in options.items() if k != "session"}
    if isinstance(exc, FileNotFoundError):
        from .runfolder import bucket_word

        proto = url.split("://", 1)[0]
        bucket = _bucket_key(url)[0]
        try:
            missing = not filesystem(url, options).exists(f"{proto}://{bucket}")
        except Exception:  # noqa: BLE001 - the object is missing in any case
            missing = False
        word = bucket_word(proto)
        if missing:
            return InputError(f"the {word} {bucket!r} does not exist", path=url,
                              hint=f"check the {word} name in the URL (and the endpoint)")
        return InputError("no such object", path=url, hint=f"check the URL: {word}, prefix and file name")
    e = _seam(url, options if isinstance(options, Mapping) else {})._error(exc, url, doing)
    return InputError(e.message, path=url, hint=e.hint)


def _call(url: str, doing: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - s3fs/botocore/aiohttp raise many kinds; each becomes one line
        # the filesystem called (``fs.method``, or ``fn(fs, ...)``) knows its endpoint, which the error names; an
        # async filesystem's sync methods are plain functions wrapping its bound coroutine methods
        fs = (getattr(fn, "__self__", None) or getattr(getattr(fn, "__wrapped__", None), "__self__", None)
              or (args[0] if args else None))
        raise _input_error(exc, url, doing, getattr(fs, "storage_options", None)) from None


def no_dead_exit_calls(fs) -> None:
    """Detach the exit-time finalizers an asynchronous filesystem registered that can only fail.

    adlfs registers ``weakref.finalize(fs, fsspec.asyn.sync, fs.loop, close_service_client, fs)`` for every instance.
    An instance made with ``asynchronous=True`` (zarr's store makes its own so) has no loop of its own, so at exit
    that call raises "Loop is not running" and Python prints its traceback after the command's last line (seen on
    every ``--out az://`` run). Its client's connections go with the process either way. Other drivers register no
    such call, and an instance with a loop keeps its finalizers."""
    import weakref

    from fsspec.asyn import sync

    if not getattr(fs, "asynchronous", False) or getattr(fs, "_loop", None) is not None:
        return
    registry = getattr(weakref.finalize, "_registry", None) or {}
    for fin, info in list(registry.items()):
        args = getattr(info, "args", None) or ()
        if getattr(info, "func", None) is sync and args and args[0] is None and args[-1] is fs:
            fin.detach()


def _strip(url: str) -> str:
    return os.fspath(url).rstrip("/")


# --------------------------------------------------------------------------------------------
# identity and discovery
# --------------------------------------------------------------------------------------------

def _etag(info: Mapping) -> str:
    for k in ("ETag", "etag", "md5Hash", "content_md5", "LastModified", "last_modified", "mtime", "updated"):
        v = info.get(k)
        if v:
            return str(v).strip('"')
    return ""


def info(url: str, options: Mapping | None = None) -> dict:
    """fsspec's info of ``url`` (``type``, ``size``, ``ETag``...); :class:`InputError` when it is not there."""
    url = _strip(url)
    fs = filesystem(url, options)
    try:
        return fs.info(url)
    except Exception as exc:  # noqa: BLE001
        raise _input_error(exc, url, "looking up the input", options) from None


def stat(url: str, options: Mapping | None = None) -> tuple[int, str]:
    """``(size, etag)`` of an object: what identifies its content for resume (a changed object has another ETag)."""
    i = info(url, options)
    if i.get("type") == "directory":
        raise InputError("is a prefix (folder), not a slide object", path=url, hint="give the slide's URL")
    return int(i.get("size") or 0), _etag(i)


def listing(url: str, options: Mapping | None = None) -> dict[str, dict]:
    """``{url: info}`` of every object under the prefix ``url`` (one paged LIST; hidden names and ``*.zarr``
    prefixes skipped), sorted by URL. :class:`InputError` when the listing fails."""
    url = _strip(url)
    fs = filesystem(url, options)
    proto = url.split("://", 1)[0]
    found = _call(url, "listing the prefix", list_objects, fs, url,
                  lambda: list(fs.find(url, detail=True).values()), recursive=True)
    out = {}
    for i in sorted(found, key=lambda e: str(e["name"])):
        name = i["name"]
        rel = str(name).split("://", 1)[-1]
        if i.get("type") == "directory" or any(p.startswith(".") or p.endswith(".zarr") for p in rel.split("/")[1:]):
            continue
        out[f"{proto}://{rel}"] = i
    return out


PATIENT_LABELS = ("0", "1")
"""The label folders of a patient folder (Kaggle layout: ``PATIENT/0/*.png``, ``PATIENT/1/*.png``)."""


@dataclass(frozen=True)
class PatientPlace:
    """Where one object of a listing lies in the Kaggle layout: ``PATIENT/LABEL/REST``."""

    patient: str
    """The patient folder's URL."""
    depth: int
    """How many folders below the listed prefix the patient folder is (0: the prefix itself)."""
    label: str
    """Its label folder, one of :data:`PATIENT_LABELS`."""
    rest: tuple[str, ...]
    """Its path below the label folder: one name for a patch."""

    @property
    def is_patch(self) -> bool:
        """Directly in its label folder (``PATIENT/0/NAME``), where a patch file lies."""
        return len(self.rest) == 1


def patient_places(url: str, objects: Mapping[str, Mapping]) -> Iterator[tuple[str, Mapping, PatientPlace | None]]:
    """``(object URL, its info (size, ETag...), its place)`` for each object of ``objects``, a :func:`listing`
    of the prefix ``url``, in its order: the one walker over a listing that decides the Kaggle layout.

    An object lies in a patient folder when a folder on its path below ``url`` is a label folder
    (``0`` or ``1``): the patient folder is the prefix before the first one (``url`` itself when it is
    the first folder). Other objects (slides, stray files) have no place (None).
    """
    url = _strip(url)
    for obj, meta in objects.items():
        parts = obj[len(url) + 1:].split("/")
        cut = next((k for k in range(len(parts) - 1) if parts[k] in PATIENT_LABELS), None)
        place = None if cut is None else PatientPlace("/".join([url, *parts[:cut]]), cut, parts[cut],
                                                      tuple(parts[cut + 1:]))
        yield obj, meta, place


def find_inputs(url: str, extensions: tuple[str, ...], options: Mapping | None = None
                ) -> tuple[list[str], list[str]] | None:
    """``(slides, patient folders)`` under the prefix ``url``, as local folders are searched (one LIST):
    a prefix holding ``0/`` or ``1/`` is a patient folder (one input, not searched further; ``url`` itself
    may be one); objects elsewhere whose names end in ``extensions`` are slides. None when ``url`` is
    one object (not a prefix)."""
    url = _strip(url)
    found = _prefix_listing(url, extensions, options)
    if found is None:
        return None
    slides, patients = [], set()
    for obj, _, place in patient_places(url, found):
        if place is not None and place.depth == 0:
            return [], [url]
        if place is not None:
            patients.add(place.patient)
        elif obj.rsplit("/", 1)[-1].lower().endswith(extensions):
            slides.append(obj)
    return sorted(slides), sorted(patients)


def _prefix_listing(url: str, extensions: tuple[str, ...], options: Mapping | None) -> dict[str, dict] | None:
    """:func:`listing` of the prefix ``url``, or None when ``url`` is one object; :class:`InputError` when
    nothing is there. A name that ends in ``extensions`` is looked up first (one HEAD finds the object it
    nearly always is); any other is listed first: one round trip for a folder of slides, where fsspec's
    look-up sent three one after another (a HEAD, a LIST of one key, then the listing itself), and a look-up
    only when nothing lies under it. ``url`` naming both an object and a prefix is the prefix."""
    if url.rsplit("/", 1)[-1].lower().endswith(extensions):
        return listing(url, options) if info(url, options).get("type") == "directory" else None
    found = listing(url, options)
    if found and url not in found:  # a prefix (fsspec's find gives an object at exactly ``url`` as itself)
        return found
    return found if info(url, options).get("type") == "directory" else None


def identity(objects: Mapping[str, Mapping]) -> tuple[int, str]:
    """``(total size, digest)`` of a set of objects (``{url: info}``, as :func:`listing` gives): a patient
    folder's identity for resume. An object added, removed, renamed or replaced changes the digest."""
    h = hashlib.sha256()
    for u in sorted(objects):
        h.update(f"{u}\0{_etag(objects[u])}\0{int(objects[u].get('size') or 0)}\n".encode())
    return sum(int(i.get("size") or 0) for i in objects.values()), h.hexdigest()[:32]


DICOM_SUFFIX = ".dcm"
"""A DICOM slide's instances (its levels, label, overview) are files of their own; OpenSlide finds the others of the
one it opens among the files beside it, so on object storage such an object is staged with its folder's DICOM
objects (:func:`dicom_folder`)."""


def dicom_folder(url: str, options: Mapping | None = None) -> dict[str, dict]:
    """``{url: info}`` of the DICOM objects (``*.dcm``) in the folder of ``url`` (one fresh LIST, not recursive),
    sorted by URL, ``url`` among them: the files OpenSlide looks through for the other instances of a DICOM series.
    :class:`InputError` when the listing fails."""
    url = _strip(url)
    parent = url.rsplit("/", 1)[0]
    fs = filesystem(url, options)
    proto = url.split("://", 1)[0]

    def fresh_ls() -> list:
        fs.invalidate_cache(parent)
        return fs.ls(parent, detail=True)

    out = {}
    for i in _call(parent, "listing the DICOM slide's folder", fresh_ls):
        rel = str(i.get("name", "")).split("://", 1)[-1].rstrip("/")
        name = rel.rsplit("/", 1)[-1]
        if i.get("type") != "directory" and name.lower().endswith(DICOM_SUFFIX) and not name.startswith("."):
            out[f"{proto}://{rel}"] = i
    return dict(sorted(out.items()))


def series_stat(urls: list[str], options: Mapping | None = None) -> tuple[int, str]:
    """``(total size, digest)`` of the objects of a DICOM series (all in one folder; :func:`identity`, one LIST):
    the series' identity for resume. :class:`InputError` naming a member that is gone."""
    urls = [_strip(u) for u in urls]
    found = dicom_folder(urls[0], options)
    for u in urls:
        if u not in found:
            raise InputError("a file of this DICOM series is gone", path=u, hint="upload the series' files again")
    return identity({u: found[u] for u in urls})


def folder_stat(url: str, options: Mapping | None = None) -> tuple[int, str]:
    """``(total size, digest)`` of every object under the prefix ``url`` (:func:`identity`; one LIST)."""
    return identity(listing(url, options))


def read_objects(urls: list[str], options: Mapping | None = None) -> dict[str, bytes | InputError]:
    """The whole bytes of many small objects (patches): one GET each, all sent together (fsspec gathers them;
    the HTTP connection pool bounds how many are in flight), so a patient folder costs few round trips
    of latency, not one per patch. An object that cannot be read maps to its :class:`InputError`."""
    if not urls:
        return {}
    fs = filesystem(urls[0], options)
    got: dict[str, object] = {}
    native = _native(fs)
    if native is not None:
        got = dict(zip(urls, _run(fs, _native_objects, native, list(urls))))
        failed = [u for u, d in got.items() if isinstance(d, BaseException)]
        errors = [got.pop(u) for u in failed]
        for u, e in zip(failed, errors):
            _native_failed(e, u)
    rest = [u for u in urls if u not in got]
    if rest:
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        kw = {"max_concurrency": 1} if protocol in ("s3", "s3a") else {}  # else s3fs asks each object's size first
        again = _call(rest[0], "reading", fs.cat_ranges, rest, None, None, on_error="return", **kw)
        got.update(zip(rest, again))
        if native is not None and any(not isinstance(d, BaseException) for d in again):
            _native_served(fs, native, next((e for e in errors if not _names_it_refuses(e)), errors[0]))
    out: dict[str, bytes | InputError] = {}
    for u in urls:
        d = got[u]
        out[u] = _input_error(d, u, "reading", fs.storage_options) if isinstance(d, BaseException) else bytes(d)
    _count(len(urls), sum(len(d) for d in out.values() if isinstance(d, bytes)))
    return out


# --------------------------------------------------------------------------------------------
# range reads
# --------------------------------------------------------------------------------------------

def _coalesce(ranges: list[tuple[int, int]], max_gap: int = MAX_GAP,
              waste: float = MAX_WASTE, largest: int = MAX_REQUEST) -> list[tuple[int, int]]:
    """Sorted ``(start, end)`` spans covering ``ranges`` (``(offset, size)``), in few requests.

    Overlapping ranges are one span, and touching ones while the span stays within ``largest`` bytes; then the
    gaps between spans are bridged smallest first while the bytes read and dropped stay within ``waste`` x the
    bytes asked for (any gap up to ``max_gap`` is bridged too), and no span exceeds ``largest`` bytes (unless one
    range does). The tiles of one region lie in a few runs (one per tile row, the other columns between them):
    most runs become one request.
    """
    spans: list[list[int]] = []
    for off, size in sorted((int(o), int(s)) for o, s in ranges if s > 0):
        end = off + size
        if spans and (off < spans[-1][1] or (off == spans[-1][1] and end - spans[-1][0] <= largest)):
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([off, end])
    if len(spans) < 2:
        return [(a, b) for a, b in spans]
    asked = sum(b - a for a, b in spans)
    budget = waste * asked
    gaps = sorted(range(len(spans) - 1), key=lambda i: spans[i + 1][0] - spans[i][1])
    bridge = set()
    for i in gaps:
        g = spans[i + 1][0] - spans[i][1]
        if g <= max_gap or g <= budget:
            bridge.add(i)
            budget -= g
        else:
            break
    out: list[list[int]] = [list(spans[0])]
    for i in range(1, len(spans)):
        if i - 1 in bridge and spans[i][1] - out[-1][0] <= largest:
            out[-1][1] = spans[i][1]
        else:
            out.append(list(spans[i]))
    return [(a, b) for a, b in out]


# --------------------------------------------------------------------------------------------
# S3 GETs and PUTs through obstore (Rust's object_store): the same requests at a sixth of s3fs's client CPU
# --------------------------------------------------------------------------------------------

NATIVE_ENV = "CANCERNET_S3_NATIVE"
"""Set to ``0`` to send every S3 request through s3fs and every Azure request through adlfs (obstore is used by
default when it is installed)."""
NATIVE_GIVE_UP = 3
"""Requests the native client failed and s3fs then served, after which a filesystem goes through s3fs alone."""
NATIVE_IN_FLIGHT = 64
"""Whole objects (patches, report files) the native client sends or fetches at once."""
NATIVE_COUNTS = {"requests": 0, "fallbacks": 0}
"""Requests this process sent through the native client, and those it handed back to s3fs."""
_OBSTORE_STARTED = False
"""This process has made an obstore store (its Rust runtime may be running threads)."""
_OBSTORE_FORKED = False
"""This process was forked from one whose obstore runtime ran: that runtime's threads were not copied, and obstore
would wait for them forever, so this process reads and writes through s3fs alone."""


def _after_fork_in_child() -> None:
    global _OBSTORE_FORKED
    if _OBSTORE_STARTED:
        _OBSTORE_FORKED = True


os.register_at_fork(after_in_child=_after_fork_in_child)
_AWS_HOST = re.compile(r"(^|\.)amazonaws\.com(\.cn)?$")


class _Native:
    """obstore's S3 stores (one per bucket) for the objects of one s3fs filesystem, with the same endpoint,
    region, credentials and time limits as its botocore client; or its Azure stores (``kind`` "azure", one per
    container) for an adlfs filesystem, with its account, key or SAS and endpoint (:func:`_azure_config`). Range and whole-object GETs of inputs, and
    whole-object GETs and PUTs of the run folder (its files, :mod:`.native_store` for the tile store) go through
    it, and on S3 the listings (:func:`list_objects`); look-ups, deletes and conditional PUTs (the lock, claims) stay on s3fs. botocore spends about 1.3 ms
    of CPU on a request (its hooks, endpoint rules, signing and parsing), obstore about 0.25 ms
    (RESULTS.md section 8). Any request it fails is sent again through s3fs, whose answers and errors are the ones
    the user sees; after :data:`NATIVE_GIVE_UP` such requests that s3fs served, the filesystem stops using it."""

    def __init__(self, config: dict, client_options: dict, kind: str = "s3"):
        self.config, self.client_options, self.kind = config, client_options, kind
        self.stores: dict[str, object] = {}
        self.failures = 0
        self.lock = threading.Lock()

    def at(self, url: str) -> tuple[object, str]:
        """The store of ``url``'s bucket, and its key there."""
        bucket, key = _bucket_key(url)
        return self.store(bucket), key

    def store(self, bucket: str):
        global _OBSTORE_STARTED
        with self.lock:
            st = self.stores.get(bucket)
            if st is None:
                from obstore.store import AzureStore, S3Store

                _OBSTORE_STARTED = True
                cls = AzureStore if self.kind == "azure" else S3Store
                st = self.stores[bucket] = cls(bucket, config=dict(self.config),
                                               client_options=dict(self.client_options),
                                               retry_config={"max_retries": 3})
            return st


def _native(fs) -> "_Native | None":
    """The native client of the s3fs filesystem ``fs``, or None (not S3, obstore not installed, turned off with
    :data:`NATIVE_ENV`, or a setting it does not carry over: requester pays, versions, extra request arguments,
    TLS or proxy settings, virtual-host addressing, or credentials that refresh). Made once per filesystem; for
    a filesystem made with ``asynchronous=True`` (zarr's), use :func:`_native_async` on its loop."""
    known = _known_native(fs)
    if known is not _UNKNOWN:
        return known
    if _is_azure(fs):
        return _keep_native(fs, lambda: _azure_native(fs) if _native_candidate(fs) else None)
    from fsspec.asyn import sync

    return _keep_native(fs, lambda: _make_native(sync(fs.loop, fs.set_session)) if _native_candidate(fs) else None)


async def _native_async(fs) -> "_Native | None":
    """:func:`_native` from a coroutine on ``fs``'s own event loop."""
    known = _known_native(fs)
    if known is not _UNKNOWN:
        return known
    if _is_azure(fs):  # made from the filesystem's own settings: nothing to await
        return _native(fs)
    client = await fs.set_session() if _native_candidate(fs) else None
    return _keep_native(fs, lambda: _make_native(client) if client is not None else None)


def _is_azure(fs) -> bool:
    return type(fs).__name__ == "AzureBlobFileSystem"


_UNKNOWN = object()


def _known_native(fs):
    """The native client already decided for ``fs`` (None in a process forked after obstore ran), or _UNKNOWN."""
    return None if _OBSTORE_FORKED else fs.__dict__.get("_cancernet_native", _UNKNOWN)


def native_enabled() -> bool:
    """Whether S3 requests may go through obstore in this process: installed, not turned off with
    :data:`NATIVE_ENV`, and not forked after it ran (each filesystem's own settings may still keep s3fs)."""
    if _OBSTORE_FORKED or os.environ.get(NATIVE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        import obstore  # noqa: F401
    except ImportError:
        return False
    return True


def _native_candidate(fs) -> bool:
    if not native_enabled():
        return False
    if _is_azure(fs):
        return True  # what its settings carry over is decided by _azure_native
    if type(fs).__name__ != "S3FileSystem" or not getattr(fs, "async_impl", False):
        return False
    return not (fs.requester_pays or fs.version_aware or fs.s3_additional_kwargs or set(fs.kwargs) - {"profile"}
                or set(fs.client_kwargs) - {"endpoint_url", "region_name"})


def _keep_native(fs, make) -> "_Native | None":
    try:
        native = make()
    except Exception as exc:  # noqa: BLE001 - s3fs alone then, as before
        log.debug("native S3 reads off: %s", type(exc).__name__)
        native = None
    fs.__dict__["_cancernet_native"] = native
    return native


def _make_native(client) -> "_Native | None":
    """The native client with the settings of botocore's ``client``, or None where one would not carry over."""
    from urllib.parse import urlsplit

    from botocore import UNSIGNED

    cfg = client.meta.config
    if (getattr(cfg, "s3", None) or {}).get("addressing_style") == "virtual" or getattr(cfg, "proxies", None):
        return None
    endpoint = client.meta.endpoint_url or ""
    parts = urlsplit(endpoint)
    config = {"region": client.meta.region_name or "us-east-1"}
    if not _AWS_HOST.search(parts.hostname or ""):
        config["endpoint"] = endpoint  # a local or third-party server, path-style as botocore addresses it
    if cfg.signature_version is UNSIGNED:
        config["skip_signature"] = True
    else:
        creds = getattr(getattr(client, "_request_signer", None), "_credentials", None)
        if creds is None or "Refreshable" in type(creds).__name__ or not (creds.access_key and creds.secret_key):
            return None
        config.update(access_key_id=creds.access_key, secret_access_key=creds.secret_key)
        if creds.token:
            config["token"] = creds.token
    client_options = {"allow_http": parts.scheme == "http",
                      "connect_timeout": f"{int(cfg.connect_timeout or 10)}s",
                      "timeout": f"{int(cfg.read_timeout or 120)}s"}
    return _Native(config, client_options)


def _connection_string(text: str) -> dict[str, str]:
    """An Azure Storage connection string's ``Key=value`` parts (a value may hold ``=``, as a SAS does)."""
    out = {}
    for part in str(text).split(";"):
        key, eq, value = part.partition("=")
        if eq and key.strip():
            out[key.strip()] = value.strip()
    return out


def _azure_config(fs) -> "tuple[dict, dict] | None":
    """obstore's ``AzureStore`` config and client options with the account, key or SAS and endpoint of adlfs's
    filesystem ``fs``; None where they would not carry over: no account key or SAS (Azure AD credentials, a
    credential object, anonymous access, which adlfs resolves itself), versions, a secondary location, a session
    of its own."""
    if (getattr(fs, "credential", None) is not None or getattr(fs, "anon", False) or getattr(fs, "version_aware", False)
            or getattr(fs, "client_id", None) or getattr(fs, "request_session", None) is not None
            or (getattr(fs, "location_mode", "primary") or "primary") != "primary"):
        return None
    if getattr(fs, "connection_string", None):
        cs = _connection_string(fs.connection_string)
        account, key, sas = cs.get("AccountName"), cs.get("AccountKey"), cs.get("SharedAccessSignature")
        endpoint = cs.get("BlobEndpoint")
        if not endpoint and account and cs.get("EndpointSuffix", "core.windows.net") != "core.windows.net":
            endpoint = f"{cs.get('DefaultEndpointsProtocol', 'https')}://{account}.blob.{cs['EndpointSuffix']}"
    else:
        account, key, sas = fs.account_name, getattr(fs, "account_key", None), getattr(fs, "sas_token", None)
        host = getattr(fs, "account_host", None)
        endpoint = f"https://{host}" if host else None
    if not account or not (key or sas):
        return None
    config = {"account_name": account}
    if key:
        config["account_key"] = key
    else:
        config["sas_key"] = str(sas).lstrip("?")
    if endpoint:
        config["endpoint"] = endpoint.rstrip("/")
    return config, {"allow_http": str(endpoint or "").startswith("http://"), "connect_timeout": "10s",
                    "timeout": "120s"}


def _azure_native(fs) -> "_Native | None":
    """The native client of adlfs's filesystem ``fs`` (obstore's ``AzureStore``, one per container): a request costs
    adlfs and azure-storage-blob about 1.7 CPU ms, obstore about 0.2 (ad hoc against Azurite, RESULTS.md section 8)."""
    made = _azure_config(fs)
    return _Native(*made, kind="azure") if made is not None else None


def _bucket_key(url: str) -> tuple[str, str]:
    """The bucket (container) of ``url`` and its key there. Azure's ``abfs://container@account.dfs.core.windows.net/key``
    names the container before the ``@`` (the account is the filesystem's own, as adlfs reads such a URL); no bucket
    name of S3 or GCS can hold an ``@``."""
    rest = _strip(url).split("://", 1)[-1]
    bucket, _, key = rest.partition("/")
    return bucket.split("@", 1)[0], key


def _native_count(requests: int) -> None:
    with _COUNTS_LOCK:
        NATIVE_COUNTS["requests"] += requests


async def _native_spans(native: _Native, url: str, spans: list[tuple[int, int]]) -> list[bytes]:
    """The bytes of each ``(start, end)`` span of ``url``, one request each, concurrently (on an asyncio loop)."""
    import obstore

    store, key = native.at(url)
    got = await obstore.get_ranges_async(store, key, starts=[a for a, _ in spans], ends=[b for _, b in spans],
                                         coalesce=0)
    _native_count(len(spans))
    return [bytes(d) for d in got]


async def _native_span(native: _Native, url: str, start: int, end: int):
    """Bytes ``[start, end)`` of ``url`` in one request, as obstore's buffer (sliced without a copy: copying a few MB
    into fresh memory cost about 1 ms a MB here, in page faults)."""
    import obstore

    store, key = native.at(url)
    got = await obstore.get_range_async(store, key, start=start, end=end)
    _native_count(1)
    return got


def _native_first(native: _Native, url: str, start: int, end: int) -> list:
    """``[bytes [start, end), info]`` of ``url`` from one ranged GET: its answer names the object's size and ETag, so
    no look-up (HEAD) goes beside it (a HEAD through s3fs cost 1.4 CPU ms here; RESULTS.md section 8)."""
    import obstore

    store, key = native.at(url)
    got = obstore.get(store, key, options={"range": (start, end)})
    data = bytes(got.bytes())
    _native_count(1)
    meta = got.meta
    etag = meta["e_tag"] or ""
    if native.kind == "azure":  # as adlfs gives it (unquoted): an input's identity must not depend on the client
        etag = etag.strip('"')
    return [data, {"size": int(meta["size"]), "ETag": etag, "type": "file"}]


def _native_spans_now(native: _Native, url: str, spans: list[tuple[int, int]]) -> list[bytes]:
    """:func:`_native_spans` from a thread with no loop: obstore's blocking call, without a hop to fsspec's loop
    and back (a quarter millisecond of CPU a call here; RESULTS.md section 8)."""
    import obstore

    store, key = native.at(url)
    got = obstore.get_ranges(store, key, starts=[a for a, _ in spans], ends=[b for _, b in spans], coalesce=0)
    _native_count(len(spans))
    return [bytes(d) for d in got]


async def _native_object(native: _Native, url: str) -> bytes:
    import obstore

    store, key = native.at(url)
    got = await obstore.get_async(store, key)
    data = bytes(await got.bytes_async())
    _native_count(1)
    return data


async def _native_put(native: _Native, url: str, data: bytes) -> None:
    """One PUT of the whole object (never a multipart upload: one request, as s3fs's ``pipe_file`` sends)."""
    import obstore

    store, key = native.at(url)
    await obstore.put_async(store, key, data, use_multipart=False)
    _native_count(1)


def _native_put_now(native: _Native, url: str, data: bytes) -> None:
    import obstore

    store, key = native.at(url)
    obstore.put(store, key, data, use_multipart=False)
    _native_count(1)


def _native_object_now(native: _Native, url: str) -> bytes:
    import obstore

    store, key = native.at(url)
    data = bytes(obstore.get(store, key).bytes())
    _native_count(1)
    return data


def _entry(bucket: str, meta: Mapping) -> dict:
    """An obstore listing's object as s3fs's detail dict (what the callers read: name, type, size, ETag)."""
    return {"name": f"{bucket}/{meta['path']}", "Key": f"{bucket}/{meta['path']}", "type": "file",
            "size": int(meta["size"]), "ETag": meta.get("e_tag") or "", "LastModified": meta.get("last_modified")}


def _level(bucket: str, got: Mapping) -> list[dict]:
    """An obstore listing of one level (its sub-prefixes, then its objects) as s3fs's ``ls`` gives it."""
    return ([{"name": f"{bucket}/{p}", "Key": f"{bucket}/{p}", "type": "directory", "size": 0}
             for p in got["common_prefixes"]] + [_entry(bucket, m) for m in got["objects"]])


def _listed_at(native: _Native, path: str) -> tuple[object, str, str | None]:
    """The store, bucket and prefix (None: the whole bucket) of a native listing of ``path`` (``bucket/key``)."""
    bucket, key = _bucket_key(path)
    return native.store(bucket), bucket, key.strip("/") or None


def _native_list_now(native: _Native, path: str, recursive: bool) -> list[dict]:
    """Every object under the prefix ``path`` (``bucket/key``, a folder; ``recursive``: at any depth, else one level,
    its sub-prefixes as directories, as s3fs's ``ls``), as s3fs's detail dicts; nothing there: none. obstore's
    blocking call: a listing of 40 objects costs 0.5-0.6 CPU ms where s3fs's costs 5.9-6.4 (botocore's XML and time
    parsing; ``benchmarks/s3_client_cpu.py``, RESULTS.md section 8)."""
    import obstore

    store, bucket, prefix = _listed_at(native, path)
    if recursive:
        out = [_entry(bucket, m) for m in obstore.list(store, prefix).collect()]
    else:
        out = _level(bucket, obstore.list_with_delimiter(store, prefix))
    _native_count(1)
    return out


async def native_ls_async(fs, path: str, fallback):
    """:func:`list_objects` (one level) from a coroutine on the loop of ``fs`` (zarr's asynchronous filesystem): through
    the native client where there is one, else, or if that fails, ``await fallback()``'s answer (s3fs: its errors are
    the ones raised). A native listing that fails and s3fs then serves counts towards giving the native client up, as
    in the blocking calls (:func:`_native_served`)."""
    native = await _native_async(fs)
    if native is None or native.kind != "s3":
        return await fallback()
    try:
        import obstore

        store, bucket, prefix = _listed_at(native, path)
        got = await obstore.list_with_delimiter_async(store, prefix)
        _native_count(1)
        return _level(bucket, got)
    except Exception as exc:  # noqa: BLE001 - s3fs lists it again
        _native_failed(exc, path)
        error = exc
    out = await fallback()
    _native_served(fs, native, error)
    return out


def list_objects(fs, path: str, fallback, *, recursive: bool):
    """The objects under the prefix ``path`` through the native client of ``fs`` (S3 only: an Azure listing through
    obstore lacks the MD5s that :func:`cancernet_batch.store._listed_flags` reads), as s3fs's detail dicts, one level
    (``recursive`` False: s3fs's ``ls``) or every depth (s3fs's ``find``); else, or if that fails, ``fallback()``'s
    answer (s3fs: its errors are the ones raised)."""
    native = _native(fs)
    if native is not None and native.kind == "s3":
        try:
            return _native_list_now(native, path, recursive)
        except Exception as exc:  # noqa: BLE001
            _native_failed(exc, path)
            out = fallback()
            _native_served(fs, native, exc)
            return out
    return fallback()


def _names_it_refuses(exc: BaseException | None) -> bool:
    """Whether a native request failed on a key that object_store does not take as a path (an empty or ``.`` segment,
    a control character: S3 allows them), not on the server or the network: a listing that meets one
    (``InvalidPathError``), or a request for one (``ValueError``: "Could not parse path", before anything is sent)."""
    if type(exc) is ValueError and str(exc).startswith("Could not parse path"):
        return True
    try:
        from obstore.exceptions import InvalidPathError
    except ImportError:
        return False
    return isinstance(exc, InvalidPathError)


async def _bounded(calls: list, *, return_exceptions: bool = False) -> list:
    """Await the coroutine functions ``calls``, at most :data:`NATIVE_IN_FLIGHT` at a time."""
    import asyncio

    gate = asyncio.Semaphore(NATIVE_IN_FLIGHT)

    async def one(call):
        async with gate:
            return await call()

    return await asyncio.gather(*(one(c) for c in calls), return_exceptions=return_exceptions)


async def _native_puts(native: _Native, items: list[tuple[str, bytes]]) -> None:
    await _bounded([lambda u=u, d=d: _native_put(native, u, d) for u, d in items])


async def _native_objects(native: _Native, urls: list[str]) -> list:
    """The whole bytes of each object, at most :data:`NATIVE_IN_FLIGHT` requests at a time; a failed read's
    exception in its place."""
    return await _bounded([lambda u=u: _native_object(native, u) for u in urls], return_exceptions=True)


def not_found(exc: BaseException) -> bool:
    """Whether a native request failed because the object is not there (obstore raises ``FileNotFoundError``)."""
    if isinstance(exc, FileNotFoundError):
        return True
    try:
        from obstore.exceptions import NotFoundError
    except ImportError:
        return False
    return isinstance(exc, NotFoundError)


def put_objects(fs, items: list[tuple[str, bytes]], fallback) -> None:
    """PUT each ``(path, bytes)`` whole through the native client of ``fs``, concurrently; if that fails, or there
    is none, ``fallback()`` writes them (s3fs: its error is the one raised). For the run folder's files."""
    native = _native(fs) if items else None
    error = None
    if native is not None:
        try:
            if len(items) == 1:  # obstore's blocking call: no hop to fsspec's loop
                _native_put_now(native, *items[0])
            else:
                _run(fs, _native_puts, native, items)
            return
        except Exception as exc:  # noqa: BLE001 - s3fs writes them again
            _native_failed(exc, items[0][0])
            error = exc
    fallback()
    if native is not None:
        _native_served(fs, native, error)


def get_object(fs, path: str, fallback) -> "bytes | None":
    """The whole object at ``path`` through the native client of ``fs`` (None when it is not there); else, or if
    that fails otherwise, ``fallback()``'s answer. For the run folder's files."""
    native = _native(fs)
    error = None
    if native is not None:
        try:
            return _native_object_now(native, path)
        except Exception as exc:  # noqa: BLE001
            if not_found(exc):
                return None
            _native_failed(exc, path)
            error = exc
    out = fallback()
    if native is not None and out is not None:
        _native_served(fs, native, error)
    return out


def _native_failed(exc: BaseException, url: str) -> None:
    """A native request failed: the caller sends it again through s3fs."""
    with _COUNTS_LOCK:
        NATIVE_COUNTS["fallbacks"] += 1
    log.debug("native request for %s failed (%s); sent again through s3fs", url, type(exc).__name__)


def _native_served(fs, native: _Native, exc: BaseException | None = None) -> None:
    """s3fs served a request the native client had failed (with ``exc``): after :data:`NATIVE_GIVE_UP` of those the
    filesystem goes through s3fs alone (a read both fail, a missing object, is the input's own fault and does not
    count; nor does a key object_store will not take as a path, :func:`_names_it_refuses`: the name's fault)."""
    if _names_it_refuses(exc):
        return
    with native.lock:
        native.failures += 1
        if native.failures >= NATIVE_GIVE_UP and fs.__dict__.get("_cancernet_native") is native:
            fs.__dict__["_cancernet_native"] = None
            log.info("S3 requests through s3fs alone from now on: the native client failed %d that s3fs then served",
                     native.failures)


def _whole(data: list, spans: list[tuple[int, int]]) -> bool:
    """Whether every span came back whole: only then did s3fs serve what the native client failed (a truncated object,
    whose spans come back short, fails both ways)."""
    return all(isinstance(d, bytes) and len(d) == b - a for d, (a, b) in zip(data, spans))


def _run(fs, coro_fn, *args):
    from fsspec.asyn import sync

    return sync(fs.loop, coro_fn, *args)


def _fetch_spans(fs, url: str, spans: list[tuple[int, int]]) -> list[bytes]:
    if not spans:
        return []
    native = _native(fs)
    error = None
    if native is not None:
        try:
            data = _native_spans_now(native, url, spans)
        except Exception as exc:  # noqa: BLE001 - s3fs reads it again, and its error is the one raised
            _native_failed(exc, url)
            error = exc
        else:
            _count(len(spans), sum(len(d) for d in data))
            return data
    if len(spans) == 1:
        data = [_call(url, "reading", fs.cat_file, url, start=spans[0][0], end=spans[0][1])]
    else:  # concurrent requests (s3fs: asyncio)
        data = _call(url, "reading", fs.cat_ranges, [url] * len(spans), [a for a, _ in spans], [b for _, b in spans],
                     on_error="raise")
    for d in data:
        if isinstance(d, BaseException):
            raise _input_error(d, url, "reading", fs.storage_options)
    if native is not None and _whole(data, spans):
        _native_served(fs, native, error)
    _count(len(spans), sum(len(d) for d in data))
    return [bytes(d) for d in data]


def read_ranges(url: str, ranges: list[tuple[int, int]], options: Mapping | None = None, *,
                max_gap: int = MAX_GAP) -> list[bytes]:
    """The bytes of each ``(offset, size)`` range of the object ``url``, in the order given.

    Ranges closer than ``max_gap`` bytes are fetched in one request, separate spans concurrently
    (``fs.cat_ranges``): a set of neighbouring TIFF tiles costs one GET.
    """
    url = _strip(url)
    fs = filesystem(url, options)
    spans = _coalesce(ranges, max_gap)
    data = _fetch_spans(fs, url, spans)
    starts = [a for a, _ in spans]
    out = []
    for off, size in ranges:
        i = bisect.bisect_right(starts, off) - 1
        a = starts[i]
        out.append(data[i][off - a:off - a + size])
    return out


class RangeFile(io.RawIOBase):
    """A read-only, seekable file object over one object, for tifffile.

    Small reads (headers, IFDs, tag arrays) are served from a block cache (:data:`HEADER_BLOCK`
    bytes a block, fetched on demand); reads of prefetched ranges (:meth:`prefetch`: the compressed
    tiles of a region) are served from memory; any other large read is one range request of
    exactly its bytes. ``requests`` and ``bytes_read`` count what this file fetched.
    """

    def __init__(self, url: str, options: Mapping | None = None, *, size: int | None = None,
                 block: int = HEADER_BLOCK, blocks: "Iterable[int] | None" = None,
                 held: "Mapping[int, bytes] | None" = None, tail: bool = False):
        """``blocks``: indices of the blocks that hold the TIFF's header (:meth:`blocks_read` of an earlier
        file over the same object): fetched at once, in one batch of concurrent requests, instead of one after
        another as tifffile follows the chain of IFDs (each IFD's offset is in the one before). ``held``:
        blocks already fetched (index -> bytes; :func:`open_object`). ``tail``: nothing is known of the header,
        so the first block missed brings the block after it and the last :data:`TAIL_BLOCKS` along."""
        super().__init__()
        self.url = _strip(url)
        self.name = self.url
        self._fs = filesystem(self.url, options)
        self.size = int(size if size is not None else stat(self.url, options)[0])
        self.block = block
        self._pos = 0
        self._blocks: "OrderedDict[int, bytes]" = OrderedDict()
        self._spans: "OrderedDict[int, bytes | _Pending]" = OrderedDict()  # prefetched: start -> bytes
        self._starts: list[int] = []
        self._kept = 0
        self._lock = threading.RLock()
        self._tally_lock = threading.Lock()  # the counts (background requests count theirs on fsspec's loop)
        self.requests = 0
        self.bytes_read = 0
        self._read_blocks: dict[int, None] = {}  # block indices that small reads needed
        self._tail = tail  # the next block miss fetches the block after it and the last TAIL_BLOCKS too
        self._blocks.update(held or {})
        if blocks:
            want = sorted({int(k) for k in blocks if 0 <= int(k) * self.block < self.size} - set(self._blocks))
            with self._lock:
                self._fetch_blocks(want)

    def blocks_read(self) -> list[int]:
        """Indices of the blocks that small reads have needed so far, sorted (for a TIFF just opened: where its
        header, IFDs and tag arrays lie; pass them as ``blocks`` to open the same object again in one round)."""
        with self._lock:
            return sorted(self._read_blocks)

    def __repr__(self) -> str:
        return f"RangeFile({self.url!r})"

    # io ----------------------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.size}[whence]
        self._pos = max(0, base + int(offset))
        return self._pos

    def readinto(self, b) -> int:
        data = self.read(len(b))
        n = len(data)
        memoryview(b).cast("B")[:n] = data
        return n

    def readall(self) -> bytes:
        return self.read(-1)

    def read(self, n: int = -1) -> bytes:
        with self._lock:
            start = self._pos
            end = self.size if n is None or n < 0 else min(self.size, start + n)
            if end <= start:
                return b""
            data = self._from_spans(start, end)
            if data is None:
                data = (self._from_blocks(start, end) if end - start < self.block
                        else self._in_blocks(start, end) or self._get([(start, end)])[0])
            self._pos = end
            return bytes(data)

    # fetching ----------------------------------------------------------------------------------
    def _get(self, spans: list[tuple[int, int]]) -> list[bytes]:
        data = _fetch_spans(self._fs, self.url, spans)
        self._tally(len(spans), sum(len(d) for d in data))
        return data

    def _tally(self, requests: int, nbytes: int) -> None:
        with self._tally_lock:
            self.requests += requests
            self.bytes_read += nbytes

    def _span_at(self, start: int) -> "tuple[int, bytes | _Pending] | None":
        """The prefetched span that holds (or will hold) byte ``start``: ``(its start, bytes or _Pending)``."""
        with self._lock:
            i = bisect.bisect_right(self._starts, start) - 1
            if i < 0:
                return None
            a = self._starts[i]
            return a, self._spans[a]

    def _holds(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` is prefetched or on its way (nothing waited for)."""
        got = self._span_at(start)
        if got is None:
            return False
        a, d = got
        return end <= (d.end if isinstance(d, _Pending) else a + len(d))

    def _from_spans(self, start: int, end: int) -> bytes | None:
        """``[start, end)`` from the prefetched spans, waiting for a span still on its way; None when they do not
        hold it (or its background request failed: the caller fetches it again, and a lasting error is raised there)."""
        got = self._span_at(start)
        if got is None:
            return None
        a, d = got
        if isinstance(d, _Pending):
            if end > d.end:
                return None
            try:
                data = d.future.result()
            except BaseException:  # noqa: BLE001 - failed, or cancelled by close: read again, one request
                data = None
            with self._lock:
                if self._spans.get(a) is d:
                    if data is None:
                        del self._spans[a]
                        self._kept -= d.end - a
                        self._starts = sorted(self._spans)
                    else:
                        self._spans[a] = data
                        self._kept += len(data) - (d.end - a)
            if data is None:
                return None
            d = data
        if end <= a + len(d):
            return d[start - a:end - a]
        return None

    def _from_blocks(self, start: int, end: int) -> bytes:
        first, last = start // self.block, (end - 1) // self.block
        needed = range(first, last + 1)
        missing = [k for k in needed if k not in self._blocks]
        if missing and self._tail:
            self._tail = False
            last_block = (self.size - 1) // self.block
            more = {k for k in range(last_block - TAIL_BLOCKS + 1, last_block + 1) if k > 0}
            more.add(min(last + 1, last_block))  # and the block after: the next, smaller levels' IFDs follow soon
            missing = sorted(set(missing) | (more - set(self._blocks)))
        self._fetch_blocks(missing)
        self._read_blocks.update(dict.fromkeys(needed))
        return self._joined(start, end)

    def _joined(self, start: int, end: int) -> bytes:
        """``[start, end)`` from the header's block cache, which holds each of its blocks (fewer bytes where those
        end sooner)."""
        first, last = start // self.block, (end - 1) // self.block
        data = b"".join(self._blocks[k] for k in range(first, last + 1))
        off = start - first * self.block
        return data[off:off + end - start]

    def _blocks_hold(self, start: int, end: int) -> bool:
        """Whether the header's block cache holds all of ``[start, end)`` (at the end of an object: the tail fetched
        with its header, where the smaller levels' tiles often lie). Nothing is fetched or copied."""
        first, last = start // self.block, (end - 1) // self.block
        with self._lock:
            try:
                held = sum(len(self._blocks[k]) for k in range(first, last + 1))
            except KeyError:
                return False
        return first * self.block + held >= end

    def _in_blocks(self, start: int, end: int) -> bytes | None:
        """``[start, end)`` when the header's block cache holds all of it (:meth:`_blocks_hold`), else None."""
        with self._lock:
            return self._joined(start, end) if self._blocks_hold(start, end) else None

    def _fetch_blocks(self, missing: list[int]) -> None:
        """Fetch blocks ``missing`` (sorted indices) into the block cache: neighbours in one request, the rest
        concurrently (under the lock)."""
        if not missing:
            return
        spans = _coalesce([(k * self.block, min(self.block, self.size - k * self.block)) for k in missing], 0, 0.0)
        for (a, b), d in zip(spans, self._get(spans)):
            for k in range(a // self.block, (b - 1) // self.block + 1):
                self._blocks[k] = d[k * self.block - a:(k + 1) * self.block - a]
        while len(self._blocks) > 64:
            self._blocks.popitem(last=False)

    def pread(self, n: int, offset: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (fewer only past the end of the object), without moving the
        file position (like ``os.pread``): from the prefetched ranges or the header's blocks, else one range
        request of exactly these bytes. Safe to call from several threads. A bytes-like object: ``bytes``, or a
        slice of a prefetched request's buffer (no copy)."""
        start, end = int(offset), min(self.size, int(offset) + int(n))
        if end <= start:
            return b""
        data = self._from_spans(start, end)
        if data is not None:
            return data
        return self._in_blocks(start, end) or self._get([(start, end)])[0]

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Fetch the ``(offset, size)`` ranges not already held (prefetched, or in the header's blocks), near ones
        in one request; later reads of them are served from memory (the oldest prefetched bytes beyond
        :data:`PREFETCH_KEEP` are dropped). Ranges are cut at the end of the object (a truncated object: its readers
        find the bytes short).

        On an async filesystem (S3, GCS, Azure) this returns at once: the requests go out in the background in the
        order of ``ranges`` (give them in the order they will be read), :data:`PIPELINE_IN_FLIGHT` at a time and of
        at most :data:`PIPELINE_SPAN` bytes each, and a read of a range waits only for the request that brings it, so
        the first tiles are decoded while later ones arrive. Elsewhere it returns when all are here."""
        with self._lock:
            ranges = [(o, min(s, self.size - o)) for o, s in ranges]
            want = [(o, s) for o, s in ranges  # in the order of reading
                    if s > 0 and not self._holds(o, o + s) and not self._blocks_hold(o, o + s)]
            if not want:
                return
            background = bool(getattr(self._fs, "async_impl", False)) and PIPELINE_IN_FLIGHT > 0
            spans = _coalesce(want, largest=PIPELINE_SPAN if background else MAX_REQUEST)
            got = self._start(spans, _first_needed(spans, want)) if background else self._get(spans)
            for (a, b), d in zip(spans, got):
                self._spans[a] = d
                self._kept += b - a if isinstance(d, _Pending) else len(d)
            while self._kept > PREFETCH_KEEP and len(self._spans) > len(spans):
                a, old = self._spans.popitem(last=False)
                if isinstance(old, _Pending):
                    old.future.cancel()
                    self._kept -= old.end - a
                else:
                    self._kept -= len(old)
            self._starts = sorted(self._spans)

    def _start(self, spans: list[tuple[int, int]], order: list[int]) -> "list[_Pending]":
        """Send the requests of ``spans`` on the filesystem's event loop (one hand-over for all of them), at most
        :data:`PIPELINE_IN_FLIGHT` at a time, in the order of the span indices ``order``; each span's bytes arrive in
        its :class:`_Pending`. A failed request leaves its error there (the read that needs the span fetches it
        again, and reports it)."""
        import asyncio
        import concurrent.futures

        fs, url = self._fs, self.url
        native = _native(fs)
        pending = [_Pending(b, concurrent.futures.Future()) for _, b in spans]

        async def one(gate, a: int, b: int, fut) -> None:
            async with gate:
                if not fut.set_running_or_notify_cancel():  # dropped or closed before it was sent
                    return
                try:
                    if native is not None:
                        data = await _native_span(native, url, a, b)
                    else:
                        data = bytes(await fs._cat_file(url, start=a, end=b))
                except BaseException as exc:  # noqa: BLE001 - kept for the reader
                    fut.set_exception(exc)
                    return
            _count(1, len(data))
            self._tally(1, len(data))
            fut.set_result(data)

        async def all_of() -> None:
            gate = asyncio.Semaphore(PIPELINE_IN_FLIGHT)
            await asyncio.gather(*(one(gate, *spans[i], pending[i].future) for i in order))

        asyncio.run_coroutine_threadsafe(all_of(), fs.loop)
        return pending

    def close(self) -> None:
        with self._lock:
            for d in self._spans.values():
                if isinstance(d, _Pending):
                    d.future.cancel()
            self._spans.clear()
            self._starts = []
            self._kept = 0
        super().close()


def _first_needed(spans: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> list[int]:
    """Indices of ``spans`` (sorted ``(start, end)``) in the order ``ranges`` (``(offset, size)``, in the order they
    will be read) first fall in them; spans no range falls in last."""
    starts = [a for a, _ in spans]
    first: dict[int, None] = {}
    for off, _ in ranges:
        first.setdefault(bisect.bisect_right(starts, off) - 1, None)
    return [i for i in first if i >= 0] + [i for i in range(len(spans)) if i not in first]


@dataclass
class _Pending:
    """A prefetched span on its way: it ends at ``end``; ``future`` gets its bytes."""

    end: int
    future: "object"


TAIL_BLOCKS = 2
"""Blocks at the end of an object fetched with the first block missed after the first one (and the block after
that one), when it is opened with nothing known of it: TIFF writers (Aperio's, tifffile's) put each IFD after
its image's data, so the IFDs of the smaller levels follow soon after the first, and the last are often at
the end."""


def open_object(url: str, options: Mapping | None = None, *, identity: tuple[int, str] | None = None,
                blocks: "Iterable[int] | None" = None) -> tuple[RangeFile, tuple[int, str]]:
    """A :class:`RangeFile` over ``url`` with its header's first bytes in hand, and the object's ``(size, etag)``,
    in one round of concurrent requests: the look-up (HEAD; none when ``identity`` is given) and the blocks
    ``blocks`` (where the header lies, from an earlier open), or else the first block (and the file's first
    miss after it brings the block after it and the last :data:`TAIL_BLOCKS` along). A failed look-up is an :class:`InputError` as in
    :func:`stat`; a failed block is fetched again when it is read (where its error is raised). No suffix
    range (``bytes=-N``): not every S3 server answers one right (s3rver 3.7.1 sends the wrong bytes)."""
    url = _strip(url)
    fs = filesystem(url, options)
    block = HEADER_BLOCK
    want = sorted({int(k) for k in blocks}) if blocks else None
    if not getattr(fs, "async_impl", False):  # one request after another
        size, etag = identity if identity is not None else stat(url, options)
        return RangeFile(url, options, size=size, blocks=want if want is not None else [0]), (size, etag)
    spans = _coalesce([(k * block, block) for k in want], 0, 0.0) if want is not None else [(0, block)]
    got = _one_round(fs, url, spans, look_up=identity is None, options=options)
    if identity is None:
        i = got.pop()
        if isinstance(i, BaseException):
            raise _input_error(i, url, "looking up the input", options) from None
        if i.get("type") == "directory":
            raise InputError("is a prefix (folder), not a slide object", path=url, hint="give the slide's URL")
        identity = (int(i.get("size") or 0), _etag(i))
    size = identity[0]
    held: dict[int, bytes] = {}
    fetched = [bytes(d) for d in got if not isinstance(d, BaseException)]
    for (a, b), d in zip(spans, got):
        if isinstance(d, BaseException) or not d:
            continue
        end = a + len(d)
        for k in range(a // block, (end - 1) // block + 1):  # the whole blocks of [a, end) (cut at the object's end)
            if min(size, (k + 1) * block) <= end:
                held[k] = bytes(d[k * block - a:(k + 1) * block - a])
    _count(len(fetched), sum(len(d) for d in fetched))
    f = RangeFile(url, options, size=size, held=held, blocks=want, tail=want is None)
    f._tally(len(fetched), sum(len(d) for d in fetched))
    return f, identity


def _one_round(fs, url: str, spans: list[tuple[int, int]], *, look_up: bool, options: Mapping | None) -> list:
    """The bytes of each ``(start, end)`` span of ``url`` and, with ``look_up``, its info last, all requested at
    once on the filesystem's event loop; a failed request's exception in its place."""
    import asyncio

    from fsspec.asyn import sync

    native = _native(fs) if spans else None
    tried = look_up and native is not None and len(spans) == 1  # the spans and the look-up in one native GET
    errors: list[BaseException] = []
    if tried:
        try:
            return _native_first(native, url, *spans[0])
        except Exception as exc:  # noqa: BLE001 - s3fs's round below says what is wrong (missing, a prefix, empty...)
            if not not_found(exc):
                _native_failed(exc, url)
                errors.append(exc)

    async def spans_of() -> list:
        if native is not None and not tried:
            try:
                return await _native_spans(native, url, spans)
            except Exception as exc:  # noqa: BLE001 - s3fs reads them again
                _native_failed(exc, url)
                errors.append(exc)
        got = await asyncio.gather(*(fs._cat_file(url, start=a, end=b) for a, b in spans), return_exceptions=True)
        if native is not None and _whole(got, spans):
            _native_served(fs, native, errors[0] if errors else None)
        return got

    async def nothing() -> None:
        return None

    async def one_round():
        got, info = await asyncio.gather(spans_of(), fs._info(url) if look_up else nothing(), return_exceptions=True)
        got = got if isinstance(got, list) else [got] * len(spans)
        return [*got, info] if look_up else got

    try:
        return sync(fs.loop, one_round)
    except Exception as exc:  # noqa: BLE001 - the loop itself
        raise _input_error(exc, url, "looking up the input", options) from None


def read_head(url: str, n: int, options: Mapping | None = None) -> bytes:
    """The first ``n`` bytes of the object (one request)."""
    url = _strip(url)
    return _fetch_spans(filesystem(url, options), url, [(0, n)])[0]


# --------------------------------------------------------------------------------------------
# staging (formats only OpenSlide reads)
# --------------------------------------------------------------------------------------------

def stage_dir() -> Path:
    """The staging cache of this machine: ``$CANCERNET_STAGE_DIR``, else ``TMPDIR/cancernet-stage-UID``."""
    env = os.environ.get("CANCERNET_STAGE_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"cancernet-stage-{os.getuid()}"


def _tree_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _lock(path: Path, mode: int, block: bool = True) -> int | None:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode | (0 if block else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        if block:
            raise
        return None
    return fd


class Staged:
    """A local copy of an object in the staging cache, held (shared lock) until :meth:`release`. ``together``:
    ``{url: info}`` of the objects staged with it in one folder (a DICOM object's, :func:`dicom_folder`), else empty."""

    def __init__(self, path: Path, fd: int, limit: int, together: dict[str, dict] | None = None):
        self.path, self._fd, self._limit, self.together = path, fd, limit, together or {}

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            evict(self._limit)

    def __del__(self):  # noqa: D105
        with contextlib.suppress(Exception):
            if self._fd is not None:
                os.close(self._fd)


def _download(fs, url: str, dest: Path, together: Iterable[str] = ()) -> None:
    """``url`` into ``dest`` (a new folder), with the objects ``together`` (a DICOM object's folder; fetched
    concurrently); a MIRAX ``.mrxs`` brings its data folder (same stem) along."""
    name = url.rsplit("/", 1)[-1]
    others = [u for u in together if u != url]
    if others:
        fs.get([url, *others], [str(dest / u.rsplit("/", 1)[-1]) for u in (url, *others)])
        return
    fs.get_file(url, str(dest / name))
    if name.lower().endswith(".mrxs"):
        folder = url[: -len(".mrxs")]
        if fs.isdir(folder):
            fs.get(folder + "/", str(dest / name[: -len(".mrxs")]) + "/", recursive=True)


def stage(url: str, options: Mapping | None = None, *, limit_gb: float | None = None, etag: str | None = None) -> Staged:
    """A local copy of the object ``url`` in this machine's staging cache (see the module doc).

    Entries are keyed by URL and ETag (a changed object is a new entry). A DICOM object (``*.dcm``) is staged
    with the other DICOM objects of its folder (:func:`dicom_folder`, one LIST), where OpenSlide looks for the
    other instances of its series: one entry for the folder, keyed by its objects' names and ETags, shared by
    the instances in it; :class:`InputError` when they are more than the cache holds. The copy is held until
    :meth:`Staged.release`; then, if the cache is over ``limit_gb``, entries nobody holds are removed,
    oldest first. Threads and processes staging the same object wait for one download.
    """
    import fcntl

    url = _strip(url)
    limit = int((DEFAULT_STAGE_GB if limit_gb is None else limit_gb) * 1024 ** 3)
    name = url.rsplit("/", 1)[-1]
    together = dicom_folder(url, options) if name.lower().endswith(DICOM_SUFFIX) else {}
    if url not in together or len(together) < 2:  # not a DICOM object, or the only one in its folder
        together = {}
    if together:
        size, digest = identity(together)
        if size > limit:
            raise InputError(f"is a DICOM object among {len(together)} in its folder ({size / 1024 ** 3:.3g} GB), "
                             f"more than the staging cache holds ({limit / 1024 ** 3:.3g} GB): OpenSlide finds a "
                             f"DICOM slide's instances beside it, so the folder is staged whole", path=url,
                             hint="keep each DICOM slide's files in a folder of their own (as DICOM exports do), "
                                  "or raise --stage-cache-gb")
        key = hashlib.sha256(f"{url.rsplit('/', 1)[0]}\0{digest}".encode()).hexdigest()[:24]
    else:
        if etag is None:
            etag = stat(url, options)[1]
        key = hashlib.sha256(f"{url}\0{etag}".encode()).hexdigest()[:24]
    root = stage_dir()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    entry, lockfile = root / key, root / f"{key}.lock"
    fs = filesystem(url, options)
    while True:
        fd = _lock(lockfile, fcntl.LOCK_SH)  # waits only while another task downloads it
        if (entry / name).exists():
            os.utime(entry)
            return Staged(entry / name, fd, limit, together)
        os.close(fd)
        # exclusive to download it, without waiting: another task may have just staged it and hold it (shared,
        # for as long as its reader is open), or be between the two locks above; then look again
        fd = _lock(lockfile, fcntl.LOCK_EX, block=False)
        if fd is None:
            time.sleep(0.02)
            continue
        try:
            if not (entry / name).exists():
                evict(limit, keep=key)  # room first, before this download
                tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
                try:
                    log.debug("%s: staging to the local cache", url)
                    _call(url, "staging the input", _download, fs, url, tmp, together)
                    shutil.rmtree(entry, ignore_errors=True)
                    os.rename(tmp, entry)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
            fcntl.flock(fd, fcntl.LOCK_SH)  # held while in use: never evicted under a reader
        except BaseException:
            os.close(fd)
            raise
        if (entry / name).exists():  # an evictor may have slipped in while the lock was converted
            os.utime(entry)
            return Staged(entry / name, fd, limit, together)
        os.close(fd)


def evict(limit: int, *, keep: str | None = None) -> int:
    """Remove staged entries nobody holds, oldest first, until the cache holds at most ``limit`` bytes
    (every unheld one for ``limit=0``). Returns how many were removed."""
    import fcntl

    root = stage_dir()
    if not root.is_dir():
        return 0
    entries = []
    for p in root.iterdir():
        if p.is_dir() and not p.name.startswith(".tmp-"):
            with contextlib.suppress(OSError):
                entries.append((p.stat().st_mtime, p, _tree_size(p)))
    total = sum(s for _, _, s in entries)
    removed = 0
    for _, p, size in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if p.name == keep:
            continue
        fd = _lock(root / f"{p.name}.lock", fcntl.LOCK_EX, block=False)
        if fd is None:
            continue  # in use
        try:
            shutil.rmtree(p, ignore_errors=True)
            total -= size
            removed += 1
        finally:
            os.close(fd)
    # temporary folders of killed downloads (older than an hour)
    for p in root.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if time.time() - p.stat().st_mtime > 3600:
                shutil.rmtree(p, ignore_errors=True)
    return removed


def clear_stage_cache() -> int:
    """Remove every staged copy nobody holds (the end of a run); returns how many."""
    return evict(0)
