"""Keras layers and the builder of the *scoring model*: test-time augmentation, ensembles and calibration in one graph.

:func:`scoring_model` wraps one or more trained CancerNet models (members) into ONE functional Keras
model that still takes raw ``(N, 50, 50, 3) uint8`` tiles and returns ``(N, 1)`` IDC probabilities,
so every engine (ONNX Runtime from the exported ``model.onnx``, Keras under TensorFlow, JAX or
PyTorch) scores the whole variant in one pass:

1. :class:`DihedralStack` (test-time augmentation, optional): the batch and its 7 other flips /
   90° rotations (the dihedral group of the square, built from ``keras.ops.flip`` and
   ``keras.ops.transpose``), stacked along the batch axis: ``(8N, 50, 50, 3)``;
2. each member's *logit* (its final sigmoid dropped), on the stacked batch; members are averaged
   in logit space (``keras.layers.Average``);
3. :class:`DihedralMean`: the mean logit over the 8 transforms of each tile, ``(N, 1)``;
4. :class:`CalibratedSigmoid`: ``sigmoid(a * z + b)``, the calibration fitted on out-of-fold
   predictions (identity when uncalibrated).

Averaging logits (not probabilities) keeps the final scaling exact and numerically stable: a
probability of 1 - 1e-7 rounded in float32 would make ``logit(p) / T`` differ between engines.

The layers use ``keras.ops`` only and are registered (package ``cancernet``), so ``model.keras``
loads with ``safe_mode=True``; :func:`cancernet_batch.model.load_keras_model` imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence

from .quiet import import_keras

keras = import_keras()
from keras import layers, ops  # noqa: E402

N_DIHEDRAL = 8


@keras.saving.register_keras_serializable(package="cancernet")
class DihedralStack(layers.Layer):
    """``(N, H, W, C)`` -> ``(8N, H, W, C)``: the 8 flips / rotations of every tile, transform-major.

    Order: identity, flip rows, flip columns, both (= 180°), then the same four of the transpose
    (transpose = mirror on the diagonal; transpose + a flip = a 90° rotation). Any dtype.
    """

    def call(self, x):
        t = ops.transpose(x, (0, 2, 1, 3))
        views = []
        for v in (x, t):
            views += [v, ops.flip(v, axis=1), ops.flip(v, axis=2), ops.flip(ops.flip(v, axis=1), axis=2)]
        return ops.concatenate(views, axis=0)

    def compute_output_shape(self, input_shape):
        return (None,) + tuple(input_shape[1:])


@keras.saving.register_keras_serializable(package="cancernet")
class DihedralMean(layers.Layer):
    """``(8N, ...)`` stacked by :class:`DihedralStack` -> ``(N, ...)``: the mean over the 8 transforms."""

    def call(self, x):
        shape = ops.shape(x)
        return ops.mean(ops.reshape(x, (N_DIHEDRAL, -1) + tuple(shape[1:])), axis=0)

    def compute_output_shape(self, input_shape):
        return (None,) + tuple(input_shape[1:])


@keras.saving.register_keras_serializable(package="cancernet")
class CalibratedSigmoid(layers.Layer):
    """``sigmoid(a * z + b)`` of logits ``z``; ``a``, ``b`` fixed (from ``model.json``'s calibration), not trained."""

    def __init__(self, a: float = 1.0, b: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.a, self.b = float(a), float(b)

    def call(self, z):
        return ops.sigmoid(z * self.a + self.b)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "a": self.a, "b": self.b}


def logit_member(model, name: str):
    """A copy of a CancerNet-shaped model (same weights) whose output is the logit: the last layer's sigmoid dropped.

    ValueError when the model's last layer is not a Dense with a sigmoid.
    """
    cfg = model.get_config()
    outs = cfg["output_layers"]
    last_name = outs[0] if isinstance(outs[0], str) else outs[0][0]  # one output: [name, 0, 0]
    last = next(layer for layer in cfg["layers"] if layer["config"]["name"] == last_name)
    act = last["config"].get("activation")
    if last["class_name"] != "Dense" or act not in ("sigmoid", {"class_name": "sigmoid"}):
        raise ValueError(f"member {model.name}: last layer {last_name} is not a Dense with a sigmoid")
    last["config"]["activation"] = "linear"
    cfg["name"] = name
    member = keras.Model.from_config(cfg)
    member.set_weights(model.get_weights())
    return member


def scoring_model(members: Sequence, *, tta: bool = False, calibration: dict | None = None, logits: bool = False,
                  name: str = "cancernet_scoring"):
    """One functional model: the members' mean logit (over the 8 transforms with ``tta``), then the calibration.

    ``members``: trained CancerNet models (sigmoid outputs). ``calibration``: ``{"a", "b"}`` (identity
    when None). With ``logits=True`` the model returns the mean logit (no sigmoid, no calibration):
    what calibration is fitted on.
    """
    if not members:
        raise ValueError("a scoring model needs at least one member")
    shape = tuple(members[0].inputs[0].shape[1:])
    inputs = keras.Input(shape, dtype="uint8", name="tiles")
    x = DihedralStack(name="tta_stack")(inputs) if tta else inputs
    outs = [logit_member(m, f"member{i}")(x) for i, m in enumerate(members)]
    z = layers.Average(name="member_mean")(outs) if len(outs) > 1 else outs[0]
    if tta:
        z = DihedralMean(name="tta_mean")(z)
    if not logits:
        c = calibration or {}
        z = CalibratedSigmoid(c.get("a", 1.0), c.get("b", 0.0), name="idc")(z)
    return keras.Model(inputs, z, name=name)
