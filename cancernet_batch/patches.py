"""Patient patch folders → tiles, grid coordinates, labels and patient ids.

Two layouts are read:

* **Kaggle layout** (the "Breast Histopathology Images" set): ``ROOT/PATIENT/{0,1}/NAME.png`` with
  ``NAME = {patient}_idx5_x{X}_y{Y}_class{C}.png``. ``ROOT`` may hold many patients, or be one
  patient folder itself.
* **Plain folder**: image files anywhere below ``ROOT`` with no label folders. Labels are unknown
  (-1); the patient is the folder's name.

Coordinate convention (checked on ``../shared/data/idc``): ``X`` and ``Y`` are always ``50*k + 1``,
i.e. the 1-based pixel position of the patch's top-left corner in the patient's downsampled image.
The tile grid position is therefore ``col = (X - 1) // 50``, ``row = (Y - 1) // 50``, and the
0-based pixel origin is ``(X - 1, Y - 1)``. ``coords`` arrays hold ``(row, col)``.
A name without a position (plain folders) gets ``(-1, -1)``.

Edge patches smaller than 50x50 (the right and bottom edges of a slide) are **padded** to 50x50
with white (255, background), placed at the top-left, and counted in ``PatchSet.padded``.
Unreadable files, label mismatches and files larger than 50x50 go to ``PatchSet.failures``.
Two files for the same (patient, row, col) are duplicates: the first (sorted by path) is kept and
the rest are listed in ``PatchSet.duplicates``. Identical file contents under different names are
counted in ``PatchSet.identical``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import PATCH_SIZE, deadline
from .errors import InputError, printable
from .failures import Failure
from .runfolder import ObjectPath

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
KAGGLE_NAME = re.compile(r"^(?P<patient>[^/\\]+?)_idx\d+_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<label>[01])$")
POSITION_NAME = re.compile(r"_x(?P<x>\d+)_y(?P<y>\d+)")
PAD_VALUE = 255
FETCH_BATCH = 1024
"""Patches of a folder on object storage fetched at once (their bytes held until decoded: a few MB)."""
MAX_GRID_SIDE = 100_000
"""Largest grid position (rows or columns, 50 px tiles: 5,000,000 px) a patch name may claim."""
MAX_GRID_CELLS = 50_000_000
"""Largest grid (rows x cols) of one patient folder: its float32 map is at most 200 MB."""
OUTLIER_SLACK = 2000
"""Tiles beyond the robust extent of a folder's other patches (upper quartile plus four interquartile
ranges, plus this) where a patch's claimed position counts as absurd: the map of a
patient with one such stray patch stays within a few thousand tiles a side (tens of MB)."""


@dataclass(frozen=True)
class PatchRecord:
    """One patch file found on disk (before pixels are read)."""

    path: Path
    patient: str
    row: int
    col: int
    label: int  # 0, 1, or -1 when unknown


@dataclass
class PatchSet:
    """Patches of one or more patients, in memory."""

    tiles: np.ndarray  # (N, 50, 50, 3) uint8
    coords: np.ndarray  # (N, 2) int32, (row, col) on the 50 px grid; (-1, -1) when unknown
    labels: np.ndarray  # (N,) int8, 0/1, -1 unknown
    patients: np.ndarray  # (N,) str
    paths: list[str]
    failures: list[Failure] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    padded: int = 0
    identical: int = 0

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict[str, dict[int, int]]:
        """Per patient, the number of patches per label: ``{patient: {0: n0, 1: n1}}``."""
        out: dict[str, dict[int, int]] = {}
        for p, lab in zip(self.patients.tolist(), self.labels.tolist()):
            out.setdefault(p, {0: 0, 1: 0, -1: 0})[lab] += 1
        return {p: {k: v for k, v in c.items() if k != -1 or v} for p, c in out.items()}

    def select(self, mask: np.ndarray) -> "PatchSet":
        """A new PatchSet with the patches where ``mask`` is true (failure lists are shared)."""
        idx = np.flatnonzero(mask)
        return PatchSet(self.tiles[idx], self.coords[idx], self.labels[idx], self.patients[idx],
                        [self.paths[i] for i in idx], self.failures, self.duplicates, self.padded, self.identical)


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _parse(path: Path, patient_hint: str, label_hint: int) -> PatchRecord:
    m = KAGGLE_NAME.match(path.stem)
    if m:
        x, y = int(m["x"]), int(m["y"])
        return PatchRecord(path, m["patient"], (y - 1) // PATCH_SIZE, (x - 1) // PATCH_SIZE, int(m["label"]))
    m = POSITION_NAME.search(path.stem)
    row = col = -1
    if m:
        x, y = int(m["x"]), int(m["y"])
        row, col = (y - 1) // PATCH_SIZE, (x - 1) // PATCH_SIZE
    return PatchRecord(path, patient_hint, row, col, label_hint)


def is_patient_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is one patient in the Kaggle layout (has a ``0`` or ``1`` subfolder)."""
    p = Path(path)
    return p.is_dir() and any((p / d).is_dir() for d in ("0", "1"))


