"""One model folder (what ``cancernet train`` writes), owned by one object: :class:`ModelFolder`.

:class:`~cancernet_batch.runfolder.Run` owns the run folder; this module owns the training output.
Every module takes the names below from a ``ModelFolder`` (or an :class:`Assessed` folder); no other
module spells a training-output name. A model folder holds::

    MODEL/model.keras           the network (Keras 3 native format)
    MODEL/model.json            its contract (ModelMeta), written last: it marks a finished model
    MODEL/model.onnx            the ONNX export (optional), carrying the model_id of model.keras
    MODEL/onnx-check.json       the ONNX-against-Keras checks already made (cancernet_batch.identity)
    MODEL/split.json            the patients of each role
    MODEL/curves.png            training curves
    MODEL/metrics.json          every figure of the training (histories, assessments, cross-validation)
    MODEL/failures.csv          patch files that could not be read
    MODEL/confusion.png ...     the validation patients' assessment (see Assessed), and MODEL/test/ the test's
    MODEL/evaluation/           ``cancernet evaluate``'s default output: an assessment with evaluation.json
    MODEL/cv/                   cross-validation: the pooled out-of-fold assessment, oof.npz, reliability.png
    MODEL/folds/foldK/          fold K's own model folder, its held-out patients' assessment in held-out/

Only paths: nothing here reads or writes, so the module imports nothing heavy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .runfolder import FAILURES_CSV  # one failures list's name, in a run folder and in a model folder alike

KERAS_FILE = "model.keras"
META_FILE = "model.json"
ONNX_FILE = "model.onnx"
VERIFIED_FILE = "onnx-check.json"


class _Name:
    """A file of a folder object: ``folder.attribute`` is ``folder.root / name``."""

    def __init__(self, name: str, doc: str | None = None):
        self.name = name
        self.__doc__ = doc

    def __get__(self, folder, owner=None) -> Path:
        return self if folder is None else folder.root / self.name  # type: ignore[return-value]


@dataclass(frozen=True)
class Assessed:
    """The folder one assessment is written to (:func:`cancernet_batch.evaluate.write_assessment`)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    confusion = _Name("confusion.png")
    roc = _Name("roc.png")
    patients = _Name("patients.png", "Per-patient true and predicted IDC fractions.")
    per_patient = _Name("per_patient.csv")
    classification_report = _Name("classification_report.txt")
    report = _Name("evaluation.json",
                   "The JSON report ``cancernet evaluate`` writes (training keeps its figures in ``metrics.json``).")
    failures = _Name(FAILURES_CSV, "Patch files of the evaluated data that could not be read.")


@dataclass(frozen=True)
class ModelFolder:
    """A model folder's locations: the model's files and the training's outputs beside them."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def __str__(self) -> str:
        return str(self.root)

    keras = _Name(KERAS_FILE)
    meta = _Name(META_FILE)
    onnx = _Name(ONNX_FILE)
    verified = _Name(VERIFIED_FILE)
    split = _Name("split.json")
    curves = _Name("curves.png")
    metrics = _Name("metrics.json")
    failures = _Name(FAILURES_CSV, "Patch files of the training data that could not be read.")

    @property
    def val(self) -> Assessed:
        """The validation patients' assessment (one split): in the model folder itself."""
        return Assessed(self.root)

    @property
    def test(self) -> Assessed:
        """The test patients' assessment (one split with test patients)."""
        return Assessed(self.root / "test")

    def evaluation(self, out: str | os.PathLike | None = None) -> Assessed:
        """Where ``cancernet evaluate`` writes: ``out`` when given, else ``MODEL/evaluation``."""
        return Assessed(out if out is not None else self.root / "evaluation")

    @property
    def cv(self) -> Assessed:
        """Cross-validation's pooled out-of-fold assessment."""
        return Assessed(self.root / "cv")

    @property
    def cv_oof(self) -> Path:
        """Cross-validation's out-of-fold logits: calibrations are re-fitted from them without re-training."""
        return self.cv.root / "oof.npz"

    @property
    def cv_reliability(self) -> Path:
        return self.cv.root / "reliability.png"

    def fold(self, k: int) -> "ModelFolder":
        """Fold ``k``'s (1-based) model folder."""
        return ModelFolder(self.root / "folds" / f"fold{k}")

    @property
    def held_out(self) -> Assessed:
        """A fold model's held-out patients' assessment."""
        return Assessed(self.root / "held-out")
