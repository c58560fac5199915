"""The engine contract: one suite, run against every registered engine (as zarr tests every store with one
``StoreTests``). A new engine is correct when its subclass of :class:`EngineContract` passes.

Keras runs here under the process's backend (TensorFlow in CI); the JAX and PyTorch backends are
checked in their own processes in ``test_engines.py``, since a process holds one Keras backend.
"""

from __future__ import annotations

import numpy as np
import pytest

from cancernet_batch import config
from cancernet_batch.engines import Engine, KerasEngine, OnnxEngine, engines, load_engine
from cancernet_batch.errors import CancerNetError
from cancernet_batch.model import load_keras_model, read_meta

TILES = np.random.default_rng(11).integers(0, 256, (300, 50, 50, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> np.ndarray:
    """What the Keras model itself says (model.predict in inference mode)."""
    model = load_keras_model(tiny_model_dir, read_meta(tiny_model_dir))
    return np.asarray(model.predict(TILES, batch_size=64, verbose=0), np.float32).reshape(-1)


class EngineContract:
    """What every engine does. Subclasses set ``engine``."""

    engine: type[Engine]

    @pytest.fixture(scope="class")
    def loaded(self, tiny_model_dir) -> Engine:
        return load_engine(tiny_model_dir, engine=self.engine.kind, batch_size=128)

    def test_registered_and_named_in_the_settings(self):
        assert engines()[self.engine.kind] is self.engine
        assert self.engine.kind in config.ENGINES and self.engine.available()

    def test_uint8_in_probabilities_out(self, loaded):
        assert isinstance(loaded, self.engine)
        out = loaded.predict(TILES[:10])
        assert out.shape == (10,) and out.dtype == np.float32
        assert np.all((out >= 0) & (out <= 1))

    def test_same_numbers_as_the_keras_model_at_any_batch_size(self, loaded, reference):
        for batch in (1, 7, 128, 1024):
            loaded.batch_size = batch
            np.testing.assert_allclose(loaded.predict(TILES), reference, atol=2e-5, err_msg=f"batch {batch}")
        loaded.batch_size = 128

    def test_order_and_empty_input(self, loaded, reference):
        idx = np.random.default_rng(2).permutation(len(TILES))
        np.testing.assert_allclose(loaded.predict(TILES[idx]), reference[idx], atol=2e-5)
        assert loaded.predict(TILES[:0]).shape == (0,)

    @pytest.mark.parametrize("bad", [TILES[:3].astype(np.float32), TILES[:3, :40], TILES[:3, :, :, :2]])
    def test_refuses_what_is_not_uint8_rgb_tiles(self, loaded, bad):
        with pytest.raises(ValueError, match=r"tiles must be \(N, 50, 50, 3\) uint8"):
            loaded.predict(bad)

    def test_refuses_a_folder_without_its_artefact(self, tiny_model_dir, tmp_path):
        import shutil

        d = tmp_path / "m"
        shutil.copytree(tiny_model_dir, d)
        (d / self.engine.artefact).unlink()
        with pytest.raises(CancerNetError) as exc:
            load_engine(d, engine=self.engine.kind)
        assert str(d) in str(exc.value)


class TestOnnxEngine(EngineContract):
    engine = OnnxEngine


class TestKerasEngine(EngineContract):
    engine = KerasEngine


def test_every_registered_engine_has_a_contract_suite():
    tested = {cls.engine for cls in EngineContract.__subclasses__()}
    assert tested == set(engines().values())
    assert tuple(engines()) == config.ENGINES