def find_patient_folders(root: str | os.PathLike) -> list[Path]:
    """Patient folders (Kaggle layout) at or directly below ``root``, sorted by name."""
    root = Path(root)
    if is_patient_folder(root):
        return [root]
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_patient_folder(p)), key=lambda p: p.name)


def scan(root: str | os.PathLike, storage_options: dict | None = None) -> tuple[list[PatchRecord], list[Failure]]:
    """Find patch files under ``root`` (Kaggle layout or plain folder) without reading pixels.

    ``root`` may be a prefix on object storage (``s3://bucket/idc/8863``: a patient folder, or a prefix of
    patient folders; Kaggle layout only), listed in one request with ``storage_options``; its records'
    paths are then :class:`~cancernet_batch.runfolder.ObjectPath` URLs.

    Raises :class:`InputError` for a missing path, a file, or a folder without any image.
    Files whose name contradicts their label folder are returned as failures.
    """
    from .remote import is_url

    if is_url(root):
        return _scan_remote(str(root).rstrip("/"), storage_options)
    root = Path(root)
    if not root.exists():
        raise InputError("no such folder", path=root, hint="check the path to the patch folder")
    if not root.is_dir():
        raise InputError("is a file, not a patch folder", path=root,
                         hint="give the folder that holds PATIENT/0 and PATIENT/1, or a folder of images")
    records: list[PatchRecord] = []
    failures: list[Failure] = []
    patients = find_patient_folders(root)
    if patients:
        _kaggle_records([(pdir.name, d, [f for f in sorted((pdir / d).iterdir()) if f.is_file()])
                         for pdir in patients for d in ("0", "1") if (pdir / d).is_dir()], records, failures)
    else:
        files = sorted(f for f in root.rglob("*") if f.is_file())
        for f in files:
            if _is_image(f):
                records.append(_parse(f, root.name, -1))
        if not records and files:
            raise InputError(f"no image files here (found {len(files)} other files)", path=root,
                             hint=f"a patch folder holds {', '.join(IMAGE_EXTENSIONS)} images")
    return _checked(root, records, failures)


def _kaggle_records(folders, records: list[PatchRecord], failures: list[Failure]) -> None:
    """Records of the files of label folders ``[(patient folder name, "0" or "1", its files sorted)]``."""
    for patient, d, files in folders:
        for f in files:
            if not _is_image(f):
                failures.append(Failure(str(f), "read", "InputError",
                                        f"{printable(f)}: not an image file (expected .png); remove it or move it out of the patch folder"))
                continue
            rec = _parse(f, patient, int(d))
            if rec.label != int(d):
                failures.append(Failure(str(f), "read", "InputError",
                                        f"{printable(f)}: name says class{rec.label} but the file is in folder {d}; move or rename it"))
                continue
            records.append(rec)


