"""Inputs and run folders on Google Cloud Storage (``gs://``), against a real GCS JSON API server on 127.0.0.1:
gcp-storage-emulator (Python, in memory), which gcsfs reaches over HTTP as it reaches storage.googleapis.com (no
client call is mocked). The same code as S3's serves it: the run folder's seam, range requests for a slide's tiles,
a prefix listing for patient folders, resume by size and ETag.

The emulator ignores the condition of a create-only write (``ifGenerationMatch=0``), so a run folder there cannot be
locked: the command says so in one line, and runs unlocked with ``CANCERNET_UNLOCKED_OUT=1`` (as on s3rver). How real
GCS answers that condition is not tested here.
"""

from __future__ import annotations

import csv
import io
import json
import os

import pytest

from cancernet_batch import cli
from cancernet_batch.runfolder import UNLOCKED_ENV

# gcsfs (2025.x and later) makes its file system the "extended" one, which first asks Google's gRPC storage-control
# API what kind of bucket it is; an emulator has no such API, and the question waits 60 s before gcsfs falls back.
# Set before gcsfs is imported (here, at collection), so the test process and the Dask workers it starts inherit it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

gcsfs = pytest.importorskip("gcsfs")
emulator = pytest.importorskip("gcp_storage_emulator.server")

BUCKET = "cancernet-gcs"


@pytest.fixture(scope="module")
def gcs():
    """The emulator on a free port of 127.0.0.1 with one bucket; the storage options that reach it."""
    server = emulator.create_server("127.0.0.1", 0, in_memory=True, default_bucket=BUCKET)
    server.start()
    host, port = server._api._httpd.server_address[:2]
    yield {"endpoint_url": f"http://{host}:{port}", "token": "anon", "project": "cancernet-tests"}
    server.stop()


def _fs(options: dict):
    return gcsfs.GCSFileSystem(skip_instance_cache=True, **options)


