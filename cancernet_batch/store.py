"""The run's tile store: ``RUN/tiles.zarr`` (zarr v3 on local disk), one group per input.

Layout (schema version :data:`SCHEMA_VERSION`)::

    RUN/tiles.zarr/                     group; attrs: schema_version, tile_size
      inputs/<input_id>/                one group per input (slide or patient folder)
        tiles    (N, 50, 50, 3) uint8   chunks (C, 50, 50, 3): one chunk = one unit of work
        coords   (N, 2) int32           (row, col) on the input's model grid, chunks (C, 2)
        labels   (N,) int8              patient folders only: 0/1, -1 unknown
        tiled    (nchunks,) bool        one flag per tile chunk, set after its tiles are written
                                        (lets an interrupted ``tile`` finish only missing chunks)
        tissue   (rows, cols) float32   slides only: tissue fraction of every grid tile
        thumbnail (rows*k, cols*k, 3) uint8  slides only: the low-resolution view on the grid,
                                        k = attrs.extra.tissue_px_per_tile px per tile
        probs    (N,) float32           written by ``predict``, chunks (C,), NaN until scored
        done     (nchunks,) bool        one flag per tile chunk, each flag its own zarr chunk
        attrs    see :class:`InputAttrs`; ``complete`` is set last, when tiling finished

Writes of whole zarr chunks are atomic on a local store (zarr writes a temporary file and renames
it), and each task writes only its own chunks, so concurrent workers never race and a killed run
leaves no half-written chunk. The order "probs chunk, then its done flag" makes a done flag
proof that its probabilities are on disk. ``complete`` (tiling) and the probs' ``model_id``
(prediction) tell a re-run what it can skip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import PATCH_SIZE
from .atomic import is_temp_name, remove_stale_temps
from .errors import CancerNetError, StorageError, printable

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
from .config import DEFAULT_CHUNK  # noqa: E402,F401 - tiles per chunk, defined with the other settings

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def input_key(source: str | os.PathLike) -> str:
    """What identifies an input: its real path (absolute, symbolic links resolved).

    Reports show the path the user gave (links kept); two paths with the same key (a link and its
    target) are the same input: one group, one row.
    """
    from .remote import is_url

    if is_url(source):
        return os.fspath(source).rstrip("/")  # an object on object storage: its URL
    return os.path.realpath(source)  # Path.resolve() without its RuntimeError on a symlink loop


def input_id(source: str | os.PathLike) -> str:
    """A stable, filesystem-safe group name for an input: ``<sanitised stem>-<8 hex of its real path>``.

    The same file reached through a link or directly gets the same id (:func:`input_key`).
    Separators, ``..`` and odd characters in names never reach the store's paths; names that are
    not UTF-8 (any POSIX bytes) are hashed as the bytes they are.
    """
    from .remote import is_url

    if is_url(source):
        key = input_key(source)
        name = key.rsplit("/", 1)[-1]
        stem = _SAFE.sub("_", name.rsplit(".", 1)[0] if "." in name else name).strip("._-")[:60] or "input"
        return f"{stem}-{hashlib.sha256(key.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
    p = Path(input_key(source))
    stem = _SAFE.sub("_", p.name if p.is_dir() else p.stem).strip("._-")[:60] or "input"
    return f"{stem}-{hashlib.sha256(os.fsencode(str(p))).hexdigest()[:8]}"  # any bytes a name may hold


@dataclass(frozen=True)
class InputAttrs:
    """What tiling recorded about one input (the group's zarr attrs)."""

    source: str
    kind: str  # "slide" | "patches"
    reader: str
    patient: str
    source_size: int
    source_mtime: float
    target_mpp: float
    grid_shape: tuple[int, int]
    n_tiles: int
    n_background: int = 0
    source_mpp: float | None = None
    level: int = 0
    level_downsample: float = 1.0
    tile_size: int = PATCH_SIZE
    level0_tile_px: float = 0.0  # side of one model tile in level-0 pixels (GeoJSON, maps)
    tissue_threshold: float | None = None
    tissue_fraction: float | None = None
    vendor: str | None = None
    extra: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        d = asdict(self)
        d["grid_shape"] = list(self.grid_shape)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "InputAttrs":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["grid_shape"] = tuple(known.get("grid_shape", (0, 0)))
        return cls(**known)


def open_input(location, gid: str, mode: str = "r+", *, cache_key=None):
    """The group of one input of the tile store at ``location``, for tasks on workers.

    Unlike :func:`open_root` it removes no temporary files: other workers are writing beside it,
    and their in-flight ``*.partial`` files are not stale. Use :meth:`Run.open_input
    <cancernet_batch.runfolder.Run.open_input>`.

    ``location`` may be a callable that returns it (made only when needed). With ``cache_key`` (a
    hashable name of the store: its URL and the options that reach it) the group comes from this
    process's :class:`_OpenInputs` cache: one read of the group's ``zarr.json`` per call instead of
    the root's, ``inputs``' and each array's (see there for why it is never stale).
    """
    if cache_key is not None:
        return _OPEN_INPUTS.get(location, (cache_key, gid, mode))
    return _open_input_plain(location, gid, mode)


_INPUTS_GROUPS: dict = {}
_INPUTS_GROUPS_LOCK = threading.Lock()


def open_inputs_group(open_root_fn, cache_key):
    """The store's ``inputs`` group for tasks on workers, kept per process under ``cache_key``: the root's and
    ``inputs``' documents are read by a process's first task only (on object storage two round trips a task
    less). A handle only: every lookup through it reads its member's document from the store, and what it
    writes goes to the store (a store made again at the same place is the same place)."""
    with _INPUTS_GROUPS_LOCK:
        inputs = _INPUTS_GROUPS.get(cache_key)
    if inputs is None:
        inputs = open_root_fn()["inputs"]
        with _INPUTS_GROUPS_LOCK:
            _INPUTS_GROUPS[cache_key] = inputs
            while len(_INPUTS_GROUPS) > 16:
                _INPUTS_GROUPS.pop(next(iter(_INPUTS_GROUPS)))
    return inputs


def _open_input_plain(location, gid: str, mode: str):
    import zarr

    return zarr.open_group(_zarr_location(location), mode=mode, zarr_format=3)[f"inputs/{gid}"]


# arrays whose whole metadata (shape, chunks, dtype, fill value, attributes) follows from the input
# group's own attrs (n_tiles, chunk, grid_shape, extra): a group document read again and found
# byte-identical proves a cached handle of one of them still right. ``probs`` (its attrs name the
# model) and the report's maps are not among them: they are looked up afresh every time.
_STABLE_ARRAYS = frozenset({"tiles", "coords", "labels", "tiled", "done", "tissue", "thumbnail"})

ARRAY_DOCS = "_cancernet_arrays"
"""The input group's attribute that holds, as one JSON text, the metadata documents (``zarr.json``) of the
:data:`_STABLE_ARRAYS` made with it (:func:`create_input`), and of ``probs`` when it is made with them: a worker's
first task on an input builds their handles from the group's document it reads anyway, instead of a GET of each
array's document, one after another (on object storage a round trip each, in each worker process, for every
input). ``probs``' document serves its chunk data only (:meth:`_TaskGroup.data`): its attributes name the model,
which ``--rescore`` replaces without rewriting the group, so they are always read from its own document. The
arrays' own documents are written as always; any zarr reader reads the store as before."""
_DOCUMENTED = _STABLE_ARRAYS | {"probs"}


class _OpenInputs:
    """Per-process cache of the input groups worker tasks open: metadata only, never chunk data.

    Each task (a tile chunk, a score chunk, a report part) opened the store's root, its ``inputs``
    group, its input's group and then each array it touched: on object storage one GET (and HEADs)
    each, some 10 round trips per task before any tile moved. Here a task reads its group's
    ``zarr.json`` once (one GET); when those bytes are the ones cached, the group is made from them
    and the handles of its :data:`_STABLE_ARRAYS` are reused. Any change of the group's document
    (re-tiled: other attrs; ``complete`` set; report attrs) makes new handles; an array that was
    missing is never cached (a later lookup finds it once created); done flags, tiles and
    probabilities are chunk data, always read from the store. Any problem reading the document falls
    back to the plain open, which raises the usual clear errors.
    """

    MAX = 256

    def __init__(self) -> None:
        import threading
        from collections import OrderedDict

        self._entries: OrderedDict = OrderedDict()  # key -> (store_path, raw, {name: array})
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get(self, location, key):
        _, gid, mode = key
        with self._lock:
            entry = self._entries.get(key)
        try:
            if entry is None:
                store_path = _input_store_path(location, gid, mode)
                nodes: dict = {}
            else:
                store_path, old_raw, nodes = entry
            raw = _read_group_doc(store_path)
            if raw is None:
                raise KeyError(gid)
            group = _group_from_doc(store_path, raw)
            if entry is None or raw != old_raw:
                nodes = _documented_arrays(store_path, group)
        except Exception:  # noqa: BLE001 - the plain open says what is wrong, as it always did
            with self._lock:
                self._entries.pop(key, None)
            return _open_input_plain(location, gid, mode)
        if "chunk" in group.attrs:  # a group whose arrays are all made (create_input sets attrs last)
            with self._lock:
                self._entries[key] = (store_path, raw, nodes)
                self._entries.move_to_end(key)
                while len(self._entries) > self.MAX:
                    self._entries.popitem(last=False)
        return _TaskGroup(group, nodes)


_OPEN_INPUTS = _OpenInputs()


def _documented_arrays(store_path, group) -> dict:
    """``{name: array}`` of the stable arrays whose documents the group's :data:`ARRAY_DOCS` attribute holds, made
    from them with no request (``probs``: under ``("data", "probs")``, for its chunk data only); an entry zarr does
    not accept is left out (looked up in the store as before)."""
    from zarr import Array
    from zarr.core.array import AsyncArray
    from zarr.core.metadata import ArrayV3Metadata

    docs = group.attrs.get(ARRAY_DOCS)
    out: dict = {}
    try:
        docs = json.loads(docs) if isinstance(docs, str) else docs
    except ValueError:
        return out
    if not isinstance(docs, dict):
        return out
    for name, doc in docs.items():
        if name not in _DOCUMENTED or not isinstance(doc, dict):
            continue
        try:
            array = Array(AsyncArray(metadata=ArrayV3Metadata.from_dict(dict(doc)), store_path=store_path / name))
            out[name if name in _STABLE_ARRAYS else ("data", name)] = array
        except Exception:  # noqa: BLE001 - read from the store, which says what is wrong with it
            continue
    return out


def _input_store_path(location, gid: str, mode: str):
    from zarr.core.sync import sync
    from zarr.storage._common import make_store_path

    return sync(make_store_path(_zarr_location(location), mode=mode)) / f"inputs/{gid}"


def _read_group_doc(store_path) -> bytes | None:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    buf = sync((store_path / "zarr.json").get(prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def member_attributes(group, paths: list[str]) -> dict[str, dict | None]:
    """``{path: attributes}`` of the nodes at ``paths`` under ``group``, each ``zarr.json`` read once and all of them
    at once (on object storage one round of concurrent GETs, where a lookup of each node, ``name in g`` then
    ``g[name]``, costs two requests one after another: a thousand inputs' predictions, minutes at S3's latency);
    None for a path with no node or a document that cannot be read (the usual lookups then say what is wrong)."""
    import asyncio

    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    where = group.store_path  # a NodeCache's too (its group's)

    async def one(path: str):
        buf = await (where / path / "zarr.json").get(prototype=default_buffer_prototype())
        try:
            doc = None if buf is None else json.loads(buf.to_bytes())
        except ValueError:
            return None
        return doc.get("attributes", {}) if isinstance(doc, dict) else None

    async def every() -> list:
        return await asyncio.gather(*(one(p) for p in paths))

    return dict(zip(paths, sync(every()))) if paths else {}


def _group_from_doc(store_path, raw: bytes):
    import zarr
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.group import AsyncGroup

    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        raise ValueError("not a zarr v3 group document")
    return zarr.Group(AsyncGroup._from_bytes_v3(store_path, default_buffer_prototype().buffer.from_bytes(raw),
                                                use_consolidated=False))


def _zarr_location(location):
    """What ``zarr.open_group`` takes: a local path as a string, a store object (object storage) as it is;
    ``location`` may be a callable that makes it (called here, only when a store is opened)."""
    location = location() if callable(location) else location
    return str(location) if isinstance(location, (str, os.PathLike)) else location


def open_root(location: str | os.PathLike, mode: str = "a", *, run_dir: str | os.PathLike | None = None,
              clean: bool = True):
    """Open (or create, with ``mode='a'``) the tile store's root group at ``location``.

    Use :meth:`Run.open_store <cancernet_batch.runfolder.Run.open_store>`; ``run_dir`` names the run
    folder in messages.
    """
    import zarr

    if not isinstance(location, (str, os.PathLike)):  # a zarr store object (object storage): no local files
        root = _open_remote_root(location, mode, run_dir)
        if root is None:  # zarr's own way, and its errors (a damaged or foreign document, no store to read)
            root = zarr.open_group(location, mode=mode, zarr_format=3)
        return _schema_checked(root, mode, run_dir)
    path = Path(location)
    if mode == "r" and (not path.exists() or creation_cut_short(path)):
        raise _no_store(run_dir or path.parent)
    try:
        root = zarr.open_group(str(path), mode=mode, zarr_format=3)
    except (OSError, PermissionError) as exc:
        raise StorageError(f"cannot open tile store: {exc}", path=path,
                           hint="check that the run folder is writable and not full") from exc
    if mode != "r" and clean:
        # a run killed mid-write leaves temporary "*.partial" files beside group documents and in its arrays' folders:
        # their documents, their chunks (a chunk task's tiles, up to 7.7 MB each) and flags, which since CHUNK_KEYS
        # lie in the array's own folder (an older store's nested chunk folders are left as they were)
        inputs_dir = path / "inputs"
        groups = _subfolders(inputs_dir)
        remove_stale_temps(path, inputs_dir, *groups, *(a for d in groups for a in _subfolders(d)))
    return _schema_checked(root, mode, path)


def _subfolders(folder: Path) -> list[Path]:
    """The folders in ``folder`` (none when it is not one), from one listing: the entries' types come with it, no
    ``stat`` each."""
    try:
        with os.scandir(folder) as it:
            return [Path(e.path) for e in it if e.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _no_store(where) -> StorageError:
    """The error of a run folder with no tile store to read (local disk or object storage alike)."""
    return StorageError("no tiles.zarr in this run folder", path=where, hint="run `cancernet tile INPUT... --out RUN` first")


_SCHEMA_STAMP = {"schema_version": SCHEMA_VERSION, "tile_size": PATCH_SIZE}
"""The root's attributes that say which tool's layout a tile store holds."""


def _open_remote_root(location, mode: str, run_dir=None):
    """The root group on object storage from one GET of its document; a new store (``mode='a'``) made with its
    schema stamp and its ``inputs`` group in one round of PUTs. ``zarr.open_group`` spends four requests one after
    another on a new root (two GETs of the absent document, its PUT, then the stamp's PUT) and four more on
    ``inputs``: at a real endpoint's tens of ms each, the start of every run. No document to read (``mode='r'``):
    the clear error, from that one GET (a look-up before it was one request more). None: leave it to zarr (a
    document that is not a v3 group, or a store that is not there to write into)."""
    from zarr.core.group import GroupMetadata
    from zarr.core.sync import sync
    from zarr.storage._common import make_store_path

    if mode not in ("a", "r", "r+"):
        return None
    store_path = sync(make_store_path(location, mode=mode))
    raw = _read_group_doc(store_path)
    if raw is not None:
        try:
            return _group_from_doc(store_path, raw)
        except ValueError:
            return None
    if mode == "r":
        raise _no_store(run_dir or location)
    if mode != "a":
        return None

    made = _write_nodes(store_path, {"": GroupMetadata(attributes=dict(_SCHEMA_STAMP)), "inputs": GroupMetadata()})
    return made[""]


def _schema_checked(root, mode: str, where):
    """``root``, stamped with this tool's schema version when new; a store of another version is refused."""
    if mode != "r" and "schema_version" not in root.attrs:
        root.update_attributes(dict(_SCHEMA_STAMP))
    version = root.attrs.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise StorageError(f"tile store has schema version {version}, this tool reads {SCHEMA_VERSION}",
                           path=where, hint="re-tile into a new run folder")
    return root


_METADATA_TEMPLATES: dict = {}
_TEMPLATED = frozenset({"shape", "chunks", "dtype", "fill_value", "attributes", "compressors"})
CHUNK_KEYS = {"name": "default", "separator": "."}
"""The chunk key encoding of the arrays this tool makes (zarr v3's ``default`` encoding, its other separator): chunk
``(1, 0, 0, 0)`` of ``tiles`` is the file ``tiles/c.1.0.0.0``, not ``tiles/c/1/0/0/0``. Every chunk in its array's own
folder: no folder made per chunk (on a cluster's shared file system each is a metadata operation of its own; on this
project's test VM an input's group takes about 3 CPU ms less, a chunk with its flag 0.3-1 ms less:
``benchmarks/store_layout.py``, RESULTS.md section 9). Each array's document states its encoding: zarr reads both,
and stores made before keep theirs. Keys on object storage have no folders either way."""


def _array_metadata(**kwargs):
    """The metadata document that ``group.create_array(**kwargs)`` would write (with this tool's chunk keys,
    :data:`CHUNK_KEYS`, unless ``kwargs`` names others): made by zarr itself, on an in-memory store (no request), so
    that :func:`create_arrays` writes exactly what ``create_array`` does.

    zarr's own call (about 0.5 ms, five times per slide) is made once per kind of array (dtype, fill value,
    number of dimensions, compressors); each array of that kind is that template with its own shape, chunk shape and
    attributes (a frozen dataclass replaced field by field, about 0.05 ms). ``tests/test_store_create.py``
    checks the documents against zarr's for each kind and several shapes. Any other argument: zarr's call.
    """
    import dataclasses

    import zarr
    from zarr.storage import MemoryStore

    shape, chunks = kwargs.get("shape"), kwargs.get("chunks")
    if not (set(kwargs) <= _TEMPLATED and isinstance(shape, tuple) and isinstance(chunks, tuple)
            and len(shape) == len(chunks)):
        return zarr.create_array(MemoryStore(), **{"chunk_key_encoding": CHUNK_KEYS, **kwargs}).metadata
    fill = kwargs.get("fill_value")
    key = (str(np.dtype(kwargs["dtype"])), repr(fill), type(fill).__name__, len(shape), repr(kwargs.get("compressors")))
    template = _METADATA_TEMPLATES.get(key)
    if template is None:
        kind = {k: v for k, v in kwargs.items() if k != "attributes"}
        template = _METADATA_TEMPLATES[key] = zarr.create_array(MemoryStore(), **kind,
                                                                chunk_key_encoding=CHUNK_KEYS).metadata
    from zarr.core.chunk_grids import RegularChunkGrid

    return dataclasses.replace(template, shape=tuple(int(v) for v in shape),
                               chunk_grid=RegularChunkGrid(chunk_shape=tuple(int(v) for v in chunks)),
                               attributes=dict(kwargs.get("attributes") or {}))


def create_arrays(group, arrays: dict[str, dict], *, groups: tuple[str, ...] = (), overwrite: bool = False,
                  absent: bool = False, data: dict[str, np.ndarray] | None = None) -> dict:
    """Create the arrays ``{name: create_array keyword arguments}`` (and the empty ``groups``) under ``group``
    at once, with zarr's ``create_hierarchy``; returns ``{name: node}``.

    ``group.create_array`` checks, for every array, that no node is there and that each parent group's
    ``zarr.json`` exists (on object storage: a GET of the node and of each parent, a HEAD of each parent,
    then the PUT, one array after the other: 8 requests and three round trips an array). Here one batch
    of concurrent GETs checks all the new nodes and their parents, then one batch of concurrent PUTs
    writes their documents (two round trips in all, no HEAD). An existing node is an error as with
    ``create_array``, unless ``overwrite`` (then it is removed first, as ``create_array(overwrite=True)``
    does). Metadata only: no chunk is written. ``group`` may be a :class:`NodeCache`, which learns the new
    nodes.

    ``absent``: the caller has just seen ``group`` (it exists) and that none of the nodes is there (looked
    up, or its place emptied): the checks are skipped and the documents are written at once
    (:func:`_write_nodes`, what zarr's ``create_nodes`` writes, as ``create_hierarchy`` ends): one batch of PUTs,
    no GET; on disk in this thread, each file renamed into place. Each node's parent must be ``group`` or one of
    ``groups``.

    ``data``: ``{name: values}`` of arrays to fill whole. With ``absent``, their chunks are encoded here
    (:func:`_encode_whole`) and written in the documents' batch, before the documents (on disk: an array's document
    is never there without its chunks); otherwise written through zarr after the creation.
    """
    from zarr.core.group import GroupMetadata

    nodes = {name: GroupMetadata() for name in groups}
    nodes.update({name: _array_metadata(**kw) for name, kw in arrays.items()})
    target = group._group if isinstance(group, NodeCache) else group
    data = data or {}
    if set(data) - set(arrays):
        raise ValueError(f"data for arrays not made here: {sorted(set(data) - set(arrays))}")
    if absent and not overwrite:
        made = _create_nodes(target, nodes, data)
    else:
        made = dict(target.create_hierarchy(nodes, overwrite=overwrite))
        for name, values in data.items():  # every chunk stored, as on the batch path
            made[name].with_config({"write_empty_chunks": True})[...] = values
    if isinstance(group, NodeCache):
        for name, node in made.items():
            group._remember(name, node)
    return made


def _create_nodes(group, nodes: dict, data: dict | None = None) -> dict:
    """Write the metadata documents ``{name: metadata}`` under ``group`` with no lookup, and the chunks of ``data``
    (see :func:`create_arrays`); ``{name: node}``."""
    for name in nodes:
        parent = name.rpartition("/")[0]
        if parent and parent not in nodes:
            raise ValueError(f"{name}: its parent {parent!r} is neither the group nor a node made with it")
    return _write_nodes(group.store_path, nodes, data)


def _write_nodes(where, metas: dict, data: dict | None = None, dicts: dict | None = None) -> dict:
    """Write the nodes ``{name under the store path where ("": where itself): metadata}`` in one batch
    (:func:`_write_objects`), with no lookup: their documents, as zarr's ``create_nodes`` writes them, after the
    chunks of the arrays in ``data`` (``{name: values}``, encoded whole: :func:`_encode_whole`). ``dicts``: arrays'
    ``metadata.to_dict()`` made already. ``{name: node}``.

    The documents of zarr v3 arrays and groups are compact JSON (:func:`_compact_json`): the same
    documents as zarr's, which indents them (its ``json_indent``) and so encodes them with Python's pure-Python
    JSON encoder; compact, Python's C encoder writes them. ``create_input`` took 5.0-5.9 CPU ms a 20,000 px synthetic
    slide against 6.3-6.7 indented (RESULTS.md section 9, 2026-12-07 18:42). zarr reads either."""
    from zarr import Array, Group
    from zarr.core.array import AsyncArray
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.group import AsyncGroup, GroupMetadata

    def key(name: str, rest: str) -> str:
        return f"{name}/{rest}" if name else rest

    proto = default_buffer_prototype()
    objects: dict[str, object] = {}
    for name, values in (data or {}).items():
        objects.update((key(name, k), chunk) for k, chunk in _encode_whole(metas[name], values).items())
    for name, meta in metas.items():
        if getattr(meta, "zarr_format", None) == 3:  # the one document of a v3 node's to_buffer_dict, compact
            doc = dicts[name] if dicts is not None and name in dicts else meta.to_dict()
            objects[key(name, "zarr.json")] = proto.buffer.from_bytes(_compact_json(doc))
        else:
            objects.update((key(name, k), doc) for k, doc in meta.to_buffer_dict(proto).items())
    _write_objects(where, objects)
    return {name: Group(AsyncGroup(metadata=meta, store_path=where / name if name else where))
            if isinstance(meta, GroupMetadata) else Array(AsyncArray(metadata=meta, store_path=where / name))
            for name, meta in metas.items()}


TILES_ZSTD_LEVEL = 1


def tiles_compressor():
    """The codec of the ``tiles`` array and of a slide's ``thumbnail``: zstd at level 1 instead of zarr's default
    (level 0: zstd's 3).

    Tiles are JPEG-decoded pixels, which zstd hardly compresses (a ratio of about 1.2 at either level);
    level 1 encodes a chunk about 3 times faster for about 1 % more bytes (``benchmarks/tile_codecs.py``,
    RESULTS section 9). The thumbnail, decoded pixels too, is written once per slide by its prepare task: level 1
    takes about half the time there for about 2 % more bytes (RESULTS section 9). What is read back is the
    same; zarr reads either level."""
    from zarr.codecs import ZstdCodec

    return ZstdCodec(level=TILES_ZSTD_LEVEL)


def input_chunk(n: int, chunk: int) -> int:
    """The chunk (tiles) of an input of ``n`` tiles asked to be stored in chunks of ``chunk``: at most ``n``."""
    return max(1, min(chunk, n)) if n else chunk


def create_input(root, attrs: InputAttrs, n: int, *, chunk: int = DEFAULT_CHUNK, labels: bool = False,
                 arrays: dict[str, dict] | None = None, data: dict[str, np.ndarray] | None = None,
                 present: bool | None = None, inputs=None):
    """(Re)create the group of one input with empty arrays for ``n`` tiles; ``complete`` is False.

    ``arrays``: more arrays to create with it (``{name: create_array keyword arguments}``, e.g. a slide's
    ``tissue`` and ``thumbnail``). ``data``: arrays written whole, e.g. a slide's coords, tissue map and thumbnail.
    Every array's document and every chunk of ``data`` are written first, in one batch (:func:`_write_objects`);
    the group's own ``zarr.json``, with its attrs, last. So a group that is there has all its arrays and all of
    ``data``; a creation killed before that leaves a folder with no document, which listings pass over and the
    next creation (or :func:`drop_damaged`) clears. The documents are zarr's own (:func:`_array_metadata`), the
    chunks encoded by zarr's codecs (:func:`_encode_whole`): the files are those that ``create_group``, one
    ``create_array`` each, ``update_attributes`` and the arrays' ``[:] = values`` write
    (``tests/test_store_create.py``), in about half the CPU (RESULTS section 9). Returns a :class:`NodeCache` of
    the new group that knows its arrays (no lookup reads their metadata again). ``present``: whether the input's
    group is there, when the caller has just looked (one lookup less; on object storage, a request); by default
    it is looked up. ``inputs``: the root's ``inputs`` group, when the caller holds it (``root`` is then not read).
    """
    gid = input_id(attrs.source)
    inputs = inputs if inputs is not None else root.require_group("inputs")
    base = _group_dir(inputs)
    if base is not None and (base / gid).is_dir() and _metadata_problem(base / gid / "zarr.json") is not None:
        shutil.rmtree(base / gid)  # a damaged old group: zarr cannot even look at it
        present = False
    if (gid in inputs) if present is None else present:
        remove_input(inputs, gid)
    else:  # no group there: remove whatever a killed creation or removal left under its name (a listing)
        _delete_dir(inputs, gid)
    c = input_chunk(n, chunk)
    specs = {"tiles": dict(shape=(n, PATCH_SIZE, PATCH_SIZE, 3), chunks=(c, PATCH_SIZE, PATCH_SIZE, 3), dtype="uint8",
                           compressors=tiles_compressor()),
             "coords": dict(shape=(n, 2), chunks=(c, 2), dtype="int32")}
    if labels:
        specs["labels"] = dict(shape=(n,), chunks=(c,), dtype="int8", fill_value=-1)
    specs["tiled"] = dict(shape=(len(chunk_bounds(n, c)),), chunks=(1,), dtype="bool", fill_value=False)
    specs.update(arrays or {})
    return _make_group(inputs, gid, {name: _array_metadata(**kw) for name, kw in specs.items()}, data or {},
                       {**attrs.to_json(), "complete": False, "chunk": c})


def _compact_json(doc: dict) -> bytes:
    """A metadata document as zarr writes it (``allow_nan``: NaN fill values as zarr's own JSON has them), compact."""
    return json.dumps(doc, allow_nan=True, separators=(",", ":")).encode()


def _make_group(parent, name: str, metas: dict, data: dict[str, np.ndarray], attributes: dict) -> "NodeCache":
    """Group ``name`` under ``parent`` with the arrays ``{name: metadata}``, those in ``data`` written whole: the
    arrays' documents and chunks in one batch, then the group's document (see :func:`create_input`)."""
    from zarr.core.group import GroupMetadata

    at = parent.store_path / name  # a NodeCache's store path is its group's
    dicts = {k: meta.to_dict() for k, meta in metas.items() if k in _DOCUMENTED}
    arrays = _write_nodes(at, metas, data, dicts)
    # one compact JSON text (the C encoder), not nested objects, which zarr's indented group document would encode
    # in pure Python: about 1 CPU ms a slide more (RESULTS.md section 8)
    docs = json.dumps(dicts, separators=(",", ":"), allow_nan=True)
    g = NodeCache(_write_nodes(at, {"": GroupMetadata(attributes={**attributes, ARRAY_DOCS: docs})})[""])
    for array, node in arrays.items():
        g._remember(array, node)
    if isinstance(parent, NodeCache):
        parent._remember(name, g._group)
    return g


def _encode_whole(meta, values: np.ndarray) -> dict:
    """The chunks of an array with metadata ``meta`` holding ``values`` whole: ``{chunk key: encoded bytes}``, each
    encoded by the array's own codecs (zarr's, called in this thread), an edge chunk padded with the fill value as
    zarr pads it, every chunk stored (zarr's ``write_empty_chunks``). An array of no elements has no chunk."""
    import itertools

    values = np.asarray(values)
    if values.shape != tuple(meta.shape):
        raise ValueError(f"values of shape {values.shape} for an array of shape {tuple(meta.shape)}")
    shape, chunks = tuple(meta.shape), tuple(meta.chunks)
    out = {}
    for index in itertools.product(*(range(-(-s // c)) for s, c in zip(shape, chunks))):
        block = values[tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, shape))]
        out[meta.encode_chunk_key(index)] = _encode_chunk(meta, index, block)
    return out


def _encode_chunk(meta, index: tuple[int, ...], block: np.ndarray):
    """Chunk ``index`` of an array with metadata ``meta`` holding ``block`` (the chunk's values; at an edge, the
    part inside the array, padded here with the fill value as zarr pads it), encoded by the array's own codecs
    (zarr's, called in this thread): a zarr Buffer."""
    from zarr.core.array_spec import ArrayConfig
    from zarr.core.buffer import default_buffer_prototype

    proto = default_buffer_prototype()
    chunks = tuple(meta.chunks)
    dtype = meta.dtype.to_native_dtype()
    block = np.asarray(block)
    if block.shape != chunks:
        full = np.full(chunks, meta.fill_value, dtype=dtype)
        full[tuple(slice(0, k) for k in block.shape)] = block
        block = full
    spec = meta.get_chunk_spec(index, ArrayConfig.from_dict({"write_empty_chunks": True}), proto)
    x = proto.nd_buffer.from_numpy_array(np.ascontiguousarray(block, dtype=dtype))
    for codec in meta.codecs:
        x = codec._encode_sync(x, spec)
        spec = codec.resolve_metadata(spec)
    return x


def _write_objects(where, objects: dict) -> None:
    """Store ``{key under the store path where: zarr Buffer}``. On a local store, here, one file after the other, each
    written to a temporary name and renamed (as zarr's ``LocalStore`` writes; without its hop to a thread and back
    per file); on other stores all at once through zarr (on object storage one batch of concurrent PUTs, each
    atomic)."""
    import asyncio

    from zarr.core.sync import sync
    from zarr.storage import LocalStore

    if not objects:
        return
    if isinstance(where.store, LocalStore):
        if where.store.read_only:
            raise ValueError("store was opened in read-only mode")
        base = Path(where.store.root) / where.path
        made: set[Path] = set()
        for key, value in objects.items():
            path = base / key
            if path.parent not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(path.parent)
            tmp = path.with_name(f"{path.name}.{os.urandom(8).hex()}.partial")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(value.as_buffer_like())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return

    async def put_all() -> None:
        await asyncio.gather(*((where / key).set(value) for key, value in objects.items()))

    sync(put_all())


def remove_input(inputs, gid: str) -> None:
    """Remove the group of input ``gid`` from the ``inputs`` group, its own ``zarr.json`` first: a removal cut short
    (a kill) then leaves no group that lacks some of its arrays, only a folder with no document, which listings
    pass over and :func:`drop_damaged` clears."""
    from zarr.core.sync import sync

    sync((inputs.store_path / gid / "zarr.json").delete())  # a NodeCache's store_path is its group's
    del inputs[gid]


def _delete_dir(group, name: str) -> None:
    """Remove everything under member ``name`` of ``group`` (nothing there: nothing done)."""
    from zarr.core.sync import sync

    where = group.store_path / name
    fs = getattr(where.store, "fs", None)
    if fs is not None:  # object storage (zarr's FsspecStore): one listing of the prefix (list_prefix adds a HEAD)
        there = sync(fs._find(f"{where.store.path}/{group.path}".rstrip("/"), prefix=f"{name}/"))
    else:
        there = sync(_collect(where.store.list_prefix(where.path + "/")))
    if there:
        sync(where.delete_dir())


async def _collect(items) -> list:
    return [x async for x in items]


def mark_complete(group, **updates) -> None:
    """Record that tiling of this input finished (set last, after every tile chunk is written)."""
    group.update_attributes({**updates, "complete": True})


class DamagedInputError(CancerNetError):
    """One input's part of the store is damaged or inconsistent: that input fails, the others go on.

    (Not a :class:`StorageError`, which means the whole output location is unusable.)
    """


@dataclass(frozen=True)
class DamagedInput:
    """An input group whose metadata cannot be read: its id, the damaged file, why, and its source
    when it could be salvaged from the damaged text (else None)."""

    gid: str
    path: str
    message: str
    source: str | None = None

    def failure(self, stage: str = "store"):
        """A failures-list row for it (input: the salvaged source, else the group's folder)."""
        from .failures import Failure

        where = self.source or str(Path(self.path).parent)
        return Failure(where, stage, "DamagedInputError",
                       f"{printable(self.path)}: damaged store metadata ({self.message}); "
                       + ("re-run `cancernet tile` or `run` with its source to tile it again" if self.source
                          else "tile its source again"))


_SOURCE = re.compile(r'"source"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _group_dir(group) -> Path | None:
    """The folder of a group on a local store (None for other stores)."""
    base = getattr(group.store, "root", None)
    return None if base is None else Path(base) / group.path


def _metadata_problem(path: Path) -> str | None:
    """Why a group's ``zarr.json`` cannot be used (None when it is a readable zarr v3 group document)."""
    try:
        meta = json.loads(path.read_bytes())
    except FileNotFoundError:
        return "zarr.json is missing"
    except OSError as exc:
        return f"zarr.json cannot be read ({exc.strerror or exc})"
    except ValueError as exc:  # JSON syntax, or bytes that are not UTF-8
        return f"zarr.json is not valid JSON ({' '.join(str(exc).split())[:120]})"
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        return "zarr.json is not a zarr v3 group document"
    if not isinstance(meta.get("attributes", {}), dict):
        return "zarr.json attributes are not an object"
    return None


def _salvage_source(path: Path) -> str | None:
    try:
        m = _SOURCE.search(path.read_bytes().decode("utf-8", "replace"))
        return json.loads(f'"{m.group(1)}"') if m else None
    except (OSError, ValueError):
        return None


def check_root(location: str | os.PathLike) -> None:
    """:class:`StorageError` naming the file when the metadata of the tile store at ``location`` (its
    root or its ``inputs`` group) is damaged; nothing when there is no store yet or it is sound.

    Call before :func:`open_root`: zarr itself raises a bare JSON error with no file name.
    (Local stores only: a store object on object storage is not checked here.)
    """
    if not isinstance(location, (str, os.PathLike)):
        return
    path = Path(location)
    for meta in (path / "zarr.json", path / "inputs" / "zarr.json"):
        if not meta.parent.is_dir() or (meta.parent != path and not meta.exists()):
            continue
        if meta.parent == path and creation_cut_short(path):
            continue  # nothing to lose: made again by a writer (open_root), no store to a reader
        why = _metadata_problem(meta)
        if why is not None:
            raise StorageError(f"damaged tile store metadata: {why}", path=meta,
                               hint="restore the file from a backup, or tile again into a new run folder; "
                                    "each input's tiles and predictions are in their own folders")


def creation_cut_short(path: str | os.PathLike) -> bool:
    """Whether the local store folder ``path`` has no ``zarr.json`` and nothing but a killed writer's temporary
    files: what a run killed while it made its store (between zarr's folder and its document) leaves. No store to
    read, and nothing lost: a writer makes the store there. Not a damaged store, which has inputs under a lost or
    broken root document."""
    path = Path(path)
    try:
        return (not (path / "zarr.json").exists()
                and all(is_temp_name(e.name) for e in path.iterdir()))
    except OSError:
        return False


def _input_dirs(root) -> list[Path]:
    """The folders under the store's ``inputs`` group, sorted (local stores only; else none)."""
    base = _group_dir(root)
    folder = None if base is None else base / "inputs"
    if folder is None or not folder.is_dir():
        return []
    return [d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")]


def damaged_inputs(root) -> list[DamagedInput]:
    """Input groups of the store whose ``zarr.json`` is there but cannot be read (local stores only).

    A folder with no ``zarr.json`` at all is no node for zarr and no damage: an input group's documents are
    written together and removed as one folder, so a run killed while it made or removed one leaves that
    (see :func:`drop_damaged`). Listings pass over it; the input is made again when its source is named.
    """
    found: list[DamagedInput] = []
    for d in _input_dirs(root):
        if not (d / "zarr.json").exists():
            continue
        why = _metadata_problem(d / "zarr.json")
        if why is not None:
            found.append(DamagedInput(d.name, str(d / "zarr.json"), why, _salvage_source(d / "zarr.json")))
    return found


def drop_damaged(root) -> list[DamagedInput]:
    """Remove the input groups whose metadata is damaged, so that their sources can be tiled again, and the
    folders left without a ``zarr.json`` by a killed creation or removal (no failure: nothing was lost).

    Returns the damaged ones removed (record each with :meth:`DamagedInput.failure`). Needs a writable store.
    """
    gone = damaged_inputs(root)
    for d in gone:
        log.warning("%s: %s; the input's group is removed", printable(d.path), d.message)
        shutil.rmtree(Path(d.path).parent, ignore_errors=True)
    for d in _input_dirs(root):
        if not (d / "zarr.json").exists():
            log.info("%s: no zarr.json (an interrupted creation or removal); removed", printable(d))
            shutil.rmtree(d, ignore_errors=True)
    return gone


def iter_inputs(root, *, complete_only: bool = True, damaged: list[DamagedInput] | None = None,
                looked_up: "NodeCache | None" = None) -> Iterator[tuple[str, object]]:
    """``(input_id, group)`` for each input in the store, sorted by id.

    An input whose group metadata is damaged is skipped (with a warning), never an exception that
    stops every input: pass a list as ``damaged`` to receive them. ``looked_up``: the ``inputs`` group with
    every member looked up already (:meth:`NodeCache.load_members`, on object storage): not listed again.
    """
    groups = looked_up.member_groups() if looked_up is not None else None
    if groups is not None:
        inputs = looked_up
    else:
        try:
            inputs = root["inputs"]  # one look-up (``"inputs" in root`` first read its document twice)
        except KeyError:
            return
    bad = {d.gid: d for d in damaged_inputs(root)}
    base = _group_dir(inputs) if groups is None else None
    found: dict = {}
    if base is not None:
        names = sorted(d.name for d in base.iterdir() if d.is_dir() and (d / "zarr.json").exists() or d.name in bad)
    else:  # object storage: one listing, each group's document read once (not again by inputs[gid])
        found = groups if groups is not None else _member_groups(inputs)
        names = sorted(found) if found is not None else sorted(inputs.group_keys())
        found = found or {}
    for gid in names:
        if gid in bad:
            log.warning("%s: %s; input skipped", printable(bad[gid].path), bad[gid].message)
            if damaged is not None:
                damaged.append(bad[gid])
            continue
        try:
            g = found[gid] if gid in found else inputs[gid]
        except KeyError:  # an array, or removed meanwhile
            continue
        if not hasattr(g, "group_keys"):
            continue
        if complete_only and not g.attrs.get("complete", False):
            continue
        yield gid, g


def _members(group, skip: tuple[str, ...] = ()) -> dict | None:
    """``{name: node}`` of every member of ``group`` at once (on object storage one listing and the documents read
    concurrently), but those named in ``skip`` (known already: their documents are not read); None when a member
    cannot be read (a damaged document): the lookups one by one then say what is wrong."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # objects that are no zarr node (a stale temporary file)
            if not skip:
                return dict(group.members())
            from zarr.core.group import _iter_members, _parse_async_node
            from zarr.core.sync import sync

            async def listed() -> list:
                every = (*skip, "zarr.json", ".zgroup", ".zattrs", ".zmetadata")  # and the group's own (as zarr)
                return [(name, node) async for name, node in _iter_members(group._async_group, every, None)]

            return {name: _parse_async_node(node) for name, node in sync(listed())}
    except Exception:  # noqa: BLE001 - the lookups one by one raise the usual clear errors
        return None


def _member_groups(group) -> dict | None:
    """``{name: group}`` of the member groups of ``group``, each document read once (None: as :func:`_members`)."""
    return _groups_of(_members(group))


def _groups_of(members: dict | None) -> dict | None:
    """The groups among ``members`` (``{name: node}``); None for None (the members could not be looked up)."""
    return None if members is None else {k: v for k, v in members.items() if hasattr(v, "group_keys")}


def validate_input(group, *, done: np.ndarray | None = None, read: dict | None = None) -> str | None:
    """Why an input's stored data cannot be trusted, or None when it is consistent.

    ``done``: its done flags when the caller has just read them (:func:`done_mask`), not read again.
    ``read``: a dict of the arrays (``coords``, ``done``, ``probs``, as stored) that the caller has just read (used
    here, not read again), which receives those read here, so a caller that needs them next (the report:
    :func:`~cancernet_batch.aggregate.load_scored`) does not read them again (on object storage: one GET per chunk
    of each).

    Checked: the attrs parse; ``tiles`` is ``(N, 50, 50, 3) uint8`` and ``coords`` ``(N, 2)`` integers with
    ``N == n_tiles``; every position lies on the grid (patient folders may hold ``(-1, -1)``: no
    position); ``probs`` is ``(N,) float32`` and ``done`` has one flag per chunk; a chunk flagged done
    holds finite probabilities in [0, 1]. Reads coords and probs (12 bytes a tile), never the tiles.
    """
    try:
        attrs = InputAttrs.from_json(dict(group.attrs))
        rows, cols = (int(v) for v in attrs.grid_shape)
    except (TypeError, ValueError, KeyError) as exc:
        return f"its attrs are damaged ({type(exc).__name__}: {exc})"
    for name in ("tiles", "coords"):
        if name not in group:
            return f"it has no {name} array"
    tiles, coords = group["tiles"], group["coords"]
    n = int(tiles.shape[0]) if len(tiles.shape) else -1
    if tuple(tiles.shape[1:]) != (PATCH_SIZE, PATCH_SIZE, 3) or str(tiles.dtype) != "uint8":
        return f"its tiles are {tiles.dtype} {tuple(tiles.shape)}, expected uint8 (N, {PATCH_SIZE}, {PATCH_SIZE}, 3)"
    if tuple(coords.shape) != (n, 2) or not np.issubdtype(np.dtype(str(coords.dtype)), np.integer):
        return f"its coords are {coords.dtype} {tuple(coords.shape)}, expected integers ({n}, 2)"
    if attrs.n_tiles != n:
        return f"it records {attrs.n_tiles} tiles but holds {n}"
    if rows < 0 or cols < 0:
        return f"its grid {rows} x {cols} is negative"
    raw = read["coords"] if read is not None and "coords" in read else np.asarray(coords[:])
    if read is not None:
        read["coords"] = raw
    c = raw.astype(np.int64, copy=False).reshape(-1, 2)
    placed = (c >= 0).all(axis=1) if attrs.kind == "patches" else np.ones(len(c), bool)
    unplaced = (c == -1).all(axis=1)
    off = placed & ((c[:, 0] < 0) | (c[:, 1] < 0) | (c[:, 0] >= rows) | (c[:, 1] >= cols))
    if attrs.kind == "patches":
        off |= ~placed & ~unplaced
    if off.any():
        r, k = c[np.flatnonzero(off)[0]]
        return f"{int(off.sum())} tile positions lie outside its {rows} x {cols} grid (e.g. row {r}, column {k})"
    if "probs" in group or "done" in group:
        if "probs" not in group or "done" not in group:
            return "it has done flags without probabilities" if "done" in group else "it has probabilities without done flags"
        probs, done_arr = group["probs"], group["done"]
        chunk = int(group.attrs.get("chunk", tiles.chunks[0]) or 1)
        bounds = chunk_bounds(n, chunk)
        if tuple(probs.shape) != (n,) or str(probs.dtype) != "float32":
            return f"its probs are {probs.dtype} {tuple(probs.shape)}, expected float32 ({n},)"
        if tuple(done_arr.shape) != (len(bounds),) or str(done_arr.dtype) != "bool":
            return f"its done flags are {done_arr.dtype} {tuple(done_arr.shape)}, expected bool ({len(bounds)},)"
        if done is None and read is not None:
            done = read.get("done")
        done = read_flags(done_arr) if done is None or len(done) != len(bounds) else np.asarray(done, bool)
        if read is not None:
            read["done"] = done
        if done.any():
            p = np.asarray(read["probs"] if read is not None and "probs" in read else probs[:], np.float32)
            if read is not None:
                read["probs"] = p
            for i in np.flatnonzero(done):
                a, b = bounds[i]
                v = p[a:b]
                if not (np.isfinite(v) & (v >= 0) & (v <= 1)).all():
                    return f"chunk {int(i)} (tiles {a}-{b - 1}) is flagged done but its probabilities are missing or not in [0, 1]"
    return None


def clear_unproven_done(group, read: dict | None = None) -> int:
    """Clear the done flags of chunks whose probabilities are missing (NaN) or out of [0, 1], so that
    ``predict`` scores them again instead of a report counting them as 0 % IDC. Returns how many.

    ``read``: a dict that receives the done flags as they are now (the cleared ones False) and the probabilities
    read here, for :func:`validate_input` and the report next (not read again)."""
    if "probs" not in group or "done" not in group:
        return 0
    n = int(group["tiles"].shape[0])
    bounds = chunk_bounds(n, int(group.attrs.get("chunk", group["tiles"].chunks[0]) or 1))
    done_arr = group["done"]
    done = read_flags(done_arr)
    if done.shape != (len(bounds),):
        return 0
    if read is not None:
        read["done"] = done  # a fresh array: the flags cleared below are cleared in it too
    if not done.any():
        return 0
    p = np.asarray(group["probs"][:], np.float32)
    if read is not None:
        read["probs"] = p
    cleared = 0
    for i in np.flatnonzero(done):
        a, b = bounds[i]
        v = p[a:b]
        if not (np.isfinite(v) & (v >= 0) & (v <= 1)).all():
            done_arr[int(i)] = False
            done[i] = False
            cleared += 1
    if cleared:
        log.warning("%s: %d chunks were flagged done without probabilities; they will be scored again",
                    printable(group.attrs.get("source", group.path)), cleared)
    return cleared


class NodeCache:
    """A zarr group whose member lookups (``group[name]``, ``name in group``) read each member's metadata once.

    zarr reads a member's ``zarr.json`` on every lookup; checking one input (:func:`ensure_predictions`,
    :func:`clear_unproven_done`, :func:`validate_input`, :func:`done_mask`) looks its arrays up some 30
    times. Arrays created or deleted through this object keep it right; use it for one such sequence,
    not as a long-lived handle (another process's changes are not seen).
    """

    _listed = False  # True once every member was looked up at once (load_members): the absent are known

    def __init__(self, group):
        self._group = group
        self._nodes: dict[str, object] = {}

    def load_members(self) -> "NodeCache":
        """Look every member up at once: one listing and the members' documents read concurrently (on object
        storage two round trips, instead of one per name looked up, absent names included). Any problem
        (a damaged document) leaves the lookups one by one, which say what is wrong."""
        members = _members(self._group)
        if members is None:
            return self
        self._nodes.update(members)
        self._listed = True
        return self

    def member_groups(self) -> dict | None:
        """``{name: group}`` of the member groups, when every member was looked up at once (else None)."""
        return _groups_of(self._nodes if self._listed else None)

    def __getitem__(self, name: str):
        node = self._nodes.get(name)
        if node is None:
            if self._listed:
                raise KeyError(name)  # not among the members listed (nor made since)
            node = self._nodes[name] = self._group[name]  # KeyError when absent: not cached
        return node

    def __contains__(self, name: str) -> bool:
        try:
            self[name]
        except KeyError:
            return False
        return True

    def __delitem__(self, name: str) -> None:
        self._nodes.pop(name, None)
        del self._group[name]

    def create_array(self, name: str, **kwargs):
        self._nodes[name] = node = self._group.create_array(name, **kwargs)
        return node

    def _remember(self, name: str, node) -> None:
        """A node just created under this group (by :func:`create_arrays`)."""
        self._nodes[name] = node

    def __getattr__(self, name: str):
        return getattr(self._group, name)


class _TaskGroup(NodeCache):
    """An input group for one task: lookups of :data:`_STABLE_ARRAYS` served from (and kept in) the
    process cache's ``nodes``; other members are looked up once per task (as :class:`NodeCache`)."""

    def __init__(self, group, nodes: dict):
        self._group = group
        self._nodes = nodes
        self._local: dict = {}  # this task's own lookups of the other members

    def load_members(self) -> "_TaskGroup":
        """Look every member up at once (as :meth:`NodeCache.load_members`: on object storage one listing and
        the documents read together), for this task; stable arrays also go to the process cache. The documents
        of those in hand (from the group's :data:`ARRAY_DOCS` or an earlier task) are not read again."""
        members = _members(self._group, tuple(n for n in self._nodes if isinstance(n, str)))
        if members is None:
            return self
        for name, node in members.items():
            if name in _STABLE_ARRAYS and hasattr(node, "shape"):
                self._nodes.setdefault(name, node)
            else:
                self._local[name] = node
        self._listed = True
        return self

    def __getitem__(self, name: str):
        node = self._nodes.get(name) or self._local.get(name)
        if node is None:
            if self._listed:
                raise KeyError(name)  # not among the members listed (nor made since)
            node = self._group[name]  # KeyError when absent: not cached
            if name in _STABLE_ARRAYS and hasattr(node, "shape"):
                self._nodes[name] = node
            else:
                self._local[name] = node
        return node

    def data(self, name: str):
        """A handle of array ``name`` for its chunk data only (never its attributes): ``probs`` too,
        whose shape, chunks, type and fill value follow from the group's attrs like the others'."""
        key = ("data", name)
        node = self._nodes.get(key) or self._nodes.get(name)
        if node is None:
            node = self._nodes[key] = self._group[name]
        return node

    def _forget(self, name: str) -> None:
        self._nodes.pop(name, None)
        self._nodes.pop(("data", name), None)
        self._local.pop(name, None)

    def __delitem__(self, name: str) -> None:
        self._forget(name)
        del self._group[name]

    def create_array(self, name: str, **kwargs):
        self._forget(name)
        self._local[name] = node = self._group.create_array(name, **kwargs)
        return node

    def _remember(self, name: str, node) -> None:
        self._forget(name)
        self._local[name] = node


def write_tiles(group, start: int, stop: int, tiles: np.ndarray) -> None:
    """Tiles ``[start, stop)`` into the input's ``tiles`` array, every chunk stored as it is (:func:`write_rows`).

    zarr by default first compares each chunk it writes with the fill value, to leave out chunks that hold
    nothing else; for a chunk of tiles (7.7 MB at 1,024 tiles) that comparison cost more CPU than
    compressing it (py-spy over the worker side of tiling 8 synthetic 30,000 px slides: 15 % of the
    samples, zstd's encoding 10 %). Tiles are never all zero in practice, and an all-zero chunk, written
    or left out, reads back the same."""
    write_rows(group["tiles"], start, stop, tiles)


def write_rows(array, start: int, stop: int, values: np.ndarray) -> None:
    """``array[start:stop] = values`` for an array chunked along its first axis only, every chunk stored as it is
    (zarr's ``write_empty_chunks``).

    Where ``[start, stop)`` is whole chunks (the last one may end at the array's end) of a local store, each chunk
    is encoded here by the array's codecs and its file written straight (a temporary name, then renamed, as zarr's
    own store writes it: :func:`_write_objects`). zarr's path (its indexing, its event loop thread and a thread of
    its own for the file) costs about 1.1 CPU ms for a one-byte flag and 2.6 ms to read seven of them, on every chunk
    of every input (RESULTS.md section 6). Anything else goes through zarr."""
    meta = array.metadata
    c = int(meta.chunks[0])
    n = int(meta.shape[0])
    local = _local_dir(array, write=True)
    values = np.asarray(values)
    if (local is None or start % c or (stop % c and stop != n) or not 0 <= start < stop <= n
            or values.shape != (stop - start,) + tuple(meta.shape[1:]) or tuple(meta.chunks[1:]) != tuple(meta.shape[1:])):
        array.with_config({"write_empty_chunks": True})[start:stop] = values  # (zarr says what does not fit)
        return
    _write_objects(array.store_path, {
        meta.encode_chunk_key((i,) + (0,) * (len(meta.shape) - 1)):
            _encode_chunk(meta, (i,) + (0,) * (len(meta.shape) - 1), values[i * c - start:min((i + 1) * c, n) - start])
        for i in range(start // c, -(-stop // c))})


def set_flag(group, name: str, index: int) -> None:
    """Set the input's per-chunk flag ``name`` (``tiled``, ``done``) of chunk ``index`` (its one-element chunk written
    straight on a local store: :func:`write_rows`)."""
    write_rows(data_array(group, name), index, index + 1, np.ones(1, bool))


def read_flags(array) -> np.ndarray:
    """The values of a one-dimensional array of one-element chunks (the per-chunk flags), as ``bool``.

    On a local store each chunk's file is read here: a missing one is the fill value, one whose bytes are the
    array's own encoding of True or False is that value; any other (another codec's bytes, a damaged file) sends the
    whole read through zarr, which decodes it or raises as it would. A hundred flags cost zarr about 26 ms (each
    chunk a task on its event loop and a thread of its own), on each chunk task that checks whether it scored an
    input's last chunk. On object storage, one listing of the chunks (:func:`_listed_flags`)."""
    from zarr.core.metadata import ArrayV3Metadata

    meta = array.metadata
    local = _local_dir(array)
    if len(meta.shape) != 1 or int(meta.chunks[0]) != 1 or not isinstance(meta, ArrayV3Metadata):
        return np.asarray(array[:], bool)
    n = int(meta.shape[0])
    known = flag_encodings(meta)
    if local is None:
        listed = _listed_flags(array, n, known)
        return listed if listed is not None else np.asarray(array[:], bool)
    out = np.full(n, bool(meta.fill_value), bool)
    for i in range(n):
        try:
            with open(local / meta.encode_chunk_key((i,)), "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            continue
        if raw not in known:
            return np.asarray(array[:], bool)
        out[i] = known[raw]
    return out


def flag_encodings(meta) -> dict[bytes, bool]:
    """``{bytes: value}``: a one-element bool chunk holding True, and one holding False, as the array of metadata
    ``meta`` stores them (its own codecs)."""
    return {bytes(_encode_chunk(meta, (0,), np.ones(1, bool)).to_bytes()): True,
            bytes(_encode_chunk(meta, (0,), np.zeros(1, bool)).to_bytes()): False}


def _listed_flags(array, n: int, known: dict[bytes, bool]) -> np.ndarray | None:
    """The flags of a one-dimensional array of one-element chunks on object storage, from one listing of its chunks
    (a request per 1,000) instead of a GET each: a chunk that is not there is the fill value, one whose MD5 is that of
    the array's own encoding of True or False is that value (an object PUT whole has its MD5 as ETag on S3, moto and
    SeaweedFS; GCS lists it as ``md5Hash``). None, for the caller to read the chunks through zarr, when the store is
    not an fsspec one whose listing gives MD5s, or any chunk's MD5 is another (a damaged chunk, another codec, a
    server whose ETags are not MD5s, as with KMS encryption).

    Each chunk task that scores an input's chunk reads all its done flags to know whether it scored the last one: a GET
    per flag made that n * n GETs an input of n chunks, every one a request's CPU on the worker (about 2-3 ms in
    botocore and aiohttp) and a request the store bills."""
    import hashlib

    from zarr.core.sync import sync
    from zarr.storage import FsspecStore

    from .remote import native_ls_async

    store = array.store_path.store
    if not isinstance(store, FsspecStore) or not hasattr(store.fs, "_ls"):
        return None
    meta = array.metadata
    keys = {f"{store.path}/{array.store_path.path}/{meta.encode_chunk_key((i,))}".strip("/"): i for i in range(n)}
    folders = {k.rsplit("/", 1)[0] for k in keys}
    digests = {hashlib.md5(raw, usedforsecurity=False).digest(): value for raw, value in known.items()}  # FIPS too
    out = np.full(n, bool(meta.fill_value), bool)

    async def listing(folder: str) -> list:
        async def through_fs() -> list:
            try:
                return await store.fs._ls(folder, detail=True, refresh=True)
            except FileNotFoundError:
                return []

        return await native_ls_async(store.fs, folder, through_fs)  # obstore's listing where it can (a tenth of s3fs's CPU)

    try:
        entries = [e for folder in sorted(folders) for e in sync(listing(folder))]
    except Exception:  # noqa: BLE001 - a driver without this listing, or it failed: zarr reads the chunks (and says why)
        return None
    for e in entries:
        i = keys.get(str(e.get("name", "")).strip("/"))
        if i is None or e.get("type") == "directory":
            continue
        value = digests.get(_listed_md5(e))
        if value is None:
            return None
        out[i] = value
    return out


def _listed_md5(entry) -> bytes | None:
    """The MD5 digest a listing entry states for its object: Azure's ``content_settings.content_md5`` (the digest's
    bytes, which the service keeps for a blob PUT whole; its ``etag`` is no MD5), GCS's ``md5Hash`` (base64; nor is
    its ``etag``), else the ETag of an object PUT whole on S3 (hex); None when it states none."""
    import base64
    import binascii

    settings = entry.get("content_settings")
    md5 = settings.get("content_md5") if hasattr(settings, "get") else None
    if md5:
        return bytes(md5)
    try:
        if entry.get("md5Hash"):
            return base64.b64decode(str(entry["md5Hash"]), validate=True)
        return bytes.fromhex(str(entry.get("ETag") or entry.get("etag") or "").strip('"'))
    except (ValueError, binascii.Error):
        return None


def _local_dir(array, *, write: bool = False) -> Path | None:
    """The folder of ``array`` when it is a zarr v3 array (whose codecs :func:`_encode_chunk` calls) on a local store
    (zarr's ``LocalStore``; ``write``: one open for writing), else None."""
    from zarr.core.metadata import ArrayV3Metadata
    from zarr.storage import LocalStore

    store = array.store_path.store
    if not isinstance(array.metadata, ArrayV3Metadata) or not isinstance(store, LocalStore) or (write and store.read_only):
        return None
    return Path(store.root) / array.store_path.path


def data_array(group, name: str):
    """Array ``name`` of an input group, to read or write its chunks (not its attributes): from the
    worker's cache when the group came from :func:`open_input` with a cache key."""
    return group.data(name) if isinstance(group, _TaskGroup) else group[name]


def check_input(group, gid: str = "", *, done: np.ndarray | None = None, read: dict | None = None) -> None:
    """:class:`DamagedInputError` (naming the input and the reason) unless :func:`validate_input` passes
    (``done``, ``read``: as there)."""
    why = validate_input(group, done=done, read=read)
    if why is not None:
        where = group.attrs.get("source") or gid
        raise DamagedInputError(f"stored data of this input are inconsistent: {why}", path=where,
                                hint="tile it again (or predict again with --rescore for probabilities); "
                                     "its figures would be wrong")


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of each tile chunk of an input with ``n`` tiles."""
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def tiled_mask(group) -> np.ndarray:
    """The per-chunk "tiles written" flags of an input (all True for a store without them)."""
    n = int(group["tiles"].shape[0])
    c = int(group.attrs.get("chunk", group["tiles"].chunks[0]))
    if "tiled" not in group:
        return np.ones(len(chunk_bounds(n, c)), bool)
    return read_flags(group["tiled"])


def prediction_specs(n: int, chunk: int, model_id: str) -> dict[str, dict]:
    """The ``probs`` and ``done`` arrays of an input of ``n`` tiles in chunks of ``chunk``, for predictions by
    ``model_id`` (``{name: create_array keyword arguments}``, for :func:`create_arrays` or :func:`create_input`)."""
    # the model id goes in with the array's metadata (one write): a kill between two writes left
    # an array of no model, and every later run was refused as "scored by model None"
    return {"probs": dict(shape=(n,), chunks=(chunk,), dtype="float32", fill_value=np.nan,
                          attributes={"model_id": model_id}),
            "done": dict(shape=(len(chunk_bounds(n, chunk)),), chunks=(1,), dtype="bool", fill_value=False)}


def ensure_predictions(group, model_id: str, *, reset: bool = False):
    """Create (or check) the ``probs``/``done`` arrays of an input for predictions by ``model_id``.

    Returns ``(probs, done)``. A store scored by another model raises :class:`StorageError` unless
    ``reset`` is true, in which case the old predictions are dropped.
    """
    n = int(group["tiles"].shape[0])
    c = int(group.attrs.get("chunk", group["tiles"].chunks[0]))
    if "probs" in group:
        old = group["probs"].attrs.get("model_id")
        if old != model_id:
            if not reset:
                raise StorageError(f"this run was scored by model {old}, not {model_id}", path=group.attrs.get("source"),
                                   hint="score into a new run folder, or pass --rescore to replace the predictions")
            del group["probs"]
            if "done" in group:
                del group["done"]
    specs = prediction_specs(n, c, model_id)
    # a kill after probs and before done: no chunk is done yet, done is made now
    missing = {name: kw for name, kw in specs.items() if name not in group}
    if missing:
        # both documents in one batch of writes (a kill between them leaves one array without the
        # other: either way no chunk is flagged done, and the next call makes the missing one)
        made = create_arrays(group, missing, absent=True)  # just looked up: not there
        if not isinstance(group, NodeCache):
            return tuple(made[k] if k in made else group[k] for k in ("probs", "done"))
    return group["probs"], group["done"]


def done_mask(group) -> np.ndarray:
    """The per-chunk done flags of an input (all False when it has not been scored)."""
    if "done" not in group:
        n = int(group["tiles"].shape[0])
        c = int(group.attrs.get("chunk", group["tiles"].chunks[0]))
        return np.zeros(len(chunk_bounds(n, c)), bool)
    return read_flags(group["done"])


def settle_io(timeout: float = 30.0) -> int:
    """Let zarr's background writes that an error left in flight finish; returns how many there were.

    zarr writes a node's metadata and its parents' (``set_if_not_exists``) as concurrent tasks on its
    own event loop thread. When one of them fails (a full disk: ``EFBIG``/``ENOSPC``), the error reaches
    the caller at once while the others are still running. If the process then exits, zarr's exit
    handler stops the loop before those tasks have taken their results, and asyncio prints each one
    left unretrieved ("Future exception was never retrieved" and a traceback, e.g. the parents'
    ``FileExistsError`` of ``*.partial -> zarr.json``) on stderr. The CLI calls this before it exits;
    it returns at once when zarr was never used or nothing is pending.
    """
    import asyncio
    import sys

    zsync = sys.modules.get("zarr.core.sync")
    loop = getattr(zsync, "loop", [None])[0] if zsync is not None else None
    if loop is None or loop.is_closed() or not loop.is_running():
        return 0

    async def _settle() -> int:
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for t in tasks:
            if t.done() and not t.cancelled():
                t.exception()  # retrieved: asyncio will not report it at exit
        return len(tasks)

    try:
        return asyncio.run_coroutine_threadsafe(_settle(), loop).result(timeout + 5)
    except Exception:  # noqa: BLE001 - best effort on the way out; never hides the command's own outcome
        return 0