def _scan_remote(url: str, storage_options: dict | None) -> tuple[list[PatchRecord], list[Failure]]:
    """:func:`scan` of a prefix on object storage (one LIST): the patient folder ``url`` or those directly below it."""
    from .remote import as_path, info, listing, patient_places

    if info(url, storage_options).get("type") != "directory":
        raise InputError("is an object, not a patch folder (prefix)", path=url,
                         hint="give the prefix that holds PATIENT/0/ and PATIENT/1/")
    folders: dict[tuple[str, str], list] = {}
    places = [(u, place) for u, _, place in patient_places(url, listing(url, storage_options)) if place is not None]
    depth = 0 if any(place.depth == 0 for _, place in places) else 1  # the prefix is one patient, or holds them
    for u, place in places:
        if place.depth == depth and place.is_patch:
            folders.setdefault((place.patient.rsplit("/", 1)[-1], place.label), []).append(as_path(u))
    records: list[PatchRecord] = []
    failures: list[Failure] = []
    _kaggle_records([(p, d, files) for (p, d), files in sorted(folders.items())], records, failures)
    return _checked(url, records, failures)


def _checked(root, records: list[PatchRecord], failures: list[Failure]) -> tuple[list[PatchRecord], list[Failure]]:
    if not records:
        raise InputError("no patches found", path=root,
                         hint="expected PATIENT/0/*.png and PATIENT/1/*.png (Kaggle layout) or a folder of images")
    records, absurd = bound_positions(records)
    failures.extend(absurd)
    if not records:
        raise InputError("no patch with a plausible position", path=root,
                         hint="every patch name claims a grid position beyond the limit; see the failures list")
    return records, failures


def bound_positions(records: list[PatchRecord]) -> tuple[list[PatchRecord], list[Failure]]:
    """Drop patches whose name claims an absurd grid position; each becomes a failure row.

    Absurd: beyond :data:`MAX_GRID_SIDE`, or far outside the robust extent of the other patches of
    the same patient (the quartiles of rows and of columns, widened by four times the interquartile range and
    by :data:`OUTLIER_SLACK` tiles; robust to a quarter of the names being wrong): one copied patch with ``x999999999`` in its name must not make a
    patient's map many GB. When even the robust grid exceeds :data:`MAX_GRID_CELLS`, the patient's
    farthest patches go until it fits.
    """
    keep: list[PatchRecord] = []
    failures: list[Failure] = []

    def refuse(rec: PatchRecord, why: str) -> None:
        failures.append(Failure(str(rec.path), "read", "InputError",
                                f"{printable(rec.path)}: its name claims grid position row {rec.row}, column {rec.col} "
                                f"(x{rec.col * PATCH_SIZE + 1}, y{rec.row * PATCH_SIZE + 1}), {why}; "
                                "rename the file to its true position or remove it"))

    by_patient: dict[str, list[PatchRecord]] = {}
    for rec in records:
        if rec.row > MAX_GRID_SIDE or rec.col > MAX_GRID_SIDE:
            refuse(rec, f"beyond the limit of {MAX_GRID_SIDE} tiles a side")
        elif rec.row < 0:
            keep.append(rec)  # no position: not placed on a map
        else:
            by_patient.setdefault(rec.patient, []).append(rec)
    for patient, recs in by_patient.items():
        pos = np.array([(r.row, r.col) for r in recs], np.int64)
        lo, hi = np.percentile(pos, 25, axis=0, method="nearest"), np.percentile(pos, 75, axis=0, method="nearest")
        top = hi + 4 * np.maximum(hi - lo, 0) + OUTLIER_SLACK
        ok = (pos <= top).all(axis=1)
        for r, good in zip(recs, ok):
            if not good:
                refuse(r, f"far outside the other patches of patient {printable(patient)} "
                          f"(their middle half: rows {int(lo[0])}-{int(hi[0])}, columns {int(lo[1])}-{int(hi[1])})")
        inside = [r for r, good in zip(recs, ok) if good]
        inside.sort(key=lambda r: max(r.row, r.col))
        while inside and (max(r.row for r in inside) + 1) * (max(r.col for r in inside) + 1) > MAX_GRID_CELLS:
            refuse(inside.pop(), f"the patient's grid would exceed {MAX_GRID_CELLS} tiles")
        keep.extend(inside)
    order = {id(r): i for i, r in enumerate(records)}
    keep.sort(key=lambda r: order[id(r)])
    return keep, failures


