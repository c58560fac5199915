"""The demo (``cancernet demo``): synthetic patches -> train -> synthetic slides, one real-tissue
slide and a held-out patient folder -> ``cancernet run`` -> map accuracy against the truth.

Every synthetic slide's IDC map is compared with its synthetic truth (Dice). The real-tissue slide
is a real patient's Kaggle patches rebuilt as a slide (``synth.slide_from_patches``); the demo's
model is trained on synthetic tissue only, so its IDC map there is not a target: what it shows is
the slide path on real tissue (fat, pale stroma), measured as the tissue Dice between the tiles the
slide path keeps and the patient's patches. It is made when the real data is found beside the
checkout (``../shared/data/idc/PID``), and left out otherwise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .stages.run import RunSummary, run_pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: the full one (the README's first command) or the quick one (CI)."""

    patients: int = 10
    per_patient: int = 200
    epochs: int = 6
    width: int = 16
    slides: int = 3
    slide_px: int = 5000
    slide_mpp: float = 1.0
    stain_jitter: float = 0.15  # slides come from patients the model never saw: new stains
    real_patient: str | None = "8863"  # rebuilt from ../shared/data/idc when it is there
    idc_scale_um: float = 1300.0  # tumour-sized IDC regions on the slides (the patches' 320 µm makes 1-2 tile islands)
    idc_fraction: float = 0.4
    """Share of each synthetic slide's tissue that is IDC. With 4,000 px slides, 900 µm regions and 0.3,
    a slide could hold 12 IDC tiles with 21 tiles on a region border (IDC 20-80 %: ambiguous to any
    patch classifier), so one slide's Dice swung with a few border tiles (0.783 on seed 4,
    ``benchmarks/results/demo-20261202-1030-4000px.md``). At 5,000 px, 1,300 µm and 0.4, over 45
    slides (15 seeds x 3) every slide has at least 52 IDC tiles and at most 0.76 border tiles per
    IDC tile (was 12 IDC tiles and 1.75 border tiles per IDC tile)."""


FULL = DemoSize()
QUICK = DemoSize(patients=6, per_patient=100, epochs=4, width=8, slides=2, slide_px=2400, real_patient="9175")


@dataclass
class DemoResult:
    out: Path
    model_dir: Path
    run: RunSummary
    dice: dict[str, float]
    val_balanced_accuracy: float | None
    real: dict[str, float] = field(default_factory=dict)
    """The real-tissue slide (when made): ``{"slide": name, "tissue_dice", "idc_dice"}``."""


def find_real_patient(pid: str | None) -> Path | None:
    """The patient folder ``../shared/data/idc/PID`` beside the checkout (or the working folder), if any."""
    if not pid:
        return None
    here = Path(__file__).resolve().parents[1]
    for base in (here.parent, Path.cwd().parent, Path.cwd()):
        p = base / "shared" / "data" / "idc" / pid
        if (p / "0").is_dir() or (p / "1").is_dir():
            return p
    return None


def run_demo(out: str | os.PathLike, size: DemoSize = FULL, *, step: Callable[[str], None] = lambda s: None,
             on_dashboard: Callable[[str], None] | None = None, workers: int | None = None,
             seed: int = 0, real_patient_dir: str | os.PathLike | None = None) -> DemoResult:
    """Synthetic patches -> train -> synthetic slides (+ one real-tissue slide) + a held-out patient
    folder -> run -> Dice vs truth. ``seed`` varies the patients, the training and the slides."""
    from .aggregate import load_scored
    from .config import ClusterConfig, PredictConfig, ReportConfig, TileConfig, TrainConfig
    from .runfolder import Run
    from .store import input_id
    from .synth import SlideTruth, slide_from_patches, synth_patches, synth_slides
    from .train import train
    from .truth import compare_with_truth, input_accuracy, truth_path

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    patches_dir, holdout_dir = out / "patches", out / "holdout"
    model_dir, slides_dir, run_dir = out / "model", out / "slides", out / "run"

    step(f"1/5 synthetic patches: {size.patients} patients x {size.per_patient} -> {patches_dir}")
    synth_patches(patches_dir, patients=size.patients, per_patient=size.per_patient, idc_fraction=0.4, seed=seed)
    synth_patches(holdout_dir, patients=1, per_patient=size.per_patient, idc_fraction=0.4, seed=77 + seed,
                  first_id=900)

    step(f"2/5 training CancerNet (width {size.width}, {size.epochs} epochs) -> {model_dir}")
    cfg = TrainConfig(epochs=size.epochs, width=size.width, patience=size.epochs, bootstrap=200, seed=seed,
                      stain_jitter=size.stain_jitter)
    result = train([patches_dir], model_dir, cfg, overwrite=True)
    bacc = result.val.patch.get("balanced_accuracy")

    real_dir = Path(real_patient_dir) if real_patient_dir else find_real_patient(size.real_patient)
    step(f"3/5 synthetic slides: {size.slides} x {size.slide_px} px at {size.slide_mpp} µm/px -> {slides_dir}"
         + (f"; patient {real_dir.name}'s real tissue rebuilt as a slide" if real_dir else ""))
    slides = synth_slides(slides_dir, count=size.slides, size=size.slide_px, mpp=size.slide_mpp, seed=1 + seed,
                          idc_scale_um=size.idc_scale_um, idc_fraction=size.idc_fraction)
    real_path = None
    if real_dir is not None:
        real_path = slides_dir / f"real-{real_dir.name}.svs"
        truth, _ = slide_from_patches(real_dir, real_path, mpp=size.slide_mpp)
        truth.save(truth_path(real_path))

    step(f"4/5 cancernet run: tile + predict + report -> {run_dir}")
    predict_cfg = PredictConfig(model_dir=str(model_dir), cluster=ClusterConfig(workers=workers))
    summary = run_pipeline([slides_dir, holdout_dir], run_dir, TileConfig(target_mpp=result.meta.mpp),
                           predict_cfg, ReportConfig(model_dir=str(model_dir)), on_dashboard=on_dashboard)

    step("5/5 map accuracy against the truth")
    thr = summary.report.threshold.value
    dice = {}
    for path, _ in slides:
        dice[path.name] = input_accuracy(run_dir, input_id(path), thr).dice
    real: dict = {}
    if real_path is not None:
        gid = input_id(real_path)
        group = Run.of(run_dir).open_store("r")["inputs"][gid]
        acc = compare_with_truth(load_scored(gid, group, "").idc_map(), SlideTruth.load(truth_path(real_path)), thr)
        real = {"slide": real_path.name, "tissue_dice": acc.tissue_dice, "idc_dice": acc.dice}
    return DemoResult(out, model_dir, summary, dice, bacc, real)
