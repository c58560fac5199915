"""Shared fixtures: paths to ../shared/data and small synthetic data made once per session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
IDC = SHARED / "idc"
SLIDES = SHARED / "slides"


_DASK_WORKER_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_BASE_ENV = {k: os.environ.get(k) for k in _DASK_WORKER_ENV}


@pytest.fixture(autouse=True)
def _no_dask_worker_environ():
    """A local Dask cluster writes its worker settings (MALLOC_TRIM_THRESHOLD_=65536, OMP_NUM_THREADS=1...)
    into ``os.environ`` and leaves them there; later subprocesses of the session must not inherit them
    (with that trim threshold glibc maps and unmaps every large array: an 8k slide took minutes, not seconds)."""
    yield
    for key, value in _BASE_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# Where the libraries this project uses keep caches and settings under the home folder.
FRESH_HOME_VARS = {
    "HOME": "", "XDG_CACHE_HOME": ".cache", "XDG_CONFIG_HOME": ".config", "XDG_DATA_HOME": ".local/share",
    "XDG_STATE_HOME": ".local/state", "KERAS_HOME": ".keras", "MPLCONFIGDIR": ".config/matplotlib",
    "DASK_CONFIG": ".config/dask", "TORCH_HOME": ".cache/torch",
}
_FRESH_HOME = pytest.StashKey[Path]()


def pytest_addoption(parser):
    parser.addoption("--fresh-home", action="store_true", default=False,
                     help="run as on a machine that never ran the project: HOME and the cache and config folders "
                          f"({', '.join(FRESH_HOME_VARS)}) point into a new empty folder, for the test process and "
                          "every subprocess it starts (CI sets it through PYTEST_ADDOPTS, see .ci/run)")


def pytest_configure(config):
    """With ``--fresh-home``, an empty home before anything (Keras, matplotlib, Dask) reads its settings."""
    if config.getoption("fresh_home"):
        home = Path(tempfile.mkdtemp(prefix="cancernet-fresh-home-")).resolve()
        for name, sub in FRESH_HOME_VARS.items():
            (home / sub).mkdir(parents=True, exist_ok=True)
            os.environ[name] = str(home / sub)
        config.stash[_FRESH_HOME] = home


def pytest_unconfigure(config):
    home = config.stash.get(_FRESH_HOME, None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


MODULE_SECONDS = {
    "tests/test_benchmarks.py": 262, "tests/test_cv.py": 181, "tests/test_bench.py": 158, "tests/test_s3.py": 146,
    "tests/test_synth.py": 140, "tests/test_run.py": 139, "tests/test_train.py": 121, "tests/reliability/test_load.py": 109,
    "tests/test_score.py": 98, "tests/test_stain.py": 93, "tests/test_tiling.py": 76, "tests/test_engines.py": 70,
    "tests/test_model.py": 62, "tests/test_real_tissue.py": 62, "tests/test_cluster.py": 54, "tests/test_flow.py": 52,
    "tests/reliability/test_kills.py": 51, "tests/test_azure.py": 45, "tests/test_s3_seaweedfs.py": 23,
    "tests/test_s3_native.py": 22, "tests/test_preflight.py": 19, "tests/test_gcs.py": 19, "tests/test_report.py": 16,
    "tests/reliability/test_cli_values.py": 16, "tests/test_direct.py": 15, "tests/test_quiet.py": 13,
    "tests/reliability/test_sizes.py": 13, "tests/reliability/test_signals.py": 12,
}
"""Seconds of test time per module (``--junitxml``'s times summed by file, the suite under ``-n 2`` on machine A,
2026-12-07; modules under 10 s left out). Only their order matters: see :func:`pytest_collection_modifyitems`."""


def pytest_collection_modifyitems(session, config, items):
    """The modules in order of their cost, the longest first (each module's own tests in their order).

    pytest-xdist's ``--dist loadscope`` hands each of the two test processes the next module in this order as it
    finishes one (``--no-loadscope-reorder`` in ``pyproject.toml``: its own reorder is by the number of tests, which put
    the long modules of few tests, the demo's and ``bench``'s, last, one process running them alone at the end). Longest
    first is the usual schedule for two machines: in a simulation on the times above, the two processes' loads came
    out even where the order by count left one of them about 100 s longer. Stable and the same in every process (xdist
    checks that each collected the same items in the same order)."""
    root = Path(str(config.rootpath))

    def cost(item) -> int:
        try:
            rel = Path(str(item.path)).resolve().relative_to(root).as_posix()
        except ValueError:
            return 0
        return MODULE_SECONDS.get(rel, 0)

    items.sort(key=lambda item: -cost(item))


def pytest_report_header(config):
    lines = [f"shared data: {SHARED} ({'found' if SHARED.is_dir() else 'MISSING'})"]
    if _FRESH_HOME in config.stash:
        lines.append(f"fresh home: {config.stash[_FRESH_HOME]} (empty caches and settings)")
    return lines


@pytest.fixture(scope="session")
def client():
    """One local Dask cluster (2 worker processes, 1 thread each) shared by the tests that hand a client to the
    library, instead of one cluster per module (each start costs seconds on a 2-core machine)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="session")
