"""Inputs and run folders on Azure Blob Storage (``az://container/prefix``), against a real Blob service on 127.0.0.1:
Azurite, Microsoft's emulator (``tests/azurite.py``), which adlfs and azure-storage-blob reach over HTTP as they reach
``<account>.blob.core.windows.net`` (no client call is mocked). The same code as S3's and GCS's serves it: the run
folder's seam, range requests for a slide's tiles, a prefix listing for patient folders, resume by size and ETag.

Azurite honours a create-only PUT (``If-None-Match: *``), so here, unlike the GCS emulator, the run folder is locked
as on S3: a second command on it is refused."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time

import pytest

from cancernet_batch.runfolder import LOCK_STALE_S, UNLOCKED_ENV, Run

from azurite import KEY, Azurite, azurite_binary
from test_s3 import _main, assert_reported_as_local, report_rows

adlfs = pytest.importorskip("adlfs")
pytestmark = pytest.mark.skipif(azurite_binary() is None,
                                reason="Azurite (npm's azurite) is not installed, and no npm to install it with")

CONTAINER = "cancernet-az"


@pytest.fixture(scope="module")
def azure():
    server = Azurite().start()
    server.fs().mkdir(CONTAINER)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def az_inputs(azure, synth_slide_dir, synth_patch_dir, slides_dir):
    """One synthetic SVS and one patient folder under ``az://CONTAINER/in/``, a truncated SVS under ``bad/`` and a
    DICOM slide under ``dicom/``; the local paths of the first two."""
    fs = azure.fs()
    svs = sorted(synth_slide_dir.glob("*.svs"))[0]
    patient = sorted(p for p in synth_patch_dir.iterdir() if p.is_dir())[0]
    fs.put_file(str(svs), f"{CONTAINER}/in/{svs.name}")
    for f in sorted(patient.rglob("*.png")):
        fs.put_file(str(f), f"{CONTAINER}/in/{patient.name}/{f.relative_to(patient).as_posix()}")
    fs.pipe_file(f"{CONTAINER}/bad/cut.svs", svs.read_bytes()[:60_000])  # the header and the first tiles
    fs.put_file(str(slides_dir / "boxes_0.dcm"), f"{CONTAINER}/dicom/boxes_0.dcm")  # a format only OpenSlide reads
    return svs, patient


def test_a_run_with_inputs_and_out_on_azure_scores_as_on_local_disk_is_locked_and_resumes(
        azure, az_inputs, client, tiny_model_dir, tmp_path, capsys, monkeypatch):
    svs, patient = az_inputs
    common = ["--model", str(tiny_model_dir), "--chunk-size", "32", "--scheduler", client.scheduler.address]
    rc, out, err = _main(capsys, "run", str(svs), str(patient), "--out", str(tmp_path / "local"), *common)
    assert rc == 0, err
    local = report_rows((tmp_path / "local" / "report" / "inputs.csv").read_text())

    monkeypatch.delenv(UNLOCKED_ENV, raising=False)
    opts = json.dumps(azure.options())
    args = ["run", f"az://{CONTAINER}/in/", "--out", f"az://{CONTAINER}/runs/a", "--storage-options", opts, *common]
    rc, out, err = _main(capsys, *args)
    assert rc == 0, err
    assert "inputs: 2 reported, 0 failed" in out, out
    assert "conditional writes" not in err, err  # locked by a create-only PUT, as on S3
    fs = azure.fs()
    assert not fs.exists(f"{CONTAINER}/runs/a/.lock")  # released
    assert_reported_as_local(fs, f"{CONTAINER}/runs/a", local, f"az://{CONTAINER}/in/{svs.name}")
    for name in fs.find(f"{CONTAINER}/runs/a"):  # the account key is in no record the run wrote
        if name.endswith((".json", ".csv", ".html")):
            assert KEY not in fs.cat_file(name).decode("utf-8", "replace"), name

    # the same command again, as a user runs it (its own process): every input found complete by its size and ETag,
    # nothing tiled or scored, and nothing on stderr after the last line (adlfs's exit-time close of zarr's
    # asynchronous client raised "Loop is not running" there: remote.no_dead_exit_calls)
    # The first run's requests went through obstore where it could (the inputs' identities from its first ranged
    # GET); this one goes through adlfs alone (CANCERNET_S3_NATIVE=0): an input's identity is the same either way.
    done = subprocess.run([sys.executable, "-m", "cancernet_batch.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore", "CANCERNET_S3_NATIVE": "0"})
    assert done.returncode == 0, done.stderr
    assert "tile:    0 tiled (0 tiles), 2 already complete" in done.stdout, done.stdout
    assert "predict: 0 patches scored" in done.stdout, done.stdout
    assert "Traceback" not in done.stderr and "Loop is not running" not in done.stderr, done.stderr
    assert KEY not in done.stdout + done.stderr


def test_an_azure_run_folder_in_use_without_container_or_with_a_wrong_key_is_refused_in_one_line(
        azure, az_inputs, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.delenv(UNLOCKED_ENV, raising=False)
    url = f"az://{CONTAINER}/runs/held"
    opts = azure.options()
    run = Run.of(url, opts)
    with run.lock("run"):
        holder = json.loads(azure.fs().cat_file(f"{CONTAINER}/runs/held/.lock"))
        assert not holder["token"].endswith("-probe")  # the probe's second create-only PUT was refused
        rc, out, err = _main(capsys, "run", f"az://{CONTAINER}/in/", "--out", url, "--model", str(tiny_model_dir),
                             "--storage-options", json.dumps(opts))
        assert rc == 1 and err.count("\n") == 1, err
        assert err.startswith(f"error: {url}: this run folder is in use by `cancernet run`"), err
        assert run.claim("report-a") is True and run.claim("report-a") is False
    assert run.release_claims() == 1
    # a holder killed long ago left its lock: never taken over; the error and `status` say how to clear it, with
    # Azure's own command
    dead = {"pid": 4242, "host": "node7", "command": "run", "started": time.time() - 2 * LOCK_STALE_S,
            "heartbeat": time.time() - 2 * LOCK_STALE_S, "token": "x"}
    azure.fs().pipe_file(f"{CONTAINER}/runs/held/.lock", json.dumps(dead).encode())
    rc, out, err = _main(capsys, "run", f"az://{CONTAINER}/in/", "--out", url, "--model", str(tiny_model_dir),
                         "--storage-options", json.dumps(opts))
    assert rc == 1 and err.count("\n") == 1 and "locked by `cancernet run` (pid 4242 on node7" in err, err
    assert f"az storage blob delete -c {CONTAINER} -n runs/held/.lock" in err, err
    rc, out, err = _main(capsys, "status", url, "--storage-options", json.dumps(opts))
    assert rc == 0 and "stopped renewing its lock" in out and f"delete {url}/.lock" in out, out
    azure.fs().rm_file(f"{CONTAINER}/runs/held/.lock")

    rc, out, err = _main(capsys, "run", f"az://{CONTAINER}/in/", "--out", "az://no-such-container/run", "--model",
                         str(tiny_model_dir), "--storage-options", json.dumps(opts))
    assert rc == 1 and err.count("\n") == 1, err
    assert "the container 'no-such-container' does not exist" in err, err

    wrong = "A" * 20 + KEY[20:]
    rc, out, err = _main(capsys, "run", f"az://{CONTAINER}/in/", "--out", f"az://{CONTAINER}/runs/k", "--model",
                         str(tiny_model_dir), "--storage-options", json.dumps(azure.options(key=wrong)))
    assert rc == 1 and err.count("\n") == 1, err
    assert "access denied" in err and "AZURE_STORAGE_CONNECTION_STRING" in err, err
    assert wrong not in err and KEY not in err
    assert not azure.fs().exists(f"{CONTAINER}/runs/k")


def test_missing_and_corrupt_azure_inputs_are_failures_rows_and_the_rest_goes_on(azure, az_inputs, client,
                                                                               tiny_model_dir, tmp_path, capsys):
    """A missing blob, a missing container and a truncated SVS are one failures row each; the SVS is reported. The
    DICOM slide (16 x 16 px) is staged to a local copy, which only OpenSlide reads, opened there and planned: it is
    refused as smaller than one model tile, which only its opened pixels' size can tell."""
    svs, _ = az_inputs
    dicom = f"az://{CONTAINER}/dicom/boxes_0.dcm"
    absent = f"az://{CONTAINER}/in/absent.svs"
    nocontainer = "az://no-such-container/a.svs"
    cut = f"az://{CONTAINER}/bad/cut.svs"
    started = time.monotonic()
    rc, out, err = _main(capsys, "run", f"az://{CONTAINER}/in/{svs.name}", dicom, absent, nocontainer, cut, "--out",
                         str(tmp_path / "r"), "--model", str(tiny_model_dir), "--scheduler", client.scheduler.address,
                         "--storage-options", json.dumps(azure.options()))
    assert rc == 3, err  # some inputs failed, the rest went on
    assert time.monotonic() - started < 120
    assert "inputs: 1 reported, 4 failed" in out, out
    fails = {r["input"]: r for r in csv.DictReader(io.StringIO((tmp_path / "r" / "failures.csv").read_text()))}
    assert sorted(fails) == sorted([absent, nocontainer, cut, dicom])
    assert fails[dicom]["stage"] == "plan" and "16 x 16 px at 0.499 µm/px" in fails[dicom]["message"], fails[dicom]
    for url, row in fails.items():
        assert "\n" not in row["message"] and row["message"].startswith(url), row
    assert fails[absent]["stage"] == "discover" and "no such object" in fails[absent]["message"], fails[absent]
    assert "the container 'no-such-container' does not exist" in fails[nocontainer]["message"], fails[nocontainer]
    assert fails[cut]["stage"] != "discover", fails[cut]  # found, then refused when read: a clear line, not a crash


