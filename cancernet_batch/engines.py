"""Scoring engines: raw uint8 tiles in, IDC probabilities out, behind one small interface.

* :class:`OnnxEngine` runs ``model.onnx`` with ONNX Runtime (CPU, or CUDA when asked and
  available). It imports neither Keras nor TensorFlow, so a scoring-only worker needs neither.
* :class:`KerasEngine` runs ``model.keras`` under the Keras backend the process was started with
  (``KERAS_BACKEND``: tensorflow, jax or torch). Under JAX or PyTorch, TensorFlow is never imported.

:func:`load_engine` picks one: ``"auto"`` takes ONNX on CPU when ``model.onnx`` exists and matches
``model.keras`` (exporting it first when it is missing or stale and TensorFlow is at hand), and
Keras otherwise.
"""

from __future__ import annotations

import abc
import importlib.util
import logging
import os
import sys
from pathlib import Path

import numpy as np

from .errors import CancerNetError, ConfigError, ModelError
from .identity import check_model_files, verify_onnx
from .model import (PREDICT_BATCH, ModelMeta, check_tiles, export_onnx, load_keras_model, onnx_model_id, pad_batch,
                    read_meta)
from .modelfolder import KERAS_FILE, ONNX_FILE, ModelFolder

log = logging.getLogger(__name__)

from .config import BACKENDS, DEVICES, ENGINE_CHOICES  # noqa: E402 - names defined once


def _in_calls(tiles: np.ndarray, size: int, call) -> np.ndarray:
    """``call`` on ``tiles`` in slices of ``size`` (the last shorter), its probabilities as one ``(N,) float32``."""
    out = np.empty(len(tiles), np.float32)
    for start in range(0, len(tiles), size):
        chunk = tiles[start:start + size]
        out[start:start + len(chunk)] = np.asarray(call(chunk), np.float32).reshape(-1)
    return out


class Engine(abc.ABC):
    """A loaded model that scores tiles. ``name`` says which engine and backend run it.

    To add an engine:

    1. Subclass ``Engine`` in this module (or one of its own) with a ``kind`` (the ``--engine``
       name), the ``artefact`` it loads from the model folder, :meth:`available` (is its runtime
       installed: a cheap check, no import), :meth:`open` (load it for a device and thread count,
       raising :class:`~cancernet_batch.errors.ModelError` / ``ConfigError`` with a hint) and
       :meth:`_predict_batch` (at most ``batch_size`` uint8 tiles in, probabilities out).
    2. Register it in :func:`engines` and add its ``kind`` to ``config.ENGINES``.
    3. Add a subclass of ``EngineContract`` to ``tests/test_engine_contract.py``: the contract suite
       (uint8 in, probabilities out, any batch size, the same numbers as Keras) runs against it.
    """

    name: str = "engine"
    kind: str = "?"
    artefact: str = "?"

    @classmethod
    def available(cls) -> bool:
        """True when this engine's runtime is installed here."""
        return False

    @classmethod
    @abc.abstractmethod
    def open(cls, model_dir: Path, meta: ModelMeta, *, backend: str | None, device: str,
             threads: int | None) -> "Engine":
        """Load the model in ``model_dir`` for scoring on ``device``."""

    def __init__(self, model_dir: str | os.PathLike, meta: ModelMeta, batch_size: int = PREDICT_BATCH):
        self.model_dir = Path(model_dir)
        self.meta = meta
        self.batch_size = int(batch_size)
        check_model_files(self.model_dir, meta)  # model.json has an id and model.keras still hashes to it

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        """IDC probabilities ``(N,) float32`` of ``(N, 50, 50, 3) uint8`` tiles."""
        return _in_calls(check_tiles(tiles), self.batch_size, lambda chunk: self._predict_batch(np.ascontiguousarray(chunk)))

    @abc.abstractmethod
    def _predict_batch(self, tiles: np.ndarray) -> np.ndarray:
        """Probabilities of at most ``batch_size`` tiles."""

    def __repr__(self) -> str:
        return f"<{self.__class__.__name__} {self.name} {self.model_dir}>"


