"""CancerNet: definition, the model folder (``model.keras`` + ``model.json``), loading and ONNX export.

The network takes raw RGB tiles, ``(N, 50, 50, 3) uint8``; scaling to [0, 1] happens inside the
model (a ``Rescaling`` layer), so every engine feeds tiles exactly as they are stored. It is
written with ``keras.layers`` only, so one ``model.keras`` runs under the TensorFlow, JAX and
PyTorch backends.

A model folder holds:

* ``model.keras`` — Keras 3 native format; loaded with ``safe_mode=True`` (no Lambda layers, no
  arbitrary code);
* ``model.json`` — the contract other stages read (:class:`ModelMeta`): patch size, resolution
  (µm/px), decision threshold and the rule that chose it, class names, split, data summary,
  metrics, library versions and ``model_id`` (a SHA-256 prefix of ``model.keras``);
* ``model.onnx`` — optional, written by :func:`export_onnx`; it carries the ``model_id`` of the
  ``model.keras`` it came from, so a stale export is detected.

Keras is imported lazily: reading ``model.json`` (what a scoring worker with ONNX Runtime needs)
imports neither Keras nor TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from . import DEFAULT_MPP, PATCH_SIZE
from .atomic import atomic_path, write_text
from .errors import ConfigError, ModelError
from .modelfolder import KERAS_FILE, META_FILE, ModelFolder

log = logging.getLogger(__name__)

CLASSES = ("non-IDC", "IDC")
"""Class names, indexed by label: 0 = no invasive ductal carcinoma, 1 = IDC."""
META_FORMAT = 1
"""Version of the ``model.json`` layout; a newer file is refused with a hint to upgrade."""
ONNX_ID_KEY = "cancernet_model_id"
BN_MOMENTUM = 0.9
"""Batch-norm moving-average momentum. Keras' default (0.99) needs thousands of steps before the
inference-mode statistics match the data; 0.9 settles within a few dozen, so a model trained for a
few epochs on a small set is already sane in inference mode."""
PREDICT_BATCH = 256
THRESHOLD_RULE_DEFAULT = "fixed at 0.5 (no validation data with both classes)"
_FIX = "re-train with `cancernet train`, or copy the whole model folder again"


# ----------------------------------------------------------------------------------------------
# the network
# ----------------------------------------------------------------------------------------------

def build_cancernet(width: int = 32, dropout: float = 0.25, separable: bool = True, seed: int | None = None):
    """CancerNet (Rosebrock 2019) for raw ``uint8`` 50x50 RGB tiles, sigmoid IDC probability ``(N, 1)``.

    Three blocks of (depthwise-separable or plain) 3x3 convolutions, each convolution followed by
    ReLU and batch norm; after each block 2x2 max-pooling and dropout. Blocks have ``width``,
    ``2*width`` (x2) and ``4*width`` (x3) filters; then a dense layer of ``8*width`` units (ReLU,
    batch norm, dropout 0.5) and one sigmoid unit. ``seed`` fixes the initial weights.
    """
    from .quiet import import_keras

    keras = import_keras()
    from keras import layers

    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    counter = [0]

    def init():
        counter[0] += 1
        return keras.initializers.GlorotUniform(seed=None if seed is None else seed * 1000 + counter[0])

    def conv(x, filters, name):
        if separable:
            x = layers.SeparableConv2D(filters, 3, padding="same", depthwise_initializer=init(),
                                       pointwise_initializer=init(), name=name)(x)
        else:
            x = layers.Conv2D(filters, 3, padding="same", kernel_initializer=init(), name=name)(x)
        x = layers.Activation("relu", name=f"{name}_relu")(x)
        return layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)

    inputs = keras.Input((PATCH_SIZE, PATCH_SIZE, 3), dtype="uint8", name="tiles")
    x = layers.Rescaling(1.0 / 255.0, name="scale")(inputs)
    for b, (filters, repeat) in enumerate([(width, 1), (2 * width, 2), (4 * width, 3)], start=1):
        for r in range(repeat):
            x = conv(x, filters, f"block{b}_conv{r + 1}")
        x = layers.MaxPooling2D(2, name=f"block{b}_pool")(x)
        x = layers.Dropout(dropout, seed=None if seed is None else seed + b, name=f"block{b}_drop")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(8 * width, kernel_initializer=init(), name="dense")(x)
    x = layers.Activation("relu", name="dense_relu")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="dense_bn")(x)
    x = layers.Dropout(0.5, seed=None if seed is None else seed + 10, name="dense_drop")(x)
    outputs = layers.Dense(1, activation="sigmoid", kernel_initializer=init(), name="idc")(x)
    return keras.Model(inputs, outputs, name="cancernet")


def predict_tiles(model, tiles: np.ndarray, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """IDC probabilities ``(N,) float32`` of raw uint8 tiles, in inference mode.

    Runs ``predict_on_batch`` on fixed-size sub-batches (the last one padded), so the backend
    compiles one shape only.
    """
    tiles = check_tiles(tiles)
    out = np.empty(len(tiles), np.float32)
    for start in range(0, len(tiles), batch_size):
        chunk = tiles[start:start + batch_size]
        prob = np.asarray(model.predict_on_batch(pad_batch(chunk, batch_size)), dtype=np.float32).reshape(-1)
        out[start:start + len(chunk)] = prob[:len(chunk)]
    return out


class BatchNormCalibrator:
    """Set every batch-norm layer's inference statistics to the exact mean and variance of its input.

    During training, batch norm keeps a moving average of batch statistics that lags behind the
    weights; after a short training it can be far off and the model, in inference mode, predicts
    one class for everything. Calling this with a sample of (un-augmented) training tiles replaces
    the moving averages with the exact statistics under the current weights ("precise BN"), layer
    by layer from the input, each layer seeing its predecessors already calibrated.
    """

    def __init__(self, model, batch_size: int = PREDICT_BATCH):
        from .quiet import import_keras

        keras = import_keras()

        self.model = model
        self.batch_size = batch_size
        self.layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
        self.probes = [keras.Model(model.inputs, layer.input) for layer in self.layers]

    def __call__(self, tiles: np.ndarray) -> None:
        tiles = check_tiles(tiles)
        for layer, probe in zip(self.layers, self.probes):
            total = total_sq = 0.0
            count = 0
            for start in range(0, len(tiles), self.batch_size):
                chunk = tiles[start:start + self.batch_size]
                feat = np.asarray(probe.predict_on_batch(pad_batch(chunk, self.batch_size)), np.float64)[:len(chunk)]
                feat = feat.reshape(-1, feat.shape[-1])
                total = total + feat.sum(axis=0)
                total_sq = total_sq + (feat * feat).sum(axis=0)
                count += len(feat)
            mean = total / count
            var = np.maximum(total_sq / count - mean * mean, 0.0)
            layer.moving_mean.assign(mean.astype(np.float32))
            layer.moving_variance.assign(var.astype(np.float32))


def pad_batch(tiles: np.ndarray, size: int) -> np.ndarray:
    """``tiles`` padded with black tiles to ``size``, so a backend compiles one batch shape only.

    The caller cuts the padding's outputs off again (``out[:len(tiles)]``).
    """
    if len(tiles) >= size:
        return tiles
    return np.concatenate([tiles, np.zeros((size - len(tiles),) + tiles.shape[1:], tiles.dtype)])


def check_tiles(tiles: np.ndarray) -> np.ndarray:
    """``tiles`` as a ``(N, 50, 50, 3) uint8`` array, or ValueError saying what is wrong."""
    arr = np.asarray(tiles)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (PATCH_SIZE, PATCH_SIZE, 3):
        raise ValueError(f"tiles must be (N, {PATCH_SIZE}, {PATCH_SIZE}, 3) uint8, got {arr.shape} {arr.dtype}")
    return arr


# ----------------------------------------------------------------------------------------------
# model.json
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelMeta:
    """What ``model.json`` says about a model; the contract between training, scoring and reports."""

    patch_size: int = PATCH_SIZE
    mpp: float = DEFAULT_MPP
    threshold: float = 0.5
    threshold_rule: str = THRESHOLD_RULE_DEFAULT
    classes: tuple[str, ...] = CLASSES
    width: int = 32
    separable: bool = True
    input: str = "RGB uint8 (N, 50, 50, 3), raw 0-255; scaling is inside the model"
    split: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    scoring: dict[str, Any] = field(default_factory=dict)
    """How ``model.keras`` / ``model.onnx`` score (empty for a plain single model): ``members`` averaged in logit
    space, ``tta`` (the 8 flips / rotations), ``calibration`` ``{"method", "a", "b"}`` baked in as
    ``sigmoid(a * z + b)``. Informational: the graph itself applies all of it."""
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    model_id: str = ""
    format_version: int = META_FORMAT

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d

    def to_json(self) -> str:
        return json.dumps(jsonable(self.to_dict()), indent=2, allow_nan=False) + "\n"

    def predicted_class(self, prob: np.ndarray) -> np.ndarray:
        """0/1 labels of probabilities: IDC when ``prob >= threshold``."""
        return (np.asarray(prob) >= self.threshold).astype(np.int8)


def jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(allow_nan=False)`` accepts: NaN/inf become None, numpy → Python."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def library_versions() -> dict[str, str]:
    """Versions of the libraries a model depends on (those already imported; nothing is imported here)."""
    import platform
    import sys

    from . import __version__

    out = {"cancernet_batch": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for name in ("keras", "tensorflow", "jax", "torch", "onnx", "onnxruntime"):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__version__", None):
            out[name] = str(mod.__version__)
    if "keras" in sys.modules:
        out["keras_backend"] = sys.modules["keras"].backend.backend()
    return out


def file_id(path: str | os.PathLike) -> str:
    """The model id of a file: the first 16 hex digits of its SHA-256."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def save_model_dir(model, out_dir: str | os.PathLike, meta: ModelMeta) -> ModelMeta:
    """Write ``model.keras`` and ``model.json`` (atomically) into ``out_dir``; return the meta as written.

    ``model_id``, ``created`` and ``versions`` are filled in here. ``model.json`` is written last,
    so a folder whose ``model.json`` names the ``model.keras`` beside it is complete. A stale
    ``model.onnx`` from an earlier model is removed.
    """
    mf = ModelFolder(out_dir)
    mf.root.mkdir(parents=True, exist_ok=True)
    if getattr(model, "optimizer", None) is not None:  # save the network only: a third of the size
        from .quiet import import_keras

        keras = import_keras()

        bare = keras.models.clone_model(model)
        bare.set_weights(model.get_weights())
        model = bare
    with atomic_path(mf.keras) as tmp:
        tmp.unlink(missing_ok=True)  # keras refuses to overwrite without asking
        model.save(tmp)
        mid = file_id(tmp)
    meta = replace(meta, model_id=mid, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   versions=library_versions(), patch_size=PATCH_SIZE, format_version=META_FORMAT)
    write_text(mf.meta, meta.to_json())
    if mf.onnx.exists() and onnx_model_id(mf.onnx) != mid:
        mf.onnx.unlink()
    return meta


