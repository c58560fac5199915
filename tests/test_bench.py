"""`cancernet bench` in CI size: every figure in its JSON, ratios, and the autotune it saves."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_json_holds_every_figure(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3", "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "cancernet_batch.cli", "bench", "--synthetic-slides", "2", "--size", "6000",
                        "--batch-sizes", "64,256", "--workers", "1", "--naive-count", "20", "--variants", "tta",
                        "--roof-backends", "tensorflow,jax", "--roof-seconds", "0.5",
                        "--json", str(out), "--markdown", str(tmp_path / "bench.md")],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    figures = data["figures"]
    stages = {(f["stage"], f["engine"]) for f in figures}
    for stage in ("tile", "predict", "run", "run-barrier", "naive"):
        assert any(s == stage for s, _ in stages), stage
    for f in figures:
        assert f["patches"] > 0 and f["seconds"] > 0 and f["patches_per_second"] > 0
    # roofs: ONNX Runtime and Keras under the backends asked for (TensorFlow and JAX), per batch size
    for engine in ("keras-tensorflow-cpu", "keras-jax-cpu"):
        sizes = sorted(f["settings"]["batch_size"] for f in figures if f["stage"] == "roof" and f["engine"] == engine)
        assert sizes == [64, 256], (engine, sizes)
    # ONNX Runtime in its cache-sized calls (8 tiles a thread) per batch size, and beside them in one call a batch
    onnx = sorted((f["settings"]["batch_size"], f["settings"]["micro_batch"]) for f in figures
                  if f["stage"] == "roof" and f["engine"] == "onnx-cpu")
    assert [(b, m > 0) for b, m in onnx] == [(64, False), (64, True), (256, True)], onnx
    assert all(f["seconds"] >= 0.5 for f in figures if f["stage"] in ("roof", "variant"))  # --roof-seconds
    # predict stage: both engines, with the model load apart and each worker's peak memory
    predict = [f for f in figures if f["stage"] == "predict"]
    assert {f["engine"] for f in predict} == {"onnx", "keras-tensorflow"}
    for f in predict:
        st = f["settings"]
        assert 0 < st["load_seconds"] < f["seconds"]
        assert st["steady_patches_per_second"] > f["patches_per_second"]
        assert len(st["peak_rss_mib_per_worker"]) == 1 and 100 < st["peak_worker_rss_mib"] < 4096
    keras_load = max(f["settings"]["load_seconds"] for f in predict if f["engine"] == "keras-tensorflow")
    onnx_load = max(f["settings"]["load_seconds"] for f in predict if f["engine"] == "onnx")
    assert onnx_load < keras_load  # ONNX workers import no TensorFlow
    tile = [f for f in figures if f["stage"] == "tile"][0]
    assert tile["settings"]["MB_read_per_s"] > 0 and tile["settings"]["KB_read_per_tile"] > 0 and tile["settings"]["inputs"] == 2 and tile["settings"]["peak_worker_rss_mib"] > 0
    # the decode roof: the same tiles' compressed source tiles, each decoded once, nothing else
    decode = [f for f in figures if f["stage"] == "decode-roof"][0]
    assert decode["patches"] == tile["patches"] and decode["settings"]["compressed_tiles"] > 0
    assert data["ratios"]["tile_vs_decode_roof"] == pytest.approx(tile["patches_per_second"] / decode["patches_per_second"], rel=0.01)
    # the tile floor: those compressed tiles decoded and averaged as tiling does them (synthetic slides at 4 µm/px: level
    # 1, 2 µm/px, full size in the DCT, 2 x 2 blocks), and exactly the model tiles' bytes encoded as the store encodes
    floor = [f for f in figures if f["stage"] == "tile-floor"][0]
    assert floor["patches"] == tile["patches"] and floor["settings"]["compressed_tiles"] == decode["settings"]["compressed_tiles"]
    assert floor["settings"]["dct_scales"] == [1] and floor["settings"]["blocks"] == [2]
    assert floor["settings"]["encoded_MB"] == pytest.approx(tile["patches"] * 50 * 50 * 3 / 1e6, abs=1e-3)
    assert floor["settings"]["cpu_ms_per_tile"] > 0 and decode["settings"]["cpu_ms_per_tile"] > 0
    assert data["ratios"]["tile_vs_tile_floor"] == pytest.approx(tile["patches_per_second"] / floor["patches_per_second"], rel=0.01)
    assert data["ratios"]["tile_floor_vs_decode_roof"] == pytest.approx(
        floor["patches_per_second"] / decode["patches_per_second"], rel=0.01)
    assert "tile floor: " in r.stdout and "the stage reaches" in r.stdout
    run = [f for f in figures if f["stage"] == "run"][0]
    assert run["patches"] == tile["patches"]  # every tiled patch scored once, end to end
    barrier = [f for f in figures if f["stage"] == "run-barrier"][0]
    assert barrier["patches"] == run["patches"]  # the same work, stage by stage
    assert set(barrier["settings"]["stage_seconds"]) == {"tile", "predict", "report"}
    # the stream reports its first input before the end; stage by stage, only after every tile is scored
    assert 0 < run["settings"]["first_report_fraction"] < 1
    assert barrier["settings"]["first_report_seconds"] > sum(barrier["settings"]["stage_seconds"][k] for k in ("tile", "predict"))
    assert run["settings"]["seconds_per_input"] == pytest.approx(run["seconds"] / 2, rel=0.02)
    # the scoring variant (8 flips and rotations in one graph) against the single model, on the same tiles
    variants = {f["settings"]["variant"]: f for f in figures if f["stage"] == "variant"}
    assert set(variants) == {"single", "tta"} and variants["tta"]["settings"]["members"] == 1
    assert variants["tta"]["settings"]["tta"] and variants["tta"]["settings"]["x_single"] > 0
    machine = data["machine"]
    assert machine["cores"] >= 1 and "onnxruntime" in machine["versions"] and "gpus" in machine
    from cancernet_batch.machine import code

    assert machine["code"] == code()  # which checkout measured (the one this test imports: same interpreter, cwd)
    assert data["roof_patches_per_second"] == pytest.approx(max(f["patches_per_second"] for f in figures if f["stage"] == "roof"), abs=0.1)
    ratios = data["ratios"]
    assert ratios["predict_vs_roof"] > 0 and ratios["predict_vs_naive"] > 0 and ratios["run_vs_naive"] > 0
    assert ratios["predict_steady_vs_roof"] > ratios["predict_vs_roof"]
    assert ratios["run_vs_barrier"] > 0 and ratios["first_report_fraction"] == run["settings"]["first_report_fraction"]
    best = data["best"]
    chosen = max(predict, key=lambda f: f["settings"]["steady_patches_per_second"])
    assert best["batch_size"] == chosen["settings"]["batch_size"] and best["workers"] == 1
    assert best["engine"] == ("keras" if chosen["engine"].startswith("keras") else chosen["engine"])
    assert "| predict |" in (tmp_path / "bench.md").read_text()
    saved = json.loads((tmp_path / "cfg" / "cancernet-batch" / "autotune.json").read_text())
    assert {k: saved[k] for k in ("engine", "batch_size", "workers")} == {k: best[k] for k in ("engine", "batch_size", "workers")}
    # one worker asked for: one layout of the whole run, no split run; `run --autotune` gets that layout
    assert [f["stage"] for f in figures].count("run") == 1 and not any(f["stage"] == "run-split" for f in figures)
    assert saved["run"] == {"workers": 1, "threads_per_worker": 1, "score_workers": 0,
                            "patches_per_second": pytest.approx(run["patches_per_second"], abs=0.1)}


def test_predict_autotune_without_bench_is_clear_error(tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "empty")}
    r = subprocess.run([sys.executable, "-m", "cancernet_batch.cli", "predict", str(tmp_path), "--model", str(tmp_path),
                        "--autotune"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "cancernet bench" in r.stderr and "Traceback" not in r.stderr


def test_predict_autotune_uses_the_saved_engine_and_batch(tmp_path, synth_patch_dir, tiny_model_dir):
    from cancernet_batch.machine import machine

    cfg = tmp_path / "cfg"
    (cfg / "cancernet-batch").mkdir(parents=True)
    saved = {"engine": "keras", "backend": "tensorflow", "device": "cpu", "workers": 1, "threads_per_worker": 1,
             "batch_size": 128, "machine": machine()}
    (cfg / "cancernet-batch" / "autotune.json").write_text(json.dumps(saved))
    env = {**os.environ, "XDG_CONFIG_HOME": str(cfg)}
    env.pop("KERAS_BACKEND", None)
    run = tmp_path / "run"
    cli = [sys.executable, "-m", "cancernet_batch.cli"]
    r = subprocess.run(cli + ["tile", str(synth_patch_dir), "--out", str(run), "--workers", "1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(cli + ["predict", str(run), "--model", str(tiny_model_dir), "--autotune"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    used = json.loads((run / "predict.json").read_text())
    assert (used["engine"], used["backend"], used["batch_size"]) == ("keras", "tensorflow", 128)
    # an explicit option beats the saved choice
    r = subprocess.run(cli + ["predict", str(run), "--model", str(tiny_model_dir), "--autotune", "--engine", "onnx",
                              "--batch-size", "64"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    used = json.loads((run / "predict.json").read_text())
    assert (used["engine"], used["batch_size"]) == ("onnx", 64)


def test_the_whole_run_is_timed_with_every_worker_and_its_fastest_layout_is_the_run_choice():
    """The predict stage alone can be fastest on one worker (its engine takes both cores' threads) while a whole run
    also tiles, which two workers do side by side: on a 2-vCPU Xeon the bench's stream on the predict stage's one
    worker took 7.35 s, on two workers 5.3 s. The bench times both, and the fastest of them and of the split run is
    what ``run --autotune`` starts; the stream figures (first report, stream vs barrier) are the fastest stream's."""
    from cancernet_batch.bench import BenchResult, Figure, run_choice, run_layouts

    assert run_layouts({"workers": 1, "threads_per_worker": 1}, (1, 2)) == [(1, 1), (2, 1)]
    assert run_layouts({"workers": 2, "threads_per_worker": 1}, (1, 2)) == [(2, 1)]
    assert run_layouts({"workers": 1, "threads_per_worker": 2}, (1, 2)) == [(1, 2), (2, 1)]
    assert run_layouts({"workers": 1, "threads_per_worker": 1}, (1,)) == [(1, 1)]

    def stream(workers, seconds, first, split=0):
        return Figure("run-split" if split else "run", "onnx", 1000, seconds,
                      {"workers": workers, "threads_per_worker": 1, "score_workers": split,
                       "first_report_fraction": first})

    figures = [stream(1, 7.35, 0.185), stream(2, 5.3, 0.15), Figure("run-barrier", "onnx", 1000, 5.0, {"workers": 2}),
               stream(2, 5.8, 0.14, split=1)]
    assert run_choice(figures) == {"workers": 2, "threads_per_worker": 1, "score_workers": 0,
                                   "patches_per_second": pytest.approx(1000 / 5.3, abs=0.1)}
    ratios = BenchResult({}, {}, figures, {}).ratios()
    assert ratios["first_report_fraction"] == 0.15 and ratios["run_vs_barrier"] == pytest.approx(5.0 / 5.3)
    figures[-1] = stream(2, 4.9, 0.14, split=1)  # the split run fastest: run --autotune splits
    assert run_choice(figures)["score_workers"] == 1 and run_choice([]) == {}
    # by the runs' own time: a layout whose cluster was spawned (slow to start) in the bench is not held against it
    slow_start = stream(1, 5.6, 0.2)
    slow_start.settings.update(cluster_start_seconds=0.4, stage_seconds={"total": 5.0})
    quick_start = stream(2, 5.4, 0.15)
    quick_start.settings.update(cluster_start_seconds=0.1, stage_seconds={"total": 5.2})
    assert run_choice([slow_start, quick_start])["workers"] == 1


def test_run_autotune_starts_the_whole_runs_layout(tmp_path, monkeypatch):
    """``run --autotune`` takes the workers of the bench's fastest whole run (scoring workers too), ``predict
    --autotune`` the predict stage's; given workers, or a scheduler, keep theirs."""
    from cancernet_batch import cli
    from cancernet_batch.machine import machine

    cfg = tmp_path / "cfg"
    (cfg / "cancernet-batch").mkdir(parents=True)
    (cfg / "cancernet-batch" / "autotune.json").write_text(json.dumps(
        {"engine": "onnx", "backend": None, "device": "cpu", "workers": 1, "threads_per_worker": 1, "batch_size": 512,
         "run": {"workers": 3, "threads_per_worker": 1, "score_workers": 1}, "machine": machine()}))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(cfg))

    def config(whole_run, **given):
        kw = {"model_dir": "m", "engine": "auto", "backend": None, "device": "cpu", "batch_size": None, "rescore": False,
              "autotune": True, "scheduler": None, "workers": None, "threads_per_worker": None, "tls_ca_file": None,
              "tls_cert": None, "tls_key": None, "score_workers": None, "connect_timeout": 30.0, **given}
        c = cli._predict_config(kw, whole_run=whole_run)
        return c.cluster.workers, c.cluster.score_workers, c.batch_size, c.engine

    assert config(True) == (3, 1, 512, "onnx")
    kw = {"model_dir": "m", "engine": "onnx", "backend": None, "device": "cpu", "batch_size": None, "rescore": False,
          "scheduler": None, "workers": 1, "threads_per_worker": None, "tls_ca_file": None, "tls_cert": None,
          "tls_key": None, "score_workers": None, "connect_timeout": 30.0}
    assert cli._predict_config({**kw, "micro_batch": 0}).micro_batch == 0  # --micro-batch reaches the settings
    assert cli._predict_config(dict(kw)).micro_batch is None  # (the engine's default)
    assert config(False) == (1, None, 512, "onnx")
    assert config(True, workers=2) == (2, None, 512, "onnx")  # given workers: not the measured layout
    assert config(True, score_workers=0) == (1, None, 512, "onnx")
    # measured on the CPU: not a GPU run's batch, workers or layout (one scoring worker on the GPU by default)
    from cancernet_batch.errors import ConfigError

    with pytest.raises(ConfigError, match="measured with --device cpu, not --device gpu"):
        config(True, device="gpu", engine="keras")