ONNX_CPU_TILES_PER_THREAD = 8
"""Tiles per ONNX Runtime call on CPU, per intra-op thread (:attr:`OnnxEngine.micro_batch`'s default). CancerNet's
first layers hold about 0.3 MB of float activations a tile: a call of a few tiles a thread keeps them in the cores'
own caches from one layer to the next, where a call of 256 streams each layer's ~80 MB through memory. Measured on
machine B (Intel Xeon, 2 MiB L2 a core; ``benchmarks/onnx_micro_batch.py``, RESULTS.md section 10): one thread
2,400-2,500 tiles/s in calls of 8 against 1,000-1,560 in calls of 256; two threads 4,050-4,200 in calls of 16
against 3,100-3,700; and workers of 180 MiB instead of 560."""


class OnnxEngine(Engine):
    """``model.onnx`` under ONNX Runtime.

    On CPU each batch is run in calls of :attr:`micro_batch` tiles (cache-sized: see
    :data:`ONNX_CPU_TILES_PER_THREAD`); the probabilities are those of one call per batch, up to rounding."""

    kind, artefact = "onnx", ONNX_FILE

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("onnxruntime") is not None

    @classmethod
    def open(cls, model_dir, meta, *, backend=None, device="cpu", threads=None) -> "OnnxEngine":
        return cls(model_dir, meta, device=device, threads=threads)

    def __init__(self, model_dir: str | os.PathLike, meta: ModelMeta | None = None, *, device: str = "cpu",
                 threads: int | None = None, batch_size: int = 1024, micro_batch: int | None = None):
        """``micro_batch``: tiles per ONNX Runtime call within a batch; None: on CPU
        :data:`ONNX_CPU_TILES_PER_THREAD` per intra-op thread (``threads``, else every core here), on a GPU the
        whole batch; 0: the whole batch."""
        import onnxruntime as ort

        d = Path(model_dir)
        meta = meta if meta is not None else read_meta(d)
        super().__init__(d, meta, batch_size)
        path = ModelFolder(d).onnx
        if not path.is_file():
            raise ModelError(f"no {ONNX_FILE} in the model folder", path=d,
                             hint="run `cancernet export MODEL_DIR` (needs TensorFlow) or use --engine keras")
        providers = ["CPUExecutionProvider"]
        if device == "gpu":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ConfigError("ONNX Runtime here has no CUDA provider",
                                  hint="install onnxruntime-gpu, or use --engine keras with a GPU backend, or --device cpu")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... classes
            raise ModelError(f"ONNX Runtime cannot load it ({exc.__class__.__name__})", path=path,
                             hint="re-create it with `cancernet export MODEL_DIR`") from exc
        stored = self.session.get_modelmeta().custom_metadata_map.get("cancernet_model_id")
        if meta.model_id and stored != meta.model_id:
            raise ModelError(f"was exported from another model.keras (model_id {stored}, model.json says {meta.model_id})",
                             path=path, hint="run `cancernet export MODEL_DIR` again")
        self.verified = verify_onnx(d, meta, self.session)  # against model.keras, once per pair of files
        inp = self.session.get_inputs()[0]
        if inp.type != "tensor(uint8)" or list(inp.shape[1:]) != [meta.patch_size, meta.patch_size, 3]:
            raise ModelError(f"takes {inp.type} {inp.shape}, expected uint8 (batch, 50, 50, 3)", path=path,
                             hint="re-create it with `cancernet export MODEL_DIR`")
        self.input_name = inp.name
        self.name = "onnx-" + ("cuda" if providers[0].startswith("CUDA") else "cpu")
        if micro_batch is None:
            from .cluster import usable_cores  # what ONNX Runtime's own intra-op pool roughly takes, without threads

            micro_batch = 0 if self.name == "onnx-cuda" else ONNX_CPU_TILES_PER_THREAD * (int(threads or 0) or usable_cores())
        self.micro_batch = int(micro_batch)

    def _predict_batch(self, tiles: np.ndarray) -> np.ndarray:
        m = self.micro_batch
        if not m or len(tiles) <= m:
            return self._run(tiles)
        return _in_calls(tiles, m, self._run)  # slices of a C-contiguous batch: contiguous, no copies

    def _run(self, tiles: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: tiles})[0], np.float32).reshape(-1)