def _bad(model_dir: Path, what: str, hint: str = _FIX) -> ModelError:
    return ModelError(what, path=ModelFolder(model_dir).meta, hint=hint)


def read_meta(model_dir: str | os.PathLike) -> ModelMeta:
    """Read and check ``MODEL_DIR/model.json``; :class:`ModelError` on anything missing, corrupt or implausible."""
    mf = ModelFolder(model_dir)
    d = mf.root
    if not d.is_dir():
        if d.is_file() and d.suffix in {p.suffix for p in (mf.keras, mf.meta, mf.onnx)}:
            raise ModelError("is a file; a model is a folder", path=d,
                             hint=f"give the folder that holds {KERAS_FILE} and {META_FILE}")
        raise ModelError("no such model folder", path=d, hint="give the folder written by `cancernet train --out`")
    p = mf.meta
    if not p.is_file():
        raise ModelError(f"no {META_FILE} in the model folder", path=d,
                         hint=f"a model folder holds {KERAS_FILE} and {META_FILE}, as written by `cancernet train`")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise _bad(d, "is not text (corrupt file)") from exc
    except json.JSONDecodeError as exc:
        raise _bad(d, f"is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    if not isinstance(raw, dict):
        raise _bad(d, f"must hold a JSON object, found {type(raw).__name__}")
    version = raw.get("format_version", META_FORMAT)
    if not isinstance(version, int) or version > META_FORMAT:
        raise _bad(d, f"format_version {version!r} is newer than this cancernet-batch understands ({META_FORMAT})",
                   hint="upgrade cancernet-batch")
    for key in ("patch_size", "mpp", "threshold", "classes"):
        if key not in raw:
            raise _bad(d, f"has no {key!r}")
    if raw["patch_size"] != PATCH_SIZE:
        raise _bad(d, f"patch_size is {raw['patch_size']!r}; CancerNet models take {PATCH_SIZE}x{PATCH_SIZE} tiles")
    mpp = raw["mpp"]
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not 0.05 < mpp < 20:
        raise _bad(d, f"mpp {mpp!r} is not a plausible resolution (0.05-20 µm/px)")
    thr = raw["threshold"]
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0.0 <= thr <= 1.0:
        raise _bad(d, f"threshold {thr!r} is not a probability in [0, 1]")
    classes = raw["classes"]
    if not (isinstance(classes, list) and len(classes) == 2 and all(isinstance(c, str) and c for c in classes)):
        raise _bad(d, f"classes must be two names (non-IDC, IDC), found {classes!r}")
    known = {f.name for f in fields(ModelMeta)}
    kwargs = {k: v for k, v in raw.items() if k in known}
    kwargs["classes"] = tuple(classes)
    kwargs["mpp"] = float(mpp)
    kwargs["threshold"] = float(thr)
    for key in ("split", "data", "metrics", "training", "scoring", "versions"):
        if not isinstance(kwargs.get(key, {}), dict):
            raise _bad(d, f"{key!r} must be a JSON object")
    return ModelMeta(**kwargs)


def require_raw_input(meta: ModelMeta, model_dir: str | os.PathLike) -> None:
    """:class:`ModelError` when the model was trained on per-patient stain-normalised patches
    (``cancernet train --stain-norm``): scoring feeds raw tiles, so its probabilities would be wrong."""
    method = (meta.training.get("config") or {}).get("stain_norm", "none")
    if method != "none":
        raise ModelError(f"was trained on per-patient stain-normalised patches (--stain-norm {method}), which scoring "
                         "does not apply", path=ModelFolder(model_dir).meta,
                         hint="use a model trained with --stain-norm none (the default)")


# ----------------------------------------------------------------------------------------------
# loading the Keras model
# ----------------------------------------------------------------------------------------------

def load_keras_model(model_dir: str | os.PathLike, meta: ModelMeta | None = None):
    """Load ``MODEL_DIR/model.keras`` safely (``safe_mode=True``) and check it is a CancerNet-shaped model.

    :class:`ModelError` for a missing file, a file that is not a Keras archive, one that does not
    match ``model.json``, a model with unsafe (Lambda) layers, or a foreign model whose input is
    not ``(50, 50, 3) uint8`` or whose output is not one probability.
    """
    d = Path(model_dir)
    meta = meta if meta is not None else read_meta(d)
    path = ModelFolder(d).keras
    if not path.is_file():
        raise ModelError(f"no {KERAS_FILE} in the model folder", path=d, hint=_FIX)
    if not zipfile.is_zipfile(path):
        raise ModelError("is not a Keras model file (a .keras file is a zip archive); it is corrupt or something else",
                         path=path, hint=_FIX)
    if meta.model_id and file_id(path) != meta.model_id:
        raise ModelError(f"does not match {META_FILE} (model_id {meta.model_id}); the two files come from different runs",
                         path=path, hint=_FIX)
    from .quiet import import_keras

    keras = import_keras()
    from . import layers  # noqa: F401 - registers the scoring-model layers (TTA, calibration) for loading

    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # keras raises ValueError/TypeError/KeyError/OSError... for bad archives
        text = " ".join(str(exc).split())
        if "safe_mode" in text or "Lambda" in text:
            raise ModelError("holds a Lambda layer (arbitrary Python code); refused by safe mode", path=path,
                             hint="use a model written by `cancernet train`; never load untrusted code") from exc
        raise ModelError(f"cannot be loaded ({exc.__class__.__name__}: {text[:200]})", path=path, hint=_FIX) from exc
    check_model_io(model, path)
    return model


def check_model_io(model, path: object) -> None:
    """ModelError unless ``model`` maps one ``(None, 50, 50, 3) uint8`` input to one ``(None, 1)`` output."""
    inputs = getattr(model, "inputs", None) or []
    outputs = getattr(model, "outputs", None) or []
    want = (PATCH_SIZE, PATCH_SIZE, 3)
    if len(inputs) != 1 or tuple(inputs[0].shape[1:]) != want:
        shapes = [tuple(i.shape) for i in inputs]
        raise ModelError(f"is not a CancerNet model: its input is {shapes}, expected (None, {want[0]}, {want[1]}, 3)",
                         path=path, hint="use a model folder written by `cancernet train`")
    if str(inputs[0].dtype) != "uint8":
        raise ModelError(f"is not a CancerNet model: it takes {inputs[0].dtype} input, expected raw uint8 tiles",
                         path=path, hint="use a model folder written by `cancernet train`")
    if len(outputs) != 1 or tuple(outputs[0].shape[1:]) != (1,):
        raise ModelError(f"is not a CancerNet model: its output is {[tuple(o.shape) for o in outputs]}, expected (None, 1)",
                         path=path, hint="use a model folder written by `cancernet train`")


# ----------------------------------------------------------------------------------------------
# ONNX export
# ----------------------------------------------------------------------------------------------

def onnx_model_id(path: str | os.PathLike) -> str | None:
    """The ``model_id`` stored in an exported ``model.onnx`` (None when absent or unreadable).

    Reads the file with ONNX Runtime's metadata only; neither Keras nor TensorFlow is imported.
    """
    try:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.get_modelmeta().custom_metadata_map.get(ONNX_ID_KEY)
    except Exception:  # noqa: BLE001 - any unreadable file is simply "no id"
        return None


def fuse_channel_affines(proto) -> int:
    """Replace each per-channel ``Mul`` then ``Add`` by constants with one ``BatchNormalization`` node.

    The exporter writes an inference-mode batch norm that follows a ReLU as two element-wise
    ops (``x * scale + shift``, constants of shape ``(1, C, 1, 1)``), two passes over the largest
    activations of the network. ONNX Runtime can fold batch norm into a convolution only when it
    directly follows one, not after the ReLU, so here the pair becomes one ``BatchNormalization``
    (mean 0, variance ``1 - eps``: the same affine, one pass); measured 1.4-1.6x faster on CPU for
    CancerNet. Works in place on an ``onnx.ModelProto``; returns how many pairs were fused.
    """
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    users: dict[str, list] = {}
    for n in g.node:
        for name in n.input:
            users.setdefault(name, []).append(n)
    graph_outputs = {o.name for o in g.output}

    def channel_const(name: str):
        t = inits.get(name)
        if t is None or len(t.dims) != 4 or t.dims[0] != 1 or t.dims[2] != 1 or t.dims[3] != 1:
            return None
        return numpy_helper.to_array(t).reshape(-1).astype(np.float32)

    eps = 1e-5
    nodes, fused, dropped = [], 0, set()
    for n in g.node:
        if id(n) in dropped:
            continue
        after = users.get(n.output[0], []) if n.op_type == "Mul" and n.output else []
        add = after[0] if len(after) == 1 and n.output[0] not in graph_outputs else None
        if add is not None and add.op_type == "Add" and add.input[0] == n.output[0]:
            scale, shift = channel_const(n.input[1]), channel_const(add.input[1])
            if scale is not None and shift is not None and scale.shape == shift.shape:
                names = [f"cancernet_fused_bn_{fused}_{part}" for part in ("scale", "shift", "mean", "var")]
                for name, arr in zip(names, (scale, shift, np.zeros_like(scale), np.full_like(scale, 1 - eps))):
                    g.initializer.append(numpy_helper.from_array(arr, name))
                nodes.append(helper.make_node("BatchNormalization", [n.input[0], *names], [add.output[0]],
                                              name=f"cancernet_fused_bn_{fused}", epsilon=eps))
                dropped.add(id(add))
                fused += 1
                continue
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    used = {name for n in g.node for name in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return fused


def export_onnx(model_dir: str | os.PathLike, *, tolerance: float = 1e-5, check_count: int = 64) -> Path:
    """Export ``MODEL_DIR/model.keras`` to ``MODEL_DIR/model.onnx`` and check it against Keras.

    The ONNX graph takes ``uint8 (batch, 50, 50, 3)`` with a dynamic batch and returns ``(batch, 1)``
    probabilities. ``check_count`` random uint8 tiles (plus an all-black and an all-white tile) must
    give the same probabilities under ONNX Runtime as under Keras within ``tolerance``; otherwise
    :class:`ModelError` and no file is left. The ``model_id`` is stored in the ONNX metadata.
    Uses the current Keras backend (TensorFlow is the tested one).
    """
    import tempfile

    d = Path(model_dir)
    meta = read_meta(d)
    model = load_keras_model(d, meta)
    rng = np.random.default_rng(0)
    probe = rng.integers(0, 256, (check_count, PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)
    probe = np.concatenate([probe, np.zeros((1, PATCH_SIZE, PATCH_SIZE, 3), np.uint8),
                            np.full((1, PATCH_SIZE, PATCH_SIZE, 3), 255, np.uint8)])
    expected = np.asarray(model.predict_on_batch(probe), np.float32).reshape(-1)  # also marks the model as called
    import onnx
    import onnxruntime as ort

    mf = ModelFolder(d)
    final = mf.onnx
    with tempfile.TemporaryDirectory(prefix=".onnx-export-", dir=d) as work:
        raw = Path(work) / "raw.onnx"
        try:
            with warnings.catch_warnings():  # keras' tf2onnx shim probes np.object
                warnings.simplefilter("ignore", FutureWarning)
                model.export(str(raw), format="onnx", verbose=False)
        except Exception as exc:  # converter errors come in many classes
            raise ModelError(f"ONNX export failed ({exc.__class__.__name__}: {' '.join(str(exc).split())[:200]})",
                             path=mf.keras, hint="export with KERAS_BACKEND=tensorflow and tf2onnx installed") from exc
        proto = onnx.load(str(raw))
        fused = fuse_channel_affines(proto)
        for key, value in ((ONNX_ID_KEY, meta.model_id), ("cancernet_mpp", str(meta.mpp)),
                           ("cancernet_threshold", str(meta.threshold))):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        with atomic_path(final) as tmp:
            onnx.save(proto, str(tmp))
            sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            name = sess.get_inputs()[0].name
            got = np.concatenate([sess.run(None, {name: probe[:7]})[0].reshape(-1),
                                  sess.run(None, {name: probe[7:]})[0].reshape(-1)])  # two batch sizes
            diff = float(np.max(np.abs(got - expected)))
            if not diff < tolerance:
                raise ModelError(f"ONNX Runtime and Keras disagree by {diff:.2e} (> {tolerance:.0e})", path=final,
                                 hint="use the Keras engine (--engine keras) and report this model")
    from .identity import record_verified

    record_verified(d, meta, diff, "export")  # engines then trust this pair of files without a probe
    log.info("exported %s (%d batch norms fused; ONNX Runtime equals Keras within %.1e)", final, fused, diff)
    return final


def target_mpp(model_dir: str | os.PathLike | None, mpp: float | None) -> float:
    """The resolution to tile at (tiling itself only takes a µm/px): the model's (``model.json``), else ``mpp``, else :data:`DEFAULT_MPP`."""
    if model_dir is not None:
        model_mpp = read_meta(model_dir).mpp
        if mpp is not None and abs(mpp - model_mpp) > 1e-3 * model_mpp:
            raise ConfigError(f"--mpp {mpp:g} contradicts the model's {model_mpp:g} µm/px",
                              hint="drop --mpp: tiles must be at the model's resolution")
        return model_mpp
    return float(mpp) if mpp is not None else DEFAULT_MPP
