"""The predict stage on real Dask clusters: equality with the model, one load per worker, resume
after SIGKILL, a worker killed mid-run, an external scheduler, and fault isolation."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cancernet_batch import store
from cancernet_batch.cluster import ClusterConfig, dask_client
from cancernet_batch.stages.score import PredictConfig, predict_run
from cancernet_batch.runfolder import Run

ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return tiny_model_dir


def make_run(run_dir: Path, sizes: dict[str, int], chunk: int, seed: int = 0, mpp: float = 4.0) -> dict[str, np.ndarray]:
    """A tiles.zarr with one input per name holding random tiles; returns the tiles per input id."""
    rng = np.random.default_rng(seed)
    root = Run.of(run_dir).open_store()
    out = {}
    for name, n in sizes.items():
        src = str(run_dir / "sources" / f"{name}.svs")
        tiles = rng.integers(0, 256, (n, 50, 50, 3), dtype=np.uint8)
        cols = max(1, int(np.ceil(np.sqrt(n))))
        attrs = store.InputAttrs(source=src, kind="slide", reader="test", patient=name, source_size=0, source_mtime=0.0,
                                 target_mpp=mpp, grid_shape=(int(np.ceil(n / cols)), cols), n_tiles=n, level0_tile_px=400.0)
        g = store.create_input(root, attrs, n, chunk=chunk)
        g["tiles"][:] = tiles
        g["coords"][:] = np.stack([np.arange(n) // cols, np.arange(n) % cols], 1).astype(np.int32)
        store.mark_complete(g)
        out[store.input_id(src)] = tiles
    return out


def reference(model_dir: Path, tiles: np.ndarray) -> np.ndarray:
    from cancernet_batch.model import load_keras_model

    return np.asarray(load_keras_model(model_dir).predict(tiles, batch_size=512, verbose=0), np.float32).reshape(-1)


def stored_probs(run_dir: Path) -> dict[str, np.ndarray]:
    root = Run.of(run_dir).open_store("r")
    return {gid: np.asarray(g["probs"][:]) for gid, g in store.iter_inputs(root)}


def all_done(run_dir: Path) -> bool:
    root = Run.of(run_dir).open_store("r")
    return all(store.done_mask(g).all() for _, g in store.iter_inputs(root))


def test_local_cluster_equals_model_and_loads_once_per_worker(tiny_model, tmp_path):
    run = tmp_path / "run"
    tiles = make_run(run, {"a": 700, "b": 130}, chunk=128)
    cfg = PredictConfig(model_dir=str(tiny_model), engine="onnx", batch_size=100)
    with dask_client(ClusterConfig(workers=2, threads_per_worker=1, dashboard=False)) as client:
        s = predict_run(run, cfg, client=client)
        loads = client.run(lambda: __import__("cancernet_batch.stages.score", fromlist=["x"]).ENGINE_LOADS["count"])
        tf_loaded = client.run(lambda: "tensorflow" in sys.modules or "keras" in sys.modules)
    assert s.tiles_scored == 830 and s.chunks_scored == 6 + 2 and not s.failures
    assert sorted(loads.values()) == [1, 1]  # the model was loaded once in each worker, not per task
    assert not any(tf_loaded.values())  # the ONNX path needs neither Keras nor TensorFlow on workers
    got = stored_probs(run)
    for gid, t in tiles.items():
        np.testing.assert_allclose(got[gid], reference(tiny_model, t), atol=1e-5)
    meta = json.loads((run / "predict.json").read_text())
    assert meta["model_id"] and meta["threshold"] == pytest.approx(0.5)
    # a second run does nothing
    again = predict_run(run, cfg)
    assert again.tiles_scored == 0 and again.chunks_skipped == 8


def test_keras_engine_on_cluster_equals_onnx(tiny_model, tmp_path):
    run = tmp_path / "run"
    tiles = make_run(run, {"k": 300}, chunk=100)
    s = predict_run(run, PredictConfig(model_dir=str(tiny_model), engine="keras",
                                       cluster=ClusterConfig(workers=1, dashboard=False)))
    assert s.tiles_scored == 300
    (gid, t), = tiles.items()
    np.testing.assert_allclose(stored_probs(run)[gid], reference(tiny_model, t), atol=1e-5)


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "cancernet_batch.cli", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_mid_run_then_resume_scores_each_tile_once(tiny_model, tmp_path):
    run = tmp_path / "run"
    tiles = make_run(run, {"big": 6000, "small": 500}, chunk=250)
    nchunks = 24 + 2
    # batch size 2 makes the run slow enough (thousands of model calls) to be killed in the middle
    args = ["predict", str(run), "--model", str(tiny_model), "--engine", "onnx", "--batch-size", "2", "--workers", "1"]
    p = _cli(*args, start_new_session=True)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline:
        try:
            root = Run.of(run).open_store("r")
            done = sum(int(store.done_mask(g).sum()) for _, g in store.iter_inputs(root))
        except Exception:  # noqa: BLE001 - the store may be mid-creation
            done = 0
        if done >= 3 or p.poll() is not None:
            break
        time.sleep(0.05)
    assert p.poll() is None, "predict finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)  # the CLI and its local cluster, at once
    p.wait()
    assert 3 <= done < nchunks
    before = stored_probs(run)
    r = _cli(*args[:-4], "--engine", "onnx", "--batch-size", "512", "--workers", "1")
    out, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    m = [line for line in out.splitlines() if line.startswith("predict:")][0]
    skipped = int(m.split("patches/s); ")[1].split(" chunks")[0])
    assert skipped >= 3  # finished chunks were not recomputed
    got = stored_probs(run)
    for gid, t in tiles.items():
        np.testing.assert_allclose(got[gid], reference(tiny_model, t), atol=1e-5)  # every tile, exactly one value
    assert all_done(run)
    # chunks finished before the kill kept their values (not rescored differently)
    for gid in got:
        ok = ~np.isnan(before[gid])
        np.testing.assert_array_equal(got[gid][ok], before[gid][ok])


def test_worker_killed_mid_run_completes(tiny_model, tmp_path):
    run = tmp_path / "run"
    tiles = make_run(run, {"w": 4000}, chunk=200)
    cfg = PredictConfig(model_dir=str(tiny_model), engine="onnx", batch_size=2)
    with dask_client(ClusterConfig(workers=2, dashboard=False)) as client:
        result = {}
        th = threading.Thread(target=lambda: result.setdefault("s", predict_run(run, cfg, client=client)))
        th.start()
        deadline = time.time() + 120
        while time.time() < deadline:
            root = Run.of(run).open_store("r")
            if sum(int(store.done_mask(g).sum()) for _, g in store.iter_inputs(root)) >= 2:
                break
            time.sleep(0.05)
        pids = client.run(os.getpid)
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)
        th.join(timeout=300)
    s = result["s"]
    assert not s.failures
    (gid, t), = tiles.items()
    np.testing.assert_allclose(stored_probs(run)[gid], reference(tiny_model, t), atol=1e-5)
    assert all_done(run)


def test_external_scheduler_and_workers(tiny_model, tmp_path):
    run = tmp_path / "run"
    tiles = make_run(run, {"e": 600}, chunk=150)
    sched_file = tmp_path / "scheduler.json"
    bindir = Path(sys.executable).parent
    sched = subprocess.Popen([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                              "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file)],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        for _ in range(2):
            workers.append(subprocess.Popen([str(bindir / "dask"), "worker", address, "--nthreads", "1",
                                             "--host", "127.0.0.1", "--no-dashboard"], env=ENV,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        r = _cli("predict", str(run), "--model", str(tiny_model), "--scheduler", address, "--engine", "onnx")
        out, err = r.communicate(timeout=300)
        assert r.returncode == 0, err
        assert "dashboard" not in err  # no local cluster was started
    finally:
        for w in workers:
            w.terminate()
        sched.terminate()
        for p in [*workers, sched]:
            p.wait(timeout=30)
    (gid, t), = tiles.items()
    np.testing.assert_allclose(stored_probs(run)[gid], reference(tiny_model, t), atol=1e-5)


def test_unreadable_input_recorded_others_complete(tiny_model, tmp_path):
    run = tmp_path / "run"
    tiles = make_run(run, {"good": 300, "bad": 300}, chunk=100)
    bad = [gid for gid in tiles if gid.startswith("bad")][0]
    chunk_file = run / "tiles.zarr" / "inputs" / bad / "tiles" / "c.1.0.0.0"
    assert chunk_file.exists()
    chunk_file.write_bytes(b"this is not a zstd chunk")
    r = _cli("predict", str(run), "--model", str(tiny_model), "--engine", "onnx", "--workers", "1")
    out, err = r.communicate(timeout=300)
    assert r.returncode == 3, err  # finished, some inputs failed
    rows = list(csv.DictReader(open(run / "failures.csv")))
    assert len(rows) == 1 and rows[0]["stage"] == "predict" and rows[0]["input"].endswith("bad.svs")
    good = [gid for gid in tiles if gid.startswith("good")][0]
    np.testing.assert_allclose(stored_probs(run)[good], reference(tiny_model, tiles[good]), atol=1e-5)


def test_resolution_mismatch_refused(tiny_model, tmp_path):
    run = tmp_path / "run"
    make_run(run, {"m": 50}, chunk=50, mpp=2.0)
    s = predict_run(run, PredictConfig(model_dir=str(tiny_model), engine="onnx",
                                       cluster=ClusterConfig(workers=1, dashboard=False)))
    assert s.tiles_scored == 0 and len(s.failures) == 1
    assert "2 µm/px but the model expects 4 µm/px" in s.failures[0].message


def test_other_model_needs_rescore(tiny_model, tmp_path):
    from cancernet_batch.errors import StorageError

    run = tmp_path / "run"
    make_run(run, {"r": 20}, chunk=20)
    root = Run.of(run).open_store()
    (_, g), = store.iter_inputs(root)
    store.ensure_predictions(g, "another-model")
    with pytest.raises(StorageError):
        store.ensure_predictions(g, "tiny")
    probs, done = store.ensure_predictions(g, "tiny", reset=True)
    assert probs.attrs["model_id"] == "tiny" and not done[:].any()


def test_a_run_scored_by_another_model_is_refused_before_anything_is_written(tiny_model, tmp_path):
    """One report never mixes two models: scoring a run folder whose inputs another model scored is one clear
    error naming that model (each input's ``probs`` document read once), unless ``--rescore``."""
    from cancernet_batch.errors import StorageError
    from cancernet_batch.model import read_meta
    from cancernet_batch.stages.score import prepare_scoring

    run = tmp_path / "run"
    gids = list(make_run(run, {"a": 8, "b": 8, "c": 8}, chunk=8))
    groups = dict(store.iter_inputs(Run.of(run).open_store()))
    ours = read_meta(tiny_model).model_id
    store.ensure_predictions(groups[gids[0]], ours)  # an input scored by this model: no objection
    store.ensure_predictions(groups[gids[1]], "another-model")  # the third is not scored yet
    with pytest.raises(StorageError, match="scored by model another-model, not ") as exc:
        prepare_scoring(Run.of(run), PredictConfig(model_dir=str(tiny_model)))
    assert ours in str(exc.value) and not Run.of(run).predict_json.exists()  # refused before anything is written
    scoring = prepare_scoring(Run.of(run), PredictConfig(model_dir=str(tiny_model), rescore=True))
    assert scoring.model_id == ours


def test_missing_model_and_run_give_one_line_errors(tiny_model, tmp_path):
    r = _cli("predict", str(tmp_path / "norun"), "--model", str(tiny_model))
    out, err = r.communicate(timeout=120)
    assert r.returncode == 1 and err.startswith("error: ") and "cancernet tile" in err and "Traceback" not in err
    make_run(tmp_path / "run", {"x": 5}, chunk=5)
    r = _cli("predict", str(tmp_path / "run"), "--model", str(tmp_path / "nomodel"))
    out, err = r.communicate(timeout=120)
    assert r.returncode == 1 and err.startswith("error: ") and "Traceback" not in err
