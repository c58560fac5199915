"""The ``cancernet`` command line: a thin Click layer that parses, calls the library and prints.

Exit statuses: 0 ok, 1 error (a one-line ``error: ...`` on stderr), 2 usage (bad option or
argument), 3 finished but some inputs failed (listed in the run's ``failures.csv``).
Heavy libraries (numpy, keras, dask, zarr, openslide) are imported inside the commands so that
``cancernet --help`` answers instantly.
"""

from __future__ import annotations

import logging
import sys

import click

from . import DEFAULT_MPP
from .config import (BACKENDS, CALIBRATIONS, DECODE_MODES, DEFAULT_BATCH, DEFAULT_READ_TIMEOUT, DEVICES,
                     ENGINE_CHOICES, ENGINES, MAX_BATCH, STAIN_NORMS, TrainConfig)
from .errors import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, CancerNetError, ConfigError, as_one_line_error

log = logging.getLogger("cancernet_batch")


class Number(click.ParamType):
    """A finite float in ``[low, high]`` (either end open when asked): ``nan``, ``inf`` and absurd values
    are usage errors (exit 2) before any work starts. Every float option of the CLI uses one."""

    name = "number"

    def __init__(self, low: float, high: float, *, low_open: bool = False, high_open: bool = False, unit: str = ""):
        self.low, self.high, self.low_open, self.high_open, self.unit = low, high, low_open, high_open, unit

    def __repr__(self) -> str:
        return f"Number({self.low}, {self.high})"

    def _range(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def get_metavar(self, param, ctx=None) -> str:  # noqa: D102 - click's hook
        return f"{self.unit or 'NUMBER'} in {self._range()}"

    def convert(self, value, param, ctx):
        import math

        try:
            f = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(f):
            self.fail(f"{value!r} is not a finite number; give a value in {self._range()}", param, ctx)
        if f < self.low or f > self.high or (self.low_open and f == self.low) or (self.high_open and f == self.high):
            self.fail(f"{value!r} is not in {self._range()}", param, ctx)
        return f


FRACTION = Number(0, 1)
SECONDS = Number(1, 86400, unit="SECONDS")  # a day: anything longer is a typo, not a timeout
READ_TIMEOUT_HELP = ("Seconds one step that reads a source may take (a slide's plan, one tile chunk, a patient folder); "
                     "past it the input is recorded as failed and the rest go on.")
DECODE_OPTION = click.option(
    "--decode", default="fast", show_default=True, type=click.Choice(DECODE_MODES),
    help="How slide pixels are decoded: fast (tiled TIFF/SVS tiles read and decoded directly; JPEG scaled in the "
         "DCT domain where the level is 16x finer or more than the tiles; the exact tiles below that), exact "
         "(directly, full size: the exact area averages), reader (through OpenSlide/tifffile).")
MPP = Number(0, 1000, low_open=True, unit="µm/px")  # finite and positive; plausibility (0.05-20) is the library's check

MAX_WORKERS = 1024


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {msg}"
        return msg


def _setup_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CliFormatter())
    root = logging.getLogger("cancernet_batch")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    root.propagate = False


def _bar(total: int | None, unit: str, desc: str):
    """A tqdm progress bar on stderr, shown only on a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=None)  # None: no bar when stderr is not a terminal (logs, CI)


def _print_version(ctx: click.Context, param, value: bool) -> None:
    """``--version``: looked up only when asked (``importlib.metadata`` is slow to import)."""
    if not value or ctx.resilient_parsing:
        return
    from . import __version__

    click.echo(f"cancernet, version {__version__}")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and exit.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, debug: bool) -> None:
    """cancernet-batch: train CancerNet once, score whole-slide archives and patch folders in batch.

    \b
    Exit status: 0 ok, 1 error, 2 usage error, 3 finished with some inputs failed.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _setup_logging(verbose)


# ----------------------------------------------------------------------------------------------
# synth
# ----------------------------------------------------------------------------------------------

@cli.group()
def synth() -> None:
    """Make synthetic IDC-like data: patient patch folders or pyramidal slides."""


@synth.command("patches")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--patients", default=8, show_default=True, type=click.IntRange(min=1), help="Number of patients.")
@click.option("--per-patient", default=200, show_default=True, type=click.IntRange(min=1), help="Patches per patient.")
@click.option("--idc-fraction", default=0.35, show_default=True, type=FRACTION,
              help="Mean fraction of IDC patches (each patient varies around it).")
@click.option("--seed", default=0, show_default=True, type=int)
def synth_patches_cmd(out: str, patients: int, per_patient: int, idc_fraction: float, seed: int) -> None:
    """Write synthetic patches in the Kaggle layout: OUT/PID/{0,1}/PID_idx5_xX_yY_classC.png."""
    from .synth import synth_patches

    with _bar(patients, "patient", "synth patches") as bar:
        rep = synth_patches(out, patients=patients, per_patient=per_patient, idc_fraction=idc_fraction,
                            seed=seed, progress=bar.update)
    for pid, n0, n1 in rep.patients:
        click.echo(f"patient {pid}: {n0} class-0, {n1} class-1")
    click.echo(f"wrote {rep.total} patches of {len(rep.patients)} patients to {rep.out}")


@synth.command("slides")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--count", default=2, show_default=True, type=click.IntRange(min=1), help="Number of slides.")
@click.option("--size", default=4096, show_default=True, type=click.IntRange(min=256), help="Width and height in px (level 0).")
@click.option("--mpp", default=0.5, show_default=True, type=MPP, help="Level-0 resolution in µm/px.")
@click.option("--format", "fmt", default="svs", show_default=True, type=click.Choice(["svs", "tiff"]),
              help="Aperio SVS or generic tiled pyramidal TIFF.")
@click.option("--idc-fraction", default=0.3, show_default=True, type=FRACTION,
              help="Fraction of tissue tiles that are IDC.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--from-patches", "from_patches", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Rebuild real tissue instead: a patient folder (Kaggle layout), or a folder of them; repeatable. "
                   "Each patient becomes OUT/PID.svs at --mpp (patches at their name positions, glass elsewhere) "
                   "with its patch labels as the truth.")
def synth_slides_cmd(out: str, count: int, size: int, mpp: float, fmt: str, idc_fraction: float, seed: int,
                     from_patches: tuple[str, ...]) -> None:
    """Write pyramidal JPEG-tiled slides with their ground truth (NAME.truth.npz) on the model grid."""
    if from_patches:
        from .errors import InputError
        from .patches import find_patient_folders
        from .synth import slides_from_patches

        dirs = [d for p in from_patches for d in find_patient_folders(p)]
        if not dirs:
            raise InputError("no patient folders (PATIENT/0, PATIENT/1) here", path=", ".join(from_patches),
                             hint="give a patient folder of the Kaggle layout or a folder holding them")
        with _bar(len(dirs), "slide", "synth slides") as bar:
            res = slides_from_patches(out, dirs, mpp=mpp, fmt=fmt, seed=seed, progress=bar.update)
        for path, truth in res:
            click.echo(f"{path}: patient rebuilt at {mpp} µm/px, grid {truth.tissue.shape[0]}x{truth.tissue.shape[1]}, "
                       f"{int(truth.tissue.sum())} patches, {int(truth.idc.sum())} IDC")
        return
    from .synth import synth_slides

    with _bar(count, "slide", "synth slides") as bar:
        res = synth_slides(out, count=count, size=size, mpp=mpp, seed=seed, fmt=fmt, idc_fraction=idc_fraction,
                           progress=bar.update)
    for path, truth in res:
        click.echo(f"{path}: {size}x{size} px at {mpp} µm/px, grid {truth.tissue.shape[0]}x{truth.tissue.shape[1]}, "
                   f"{int(truth.tissue.sum())} tissue tiles, {int(truth.idc.sum())} IDC")