def _main(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def gcs_inputs(gcs, synth_slide_dir, synth_patch_dir):
    """One synthetic SVS and one patient folder under ``gs://BUCKET/in/``; their local paths."""
    fs = _fs(gcs)
    svs = sorted(synth_slide_dir.glob("*.svs"))[0]
    patient = sorted(p for p in synth_patch_dir.iterdir() if p.is_dir())[0]
    fs.put_file(str(svs), f"{BUCKET}/in/{svs.name}")
    for f in sorted(patient.rglob("*.png")):
        fs.put_file(str(f), f"{BUCKET}/in/{patient.name}/{f.relative_to(patient).as_posix()}")
    return svs, patient


def test_a_run_with_inputs_and_out_on_gcs_scores_as_on_local_disk_and_resumes(gcs, gcs_inputs, client, tiny_model_dir,
                                                                               tmp_path, capsys, monkeypatch):
    from test_s3 import assert_reported_as_local, report_rows

    svs, patient = gcs_inputs
    common = ["--model", str(tiny_model_dir), "--chunk-size", "32", "--scheduler", client.scheduler.address]
    rc, out, err = _main(capsys, "run", str(svs), str(patient), "--out", str(tmp_path / "local"), *common)
    assert rc == 0, err
    local = report_rows((tmp_path / "local" / "report" / "inputs.csv").read_text())

    monkeypatch.setenv(UNLOCKED_ENV, "1")  # the emulator cannot lock (module doc)
    args = ["run", f"gs://{BUCKET}/in/", "--out", f"gs://{BUCKET}/runs/a", "--storage-options", json.dumps(gcs),
            *common]
    rc, out, err = _main(capsys, *args)
    assert rc == 0, err
    assert "inputs: 2 reported, 0 failed" in out, out
    assert "ignores conditional writes" in err and UNLOCKED_ENV in err
    fs = _fs(gcs)
    assert_reported_as_local(fs, f"{BUCKET}/runs/a", local, f"gs://{BUCKET}/in/{svs.name}")

    # the same command again: every input found complete by its size and ETag, nothing tiled or scored
    rc, out, err = _main(capsys, *args)
    assert rc == 0 and "tile:    0 tiled (0 tiles), 2 already complete" in out, out
    assert "predict: 0 patches scored" in out, out


def test_a_gcs_run_folder_that_cannot_be_locked_or_has_no_bucket_is_refused_in_one_line(gcs, gcs_inputs,
                                                                                       tiny_model_dir, capsys,
                                                                                       monkeypatch):
    monkeypatch.delenv(UNLOCKED_ENV, raising=False)
    rc, out, err = _main(capsys, "run", f"gs://{BUCKET}/in/", "--out", f"gs://{BUCKET}/runs/b", "--model",
                         str(tiny_model_dir), "--storage-options", json.dumps(gcs))
    assert rc == 1 and err.count("\n") == 1, err
    assert "ignores conditional writes" in err and f"gs://{BUCKET}/runs/b" in err, err
    assert not _fs(gcs).find(f"{BUCKET}/runs/b/tiles.zarr")  # nothing written but the probe
    rc, out, err = _main(capsys, "run", f"gs://{BUCKET}/in/", "--out", "gs://no-such-gcs-bucket/run", "--model",
                         str(tiny_model_dir), "--storage-options", json.dumps(gcs))
    assert rc == 1 and err.count("\n") == 1 and "the bucket 'no-such-gcs-bucket' does not exist" in err, err


def test_a_missing_gcs_object_and_bucket_are_failures_rows_and_the_rest_goes_on(gcs, gcs_inputs, client,
                                                                               tiny_model_dir, tmp_path, capsys):
    svs, _ = gcs_inputs
    absent = f"gs://{BUCKET}/in/absent.svs"
    nobucket = "gs://no-such-gcs-bucket/a.svs"
    rc, out, err = _main(capsys, "run", f"gs://{BUCKET}/in/{svs.name}", absent, nobucket, "--out", str(tmp_path / "r"),
                         "--model", str(tiny_model_dir), "--scheduler", client.scheduler.address,
                         "--storage-options", json.dumps(gcs))
    assert rc == 3, err  # some inputs failed, the rest went on
    assert "inputs: 1 reported, 2 failed" in out, out
    fails = {r["input"]: r for r in csv.DictReader(io.StringIO((tmp_path / "r" / "failures.csv").read_text()))}
    assert sorted(fails) == sorted([absent, nobucket])
    for url, row in fails.items():
        assert row["stage"] == "discover" and "\n" not in row["message"], row
    assert "no such object" in fails[absent]["message"], fails[absent]
    assert "the bucket 'no-such-gcs-bucket' does not exist" in fails[nobucket]["message"], fails[nobucket]


def test_the_flags_of_an_input_on_gcs_are_read_from_one_listing_by_their_md5(gcs):
    """GCS lists an object's MD5 as ``md5Hash`` (base64; its ``etag`` is not an MD5): an input's per-chunk flags are
    read from one listing of their chunks there too, not a GET each (on S3: by the ETag, ``test_s3.py``). A flag
    whose bytes are neither value's encoding goes through zarr, which raises on it."""
    from test_s3 import assert_flags_listed_by_md5

    assert_flags_listed_by_md5(f"gs://{BUCKET}/runs/flags", gcs, f"gs://{BUCKET}/x/F1",
                               lambda key, data: _fs(gcs).pipe_file(f"{BUCKET}/runs/flags/{key}", data))


def test_a_dicom_series_on_gcs_is_one_slide_with_the_local_folders_tiles(gcs, dicom_series_dir, client, tmp_path,
                                                                          capsys, monkeypatch):
    """A DICOM series' objects on GCS are staged with their folder (gcsfs's listing), as on S3."""
    from test_s3 import tile_dicom_series_as_local

    monkeypatch.setenv("CANCERNET_STAGE_DIR", str(tmp_path / "stage"))
    fs = _fs(gcs)
    for p in sorted(dicom_series_dir.iterdir()):
        fs.put_file(str(p), f"{BUCKET}/dicomwsi/{p.name}")
    tile_dicom_series_as_local(f"gs://{BUCKET}/dicomwsi", gcs, dicom_series_dir, client, tmp_path, capsys)