def _keras_backend(wanted: str | None) -> str:
    """The Keras backend this process will use; ConfigError if ``wanted`` can no longer be had."""
    if wanted is not None and wanted not in BACKENDS:
        raise ConfigError(f"unknown Keras backend {wanted!r}", hint=f"use one of {', '.join(BACKENDS)}")
    if "keras" in sys.modules:
        current = sys.modules["keras"].backend.backend()
        if wanted is not None and wanted != current:
            raise ConfigError(f"Keras is already running with the {current} backend in this process, not {wanted}",
                              hint=f"set KERAS_BACKEND={wanted} in the environment before the process starts")
        return current
    if wanted is not None:
        env = os.environ.get("KERAS_BACKEND")
        if env and env != wanted:
            raise ConfigError(f"KERAS_BACKEND={env} contradicts the requested backend {wanted}",
                              hint=f"set KERAS_BACKEND={wanted}, or leave the backend choice out")
        os.environ["KERAS_BACKEND"] = wanted
        return wanted
    return os.environ.get("KERAS_BACKEND", "tensorflow")


class KerasEngine(Engine):
    """``model.keras`` under the process's Keras backend, in fixed-size sub-batches."""

    kind, artefact = "keras", KERAS_FILE

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec("keras") is not None

    @classmethod
    def open(cls, model_dir, meta, *, backend=None, device="cpu", threads=None) -> "KerasEngine":
        return cls(model_dir, meta, backend=backend, device=device, threads=threads)

    def __init__(self, model_dir: str | os.PathLike, meta: ModelMeta | None = None, *, backend: str | None = None,
                 device: str = "cpu", threads: int | None = None, batch_size: int = PREDICT_BATCH):
        d = Path(model_dir)
        meta = meta if meta is not None else read_meta(d)
        super().__init__(d, meta, batch_size)
        backend = _keras_backend(backend)
        if threads and "keras" not in sys.modules and backend == "tensorflow":
            os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(int(threads)))
            os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
        from .quiet import import_keras

        keras = import_keras()

        if threads and backend == "torch":
            import torch

            torch.set_num_threads(int(threads))
        self.device = self._device_name(keras, device)
        if keras.backend.backend() == "torch":
            # Keras 3.15 under PyTorch cannot build a Dropout's integer seed state inside keras.device()
            # ("Only Tensors of floating point ... can require gradients"), so the model is loaded on
            # PyTorch's default device, which is the GPU where CUDA is present and the CPU otherwise.
            import torch

            if (device == "cpu") == torch.cuda.is_available():
                raise ConfigError(f"Keras under PyTorch loads models on {'the GPU' if device == 'cpu' else 'the CPU'} "
                                  f"here, not on the {device.upper()}",
                                  hint="use --device gpu on a CUDA machine, or --engine onnx for the CPU")
            self.model = load_keras_model(d, meta)
        else:
            with keras.device(self.device):
                self.model = load_keras_model(d, meta)
        self.name = f"keras-{keras.backend.backend()}-{device}"
        self._keras = keras

    @staticmethod
    def _device_name(keras, device: str) -> str:
        if device == "cpu":
            return "cpu:0"
        try:
            gpus = keras.distribution.list_devices("gpu")
        except (RuntimeError, ValueError):  # JAX raises when no GPU platform exists
            gpus = []
        if not gpus:
            raise ConfigError(f"the Keras {keras.backend.backend()} backend sees no GPU",
                              hint="install a GPU build of the backend (e.g. jax[cuda12]) or use --device cpu")
        return "gpu:0"

    def _predict_batch(self, tiles: np.ndarray) -> np.ndarray:
        with self._keras.device(self.device):
            prob = self.model.predict_on_batch(pad_batch(tiles, self.batch_size))
        return np.asarray(prob, np.float32).reshape(-1)[:len(tiles)]