# ----------------------------------------------------------------------------------------------
# train / evaluate / export
# ----------------------------------------------------------------------------------------------

def _quiet_backends() -> None:
    """Keep TensorFlow's C++ start-up chatter off the terminal (set before Keras is imported)."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)


def _fmt(value: float | None, digits: int = 3) -> str:
    import math

    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _echo_assessment(title: str, a) -> None:
    """Print patch metrics with bootstrap intervals, the patient summary and the per-patient table."""
    p, ci = a.patch, a.ci
    click.echo(f"{title}: {p['n']} patches of {len(a.rows)} patients "
               f"({p['support']['non-IDC']} non-IDC, {p['support']['IDC']} IDC), threshold "
               + (f"{p['threshold']:.4f}" if isinstance(p["threshold"], float)
                  else f"per fold {min(p['threshold']):.4f}-{max(p['threshold']):.4f}"))
    for key, label in (("balanced_accuracy", "balanced accuracy"), ("accuracy", "accuracy"), ("f1", "F1 (IDC)"),
                       ("precision", "precision (IDC)"), ("recall", "recall / sensitivity"),
                       ("specificity", "specificity"), ("roc_auc", "ROC AUC"), ("ece", "ECE (calibration)")):
        band = ci.get(key) or {}
        interval = (f"  95% CI {_fmt(band.get('low'))}-{_fmt(band.get('high'))} ({band.get('n_valid', 0)} replicates)"
                    if band.get("low") is not None else "")
        click.echo(f"  {label:<22}{_fmt(p.get(key))}{interval}")
    (tn, fp), (fn, tp) = p["confusion"]
    click.echo(f"  confusion (rows true non-IDC, IDC): [[{tn}, {fp}], [{fn}, {tp}]]")
    s = a.patient
    click.echo(f"  per patient: mean accuracy {_fmt(s['patient_mean_accuracy'])}, IDC-fraction error "
               f"{_fmt(s['idc_fraction_mae'])} (mean absolute), {s['n_patients_both_classes']} with both classes")
    click.echo(f"    {'patient':<10}{'role':<9}{'patches':>8}{'IDC true':>10}{'IDC pred':>10}{'accuracy':>10}"
               f"{'bal.acc':>9}{'AUC':>7}")
    for r in a.rows:
        click.echo(f"    {r.patient:<10}{r.role:<9}{r.n:>8}{r.true_idc_fraction:>10.3f}{r.pred_idc_fraction:>10.3f}"
                   f"{r.accuracy:>10.3f}{_fmt(r.balanced_accuracy):>9}{_fmt(r.roc_auc):>7}")


@cli.command()
@click.argument("data", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
@click.option("--val-fraction", default=0.2, show_default=True, type=Number(0, 0.9, low_open=True),
              help="Share of patients held out for validation (early stopping, threshold).")
@click.option("--test-fraction", default=0.0, show_default=True, type=Number(0, 0.8),
              help="Share of patients held out as a test set that training never sees.")
@click.option("--split", "split_file", type=click.Path(), default=None,
              help="Published patient split: a folder with cases_{train,val,test}.txt, one such file, or a split.json.")
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--epochs", default=TrainConfig.epochs, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, MAX_BATCH))
@click.option("--learning-rate", default=1e-3, show_default=True, type=Number(0, 10, low_open=True))
@click.option("--width", default=TrainConfig.width, show_default=True, type=click.IntRange(min=4),
              help="Filters in the first block (CancerNet's original: 32).")
@click.option("--conv", default="separable", show_default=True, type=click.Choice(["separable", "plain"]),
              help="Depthwise-separable or plain convolutions.")
@click.option("--mpp", default=DEFAULT_MPP, show_default=True, type=MPP, help="Resolution of the training patches, µm/px.")
@click.option("--patience", default=3, show_default=True, type=click.IntRange(min=1), help="Early-stopping patience (epochs).")
@click.option("--stain-jitter", default=None, type=Number(0, 0.5),
              help="H&E stain augmentation strength, 0 = off [default: TrainConfig's].")
@click.option("--bootstrap", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Bootstrap replicates (over patients) for the confidence intervals.")
@click.option("--cv", "cv", default=0, show_default=True, type=click.IntRange(min=0),
              help="K-fold cross-validation over patients (0 = one train/validation split): per-fold and pooled "
                   "out-of-fold metrics; the exported model averages the K fold models.")
@click.option("--tta/--no-tta", default=False, show_default=True,
              help="Test-time augmentation: the exported model averages the 8 flips/rotations of each tile.")
@click.option("--ensemble/--no-ensemble", default=True, show_default=True,
              help="With --cv: export the K fold models averaged (else one model retrained on all patients).")
@click.option("--calibrate", default=None, type=click.Choice(CALIBRATIONS),
              help="Calibration fitted on out-of-fold (with --cv) or validation logits, baked into the model "
                   "[default: none; cross-validation found neither helping on unseen patients: training/RESULTS.md].")
@click.option("--stain-norm", default="none", show_default=True, type=click.Choice(STAIN_NORMS),
              help="Per-patient stain normalisation from each patient's own pixels (no labels); for "
                   "cross-validation experiments: scoring does not normalise yet (training/RESULTS.md).")
@click.option("--overwrite", is_flag=True, help="Replace a model already in --out.")
def train(data: tuple[str, ...], out: str, val_fraction: float, test_fraction: float, split_file: str | None, seed: int,
          epochs: int, batch_size: int, learning_rate: float, width: int, conv: str, mpp: float, patience: int,
          stain_jitter: float | None, bootstrap: int, cv: int, tta: bool, ensemble: bool, calibrate: str | None,
          stain_norm: str, overwrite: bool) -> int:
    """Train CancerNet on Kaggle-layout patch folders with a patient-level split.

    Writes OUT/model.keras, model.json, model.onnx, split.json, curves.png, confusion.png,
    roc.png, patients.png, per_patient.csv, classification_report.txt and metrics.json.
    """

    config = TrainConfig(val_fraction=val_fraction, test_fraction=test_fraction, split_file=split_file, seed=seed,
                         epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, width=width,
                         separable=conv == "separable", mpp=mpp, patience=patience, bootstrap=bootstrap,
                         cv=cv, tta=tta, ensemble=ensemble,
                         calibrate=calibrate or "none", stain_norm=stain_norm,
                         **({} if stain_jitter is None else {"stain_jitter": stain_jitter}))
    _quiet_backends()
    from .train import TrainProgress, train as run_training

    class _Progress(TrainProgress):
        bar = None

        def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
            self.bar = _bar(steps, "batch", f"epoch {epoch}/{epochs}")

        def batch_end(self) -> None:
            self.bar.update(1)

        def fold_start(self, fold: int, folds: int, held_out) -> None:
            click.echo(f"fold {fold}/{folds}: " + (f"held out {', '.join(held_out)}" if held_out
                                                   else "the exported model, on every patient"))

        def epoch_end(self, epoch: int, logs: dict, seconds: float) -> None:
            self.bar.close()
            val = (f" | val loss {logs.get('val_loss', float('nan')):.4f} acc {logs.get('val_accuracy', float('nan')):.4f} "
                   f"auc {logs.get('val_auc', float('nan')):.4f}" if "val_loss" in logs else "")
            click.echo(f"epoch {epoch}: loss {logs.get('loss', float('nan')):.4f} acc {logs.get('accuracy', float('nan')):.4f} "
                       f"auc {logs.get('auc', float('nan')):.4f}{val} ({seconds:.1f} s)")

    with _bar(None, "file", "reading patches") as bar:
        res = run_training(list(data), out, config, progress=_Progress(), load_progress=bar.update, overwrite=overwrite)
    if cv:
        _echo_cv(res)
        return exit_for(len(res.failures))
    t = res.meta.training
    click.echo(f"kept epoch {t['best_epoch']} of {t['epochs_run']} (lowest validation loss); "
               f"{t['seconds_per_epoch']:.1f} s per epoch")
    click.echo(f"split: train {len(res.split.train)} patients, val {len(res.split.val)} ({', '.join(res.split.val)})"
               + (f", test {len(res.split.test)} ({', '.join(res.split.test)})" if res.split.test else ""))
    click.echo(f"threshold {res.meta.threshold:.4f}: {res.meta.threshold_rule}")
    _echo_assessment("validation", res.val)
    if res.test is not None:
        _echo_assessment("test", res.test)
    _echo_written(res)
    return exit_for(len(res.failures))


def _echo_written(res) -> None:
    """The model folder a training wrote, and where its unreadable patch files are listed."""
    from .modelfolder import ModelFolder

    click.echo(f"wrote {res.out_dir} (model {res.meta.model_id}{f', {res.onnx.name}' if res.onnx else ''})")
    if res.failures:
        click.echo(f"{len(res.failures)} patch file(s) could not be read; see {ModelFolder(res.out_dir).failures}",
                   err=True)


def _echo_cv(res) -> None:
    """The cross-validation summary: pooled out-of-fold metrics, per fold, every variant, the exported model."""
    cv, meta = res.cv, res.meta
    click.echo(f"{cv['folds']}-fold cross-validation over patients; out-of-fold: {cv['measures']}")
    for f, held in enumerate(cv["held_out"], start=1):
        click.echo(f"  fold {f}: {', '.join(held)}")
    _echo_assessment(f"pooled out-of-fold ({cv['variant']}, calibration {cv['calibration']})", res.val)
    click.echo(f"  ECE uncalibrated {_fmt(cv['ece_uncalibrated'])} -> {_fmt(res.val.patch['ece'])} calibrated")
    click.echo(f"    {'fold':<6}{'patches':>8}{'bal.acc':>9}{'F1':>7}{'AUC':>7}{'ECE':>7}")
    for f, a in enumerate(res.per_fold, start=1):
        p = a.patch
        click.echo(f"    {f:<6}{p['n']:>8}{_fmt(p['balanced_accuracy']):>9}{_fmt(p['f1']):>7}{_fmt(p['roc_auc']):>7}"
                   f"{_fmt(p['ece']):>7}")
    click.echo(f"    {'variant':<22}{'bal.acc':>9}{'F1':>7}{'AUC':>7}{'ECE':>7}")
    for name, v in cv["variants"].items():
        click.echo(f"    {name:<22}{_fmt(v['balanced_accuracy']):>9}{_fmt(v['f1']):>7}{_fmt(v['roc_auc']):>7}"
                   f"{_fmt(v['ece']):>7}")
    s = meta.scoring
    c = s["calibration"]
    click.echo(f"exported: {s['member_kind']} (mean logit){', x8 flips/rotations' if s['tta'] else ''}, calibration "
               f"{c['method']} (a {c['a']:.4f}, b {c['b']:.4f}), threshold {meta.threshold:.4f}")
    _echo_written(res)


@cli.command()
@click.argument("model_dir", type=click.Path())
@click.argument("data", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Folder for evaluation.json, per_patient.csv and figures [default: MODEL_DIR/evaluation].")
@click.option("--patients", "role", default="held-out", show_default=True,
              type=click.Choice(["held-out", "val", "test", "unseen"]),
              help="Which patients to score; training patients are always left out.")
@click.option("--engine", default="auto", show_default=True, type=click.Choice(ENGINE_CHOICES))
@click.option("--bootstrap", default=1000, show_default=True, type=click.IntRange(min=0))
@click.option("--seed", default=0, show_default=True, type=int)
def evaluate(model_dir: str, data: tuple[str, ...], out: str | None, role: str, engine: str, bootstrap: int,
             seed: int) -> int:
    """Evaluate a model on patches of held-out patients (patch- and patient-level metrics)."""
    _quiet_backends()
    from .evaluate import evaluate as run_evaluation

    with _bar(None, "file", "reading patches") as bar_load, _bar(None, "patch", "scoring") as bar_score:
        res = run_evaluation(model_dir, list(data), out_dir=out, role=role, engine=engine, bootstrap=bootstrap,
                             seed=seed, load_progress=bar_load.update, score_progress=bar_score.update)
    if res.excluded_training:
        click.echo(f"left out {len(res.excluded_training)} training patient(s): {', '.join(res.excluded_training)}")
    _echo_assessment(f"{role} patients ({res.engine})", res.assessment)
    click.echo(f"wrote {res.out_dir}")
    return exit_for(len(res.failures))


@cli.command()
@click.argument("model_dir", type=click.Path())
def export(model_dir: str) -> None:
    """Export MODEL_DIR/model.keras to MODEL_DIR/model.onnx (checked equal within 1e-5)."""
    _quiet_backends()
    from .model import export_onnx

    path = export_onnx(model_dir)
    click.echo(f"wrote {path} (ONNX Runtime equals Keras within 1e-5 on random tiles)")


# ----------------------------------------------------------------------------------------------
# inspect / tile / predict / report / run
# ----------------------------------------------------------------------------------------------

def _parse_storage_options(ctx, param, value: str | None) -> dict | None:
    """``--storage-options``: a JSON object, or ``@FILE`` holding one. Never echoed: it may hold secrets."""
    import json

    if value is None:
        return None
    text = value
    if value.startswith("@"):
        try:
            with open(value[1:], encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {value[1:]!r}: {exc.strerror or exc}") from None
    try:
        out = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not a JSON object (JSON error at line {exc.lineno}, column {exc.colno}); "
                                 "give '{\"key\": ...}' or @FILE") from None
    if not isinstance(out, dict):
        raise click.BadParameter("not a JSON object; give '{\"key\": ...}' or @FILE")
    return out


STORAGE_OPTIONS = click.option(
    "--storage-options", "storage_options", default=None, metavar="JSON|@FILE", callback=_parse_storage_options,
    help="For a run folder and inputs on object storage (s3://, gs://, az://): fsspec options as a JSON object "
         "or @FILE, e.g. '{\"client_kwargs\": {\"endpoint_url\": \"http://host:9000\"}}'; one set serves both. "
         "Default: the standard places (AWS_* environment, ~/.aws profiles, AWS_ENDPOINT_URL). Never printed or "
         "recorded.")


def _run_of(location: str, storage_options: dict | None, inputs=()):
    """The :class:`Run` for a command's run folder (a path or an fsspec URL); ``storage_options`` serve
    both the run folder and the ``inputs`` given as URLs."""
    from .remote import is_url
    from .runfolder import Run, url_scheme

    remote_inputs = any(is_url(i) for i in inputs)
    if storage_options is not None and url_scheme(location) in (None, "file") and not remote_inputs:
        raise click.BadParameter("--storage-options is for run folders and inputs on object storage "
                                 "(s3://, gs://, az://)", param_hint="'--storage-options'")
    run = Run.of(location, storage_options if is_url(location) else None,
                 input_options=storage_options if remote_inputs else None)
    return run


STAGE_CACHE = click.option(
    "--stage-cache-gb", default=20.0, show_default=True, type=Number(0, 1e6, low_open=True, unit="GB"),
    help="Size limit of each machine's local copies of object-storage slides that only OpenSlide reads (DICOM, "
         "MRXS...; TIFF/SVS are read in place by range requests; a DICOM object comes with its folder's DICOM "
         "objects, its series); $CANCERNET_STAGE_DIR sets where.")


def _tiling_options(f):
    """Options shared by ``inspect`` and ``tile``: resolution, tissue filter, preflight."""
    opts = [
        click.option("--model", "model_dir", default=None, type=click.Path(),
                     help="Model folder: tile at the µm/px in its model.json."),
        click.option("--mpp", default=None, type=MPP, help=f"Target µm/px (default: the model's, else {DEFAULT_MPP})."),
        click.option("--mpp-override", default=None, type=MPP,
                     help="Source µm/px for slides that state none or an implausible one (outside 0.05-20)."),
        click.option("--tissue-threshold", default=0.25, show_default=True, type=FRACTION,
                     help="Keep a tile when at least this fraction of it is tissue."),
        click.option("--no-tissue-filter", is_flag=True, help="Keep every tile, background included."),
        click.option("--preflight-timeout", default=60.0, show_default=True, type=SECONDS,
                     help="Seconds a slide may take to open in the preflight child process."),
        click.option("--read-timeout", default=DEFAULT_READ_TIMEOUT, show_default=True, type=SECONDS,
                     help=READ_TIMEOUT_HELP),
        DECODE_OPTION,
        STAGE_CACHE,
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _tile_config(kw: dict, chunk: int | None = None):
    from .model import target_mpp
    from .config import TileConfig

    extra = {"chunk": chunk} if chunk else {}
    return TileConfig(target_mpp=target_mpp(kw.pop("model_dir"), kw.pop("mpp")), mpp_override=kw.pop("mpp_override"),
                      tissue_threshold=kw.pop("tissue_threshold"), tissue_filter=not kw.pop("no_tissue_filter"),
                      preflight_timeout=kw.pop("preflight_timeout"), read_timeout=kw.pop("read_timeout"),
                      decode=kw.pop("decode"), stage_cache_gb=kw.pop("stage_cache_gb", 20.0), **extra)


def check_out_not_inside_inputs(out: str, inputs) -> None:
    """Usage error (exit 2) when the run folder ``out`` is one of ``inputs`` or lies inside one.

    A run folder inside an input would be searched as input on the next run, and its writes would
    change the input (a patient folder's mtime and size: re-tiled every time); inside a patient's
    ``0/`` or ``1/`` folder its files would be read as patches.
    """
    import os
    from pathlib import Path

    from .runfolder import url_scheme

    def real(p: str) -> Path:
        return Path(os.path.realpath(os.path.abspath(p)))

    if url_scheme(out) not in (None, "file"):
        return  # on object storage: never inside a local input
    if url_scheme(out) == "file":
        out = out[len("file://"):] or "/"
    o = real(out)
    for raw in inputs:
        i = real(raw)
        if o == i or i in o.parents:
            raise click.BadParameter(f"{out!r} is inside the input {raw!r}; give a run folder outside every input",
                                     param_hint="'--out'")


def _growing(bar):
    """A ``progress(done, added)`` callback for a bar whose total grows as work is planned (tiling)."""
    def progress(done: int, added: int) -> None:
        if added:
            bar.total = (bar.total or 0) + added
            bar.refresh()
        if done:
            bar.update(done)

    return progress


def _echo_inspection(e: dict) -> None:
    click.echo(e["source"])
    if e.get("reader"):
        click.echo(f"  reader      {e['reader']}" + (f", vendor {e['vendor']}" if e.get("vendor") else ""))
    for i, lv in enumerate(e.get("levels") or []):
        mpp = "? µm/px" if lv["mpp"] is None else f"{lv['mpp']:.4g} µm/px"
        click.echo(f"  level {i:<5} {lv['width']} x {lv['height']} px, downsample {lv['downsample']:.4g}, {mpp}")
    if e.get("series_of"):
        click.echo(f"  series      same DICOM series as {e['series_of']}: tiled once, with it")
        return
    if "error" in e:
        err = e["error"]
        click.echo(f"  error       {err['error_class']} at {err['stage']}: {err['message']}")
        return
    if e["kind"] == "patches":
        click.echo(f"  patches     {e['tissue_tiles']} patches of patient {e['patient']}, grid {e['grid_shape'][0]} x "
                   f"{e['grid_shape'][1]}, assumed at the model's {e['target_mpp']:g} µm/px")
        return
    click.echo(f"  resolution  {e['source_mpp']:.4g} µm/px ({'from the file' if e['mpp_source'] == 'file' else e['mpp_source']})")
    click.echo(f"  chosen      level {e['level']} (downsample {e['level_downsample']:.4g}, {e['level_mpp']:.4g} µm/px), "
               f"scale {e['scale']:.4g} -> {e['target_mpp']:g} µm/px")
    if e.get("decode_path"):
        click.echo(f"  decode      {e['decode_path']} (--decode {e['decode']})")
    rows, cols = e["grid_shape"]
    click.echo(f"  grid        {rows} x {cols} = {e['grid_tiles']} tiles of {50 * e['target_mpp']:g} µm "
               f"({e['level0_tile_px']:.4g} level-0 px; partial edge tiles dropped)")
    if e["tissue_threshold"] is None:
        click.echo(f"  tissue      filter off: all {e['tissue_tiles']} tiles kept")
    else:
        on = f" on {e['view_source']}" if e.get("view_source") else ""  # the view the mask was made on
        click.echo(f"  tissue      {e['tissue_tiles']} tiles with tissue >= {e['tissue_threshold']:g} (estimated{on}), "
                   f"{e['background_tiles']} background")


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@_tiling_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@STORAGE_OPTIONS
def inspect(inputs: tuple[str, ...], as_json: bool, storage_options: dict | None, **kw) -> int:
    """Show what tiling would do for each input, without doing it.

    \b
    Per input: reader and vendor, pyramid levels (size, µm/px), the level tiling would read and
    its scale, the model grid, and the estimated number of tissue tiles; or why it would fail.
    Exit status 3 when some inputs would fail.
    """
    import json

    from .tiling import inspect_inputs

    from .remote import is_url

    if storage_options is not None and not any(is_url(i) for i in inputs):
        raise click.BadParameter("--storage-options is for inputs on object storage (s3://, gs://, az://)",
                                 param_hint="'--storage-options'")
    entries = inspect_inputs(list(inputs), _tile_config(kw), storage_options)
    if as_json:
        click.echo(json.dumps(entries, indent=2, ensure_ascii=False))
    else:
        for e in entries:
            _echo_inspection(e)
    return exit_for(sum(1 for e in entries if "error" in e))


def _cluster_options(f):
    """Options shared by every command that runs on Dask."""
    opts = [
        click.option("--scheduler", default=None, metavar="ADDRESS",
                     help="Existing Dask scheduler (tcp://HOST:8786 or tls://...); default: a local cluster."),
        click.option("--workers", default=None, type=click.IntRange(1, MAX_WORKERS), help="Local cluster workers (default: cores)."),
        click.option("--threads-per-worker", default=None, type=click.IntRange(1, MAX_WORKERS), help="Threads per local worker (default 1; 2 when inputs or the run folder are on object storage)."),
        click.option("--tls-ca-file", default=None, type=click.Path(), help="CA certificate for a tls:// scheduler."),
        click.option("--tls-cert", default=None, type=click.Path(), help="Client certificate for a tls:// scheduler."),
        click.option("--tls-key", default=None, type=click.Path(), help="Client key for a tls:// scheduler."),
        click.option("--score-workers", default=None, type=click.IntRange(min=0),
                     help="Local workers that only score; the others only tile (default: 1 with --device gpu, "
                          "else 0: every worker does both)."),
        click.option("--connect-timeout", default=30.0, show_default=True, type=SECONDS,
                     help="Seconds to reach --scheduler (connection and handshake) before giving up."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _start_workers_early(cluster, locations=()):
    """Start the process local workers are forked from now, so its imports overlap the client's own (with the
    storage driver that ``locations``, the inputs and run folder, need on object storage). Returns the cluster
    settings to start: with more threads per worker when ``locations`` are on object storage and none were given
    (:func:`cluster.for_locations`)."""
    from .cluster import for_locations, start_forkserver, storage_drivers

    cluster = for_locations(cluster, locations)
    start_forkserver(cluster, also=storage_drivers(locations))
    return cluster


def _cluster_config(kw: dict, device: str | None = None):
    from .config import ClusterConfig

    tls = {k: kw.pop(k, None) for k in ("tls_ca_file", "tls_cert", "tls_key")}
    if any(tls.values()) and not kw.get("scheduler"):
        given = ", ".join("--" + k.replace("_", "-") for k, v in tls.items() if v)
        raise click.UsageError(f"{given} only apply to a --scheduler tls://... address; give --scheduler or drop them")
    score_workers = kw.pop("score_workers", None)
    if score_workers is None and device == "gpu" and not kw.get("scheduler"):
        score_workers = 1  # one scoring worker on the GPU, the other workers decode and tile
    return ClusterConfig(scheduler=kw.pop("scheduler", None), workers=kw.pop("workers", None),
                         threads_per_worker=kw.pop("threads_per_worker", None), tls_ca_file=tls["tls_ca_file"],
                         tls_cert=tls["tls_cert"], tls_key=tls["tls_key"], score_workers=score_workers or None,
                         connect_timeout=kw.pop("connect_timeout", 30.0))


def _region_options(f):
    """Options of the report's outputs, shared by report and run."""
    for opt in reversed([
        click.option("--min-region-mm2", default=0.0, show_default=True, type=Number(0, 1e6, unit="MM2"),
                     help="Leave IDC regions smaller than this (mm²) out of regions.geojson and the region counts."),
        click.option("--region-smoothing", default=0, show_default=True, type=click.IntRange(0, 8),
                     help="Rounds of corner cutting of the region outlines, for display (0: exact tile edges)."),
        click.option("--geojson-gzip", is_flag=True, help="Write the per-tile GeoJSON gzipped (<id>.geojson.gz)."),
    ]):
        f = opt(f)
    return f


