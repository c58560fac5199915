"""The run folder object: locations, the failures list's one merge rule, records, the one-writer lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cancernet_batch.errors import StorageError
from cancernet_batch.failures import Failure
from cancernet_batch.runfolder import Run


def _f(inp, stage, msg="bad"):
    return Failure(inp, stage, "InputError", msg)


def test_locations_are_absolute_and_keep_links(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    os.chdir(tmp_path)
    run = Run.of("link/run")
    assert run.root == tmp_path / "link" / "run"  # as given (made absolute), the link not resolved
    assert run.store_path.name == "tiles.zarr" and run.report_file("maps", "a.png").parent == run.root / "report" / "maps"
    assert Run.of(run) is run


def test_failures_one_merge_rule(tmp_path):
    run = Run.of(tmp_path).create()
    run.record_failures([_f("/a.svs", "tile"), _f("/b.svs", "predict"), _f("/P/0/x.png", "tile"), _f("/c.svs", "report")])
    # newest wins per (input, stage)
    got = run.record_failures([_f("/a.svs", "tile", "worse")])
    assert {(f.input, f.message) for f in got if f.input == "/a.svs"} == {("/a.svs", "worse")}
    # a retried input loses its rows from that stage on, and so do files inside it
    got = run.record_failures([], retried={"/P": "discover", "/b.svs": "report", "/c.svs": "report"})
    assert {f.input for f in got} == {"/a.svs", "/b.svs"}  # /b.svs kept: its row is earlier than report
    got = run.record_failures([_f("/b.svs", "report")], retried=["/b.svs"], from_stage="predict")
    assert [(f.input, f.stage) for f in got] == [("/a.svs", "tile"), ("/b.svs", "report")]
    assert run.failures() == got
    with pytest.raises(ValueError):
        run.record_failures([], retried=["/x"], from_stage="nope")


def test_failures_file_written_only_on_change(tmp_path):
    run = Run.of(tmp_path).create()
    run.record_failures([_f("/a", "tile")])
    before = run.failures_csv.stat().st_mtime_ns
    os.utime(run.failures_csv, ns=(1, 1))
    run.record_failures([_f("/a", "tile")])
    assert run.failures_csv.stat().st_mtime_ns == 1 != before


def test_damaged_records_are_clear_errors(tmp_path):
    run = Run.of(tmp_path).create()
    run.predict_json.write_text("{not json")
    with pytest.raises(StorageError, match="predict.json is damaged"):
        run.predict_record()
    run.failures_csv.write_text("who,what\n1,2\n")
    with pytest.raises(StorageError, match="no column"):
        run.failures()
    run.write_progress({"state": "running"})
    assert run.progress() == {"state": "running"}


def test_lock_one_writer(tmp_path):
    run = Run.of(tmp_path / "run")
    with run.create().lock("run"):
        assert run.holder()["command"] == "run"
        # another process trying to take it fails at once, naming the holder
        code = ("import sys; from cancernet_batch.runfolder import Run\n"
                "from cancernet_batch.errors import StorageError\n"
                f"try:\n  Run.of({str(run.root)!r}).lock('tile').__enter__()\n"
                "except StorageError as e:\n  print(e.one_line()); sys.exit(1)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r.stderr
        assert "in use by `cancernet run`" in r.stdout and f"pid {os.getpid()}" in r.stdout
    assert run.holder() is None
    with run.lock("report"):  # released: free again
        pass


def test_lock_released_when_holder_is_killed(tmp_path):
    run = Run.of(tmp_path / "run").create()
    code = (f"from cancernet_batch.runfolder import Run\nimport time\n"
            f"with Run.of({str(run.root)!r}).lock('run'):\n  print('held', flush=True)\n  time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        assert run.holder()["pid"] == p.pid
        p.kill()
        p.wait(timeout=30)
        assert run.holder() is None
        with run.lock("run"):
            assert json.loads(run.lock_path.read_text())["pid"] == os.getpid()
    finally:
        p.kill()


def test_a_tile_store_of_another_schema_version_is_refused(tmp_path):
    from cancernet_batch import store

    run = Run.of(tmp_path / "run").create()
    root = run.open_store("a")
    assert root.attrs["schema_version"] == store.SCHEMA_VERSION  # a new store is stamped
    root.attrs["schema_version"] = store.SCHEMA_VERSION + 1
    for mode in ("r", "r+"):
        with pytest.raises(StorageError, match=f"schema version {store.SCHEMA_VERSION + 1}"):
            run.open_store(mode)


def test_node_cache_reads_each_member_once_and_follows_its_own_changes(tmp_path):
    import zarr

    from cancernet_batch import store

    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    g.create_array("tiles", shape=(4,), dtype="uint8")
    c = store.NodeCache(g)
    assert c["tiles"] is c["tiles"]  # one lookup, then the same array object
    assert "probs" not in c and "tiles" in c
    c.create_array("probs", shape=(4,), dtype="float32")
    assert "probs" in c and "probs" in g
    del c["probs"]
    assert "probs" not in c and "probs" not in g
    assert c.attrs is not None and c.path == g.path  # everything else is the group's own


def test_worker_input_cache_reuses_handles_but_never_serves_stale_metadata(tmp_path):
    """``Run.open_input`` (worker tasks) keeps array handles per process while the input's group document
    is unchanged; a re-tiled input, a model replaced with --rescore and an array created later are seen."""
    from cancernet_batch import store
    from cancernet_batch.store import InputAttrs

    run = Run.of(tmp_path / "run")

    def tile(n: int, **extra):
        attrs = InputAttrs(source=str(tmp_path / "a.svs"), kind="slide", reader="test", patient="p",
                           source_size=1, source_mtime=0.0, target_mpp=4.0, grid_shape=(8, 8), n_tiles=n, **extra)
        return store.input_id(attrs.source), store.create_input(run.create().open_store("a"), attrs, n, chunk=4)

    gid, _ = tile(10)
    g = run.open_input(gid)
    assert g["tiles"].shape[0] == 10 and run.open_input(gid)["tiles"] is g["tiles"]  # one handle reused
    assert "labels" not in g
    store.create_input(run.open_store("a"), InputAttrs.from_json(dict(g.attrs)), 10, chunk=4, labels=True)
    assert "labels" in run.open_input(gid)  # an array missing before is found once it exists

    gid, _ = tile(20, source_mpp=0.5)  # re-tiled: other attrs, arrays of another shape
    g = run.open_input(gid)
    assert g["tiles"].shape[0] == 20 and g["tiled"].shape == (5,)
    g["tiles"][16:20] = 7  # written through the handle: lands in the new array
    assert int(run.open_store("r")["inputs"][gid]["tiles"][19].max()) == 7

    probs, _ = store.ensure_predictions(run.open_input(gid), "model-a")
    store.data_array(run.open_input(gid), "probs")[0:4] = 0.5  # a score task's handle, cached
    plain = run.open_store("r+")["inputs"][gid]
    store.ensure_predictions(plain, "model-b", reset=True)  # another process replaces the model
    g = run.open_input(gid)
    assert g["probs"].attrs["model_id"] == "model-b"  # the model of the probabilities is read afresh
    assert np.isnan(g["probs"][0:4]).all() and not store.done_mask(g).any()  # chunk data: never cached
    store.data_array(g, "probs")[0:4] = 0.25
    np.testing.assert_allclose(plain["probs"][0:4], 0.25)


def test_a_storage_error_never_shows_a_secret_the_server_echoed():
    """A driver or server that puts the request's URL (a SAS signature, a presigned S3 query) or a connection
    string in its error text: the one-line error keeps the text, with those values replaced by ``***``, and names
    a container and Azure's credential variables on ``az://``, a bucket and AWS's on ``s3://``."""
    from cancernet_batch.runfolder import FsspecFS, scrub

    sas = "https://acct.blob.core.windows.net/c/x.svs?sv=2022-11-02&se=2027-01-01&sp=r&sig=Zm9vYmFy%2Bc2VjcmV0"
    conn = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=c2VjcmV0a2V5PT0=;EndpointSuffix=core"
    aws = "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAX%2F2026&X-Amz-Signature=abcdef0123&X-Amz-Expires=60"
    for text, secrets in ((sas, ["Zm9vYmFy%2Bc2VjcmV0"]), (conn, ["c2VjcmV0a2V5PT0="]),
                          (aws, ["AKIAX%2F2026", "abcdef0123"])):
        out = scrub(f"request failed: {text} (403)")
        assert all(s not in out for s in secrets), out
        assert out.startswith("request failed: https") or "AccountName=acct" in out  # the rest is kept

    class Denied(Exception):
        status_code = 403

    e = FsspecFS("az")._error(Denied(f"Server failed to authenticate the request: {sas}"), "az://c/run", "writing")
    assert "access denied while writing" in e.message and "Zm9vYmFy" not in e.message, e.message
    assert "AZURE_STORAGE_CONNECTION_STRING" in e.hint
    e = FsspecFS("s3")._error(FileNotFoundError(aws), "s3://b/run", "reading")
    assert "abcdef0123" not in e.message and "bucket name" in e.hint, (e.message, e.hint)
    e = FsspecFS("az")._error(FileNotFoundError("gone"), "az://c/run", "reading")
    assert "container name" in e.hint
