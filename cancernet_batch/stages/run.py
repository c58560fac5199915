"""The whole night's work in one call: tile, predict and report (``cancernet run``), and the demo.

``run_pipeline`` streams every input through tiling, scoring and its report on one Dask client
(:mod:`cancernet_batch.stages.flow`). Every step resumes from what is on disk, so running the same
command again after a kill continues where it stopped: complete inputs are not re-tiled, scored
chunks are not re-scored, and the report files are written atomically.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..runfolder import Run
from .score import PredictConfig, PredictSummary
from .report import ReportConfig, ReportSummary
from .tile import TileSummary
from ..config import TileConfig

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What one ``run`` did, stage by stage."""

    run_dir: Path
    tile: TileSummary
    predict: PredictSummary
    report: ReportSummary
    seconds: dict[str, float] = field(default_factory=dict)
    remaining: int = 0  # inputs not started because the deadline came
    first_report_seconds: float | None = None  # from the start to the first input's report

    @property
    def failed_inputs(self) -> set[str]:
        """Inputs in the run's failures list (every stage, this call and earlier ones)."""
        return {f.input for f in self.report.failures}

    def lines(self) -> list[str]:
        """The closing summary, a few lines for the terminal."""
        t, p, s = self.tile, self.predict, self.seconds
        ok = self.report.reported
        total = s.get("total", 0.0)
        first = f"; first input reported after {self.first_report_seconds:.1f} s" if self.first_report_seconds else ""
        out = [f"inputs: {ok} reported, {len(self.failed_inputs)} failed, {self.report.not_scored} not scored"
               + (f", {self.remaining} not started (deadline)" if self.remaining else ""),
               f"tile:    {len(t.tiled)} tiled ({t.tiles_written} tiles), {len(t.skipped)} already complete",
               f"predict: {p.tiles_scored} patches scored, {p.chunks_skipped} chunks already done"
               + (f" ({p.tiles_scored / total:.0f} patches/s over the run)" if total else ""),
               f"report:  threshold {self.report.threshold.value:g} ({self.report.threshold.source})",
               f"total:   {total:.1f} s{first}; report at {self.report.index}"]
        if self.failed_inputs:
            out.append(f"failures: {self.run_dir / 'failures.csv'}")
        if self.remaining:
            out.append(f"stopped at the deadline: {self.remaining} inputs remain; re-run the same command to continue")
        return out


def run_pipeline(inputs: Sequence[str | os.PathLike], run_dir: "str | os.PathLike | Run", tile_cfg: TileConfig,
                 predict_cfg: PredictConfig, report_cfg: ReportConfig | None = None, *,
                 deadline: float | None = None, max_inputs: int | None = None, flush_seconds: float = 5.0,
                 tile_progress: Callable[[int, int], None] | None = None,
                 predict_progress: Callable[[int], None] | None = None,
                 on_dashboard: Callable[[str], None] | None = None, client=None) -> RunSummary:
    """Tile ``inputs`` into the run, score them with ``predict_cfg.model_dir`` and report them, as a stream.

    Each input goes on to scoring and its report as soon as its tiles are written
    (:mod:`cancernet_batch.stages.flow`). ``deadline``: a time (``time.time()``) after which no new
    input starts. ``client``: an already connected ``distributed.Client`` to use (``bench``
    measures its workers); otherwise one is made from ``predict_cfg.cluster``.
    """
    from .flow import Flow
    from .score import prepare_scoring

    run = Run.of(run_dir)
    report_cfg = report_cfg or ReportConfig()
    if report_cfg.model_dir is None:
        report_cfg = replace(report_cfg, model_dir=predict_cfg.model_dir)
    t0 = time.perf_counter()
    with run.create().lock("run"):
        scoring = prepare_scoring(run, predict_cfg)
        flow = Flow(run, tile_cfg=tile_cfg, scoring=scoring, report_cfg=report_cfg, deadline=deadline,
                    max_inputs=max_inputs, flush_seconds=flush_seconds, tile_progress=tile_progress,
                    score_progress=predict_progress)
        flow.discover(inputs)
        flow.execute(client, scoring.cfg.cluster, on_dashboard=on_dashboard)
    total = time.perf_counter() - t0
    flow.predict.seconds = total
    flow.tile.seconds = total
    return RunSummary(run.root, flow.tile, flow.predict, flow.report, {"total": total}, flow.remaining,
                      flow.first_report_seconds)


# --------------------------------------------------------------------------------------------
# the demo
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: the full one (the README's first command) or the quick one (CI)."""

    patients: int = 10
    per_patient: int = 200
    epochs: int = 6
    width: int = 16
    slides: int = 3
    slide_px: int = 4000
    slide_mpp: float = 1.0
    stain_jitter: float = 0.15  # slides come from patients the model never saw: new stains


FULL = DemoSize()
QUICK = DemoSize(patients=6, per_patient=100, epochs=4, width=8, slides=2, slide_px=2400)


@dataclass
class DemoResult:
    out: Path
    model_dir: Path
    run: RunSummary
    dice: dict[str, float]
    val_balanced_accuracy: float | None


def run_demo(out: str | os.PathLike, size: DemoSize = FULL, *, step: Callable[[str], None] = lambda s: None,
             on_dashboard: Callable[[str], None] | None = None, workers: int | None = None) -> DemoResult:
    """Synthetic patches -> train -> synthetic slides + a held-out patient folder -> run -> Dice vs truth."""
    from ..truth import input_accuracy
    from ..config import ClusterConfig
    from ..config import TrainConfig
    from ..store import input_id
    from ..synth import synth_patches, synth_slides
    from ..train import train

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    patches_dir, holdout_dir = out / "patches", out / "holdout"
    model_dir, slides_dir, run_dir = out / "model", out / "slides", out / "run"

    step(f"1/5 synthetic patches: {size.patients} patients x {size.per_patient} -> {patches_dir}")
    synth_patches(patches_dir, patients=size.patients, per_patient=size.per_patient, idc_fraction=0.4, seed=0)
    synth_patches(holdout_dir, patients=1, per_patient=size.per_patient, idc_fraction=0.4, seed=77, first_id=900)

    step(f"2/5 training CancerNet (width {size.width}, {size.epochs} epochs) -> {model_dir}")
    cfg = TrainConfig(epochs=size.epochs, width=size.width, patience=size.epochs, bootstrap=200, seed=0,
                      stain_jitter=size.stain_jitter)
    result = train([patches_dir], model_dir, cfg, overwrite=True)
    bacc = result.val.patch.get("balanced_accuracy")

    step(f"3/5 synthetic slides: {size.slides} x {size.slide_px} px at {size.slide_mpp} µm/px -> {slides_dir}")
    slides = synth_slides(slides_dir, count=size.slides, size=size.slide_px, mpp=size.slide_mpp, seed=1)

    step(f"4/5 cancernet run: tile + predict + report -> {run_dir}")
    predict_cfg = PredictConfig(model_dir=str(model_dir), cluster=ClusterConfig(workers=workers))
    summary = run_pipeline([slides_dir, holdout_dir], run_dir, TileConfig(target_mpp=result.meta.mpp),
                           predict_cfg, ReportConfig(model_dir=str(model_dir)), on_dashboard=on_dashboard)

    step("5/5 map accuracy against the synthetic truth")
    dice = {}
    for path, _ in slides:
        acc = input_accuracy(run_dir, input_id(path), summary.report.threshold.value)
        dice[path.name] = acc.dice
    return DemoResult(out, model_dir, summary, dice, bacc)
