"""The whole night's work in one call: tile, predict and report (``cancernet run``), and the demo.

``run_pipeline`` shares one Dask client between tiling and scoring. Every stage resumes from what
is on disk, so running the same command again after a kill continues where it stopped: complete
inputs are not re-tiled, scored chunks are not re-scored, and the report is rewritten atomically.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..cluster import dask_client
from .score import PredictConfig, PredictSummary, predict_run
from .report import ReportConfig, ReportSummary, make_report
from .tile import TileSummary, tile_run
from ..tiling import TileConfig

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What one ``run`` did, stage by stage."""

    run_dir: Path
    tile: TileSummary
    predict: PredictSummary
    report: ReportSummary
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def failed_inputs(self) -> set[str]:
        """Inputs in the run's failures list (every stage, this call and earlier ones)."""
        return {f.input for f in self.report.failures}

    def lines(self) -> list[str]:
        """The closing summary, a few lines for the terminal."""
        t, p, s = self.tile, self.predict, self.seconds
        ok = self.report.reported
        out = [f"inputs: {ok} reported, {len(self.failed_inputs)} failed, {self.report.not_scored} not scored",
               f"tile:    {len(t.tiled)} tiled ({t.tiles_written} tiles), {len(t.skipped)} already complete, "
               f"{s.get('tile', 0):.1f} s" + (f" ({t.tiles_written / s['tile']:.0f} tiles/s)" if s.get("tile") else ""),
               f"predict: {p.tiles_scored} patches scored, {p.chunks_skipped} chunks already done, "
               f"{s.get('predict', 0):.1f} s ({p.patches_per_second:.0f} patches/s)",
               f"report:  {s.get('report', 0):.1f} s, threshold {self.report.threshold.value:g} "
               f"({self.report.threshold.source})",
               f"total:   {sum(s.values()):.1f} s; report at {self.report.index}"]
        if self.failed_inputs:
            out.append(f"failures: {self.run_dir / 'failures.csv'}")
        return out


def run_pipeline(inputs: Sequence[str | os.PathLike], run_dir: str | os.PathLike, tile_cfg: TileConfig,
                 predict_cfg: PredictConfig, report_cfg: ReportConfig | None = None, *,
                 tile_progress: Callable[[int, int], None] | None = None,
                 predict_progress: Callable[[int], None] | None = None,
                 on_dashboard: Callable[[str], None] | None = None, client=None) -> RunSummary:
    """Tile ``inputs`` into ``run_dir``, score them with ``predict_cfg.model_dir``, write the report.

    ``client``: an already connected ``distributed.Client`` to use for tiling and scoring (``bench``
    measures its workers); otherwise one is made from ``predict_cfg.cluster``.
    """
    run = Path(run_dir).resolve()
    report_cfg = report_cfg or ReportConfig()
    if report_cfg.model_dir is None:
        report_cfg = replace(report_cfg, model_dir=predict_cfg.model_dir)
    seconds: dict[str, float] = {}
    with contextlib.nullcontext(client) if client is not None else dask_client(
            predict_cfg.cluster, on_dashboard=on_dashboard) as client:
        t0 = time.perf_counter()
        ts = tile_run(list(inputs), run, tile_cfg, client=client, progress=tile_progress)
        seconds["tile"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ps = predict_run(run, predict_cfg, client=client, progress=predict_progress)
        seconds["predict"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rs = make_report(run, report_cfg, client=client)  # each input's maps on the workers, in parallel
        seconds["report"] = time.perf_counter() - t0
    return RunSummary(run, ts, ps, rs, seconds)


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
    from ..aggregate import input_accuracy
    from ..cluster import ClusterConfig
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
