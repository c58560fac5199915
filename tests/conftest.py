"""Shared fixtures: paths to ../shared/data and small synthetic data made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
IDC = SHARED / "idc"
SLIDES = SHARED / "slides"


def pytest_report_header(config):
    return f"shared data: {SHARED} ({'found' if SHARED.is_dir() else 'MISSING'})"


@pytest.fixture(scope="session")
def idc_dir() -> Path:
    assert IDC.is_dir(), f"{IDC} is missing: the real IDC patches are expected beside the checkout"
    return IDC


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    assert SLIDES.is_dir(), f"{SLIDES} is missing: the real slides are expected beside the checkout"
    return SLIDES


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