def engines() -> dict[str, type[Engine]]:
    """The registered engines by ``--engine`` name (``auto`` chooses among them)."""
    return {e.kind: e for e in (OnnxEngine, KerasEngine)}


def _can_export() -> bool:
    """True when this process can export ONNX without changing backend: TensorFlow and tf2onnx installed."""
    if "keras" in sys.modules:
        backend = sys.modules["keras"].backend.backend()
    else:
        backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    return backend == "tensorflow" and all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "tf2onnx"))


def load_engine(model_dir: str | os.PathLike, engine: str = "auto", backend: str | None = None, device: str = "cpu",
                threads: int | None = None, batch_size: int | None = None, micro_batch: int | None = None) -> Engine:
    """Load the model in ``model_dir`` for scoring.

    ``engine``: ``"onnx"``, ``"keras"`` or ``"auto"`` (ONNX on CPU when ``model.onnx`` exists and matches
    ``model.keras``, exported here first if missing or stale and possible; Keras otherwise).
    ``backend`` (Keras only) must agree with ``KERAS_BACKEND`` if Keras is already imported.
    ``device``: ``"cpu"`` or ``"gpu"``. ``threads``: intra-op threads (ONNX Runtime; TensorFlow and
    PyTorch when set before they start). ``batch_size``: tiles per model call (Keras pads every call
    to it, so a backend compiles one shape); default the engine's own. ``micro_batch`` (ONNX Runtime only):
    tiles per call within a batch (:attr:`OnnxEngine.micro_batch`; None: its default, 0: whole batches).
    """
    eng = _load_engine(model_dir, engine, backend, device, threads)
    if batch_size:
        eng.batch_size = int(batch_size)
    if micro_batch is not None and isinstance(eng, OnnxEngine):
        eng.micro_batch = int(micro_batch)
    return eng


def _load_engine(model_dir: str | os.PathLike, engine: str, backend: str | None, device: str,
                 threads: int | None) -> Engine:
    if engine not in ENGINE_CHOICES:
        raise ConfigError(f"unknown engine {engine!r}", hint=f"use one of {', '.join(ENGINE_CHOICES)}")
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}", hint="use cpu or gpu")
    mf = ModelFolder(model_dir)
    d = mf.root
    meta = read_meta(d)
    check_model_files(d, meta)
    registry = engines()
    if engine != "auto":
        cls = registry[engine]
        if not cls.available():
            raise ConfigError(f"the {engine} engine's runtime is not installed here",
                              hint="install it (see the README), or choose another --engine")
        if not (d / cls.artefact).is_file() and cls.kind == "keras":
            raise ModelError(f"no {KERAS_FILE} in the model folder", path=d, hint="copy the whole model folder again")
        return cls.open(d, meta, backend=backend, device=device, threads=threads)
    # auto: ONNX Runtime on CPU where its graph is at hand and matches model.keras; Keras otherwise
    if not mf.keras.is_file():
        if mf.onnx.is_file() and device == "cpu":
            return OnnxEngine(d, meta, device=device, threads=threads)
        raise ModelError(f"no {KERAS_FILE} in the model folder", path=d, hint="copy the whole model folder again")
    if device != "cpu" or backend not in (None, "tensorflow"):
        return KerasEngine(d, meta, backend=backend, device=device, threads=threads)
    onnx = mf.onnx
    fresh = onnx.is_file() and onnx_model_id(onnx) == meta.model_id
    if not fresh and _can_export():
        try:
            log.info("%s %s; exporting it", onnx, "is stale" if onnx.is_file() else "is missing")
            export_onnx(d)
            fresh = True
        except CancerNetError as exc:
            log.warning("ONNX export failed, scoring with Keras instead: %s", exc)
    if fresh:
        return OnnxEngine(d, meta, device=device, threads=threads)
    log.info("no usable %s and no exporter here; scoring with Keras", ONNX_FILE)
    return KerasEngine(d, meta, backend=backend, device=device, threads=threads)