def test_the_flags_of_an_input_on_azure_are_read_from_one_listing_by_their_md5(azure):
    """Azure keeps a blob's MD5 when it is PUT whole and lists it as ``content_settings.content_md5`` (its ``etag``
    is not an MD5): an input's per-chunk flags are read from one listing of their chunks there too."""
    from test_s3 import assert_flags_listed_by_md5

    assert_flags_listed_by_md5(f"az://{CONTAINER}/runs/flags", azure.options(), f"az://{CONTAINER}/x/F1",
                               lambda key, data: azure.fs().pipe_file(f"{CONTAINER}/runs/flags/{key}", data))


@pytest.mark.slow
def test_kill_and_resume_with_inputs_and_outputs_on_azure(azure, az_inputs, synth_slide_dir, tiny_model_dir,
                                                          tmp_path, capsys):
    """Killed (SIGKILL) after its first chunk of tiles: the lock it left is reported with how to clear it; once
    cleared, the same command finishes every input, and each chunk is tiled and scored."""
    from test_s3 import kill_at_the_first_tiled_chunk

    from cancernet_batch import store

    fs = azure.fs()
    for svs in sorted(synth_slide_dir.glob("*.svs"))[:2]:
        fs.put_file(str(svs), f"{CONTAINER}/two/{svs.name}")
    url = f"az://{CONTAINER}/runs/killed"
    opts = tmp_path / "az.json"
    opts.write_text(json.dumps(azure.options()))
    args = ["run", f"az://{CONTAINER}/two/", "--out", url, "--model", str(tiny_model_dir), "--workers", "1",
            "--chunk-size", "8", "--storage-options", f"@{opts}"]
    kill_at_the_first_tiled_chunk(args, lambda: fs.find(f"{CONTAINER}/runs/killed/tiles.zarr"))
    rc, out, err = _main(capsys, *args)
    assert rc == 1 and f"delete {url}/.lock" in err and "az storage blob delete" in err, err
    fs.rm_file(f"{CONTAINER}/runs/killed/.lock")
    rc, out, err = _main(capsys, *args)
    assert rc == 0, out + err
    assert "resumed" in out or "already complete" in out, out
    groups = dict(store.iter_inputs(Run.of(url, azure.options()).open_store("r")))
    assert len(groups) == 2
    for g in groups.values():
        assert store.tiled_mask(g).all() and store.done_mask(g).all()
    rows = list(csv.DictReader(io.StringIO(fs.cat_file(f"{CONTAINER}/runs/killed/report/inputs.csv").decode())))
    assert {r["status"] for r in rows} == {"reported"} and len(rows) == 2