def test_split_ratio_compares_the_runs_own_time_with_each_stage_alone():
    """The split figure sets the run's own time (no cluster start, no cluster close: the stage figures leave
    both out) against the slower of tiling and scoring alone on one core, for the split run's patches."""
    from cancernet_batch.bench import BenchResult, Figure

    figures = [Figure("tile", "dask", 1000, 4.0, {"workers": 1}),
               Figure("predict", "onnx", 1000, 6.0, {"workers": 1, "threads_per_worker": 1, "engine_threads": 1}),
               Figure("predict", "onnx", 1000, 3.5, {"workers": 2, "threads_per_worker": 1}),  # not on one core
               Figure("run-split", "onnx", 2000, 15.0, {"cluster_start_seconds": 1.0,
                                                       "stage_seconds": {"total": 13.2}})]
    ratios = BenchResult({}, {}, figures, {}).ratios()
    assert ratios["split_vs_slower_stage_alone"] == pytest.approx(13.2 / 12.0)
    figures[-1].settings.pop("stage_seconds")  # an older record: wall less the cluster's start
    assert BenchResult({}, {}, figures, {}).ratios()["split_vs_slower_stage_alone"] == pytest.approx(14.0 / 12.0)


def test_the_figures_say_which_code_measured_them(tmp_path):
    """``machine()["code"]``: the package's folder and, in a git checkout, its commit (``+``: tracked files
    changed). A copy outside any checkout has no commit; imported by ``python -c`` (or ``-m``) run in the folder
    that holds it, the copy is what runs, whatever ``PYTHONPATH`` says (the trap this record exposes)."""
    import shutil
    from pathlib import Path

    import cancernet_batch
    from cancernet_batch.machine import code

    here = Path(cancernet_batch.__file__).resolve().parent
    mine = code()
    assert mine["package"] == str(here)
    if (here.parent / ".git").exists():
        head = subprocess.run(["git", "-C", str(here.parent), "rev-parse", "HEAD"], capture_output=True, text=True)
        changed = subprocess.run(["git", "-C", str(here.parent), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True).stdout.strip()
        assert mine["commit"] == head.stdout.strip() + ("+" if changed else "")
    shutil.copytree(here, tmp_path / "cancernet_batch", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-c", "import json; from cancernet_batch.machine import machine; "
                        "print(json.dumps(machine()))"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(here.parent)}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["code"] == {"package": str((tmp_path / "cancernet_batch").resolve())}