def idc_dir() -> Path:
    assert IDC.is_dir(), f"{IDC} is missing: the real IDC patches are expected beside the checkout"
    return IDC


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    assert SLIDES.is_dir(), f"{SLIDES} is missing: the real slides are expected beside the checkout"
    return SLIDES


@pytest.fixture(scope="session")
def dicom_series_dir(slides_dir, tmp_path_factory) -> Path:
    """A folder of DICOM files: the real CMU-1-Small-Region as a DICOM WSI series of three instances (level 0,
    level 1 at 4x, a thumbnail: ``cmu1_*.dcm``; ``tests/dicom_wsi.py``), another slide's instance (the shared
    ``boxes_0.dcm``: a series of its own, too small to tile) and a file that is not DICOM (``notes.txt``)."""
    import shutil

    import numpy as np
    from PIL import Image

    from cancernet_batch.slides import open_slide
    from dicom_wsi import write_series

    folder = tmp_path_factory.mktemp("dicomwsi")
    with open_slide(slides_dir / "cmu-1-small-region.svs") as r:
        rgb = r.read_region(0, 0, 0, *r.level_dimensions[0])
    write_series(folder, "cmu1", [rgb, np.asarray(Image.fromarray(rgb).reduce(4))], 0.499,
                 thumbnail=np.asarray(Image.fromarray(rgb).reduce(16)))
    shutil.copy(slides_dir / "boxes_0.dcm", folder / "boxes_0.dcm")
    (folder / "notes.txt").write_text("scanned 2009\n")
    return folder


@pytest.fixture(scope="session")
def synth_patch_dir(tmp_path_factory) -> Path:
    """Four synthetic patients, 60 patches each."""
    from cancernet_batch.synth import synth_patches

    out = tmp_path_factory.mktemp("synth-patches")
    synth_patches(out, patients=4, per_patient=60, idc_fraction=0.4, seed=3)
    return out


@pytest.fixture(scope="session")
def synth_slide_dir(tmp_path_factory) -> Path:
    """Two small synthetic SVS slides (2048 px at 1.0 µm/px: a 10x10 model grid) with truth."""
    from cancernet_batch.synth import synth_slides

    out = tmp_path_factory.mktemp("synth-slides")
    synth_slides(out, count=2, size=2048, mpp=1.0, seed=5)
    return out


@pytest.fixture(scope="session")
def mpp_slides(tmp_path_factory) -> list:
    """Synthetic slides at source resolutions 0.25, 0.5 and 1.0 µm/px (one generic TIFF), as their SlideSpecs.

    At the model's 4.0 µm/px they read from levels 2, 1 and 1 with scales 1, 0.5 and 1.
    """
    from cancernet_batch.synth import SlideSpec, write_slide

    out = tmp_path_factory.mktemp("mpp-slides")
    specs = [SlideSpec(path=out / "m025.tiff", width=4096, height=4096, mpp=0.25, seed=31, format="tiff"),
             SlideSpec(path=out / "m050.svs", width=4096, height=3072, mpp=0.5, seed=32),
             SlideSpec(path=out / "m100.svs", width=2048, height=2048, mpp=1.0, seed=33)]
    for spec in specs:
        write_slide(spec)
    return specs


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """An untrained (random-weight) CancerNet of width 8 with its ONNX export: its scores are deterministic,
    which is all that scoring, resume and fault tests need."""
    import numpy as np

    from cancernet_batch.model import ModelMeta, build_cancernet, export_onnx, save_model_dir

    d = tmp_path_factory.mktemp("tiny-model")
    m = build_cancernet(width=8, seed=1)
    m.predict_on_batch(np.zeros((1, 50, 50, 3), np.uint8))
    save_model_dir(m, d, ModelMeta(width=8))
    export_onnx(d)
    return d
