"""Model identity: the files of a model folder must belong together before anything is scored.

``model.json`` names its ``model.keras`` by ``model_id`` (a SHA-256 prefix of the file) and
``model.onnx`` carries the same id in its metadata (see :mod:`cancernet_batch.model`). At engine
load:

* a ``model.json`` without ``model_id`` is refused: nothing ties it to the weights beside it;
* a ``model.keras`` whose content hash is not the ``model_id`` (replaced after export) is refused,
  whichever engine scores (ONNX too: its metadata and ``model.json`` would still agree);
* an ``model.onnx`` is compared with ``model.keras`` on a probe batch once per pair of files: the
  outcome is recorded in ``MODEL_DIR/onnx-check.json`` (or the user cache when the folder is
  read-only), keyed by the model id and the ONNX file's hash, so workers and later runs only hash the
  files. :func:`~cancernet_batch.model.export_onnx` records its own comparison, so an exported
  folder never needs the probe; a hand-copied or forged ``model.onnx`` does.

File hashes are cached per process by (path, size, mtime), so one worker hashes a file once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import PATCH_SIZE
from .errors import ModelError
from .modelfolder import KERAS_FILE, META_FILE, ModelFolder

log = logging.getLogger(__name__)

PROBE_TOLERANCE = 1e-5  # what export_onnx demands
_EXPORT_HINT = "re-export with `cancernet export MODEL_DIR`"
_COPY_HINT = "copy the whole model folder written by `cancernet train` again (model.keras, model.json and model.onnx together)"
_HASHES: dict[tuple[str, int, int], str] = {}
_LOCK = threading.Lock()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, cached per process by (path, size, mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _LOCK:
        if key in _HASHES:
            return _HASHES[key]
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    with _LOCK:
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def check_model_files(model_dir: str | os.PathLike, meta) -> None:
    """:class:`ModelError` unless ``model.json`` has a ``model_id`` and ``model.keras`` (when present) hashes to it."""
    mf = ModelFolder(model_dir)
    if not meta.model_id:
        raise ModelError(f"{META_FILE} has no model_id: nothing ties it (and its threshold) to the weights beside it",
                         path=mf.meta, hint=f"{_COPY_HINT}, or re-train")
    keras = mf.keras
    if keras.is_file() and sha256_file(keras)[:16] != meta.model_id:
        raise ModelError(f"{KERAS_FILE} was replaced after export: its content hash {sha256_file(keras)[:16]} is not "
                         f"the model_id {meta.model_id} that {META_FILE} (and its threshold) belong to",
                         path=keras, hint=_COPY_HINT)


def _key(model_dir: Path, meta) -> str:
    return f"{meta.model_id}:{sha256_file(ModelFolder(model_dir).onnx)[:32]}"


def _cache_files(model_dir: Path) -> list[Path]:
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cancernet-batch" / "verified"
    return [ModelFolder(model_dir).verified,
            user / (hashlib.sha256(os.fsencode(str(model_dir.resolve()))).hexdigest()[:16] + ".json")]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def is_verified(model_dir: str | os.PathLike, meta) -> bool:
    """True when this ``model.onnx`` was checked against this ``model.keras`` before."""
    d = Path(model_dir)
    key = _key(d, meta)
    return any(key in _read(f) for f in _cache_files(d))


def record_verified(model_dir: str | os.PathLike, meta, max_diff: float, how: str) -> None:
    """Record that the ONNX file now in ``model_dir`` computes what ``model.keras`` computes."""
    from .atomic import write_text
    from .errors import StorageError

    d = Path(model_dir)
    entry = {"max_abs_diff": float(max_diff), "how": how,
             "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for f in _cache_files(d):
        try:
            data = _read(f)
            data[_key(d, meta)] = entry
            write_text(f, json.dumps(data, indent=2) + "\n")
            return
        except (StorageError, OSError):
            continue  # a read-only model folder: the user cache
    log.warning("%s: could not record the ONNX check anywhere; it will be repeated", d)


def probe_tiles(n: int = 32) -> np.ndarray:
    rng = np.random.default_rng(7)
    probe = rng.integers(0, 256, (n, PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)
    return np.concatenate([probe, np.zeros((1, PATCH_SIZE, PATCH_SIZE, 3), np.uint8),
                           np.full((1, PATCH_SIZE, PATCH_SIZE, 3), 255, np.uint8)])


def verify_onnx(model_dir: str | os.PathLike, meta, session, *, tolerance: float = PROBE_TOLERANCE) -> str:
    """Check an ONNX Runtime ``session`` of ``MODEL_DIR/model.onnx`` against ``model.keras``, once per pair.

    Returns ``"cached"`` (checked before), ``"probed"`` (compared now and recorded) or ``"unchecked"``
    (no ``model.keras`` here, or Keras cannot be imported: the metadata id is all there is).
    :class:`ModelError` when the two disagree on the probe batch.
    """
    from .model import load_keras_model

    d = Path(model_dir)
    if not ModelFolder(d).keras.is_file():
        return "unchecked"
    if is_verified(d, meta):
        return "cached"
    try:
        model = load_keras_model(d, meta)
    except ImportError as exc:
        log.warning("%s: model.onnx not compared with model.keras (Keras unavailable here: %s)", d, exc)
        return "unchecked"
    probe = probe_tiles()
    want = np.asarray(model.predict_on_batch(probe), np.float32).reshape(-1)
    name = session.get_inputs()[0].name
    got = np.asarray(session.run(None, {name: probe})[0], np.float32).reshape(-1)
    diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
    if not diff <= tolerance:
        raise ModelError(f"model.onnx does not compute what model.keras computes (max difference {diff:.3g} on a "
                         f"probe batch of {len(probe)} tiles): it was not exported from this model",
                         path=ModelFolder(d).onnx, hint=_EXPORT_HINT)
    record_verified(d, meta, diff, "probe at load")
    log.info("%s: model.onnx checked against model.keras (max difference %.2e); recorded", d, diff)
    return "probed"
