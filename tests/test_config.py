"""Every stage's settings in one home, each checked when made, with the names and bounds defined once."""

from __future__ import annotations

import math

import pytest

from cancernet_batch import config
from cancernet_batch.config import ClusterConfig, PredictConfig, ReportConfig, TileConfig, TrainConfig
from cancernet_batch.errors import ConfigError


@pytest.mark.parametrize("make, words", [
    (lambda: PredictConfig(model_dir="m", engine="tensorrt"), "--engine 'tensorrt'"),
    (lambda: PredictConfig(model_dir="m", backend="mxnet"), "--backend 'mxnet'"),
    (lambda: PredictConfig(model_dir="m", device="tpu"), "--device 'tpu'"),
    (lambda: PredictConfig(model_dir="m", batch_size=0), "--batch-size"),
    (lambda: PredictConfig(model_dir="m", batch_size=config.MAX_BATCH + 1), "--batch-size"),
    (lambda: PredictConfig(model_dir="m", micro_batch=-1), "--micro-batch"),
    (lambda: TileConfig(target_mpp=math.nan), "not a plausible resolution"),
    (lambda: TileConfig(target_mpp=100.0), "not a plausible resolution"),
    (lambda: TileConfig(mpp_override=0.001), "--mpp-override"),
    (lambda: TileConfig(preflight_timeout=math.inf), "--preflight-timeout"),
    (lambda: TileConfig(tissue_threshold=1.5), "--tissue-threshold"),
    (lambda: ReportConfig(threshold=math.nan), "--threshold"),
    (lambda: ClusterConfig(workers=0), "--workers"),
    (lambda: ClusterConfig(workers=2, score_workers=2), "leaves no tiling worker"),
    (lambda: TrainConfig(mpp=0.0), "not a plausible resolution"),
])
def test_bad_settings_are_refused_when_made(make, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_good_settings_and_shared_bounds():
    p = PredictConfig(model_dir="m", engine="keras", backend="jax", device="gpu", batch_size=2048)
    assert p.cluster == ClusterConfig()
    assert TileConfig(target_mpp=config.MPP_MIN).target_mpp == config.MPP_MIN
    assert ClusterConfig(workers=3, score_workers=1).local_shape() == (3, 1)
    assert ClusterConfig(scheduler="tcp://h:8786", score_workers=5).score_workers == 5  # an existing cluster's own split
    # the CLI offers exactly these names
    from cancernet_batch.cli import cli

    predict = cli.commands["predict"]
    choices = {o.name: tuple(o.type.choices) for o in predict.params if hasattr(o.type, "choices")}
    assert choices["engine"] == config.ENGINE_CHOICES and choices["backend"] == config.BACKENDS
    assert choices["device"] == config.DEVICES
