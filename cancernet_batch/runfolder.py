"""One run folder, owned by one object: :class:`Run`.

Every stage takes its locations and bookkeeping from a ``Run``; no other module spells a run-folder
path. A run folder holds::

    RUN/tiles.zarr/       the tile store (:mod:`cancernet_batch.store`): tiles, coords, probs, done flags
    RUN/failures.csv      one row per (input, stage) that failed; one merge rule (:meth:`Run.record_failures`)
    RUN/predict.json      the model, threshold and engine settings the scores were made with
    RUN/progress.json     what a running (or stopped) ``run`` has done so far, for ``cancernet status``
    RUN/report/           inputs.csv, patients.csv, failures.csv, index.html, maps/, geojson/
    RUN/.lock             held (an OS file lock) by the one process writing to the run

Storage goes through a small filesystem seam, :class:`LocalFS` (local or shared disk, atomic by
writing a temporary name and renaming it). To add a storage kind, write a class with the same
methods (``write_bytes``, ``read_bytes``, ``exists``, ``makedirs``, ``remove_stale_temps``,
``lock``, ``store_location``) and make :meth:`Run.of` choose it for its URLs; nothing else changes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StorageError
from .failures import Failure, failures_from_csv, failures_to_csv

STAGES = ("discover", "preflight", "plan", "tile", "predict", "report")
"""The stages an input goes through, in order; a failures row names one of them."""


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

    def makedirs(self, path: Path) -> None:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the run folder: {exc.strerror or exc}", path=path,
                               hint="check that the location is writable") from exc

    def remove_stale_temps(self, *folders: Path) -> int:
        from .atomic import remove_stale_temps

        return remove_stale_temps(*folders)

    def store_location(self, path: Path) -> str:
        """What ``zarr.open_group`` takes for the tile store at ``path``."""
        return str(path)

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
# the run folder
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One run folder: its locations, failures list, records and lock.

    Small and picklable: worker tasks receive it and open the tile store through it.
    """

    root: Path
    fs: LocalFS = field(default_factory=LocalFS, compare=False)

    @classmethod
    def of(cls, location: "str | os.PathLike | Run") -> "Run":
        """The ``Run`` for a user's ``--out`` (made absolute, symbolic links kept as given), or ``location`` itself."""
        if isinstance(location, Run):
            return location
        return cls(Path(os.path.abspath(os.fspath(location))))

    def __str__(self) -> str:
        return str(self.root)

    # locations -----------------------------------------------------------------------------
    @property
    def store_path(self) -> Path:
        return self.root / "tiles.zarr"

    @property
    def failures_csv(self) -> Path:
        return self.root / "failures.csv"

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
        return self.fs.exists(self.store_path)

    def open_store(self, mode: str = "a", *, clean: bool = True):
        """The tile store's root group (created with ``mode='a'``).

        When writing, a killed writer's temporary files go first, unless ``clean`` is false (worker
        tasks: other workers' files in flight are not stale).
        """
        from . import store

        location = self.fs.store_location(self.store_path)
        store.check_root(location)  # a damaged root is one clear error naming its file
        return store.open_root(location, mode=mode, run_dir=self.root, clean=clean)

    def open_input(self, gid: str, mode: str = "r+"):
        """One input's group, for tasks on workers (removes nothing: other workers write beside it)."""
        from . import store

        return store.open_input(self.fs.store_location(self.store_path), gid, mode=mode)

    def remove_stale_report_temps(self) -> int:
        r = self.report_dir
        return self.fs.remove_stale_temps(self.root, r, r / "maps", r / "geojson", r / "pyramids")

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

        old = self.failures()
        merged: dict[tuple[str, str], Failure] = {}
        for f in old:
            if not (stages and f.stage in STAGES and cleared(f)):
                merged[(f.input, f.stage)] = f
        for f in new:
            merged[(f.input, f.stage)] = f
        out = list(merged.values())
        if out != old or not self.fs.exists(self.failures_csv):
            self.fs.write_bytes(self.failures_csv, failures_to_csv(out))
        return out

    def write_report_failures(self, failures: list[Failure]) -> Path:
        return self.fs.write_bytes(self.report_file("failures.csv"), failures_to_csv(failures))

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
