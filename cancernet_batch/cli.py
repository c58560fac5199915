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

from . import DEFAULT_MPP, __version__
from .errors import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, CancerNetError, NotBuiltError

log = logging.getLogger("cancernet_batch")


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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="cancernet")
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
@click.option("--idc-fraction", default=0.35, show_default=True, type=click.FloatRange(0, 1),
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
@click.option("--mpp", default=0.5, show_default=True, type=float, help="Level-0 resolution in µm/px.")
@click.option("--format", "fmt", default="svs", show_default=True, type=click.Choice(["svs", "tiff"]),
              help="Aperio SVS or generic tiled pyramidal TIFF.")
@click.option("--idc-fraction", default=0.3, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of tissue tiles that are IDC.")
@click.option("--seed", default=0, show_default=True, type=int)
def synth_slides_cmd(out: str, count: int, size: int, mpp: float, fmt: str, idc_fraction: float, seed: int) -> None:
    """Write pyramidal JPEG-tiled slides with their ground truth (NAME.truth.npz) on the model grid."""
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

@cli.command()
@click.argument("data", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
@click.option("--val-fraction", default=0.2, show_default=True, type=click.FloatRange(0.0, 0.9, min_open=True))
@click.option("--split", "split_file", type=click.Path(), default=None,
              help="Published patient split: a folder with cases_{train,val,test}.txt, or one such file.")
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--learning-rate", default=1e-3, show_default=True, type=float)
@click.option("--width", default=32, show_default=True, type=click.IntRange(min=4), help="Filters in the first block.")
@click.option("--mpp", default=DEFAULT_MPP, show_default=True, type=float, help="Resolution of the training patches, µm/px.")
@click.option("--patience", default=3, show_default=True, type=click.IntRange(min=1), help="Early-stopping patience (epochs).")
def train(**kwargs) -> None:
    """Train CancerNet on Kaggle-layout patch folders with a patient-level split."""
    raise NotBuiltError("`cancernet train` is not built yet", hint="see issue 4")


@cli.command()
@click.argument("model_dir", type=click.Path())
@click.argument("data", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out", type=click.Path(file_okay=False), default=None, help="Folder for metrics JSON and figures.")
@click.option("--bootstrap", default=1000, show_default=True, type=click.IntRange(min=0))
@click.option("--seed", default=0, show_default=True, type=int)
def evaluate(**kwargs) -> None:
    """Evaluate a model on patches of held-out patients (patch- and patient-level metrics)."""
    raise NotBuiltError("`cancernet evaluate` is not built yet", hint="see issue 4")


@cli.command()
@click.argument("model_dir", type=click.Path())
def export(**kwargs) -> None:
    """Export MODEL_DIR/model.keras to MODEL_DIR/model.onnx (checked equal within 1e-5)."""
    raise NotBuiltError("`cancernet export` is not built yet", hint="see issue 6")


# ----------------------------------------------------------------------------------------------
# inspect / tile / predict / report / run
# ----------------------------------------------------------------------------------------------

@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--mpp", default=None, type=float, help=f"Target µm/px (default: the model's, else {DEFAULT_MPP}).")
@click.option("--mpp-override", default=None, type=float, help="Use this source µm/px for slides that state none.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(**kwargs) -> None:
    """Show what tiling would do for each input, without doing it."""
    raise NotBuiltError("`cancernet inspect` is not built yet", hint="see issue 5")


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--model", "model_dir", default=None, type=click.Path(), help="Model folder (for its µm/px).")
@click.option("--mpp", default=None, type=float, help=f"Target µm/px (default: the model's, else {DEFAULT_MPP}).")
@click.option("--mpp-override", default=None, type=float, help="Use this source µm/px for slides that state none.")
@click.option("--tissue-threshold", default=0.5, show_default=True, type=click.FloatRange(0, 1))
@click.option("--no-tissue-filter", is_flag=True, help="Keep every tile, background included.")
def tile(**kwargs) -> None:
    """Tile slides and patient folders into RUN/tiles.zarr."""
    raise NotBuiltError("`cancernet tile` is not built yet", hint="see issue 5")


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--model", "model_dir", required=True, type=click.Path())
def predict(**kwargs) -> None:
    """Score the tiles of a run with Dask (local cluster or --scheduler)."""
    raise NotBuiltError("`cancernet predict` is not built yet", hint="see issue 6")


@cli.command()
@click.argument("run_dir", type=click.Path())
def report(**kwargs) -> None:
    """Write IDC maps, heatmaps, GeoJSON, CSV summaries and index.html for a run."""
    raise NotBuiltError("`cancernet report` is not built yet", hint="see issue 7")


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--model", "model_dir", required=True, type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
def run(**kwargs) -> None:
    """Tile, predict and report in one resumable command."""
    raise NotBuiltError("`cancernet run` is not built yet", hint="see issue 7")


@cli.command()
def bench(**kwargs) -> None:
    """Measure patches/s per stage against the model-only roof and the naive loop."""
    raise NotBuiltError("`cancernet bench` is not built yet", hint="see issue 8")


@cli.command()
@click.option("--out", "out", default="demo-out", show_default=True, type=click.Path(file_okay=False))
def demo(**kwargs) -> None:
    """The whole pipeline end to end on built-in synthetic data."""
    raise NotBuiltError("`cancernet demo` is not built yet", hint="see issue 7; `cancernet synth --help` meanwhile")


# ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turn library errors into one line and an exit status."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        rv = cli.main(args=argv, prog_name="cancernet", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return EXIT_ERROR
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE if isinstance(exc, click.UsageError) else EXIT_ERROR
    except CancerNetError as exc:
        if debug:
            raise
        click.echo(f"error: {exc.one_line()}", err=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        click.echo("interrupted; re-run the same command to resume", err=True)
        return 130
    return int(rv) if isinstance(rv, int) else EXIT_OK


def exit_for(failed: int) -> int:
    """The exit status of a command that ran to the end: 3 when some inputs failed, else 0."""
    return EXIT_PARTIAL if failed else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
