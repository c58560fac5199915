"""A run folder on object storage (``--out s3://...``), against a real S3 API server: moto's standalone
server on 127.0.0.1, reached over HTTP by s3fs/botocore exactly as AWS would be (no client call is mocked)."""

from __future__ import annotations

import csv
import io
import json
import logging
import socket
import time

import pytest

from cancernet_batch import cli, runfolder
from cancernet_batch.runfolder import LOCK_STALE_S, Run

BUCKET = "cancernet-runs"
KEY_ID = "AKIAEXAMPLERUNKEY"
SECRET = "s3cr3t-Never-Print-This-0xC0FFEE"


class S3Server:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def options(self, key: str = KEY_ID, secret: str = SECRET, endpoint: str | None = None) -> dict:
        return {"key": key, "secret": secret,
                "client_kwargs": {"endpoint_url": endpoint or self.endpoint, "region_name": "us-east-1"}}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.options())

    def objects(self, prefix: str) -> dict[str, bytes]:
        fs = self.fs()
        return {name: fs.cat_file(name) for name in fs.find(f"{BUCKET}/{prefix}")}


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on a free port of 127.0.0.1, with one bucket; stopped at the end of the session."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield S3Server(endpoint)
    server.stop()


@pytest.fixture(scope="module")
def client():
    """One Dask worker in its own process: the run folder travels to it pickled, credentials included."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


def _main(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def _csv(data: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(data.decode())))


def test_run_on_s3_resumes_reports_and_keeps_secrets(s3, client, synth_patch_dir, tiny_model_dir, capsys, caplog,
                                                    monkeypatch):
    inputs = sorted(p for p in synth_patch_dir.iterdir() if p.is_dir())[:2]
    url = f"s3://{BUCKET}/nights/one"
    args = ["run", *map(str, inputs), "--out", url, "--model", str(tiny_model_dir),
            "--scheduler", client.scheduler.address, "--storage-options", json.dumps(s3.options())]
    caplog.set_level(logging.DEBUG)
    rc, out1, err1 = _main(capsys, *args)
    assert rc == 0, err1
    assert f"report at {url}/report/index.html" in out1

    first = s3.objects("nights/one")
    names = {n.split("nights/one/", 1)[1] for n in first}
    for name in ("predict.json", "progress.json", "failures.csv", "tiles.zarr/zarr.json", "report/inputs.csv",
                 "report/patients.csv", "report/failures.csv", "report/index.html"):
        assert name in names, sorted(names)
    assert ".lock" not in names  # released
    assert not any(".tmp-" in n or n.endswith(".partial") for n in names)  # object PUTs: no temporary names
    assert sum(n.startswith("report/maps/") and n.endswith(".png") for n in names) == 2
    assert sum(n.startswith("report/geojson/") and n.endswith(".regions.geojson") for n in names) == 2
    assert sum(n.startswith("report/geojson/") and n.endswith(".geojson") for n in names) == 4  # tiles + regions
    assert "report/viewer.js" in names and sum(n.endswith(".view.js") for n in names) == 2
    assert sum(n.startswith("report/pyramids/") and n.endswith(".ome.tif") for n in names) == 2
    assert sum(n.startswith("report/pyramids/") and n.endswith(".ome.zarr/.zattrs") for n in names) == 2
    rows = _csv(first[f"{BUCKET}/nights/one/report/inputs.csv"])
    assert sorted(r["source"] for r in rows) == sorted(map(str, inputs))
    assert {r["status"] for r in rows} == {"reported"} and all(int(r["tissue_tiles"]) == 60 for r in rows)
    assert first[f"{BUCKET}/nights/one/report/maps/" + rows[0]["input_id"] + ".png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(first[f"{BUCKET}/nights/one/progress.json"])["state"] == "finished"

    # the same command again: nothing tiled or scored, every output as it was (progress.json's times aside)
    rc, out2, err2 = _main(capsys, *args)
    assert rc == 0, err2
    assert "tile:    0 tiled (0 tiles), 2 already complete" in out2 and "predict: 0 patches scored" in out2
    second = s3.objects("nights/one")
    assert second.keys() == first.keys()
    changed = sorted(n for n in first if first[n] != second[n])
    assert changed == [f"{BUCKET}/nights/one/progress.json"], changed

    # status, with credentials and endpoint from the standard places (environment) only
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    rc, out3, err3 = _main(capsys, "status", url)
    assert rc == 0, err3
    assert f"run:       {url}" in out3 and "state:     finished" in out3 and "2 done, 0 failed" in out3

    # the secret is nowhere: not in an object of the run, the CLI's output or a log record
    for name, data in second.items():
        assert SECRET.encode() not in data, name
    for text in (out1, err1, out2, err2, out3, err3, caplog.text):
        assert SECRET not in text


def test_lock_on_s3_names_the_holder_and_a_stale_lock_says_how_to_clear_it(s3, tiny_model_dir, capsys, monkeypatch,
                                                                           tmp_path):
    url = f"s3://{BUCKET}/nights/locked"
    opts = json.dumps(s3.options())
    run = Run.of(url, s3.options())
    run.write_progress({"state": "running"})
    second = ["run", "nowhere", "--out", url, "--model", str(tiny_model_dir), "--storage-options", opts]
    monkeypatch.setattr(runfolder, "LOCK_HEARTBEAT_S", 0.2)
    with run.lock("run"):
        holder = json.loads(s3.fs().cat_file(f"{BUCKET}/nights/locked/.lock"))
        assert holder["command"] == "run" and holder["host"] == socket.gethostname()
        assert SECRET not in json.dumps(holder)
        (tmp_path / "s3.json").write_text(opts)  # --storage-options @FILE
        rc, out, err = _main(capsys, "status", url, "--storage-options", f"@{tmp_path / 's3.json'}")
        assert rc == 0 and "state:     running (`cancernet run`" in out
        # a second writer: exit 1, one line naming the holder
        rc, out, err = _main(capsys, *second)
        assert rc == 1
        assert err.count("\n") == 1 and err.startswith(f"error: {url}: this run folder is in use by `cancernet run`")
        assert f"pid {holder['pid']} on {holder['host']}" in err
        # the holder renews its lock (here every 0.2 s instead of every minute)
        beat = holder["heartbeat"]
        deadline = time.monotonic() + 60
        while json.loads(s3.fs().cat_file(f"{BUCKET}/nights/locked/.lock"))["heartbeat"] == beat:
            assert time.monotonic() < deadline, "the lock was never renewed"
            time.sleep(0.1)
    assert not s3.fs().exists(f"{BUCKET}/nights/locked/.lock")  # released

    # a holder killed long ago left its lock: never taken over silently; the error says how to clear it
    dead = {"pid": 4242, "host": "node7", "command": "run", "started": time.time() - 2 * LOCK_STALE_S,
            "heartbeat": time.time() - 2 * LOCK_STALE_S, "token": "x"}
    s3.fs().pipe_file(f"{BUCKET}/nights/locked/.lock", json.dumps(dead).encode())
    rc, out, err = _main(capsys, *second)
    assert rc == 1 and err.count("\n") == 1
    assert "locked by `cancernet run` (pid 4242 on node7" in err and f"delete {url}/.lock" in err
    rc, out, err = _main(capsys, "status", url, "--storage-options", opts)
    assert rc == 0 and "stopped renewing its lock" in out and f"delete {url}/.lock" in out


def test_missing_bucket_wrong_credentials_and_no_endpoint_are_one_line_each(s3, tiny_model_dir, capsys, tmp_path):
    from moto import settings

    def fails(url: str, options: dict) -> str:
        rc, out, err = _main(capsys, "run", str(tmp_path), "--out", url, "--model", str(tiny_model_dir),
                             "--storage-options", json.dumps(options))
        assert rc == 1 and err.count("\n") == 1 and err.startswith(f"error: {url}"), err
        assert SECRET not in err and "wrong-secret" not in err and not out
        return err

    err = fails("s3://no-such-bucket/run", s3.options())
    assert "the bucket 'no-such-bucket' does not exist" in err and "create the bucket" in err

    saved = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on the server checks every request's credentials
    try:
        err = fails(f"s3://{BUCKET}/run", s3.options(key="AKIAUNKNOWNKEY", secret="wrong-secret"))
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = saved
    assert "access denied" in err and "AWS_ACCESS_KEY_ID" in err

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    err = fails(f"s3://{BUCKET}/run", s3.options(endpoint=closed))
    assert f"cannot reach the storage endpoint {closed}" in err and "AWS_ENDPOINT_URL" in err


def test_locations_file_urls_are_local_and_object_paths_print_as_urls(tmp_path, capsys):
    from pathlib import Path

    local = Run.of(f"file://{tmp_path}/run")
    assert local.root == Path(tmp_path / "run") and not local.remote
    remote = Run.of("s3://bucket/a/run/", {"secret": SECRET})
    assert remote.remote and str(remote.report_file("maps", "x.png")) == "s3://bucket/a/run/report/maps/x.png"
    assert remote.lock_path.name == ".lock" and str(remote.lock_path.parent) == "s3://bucket/a/run"
    assert SECRET not in repr(remote)
    # options are for object storage only: a usage error (exit 2) beside a local folder
    assert cli.main(["status", str(tmp_path), "--storage-options", "{}"]) == 2
    assert cli.main(["status", "s3://bucket/run", "--storage-options", "[1]"]) == 2
    assert "not a JSON object" in capsys.readouterr().err