def test_azure_requests_go_through_obstore_with_adlfs_settings_and_the_same_identities(azure, az_inputs, tmp_path):
    """GETs and PUTs of blobs go through obstore's AzureStore (about a ninth of adlfs's client CPU a request), made
    from the adlfs filesystem's account, key and endpoint; listings, look-ups and the lock's create-only PUT stay
    adlfs's. An object's size and ETag read from obstore's first GET are those adlfs states (unquoted)."""
    from cancernet_batch import remote

    svs, _ = az_inputs
    url = f"az://{CONTAINER}/in/{svs.name}"
    fs = remote.filesystem(url, azure.options())
    native = remote._native(fs)
    assert native is not None and native.kind == "azure"
    before = dict(remote.NATIVE_COUNTS)
    head, info = remote._native_first(native, url, 0, 4096)
    assert head == svs.read_bytes()[:4096]
    assert (info["size"], info["ETag"]) == remote.stat(url, azure.options())
    run = Run.of(f"az://{CONTAINER}/runs/native", azure.options())
    run.create()
    run.fs.write_bytes(run.root / "note.txt", b"through obstore")
    assert run.fs.read_bytes(run.root / "note.txt") == b"through obstore"
    assert azure.fs().cat_file(f"{CONTAINER}/runs/native/note.txt") == b"through obstore"
    # the Data Lake form of a URL (the container, then the account's host): the same blob, through obstore too
    lake = f"abfs://{CONTAINER}@devstoreaccount1.dfs.core.windows.net/in/{svs.name}"
    head2, info2 = remote._native_first(remote._native(remote.filesystem(lake, azure.options())), lake, 0, 4096)
    assert head2 == head and info2 == info
    assert remote.NATIVE_COUNTS["requests"] >= before["requests"] + 4
    assert remote.NATIVE_COUNTS["fallbacks"] == before["fallbacks"]