def to_rgb8(im, path: object = None) -> np.ndarray:
    """``(H, W, 3) uint8`` RGB of a decoded PIL image of any mode, or :class:`InputError` with the reason.

    16-bit greyscale is scaled to 8 bits (``v / 257``), not clipped to white as PIL's own conversion
    does; 32-bit integer and float images are scaled when their values fit 8 or 16 bits (or [0, 1]),
    refused otherwise; transparency is composited over white (the background), and an image that is
    entirely transparent is refused rather than read as black.
    """
    mode = im.mode
    hint = "save the patch as 8-bit RGB PNG"
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        if a.size and not np.isfinite(a).all():
            raise InputError(f"{mode} image holds NaN or infinite values", path=path, hint=hint)
        top = float(a.max()) if a.size else 0.0
        low = float(a.min()) if a.size else 0.0
        if low < 0:
            raise InputError(f"{mode} image holds negative values ({low:g})", path=path, hint=hint)
        if mode == "F" and top <= 1.0:
            scale = 255.0
        elif mode.startswith("I;16") or top > 255:
            if top > 65535:
                raise InputError(f"{mode} image values reach {top:g}, beyond 16 bits; cannot tell its range",
                                 path=path, hint=hint)
            scale = 255.0 / 65535.0
        else:
            scale = 1.0
        g = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = np.asarray(im.convert("RGBA")).astype(np.float32)
        alpha = rgba[..., 3:4] / 255.0
        if rgba.size and not alpha.any():
            raise InputError("image is fully transparent: no pixels to read", path=path, hint=hint)
        rgb = rgba[..., :3] * alpha + PAD_VALUE * (1.0 - alpha)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    try:
        return np.asarray(im.convert("RGB"))
    except (ValueError, OSError) as exc:
        raise InputError(f"cannot convert a {mode} image to RGB ({exc})", path=path, hint=hint) from exc


def _read_one(path: Path, data: bytes | None = None) -> tuple[np.ndarray, bool, bytes]:
    """Pixels as (50, 50, 3) uint8, whether padding was needed, and the file's raw bytes (``data``: the bytes,
    already fetched; else the file is read).

    The declared size is checked before any pixel is decoded: a small file that claims a huge image
    (a decompression bomb) costs a header read, and is this file's failure only.
    """
    from PIL import Image, UnidentifiedImageError

    if data is None:
        data = path.read_bytes()
    try:
        import io

        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if h > PATCH_SIZE or w > PATCH_SIZE:
                raise InputError(f"patch is {w}x{h}, larger than {PATCH_SIZE}x{PATCH_SIZE}", path=path,
                                 hint="patch folders hold 50x50 patches; tile whole images with `cancernet tile` instead")
            im.load()
            arr = to_rgb8(im, path)
    except Image.DecompressionBombError as exc:
        raise InputError(f"image declares more pixels than any patch ({exc})", path=path,
                         hint="patch folders hold 50x50 patches; remove this file") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"cannot read image ({exc.__class__.__name__}: {exc})", path=path,
                         hint="the file is corrupt or truncated; re-download or remove it") from exc
    h, w = arr.shape[:2]
    if h == PATCH_SIZE and w == PATCH_SIZE:
        return np.ascontiguousarray(arr), False, data
    out = np.full((PATCH_SIZE, PATCH_SIZE, 3), PAD_VALUE, np.uint8)
    out[:h, :w] = arr
    return out, True, data


