"""The streaming run: each input reported as soon as it is scored, the report valid at every moment,
a deadline that leaves the rest resumable, `cancernet status`, and scoring on its own workers."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cancernet_batch import store
from cancernet_batch.cluster import ClusterConfig, dask_client, tiling_threads, work_split
from cancernet_batch.runfolder import Run
from cancernet_batch.stages.flow import Flow
from cancernet_batch.stages.report import ReportConfig
from cancernet_batch.stages.run import run_pipeline
from cancernet_batch.stages.score import PredictConfig, prepare_scoring
from cancernet_batch.tiling import TileConfig

ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="module")
def inputs(synth_slide_dir, synth_patch_dir) -> list[Path]:
    slides = sorted(synth_slide_dir.glob("*.svs"))
    patients = sorted(p for p in synth_patch_dir.iterdir() if p.is_dir())[:2]
    return [*slides, *patients]


def _rows(run: Path) -> list[dict]:
    p = run / "report" / "inputs.csv"
    if not p.exists():
        return []
    with open(p, newline="") as fh:
        return list(csv.DictReader(fh))


def _scores(run: Path) -> dict[str, bytes]:
    return {gid: np.asarray(g["probs"][:]).tobytes() for gid, g in store.iter_inputs(Run.of(run).open_store("r"))}


def test_each_input_reported_before_the_next_is_tiled(client, inputs, tiny_model_dir, tmp_path):
    """One input in flight at a time, tables rewritten at once: whenever tiling of an input starts, the report
    already lists every input before it, valid (its rows complete) though the run is not finished."""
    run = tmp_path / "run"
    seen: list[int] = []

    def on_tile(done: int, added: int) -> None:
        if added:  # an input's tiles are planned: the inputs before it are already in the report
            seen.append(len([r for r in _rows(run) if r["status"] == "reported"]))

    s = run_pipeline(inputs, run, TileConfig(target_mpp=4.0, chunk=16), PredictConfig(model_dir=str(tiny_model_dir)),
                     max_inputs=1, flush_seconds=0, tile_progress=on_tile, client=client)
    assert s.report.reported == len(inputs) and not s.failed_inputs
    assert seen == list(range(len(inputs)))  # input k starts tiling with exactly k inputs reported
    assert s.first_report_seconds is not None and s.first_report_seconds < s.seconds["total"]
    prog = json.loads((run / "progress.json").read_text())
    assert prog["state"] == "finished" and prog["inputs"] == {"total": len(inputs), "done": len(inputs), "failed": 0,
                                                              "remaining": 0}
    assert prog["patches"]["scored"] == s.predict.tiles_scored > 0


def test_slow_start_one_input_per_thread_until_the_first_is_reported(client, inputs, tiny_model_dir, tmp_path):
    """The default window (2 per thread) opens only once an input is done: until then each worker thread has
    one input, so the first report does not wait behind the preflights and plans of the inputs after it."""
    run = tmp_path / "run"
    threads = sum(client.nthreads().values())
    assert len(inputs) > threads
    seen: list[int] = []

    def on_tile(done: int, added: int) -> None:
        if added:
            seen.append(len([r for r in _rows(run) if r["status"] == "reported"]))

    s = run_pipeline(inputs, run, TileConfig(target_mpp=4.0, chunk=16), PredictConfig(model_dir=str(tiny_model_dir)),
                     flush_seconds=0, tile_progress=on_tile, client=client)
    assert s.report.reported == len(inputs) and len(seen) == len(inputs)
    assert seen[threads] >= 1, seen  # the input after the first window is planned only once one is reported


def test_streamed_outputs_equal_the_stage_by_stage_commands(client, inputs, tiny_model_dir, tmp_path):
    """The stream writes exactly what tile, then predict, then report write one after another."""
    from cancernet_batch.stages.report import make_report
    from cancernet_batch.stages.score import predict_run
    from cancernet_batch.stages.tile import tile_run

    cfg = TileConfig(target_mpp=4.0, chunk=16)
    pcfg = PredictConfig(model_dir=str(tiny_model_dir))
    a, b = tmp_path / "stream", tmp_path / "stages"
    run_pipeline(inputs, a, cfg, pcfg, client=client)
    tile_run(inputs, b, cfg, client=client)
    predict_run(b, pcfg, client=client)
    make_report(b, ReportConfig(model_dir=str(tiny_model_dir)), client=client)
    assert _scores(a) == _scores(b)
    for name in ("inputs.csv", "patients.csv", "failures.csv"):
        assert (a / "report" / name).read_text() == (b / "report" / name).read_text(), name


def test_deadline_stops_new_inputs_and_the_rerun_finishes(client, inputs, tiny_model_dir, tmp_path):
    run = Run.of(tmp_path / "run")
    pcfg = PredictConfig(model_dir=str(tiny_model_dir))
    cfg = TileConfig(target_mpp=4.0, chunk=16)
    with run.create().lock("run"):
        flow = Flow(run, tile_cfg=cfg, scoring=prepare_scoring(run, pcfg), report_cfg=ReportConfig(), max_inputs=1,
                    flush_seconds=0)

        def first_tiles(done, added):
            flow.deadline = time.time()  # the night ends while the first input is on its way

        flow._tile_progress = first_tiles
        flow.discover(inputs)
        flow.execute(client)
    assert flow.stopped_by_deadline and flow.remaining == len(inputs) - 1
    assert [r["status"] for r in _rows(run.root)] == ["reported"]  # the one in flight finished and is reported
    assert run.progress()["state"] == "stopped at the deadline"
    s = run_pipeline(inputs, run, cfg, pcfg, client=client)
    assert s.report.reported == len(inputs) and s.remaining == 0 and len(s.tile.skipped) == 1


def test_inputs_tiled_before_are_settled_on_the_workers_and_one_at_another_resolution_fails_alone(
        client, inputs, tiny_model_dir, tmp_path, monkeypatch):
    """An input tiled by an earlier call goes straight to scoring: what is left of it to score is found by a worker
    task (the client reads nothing of it). One tiled at another µm/px than the model's fails there, with its row and
    failure, and the others are reported."""
    from cancernet_batch.stages.tile import tile_run

    run = tmp_path / "run"
    slide, other = inputs[0], inputs[1]
    tile_run([slide], run, TileConfig(target_mpp=2.0, chunk=16), client=client)  # not the model's 4.0 µm/px
    opened: list[str] = []  # the inputs this process (the client; the workers are other processes) opens
    real_open = Run.open_input
    monkeypatch.setattr(Run, "open_input", lambda self, gid, *a, **k: opened.append(gid) or real_open(self, gid, *a, **k))
    s = run_pipeline([other], run, TileConfig(target_mpp=4.0, chunk=16), PredictConfig(model_dir=str(tiny_model_dir)),
                     client=client)  # the first slide is not named: an input of an earlier call, to score
    rows = {Path(r["source"]).name: r for r in _rows(run)}
    assert rows[other.name]["status"] == "reported"
    assert rows[slide.name]["status"] == "not scored"  # as before: its failure row says why
    failures = list(csv.DictReader(open(run / "failures.csv")))
    assert [(Path(f["input"]).name, f["stage"]) for f in failures] == [(slide.name, "predict")]
    assert "2 µm/px but the model expects 4 µm/px" in failures[0]["message"]
    assert s.report.reported == 1
    assert store.input_id(str(slide)) not in opened  # settled by a worker task, not read by the client
    # run again: the finished input is settled and its report part kept in one task each, nothing else submitted
    submitted: list[str] = []
    real_submit = Flow._submit
    monkeypatch.setattr(Flow, "_submit", lambda self, kind, inp, *a, **k: submitted.append(kind)
                        or real_submit(self, kind, inp, *a, **k))
    before = (run / "report" / "inputs.csv").read_bytes()
    s = run_pipeline([other], run, TileConfig(target_mpp=4.0, chunk=16), PredictConfig(model_dir=str(tiny_model_dir)),
                     client=client)
    assert submitted == ["settle", "settle"] and s.report.reported == 1
    assert (run / "report" / "inputs.csv").read_bytes() == before


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cancernet_batch.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def test_cli_deadline_exit_status_and_status_command(inputs, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    args = ["run", *map(str, inputs), "--out", str(run), "--model", str(tiny_model_dir), "--workers", "1"]
    r = _cli(*args, "--max-hours", "0.000001")  # 4 ms: over before the cluster is up
    assert r.returncode == 3, r.stderr
    assert f"{len(inputs)} inputs remain; re-run the same command to continue" in r.stdout
    st = _cli("status", str(run))
    assert st.returncode == 0 and "stopped at the deadline" in st.stdout and f"remaining of {len(inputs)}" in st.stdout
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    st = _cli("status", str(run), "--json")
    rec = json.loads(st.stdout)
    assert rec["state"] == "finished" and not rec["running"] and rec["inputs"]["done"] == len(inputs)
    # a run that died mid-way: the record says running, but nobody holds the run folder
    Run.of(run).write_progress({**rec, "state": "running"})
    st = _cli("status", str(run))
    assert "stopped: the process is gone" in st.stdout


def test_second_writer_is_refused(inputs, tiny_model_dir, tmp_path):
    run = Run.of(tmp_path / "run")
    with run.create().lock("run"):
        r = _cli("run", str(inputs[0]), "--out", str(run.root), "--model", str(tiny_model_dir), "--workers", "1")
        st = _cli("status", str(run.root))
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: ") and "in use by `cancernet run`" in r.stderr
    assert "running (`cancernet run`" in st.stdout
    assert not (run.root / "predict.json").exists()  # nothing was written


def test_scoring_on_its_own_worker(inputs, tiny_model_dir, tmp_path, monkeypatch):
    """--score-workers 1 of 2: the model is loaded on the scoring worker only, every chunk is scored there,
    and the scores equal those of workers that do both kinds of work. On the one tiling worker, the first
    slide's chunk tasks all run before the second slide's prepare task (the report's first input waits for
    them; the second slide is admitted only once the first's prepare has come back with its chunks). A report
    part sent to one kind of worker (Flow._side_for) runs on that kind."""
    from distributed import get_task_stream

    from cancernet_batch.stages import score

    cluster = ClusterConfig(workers=2, score_workers=1, dashboard=False)
    pcfg = PredictConfig(model_dir=str(tiny_model_dir), cluster=cluster)
    cfg = TileConfig(target_mpp=4.0, chunk=16)
    with dask_client(cluster) as c:
        names = {w["name"]: w.get("resources") for w in c.scheduler_info(n_workers=-1)["workers"].values()}
        assert names == {"score-0": {"score": 1}, "tile-1": {"tile": 1}}
        assert work_split(c) and tiling_threads(c) == 1  # what the slow start admits slides by
        run_pipeline(inputs, tmp_path / "split", cfg, pcfg, client=c)
        loads = c.run(lambda: __import__("cancernet_batch.stages.score", fromlist=["x"]).ENGINE_LOADS["count"])
        by_name = {w["name"]: loads[addr] for addr, w in c.scheduler_info(n_workers=-1)["workers"].items()}
        slides = sorted(p for p in inputs if p.suffix == ".svs")
        sides: dict[str, str | None] = {}
        submit = Flow._submit

        def recording(self, kind, *args, **kwargs):
            submit(self, kind, *args, **kwargs)
            key = next(reversed(self._meta))  # the task just submitted
            if kind == "report":
                sides[key] = self._meta[key][3]

        monkeypatch.setattr(Flow, "_submit", recording)
        with get_task_stream(client=c) as ts:
            run_pipeline(slides, tmp_path / "two", cfg, pcfg, client=c)
        monkeypatch.undo()
        name_of = {addr: w["name"] for addr, w in c.scheduler_info(n_workers=-1)["workers"].items()}
    assert by_name == {"score-0": 1, "tile-1": 0}
    ran_on = {t["key"]: name_of[t["worker"]] for t in ts.data}
    assert len(sides) == len(slides)
    for key, side in sides.items():
        assert side is None or ran_on[key].startswith(side + "-"), (key, side, ran_on[key])
    first, second = (store.input_id(str(p)) for p in slides)
    started = {t["key"]: min(s["start"] for s in t["startstops"] if s["action"] == "compute") for t in ts.data}
    chunks = [at for key, at in started.items() if key.startswith(f"chunk-{first}-")]
    [prepare2] = [at for key, at in started.items() if key.startswith(f"prepare-{second}-")]
    assert chunks and max(chunks) < prepare2, sorted(started.items(), key=lambda kv: kv[1])
    run_pipeline(inputs, tmp_path / "mixed", cfg, PredictConfig(model_dir=str(tiny_model_dir),
                                                                cluster=ClusterConfig(workers=2, dashboard=False)))
    assert _scores(tmp_path / "split") == _scores(tmp_path / "mixed")
    assert score.ENGINE_LOADS["count"] == 0  # the client never loaded a model


def test_a_task_for_either_kind_of_worker_goes_to_the_kind_with_less_waiting(tmp_path):
    """With the work split and scoring on the CPU, a report part goes to the kind of worker that has fewer of the
    flow's tasks waiting per thread (the faster stage has room; the slower keeps its threads), to Dask's choice
    when they are even; counts are per thread of each kind."""
    from cancernet_batch.cluster import SCORE, TILE

    flow = Flow(Run.of(tmp_path / "run"), tile_cfg=TileConfig())
    flow._tile_threads, flow._score_threads = 1, 1
    for tile, score, want in [(0, 3, TILE), (1, 2, TILE), (3, 1, SCORE), (1, 0, SCORE), (0, 0, None), (2, 2, None)]:
        flow._queued = {TILE: tile, SCORE: score}
        assert flow._side_for() == want, (tile, score)
    flow._tile_threads = 3  # three tiling threads with three tasks: less waiting than one scorer with two
    flow._queued = {TILE: 3, SCORE: 2}
    assert flow._side_for() == TILE
    flow._queued = {TILE: 6, SCORE: 2}
    assert flow._side_for() is None


def test_a_task_for_either_kind_of_worker_goes_to_the_faster_kind_once_both_have_rates(tmp_path, monkeypatch):
    """Once each kind of worker has done _RATE_TILES tiles, a task either kind can run goes to the kind that does
    more tiles a second, in the thread-seconds it had tasks to run up to its last task back, whatever is waiting:
    every tile is tiled once and scored once, so the slower kind bounds the run (a split run's scorer drew the
    second input's report while the tiler idled). The busy time is counted from the flow's own submissions and
    returns, at most one task a thread."""
    from cancernet_batch.cluster import SCORE, TILE
    from cancernet_batch.stages import flow as flow_module

    now = [100.0]
    monkeypatch.setattr(flow_module.time, "monotonic", lambda: now[0])
    flow = Flow(Run.of(tmp_path / "run"), tile_cfg=TileConfig())
    flow._tile_threads, flow._score_threads = 1, 1

    def back(side: str, tiles: int) -> None:  # as _loop does for a task back
        flow._count_queued(side, -1)
        flow._busy_done[side] = flow._busy[side]
        flow._done[side] += tiles

    flow._count_queued(TILE, 1)
    flow._count_queued(TILE, 1)  # two waiting on one thread: one runs
    now[0] += 0.5
    back(TILE, 500)
    flow._count_queued(SCORE, 1)
    now[0] += 0.25
    back(TILE, 500)  # the tiling thread: busy 0.75 s for 1,000 tiles
    now[0] += 0.25
    back(SCORE, 200)  # the scoring thread: 0.5 s for 200, fewer than _RATE_TILES: the waiting tasks decide
    assert flow._busy_done == {TILE: 0.75, SCORE: 0.5}
    flow._queued = {TILE: 2, SCORE: 0}
    assert flow._side_for() == SCORE
    flow._count_queued(SCORE, 1)
    flow._count_queued(TILE, 1)
    now[0] += 0.5
    back(SCORE, 300)  # 500 tiles in 1.0 s: 500/s against the tiler's 1,333/s (its running task is not counted)
    assert flow._busy_done[SCORE] == 1.0 and flow._busy[TILE] == 1.25 and flow._busy_done[TILE] == 0.75
    assert flow._side_for() == TILE  # though the tiler has three waiting and the scorer none
    flow._score_threads = 4  # four scoring threads at 500/s each: 2,000/s
    assert flow._side_for() == SCORE
    flow._score_threads = 1
    flow._done[SCORE] = 750  # 750/s against the tiler's 1,333/s
    assert flow._side_for() == TILE
    flow._busy_done[TILE] = 2.0  # 500/s: slower than the scorer now (its reports, a slow slide)
    assert flow._side_for() == SCORE


def test_a_model_the_workers_cannot_load_stops_the_run_with_one_error(client, inputs, tiny_model_dir, tmp_path):
    """The model loads in the background while the first inputs are tiled; when it cannot load, the run stops
    with that one error (not a failure row per input)."""
    import shutil

    from cancernet_batch.errors import ModelError

    bad = tmp_path / "model"
    shutil.copytree(tiny_model_dir, bad)
    (bad / "model.onnx").write_bytes(os.urandom(4096))  # damaged after export: only the workers find out
    run = Run.of(tmp_path / "run")
    with pytest.raises(ModelError, match="model.onnx"):
        run_pipeline(inputs[:2], run, TileConfig(target_mpp=4.0, chunk=16),
                     PredictConfig(model_dir=str(bad), engine="onnx"), client=client)
    assert not [f for f in run.failures() if f.stage == "predict"]  # no input blamed for the model


def test_first_and_last_inputs_are_tiled_in_smaller_chunks(client, inputs, tiny_model_dir, tmp_path):
    """The pipeline's fill and drain: the last input of a scored stream gets chunks of an eighth (at least 8
    tiles), so the run ends soon after the last tile, and the first (its tilers score) one chunk per tiling thread
    (two here), no smaller than an eighth, tiled and scored side by side; an input between them gets whole chunks
    (small chunks are more tasks); the scores are those of whole chunks, a re-run finds every input fresh, and a
    resume keeps an input's chunks."""
    import shutil

    from cancernet_batch.stages.score import predict_run
    from cancernet_batch.stages.tile import edge_chunk, prepare_slide_task, tile_run

    two = sorted(p for p in inputs if p.suffix == ".svs")
    (tmp_path / "in").mkdir()
    slides = ordered = [Path(shutil.copy(src, tmp_path / "in" / name)) for src, name in
                        zip([two[0], two[1], two[0]], ["a.svs", "b.svs", "c.svs"])]  # inputs go in path order
    cfg = TileConfig(target_mpp=4.0, chunk=16)
    assert edge_chunk(16) == 8 and edge_chunk(1024) == 128 and edge_chunk(4) == 4
    # the first input, in parts: one equal chunk a thread, at most whole
    assert edge_chunk(1024, 843, 2) == 422 and edge_chunk(1024, 100, 2) == 50 and edge_chunk(1024, 5000, 2) == 1024
    assert edge_chunk(1024, 843, 1) == 843 and edge_chunk(16, 0, 2) == 8
    from cancernet_batch.stages.tile import _chunk_ok

    # a stored layout is kept whatever cut it, up to the whole chunk
    assert _chunk_ok(422, 843, 1024) and _chunk_ok(128, 843, 1024) and _chunk_ok(843, 843, 1024) and _chunk_ok(7, 14, 16)
    assert not _chunk_ok(2048, 5000, 1024) and not _chunk_ok(17, 20, 16) and not _chunk_ok(0, 14, 16)
    assert not _chunk_ok(None, 843, 1024) and not _chunk_ok(True, 1, 1024) and not _chunk_ok(1.0, 1, 1024)
    pcfg = PredictConfig(model_dir=str(tiny_model_dir))
    run = Run.of(tmp_path / "stream")
    s = run_pipeline(ordered, run, cfg, pcfg, client=client)
    assert s.report.reported == len(ordered)
    groups = {g.attrs["source"]: g for _, g in store.iter_inputs(run.open_store("r"))}
    first, last = groups[str(slides[0])], groups[str(slides[2])]
    assert last.attrs["n_tiles"] > 8 and last.attrs["chunk"] == 8 and last["tiled"].shape[0] >= 2
    n = first.attrs["n_tiles"]
    assert 2 < n <= 32 and first.attrs["chunk"] == -(-n // 2) and first["tiled"].shape[0] == 2  # (2 tiling threads)
    assert groups[str(slides[1])].attrs["chunk"] == min(16, groups[str(slides[1])].attrs["n_tiles"])
    # the same work in whole chunks, stage by stage: the same scores
    tile_run(ordered, tmp_path / "stages", cfg, client=client)
    predict_run(tmp_path / "stages", pcfg, client=client)
    whole = {g.attrs["source"]: g for _, g in store.iter_inputs(Run.of(tmp_path / "stages").open_store("r"))}
    assert whole[str(slides[0])].attrs["chunk"] == min(16, whole[str(slides[0])].attrs["n_tiles"])
    assert _scores(run.root) == _scores(tmp_path / "stages")
    # fresh for a re-run and for `tile` (whole-chunk settings), whichever end each input was at
    again = run_pipeline(ordered, run, cfg, pcfg, client=client)
    assert sorted(again.tile.skipped) == sorted(map(str, ordered)) and again.predict.tiles_scored == 0
    assert sorted(tile_run(ordered, run, cfg, client=client).skipped) == sorted(map(str, ordered))
    # a resume that finds an edge input half tiled keeps its chunks and writes only the missing one
    g = run.open_input(store.input_id(str(slides[0])))
    g.update_attributes({"complete": False})
    g["tiled"][1] = False
    res = prepare_slide_task(run, str(slides[0]), cfg, [], False)
    c = first.attrs["chunk"]
    assert res["todo"] == [(1, c, min(2 * c, res["n"]))] and res["kept"] == g["tiled"].shape[0] - 1


def test_one_prepare_task_preflights_plans_and_sets_up_the_predictions(tiny_model_dir, synth_slide_dir, slides_dir,
                                                                         tmp_path):
    """A slide's preflight, plan, group and predictions' arrays are one worker task: a broken slide fails at its
    preflight (nothing stored), a new group gets its probs/done with its other arrays and every chunk to score, an
    interrupted one is checked as before (its done chunks not scored again), and a model of another µm/px is one
    failure of that input."""
    from dataclasses import replace

    from cancernet_batch.failures import Failure
    from cancernet_batch.stages.score import input_chunks_to_score
    from cancernet_batch.stages.tile import prepare_slide_task

    run = Run.of(tmp_path / "run")
    run.create().open_store("a").require_group("inputs")
    cfg = TileConfig(target_mpp=4.0, chunk=4)
    scoring = prepare_scoring(run, PredictConfig(model_dir=str(tiny_model_dir)))
    scoring = replace(scoring, mpp=4.0)
    bad = prepare_slide_task(run, str(slides_dir / "unreadable.svs"), cfg, [], False, True, scoring)
    assert isinstance(bad, Failure) and bad.stage == "preflight" and "unreadable.svs" in bad.input
    assert list(run.open_store("r")["inputs"]) == []
    slide = str(sorted(synth_slide_dir.glob("*.svs"))[0])
    res = prepare_slide_task(run, slide, cfg, [], False, True, scoring)
    gid = res["gid"]
    chunks, nchunks = res["score"]
    assert nchunks == len(res["todo"]) >= 2 and [c[1:] for c in chunks] == res["todo"]
    g = run.open_store("r")["inputs"][gid]
    assert g["probs"].attrs["model_id"] == scoring.model_id and not np.asarray(g["done"][:]).any()
    assert g["probs"].shape == (res["n"],) and g["done"].shape == (nchunks,)
    # what the client's set-up of the same group says (it reads the group back): the same chunks
    assert input_chunks_to_score(run.open_input(gid), gid, scoring) == (chunks, nchunks)
    # interrupted after its first chunk was tiled and scored: the re-run's prepare keeps both
    g = run.open_input(gid)
    g["tiled"][0] = True
    g["probs"][0:4] = 0.5
    g["done"][0] = True
    again = prepare_slide_task(run, slide, cfg, [], False, True, scoring)
    assert again["kept"] == 1 and again["score"] == (chunks[1:], nchunks)
    other = prepare_slide_task(run, slide, cfg, [], False, True, replace(scoring, mpp=0.5))
    assert isinstance(other["score_error"], Failure) and other["score_error"].stage == "predict"
    assert "µm/px" in other["score_error"].message


def test_a_patient_folders_task_marks_it_complete_and_sets_up_its_predictions(tiny_model_dir, synth_patch_dir,
                                                                             tmp_path):
    """The patches task of the stream writes a patient folder's chunks, marks it complete in the write of its
    other attrs and makes its probs/done with its group: every chunk comes back to score, as the client's
    set-up of the same group says (which the client no longer does: on object storage a listing and some ten
    requests an input, one after the other). A model of another µm/px is one failure of that input."""
    from dataclasses import replace

    from cancernet_batch.failures import Failure
    from cancernet_batch.stages.score import input_chunks_to_score
    from cancernet_batch.stages.tile import patches_task

    folder = str(sorted(p for p in synth_patch_dir.iterdir() if p.is_dir())[0])
    run = Run.of(tmp_path / "run")
    run.create().open_store("a").require_group("inputs")
    scoring = prepare_scoring(run, PredictConfig(model_dir=str(tiny_model_dir)))
    cfg = TileConfig(target_mpp=scoring.mpp, chunk=4)
    res = patches_task(run, folder, cfg, scoring)
    gid = res["gid"]
    chunks, nchunks = res["score"]
    assert res["complete"] and nchunks == res["chunks"] >= 2 and len(chunks) == nchunks
    g = run.open_store("r")["inputs"][gid]
    assert g.attrs["complete"] is True and "padded" in g.attrs["extra"]
    assert g["probs"].attrs["model_id"] == scoring.model_id and g["done"].shape == (nchunks,)
    assert not np.asarray(g["done"][:]).any()
    assert input_chunks_to_score(run.open_input(gid), gid, scoring) == (chunks, nchunks)
    bare = Run.of(tmp_path / "plain")
    bare.create().open_store("a").require_group("inputs")
    plain = patches_task(bare, folder, cfg)  # the tile command: no predictions
    assert plain["complete"] and "score" not in plain
    assert "probs" not in Run.of(tmp_path / "plain").open_store("r")["inputs"][gid]
    other = patches_task(run, folder, cfg, replace(scoring, mpp=scoring.mpp * 2))
    assert isinstance(other["score_error"], Failure) and other["score_error"].stage == "predict"


def test_the_stream_leaves_a_patient_folders_set_up_to_its_task(client, inputs, tiny_model_dir, tmp_path, monkeypatch):
    """In a run, the client marks no patient folder complete and sets up no predictions for one: its task did."""
    from cancernet_batch.stages import flow as flow_module

    marked, set_up = [], []
    monkeypatch.setattr(flow_module.store, "mark_complete", lambda g, **kw: marked.append(g.path))
    start = Flow._start_scoring

    def spy(self, inp, tiled_now, chunks=None):
        set_up.append((inp.spec.kind if inp.spec is not None else None, chunks is None))
        return start(self, inp, tiled_now, chunks)

    monkeypatch.setattr(Flow, "_start_scoring", spy)
    patients = [p for p in inputs if p.is_dir()]
    run = Run.of(tmp_path / "run")
    s = run_pipeline([str(p) for p in patients], run, TileConfig(target_mpp=4.0, chunk=16),
                     PredictConfig(model_dir=str(tiny_model_dir)), client=client)
    assert not s.failed_inputs and len(_rows(tmp_path / "run")) == len(patients)
    assert marked == [] and set_up == [("patches", False)] * len(patients)
    assert all(r["status"] == "reported" for r in _rows(tmp_path / "run"))


def test_the_prepare_task_of_the_stream_tiles_the_first_chunk_itself(synth_slide_dir, tmp_path, monkeypatch):
    """``tile_first`` (what the stream asks): the first chunk is written in the prepare task, flagged as a chunk
    task flags it, with the same tiles; the others are left to chunk tasks; a slide whose first chunk cannot be
    read comes back with the error for its tile stage."""
    from cancernet_batch.stages.tile import prepare_slide_task, tile_chunk_task

    cfg = TileConfig(target_mpp=4.0, chunk=4)
    slide = str(sorted(synth_slide_dir.glob("*.svs"))[0])
    a, b = Run.of(tmp_path / "a"), Run.of(tmp_path / "b")
    for run in (a, b):
        run.create().open_store("a").require_group("inputs")
    res = prepare_slide_task(a, slide, cfg, [], False, True, None, True)
    plain = prepare_slide_task(b, slide, cfg, [], False, True, None, False)
    assert res["tiled"] == plain["todo"][:1] and res["todo"] == plain["todo"][1:] and "chunk_error" not in res
    ga, gb = a.open_input(res["gid"]), b.open_input(plain["gid"])
    assert np.asarray(ga["tiled"][:]).tolist() == [True] + [False] * len(res["todo"])
    assert not ga.attrs["complete"] and "complete" not in res  # chunks are left: the client marks it later
    tile_chunk_task(b, plain["gid"], slide, *plain["todo"][0], plain["level"], plain["tile_px"], cfg)
    assert np.array_equal(ga["tiles"][0:4], gb["tiles"][0:4]) and np.asarray(ga["tiles"][0:4]).any()
    # an input of one chunk: tiled and marked complete by its prepare task alone
    whole = Run.of(tmp_path / "whole")
    whole.create().open_store("a").require_group("inputs")
    one = prepare_slide_task(whole, slide, TileConfig(target_mpp=4.0, chunk=4096), [], False, True, None, True)
    assert one["todo"] == [] and len(one["tiled"]) == 1 and one["complete"]
    assert whole.open_input(one["gid"]).attrs["complete"] is True
    # the first chunk's tiles cannot be read (after a plan that could: a corrupt region the plan's coarse view does
    # not decode; injected here at the tile reader): the error comes back for the input's tile stage
    from cancernet_batch.errors import SlideReadError
    from cancernet_batch.stages import tile as tile_module

    def unreadable(reader, level, tile_px, coords, decode):
        raise SlideReadError("corrupt JPEG data in a tile", path=slide, hint="re-export the slide")

    monkeypatch.setattr(tile_module, "read_tiles", unreadable)
    broken = Run.of(tmp_path / "c")
    broken.create().open_store("a").require_group("inputs")
    res = prepare_slide_task(broken, slide, cfg, [], False, False, None, True)
    assert isinstance(res["chunk_error"], SlideReadError) and res["tiled"] == [] and slide in str(res["chunk_error"])


def test_the_first_inputs_tasks_go_before_every_other_inputs(client, inputs, tiny_model_dir, tmp_path, monkeypatch):
    """Every task of the flow's first input (its chunks too) outranks every task of the others (their scoring and
    reports too): with scoring before tiling by kind, the second input's tasks would otherwise run between the
    first's chunks and the report's first input would wait for them. Here every input's chunks are scored, and the
    last reported, in their tiling tasks: the second's too, each of its tasks of the tiling rank (kind first, then
    input order: a later input's prepare goes after an earlier input's chunks)."""
    submitted: list[tuple[str, int]] = []
    real = type(client).submit

    def spy(self, fn, *args, **kwargs):  # the real submit, with each task's key and priority noted
        submitted.append((kwargs["key"], kwargs.get("priority", 0)))
        return real(self, fn, *args, **kwargs)

    assert not work_split(client) and tiling_threads(client) == 2  # every worker thread tiles
    monkeypatch.setattr(type(client), "submit", spy)
    slides = sorted(p for p in inputs if p.suffix == ".svs")
    s = run_pipeline(slides, tmp_path / "run", TileConfig(target_mpp=4.0, chunk=16),
                     PredictConfig(model_dir=str(tiny_model_dir)), client=client)
    assert s.report.reported == 2
    first, second = (store.input_id(str(p)) for p in slides)
    mine = [p for k, p in submitted if first in k]
    others = [p for k, p in submitted if second in k]
    kinds = {k.split("-")[0] for k, _ in submitted if first in k}
    assert kinds == {"prepare", "chunk"}  # every chunk scored in its tiling task; the last one's reports it too
    assert mine and others and min(mine) > max(others), submitted
    by_kind = {k.split("-")[0]: p for k, p in submitted if second in k}
    assert set(by_kind) == {"prepare", "chunk"} and by_kind["chunk"] == by_kind["prepare"]


def test_the_first_reported_input_is_in_the_report_tables_at_once(client, inputs, tiny_model_dir, tmp_path):
    """The tables are rewritten every few seconds, but the first input's row goes in as soon as it is reported:
    with a flush interval longer than the run, the second input (one in flight at a time) starts tiling with the
    first already in ``inputs.csv``; ``first_report_seconds`` is taken after that write."""
    run = tmp_path / "run"
    seen: list[int] = []

    def on_tile(done: int, added: int) -> None:
        if added:
            seen.append(len([r for r in _rows(run) if r["status"] == "reported"]))

    s = run_pipeline(inputs[:3], run, TileConfig(target_mpp=4.0, chunk=16), PredictConfig(model_dir=str(tiny_model_dir)),
                     max_inputs=1, flush_seconds=3600, tile_progress=on_tile, client=client)
    assert s.report.reported == 3
    assert seen == [0, 1, 1]  # the first row at once; the others wait for the interval (here: the end)
    assert 0 < s.first_report_seconds < s.seconds["total"]


def test_chunks_are_scored_in_their_tiling_task_and_the_first_slide_gets_every_worker(
        client, inputs, tiny_model_dir, tmp_path, monkeypatch):
    """When the workers that tile also score, a chunk tiled in the run is scored in its tiling task (no round trip
    through the client between the two, in which the worker would start another input's task): no score task for
    it. Dask queues a task on the worker that looks least busy when it is submitted, so the first slide's chunks
    would often all wait for one worker while the other runs the second slide's tasks: they are queued on the
    workers in turn (another worker may still take them); no other input's tasks are placed. On two tiling
    threads the second slide's prepare is submitted only when the first's has come back (then at once): the
    first's plan comes back sooner, and both threads are free to take its chunks. No slide's prepare tiles a chunk:
    every one is a chunk task, tiled and scored in one (no score task reads a chunk back), and the one that scores a
    slide's last chunk makes its report part (no report task)."""
    submitted: list[tuple[str, list | None, bool, tuple]] = []
    events: list[tuple[str, str]] = []
    real, real_prepared = type(client).submit, Flow._on_prepare

    def spy(self, fn, *args, **kwargs):
        submitted.append((kwargs["key"], kwargs.get("workers"), kwargs.get("allow_other_workers", False), args))
        events.append(("submit", kwargs["key"]))
        return real(self, fn, *args, **kwargs)

    def back(self, inp, res, extra):
        events.append(("back", f"prepare-{inp.gid}-"))
        return real_prepared(self, inp, res, extra)

    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    assert len(workers) == 2 and not work_split(client) and tiling_threads(client) == 2
    monkeypatch.setattr(type(client), "submit", spy)
    monkeypatch.setattr(Flow, "_on_prepare", back)
    slides = sorted(p for p in inputs if p.suffix == ".svs")
    s = run_pipeline(slides, tmp_path / "run", TileConfig(target_mpp=4.0, chunk=4),
                     PredictConfig(model_dir=str(tiny_model_dir)), client=client)
    assert s.report.reported == 2 and not s.failed_inputs
    assert s.predict.chunks_scored == s.predict.chunks_total == s.tile.chunks_written
    first, second = (store.input_id(str(p)) for p in slides)
    chunks = [(k, w, args) for k, w, _, args in submitted if k.startswith("chunk-")]
    assert chunks and all(args[-2] is not None for _, _, args in chunks)  # each with the scoring settings
    n_chunks = {g: Run.of(tmp_path / "run").open_input(g, "r")["tiled"].shape[0] for g in (first, second)}
    for gid in (first, second):  # every chunk a chunk task, none scored apart, each carrying the report settings
        tiled = {args[3] for k, _, args in chunks if gid in k}
        scored = {args[2] for k, _, _, args in submitted if k.startswith(f"score-{gid}-")}
        assert tiled == set(range(n_chunks[gid])) and n_chunks[gid] >= 2 and not scored
        assert all(args[-1] is not None for k, _, args in chunks if gid in k)
    assert not [k for k, _, _, _ in submitted if k.startswith(("score-", "report-"))]
    mine = [w for k, w, _ in chunks if first in k]
    assert len(mine) >= 2 and mine == [[workers[i % 2]] for i in range(len(mine))]
    assert all(loose for _, w, loose, _ in submitted if w is not None)
    assert all(first in k for k, w, _, _ in submitted if w is not None)  # no other input's tasks
    [came_back] = [i for i, (e, k) in enumerate(events) if e == "back" and first in k]
    [submitted_2] = [i for i, (e, k) in enumerate(events) if e == "submit" and k.startswith(f"prepare-{second}-")]
    assert came_back < submitted_2, events
    assert not [e for e in events[came_back + 1:submitted_2] if e[0] == "back"]  # admitted in the same turn


def test_the_chunk_task_that_scores_a_slides_last_chunk_makes_its_report(client, inputs, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    """Every chunk of every slide is a chunk task that tiles and scores it (no slide's prepare tiles one, no score task
    reads one back); the one that scores a slide's last chunk makes its report part in the same task (no report task,
    no round trip through the client between them) and marks its tiling complete (the client does not). Each slide's
    chunks carry one claim, their own."""
    from cancernet_batch.stages import flow as flow_module

    submitted: list[tuple[str, tuple]] = []
    marked: list[str] = []
    reports: list[str] = []
    real, real_mark, real_chunk = type(client).submit, store.mark_complete, Flow._on_chunk

    def spy(self, fn, *args, **kwargs):
        submitted.append((kwargs["key"], args))
        return real(self, fn, *args, **kwargs)

    def mark(group, **kw):
        marked.append(group.basename)
        return real_mark(group, **kw)

    def back(self, inp, res, extra):
        if isinstance(res, dict) and res.get("report") is not None:
            reports.append(inp.gid)
        return real_chunk(self, inp, res, extra)

    monkeypatch.setattr(type(client), "submit", spy)
    monkeypatch.setattr(flow_module.store, "mark_complete", mark)
    monkeypatch.setattr(Flow, "_on_chunk", back)
    slides = sorted(p for p in inputs if p.suffix == ".svs")
    run = tmp_path / "run"
    s = run_pipeline(slides, run, TileConfig(target_mpp=4.0, chunk=4), PredictConfig(model_dir=str(tiny_model_dir)),
                     client=client)
    assert s.report.reported == 2 and not s.failed_inputs
    first, second = (store.input_id(str(p)) for p in slides)
    claims = set()
    for gid in (first, second):
        kinds = {k.split("-")[0] for k, _ in submitted if gid in k}
        assert kinds == {"prepare", "chunk"}  # no score task, no report task
        chunks = [args for k, args in submitted if k.startswith(f"chunk-{gid}-")]
        # (patient, thr, cfg, claim): one claim for the input's part, so that two that finish together do not both
        # make it
        assert len(chunks) >= 2 and all(args[-1] is not None and args[-1][0] for args in chunks)
        assert len({args[-1][3] for args in chunks}) == 1
        claims |= {args[-1][3] for args in chunks}
    assert len(claims) == 2
    assert sorted(reports) == sorted([first, second])
    assert not list(run.glob(".tmp-claim-*"))  # removed as the run ended
    assert marked == []  # each by the chunk task that reported it, on a worker
    for gid in (first, second):
        g = Run.of(run).open_input(gid, "r")
        assert g.attrs["complete"] and "idc_map" in g
    assert {r["input_id"]: r["status"] for r in _rows(run)} == {first: "reported", second: "reported"}


def test_a_first_slide_whose_chunk_fails_fails_once_and_the_run_goes_on(client, mpp_slides, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    """A slide's chunk tasks carry its report; when one of the first slide's cannot read its tiles (a damaged JPEG tile
    that neither the preflight nor the plan touches), no report is made: the slide fails once, at its tiles (one
    failures row, no report failure), not complete; the next slide is reported."""
    import tifffile

    from cancernet_batch.synth import SlideSpec, write_slide

    bad = tmp_path / "a-bad.svs"  # 0.5 µm/px, levels at 2 and 8 µm/px: tiles from level 1, the plan's view from 2
    write_slide(SlideSpec(path=bad, width=6144, height=4096, mpp=0.5, seed=41))
    with tifffile.TiffFile(bad) as tf:
        tiled = [pg for pg in tf.pages if pg.is_tiled]  # (the thumbnail is a page of strips)
        assert len(tiled) == 3 and tiled[1].shape[:2] == (1024, 1536)
        offset = tiled[1].dataoffsets[0]  # its top-left tile: in the first chunk, not the probed centre one
    with open(bad, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * 64)
    carried: list[str] = []
    real = type(client).submit

    def spy(self, fn, *args, **kwargs):
        if kwargs["key"].startswith("chunk-") and args[-1] is not None:
            carried.append(kwargs["key"])
        return real(self, fn, *args, **kwargs)

    monkeypatch.setattr(type(client), "submit", spy)
    good = tmp_path / "b-good.svs"  # inputs go in the order of their paths
    good.write_bytes(mpp_slides[2].path.read_bytes())
    run = tmp_path / "run"
    s = run_pipeline([bad, good], run, TileConfig(target_mpp=4.0, chunk=8, tissue_filter=False),
                     PredictConfig(model_dir=str(tiny_model_dir)), client=client)
    assert carried and {k.split("-")[1] for k in carried} == {"a", "b"}  # each slide's chunks carried its report
    assert s.report.reported == 1 and set(s.failed_inputs) == {str(bad)}
    failures = list(csv.DictReader(open(run / "failures.csv")))
    assert [(f["input"], f["stage"], f["error_class"]) for f in failures] == [(str(bad), "tile", "SlideReadError")]
    assert not Run.of(run).open_input(store.input_id(str(bad)), "r").attrs["complete"]
    rows = {r["input_id"]: r["status"] for r in _rows(run)}
    assert rows[store.input_id(str(good))] == "reported"
