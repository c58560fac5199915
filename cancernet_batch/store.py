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
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import PATCH_SIZE
from .atomic import remove_stale_temps
from .errors import StorageError

SCHEMA_VERSION = 1
from .config import DEFAULT_CHUNK  # noqa: E402,F401 - tiles per chunk, defined with the other settings

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def input_id(source: str | os.PathLike) -> str:
    """A stable, filesystem-safe group name for an input: ``<sanitised stem>-<8 hex of its abs path>``.

    Separators, ``..`` and odd characters in names never reach the store's paths; names that are
    not UTF-8 (any POSIX bytes) are hashed as the bytes they are.
    """
    p = Path(source).resolve()
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


def open_input(location: str | os.PathLike, gid: str, mode: str = "r+"):
    """The group of one input of the tile store at ``location``, for tasks on workers.

    Unlike :func:`open_root` it removes no temporary files: other workers are writing beside it,
    and their in-flight ``*.partial`` files are not stale. Use :meth:`Run.open_input
    <cancernet_batch.runfolder.Run.open_input>`.
    """
    import zarr

    return zarr.open_group(str(location), mode=mode, zarr_format=3)[f"inputs/{gid}"]


def open_root(location: str | os.PathLike, mode: str = "a", *, run_dir: str | os.PathLike | None = None,
              clean: bool = True):
    """Open (or create, with ``mode='a'``) the tile store's root group at ``location``.

    Use :meth:`Run.open_store <cancernet_batch.runfolder.Run.open_store>`; ``run_dir`` names the run
    folder in messages.
    """
    import zarr

    path = Path(location)
    if mode == "r" and not path.exists():
        raise StorageError("no tiles.zarr in this run folder", path=run_dir or path.parent,
                           hint="run `cancernet tile INPUT... --out RUN` first")
    try:
        root = zarr.open_group(str(path), mode=mode, zarr_format=3)
    except (OSError, PermissionError) as exc:
        raise StorageError(f"cannot open tile store: {exc}", path=path,
                           hint="check that the run folder is writable and not full") from exc
    if mode != "r" and clean:
        # a run killed mid-write leaves zarr's temporary "*.partial" files beside group metadata
        inputs_dir = path / "inputs"
        groups = [d for d in inputs_dir.iterdir() if d.is_dir()] if inputs_dir.is_dir() else []
        remove_stale_temps(path, inputs_dir, *groups, *(d / name for d in groups for name in ("probs", "done", "tiled")))
    if mode != "r" and "schema_version" not in root.attrs:
        root.attrs.update({"schema_version": SCHEMA_VERSION, "tile_size": PATCH_SIZE})
    version = root.attrs.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise StorageError(f"tile store has schema version {version}, this tool reads {SCHEMA_VERSION}",
                           path=path, hint="re-tile into a new run folder")
    return root


def create_input(root, attrs: InputAttrs, n: int, *, chunk: int = DEFAULT_CHUNK, labels: bool = False):
    """(Re)create the group of one input with empty arrays for ``n`` tiles; ``complete`` is False."""
    gid = input_id(attrs.source)
    inputs = root.require_group("inputs")
    if gid in inputs:
        del inputs[gid]
    g = inputs.create_group(gid)
    c = max(1, min(chunk, n)) if n else chunk
    g.create_array("tiles", shape=(n, PATCH_SIZE, PATCH_SIZE, 3), chunks=(c, PATCH_SIZE, PATCH_SIZE, 3), dtype="uint8")
    g.create_array("coords", shape=(n, 2), chunks=(c, 2), dtype="int32")
    if labels:
        g.create_array("labels", shape=(n,), chunks=(c,), dtype="int8", fill_value=-1)
    g.create_array("tiled", shape=(len(chunk_bounds(n, c)),), chunks=(1,), dtype="bool", fill_value=False)
    g.attrs.update({**attrs.to_json(), "complete": False, "chunk": c})
    return g


def mark_complete(group, **updates) -> None:
    """Record that tiling of this input finished (set last, after every tile chunk is written)."""
    group.attrs.update({**updates, "complete": True})


def iter_inputs(root, *, complete_only: bool = True) -> Iterator[tuple[str, object]]:
    """``(input_id, group)`` for each input in the store, sorted by id."""
    if "inputs" not in root:
        return
    inputs = root["inputs"]
    for gid in sorted(inputs.group_keys()):
        g = inputs[gid]
        if complete_only and not g.attrs.get("complete", False):
            continue
        yield gid, g


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of each tile chunk of an input with ``n`` tiles."""
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def tiled_mask(group) -> np.ndarray:
    """The per-chunk "tiles written" flags of an input (all True for a store without them)."""
    n = int(group["tiles"].shape[0])
    c = int(group.attrs.get("chunk", group["tiles"].chunks[0]))
    if "tiled" not in group:
        return np.ones(len(chunk_bounds(n, c)), bool)
    return np.asarray(group["tiled"][:], bool)


def ensure_predictions(group, model_id: str, *, reset: bool = False):
    """Create (or check) the ``probs``/``done`` arrays of an input for predictions by ``model_id``.

    Returns ``(probs, done)``. A store scored by another model raises :class:`StorageError` unless
    ``reset`` is true, in which case the old predictions are dropped.
    """
    n = int(group["tiles"].shape[0])
    c = int(group.attrs.get("chunk", group["tiles"].chunks[0]))
    nchunks = len(chunk_bounds(n, c))
    if "probs" in group:
        old = group["probs"].attrs.get("model_id")
        if old != model_id:
            if not reset:
                raise StorageError(f"this run was scored by model {old}, not {model_id}", path=group.attrs.get("source"),
                                   hint="score into a new run folder, or pass --rescore to replace the predictions")
            del group["probs"]
            del group["done"]
    if "probs" not in group:
        probs = group.create_array("probs", shape=(n,), chunks=(c,), dtype="float32", fill_value=np.nan)
        probs.attrs["model_id"] = model_id
        group.create_array("done", shape=(nchunks,), chunks=(1,), dtype="bool", fill_value=False)
    return group["probs"], group["done"]


def done_mask(group) -> np.ndarray:
    """The per-chunk done flags of an input (all False when it has not been scored)."""
    if "done" not in group:
        n = int(group["tiles"].shape[0])
        c = int(group.attrs.get("chunk", group["tiles"].chunks[0]))
        return np.zeros(len(chunk_bounds(n, c)), bool)
    return np.asarray(group["done"][:], bool)