def _region_config(min_region_mm2: float, region_smoothing: int, geojson_gzip: bool) -> dict:
    return {"min_region_mm2": min_region_mm2, "region_smoothing": region_smoothing, "geojson_gzip": geojson_gzip}


def _predict_options(f):
    opts = [
        click.option("--model", "model_dir", required=True, type=click.Path(), help="Model folder (model.keras, model.json)."),
        click.option("--engine", default="auto", show_default=True, type=click.Choice(ENGINE_CHOICES),
                     help="auto: ONNX Runtime on CPU, Keras on GPU."),
        click.option("--backend", default=None, type=click.Choice(BACKENDS),
                     help="Keras backend for --engine keras (default: KERAS_BACKEND, else tensorflow)."),
        click.option("--device", default="cpu", show_default=True, type=click.Choice(DEVICES)),
        click.option("--batch-size", default=None, type=click.IntRange(1, MAX_BATCH),
                     help="Tiles per model call (default 256 on CPU, 2048 on GPU)."),
        click.option("--micro-batch", default=None, type=click.IntRange(0, MAX_BATCH),
                     help="ONNX Runtime: tiles per call within each batch (default on CPU 8 per engine thread, which "
                     "keeps a call's activations in the cores' caches; 0: whole batches)."),
        click.option("--rescore", is_flag=True, help="Replace predictions made by another model."),
        click.option("--autotune", is_flag=True, help="Use the engine, workers, threads and batch size `cancernet bench` "
                     "saved here (run: the workers of its fastest whole run, scoring workers included)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _predict_config(kw: dict, *, whole_run: bool = False):
    """The predict settings of ``kw`` (popped). ``whole_run``: for ``cancernet run``, whose ``--autotune`` starts the
    whole run's fastest layout (workers, threads, scoring workers) that ``bench`` measured, where it saved one."""
    import os

    from .config import PredictConfig

    backend = kw.pop("backend", None)
    if backend:
        os.environ["KERAS_BACKEND"] = backend  # inherited by local worker processes
    if kw.pop("autotune", False):
        from .autotune import autotune_path, load_autotune

        saved = load_autotune()
        if saved is None:
            raise ConfigError("no saved autotune for this machine", path=autotune_path(),
                              hint="run `cancernet bench` here first, or drop --autotune")
        if saved.get("device", "cpu") != kw["device"]:  # a CPU bench's batch and workers are not a GPU run's
            raise ConfigError(f"the saved autotune was measured with --device {saved.get('device', 'cpu')}, not "
                              f"--device {kw['device']}", path=autotune_path(),
                              hint=f"run `cancernet bench --device {kw['device']}` here first, or drop --autotune")
        kw["batch_size"] = kw["batch_size"] or int(saved["batch_size"])  # explicit options win
        layout = saved.get("run") if whole_run else None
        if layout and not kw.get("workers") and kw.get("score_workers") is None and not kw.get("scheduler"):
            kw["workers"] = int(layout["workers"])  # the layout as measured, or not at all: given workers keep theirs
            kw["score_workers"] = int(layout.get("score_workers") or 0)
            kw["threads_per_worker"] = kw.get("threads_per_worker") or int(layout.get("threads_per_worker", 1))
        kw["workers"] = kw.get("workers") or int(saved["workers"])
        kw["threads_per_worker"] = kw.get("threads_per_worker") or int(saved.get("threads_per_worker", 1))
        if kw["engine"] == "auto" and saved.get("engine") in ENGINES:
            kw["engine"] = saved["engine"]  # the engine bench measured fastest here, unless --engine says otherwise
            if kw["engine"] == "keras" and backend is None and saved.get("backend"):
                backend = os.environ.get("KERAS_BACKEND") or saved["backend"]  # an explicit environment wins
                os.environ["KERAS_BACKEND"] = backend
    if kw["batch_size"] is None:
        kw["batch_size"] = DEFAULT_BATCH[kw["device"]]
    device = kw.pop("device")
    return PredictConfig(model_dir=kw.pop("model_dir"), engine=kw.pop("engine"), backend=backend,
                         device=device, batch_size=kw.pop("batch_size"), micro_batch=kw.pop("micro_batch", None),
                         rescore=kw.pop("rescore"),
                         cluster=_cluster_config(kw, device))


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run folder.")
@_tiling_options
@click.option("--chunk-size", default=None, type=click.IntRange(1, MAX_BATCH),
              help="Tiles per store chunk, the unit of work of tile and predict (default 1024).")
@STORAGE_OPTIONS
@_cluster_options
def tile(inputs: tuple[str, ...], out: str, chunk_size: int | None, storage_options: dict | None, **kw) -> int:
    """Tile slides and patient folders into RUN/tiles.zarr (resumable).

    \b
    INPUT: slide files, folders (searched recursively for slides and patient folders), or patient
    folders (Kaggle layout). Each slide is read from the pyramid level with the largest downsample
    that still has the detail of the target µm/px, and area-averaged to exactly that resolution.
    Failed inputs go to RUN/failures.csv (exit status 3); the others are tiled.
    """
    check_out_not_inside_inputs(out, inputs)
    # first: the workers' imports are the longest step before the first tile
    cluster = _start_workers_early(_cluster_config(kw), (*inputs, out))
    run_folder = _run_of(out, storage_options, inputs)
    cfg = _tile_config(kw, chunk_size)
    from .runfolder import Run
    from .stages.tile import tile_run

    with _bar(None, "tile", "tile") as bar:
        s = tile_run(list(inputs), run_folder, cfg, cluster=cluster, progress=_growing(bar),
                     on_dashboard=lambda url: click.echo(f"dask dashboard: {url}", err=True))
    for source in s.tiled:
        p = s.plans.get(source, {})
        how = (f"level {p.get('level')}, scale {p.get('scale', 1):.4g}" if p.get("kind") == "slide" else "patches")
        resumed = " (resumed)" if source in s.resumed else ""
        click.echo(f"tiled    {source}: {p.get('tissue_tiles', 0)} tiles, grid {p.get('grid_shape', [0, 0])[0]} x "
                   f"{p.get('grid_shape', [0, 0])[1]}, {how}{resumed}")
    for member, rep in sorted(s.series_members.items()):
        click.echo(f"series   {member}: same DICOM series as {rep}")
    for f in s.failures:
        click.echo(f"failed   {f.input} ({f.stage}): {f.message}")
    click.echo(f"tile: {len(s.tiled)} inputs tiled ({s.tiles_written} tiles, {s.chunks_written} chunks), "
               f"{len(s.skipped)} skipped (complete, unchanged), {len(s.failed_inputs)} failed in {s.seconds:.1f} s "
               f"-> {Run.of(s.run_dir).store_path}")
    if s.failures:
        click.echo(f"failures: {Run.of(s.run_dir).failures_csv}")
    return exit_for(len(s.failures))

@cli.command()
@click.argument("run_dir", type=click.Path())
@_predict_options
@STORAGE_OPTIONS
@_cluster_options
def predict(run_dir: str, storage_options: dict | None, **kw) -> int:
    """Score the tiles of a run with Dask (local cluster or --scheduler); resumable."""
    from dataclasses import replace

    from .stages.score import predict_run

    cfg = _predict_config(kw)
    cfg = replace(cfg, cluster=_start_workers_early(cfg.cluster, (run_dir,)))
    run_folder = _run_of(run_dir, storage_options)
    with _bar(None, "patch", "predict") as bar:
        s = predict_run(run_folder, cfg, progress=bar.update,
                        on_dashboard=lambda url: click.echo(f"dask dashboard: {url}", err=True))
    click.echo(f"predict: {s.inputs} inputs, {s.tiles_scored} patches scored in {s.seconds:.1f} s "
               f"({s.patches_per_second:.0f} patches/s); {s.chunks_skipped} chunks already done; "
               f"{len(s.failures)} inputs failed")
    return exit_for(len(s.failures))


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--threshold", default=None, type=FRACTION,
              help="Decision threshold (default: the model's, from --model or RUN/predict.json, else 0.5).")
@click.option("--patients", "patients_csv", default=None, type=click.Path(dir_okay=False),
              help="CSV input,patient: input is a source file name, path or input id.")
@click.option("--model", "model_dir", default=None, type=click.Path(file_okay=False),
              help="Model folder whose model.json gives the decision threshold.")
@_region_options
@STORAGE_OPTIONS
def report(run_dir: str, threshold: float | None, patients_csv: str | None, model_dir: str | None,
           storage_options: dict | None, **regions) -> int:
    """Write IDC maps, heatmaps, GeoJSON (tiles and regions), CSV summaries and index.html into RUN/report."""
    from .stages.report import ReportConfig, make_report

    cfg = ReportConfig(threshold=threshold, patients_csv=patients_csv, model_dir=model_dir,
                       **_region_config(**regions))
    run_folder = _run_of(run_dir, storage_options)
    with _bar(None, "input", "report") as bar:
        s = make_report(run_folder, cfg, progress=bar.update)
    click.echo(f"report: {s.index}")
    click.echo(f"{s.reported} inputs reported, {s.not_scored} not scored, {s.failed} failed; "
               f"{len(s.patients)} patients; threshold {s.threshold.value:g} from {s.threshold.source}")
    for r in s.inputs:
        if r.figures.status != "reported":
            click.echo(f"  {r.figures.status}: {r.figures.source} ({r.figures.note})")
    return exit_for(s.not_scored + s.failed)


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run folder.")
@_predict_options
@click.option("--mpp-override", default=None, type=MPP,
              help="Source µm/px for slides that state none or an implausible one (outside 0.05-20).")
@click.option("--tissue-threshold", default=0.25, show_default=True, type=FRACTION,
              help="Keep a tile when at least this fraction of it is tissue.")
@click.option("--no-tissue-filter", is_flag=True, help="Keep every tile, background included.")
@click.option("--preflight-timeout", default=60.0, show_default=True, type=SECONDS,
              help="Seconds a slide may take to open in the preflight child process.")
@click.option("--read-timeout", default=DEFAULT_READ_TIMEOUT, show_default=True, type=SECONDS, help=READ_TIMEOUT_HELP)
@DECODE_OPTION
@STAGE_CACHE
@click.option("--chunk-size", default=None, type=click.IntRange(1, MAX_BATCH),
              help="Tiles per store chunk (default 1024; the first and last inputs: an eighth, at least 8).")
@click.option("--threshold", default=None, type=FRACTION, help="Decision threshold (default: the model's).")
@click.option("--patients", "patients_csv", default=None, type=click.Path(dir_okay=False),
              help="CSV input,patient mapping slides to patients.")
@click.option("--until", "until", default=None, metavar="HH:MM",
              help="Start no new input after this local time (the next such time from now); exit status 3.")
@click.option("--max-hours", default=None, type=Number(0, 24 * 366, low_open=True, unit="HOURS"),
              help="Start no new input after this many hours; exit status 3.")
@click.option("--max-inputs-in-flight", "max_inputs", default=None, type=click.IntRange(min=1),
              help="Inputs on their way at once (default: 2 per worker thread, at least 4).")
@click.option("--report-every", default=5.0, show_default=True, type=Number(0, 3600, unit="SECONDS"),
              help="Seconds between rewrites of the report tables, index.html and progress.json while the run goes.")
@_region_options
@STORAGE_OPTIONS
@_cluster_options
def run(inputs: tuple[str, ...], out: str, chunk_size: int | None, threshold: float | None, patients_csv: str | None,
        until: str | None, max_hours: float | None, max_inputs: int | None, report_every: float,
        min_region_mm2: float, region_smoothing: int, geojson_gzip: bool, storage_options: dict | None, **kw) -> int:
    """Tile, score and report in one resumable command, each input as a stream (tiles at the model's µm/px).

    \b
    Each input is scored as its tiles are written and reported as soon as it is scored; RUN/report
    is rewritten every few seconds, so it always covers every finished input. Watch it from another
    terminal with `cancernet status RUN`. Running the same command again after a kill, or after
    --until/--max-hours stopped it, continues where it stopped.
    """
    check_out_not_inside_inputs(out, inputs)
    deadline = _deadline(until, max_hours)

    model_dir = kw["model_dir"]
    tile_kw = {**kw, "mpp": None}
    for k in ("mpp_override", "tissue_threshold", "no_tissue_filter", "preflight_timeout", "read_timeout", "decode",
              "stage_cache_gb"):
        kw.pop(k)
    from dataclasses import replace

    predict_cfg = _predict_config(kw, whole_run=True)  # before the workers start: it may set KERAS_BACKEND for them
    # first: the workers' imports are the longest step
    predict_cfg = replace(predict_cfg, cluster=_start_workers_early(predict_cfg.cluster, (*inputs, out)))
    run_folder = _run_of(out, storage_options, inputs)
    tile_cfg = _tile_config(tile_kw, chunk_size)
    from .stages.report import ReportConfig
    from .stages.run import run_pipeline

    with _bar(None, "tile", "tile") as tbar, _bar(None, "patch", "predict") as pbar:
        s = run_pipeline(list(inputs), run_folder, tile_cfg, predict_cfg,
                         ReportConfig(threshold=threshold, patients_csv=patients_csv, model_dir=model_dir,
                                      **_region_config(min_region_mm2, region_smoothing, geojson_gzip)),
                         tile_progress=_growing(tbar), predict_progress=pbar.update, deadline=deadline,
                         max_inputs=max_inputs, flush_seconds=report_every, on_dashboard=lambda url: click.echo(f"dask dashboard: {url}", err=True))
    for line in s.lines():
        click.echo(line)
    return exit_for(len(s.failed_inputs) + s.report.not_scored + s.remaining)


def _deadline(until: str | None, max_hours: float | None) -> float | None:
    """The time (``time.time()``) after which no new input starts, from --until HH:MM and/or --max-hours."""
    import datetime
    import time

    out = []
    if max_hours is not None:
        out.append(time.time() + max_hours * 3600)
    if until is not None:
        try:
            t = datetime.datetime.strptime(until.strip(), "%H:%M").time()
        except ValueError:
            raise click.BadParameter(f"expected a local time HH:MM, got {until!r}", param_hint="--until") from None
        now = datetime.datetime.now()
        at = datetime.datetime.combine(now.date(), t)
        if at <= now:
            at += datetime.timedelta(days=1)
        out.append(at.timestamp())
    return min(out) if out else None


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the progress record as JSON.")
@STORAGE_OPTIONS
def status(run_dir: str, as_json: bool, storage_options: dict | None) -> int:
    """How far a run is: inputs done / failed / remaining, patches scored, rate, finish time.

    Read from the run folder alone: works while the run is going (from another terminal) and
    after it stopped or died.
    """
    import json

    from .status import run_status

    st = run_status(_run_of(run_dir, storage_options))
    if as_json:
        click.echo(json.dumps(st, indent=2))
    else:
        for line in st["lines"]:
            click.echo(line)
    return EXIT_OK


def _int_list(ctx, param, value: str | None):
    if value is None:
        return None
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter("expected positive integers")
    return out


def _name_list(allowed: tuple[str, ...]):
    """A click callback for comma-separated names out of ``allowed``."""

    def parse(ctx, param, value):
        if value is None:
            return None
        out = tuple(v.strip() for v in value.split(",") if v.strip())
        bad = [v for v in out if v not in allowed]
        if not out or bad:
            raise click.BadParameter(f"expected comma-separated names out of {', '.join(allowed)}, got {value!r}")
        return out

    return parse


def _variants(value: str) -> tuple[str, ...]:
    from .bench import parse_variant

    out = tuple(v.strip() for v in value.split(",") if v.strip() and v.strip() != "none")
    for v in out:
        try:
            parse_variant(v)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return out


@cli.command()
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option("--model", "model_dir", default=None, type=click.Path(),
              help="Model folder (default: CancerNet of the default width with random weights).")
@click.option("--synthetic-slides", default=2, show_default=True, type=click.IntRange(min=1),
              help="Without INPUT: how many synthetic slides to make.")
@click.option("--size", default=10000, show_default=True, type=click.IntRange(min=512), help="Synthetic slide side, px.")
@click.option("--batch-sizes", default="256,1024,4096", show_default=True, callback=_int_list)
@click.option("--workers", default="1,2", show_default=True, callback=_int_list, help="Local cluster workers to try.")
@click.option("--threads", default="1", show_default=True, callback=_int_list, help="Threads per worker to try.")
@click.option("--engines", default=",".join(ENGINES), show_default=True, callback=_name_list(ENGINES),
              help="Engines for the predict stage (keras runs under KERAS_BACKEND or --backend).")
@click.option("--backend", default=None, type=click.Choice(BACKENDS),
              help="Keras backend of the predict stage and end to end (default: KERAS_BACKEND, else tensorflow).")
@click.option("--roof-backends", default=None, callback=_name_list(BACKENDS),
              help="Keras backends whose roof to measure (default: every installed one).")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(DEVICES))