def load(roots: str | os.PathLike | Sequence[str | os.PathLike], *, progress=None,
         storage_options: dict | None = None) -> PatchSet:
    """Read one or more patch folders into a :class:`PatchSet`.

    Tiles are written straight into one preallocated uint8 array (50x50x3 bytes per patch; the full
    Kaggle set of 277,524 patches is about 2.1 GB). ``progress(n)`` is called as files are read.
    A root on object storage (a URL: see :func:`scan`) has its patches fetched :data:`FETCH_BATCH` at a
    time, concurrently (:func:`cancernet_batch.remote.read_objects`).
    """
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    records: list[PatchRecord] = []
    failures: list[Failure] = []
    for root in roots:
        r, f = scan(root, storage_options)
        records.extend(r)
        failures.extend(f)
    # duplicates: same (patient, row, col) with a known position
    seen: dict[tuple[str, int, int], Path] = {}
    keep: list[PatchRecord] = []
    duplicates: list[str] = []
    for rec in records:
        if rec.row >= 0:
            key = (rec.patient, rec.row, rec.col)
            if key in seen:
                duplicates.append(str(rec.path))
                log.warning("%s: duplicate of %s (same patient and position); skipped", rec.path, seen[key])
                continue
            seen[key] = rec.path
        keep.append(rec)
    n = len(keep)
    tiles = np.empty((n, PATCH_SIZE, PATCH_SIZE, 3), np.uint8)
    ok = np.zeros(n, bool)
    padded = 0
    digests: Counter[str] = Counter()
    fetched: dict = {}
    for i, rec in enumerate(keep):
        deadline.check()
        if isinstance(rec.path, ObjectPath) and str(rec.path) not in fetched:
            from .remote import read_objects

            batch = [str(r.path) for r in keep[i:i + FETCH_BATCH] if isinstance(r.path, ObjectPath)]
            fetched = read_objects(batch, storage_options)
        try:
            data = fetched.get(str(rec.path)) if isinstance(rec.path, ObjectPath) else None
            if isinstance(data, InputError):
                raise data
            tiles[i], was_padded, data = _read_one(rec.path, data)
        except InputError as exc:
            failures.append(Failure.from_exception(rec.path, "read", exc))
            log.warning("%s", exc)
        else:
            ok[i] = True
            padded += was_padded
            digests[hashlib.sha1(data).hexdigest()] += 1
        if progress is not None and (i % 256 == 255 or i == n - 1):
            progress(i % 256 + 1)
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        raise InputError("no readable patches", path=", ".join(str(r) for r in roots),
                         hint="every patch file failed to read; see the failures list")
    identical = sum(c - 1 for c in digests.values() if c > 1)
    if identical:
        log.warning("%d patch files have the same contents as another file", identical)
    return PatchSet(
        tiles=tiles[idx] if len(idx) < n else tiles,
        coords=np.array([(keep[i].row, keep[i].col) for i in idx], np.int32).reshape(-1, 2),
        labels=np.array([keep[i].label for i in idx], np.int8),
        patients=np.array([keep[i].patient for i in idx], dtype=str),
        paths=[str(keep[i].path) for i in idx],
        failures=failures, duplicates=duplicates, padded=padded, identical=identical,
    )


def grid_shape(coords: np.ndarray) -> tuple[int, int]:
    """Rows and columns of the smallest grid holding every known position."""
    known = coords[coords[:, 0] >= 0]
    if len(known) == 0:
        return (0, 0)
    return int(known[:, 0].max()) + 1, int(known[:, 1].max()) + 1


def patient_map(coords: np.ndarray, values: Iterable[float], shape: tuple[int, int] | None = None) -> np.ndarray:
    """Place per-patch values on the patient's grid (NaN where there is no patch)."""
    shape = shape or grid_shape(coords)
    out = np.full(shape, np.nan, np.float32)
    vals = np.asarray(list(values), np.float32)
    known = coords[:, 0] >= 0
    out[coords[known, 0], coords[known, 1]] = vals[known]
    return out
