"""The whole night's work in one call: tile, predict and report (``cancernet run``); the demo is in :mod:`.demo`.

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
            out.append(f"failures: {Run.of(self.run_dir).failures_csv}")
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