def test_azure_settings_obstore_cannot_carry_keep_adlfs():
    """Only an account key or a SAS carries over (from a connection string or the filesystem's own options); a
    credential object, service-principal or anonymous access, versions or a secondary location keep adlfs."""
    from types import SimpleNamespace

    from cancernet_batch.remote import _azure_config

    def fs(**kw):
        base = dict(credential=None, anon=False, version_aware=False, client_id=None, request_session=None,
                    location_mode="primary", connection_string=None, account_name=None, account_key=None,
                    sas_token=None, account_host=None)
        return SimpleNamespace(**{**base, **kw})

    cfg, opts = _azure_config(fs(connection_string=f"DefaultEndpointsProtocol=http;AccountName=a1;AccountKey={KEY};"
                                                   "BlobEndpoint=http://127.0.0.1:1/a1;"))
    assert cfg == {"account_name": "a1", "account_key": KEY, "endpoint": "http://127.0.0.1:1/a1"}
    assert opts["allow_http"] is True
    cfg, opts = _azure_config(fs(connection_string="AccountName=a2;SharedAccessSignature=sv=2022&sig=abc%3D;"
                                                   "EndpointSuffix=core.chinacloudapi.cn"))
    assert cfg == {"account_name": "a2", "sas_key": "sv=2022&sig=abc%3D",
                   "endpoint": "https://a2.blob.core.chinacloudapi.cn"} and opts["allow_http"] is False
    cfg, _ = _azure_config(fs(account_name="a3", sas_token="?sv=1&sig=x"))
    assert cfg == {"account_name": "a3", "sas_key": "sv=1&sig=x"}
    for kept in (fs(account_name="a4"), fs(account_name="a4", account_key="k", credential=object()),
                 fs(account_name="a4", anon=True), fs(account_name="a4", account_key="k", version_aware=True),
                 fs(account_name="a4", account_key="k", location_mode="secondary"),
                 fs(account_name="a4", client_id="id", account_key="k")):
        assert _azure_config(kept) is None


def test_azure_credentials_from_the_environment_as_adlfs_reads_them(azure, az_inputs, tiny_model_dir):
    """No ``--storage-options``: the connection string comes from ``AZURE_STORAGE_CONNECTION_STRING``, the standard
    place adlfs reads (the command's own local cluster: its workers inherit the environment). The run reports its
    input, and the key is in none of its output or records."""
    svs, _ = az_inputs
    env = {**os.environ, "AZURE_STORAGE_CONNECTION_STRING": azure.connection_string(), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "cancernet_batch.cli", "run", f"az://{CONTAINER}/in/{svs.name}",
                           "--out", f"az://{CONTAINER}/runs/env", "--model", str(tiny_model_dir), "--workers", "1"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "inputs: 1 reported, 0 failed" in done.stdout, done.stdout
    assert KEY not in done.stdout + done.stderr
    fs = azure.fs()
    for name in fs.find(f"{CONTAINER}/runs/env"):
        if name.endswith((".json", ".csv", ".html")):
            assert KEY not in fs.cat_file(name).decode("utf-8", "replace"), name


def test_a_dicom_series_on_azure_is_one_slide_with_the_local_folders_tiles(azure, dicom_series_dir, client, tmp_path,
                                                                            capsys, monkeypatch):
    """A DICOM series' blobs are staged with their folder (adlfs's listing), as on S3."""
    from test_s3 import tile_dicom_series_as_local

    monkeypatch.setenv("CANCERNET_STAGE_DIR", str(tmp_path / "stage"))
    fs = azure.fs()
    for p in sorted(dicom_series_dir.iterdir()):
        fs.put_file(str(p), f"{CONTAINER}/dicomwsi/{p.name}")
    tile_dicom_series_as_local(f"az://{CONTAINER}/dicomwsi", azure.options(), dicom_series_dir, client, tmp_path, capsys)