@click.option("--naive-count", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Write every figure here.")
@click.option("--markdown", "md_out", default=None, type=click.Path(dir_okay=False), help="Write the table here.")
@click.option("--variants", default="tta,ensemble5,ensemble5-tta", show_default=True,
              callback=lambda ctx, param, value: _variants(value),
              help="Model variants whose ONNX roof is measured against the single model (none: skip): "
                   "tta, ensembleN, ensembleN-tta.")
@click.option("--roof-seconds", default=2.0, show_default=True, type=Number(0.1, 600, unit="SECONDS"),
              help="Each model-only roof runs whole batches for at least this long.")
@click.option("--save-autotune/--no-save-autotune", default=True, show_default=True,
              help="Save the best engine, workers, threads and batch size for `predict --autotune`, and the "
                   "fastest whole run's workers for `run --autotune`.")
def bench(inputs, model_dir, synthetic_slides, size, batch_sizes, workers, threads, engines, backend, roof_backends,
          device, naive_count, variants, roof_seconds, json_out, md_out, save_autotune) -> int:
    """Measure patches/s per stage against the model-only roof and the naive loop, in one run.

    \b
    Roof: ONNX Runtime and Keras under every installed backend, in-memory uint8 batches.
    Tile: INPUT (or synthetic slides) into a tiles.zarr. Predict: the stage over that store for
    each engine x workers x threads x batch size. End to end: `cancernet run` with the best
    predict settings and with every worker, and with the work split. Naive: one PNG read and
    one-patch model.predict at a time.
    """
    import json
    import os

    from .atomic import write_text
    from .autotune import save_autotune as _save
    from .bench import BenchConfig, run_bench

    if backend:
        os.environ["KERAS_BACKEND"] = backend
    cfg = BenchConfig(model_dir=model_dir, inputs=tuple(inputs), synthetic_slides=synthetic_slides, size=size,
                      batch_sizes=batch_sizes, workers=workers, threads=threads, engines=engines,
                      backends=roof_backends, device=device, naive_count=naive_count, variants=variants,
                      roof_seconds=roof_seconds)
    r = run_bench(cfg, step=lambda msg: click.echo(f"bench: {msg}", err=True))
    click.echo(r.markdown())
    ratios = r.ratios()
    roof_engine = r.to_json()["roof_engine"]
    click.echo(f"fastest roof: {r.rate('roof'):.0f} patches/s ({roof_engine})")
    click.echo(f"predict stage: {r.rate('predict'):.0f} patches/s = {ratios['predict_vs_roof']:.2f} x roof "
               f"(steady {r.steady_rate():.0f} = {ratios['predict_steady_vs_roof']:.2f} x roof), "
               f"{ratios['predict_vs_naive'] or 0:.0f} x naive")
    if ratios.get("tile_vs_decode_roof"):
        click.echo(f"tile stage: {r.rate('tile'):.0f} tiles/s = {ratios['tile_vs_decode_roof']:.2f} x the decode roof "
                   f"({r.rate('decode-roof'):.0f} tiles/s: their compressed tiles decoded once each, nothing else)")
    if ratios.get("tile_vs_tile_floor"):
        click.echo(f"tile floor: {r.rate('tile-floor'):.0f} tiles/s = {ratios['tile_floor_vs_decode_roof']:.2f} x the "
                   f"decode roof (those tiles decoded and averaged as tiling does, their pixels encoded as the store "
                   f"does, nothing else); the stage reaches {ratios['tile_vs_tile_floor']:.2f} x of it")
    stream = r.fastest("run")
    click.echo(f"end to end: {r.rate('run'):.0f} patches/s = {ratios['run_vs_naive'] or 0:.0f} x naive "
               f"({stream.settings['workers']} workers x {stream.settings['threads_per_worker']} threads, streamed)")
    if ratios.get("run_vs_barrier"):
        first = ratios.get("first_report_fraction")
        click.echo(f"stream vs stage by stage: {ratios['run_vs_barrier']:.2f} x the patches/s; first input reported "
                   f"after {100 * first:.0f} % of the run" if first is not None else "")
    if ratios.get("split_vs_slower_stage_alone"):
        click.echo(f"tiling and scoring on their own workers: {ratios['split_vs_slower_stage_alone']:.2f} x the "
                   "slower stage alone on one worker")
    if json_out:
        write_text(json_out, json.dumps(r.to_json(), indent=2) + "\n")
        click.echo(f"json: {json_out}")
    if md_out:
        write_text(md_out, r.markdown())
    if save_autotune:
        b = r.best
        lay = b.get("run") or {}
        whole = (f"; run: {lay['workers']} workers x {lay['threads_per_worker']} threads"
                 + (f", {lay['score_workers']} of them only scoring" if lay.get("score_workers") else "")) if lay else ""
        click.echo(f"autotune: {b['engine']}{'-' + b['backend'] if b['backend'] else ''}, {b['workers']} workers x "
                   f"{b['threads_per_worker']} threads, batch {b['batch_size']}{whole} -> {_save(b)}")
    return 0


@cli.command()
@click.option("--out", "out", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--quick", is_flag=True, help="A smaller demo (fewer patients, epochs and slides), as CI runs it.")
@click.option("--workers", default=None, type=click.IntRange(1, MAX_WORKERS), help="Local cluster workers (default: cores).")
def demo(out: str, quick: bool, workers: int | None) -> int:
    """The whole pipeline end to end on built-in synthetic data.

    Makes synthetic patches, trains a small CancerNet, makes synthetic slides, runs tile + predict +
    report on the slides and on a held-out patient folder, and checks the IDC maps against the truth.
    """
    import time

    from .demo import FULL, QUICK, run_demo

    t0 = time.perf_counter()
    r = run_demo(out, QUICK if quick else FULL, step=lambda msg: click.echo(msg), workers=workers,
                 on_dashboard=lambda url: click.echo(f"dask dashboard: {url}", err=True))
    for line in r.run.lines():
        click.echo(line)
    if r.val_balanced_accuracy is not None:
        click.echo(f"model: balanced accuracy {r.val_balanced_accuracy:.3f} on validation patients")
    for name, d in r.dice.items():
        click.echo(f"map accuracy {name}: Dice {d:.3f} against the synthetic truth")
    if r.real:
        click.echo(f"real tissue {r.real['slide']}: tissue Dice {r.real['tissue_dice']:.3f} (kept tiles vs the "
                   f"patient's patches); IDC Dice {r.real['idc_dice']:.3f} (a model trained on synthetic tissue)")
    click.echo(f"demo finished in {time.perf_counter() - t0:.0f} s; open {r.run.report.index}")
    return exit_for(len(r.run.failed_inputs) + r.run.report.not_scored)


# ----------------------------------------------------------------------------------------------

def _quiet_native_logs() -> None:
    """Keep TensorFlow's C++ and Python chatter off the terminal (our own log and bars stay)."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    for name in ("tensorflow", "absl", "jax", "distributed.shuffle", "tf2onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)


class _Terminated(BaseException):
    """SIGTERM (a job scheduler's time limit, `kill`): unwind like Ctrl-C so every writer closes cleanly."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turn library errors into one line and an exit status."""
    import signal
    import threading

    _quiet_native_logs()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print escaped, never as raw bytes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    logger = logging.getLogger("cancernet_batch")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        return _main(argv)
    finally:
        # main() called in-process (tests, notebooks) leaves no trace: signal handler and logging as they were
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        logger.handlers[:], logger.level, logger.propagate = saved


def _main(argv: list[str] | None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        rv = cli.main(args=argv, prog_name="cancernet", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            click.echo("interrupted; re-run the same command to resume", err=True)
            return 130
        click.echo("aborted", err=True)
        return EXIT_ERROR
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE if isinstance(exc, click.UsageError) else EXIT_ERROR
    except KeyboardInterrupt:
        click.echo("interrupted; re-run the same command to resume", err=True)
        return 130
    except _Terminated:
        click.echo("terminated; re-run the same command to resume", err=True)
        return 143
    except Exception as exc:
        err = as_one_line_error(exc)  # a library error, or a full / read-only disk however it was wrapped
        if err is None or debug:
            raise
        _fail_quietly(err)
        return EXIT_ERROR
    finally:
        _settle_storage()
    return int(rv) if isinstance(rv, int) else EXIT_OK


def _settle_storage() -> None:
    """Let zarr writes still in flight finish before the process exits (see :func:`store.settle_io`)."""
    if "zarr" in sys.modules:
        from .store import settle_io

        settle_io()


def _fail_quietly(err: CancerNetError) -> None:
    """Print the one-line error; after it, no library's log reaches stderr while the process exits
    (asyncio, zarr or Dask reporting the aftermath of the same error from their exit handlers)."""
    import atexit

    _settle_storage()
    click.echo(f"error: {err.one_line()}", err=True)
    sys.stderr.flush()
    atexit.unregister(_mute_logging)
    atexit.register(_mute_logging)  # runs before the exit handlers of libraries imported earlier (LIFO)


def _mute_logging() -> None:
    logging.disable(logging.CRITICAL)


def exit_for(failed: int) -> int:
    """The exit status of a command that ran to the end: 3 when some inputs failed, else 0."""
    return EXIT_PARTIAL if failed else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
