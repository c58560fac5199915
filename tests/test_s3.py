"""A run folder on object storage (``--out s3://...``), against a real S3 API server: moto's standalone
server on 127.0.0.1, reached over HTTP by s3fs/botocore exactly as AWS would be (no client call is mocked)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cancernet_batch import cli, runfolder
from cancernet_batch.errors import StorageError
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


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free port of 127.0.0.1 (its request log: ``s3.server.gets()``), with one bucket."""
    from s3server import CountingS3

    server = CountingS3().start()
    server.create_bucket(BUCKET)
    out = S3Server(server.endpoint)
    out.server = server
    yield out
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
    s3.server.reset()
    with run.lock("run"):
        # taken with two conditional PUTs (the lock, then the probe that the server honours the condition), no GET
        taken = [(r.method, r.path) for r in s3.server.requests if r.path.endswith("/.lock")]
        assert taken == [("PUT", f"/{BUCKET}/nights/locked/.lock")] * 2, taken
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


def test_a_claim_on_s3_is_one_conditional_put_and_the_first_callers(s3):
    """``Run.claim`` on object storage: an empty object made by a conditional PUT; of callers at the same moment one
    gets True; ``release_claims`` deletes every claim (one listing, one batch of deletes), nothing else."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    run = Run.of(f"s3://{BUCKET}/nights/claims", s3.options())
    start = threading.Barrier(4)

    def claim(_):
        start.wait()
        return run.claim("report-abc-x")

    s3.server.reset()
    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(claim, range(4))) == [False] * 3 + [True]
    made = [(r.method, r.path) for r in s3.server.requests if "/.tmp-claim-" in r.path]
    assert made == [("PUT", f"/{BUCKET}/nights/claims/.tmp-claim-report-abc-x")] * 4, made
    assert s3.fs().cat_file(f"{BUCKET}/nights/claims/.tmp-claim-report-abc-x") == b""
    assert run.claim("report-old-y") is True  # as a killed run would leave it
    run.write_progress({"state": "running"})
    s3.server.reset()
    assert run.release_claims() == 2
    assert [r.method for r in s3.server.requests if r.method == "GET"] == ["GET"]  # the one listing
    # and one batch: a DeleteObjects request (POST ?delete), not a DELETE per claim (a run has one per input)
    assert [r.method for r in s3.server.requests if r.method in ("DELETE", "POST")] == ["POST"], s3.server.requests
    fs = s3.fs()
    assert not fs.exists(f"{BUCKET}/nights/claims/.tmp-claim-report-abc-x")
    assert not fs.exists(f"{BUCKET}/nights/claims/.tmp-claim-report-old-y")
    assert fs.exists(f"{BUCKET}/nights/claims/progress.json")
    assert run.release_claims() == 0 and run.claim("report-abc-x") is True


def test_a_server_that_ignores_conditional_puts_is_one_clear_error_not_a_silent_lock(tiny_model_dir, capsys,
                                                                                      monkeypatch, caplog):
    """moto behind a layer that drops ``If-None-Match`` (s3rver 3.7 ignores it): the lock cannot hold, so a
    writing command refuses with one line instead of sharing the run folder unnoticed; CANCERNET_UNLOCKED_OUT=1
    writes it unlocked, with a warning."""
    from s3server import CountingS3

    class Ignoring(CountingS3):
        def _app(self, app):
            inner = super()._app(app)

            def wrapped(environ, start_response):
                environ.pop("HTTP_IF_NONE_MATCH", None)
                return inner(environ, start_response)

            return wrapped

    server = Ignoring().start()
    try:
        server.create_bucket(BUCKET)
        url = f"s3://{BUCKET}/nights/unlockable"
        opts = S3Server(server.endpoint).options()
        monkeypatch.delenv(runfolder.UNLOCKED_ENV, raising=False)
        rc, out, err = _main(capsys, "run", "nowhere", "--out", url, "--model", str(tiny_model_dir),
                             "--storage-options", json.dumps(opts))
        assert rc == 1 and err.count("\n") == 1, err
        assert err.startswith(f"error: {url}: the storage server ignores conditional writes (If-None-Match)"), err
        assert "local --out" in err and runfolder.UNLOCKED_ENV in err and SECRET not in err
        fs = S3Server(server.endpoint).fs()
        assert not fs.exists(f"{BUCKET}/nights/unlockable/.lock")  # nothing left behind

        monkeypatch.setenv(runfolder.UNLOCKED_ENV, "1")
        with caplog.at_level(logging.WARNING, logger="cancernet_batch.runfolder"), Run.of(url, opts).lock("tile"):
            held = json.loads(fs.cat_file(f"{BUCKET}/nights/unlockable/.lock"))
            assert held["command"] == "tile" and not held["token"].endswith("-probe")
        assert "the run folder is not locked" in caplog.text
        assert not fs.exists(f"{BUCKET}/nights/unlockable/.lock")  # released as usual
    finally:
        server.stop()


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


# --------------------------------------------------------------------------------------------
# inputs on object storage
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_inputs(s3, synth_slide_dir, tmp_path_factory, slides_dir):
    """On the server: ``good/`` (a synthetic SVS and a generic tiled TIFF), ``mixed/`` (the same two and a
    truncated SVS), ``dicom/boxes_0.dcm``, ``more/`` (an OME-TIFF with a sub-IFD pyramid, the real Aperio
    ``cmu-1-small-region.svs``, and ``cut.svs``: an SVS cut inside the last tile of its last level, every
    IFD intact). Returns {name: (url, local path)}."""
    import tifffile

    from cancernet_batch.synth import SlideSpec, write_slide

    d = tmp_path_factory.mktemp("s3-inputs")
    tiff = d / "generic.tiff"
    write_slide(SlideSpec(path=tiff, width=2048, height=2048, mpp=1.0, seed=41, format="tiff"))
    svs = sorted(synth_slide_dir.glob("*.svs"))[0]
    broken = d / "broken.svs"
    broken.write_bytes(svs.read_bytes()[:60_000])  # the header and the first tiles: cut short
    ome = d / "pyramid.ome.tif"
    with tifffile.TiffFile(tiff) as tf:
        px = tf.pages[0].asarray()
    md = {"axes": "YXS", "PhysicalSizeX": 1.0, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 1.0,
          "PhysicalSizeYUnit": "µm"}
    with tifffile.TiffWriter(ome, ome=True) as tw:
        tw.write(px, tile=(256, 256), compression="jpeg", photometric="rgb", subifds=1, metadata=md)
        tw.write(px[::2, ::2], tile=(256, 256), compression="jpeg", photometric="rgb", subfiletype=1)
    cut = d / "cut.svs"
    with tifffile.TiffFile(svs) as tf:
        last = max((p for p in tf.pages if p.is_tiled), key=lambda p: p.offset)
        assert max(p.offset for p in tf.pages) == last.offset  # no IFD after its tiles
        end = int(last.dataoffsets[-1] + last.databytecounts[-1] // 2)
    cut.write_bytes(svs.read_bytes()[:end])
    fs = s3.fs()
    out = {}
    for prefix, files in (("good", [svs, tiff]), ("mixed", [svs, tiff, broken]),
                          ("dicom", [slides_dir / "boxes_0.dcm"]),
                          ("more", [ome, slides_dir / "cmu-1-small-region.svs", cut])):
        for f in files:
            fs.put_file(str(f), f"{BUCKET}/{prefix}/{f.name}")
            out[f"{prefix}/{f.name}"] = (f"s3://{BUCKET}/{prefix}/{f.name}", f)
    out["svs"], out["tiff"] = out[f"good/{svs.name}"], out["good/generic.tiff"]
    return out


def _needed(reader, level: int, tile_px: float, coords, *, want_ranges: bool = False):
    """Compressed bytes of the distinct TIFF tiles that the model tiles at ``coords`` touch (``ranges``: their
    ``want_ranges``: their ``(offset, size)`` ranges)."""
    from cancernet_batch.slides.tifffile_backend import chunk_ranges

    lvl = reader._series.levels[level]
    lw, lh = reader.level_dimensions[level]
    ranges = set()
    for r, c in coords:
        x0, y0 = int(c * tile_px), int(r * tile_px)
        x1, y1 = min(lw, int(-(-(c + 1) * tile_px // 1))), min(lh, int(-(-(r + 1) * tile_px // 1)))
        for page in lvl.pages:
            ranges.update(chunk_ranges(page.keyframe, page, x0, y0, x1 - x0, y1 - y0))
    return sorted(ranges) if want_ranges else sum(n for _, n in ranges)


@pytest.mark.parametrize("name", ["svs", "tiff"])
def test_tiff_inputs_are_read_in_place_by_few_range_requests(s3, s3_inputs, name):
    from cancernet_batch import remote
    from cancernet_batch.config import TileConfig
    from cancernet_batch.slides import open_slide
    from cancernet_batch.slides.tifffile_backend import TiffFileReader
    from cancernet_batch.tiling import plan_slide, read_tiles

    url, local = s3_inputs[name]
    key = url.split("://", 1)[1]
    cfg = TileConfig(target_mpp=2.0, decode="reader")  # the reader path (tifffile over the range file)
    s3.server.reset()
    with open_slide(url, storage_options=s3.options()) as reader:
        opened = s3.server.gets(key)
        assert reader.name == "tifffile" and str(reader.path) == url
        assert reader.source_identity == remote.stat(url, s3.options())
        plan = plan_slide(url, cfg, reader=reader)
    with TiffFileReader(local) as ref:
        want = plan_slide(local, cfg, reader=ref)
        assert np.array_equal(plan.coords, want.coords) and plan.level == want.level and plan.n_tiles > 20
        assert plan.source_etag == reader.source_identity[1] and plan.source_size == local.stat().st_size
        expected = read_tiles(ref, plan.level, plan.tile_px_level, plan.coords, decode="reader")
    # the header: a few block reads; never the whole object
    assert 1 <= len(opened) <= 4 and all(g.range for g in opened)
    # tiling with a fresh reader: whole compressed tiles by coalesced range requests
    with open_slide(url, storage_options=s3.options()) as reader:
        s3.server.reset()
        tiles = read_tiles(reader, plan.level, plan.tile_px_level, plan.coords, decode="reader")
        gets = s3.server.gets(key)
        ranges = _needed(reader, plan.level, plan.tile_px_level, plan.coords, want_ranges=True)
        needed = sum(n for _, n in ranges)
        # the tiles in the blocks fetched with the header (the object's tail) are not fetched again
        outside = sum(n for o, n in ranges if reader._file._in_blocks(o, o + n) is None)
    assert np.array_equal(tiles, expected)  # the same pixels as the local file
    assert gets and all(g.range for g in gets)
    assert len(gets) < plan.n_tiles / 4, (len(gets), plan.n_tiles)  # coalesced: far fewer requests than tiles
    assert 0 < outside <= sum(g.sent for g in gets) <= 1.2 * needed, (sum(g.sent for g in gets), outside, needed)


def test_a_plan_over_s3_reads_the_scanner_thumbnail_in_one_request_at_most(s3, s3_inputs):
    """CMU-1's overview comes from its thumbnail (its one level is 15 times larger): over S3 its 48 strips take at
    most one range request, not one each (here none: they lie in the header's blocks, read with the IFDs), and the
    plan is the one made from the local file."""
    import tifffile

    from cancernet_batch.config import TileConfig
    from cancernet_batch.slides import open_slide
    from cancernet_batch.tiling import plan_slide

    url, local = s3_inputs["more/cmu-1-small-region.svs"]
    key = url.split("://", 1)[1]
    with tifffile.TiffFile(local) as tif:
        page = tif.pages[1]
        strips = int(sum(page.databytecounts))
        assert len(page.databytecounts) > 10
    want = plan_slide(local, TileConfig(target_mpp=4.0))
    with open_slide(url, storage_options=s3.options()) as reader:
        reader.scanner_thumbnail_size()  # the pages' tags: read with the header
        s3.server.reset()
        plan = plan_slide(url, TileConfig(target_mpp=4.0), reader=reader)
        gets = s3.server.gets(key)
    assert plan.view_source == want.view_source == "thumbnail 574x768"
    assert np.array_equal(plan.coords, want.coords) and np.array_equal(plan.thumbnail, want.thumbnail)
    assert len(gets) <= 1 and all(g.range and g.sent <= 1.2 * strips for g in gets), (gets, strips)


def _local_reader(name: str, local):
    """The same file on local disk, read as ``tile`` reads it (OpenSlide opens this OME-TIFF as a generic
    TIFF without its sub-IFD levels and resolution: tifffile, as for the object)."""
    from cancernet_batch.slides import open_slide
    from cancernet_batch.slides.tifffile_backend import TiffFileReader

    return TiffFileReader(local) if name == "more/pyramid.ome.tif" else open_slide(local)


@pytest.mark.parametrize("name,mpp", [("svs", 2.0), ("tiff", 2.0), ("more/pyramid.ome.tif", 4.0),
                                      ("more/cmu-1-small-region.svs", 4.0), ("more/cmu-1-small-region.svs", 8.0)])
def test_direct_decoding_over_s3_gives_the_local_tiles_from_one_batch_of_range_requests(s3, s3_inputs, name, mpp):
    from cancernet_batch.config import TileConfig
    from cancernet_batch.slides import open_slide
    from cancernet_batch.tiling import plan_slide, read_tiles

    url, local = s3_inputs[name]
    key = url.split("://", 1)[1]
    seen = set()
    for decode in ("exact", "fast"):
        cfg = TileConfig(target_mpp=mpp, decode=decode)
        with _local_reader(name, local) as ref:
            want = plan_slide(local, cfg, reader=ref)
            expected = read_tiles(ref, want.level, want.tile_px_level, want.coords, decode=decode)
        with open_slide(url, storage_options=s3.options()) as reader:
            plan = plan_slide(url, cfg, reader=reader)
        assert plan.decode_path == want.decode_path and plan.decode_path.startswith("direct jpeg")
        assert np.array_equal(plan.coords, want.coords) and plan.level == want.level
        assert plan.n_tiles >= (3 if mpp == 8.0 else 20)  # CMU-1 at 8 µm/px: 3 tiles
        seen.add(plan.decode_path)
        with open_slide(url, storage_options=s3.options()) as reader:  # a fresh reader: nothing held yet
            level = reader.direct_level(plan.level)
            s3.server.reset()
            tiles = read_tiles(reader, plan.level, plan.tile_px_level, plan.coords, decode=decode)
            gets = s3.server.gets(key)
            ranges = [(int(level.offsets[i]), int(level.counts[i]))
                      for i in level.needed(plan.coords, plan.tile_px_level)]
            needed = sum(n for _, n in ranges)
            # those in the blocks fetched with the header (the object's tail) are not fetched again
            outside = sum(n for o, n in ranges if reader._file._in_blocks(o, o + n) is None)
        assert np.array_equal(tiles, expected), decode  # exact: bit-identical; fast: the local fast tiles
        # every compressed tile the call needs, in one batch of coalesced ranged GETs (no GET per tile; none when
        # the header's blocks hold them all, as the small pyramid's last level)
        # (CMU-1 at 8 µm/px: 3 tiles far apart, each 16-20 compressed tiles in 4-5 rows, in 5 coalesced GETs)
        most = len(ranges) // 8 if mpp == 8.0 else 4
        assert all(g.range for g in gets) and len(gets) <= most and bool(gets) == (outside > 0), (len(gets), outside, most)
        assert outside <= sum(g.sent for g in gets) <= 1.2 * needed, (sum(g.sent for g in gets), outside, needed)
    if mpp == 8.0:  # a model grid 16x coarser than its level: fast scales in the DCT
        assert seen == {"direct jpeg", "direct jpeg, 1/2 in the DCT"}
    elif name != "more/pyramid.ome.tif":  # 2x or 8x coarser: fast decodes at full size too (an eighth of the factor)
        assert seen == {"direct jpeg"}


def test_an_object_cut_inside_a_tile_is_one_slide_read_error_naming_the_url(s3, s3_inputs):
    from cancernet_batch.config import TileConfig
    from cancernet_batch.errors import SlideReadError
    from cancernet_batch.slides import open_slide
    from cancernet_batch.tiling import plan_slide, read_tiles

    url, local = s3_inputs["more/cut.svs"]
    cfg = TileConfig(target_mpp=4.0, tissue_filter=False)  # the last level, whose last tile is cut
    with open_slide(url, storage_options=s3.options()) as reader:
        with pytest.raises(SlideReadError) as err:
            plan = plan_slide(url, cfg, reader=reader)
            read_tiles(reader, plan.level, plan.tile_px_level, plan.coords, decode="fast")
    msg = str(err.value)
    assert msg.startswith(url + ": ") and "cut short" in msg and "\n" not in msg, msg


def test_inspect_shows_the_same_decode_line_for_an_object_as_for_the_local_file(s3, s3_inputs, capsys, monkeypatch):
    url, local = s3_inputs["svs"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    lines = {}
    for source in (url, str(local)):
        rc, out, err = _main(capsys, "inspect", source, "--mpp", "2.0", "--decode", "fast")
        assert rc == 0, err
        lines[source] = [ln for ln in out.splitlines() if ln.lstrip().startswith("decode")]
    assert lines[url] == lines[str(local)] == ["  decode      direct jpeg (--decode fast)"]


def test_formats_only_openslide_reads_are_staged_once_shared_and_removed(s3, s3_inputs, tmp_path, monkeypatch):
    import concurrent.futures as cf
    import multiprocessing

    from cancernet_batch import remote
    from cancernet_batch.slides import open_slide

    monkeypatch.setenv("CANCERNET_STAGE_DIR", str(tmp_path / "stage"))
    url, _ = s3_inputs["dicom/boxes_0.dcm"]
    key = url.split("://", 1)[1]
    s3.server.reset()

    def opened(_):
        r = open_slide(url, storage_options=s3.options())
        return r, r.read_region(0, 0, 0, 8, 8)

    with cf.ThreadPoolExecutor(4) as pool:  # four tasks of one worker at once
        readers = [r for r, px in pool.map(opened, range(4))]
    with cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:  # two more workers
        names = list(pool.map(_open_name, [(url, s3.options(), str(tmp_path / "stage"))] * 2))
    assert names == ["openslide"] * 2 and {r.name for r in readers} == {"openslide"}
    assert {str(r.path) for r in readers} == {url} and readers[0].source_identity == remote.stat(url, s3.options())
    whole = [g for g in s3.server.gets(key) if not g.range]
    assert len(whole) == 1  # one download, shared by every thread and process
    staged = [p for p in (tmp_path / "stage").iterdir() if p.is_dir()]
    assert len(staged) == 1 and not any(p.name.startswith(".tmp-") for p in (tmp_path / "stage").iterdir())
    assert remote.clear_stage_cache() == 0  # held by the open readers: never removed under them
    for r in readers:
        r.close()
    assert remote.clear_stage_cache() == 1 and not any(p.is_dir() for p in (tmp_path / "stage").iterdir())
    # a size limit below the slide: its copy goes as soon as its reader closes
    with open_slide(url, storage_options=s3.options(), stage_limit_gb=1e-9) as r:
        assert r.read_region(0, 0, 0, 4, 4).shape == (4, 4, 3)
    assert not any(p.is_dir() for p in (tmp_path / "stage").iterdir())


def test_two_tasks_staging_one_object_at_once_both_get_it_while_the_first_holds_it(s3, s3_inputs, tmp_path,
                                                                                   monkeypatch):
    """Both tasks find no copy, one downloads it and keeps it open (a shared hold, as a reader does): the other
    must not wait for an exclusive lock it can never get, but find the copy and share it."""
    import concurrent.futures as cf
    import threading

    from cancernet_batch import remote

    monkeypatch.setenv("CANCERNET_STAGE_DIR", str(tmp_path / "stage"))
    url, _ = s3_inputs["dicom/boxes_0.dcm"]
    both_looked = threading.Barrier(2)
    real_lock, downloads = remote._lock, []

    def lock(path, mode, block=True):
        import fcntl

        if mode == fcntl.LOCK_EX:  # each task has seen no copy before either takes the exclusive lock
            with contextlib.suppress(threading.BrokenBarrierError):
                both_looked.wait(timeout=5)
        return real_lock(path, mode, block)

    def download(fs, u, dest, *together):
        downloads.append(u)
        return real_download(fs, u, dest, *together)

    real_download = remote._download
    monkeypatch.setattr(remote, "_lock", lock)
    monkeypatch.setattr(remote, "_download", download)
    pool = cf.ThreadPoolExecutor(2)
    futs = [pool.submit(remote.stage, url, s3.options()) for _ in range(2)]
    done, _ = cf.wait(futs, timeout=30)
    held = [f.result() for f in done]
    paths = {h.path for h in held}
    for h in held:
        h.release()  # (before the fix, this is what let the second task go on)
    pool.shutdown(wait=True)
    assert len(held) == 2, "the second task waited for a lock the first one holds"
    assert len(downloads) == 1 and len(paths) == 1


@pytest.fixture(scope="module")
def dicom_folder(s3, dicom_series_dir):
    """``dicom_series_dir`` (conftest) under ``s3://BUCKET/dicomwsi/`` too."""
    fs = s3.fs()
    for p in sorted(dicom_series_dir.iterdir()):
        fs.put_file(str(p), f"{BUCKET}/dicomwsi/{p.name}")
    return dicom_series_dir


def tile_dicom_series_as_local(prefix: str, options: dict, local_dir, client, tmp_path, capsys) -> list[str]:
    """``cancernet tile`` over ``local_dir`` (``dicom_series_dir``) and over the same objects under the URL
    ``prefix``: each run tiles the series once (the other instances listed as its members) with the same tiles,
    and fails ``boxes_0.dcm`` (too small); the same command again finds the series complete and unchanged.
    Returns the series' URLs; the runs are ``tmp_path/local`` and ``tmp_path/remote``."""
    import zarr

    common = ["--chunk-size", "16", "--scheduler", client.scheduler.address]
    rc, out_l, err_l = _main(capsys, "tile", str(local_dir), "--out", str(tmp_path / "local"), *common)
    remote_args = ["tile", f"{prefix}/", "--out", str(tmp_path / "remote"), *common, "--storage-options", json.dumps(options)]
    rc_r, out_r, err_r = _main(capsys, *remote_args)
    assert rc == rc_r == 3, (out_l, err_l, out_r, err_r)  # boxes_0.dcm: smaller than one tile, in both
    for out, base in ((out_l, str(local_dir)), (out_r, prefix)):
        assert f"tiled    {base}/cmu1_0.dcm: 21 tiles, grid 7 x 5, level 1" in out, out
        for member in ("cmu1_1.dcm", "cmu1_thumb.dcm"):
            assert f"series   {base}/{member}: same DICOM series as {base}/cmu1_0.dcm" in out, out
    for m in ("local", "remote"):
        fails = _csv((tmp_path / m / "failures.csv").read_bytes())
        assert [(f["input"].rsplit("/", 1)[1], f["stage"]) for f in fails] == [("boxes_0.dcm", "plan")], fails
    groups = {m: zarr.open_group(str(tmp_path / m / "tiles.zarr"), mode="r")["inputs"] for m in ("local", "remote")}
    (gl,), (gr,) = (list(groups[m].group_keys()) for m in ("local", "remote"))
    for name in ("tiles", "coords", "tissue", "thumbnail"):
        assert np.array_equal(groups["local"][gl][name][:], groups["remote"][gr][name][:]), name
    series = [f"{prefix}/cmu1_0.dcm", f"{prefix}/cmu1_1.dcm", f"{prefix}/cmu1_thumb.dcm"]
    attrs = dict(groups["remote"][gr].attrs)
    assert attrs["extra"]["series_files"] == series
    assert attrs["source_size"] == sum((local_dir / u.rsplit("/", 1)[1]).stat().st_size for u in series)
    # the same command again: the series is complete and unchanged (its files' sizes and ETags, one listing)
    rc, out2, err2 = _main(capsys, *remote_args)
    assert rc == 3 and "tile: 0 inputs tiled" in out2 and "3 skipped (complete, unchanged)" in out2, out2
    return series


def test_a_dicom_series_on_s3_is_staged_with_its_folder_and_tiled_once_as_the_local_folder(
        s3, dicom_folder, client, tmp_path, capsys, monkeypatch):
    """OpenSlide finds a DICOM slide's other instances beside the file it opens: staged alone, each instance of a
    series on S3 was a slide of its own (level 0 without its pyramid, the level 1 instance a second slide of the same
    tissue, the thumbnail a failure). Staged with its folder's DICOM objects, the series is one input with the local
    folder's tiles bit for bit, resumed by its files' sizes and ETags, and each object is downloaded once."""
    import zarr

    from cancernet_batch import remote

    monkeypatch.setenv("CANCERNET_STAGE_DIR", str(tmp_path / "stage"))
    prefix = f"s3://{BUCKET}/dicomwsi"
    common = ["--chunk-size", "16", "--scheduler", client.scheduler.address]
    s3_args = ["tile", f"{prefix}/", "--out", str(tmp_path / "remote"), *common, "--storage-options", json.dumps(s3.options())]
    s3.server.reset()
    series = tile_dicom_series_as_local(prefix, s3.options(), dicom_folder, client, tmp_path, capsys)
    # every DICOM object downloaded whole once (the series' folder staged once for all its instances), the
    # file that is not DICOM never
    whole = sorted(g.path.rsplit("/", 1)[1] for g in s3.server.gets("/dicomwsi/") if not g.range)
    assert whole == sorted(p.name for p in dicom_folder.glob("*.dcm")), whole
    inputs = zarr.open_group(str(tmp_path / "remote" / "tiles.zarr"), mode="r")["inputs"]
    (gid,) = inputs.group_keys()
    attrs = dict(inputs[gid].attrs)
    assert (attrs["source_size"], attrs["extra"]["source_etag"]) == remote.series_stat(series, s3.options())

    # one instance replaced: the series is tiled again
    s3.fs().put_file(str(dicom_folder / "cmu1_1.dcm"), f"{BUCKET}/dicomwsi/cmu1_thumb.dcm")
    try:
        rc, out3, err3 = _main(capsys, *s3_args)
        assert "tile: 1 inputs tiled" in out3, out3
    finally:
        s3.fs().put_file(str(dicom_folder / "cmu1_thumb.dcm"), f"{BUCKET}/dicomwsi/cmu1_thumb.dcm")

    # staged directly: every instance of the folder in one entry, shared; the file that is not DICOM left out
    held = [remote.stage(u, s3.options()) for u in series]
    try:
        assert len({h.path.parent for h in held}) == 1
        assert sorted(p.name for p in held[0].path.parent.iterdir()) == sorted(p.name for p in dicom_folder.glob("*.dcm"))
        assert sorted(held[0].together) == sorted(f"{prefix}/{p.name}" for p in dicom_folder.glob("*.dcm"))
    finally:
        for h in held:
            h.release()
    # a folder of DICOM objects larger than the staging cache: one line that names the object and the way out
    rc, out4, err4 = _main(capsys, "tile", f"{prefix}/cmu1_0.dcm", "--out", str(tmp_path / "small-cache"), *common,
                           "--stage-cache-gb", "0.001", "--storage-options", json.dumps(s3.options()))
    (f,) = _csv((tmp_path / "small-cache" / "failures.csv").read_bytes())
    assert rc == 3 and f["input"] == f"{prefix}/cmu1_0.dcm" and "\n" not in f["message"], f
    assert "is a DICOM object among 4 in its folder" in f["message"] and "--stage-cache-gb" in f["message"], f


def _open_name(args) -> str:
    url, options, stage = args
    os.environ["CANCERNET_STAGE_DIR"] = stage
    from cancernet_batch.slides import open_slide

    with open_slide(url, storage_options=options) as r:
        return r.name


def test_run_with_inputs_and_outputs_on_s3_resumes_by_etag_and_keeps_secrets(s3, s3_inputs, client, tiny_model_dir,
                                                                              synth_slide_dir, capsys, caplog):
    url = f"s3://{BUCKET}/nights/inputs"
    mixed = f"s3://{BUCKET}/mixed/"
    absent = f"s3://{BUCKET}/mixed/absent.svs"
    args = ["run", mixed, absent, "--out", url, "--model", str(tiny_model_dir), "--chunk-size", "16",
            "--scheduler", client.scheduler.address, "--storage-options", json.dumps(s3.options())]
    caplog.set_level(logging.DEBUG)
    rc, out1, err1 = _main(capsys, *args)
    assert rc == 3, err1  # two inputs failed, the rest went on
    objs = s3.objects("nights/inputs")
    rows = _csv(objs[f"{BUCKET}/nights/inputs/report/inputs.csv"])
    good = sorted(u for u, _ in (s3_inputs[f"mixed/{n}"] for n in ("generic.tiff", sorted(
        p.name for p in synth_slide_dir.glob("*.svs"))[0])))
    assert sorted(r["source"] for r in rows if r["status"] == "reported") == good
    assert all(int(r["tissue_tiles"]) > 0 for r in rows if r["status"] == "reported")
    fails = {r["input"]: r for r in _csv(objs[f"{BUCKET}/nights/inputs/failures.csv"])}
    broken = f"s3://{BUCKET}/mixed/broken.svs"
    assert sorted(fails) == sorted([broken, absent])
    assert fails[broken]["stage"] == "preflight" and fails[absent]["stage"] == "discover"
    assert "no such object" in fails[absent]["message"]
    assert "staging" not in fails[broken]["message"] and "\n" not in fails[broken]["message"]

    # the same command again: nothing tiled or scored (size and ETag unchanged)
    s3.server.reset()
    rc, out2, err2 = _main(capsys, *args)
    assert rc == 3 and "tile:    0 tiled (0 tiles), 2 already complete" in out2, out2
    assert "predict: 0 patches scored" in out2
    again = [g for g in s3.server.gets("/mixed/") if "broken" not in g.path and (g.range or g.sent > 1000)]
    assert not again  # no good slide read again (the broken one is tried again, as failed inputs are)

    # an object replaced under the same name (another ETag): that input alone is tiled again
    other = sorted(synth_slide_dir.glob("*.svs"))[1]
    s3.fs().put_file(str(other), f"{BUCKET}/mixed/generic.tiff")
    rc, out3, err3 = _main(capsys, *args)
    assert rc == 3 and "tile:    1 tiled" in out3 and "1 already complete" in out3, out3
    s3.fs().put_file(str(s3_inputs["tiff"][1]), f"{BUCKET}/mixed/generic.tiff")  # as it was, for the others

    # a missing bucket: one line
    rc, out4, err4 = _main(capsys, "run", "s3://no-such-input-bucket/a.svs", "--out", f"{url}-x", "--model",
                           str(tiny_model_dir), "--storage-options", json.dumps(s3.options()))
    assert rc == 1 and err4.count("\n") == 1 and "the bucket 'no-such-input-bucket' does not exist" in err4, err4

    # the secret is nowhere: not in an object of the run, the CLI's output or a log record
    for name, data in s3.objects("nights").items():
        assert SECRET.encode() not in data, name
    for text in (out1, err1, out2, err2, out3, err3, out4, err4, caplog.text):
        assert SECRET not in text


def kill_at_the_first_tiled_chunk(args: list[str], store_objects) -> None:
    """Run ``cancernet ARGS`` (one input in flight, batches of one) in its own process group and kill it (SIGKILL)
    once ``store_objects()`` (the names under its tile store) shows a chunk's ``tiled`` flag written."""
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    p = subprocess.Popen([sys.executable, "-m", "cancernet_batch.cli", *args, "--batch-size", "1",
                          "--max-inputs-in-flight", "1"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while p.poll() is None and time.monotonic() < deadline:  # kill point: the first chunk of tiles written
        if [n for n in store_objects() if "/tiled/c." in n]:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before the kill point"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


@pytest.mark.slow
def test_kill_and_resume_with_inputs_and_outputs_on_s3(s3, s3_inputs, tiny_model_dir, tmp_path, capsys):
    from cancernet_batch import store

    url = f"s3://{BUCKET}/nights/killed"
    opts = tmp_path / "s3.json"
    opts.write_text(json.dumps(s3.options()))
    args = ["run", f"s3://{BUCKET}/good/", "--out", url, "--model", str(tiny_model_dir), "--workers", "1",
            "--chunk-size", "8", "--storage-options", f"@{opts}"]
    fs = s3.fs()
    kill_at_the_first_tiled_chunk(args, lambda: fs.find(f"{BUCKET}/nights/killed/tiles.zarr"))
    # the killed run's lock stays: the next run says so and how to clear it; then it finishes the rest
    rc, out, err = _main(capsys, *args)
    assert rc == 1 and f"delete {url}/.lock" in err
    fs.rm_file(f"{BUCKET}/nights/killed/.lock")
    rc, out, err = _main(capsys, *args)
    assert rc == 0, out + err + s3.fs().cat_file(f"{BUCKET}/nights/killed/failures.csv").decode()
    assert "(resumed)" in out or "already complete" in out or "resumed" in out, out
    run = Run.of(url, s3.options())
    root = run.open_store("r")
    groups = dict(store.iter_inputs(root))
    assert len(groups) == 2
    for gid, g in groups.items():
        assert store.tiled_mask(g).all() and store.done_mask(g).all()
    rows = _csv(s3.fs().cat_file(f"{BUCKET}/nights/killed/report/inputs.csv"))
    assert sorted(r["source"] for r in rows) == sorted(s3_inputs[k][0] for k in ("svs", "tiff"))
    assert {r["status"] for r in rows} == {"reported"}


# --------------------------------------------------------------------------------------------
# patient folders on object storage
# --------------------------------------------------------------------------------------------

PATIENTS = ("9175", "9259")  # the two smallest patients of ../shared/data/idc (34 and 4 patches)


@pytest.fixture(scope="module")
def s3_patients(s3):
    """``s3://BUCKET/idc/{9175,9259}/{0,1}/*.png``: real patients uploaded as they are on disk. Returns the
    local folder that holds them."""
    from conftest import IDC as local

    fs = s3.fs()
    for p in PATIENTS:
        for f in sorted((local / p).rglob("*.png")):
            fs.put_file(str(f), f"{BUCKET}/idc/{f.relative_to(local).as_posix()}")
    return local


def _by_source(groups: dict) -> dict:
    return {g.attrs["source"].rstrip("/").rsplit("/", 1)[-1]: g for g in groups.values()}


def test_patient_folders_under_a_prefix_are_found_and_read_like_the_local_folders(s3, s3_patients):
    from cancernet_batch import remote
    from cancernet_batch.config import TileConfig
    from cancernet_batch.patches import load
    from cancernet_batch.tiling import discover, plan_patches

    opts = s3.options()
    root = f"s3://{BUCKET}/idc"
    # a prefix of patient folders: one input each, like the local folder; a patient folder itself: one input
    specs, failures = discover([root + "/"], opts)
    assert not failures and [(str(s.path), s.kind) for s in specs] == [(f"{root}/{p}", "patches") for p in PATIENTS]
    specs, _ = discover([f"{root}/9175/"], opts)
    assert [(str(s.path), s.kind) for s in specs] == [(f"{root}/9175", "patches")]
    for p in PATIENTS:
        url = f"{root}/{p}"
        s3.server.reset()
        got = load(url, storage_options=opts)
        reqs = [r for r in s3.server.requests if f"/idc/{p}/" in r.path and not r.path.endswith("/")]
        want = load(s3_patients / p)
        assert np.array_equal(got.tiles, want.tiles) and np.array_equal(got.coords, want.coords)
        assert np.array_equal(got.labels, want.labels) and list(got.patients) == list(want.patients)
        assert got.paths == [f"{root}/{x[len(str(s3_patients)) + 1:]}" for x in want.paths]
        assert len(reqs) == len(want) and {r.method for r in reqs} == {"GET"}  # one GET per patch, no HEADs
        plan = plan_patches(url, TileConfig(), opts)
        local_plan = plan_patches(s3_patients / p, TileConfig())
        assert np.array_equal(plan.coords, local_plan.coords) and plan.patient == local_plan.patient == p
        assert plan.source_size == local_plan.source_size and plan.source_etag == remote.folder_stat(url, opts)[1]
    # identity: a patch replaced under its own name changes the folder's digest, not a listing of another
    before = remote.folder_stat(f"{root}/9259", opts)
    other = remote.folder_stat(f"{root}/9175", opts)
    name = f"{BUCKET}/idc/9259/0/" + sorted(os.listdir(s3_patients / "9259" / "0"))[0]
    data = s3.fs().cat_file(name)
    s3.fs().pipe_file(name, data + b"\0")
    try:
        assert remote.folder_stat(f"{root}/9259", opts)[1] != before[1]
        assert remote.folder_stat(f"{root}/9175", opts) == other
    finally:
        s3.fs().pipe_file(name, data)


def test_one_walker_places_each_object_for_discovery_and_for_patch_scanning(s3):
    from cancernet_batch import remote
    from cancernet_batch.patches import scan
    from cancernet_batch.remote import PatientPlace

    opts = s3.options()
    root = f"s3://{BUCKET}/walk"
    a0, a1, b0 = "A/0/A_idx5_x1_y1_class0.png", "A/1/A_idx5_x51_y1_class1.png", "B/0/B_idx5_x1_y1_class0.png"
    deeper, nested = "A/1/deeper/A_idx5_x101_y1_class1.png", "site/C/1/C_idx5_x1_y1_class1.png"
    names = [a0, a1, b0, deeper, nested, "A/notes.txt", "slide.svs", "site/other.tif"]
    fs = s3.fs()
    for i, n in enumerate(names):
        fs.pipe_file(f"{BUCKET}/walk/{n}", b"x" * (i + 1))
    try:
        walked = list(remote.patient_places(root, remote.listing(root, opts)))
        places = {u[len(root) + 1:]: p for u, _, p in walked}
        assert sorted(places) == sorted(names)
        assert places["A/notes.txt"] is places["slide.svs"] is places["site/other.tif"] is None
        assert places[a1] == PatientPlace(f"{root}/A", 1, "1", ("A_idx5_x51_y1_class1.png",)) and places[a1].is_patch
        assert places[deeper] == PatientPlace(f"{root}/A", 1, "1", ("deeper", "A_idx5_x101_y1_class1.png"))
        assert not places[deeper].is_patch
        assert places[nested] == PatientPlace(f"{root}/site/C", 2, "1", (nested.rsplit("/", 1)[-1],))
        # each place comes with the listing's size and ETag: a patient folder's identity is folder_stat's
        b = {u: i for u, i, p in walked if p is not None and p.patient == f"{root}/B"}
        assert [i["size"] for i in b.values()] == [3] and remote.identity(b) == remote.folder_stat(f"{root}/B", opts)
        # discovery: patient folders at any depth (one input each), slides outside them
        assert remote.find_inputs(root, (".svs", ".tif"), opts) == (
            [f"{root}/site/other.tif", f"{root}/slide.svs"], [f"{root}/A", f"{root}/B", f"{root}/site/C"])
        assert remote.find_inputs(f"{root}/A", (".svs",), opts) == ([], [f"{root}/A"])
        # patch scanning: the files directly in the label folders of the patients directly below the prefix,
        # or of the prefix itself when it is a patient folder
        records, failures = scan(root, opts)
        assert not failures and sorted(str(r.path) for r in records) == [f"{root}/{n}" for n in (a0, a1, b0)]
        assert sorted((r.patient, r.label) for r in records) == [("A", 0), ("A", 1), ("B", 0)]
        records, _ = scan(f"{root}/A", opts)
        assert sorted(str(r.path) for r in records) == [f"{root}/{n}" for n in (a0, a1)]
    finally:
        fs.rm(f"{BUCKET}/walk", recursive=True)


def test_a_folder_url_is_found_by_one_listing_and_a_slide_url_by_one_look_up(s3):
    """Discovery of a prefix sends one LIST (fsspec's look-up sent a HEAD and a LIST of one key before it, one
    after another: two round trips more for every folder named at a run's start); a slide's URL is one HEAD;
    an object without a slide's extension is itself, and a URL with nothing at or under it is one clear error."""
    from cancernet_batch import remote
    from cancernet_batch.errors import InputError

    opts = s3.options()
    root = f"s3://{BUCKET}/found"
    fs = s3.fs()
    for n in ("a.svs", "sub/b.svs", "notes"):
        fs.pipe_file(f"{BUCKET}/found/{n}", b"x")
    try:
        def sent(fn, *args):
            s3.server.reset()
            out = fn(*args)
            with s3.server._lock:
                return out, [(r.method, r.path) for r in s3.server.requests]

        out, reqs = sent(remote.find_inputs, root + "/", (".svs",), opts)
        assert out == ([f"{root}/a.svs", f"{root}/sub/b.svs"], []) and reqs == [("GET", f"/{BUCKET}")], reqs
        out, reqs = sent(remote.find_inputs, f"{root}/sub", (".svs",), opts)
        assert out == ([f"{root}/sub/b.svs"], []) and reqs == [("GET", f"/{BUCKET}")], reqs
        out, reqs = sent(remote.find_inputs, f"{root}/a.svs", (".svs",), opts)
        assert out is None and reqs == [("HEAD", f"/{BUCKET}/found/a.svs")], reqs
        assert remote.find_inputs(f"{root}/notes", (".svs",), opts) is None  # one object, not a prefix
        with pytest.raises(InputError, match="no such object"):
            remote.find_inputs(f"{root}/nothing", (".svs",), opts)
    finally:
        fs.rm(f"{BUCKET}/found", recursive=True)


def test_run_scores_patient_folders_on_s3_like_local_ones_and_resumes(s3, s3_patients, client, tiny_model_dir,
                                                                     tmp_path, capsys):
    from cancernet_batch import store

    url = f"s3://{BUCKET}/nights/patients"
    common = ["--model", str(tiny_model_dir), "--scheduler", client.scheduler.address, "--chunk-size", "16"]
    s3_args = ["run", f"s3://{BUCKET}/idc/", "--out", url, *common, "--storage-options", json.dumps(s3.options())]
    rc, out, err = _main(capsys, *s3_args)
    assert rc == 0, out + err
    rc, out_l, err_l = _main(capsys, "run", *(str(s3_patients / p) for p in PATIENTS), "--out",
                             str(tmp_path / "local"), *common)
    assert rc == 0, out_l + err_l
    remote_groups = _by_source(dict(store.iter_inputs(Run.of(url, s3.options()).open_store("r"))))
    local_groups = _by_source(dict(store.iter_inputs(Run.of(str(tmp_path / "local")).open_store("r"))))
    assert sorted(remote_groups) == sorted(local_groups) == list(PATIENTS)
    for p in PATIENTS:
        a, b = remote_groups[p], local_groups[p]
        assert a.attrs["source"] == f"s3://{BUCKET}/idc/{p}" and a.attrs["kind"] == "patches"
        for name in ("tiles", "coords", "labels", "probs"):
            np.testing.assert_array_equal(np.asarray(a[name][:]), np.asarray(b[name][:]), err_msg=f"{p} {name}")
        assert store.done_mask(a).all()
    rows = _csv(s3.fs().cat_file(f"{BUCKET}/nights/patients/report/inputs.csv"))
    assert sorted(r["source"] for r in rows) == [f"s3://{BUCKET}/idc/{p}" for p in PATIENTS]
    # the same command again: size and digest unchanged, nothing fetched or scored
    s3.server.reset()
    rc, out2, err2 = _main(capsys, *s3_args)
    assert rc == 0 and "tile:    0 tiled (0 tiles), 2 already complete" in out2, out2
    assert "predict: 0 patches scored" in out2 and not s3.server.gets("/idc/")
    # a patch added to one patient: that patient alone is tiled again
    src = sorted((s3_patients / "9175" / "0").iterdir())[0]
    extra = f"{BUCKET}/idc/9175/0/9175_idx5_x1_y1_class0.png"
    s3.fs().put_file(str(src), extra)
    try:
        rc, out3, err3 = _main(capsys, *s3_args)
        assert rc == 0 and "tile:    1 tiled" in out3 and "1 already complete" in out3, out3
    finally:
        s3.fs().rm_file(extra)


def _metadata_gets(s3, prefix: str) -> dict[str, int]:
    """GETs of zarr metadata documents under the run's tile store, per input group (root/inputs: '')."""
    out: dict[str, int] = {}
    for r in s3.server.gets(f"/{prefix}/tiles.zarr/"):
        if r.path.endswith("/zarr.json"):
            parts = r.path.split("/tiles.zarr/", 1)[1].split("/")
            gid = parts[1] if len(parts) > 2 and parts[0] == "inputs" else ""
            out[gid] = out.get(gid, 0) + 1
    return out


def test_worker_tasks_read_each_inputs_metadata_a_bounded_number_of_times(s3, s3_inputs, client, tiny_model_dir,
                                                                         capsys):
    """Tile, score and report tasks on a worker read their input group's ``zarr.json`` once each and reuse
    the array handles: the metadata GETs per input grow by at most 3 per chunk, not 8 (here 3 tiles a
    chunk: each slide has many chunk tasks)."""
    from cancernet_batch import store

    prefix = "nights/metadata"
    args = ["run", f"s3://{BUCKET}/good/", "--out", f"s3://{BUCKET}/{prefix}", "--model", str(tiny_model_dir),
            "--chunk-size", "3", "--scheduler", client.scheduler.address,
            "--storage-options", json.dumps(s3.options())]
    s3.server.reset()
    rc, out, err = _main(capsys, *args)
    assert rc == 0, out + err
    groups = dict(store.iter_inputs(Run.of(f"s3://{BUCKET}/{prefix}", s3.options()).open_store("r")))
    assert len(groups) == 2
    chunks = {gid: len(store.chunk_bounds(int(g["tiles"].shape[0]), int(g.attrs["chunk"]))) for gid, g in groups.items()}
    assert min(chunks.values()) >= 5, chunks  # enough chunk tasks that per-task re-reads would show
    gets = _metadata_gets(s3, prefix)
    for gid, n in chunks.items():
        # one group document per chunk task (tile, score) and the arrays once per worker; before the
        # per-worker cache every chunk task read its arrays' documents again: 117 for 8 chunks, 93 for 5
        assert gets[gid] <= 55 + 3 * n, (gid, n, gets)
    assert gets.get("", 0) <= 70, gets  # the root and `inputs` (89 before): no longer read by every task
    # arrays are made without zarr's HEAD of each parent group (3 per array before); what is left: the store's
    # existence checks and the root's document when `inputs` is made
    heads = [r.path for r in s3.server.requests if r.method == "HEAD" and f"/{prefix}/tiles.zarr" in r.path]
    assert len(heads) <= 3, heads


def test_a_tasks_first_open_of_an_input_takes_its_arrays_from_the_groups_document(s3):
    """A worker's first task on an input reads the input group's document and nothing else to use its stable arrays:
    their documents are in it (``store.ARRAY_DOCS``), where each was one more GET, one after another, in every worker
    process; ``probs``' too, for its chunk data. Its attributes (they name the model) are still read from the store,
    and an entry zarr does not accept is read from the store instead."""
    from cancernet_batch import store

    prefix = "nights/arraydocs"
    run, root = _new_run(s3, prefix)
    attrs = _object_attrs("D1", 10, grid=(3, 4), kind="patches")
    gid = store.input_id(attrs.source)
    store.create_input(root, attrs, 10, chunk=4, labels=True, arrays=store.prediction_specs(10, 4, "model-a"))
    store._OPEN_INPUTS.clear()
    _store_requests(s3, prefix)

    def docs_read() -> list[str]:
        return sorted(r.path.split(f"/inputs/{gid}/", 1)[1] for r in _store_requests(s3, prefix)
                      if r.method == "GET" and r.path.endswith("/zarr.json") and f"/inputs/{gid}/" in r.path)

    g = run.open_input(gid)
    shapes = {name: g[name].shape for name in ("tiles", "coords", "labels", "tiled", "done")}
    g["tiles"][4:8] = 9
    store.set_flag(g, "tiled", 1)
    store.write_rows(store.data_array(g, "probs"), 0, 4, np.full(4, 0.5, np.float32))  # a score task's chunk
    assert docs_read() == ["zarr.json"]
    assert shapes == {"tiles": (10, 50, 50, 3), "coords": (10, 2), "labels": (10,), "tiled": (3,), "done": (3,)}
    plain = run.open_store("r")["inputs"][gid]  # written through those handles: as zarr reads the store
    assert int(plain["tiles"][4:8].min()) == 9 and int(plain["tiles"][0].max()) == 0
    assert store.tiled_mask(plain).tolist() == [False, True, False]
    np.testing.assert_allclose(plain["probs"][:5], [0.5, 0.5, 0.5, 0.5, np.nan])
    _store_requests(s3, prefix)
    assert run.open_input(gid)["probs"].attrs["model_id"] == "model-a"
    assert docs_read() == ["probs/zarr.json", "zarr.json"]

    docs = json.loads(plain.attrs[store.ARRAY_DOCS])
    docs["tiles"] = {"zarr_format": 3, "node_type": "array", "shape": "not a shape"}
    run.open_store("r+")["inputs"][gid].update_attributes({store.ARRAY_DOCS: json.dumps(docs)})
    _store_requests(s3, prefix)
    g = run.open_input(gid)
    assert g["tiles"].shape == (10, 50, 50, 3) and g["coords"].shape == (10, 2)
    assert docs_read() == ["tiles/zarr.json", "zarr.json"]


def _store_requests(s3, prefix: str) -> list:
    """The requests sent to the tile store under ``prefix`` (and the bucket's listings) since the last call (the
    log is cleared)."""
    with s3.server._lock:
        out = [r for r in s3.server.requests if f"/{prefix}/tiles.zarr" in r.path or r.path == f"/{BUCKET}"]
        s3.server.requests.clear()
    return out


def _puts(requests) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(r.path.split("/tiles.zarr/", 1)[1] for r in requests if r.method == "PUT"))


def _new_run(s3, prefix: str):
    """A run folder on S3 with its tile store and ``inputs`` group made (as a run does first): ``(run, root)``."""
    run = Run.of(f"s3://{BUCKET}/{prefix}", s3.options())
    root = run.create().open_store("a")
    root.require_group("inputs")
    return run, root


def test_a_new_tile_store_on_s3_is_made_in_one_round_after_one_look_up(s3):
    """A run's first step on S3: its tile store's root, stamped with the schema, and its ``inputs`` group. zarr's
    ``open_group`` and ``require_group`` sent 8 requests one after another (the absent root's document read twice,
    written twice: empty, then stamped; ``inputs`` looked up three times); now one GET finds no root, then both
    documents go out together. An existing store is one GET, nothing written."""
    from cancernet_batch import store

    prefix = "nights/new-store"
    _store_requests(s3, prefix)
    run = Run.of(f"s3://{BUCKET}/{prefix}", s3.options())
    root = run.create().open_store("a")
    made = _store_requests(s3, prefix)
    docs = [(r.method, r.path.split("/tiles.zarr/", 1)[1]) for r in made if "/tiles.zarr/" in r.path]
    assert sorted(docs) == [("GET", "zarr.json"), ("PUT", "inputs/zarr.json"), ("PUT", "zarr.json")], docs
    assert dict(root.attrs) == {"schema_version": store.SCHEMA_VERSION, "tile_size": 50}
    assert "inputs" in root and list(root["inputs"].group_keys()) == []
    _store_requests(s3, prefix)
    again = run.open_store("a")  # the store is there: read, not written
    docs = [(r.method, r.path.split("/tiles.zarr/", 1)[1]) for r in _store_requests(s3, prefix) if "/tiles.zarr/" in r.path]
    assert docs == [("GET", "zarr.json")], docs
    assert dict(again.attrs)["schema_version"] == store.SCHEMA_VERSION
    # the same store as zarr itself reads it
    import zarr

    assert dict(zarr.open_group(run.fs.store_location(run.store_path), mode="r").attrs) == dict(root.attrs)


def _object_attrs(name: str, n: int, grid=(4, 5), kind: str = "slide"):
    """The attrs of an input ``s3://BUCKET/x/NAME`` of ``n`` tiles (an InputAttrs; nothing is read)."""
    from cancernet_batch.store import InputAttrs

    return InputAttrs(source=f"s3://{BUCKET}/x/{name}", kind=kind, reader="test", patient="p", source_size=1,
                      source_mtime=0.0, target_mpp=4.0, grid_shape=grid, n_tiles=n)


def test_an_inputs_arrays_are_made_without_heads_and_with_one_put_per_document(s3):
    """create_input, ensure_predictions and the report's map make their arrays through zarr's create_hierarchy:
    no HEAD (zarr's create_array sends one per parent group of every array: 3 per array here), one PUT per
    metadata document (the group's, with its attrs, last), and documents exactly as create_array
    writes them."""
    import zarr
    from zarr.storage import MemoryStore

    from cancernet_batch import aggregate, store

    prefix = "nights/created"
    run, root = _new_run(s3, prefix)
    attrs = _object_attrs("a.svs", 10)
    gid = store.input_id(attrs.source)
    tissue = dict(shape=(4, 5), chunks=(4, 5), dtype="float32")
    _store_requests(s3, prefix)
    g = store.create_input(root, attrs, 10, chunk=4, labels=True, arrays={"tissue": tissue})
    made = _store_requests(s3, prefix)
    assert not [r for r in made if r.method == "HEAD"], made
    assert _puts(made) == {f"inputs/{gid}/zarr.json": 1,  # the group's document, with its attrs: one PUT, the last
                           **{f"inputs/{gid}/{a}/zarr.json": 1 for a in ("tiles", "coords", "labels", "tiled", "tissue")}}
    puts = [r.path.split("/tiles.zarr/", 1)[1] for r in made if r.method == "PUT"]
    assert puts[-1] == f"inputs/{gid}/zarr.json", puts
    # no document read but `inputs`' (require_group) and the presence check of the input's: the new nodes'
    # documents are written without zarr's checks of each node and parent (16 GETs before); one listing
    # finds nothing left under the input's name by a killed run
    docs = sorted(r.path.split("/tiles.zarr/", 1)[1] for r in made if r.method == "GET" and r.path.endswith("zarr.json"))
    assert docs == sorted(["inputs/zarr.json", f"inputs/{gid}/zarr.json"]), docs
    assert len([r for r in made if r.method == "GET"]) == 3, [(r.method, r.path) for r in made]
    g["coords"][:] = np.arange(20).reshape(10, 2)  # the handles create_input returns: no lookup
    assert not [r for r in _store_requests(s3, prefix) if r.path.endswith("zarr.json")]

    probs, done = store.ensure_predictions(run.open_input(gid), "model-a")
    made = _store_requests(s3, prefix)
    assert not [r for r in made if r.method == "HEAD"], made
    assert not [r for r in made if r.method == "GET" and r.path.endswith(("/tiles.zarr/zarr.json", "/inputs/zarr.json"))]
    assert _puts(made) == {f"inputs/{gid}/probs/zarr.json": 1, f"inputs/{gid}/done/zarr.json": 1}
    assert probs.attrs["model_id"] == "model-a" and probs.shape == (10,) and done.shape == (3,)
    assert store.ensure_predictions(run.open_input(gid), "model-a")[0].attrs["model_id"] == "model-a"
    assert not _puts(_store_requests(s3, prefix))  # there already: nothing written

    for k, value in enumerate((0.25, 0.75)):  # the first map, then a report made again replaces it
        aggregate.write_idc_map(run.open_input(gid), np.full((4, 5), value, np.float32), "model-a")
        made = _store_requests(s3, prefix)
        assert _puts(made) == {f"inputs/{gid}/idc_map/zarr.json": 1, f"inputs/{gid}/idc_map/c.0.0": 1}
        if k == 0:  # the input's group (open_input) and the map's lookup: nothing else read
            assert not [r for r in made if r.method == "HEAD"], made
            assert sorted(r.path.split(f"/inputs/{gid}/", 1)[1] for r in made if r.method == "GET") == [
                "idc_map/zarr.json", "zarr.json"], [(r.method, r.path) for r in made]
        m = zarr.open_group(run.fs.store_location(run.store_path), mode="r")[f"inputs/{gid}/idc_map"]
        assert m.attrs["model_id"] == "model-a" and np.all(m[:] == value)

    # every document is the one group.create_array writes (with this tool's chunk keys, store.CHUNK_KEYS)
    fs = s3.fs()
    ref = zarr.group(MemoryStore())
    specs = {"tiles": dict(shape=(10, 50, 50, 3), chunks=(4, 50, 50, 3), dtype="uint8",
                           compressors=store.tiles_compressor()),  # zstd level 1 (benchmarks/tile_codecs.py)
             "coords": dict(shape=(10, 2), chunks=(4, 2), dtype="int32"),
             "labels": dict(shape=(10,), chunks=(4,), dtype="int8", fill_value=-1),
             "tiled": dict(shape=(3,), chunks=(1,), dtype="bool", fill_value=False), "tissue": tissue,
             "probs": dict(shape=(10,), chunks=(4,), dtype="float32", fill_value=np.nan,
                           attributes={"model_id": "model-a"}),
             "done": dict(shape=(3,), chunks=(1,), dtype="bool", fill_value=False)}
    for name, kw in specs.items():
        want = ref.create_array(name, **kw, chunk_key_encoding=store.CHUNK_KEYS).metadata.to_dict()
        got = json.loads(fs.cat_file(f"{BUCKET}/{prefix}/tiles.zarr/inputs/{gid}/{name}/zarr.json"))
        assert json.loads(json.dumps(want, default=str)) == got or zarr.core.metadata.ArrayV3Metadata.from_dict(
            got).to_dict() == want, name


def test_setting_up_an_inputs_scoring_on_the_client_costs_few_requests(s3):
    """input_chunks_to_score (on the client, one input after the other) looks the group's members up at once
    and reads no done flag of predictions it has just made: 18 requests (one listing, then concurrent reads)
    where it sent 34 (6 HEADs; the done flags read three times). Its checks still hold: the chunks of an
    input scored before are read back, and a done flag without probabilities is cleared."""
    from cancernet_batch import store
    from cancernet_batch.config import PredictConfig
    from cancernet_batch.stages.score import Scoring, input_chunks_to_score

    prefix = "nights/scoring"
    run, root = _new_run(s3, prefix)
    attrs = _object_attrs("b.svs", 10)
    gid = store.input_id(attrs.source)
    g = store.create_input(root, attrs, 10, chunk=4)
    g["coords"][:] = np.stack(np.divmod(np.arange(10), 5), axis=1)
    scoring = Scoring(PredictConfig(model_dir="unused"), "model-a", 0.5, 4.0)
    _store_requests(s3, prefix)
    chunks, n = input_chunks_to_score(run.open_input(gid), gid, scoring)
    made = _store_requests(s3, prefix)
    assert (chunks, n) == ([(gid, 0, 0, 4), (gid, 1, 4, 8), (gid, 2, 8, 10)], 3)
    assert not [r for r in made if "/done/c." in r.path], [r.path for r in made]  # just made: nothing to read
    assert len([r for r in made if r.path == f"/{BUCKET}"]) == 1  # the one listing of the group's members
    assert len(made) <= 18 and not [r for r in made if r.method == "HEAD"], [(r.method, r.path) for r in made]

    # scored before: chunk 1 done with its probabilities, chunk 2 flagged done without them
    g = run.open_store("r+")["inputs"][gid]
    g["probs"][4:8] = 0.5
    g["done"][1] = True
    g["done"][2] = True
    chunks, n = input_chunks_to_score(run.open_input(gid), gid, scoring)
    assert (chunks, n) == ([(gid, 0, 0, 4), (gid, 2, 8, 10)], 3)
    assert list(store.done_mask(run.open_store("r")["inputs"][gid])) == [False, True, False]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_files_of_inputs_no_longer_reported_go_in_one_listing_a_folder(s3, tmp_path, where):
    """``Run.remove_unreported`` removes every per-input report file (``InputFiles.CLEANED``: heatmap, thumbnail,
    view, GeoJSON and regions, OME-Zarr and OME-TIFF) of the inputs not kept, keeps the kept ones' and the other
    files, and on object storage lists each of the report's three folders once (it listed a folder per suffix:
    seven listings) and removes what it found there in one bulk delete."""
    from cancernet_batch.runfolder import InputFiles

    run = (Run.of(f"s3://{BUCKET}/unreported/run", s3.options()) if where == "s3" else Run.of(tmp_path / "run")).create()
    kept, gone = InputFiles.of("a-1"), InputFiles.of("b-2")
    for f in (kept, gone):
        for rel in (f.heatmap, f.thumb, f.view, f.geojson, f.regions, f.ome_tiff, f"{f.ome_zarr}/.zattrs",
                    f"{f.ome_zarr}/0/0/0"):
            run.fs.write_bytes(run.report_file(rel), b"x")
    run.fs.write_bytes(run.report_file("index.html"), b"x")
    run.fs.write_bytes(run.report_file("maps", "notes.txt"), b"x")
    s3.server.reset()
    run.remove_unreported([kept.heatmap, kept.thumb, kept.view, kept.geojson, kept.regions, kept.ome_zarr, kept.ome_tiff])
    sent = list(s3.server.requests)
    left = {rel: run.fs.exists(run.report_file(rel)) for f in (kept, gone)
            for rel in (f.heatmap, f.thumb, f.view, f.geojson, f.regions, f.ome_tiff, f"{f.ome_zarr}/.zattrs")}
    assert {rel for rel, there in left.items() if there} == {rel for rel in left if "a-1" in rel}
    assert run.fs.exists(run.report_file("index.html")) and run.fs.exists(run.report_file("maps", "notes.txt"))
    if where == "s3":  # a listing of each of the three folders, and of the removed OME-Zarr's objects; a bulk
        # delete after each (it was a listing, a HEAD and a delete for each file removed: 22 requests)
        assert [r.method for r in sent] == ["GET", "POST"] * 4, sent
        assert all(r.path == f"/{BUCKET}" for r in sent), sent


def test_a_flush_reads_the_failures_list_once_and_puts_the_report_tables_in_one_batch(s3):
    """Each flush of a run (every --report-every seconds, and at the end) merges the failures list and rewrites
    the report's tables: the list is read once (no HEAD to ask whether it is there), written only when it
    changed, and the report's failures.csv goes up with the other tables (one batch of concurrent PUTs, not a
    PUT of its own first)."""
    from cancernet_batch.aggregate import Threshold
    from cancernet_batch.failures import Failure
    from cancernet_batch.stages.report import write_tables

    prefix = "nights/flush"
    run = Run.of(f"s3://{BUCKET}/{prefix}", s3.options())
    row = Failure(f"s3://{BUCKET}/x/c.svs", "tile", "SlideReadError", "cannot read")

    def sent() -> list:
        with s3.server._lock:
            out = [(r.method, r.path.split(f"/{prefix}/", 1)[1]) for r in s3.server.requests if f"/{prefix}/" in r.path]
            s3.server.requests.clear()
        return out

    run.record_failures([row])  # the first row: the file is made
    assert ("PUT", "failures.csv") in sent()
    assert run.record_failures([row]) == [row]  # unchanged: one GET, nothing written, no HEAD
    assert sent() == [("GET", "failures.csv")]
    write_tables(run, [], Threshold(0.5, "--threshold"), [row])
    puts = [p for m, p in sent() if m == "PUT"]
    assert sorted(puts) == sorted(f"report/{n}" for n in ("inputs.csv", "patients.csv", "failures.csv",
                                                           "viewer.js", "index.html"))
    assert _csv(s3.fs().cat_file(f"{BUCKET}/{prefix}/report/failures.csv"))[0]["input"] == row.input


def test_inspect_takes_storage_options_like_the_other_commands(s3, s3_inputs, s3_patients, capsys, tmp_path):
    """``inspect --storage-options`` reaches objects with the given credentials (none in the environment):
    the same plan as the local file; an endpoint that does not answer is a clear error; local inputs refuse it."""
    url, local = s3_inputs["svs"]
    opts = json.dumps(s3.options())
    rc, out, err = _main(capsys, "inspect", url, "--mpp", "2.0", "--json", "--storage-options", opts)
    assert rc == 0, err
    (remote,) = json.loads(out)
    rc, out, err = _main(capsys, "inspect", str(local), "--mpp", "2.0", "--json")
    (plain,) = json.loads(out)
    for key in ("levels", "level", "grid", "tissue_tiles", "background_tiles"):
        if key in plain:
            assert remote[key] == plain[key], key
    assert remote["source"] == url and "error" not in remote
    rc, out, err = _main(capsys, "inspect", f"s3://{BUCKET}/idc/9175", "--storage-options", opts, "--json")
    assert rc == 0 and json.loads(out)[0]["kind"] == "patches", out + err
    with socket.socket() as sock:  # a port nobody listens on: the options given are the ones used
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    rc, out, err = _main(capsys, "inspect", url, "--storage-options", json.dumps(s3.options(endpoint=closed)))
    assert rc == 1 and f"cannot reach the storage endpoint {closed}" in err and SECRET not in out + err
    rc, out, err = _main(capsys, "inspect", str(local), "--storage-options", opts)
    assert rc == 2 and "--storage-options is for inputs on object storage" in err


def _scored_input(s3, prefix: str, name: str, *, tiles: bool = False):
    """A run on S3 with one patient input ``name`` of 10 tiles (chunks of 4), scored by ``model-a`` and complete:
    ``(run, attrs, gid, probabilities)``; ``tiles``: random pixels written too."""
    from cancernet_batch import store

    run, root = _new_run(s3, prefix)
    attrs = _object_attrs(name, 10, grid=(3, 4), kind="patches")
    gid = store.input_id(attrs.source)
    g = store.create_input(root, attrs, 10, chunk=4, labels=True)
    g["coords"][:] = np.stack(np.divmod(np.arange(10), 4), axis=1)
    if tiles:
        g["tiles"][:] = np.random.default_rng(0).integers(0, 255, (10, 50, 50, 3), dtype=np.uint8)
    probs, done = store.ensure_predictions(g, "model-a")
    p = np.linspace(0.05, 0.95, 10, dtype=np.float32)
    probs[:] = p
    done[:] = True
    store.mark_complete(g)
    return run, attrs, gid, p


def report_rows(text: str) -> dict[str, dict]:
    """``{kind: row}`` of a run's ``report/inputs.csv``."""
    return {r["kind"]: r for r in csv.DictReader(io.StringIO(text))}


def assert_reported_as_local(fs, run_key: str, local: dict[str, dict], slide_url: str) -> None:
    """The run at ``run_key`` (a path of the object store's filesystem ``fs``) reported a slide and a patient folder
    with the tiles and scores of the same inputs run from local disk (``local``: :func:`report_rows` of that run), names
    the slide by its URL, and wrote its report files (GeoJSON, PNG) there."""
    remote = report_rows(fs.cat_file(f"{run_key}/report/inputs.csv").decode())
    assert sorted(remote) == sorted(local) == ["patches", "slide"]
    for kind in ("slide", "patches"):  # the same tiles and scores as from local disk
        for col in ("tissue_tiles", "idc_tiles", "mean_prob", "max_prob", "idc_regions", "source_mpp"):
            assert remote[kind][col] == local[kind][col], (kind, col)
    assert remote["slide"]["source"] == slide_url
    names = fs.find(f"{run_key}/report")
    assert any(n.endswith(".geojson") for n in names) and any(n.endswith(".png") for n in names)


def flagged_input(root, attrs):
    """An input of 12 one-tile chunks (``attrs``, in the tile store ``root``) whose done flags 0, 3, 7 and 11 are set
    and 5 is written False (not left out): its group, and the flags as they read."""
    from cancernet_batch import store

    g = store.create_input(root, attrs, 12, chunk=1)
    store.ensure_predictions(g, "model-a")
    for i in (0, 3, 7, 11):
        store.set_flag(g, "done", i)
    g["done"].with_config({"write_empty_chunks": True})[5] = False
    want = np.zeros(12, bool)
    want[[0, 3, 7, 11]] = True
    return g, want


def assert_flags_listed_by_md5(run_url: str, options: dict, source: str, put) -> None:
    """The flags of an input in a new run folder at ``run_url`` (storage ``options``) read from one listing of their
    chunks, each known by the MD5 its listing states: the same flags as zarr reads. Then ``put(key, data)`` (a key
    under the run folder) damages one: the listing gives up, and zarr raises on it. For the stores whose listing
    states MD5s otherwise than S3's ETags (GCS, Azure)."""
    from cancernet_batch import store
    from cancernet_batch.store import InputAttrs

    root = Run.of(run_url, options).create().open_store("a")
    root.require_group("inputs")
    attrs = InputAttrs(source=source, kind="patches", reader="test", patient="p", source_size=1, source_mtime=0.0,
                       target_mpp=4.0, grid_shape=(3, 4), n_tiles=12)
    g, want = flagged_input(root, attrs)
    done = g["done"]
    listed = store._listed_flags(done, 12, store.flag_encodings(done.metadata))
    assert listed is not None and listed.tolist() == want.tolist()  # every chunk recognised by its MD5
    assert store.done_mask(g).tolist() == want.tolist() == np.asarray(done[:], bool).tolist()
    put(f"tiles.zarr/inputs/{store.input_id(source)}/done/c.8", b"not a zstd frame")
    assert store._listed_flags(done, 12, store.flag_encodings(done.metadata)) is None
    with pytest.raises(Exception):
        store.done_mask(g)


def test_the_flags_of_an_input_on_s3_are_read_from_one_listing_not_a_get_each(s3):
    """An input's per-chunk flags (``done``, ``tiled``) are one-element chunks: read from one listing of the array's
    chunks (present: True or False by its ETag, the MD5 of the array's encoding of either; absent: the fill value),
    not a GET each. Every chunk task that scores a chunk reads all its input's done flags: n * n GETs an input of n
    chunks before. A chunk whose bytes are neither goes through zarr, which raises on it as it would."""
    from cancernet_batch import store

    prefix = "nights/flags"
    run, root = _new_run(s3, prefix)
    attrs = _object_attrs("F1", 12, grid=(3, 4), kind="patches")
    g, want = flagged_input(root, attrs)
    gid = store.input_id(attrs.source)
    assert s3.fs().exists(f"{BUCKET}/{prefix}/tiles.zarr/inputs/{gid}/done/c.5")
    s3.server.reset()
    assert store.done_mask(g).tolist() == want.tolist()
    gets = [r.path for r in s3.server.requests if r.method == "GET"]
    assert gets == [f"/{BUCKET}"], gets  # the one listing (of done/), no chunk
    assert np.asarray(g["done"][:], bool).tolist() == want.tolist()  # what zarr reads, chunk by chunk
    # a flag object whose bytes are not the array's encoding of either value: read through zarr, which says so
    s3.fs().pipe_file(f"{BUCKET}/{prefix}/tiles.zarr/inputs/{gid}/done/c.8", b"not a zstd frame")
    with pytest.raises(Exception):
        store.done_mask(g)


def test_an_inputs_report_reads_each_chunk_of_its_coords_probs_and_done_flags_once(s3):
    """The report of one input (state, consistency check, figures, map, mosaic thumbnail) reads each chunk of
    its ``coords`` and ``probs`` arrays once and its ``done`` flags from one listing: the check's reads are the
    figures' (before: coords three times, probabilities and done flags twice, one GET per chunk each time). The
    report is the same."""
    from collections import Counter

    from cancernet_batch.aggregate import REPORTED, Threshold
    from cancernet_batch.config import ReportConfig
    from cancernet_batch.stages.report import _one_input

    prefix = "nights/reportreads"
    run, attrs, gid, p = _scored_input(s3, prefix, "P7", tiles=True)
    _store_requests(s3, prefix)
    row, failure = _one_input(run, gid, run.open_input(gid), attrs, "P7", Threshold(0.5, "--threshold"), ReportConfig())
    sent = _store_requests(s3, prefix)
    reads = Counter(r.path.split(f"/inputs/{gid}/", 1)[1] for r in sent
                    if r.method == "GET" and "/c." in r.path and r.path.split(f"/inputs/{gid}/", 1)[1].split("/")[0]
                    in ("coords", "probs", "done"))
    assert failure is None and row.figures.status == REPORTED and row.heatmap and row.view
    assert row.figures.idc_tiles == int((p >= 0.5).sum()) and row.figures.tissue_tiles == 10
    want = {f"{a}/c.{i}" + (".0" if a == "coords" else ""): 1 for a in ("coords", "probs") for i in range(3)}
    assert dict(reads) == want
    assert [r.method for r in sent if r.path == f"/{BUCKET}"] == ["GET"]  # the done flags: one listing


def test_settling_a_finished_input_reads_each_chunk_of_its_coords_probs_and_done_flags_once(s3):
    """A re-run's task for an input scored before (its chunks to score found, then, none left, its report) reads
    each chunk of its ``coords`` and ``probs`` arrays once and its ``done`` flags from one listing: what the check of
    its done flags read goes on
    to the consistency check and the report (before: done flags three times, probabilities three times, coords
    twice). A done flag without probabilities is still cleared, and the input then scored again, not reported."""
    from collections import Counter

    from cancernet_batch import store
    from cancernet_batch.aggregate import REPORTED, Threshold
    from cancernet_batch.config import PredictConfig, ReportConfig
    from cancernet_batch.stages.score import Scoring, settle_task

    prefix = "nights/settlereads"
    run, attrs, gid, p = _scored_input(s3, prefix, "P9")
    scoring = Scoring(PredictConfig(model_dir="unused"), "model-a", 0.5, 4.0)
    report = ("P9", Threshold(0.5, "--threshold"), ReportConfig())
    _store_requests(s3, prefix)
    out = settle_task(run, gid, scoring, report)
    sent = _store_requests(s3, prefix)
    reads = Counter(r.path.split(f"/inputs/{gid}/", 1)[1] for r in sent
                    if r.method == "GET" and "/c." in r.path and r.path.split(f"/inputs/{gid}/", 1)[1].split("/")[0]
                    in ("coords", "probs", "done"))
    row, failure = out["report"]
    assert out["score"] == ([], 3) and failure is None and row.figures.status == REPORTED
    assert row.figures.idc_tiles == int((p >= 0.5).sum()) and row.figures.tissue_tiles == 10
    assert dict(reads) == {f"{a}/c.{i}" + (".0" if a == "coords" else ""): 1 for a in ("coords", "probs")
                           for i in range(3)}  # the done flags: no GET of theirs (one listing)

    g = run.open_store("r+")["inputs"][gid]
    g["probs"][8:10] = np.nan  # chunk 2 flagged done without its probabilities: scored again, not reported
    out = settle_task(run, gid, scoring, report)
    assert out == {"score": ([(gid, 2, 8, 10)], 3)}
    assert list(store.done_mask(run.open_store("r")["inputs"][gid])) == [True, True, False]


def test_listing_a_stores_inputs_reads_each_groups_document_once(s3):
    """``store.iter_inputs`` on object storage (the end of every run lists the store's inputs for the rows it did
    not report) reads each input group's ``zarr.json`` once: one listing, the documents read together, the
    groups handed out from those reads (before: each read twice, by the listing and by ``inputs[gid]``)."""
    from collections import Counter

    from cancernet_batch import store

    prefix = "nights/listing"
    run, root = _new_run(s3, prefix)
    gids = []
    for k, complete in enumerate((True, False, True)):
        attrs = _object_attrs(f"s{k}.svs", 4, grid=(2, 2))
        g = store.create_input(root, attrs, 4, chunk=4)
        if complete:
            store.mark_complete(g)
        gids.append(store.input_id(attrs.source))
    _store_requests(s3, prefix)
    listed = list(store.iter_inputs(run.open_store("r"), complete_only=False))
    docs = Counter(r.path.split("/tiles.zarr/", 1)[1] for r in _store_requests(s3, prefix)
                   if r.method == "GET" and r.path.endswith("/zarr.json") and "/inputs/" in r.path)
    assert [gid for gid, _ in listed] == sorted(gids)
    assert [bool(g.attrs["complete"]) for _, g in listed] == [True, False, True]
    assert {k: v for k, v in docs.items() if k != "inputs/zarr.json"} == {f"inputs/{gid}/zarr.json": 1 for gid in gids}
    assert docs["inputs/zarr.json"] == 1  # looked up once (``"inputs" in root``, then ``root["inputs"]``: twice)
    assert [gid for gid, _ in store.iter_inputs(run.open_store("r"))] == sorted(gids[::2])  # complete only
    # a run's discovery has looked every input up already: listed from those, with no request
    root = run.open_store("r")
    look = store.NodeCache(root["inputs"]).load_members()
    _store_requests(s3, prefix)
    assert [gid for gid, _ in store.iter_inputs(root, looked_up=look)] == sorted(gids[::2])
    assert _store_requests(s3, prefix) == []
    # whether the run has a tile store: one GET of its root's document (a look-up of the prefix: HEAD, then LIST)
    assert run.exists() and [(r.method, r.path.rsplit("/", 2)[-2:]) for r in _store_requests(s3, prefix)] == [
        ("GET", ["tiles.zarr", "zarr.json"])]
    assert not Run.of(f"s3://{BUCKET}/nights/no-run", s3.options()).exists()
    # reading the store: one GET of its root's document (a look-up before it was one more, one after another)
    root = run.open_store("r")
    assert [(r.method, r.path.rsplit("/", 2)[-2:]) for r in _store_requests(s3, prefix)] == [
        ("GET", ["tiles.zarr", "zarr.json"])]
    with pytest.raises(StorageError, match="no tiles.zarr in this run folder") as exc:
        Run.of(f"s3://{BUCKET}/nights/no-run", s3.options()).open_store("r")
    assert f"s3://{BUCKET}/nights/no-run" in str(exc.value) and "cancernet tile" in str(exc.value.hint)
    assert [(r.method, r.path) for r in _store_requests(s3, "nights/no-run")] == [
        ("GET", f"/{BUCKET}/nights/no-run/tiles.zarr/zarr.json")]


def test_the_model_check_of_a_rerun_reads_each_inputs_predictions_document_once_all_at_once(s3):
    """Before a run scores into a folder it checks which models scored it (one report never mixes two). On object
    storage that reads each input's ``probs`` document once, all in one round (before: ``"probs" in g`` then
    ``g["probs"]``, two GETs one after another for each input: a thousand-slide archive's resume, a minute at
    S3's latency before anything started)."""
    from collections import Counter

    from cancernet_batch import store
    from cancernet_batch.stages.score import _scored_by

    prefix = "nights/scored-by"
    run, root = _new_run(s3, prefix)
    gids = []
    for k, model in enumerate(("model-a", "model-a", None, "model-b")):
        attrs = _object_attrs(f"s{k}.svs", 4, grid=(2, 2))
        g = store.create_input(root, attrs, 4, chunk=4)
        if model:
            store.ensure_predictions(g, model)
        gids.append(store.input_id(attrs.source))
    _store_requests(s3, prefix)
    assert _scored_by(run) == {"model-a", "model-b"}
    probs = Counter(r.path.split("/tiles.zarr/", 1)[1] for r in _store_requests(s3, prefix)
                    if r.method == "GET" and r.path.endswith("/probs/zarr.json"))
    assert probs == {f"inputs/{gid}/probs/zarr.json": 1 for gid in gids}  # the unscored one's: looked for, absent


def test_creation_clears_what_a_killed_run_left_under_the_inputs_name_without_its_group(s3):
    """create_input writes the new documents without looking each node up, so what a killed run left under
    the input's name with no group document (arrays' documents and flags: a creation cut between its
    concurrent writes) is removed first (one listing finds it), never taken into the new group: here a
    ``probs`` array of another size and a chunk flagged tiled. Before, on object storage, the left arrays
    made every later creation fail (``ContainsArrayError``)."""
    from cancernet_batch import store

    prefix = "nights/leftovers"
    run, root = _new_run(s3, prefix)

    def attrs(n: int):
        return _object_attrs("left.svs", n, grid=(3, 3))

    gid = store.input_id(attrs(9).source)
    old = store.create_input(root, attrs(9), 9, chunk=4, arrays=store.prediction_specs(9, 4, "m"))
    old["tiled"][0] = True
    s3.fs().rm_file(f"{BUCKET}/{prefix}/tiles.zarr/inputs/{gid}/zarr.json")  # the group's document never written
    assert gid not in run.open_store("r")["inputs"]
    g = store.create_input(run.open_store("r+"), attrs(6), 6, chunk=4)
    again = run.open_store("r")["inputs"][gid]
    assert "probs" not in again and "done" not in again and again["tiles"].shape[0] == 6
    assert list(store.tiled_mask(again)) == [False, False]
    g["tiled"][1] = True
    assert list(store.tiled_mask(run.open_store("r")["inputs"][gid])) == [False, True]


def test_the_s3_filesystems_of_a_process_share_one_botocore_session_that_never_travels(s3, monkeypatch):
    """Each S3 filesystem object of a process (side files, tile store, inputs) makes its botocore client from one
    shared session, so botocore's data (service model, endpoint rules) is read once per process, not once per
    object. The session is never part of the options that go to the workers; options that name a profile, or
    credentials that may be refreshed, get s3fs's own session; other AWS_* credentials in the environment get
    another session."""
    import pickle

    from cancernet_batch.runfolder import FsspecFS, s3_session

    run = Run.of(f"s3://{BUCKET}/nights/session", s3.options())
    a = run.fs
    b = FsspecFS("s3", {**s3.options(), "key": "another-key"})
    assert a.fs is not b.fs and a.fs.session is b.fs.session is s3_session()
    store_fs = a.store_location(run.store_path).fs
    assert store_fs.session is a.fs.session and store_fs.asynchronous
    assert "session" not in pickle.loads(pickle.dumps(a)).storage_options
    assert FsspecFS("s3", {**s3.options(), "profile": "other"}).fs.session is not s3_session()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAOTHERKEYFROMENV")
    assert s3_session() is not a.fs.session
    # credentials that may be refreshed (no key in the options or the environment: a role, SSO...) are not shared
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    keyless = {k: v for k, v in s3.options().items() if k not in ("key", "secret")}
    assert FsspecFS("s3", keyless).fs.session is None  # s3fs makes its own at its first request


def test_a_slides_header_comes_in_few_rounds_of_requests_and_in_one_when_opened_again(s3, s3_inputs, monkeypatch):
    """tifffile follows an object's IFDs one read after another (each IFD's offset is in the one before); the
    real Aperio file has its IFDs after each level's tiles, in blocks 0, 4, 5 and 7 of 8. Opened with nothing
    known, the look-up and the first block are one round, and the first miss brings the block after it and the
    last blocks along (writers put each IFD after its level's tiles): 2 rounds, not 5 (HEAD, then one per block). Where the header lies is kept (the
    reader's ``source_header``, the preflight's answer, the plan's attrs); an open given it fetches it all in one
    round, with the object's look-up; a worker's open costs one HEAD (two before), and a chunk task that knows the
    plan's identity reuses the worker's reader without a request."""
    from cancernet_batch import remote
    from cancernet_batch.config import TileConfig
    from cancernet_batch.preflight import preflight
    from cancernet_batch.slides import open_slide
    from cancernet_batch.stages import tile as tile_stage
    from cancernet_batch.tiling import plan_slide

    url, local = s3_inputs["more/cmu-1-small-region.svs"]
    key = url.split("://", 1)[1]
    rounds = []  # one entry per round of requests sent together: (requests, with a look-up)
    fetch, one_round = remote._fetch_spans, remote._one_round
    monkeypatch.setattr(remote, "_fetch_spans", lambda fs, u, spans: rounds.append((len(spans), False)) or fetch(fs, u, spans))
    monkeypatch.setattr(remote, "_one_round", lambda fs, u, spans, look_up, options: rounds.append(
        (len(spans) + look_up, look_up)) or one_round(fs, u, spans, look_up=look_up, options=options))
    with open_slide(url, storage_options=s3.options()) as first:
        header, alone = first.source_header, list(rounds)
        plan = plan_slide(url, TileConfig(target_mpp=4.0), reader=first)
        ref = first.read_region(0, 100, 200, 300, 150)
    assert header == [0, 4, 5, 7], header
    # the look-up with block 0; block 4 with the one after (5) and the last two (6, 7): one span
    assert alone == [(2, True), (1, False)], alone
    assert plan.attrs().extra["source_header"] == header  # kept with the plan: what the chunk tasks open with
    assert preflight(url, storage_options=s3.options()).source_header == header  # the preflight child's answer

    for identity in (None, remote.stat(url, s3.options())):
        rounds.clear()
        s3.server.reset()
        with open_slide(url, storage_options=s3.options(), identity=identity, header=header) as again:
            assert again.source_header == header and again.level_dimensions == first.level_dimensions
            opened = list(rounds)
            assert np.array_equal(again.read_region(0, 100, 200, 300, 150), ref)
        # one round: blocks 0, 4-5 and 7 (and the look-up, unless the identity is known), nothing read after it
        assert opened == [(3 + (identity is None), identity is None)], opened
        assert len([r for r in s3.server.requests if r.method == "HEAD" and key in r.path]) == (identity is None)

    tile_stage._drop_reader(url)
    s3.server.reset()
    rounds.clear()
    reader = tile_stage._reader(url, s3.options(), None, header)  # a chunk task's open on another worker
    try:
        heads = [r for r in s3.server.requests if r.method == "HEAD" and key in r.path]
        assert len(heads) == 1 and rounds == [(4, True)], (heads, rounds)  # the look-up in the header's round
        s3.server.reset()
        # the next chunk task knows the plan's identity: the reader this process holds, without a request
        assert tile_stage._reader(url, s3.options(), None, header, reader.source_identity) is reader
        assert not s3.server.requests
        assert tile_stage._reader(url, s3.options(), None, header) is reader  # identity unknown: one HEAD finds it
        assert [r.method for r in s3.server.requests] == ["HEAD"]
    finally:
        tile_stage._drop_reader(url)


def test_an_empty_object_and_a_missing_one_are_one_line_each_from_the_one_round_open(s3):
    """The look-up and the first block go out together: an empty object (whose ranged GET fails) is still 'the
    object is empty', and a missing one 'no such object', each naming the URL."""
    from cancernet_batch.errors import InputError, UnsupportedFormatError
    from cancernet_batch.slides import open_slide

    s3.fs().pipe(f"{BUCKET}/odd/empty.svs", b"")
    for name, cls, words in (("empty.svs", UnsupportedFormatError, "the object is empty"),
                             ("absent.svs", InputError, "no such object")):
        url = f"s3://{BUCKET}/odd/{name}"
        with pytest.raises(cls) as err:
            open_slide(url, storage_options=s3.options())
        msg = str(err.value)
        assert msg.startswith(url + ": ") and words in msg and "\n" not in msg, msg


def test_a_workers_prepare_tasks_read_the_stores_root_and_inputs_once_and_each_group_once(s3, s3_inputs):
    """A slide's prepare task looks its group up with one read of the group's document: the root's and
    ``inputs``' documents are read by the process's first task only (the handle is kept per process), and
    ``create_input`` takes that handle (before: root, inputs, the group twice and inputs again, each prepare)."""
    from cancernet_batch import store
    from cancernet_batch.config import TileConfig
    from cancernet_batch.stages.tile import prepare_slide_task

    prefix = "prepare/lookups"
    run, _ = _new_run(s3, prefix)
    run = Run.of(f"s3://{BUCKET}/{prefix}", s3.options(), input_options=s3.options())
    store._INPUTS_GROUPS.clear()
    seen = []
    for name in ("svs", "tiff"):
        _store_requests(s3, prefix)
        res = prepare_slide_task(run, s3_inputs[name][0], TileConfig(target_mpp=2.0), [])
        assert res["todo"] and not res.get("complete"), res
        gid = res["gid"]
        reads = [(r.method, r.path.split("/tiles.zarr/", 1)[-1]) for r in _store_requests(s3, prefix)
                 if r.method in ("GET", "HEAD")]
        seen.append(reads)
        assert reads.count(("GET", f"inputs/{gid}/zarr.json")) == 1, reads  # absent: then one listing to clear
        assert len([r for r in reads if r[1].endswith("zarr.json")]) == (3 if name == "svs" else 1), reads
    assert ("GET", "zarr.json") in seen[0] and ("GET", "inputs/zarr.json") in seen[0]
    groups = dict(store.iter_inputs(run.open_store("r"), complete_only=False))
    assert len(groups) == 2 and all(g.attrs["chunk"] for g in groups.values())  # both made whole


def test_a_run_folders_store_key_is_the_same_after_its_first_request(s3):
    """botocore rewrites the retry settings it is given in place; the options the drivers get are copies, so
    the digest that names a store in this process's caches (input groups, the ``inputs`` handle) does not change
    after the first request (before, each worker's first lookup missed its own cache)."""
    run = Run.of(f"s3://{BUCKET}/keys/run", s3.options())
    before = run.fs.cache_key(run.store_path)
    run.fs.fs.ls(BUCKET)
    assert run.fs.cache_key(run.store_path) == before
    assert run.fs.storage_options["config_kwargs"]["retries"] == {"max_attempts": 3}


def test_a_rerun_looks_every_inputs_group_up_at_once_not_one_input_after_another(s3, s3_inputs, client, capsys):
    """The discovery of a run on object storage reads the store's input groups in one listing and one batch of
    concurrent GETs: a finished input named again costs one read of its group's document (before: two, one
    input after another; a thousand-slide archive's resume spent minutes on them at S3's latency)."""
    prefix = "nights/rediscover"
    args = ["tile", f"s3://{BUCKET}/good/", "--out", f"s3://{BUCKET}/{prefix}", "--scheduler", client.scheduler.address,
            "--storage-options", json.dumps(s3.options())]
    rc, out, err = _main(capsys, *args)
    assert rc == 0, out + err
    s3.server.reset()
    rc, out, err = _main(capsys, *args)
    assert rc == 0 and "2 skipped (complete, unchanged)" in out, out + err
    gets = _metadata_gets(s3, prefix)
    groups = {k: v for k, v in gets.items() if k}
    assert len(groups) == 2 and all(v == 1 for v in groups.values()), gets


def test_a_report_task_on_object_storage_looks_its_arrays_up_at_once(s3):
    """The report task of an input on object storage reads its arrays' documents in one listing and one batch
    (before: one GET each, one after another, and one more that found no map before writing it); the map is
    still written and the report the same."""
    from cancernet_batch import store
    from cancernet_batch.aggregate import REPORTED, Threshold
    from cancernet_batch.config import ReportConfig
    from cancernet_batch.stages import report as report_stage

    prefix = "nights/reportlookups"
    run, attrs, gid, _ = _scored_input(s3, prefix, "P8")
    store._OPEN_INPUTS.clear()
    _store_requests(s3, prefix)
    row, failure = report_stage.report_task(run, gid, "P8", Threshold(0.5, "--threshold"), ReportConfig())
    reqs = _store_requests(s3, prefix)
    assert failure is None and row.figures.status == REPORTED and row.heatmap
    docs = [r.path.split(f"/inputs/{gid}/", 1)[1] for r in reqs
            if r.method == "GET" and r.path.endswith("/zarr.json") and f"/inputs/{gid}/" in r.path]
    # the group's document (open_input), with its arrays' documents (store.ARRAY_DOCS), then the documents of the
    # members made later, once (the listing's batch): no look-up one by one
    assert sorted(docs) == ["done/zarr.json", "probs/zarr.json", "zarr.json"], docs
    assert "idc_map" in store.NodeCache(run.open_input(gid)._group)  # the map was written


def test_a_rerun_finds_the_report_files_of_finished_inputs_in_one_listing(s3, s3_inputs, tiny_model_dir, client, capsys,
                                                                         monkeypatch):
    """A re-run over inputs scored and reported before (what a resumed night does first) finds which of their report
    files are there from one listing of the report folder, made by the client, instead of 7 look-ups (HEADs) in
    each input's task. A part whose files are all there is kept (nothing drawn or written again); one with a file
    gone is drawn again. The client keeps of the listing only the names a part can have (not the OME-Zarr maps'
    arrays and chunks), and only until the last of these inputs has started."""
    prefix = "nights/relist"
    args = ["run", f"s3://{BUCKET}/good/", "--out", f"s3://{BUCKET}/{prefix}", "--model", str(tiny_model_dir),
            "--scheduler", client.scheduler.address, "--chunk-size", "16", "--storage-options", json.dumps(s3.options())]
    rc, out, err = _main(capsys, *args)
    assert rc == 0, out + err
    fs = s3.fs()
    maps = sorted(p for p in fs.find(f"{BUCKET}/{prefix}/report/maps") if p.endswith(".png"))
    assert len(maps) == 2
    fs.rm_file(maps[0])
    s3.server.reset()
    from cancernet_batch.stages.flow import Flow

    kept = []  # what the client keeps of the listing after each input's call: the names a part can have, then none
    present = Flow._report_files_present

    def spy(self, gid):
        found = present(self, gid)
        kept.append(None if self._report_listing is None else set(self._report_listing))
        return found

    monkeypatch.setattr(Flow, "_report_files_present", spy)
    rc, out, err = _main(capsys, *args)
    assert rc == 0, out + err
    assert len(kept) == 2 and kept[1] is None, kept  # released once the last input tiled before has started
    assert not [n for n in kept[0] if ".ome.zarr/" in n and not n.endswith(".ome.zarr/.zattrs")], kept[0]
    assert sum(n.endswith(".ome.zarr/.zattrs") for n in kept[0]) == 2
    report = [r for r in s3.server.requests if f"/{BUCKET}/{prefix}/report/" in r.path]
    assert not [r for r in report if r.method == "HEAD"], [(r.method, r.path) for r in report]
    drawn = sorted(r.path.rsplit("/", 1)[-1] for r in report if r.method == "PUT" and r.path.endswith(".png"))
    assert drawn == [maps[0].rsplit("/", 1)[-1]]  # the part with a file gone, only
    assert sorted(p for p in fs.find(f"{BUCKET}/{prefix}/report/maps") if p.endswith(".png")) == maps
    rows = list(csv.DictReader(io.StringIO(fs.cat_file(f"{BUCKET}/{prefix}/report/inputs.csv").decode())))
    assert [r["status"] for r in rows] == ["reported", "reported"]
