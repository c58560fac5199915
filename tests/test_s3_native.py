"""Inputs on S3 read through obstore (``remote._native``), against moto's real S3 server: the same bytes as s3fs and
the local file, the same requests, s3fs taking over any read the native client fails (its error is the one the user
sees), and s3fs alone where a setting would not carry over."""

from __future__ import annotations

import pytest

from cancernet_batch import remote
from cancernet_batch.errors import InputError

from test_s3 import BUCKET, SECRET, s3  # noqa: F401 - the module's server fixture

pytest.importorskip("obstore")


def _fs(s3, **extra):  # noqa: F811 - the fixture
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **{**s3.options(), **extra})


@pytest.fixture(scope="module")
def blob(s3, tmp_path_factory):  # noqa: F811
    """A 3 MB object of known bytes, its URL and the bytes."""
    import numpy as np

    data = np.random.default_rng(5).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
    s3.fs().pipe_file(f"{BUCKET}/native/blob.bin", data)
    small = {f"{BUCKET}/native/p/{i}.png": bytes([i]) * (1000 + i) for i in range(5)}
    for k, v in small.items():
        s3.fs().pipe_file(k, v)
    return f"s3://{BUCKET}/native/blob.bin", data, {f"s3://{k}": v for k, v in small.items()}


def _counts():
    return dict(remote.NATIVE_COUNTS), dict(remote.COUNTS)


def test_ranges_and_objects_come_through_the_native_client_as_s3fs_gives_them(s3, blob, monkeypatch):  # noqa: F811
    url, data, small = blob
    ranges = [(10, 1000), (5000, 70_000), (2_000_000, 999_999), (2_999_990, 10)]
    fs = remote.filesystem(url, s3.options())
    assert remote._native(fs) is not None
    (n0, c0) = _counts()
    s3.server.reset()
    got = remote.read_ranges(url, ranges, s3.options())
    assert got == [data[o:o + n] for o, n in ranges]
    spans = remote._coalesce(ranges)
    n1, c1 = _counts()
    assert n1["requests"] - n0["requests"] == len(spans) and n1["fallbacks"] == n0["fallbacks"]
    assert c1["requests"] - c0["requests"] == len(spans)
    assert len(s3.server.gets("native/blob.bin")) == len(spans)  # one ranged GET a span, as with s3fs
    assert remote.read_head(url, 4096, s3.options()) == data[:4096]
    assert remote.read_objects(list(small), s3.options()) == small
    # the same through s3fs alone
    monkeypatch.setenv(remote.NATIVE_ENV, "0")
    fs0 = _fs(s3)
    assert remote._native(fs0) is None
    assert remote._fetch_spans(fs0, url, spans) == [data[a:b] for a, b in spans]


def test_a_tiff_over_range_requests_reads_the_same_tiles_natively(s3, synth_slide_dir):  # noqa: F811
    from cancernet_batch.config import TileConfig
    from cancernet_batch.slides import open_slide
    from cancernet_batch.tiling import plan_slide, read_tiles

    svs = sorted(synth_slide_dir.glob("*.svs"))[0]
    s3.fs().put_file(str(svs), f"{BUCKET}/native/{svs.name}")
    url = f"s3://{BUCKET}/native/{svs.name}"
    cfg = TileConfig()
    before = dict(remote.NATIVE_COUNTS)
    with open_slide(url, storage_options=s3.options()) as r:
        plan = plan_slide(url, cfg, reader=r)
        tiles = read_tiles(r, plan.level, plan.tile_px_level, plan.coords)
    with open_slide(svs) as r:
        local = plan_slide(svs, cfg, reader=r)
        expect = read_tiles(r, local.level, local.tile_px_level, local.coords)
    assert (plan.coords == local.coords).all() and plan.n_tiles > 0
    assert (tiles == expect).all()
    assert remote.NATIVE_COUNTS["requests"] > before["requests"]
    assert remote.NATIVE_COUNTS["fallbacks"] == before["fallbacks"]


def test_reads_the_native_client_fails_are_done_by_s3fs_then_it_is_given_up(s3, blob):  # noqa: F811
    url, data, small = blob
    fs = _fs(s3)
    good = remote._native(fs)
    assert good is not None
    # the same settings against a port nothing listens on: every native read fails at once
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    broken = remote._Native({**good.config, "endpoint": dead}, {**good.client_options, "connect_timeout": "2s"})
    fs.__dict__["_cancernet_native"] = broken
    f0 = remote.NATIVE_COUNTS["fallbacks"]
    for i in range(remote.NATIVE_GIVE_UP - 1):
        assert remote._fetch_spans(fs, url, [(i, i + 100)]) == [data[i:i + 100]]
        assert fs.__dict__["_cancernet_native"] is broken  # not given up yet
    assert remote.NATIVE_COUNTS["fallbacks"] - f0 == remote.NATIVE_GIVE_UP - 1
    assert remote._fetch_spans(fs, url, [(7, 70)]) == [data[7:70]]
    assert fs.__dict__["_cancernet_native"] is None and remote._native(fs) is None  # s3fs alone from now on


@pytest.mark.parametrize("native_on", [True, False])
def test_a_missing_object_and_wrong_credentials_are_one_line_each_and_keep_the_native_client(s3, blob, native_on,
                                                                                             monkeypatch):  # noqa: F811
    """(With s3fs alone too: a missing object in a bucket that exists once read as a missing bucket, the bucket
    looked up without the filesystem's endpoint and credentials.)"""
    url, data, small = blob
    fs = remote.filesystem(url, s3.options())
    if not native_on:  # this filesystem reads through s3fs alone
        monkeypatch.setitem(fs.__dict__, "_cancernet_native", None)
    native = remote._native(fs)
    assert (native is not None) == native_on
    failures = native.failures if native_on else 0
    with pytest.raises(InputError) as e:
        remote.read_ranges(f"s3://{BUCKET}/native/nothing-here.bin", [(0, 10)], s3.options())
    assert "no such object" in str(e.value)
    with pytest.raises(InputError) as e:
        remote.read_ranges(f"s3://no-such-bucket-here/x.bin", [(0, 10)], s3.options())
    assert "does not exist" in str(e.value)
    if native_on:  # the input's fault, not the client's
        assert native.failures == failures and remote._native(fs) is native
    from moto import settings

    saved = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on the server checks every request's credentials
    try:
        with pytest.raises(InputError) as e:
            remote.read_ranges(url, [(0, 10)], s3.options(key="AKIAUNKNOWNKEY", secret="not-the-secret"))
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = saved
    line = str(e.value)
    assert "access denied" in line and "AWS_ACCESS_KEY_ID" in line and "\n" not in line
    assert "not-the-secret" not in line and SECRET not in line and "AKIAUNKNOWNKEY" not in line
    got = remote.read_objects([f"s3://{BUCKET}/native/gone.png", *small], s3.options())
    assert isinstance(got.pop(f"s3://{BUCKET}/native/gone.png"), InputError) and got == small


@pytest.mark.parametrize("extra", [{"requester_pays": True}, {"version_aware": True},
                                   {"client_kwargs_verify": False}, {"env_off": True}])
def test_settings_the_native_client_would_not_carry_keep_reads_on_s3fs(s3, blob, extra, monkeypatch):  # noqa: F811
    url, data, _ = blob
    if extra.pop("env_off", False):
        monkeypatch.setenv(remote.NATIVE_ENV, "0")
    if extra.pop("client_kwargs_verify", None) is not None:
        extra["client_kwargs"] = {**s3.options()["client_kwargs"], "verify": False}
    fs = _fs(s3, **extra)
    assert remote._native(fs) is None
    if "requester_pays" not in extra:  # (moto answers requester-pays reads of a bucket that does not ask for it)
        assert remote._fetch_spans(fs, url, [(0, 100)]) == [data[:100]]


def test_a_process_forked_after_the_native_client_ran_uses_s3fs_not_a_runtime_without_threads(s3, blob):  # noqa: F811
    """obstore's runtime threads are not copied by a fork, and obstore then waits for them forever: a process forked
    after this one sent native requests reads through s3fs (checked in a forked child, under an alarm)."""
    import os
    import signal

    url, data, _ = blob
    assert remote.read_ranges(url, [(0, 100)], s3.options()) == [data[:100]]
    assert remote._OBSTORE_STARTED
    pid = os.fork()
    if pid == 0:  # the child: any failure or hang is its exit status
        code = 1
        try:
            signal.alarm(30)
            fs = _fs(s3)
            ok = remote._OBSTORE_FORKED and remote._native(fs) is None
            ok = ok and remote._fetch_spans(fs, url, [(5, 500)]) == [data[5:500]]
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not remote._OBSTORE_FORKED  # this process keeps its client


def test_a_run_folder_writes_and_reads_its_files_and_tile_store_through_the_native_client(s3, monkeypatch):  # noqa: F811
    import zarr

    from cancernet_batch.runfolder import Run

    url = f"s3://{BUCKET}/native/run-a"
    run = Run.of(url, s3.options())
    before = dict(remote.NATIVE_COUNTS)
    run.fs.write_bytes(f"{url}/records/x.json", b'{"a": 1}')
    assert run.fs.read_bytes(f"{url}/records/x.json") == b'{"a": 1}'
    assert run.fs.read_bytes(f"{url}/records/none.json") is None
    with run.fs.staged(f"{url}/report") as d:
        (d / "maps").mkdir()
        (d / "maps" / "a.png").write_bytes(b"png!")
        (d / "b.csv").write_text("x,y\n")
    root = run.create().open_store("a")
    g = root.require_group("inputs").create_group("g1")
    arr = g.create_array("v", shape=(10,), chunks=(5,), dtype="int32")
    arr[:] = list(range(10))
    mid = dict(remote.NATIVE_COUNTS)
    assert mid["requests"] - before["requests"] >= 6 and mid["fallbacks"] == before["fallbacks"]
    objects = s3.objects("native/run-a")
    assert objects[f"{BUCKET}/native/run-a/records/x.json"] == b'{"a": 1}'
    assert objects[f"{BUCKET}/native/run-a/report/maps/a.png"] == b"png!"
    assert objects[f"{BUCKET}/native/run-a/report/b.csv"] == b"x,y\n"
    # read back through s3fs alone (another filesystem, the native client off): the same arrays
    monkeypatch.setenv(remote.NATIVE_ENV, "0")
    plain = zarr.storage.FsspecStore.from_url(f"{url}/tiles.zarr", storage_options={**s3.options(), "skip_instance_cache": True})
    assert list(zarr.open_group(plain, mode="r")["inputs/g1/v"][:]) == list(range(10))
    # a native client that fails: zarr's reads and writes go through s3fs, and after three it is dropped
    store = root.store
    good = remote._native(remote.filesystem(url, s3.options()))
    dead = remote._Native({**good.config, "endpoint": "http://127.0.0.1:9"}, {**good.client_options, "connect_timeout": "2s"})
    store.fs.__dict__["_cancernet_native"] = dead
    arr2 = zarr.open_array(store=store, path="inputs/g1/v", mode="r+")
    arr2[:5] = [9, 9, 9, 9, 9]
    assert list(arr2[:]) == [9, 9, 9, 9, 9, 5, 6, 7, 8, 9]
    assert remote.NATIVE_COUNTS["fallbacks"] > mid["fallbacks"]
    assert store.fs.__dict__["_cancernet_native"] is None


def test_credentials_from_a_profile_are_the_ones_the_native_client_signs_with(s3, blob, tmp_path, monkeypatch):  # noqa: F811
    from test_s3 import KEY_ID

    url, data, _ = blob
    creds = tmp_path / "credentials"
    creds.write_text(f"[night]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, profile="night",
                           client_kwargs=s3.options()["client_kwargs"])
    native = remote._native(fs)
    assert native is not None and native.config["access_key_id"] == KEY_ID
    before = remote.NATIVE_COUNTS["requests"]
    assert remote._fetch_spans(fs, url, [(100, 200)]) == [data[100:200]]
    assert remote.NATIVE_COUNTS["requests"] == before + 1


def test_staged_report_files_go_out_in_bounded_batches_and_large_ones_stream_through_s3fs(s3, monkeypatch):  # noqa: F811
    from cancernet_batch import runfolder
    from cancernet_batch.runfolder import Run

    monkeypatch.setattr(runfolder, "STAGED_IN_MEMORY", 800)  # files over 100 bytes stream; batches of 800 bytes
    url = f"s3://{BUCKET}/native/run-b"
    run = Run.of(url, s3.options())
    files = {f"maps/s{i}.png": bytes([i]) * 90 for i in range(20)}
    files.update({"big.ome.tif": b"T" * 5000, "regions.geojson": b"{}" * 300})
    puts = []
    real = remote.put_objects
    monkeypatch.setattr(remote, "put_objects", lambda fs, items, fallback: (puts.append([n for n, _ in items]),
                                                                            real(fs, items, fallback)))
    with run.fs.staged(f"{url}/report") as d:
        for name, data in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(data)
    assert {f"{BUCKET}/native/run-b/report/{k}": v for k, v in files.items()} == s3.objects("native/run-b/report")
    assert sorted(n.rsplit("/report/", 1)[1] for b in puts for n in b) == sorted(k for k in files if len(files[k]) <= 100)
    assert len(puts) == 3 and all(len(b) * 90 <= 800 for b in puts)  # 20 small files: 8 + 8 + 4


def test_listings_come_through_the_native_client_as_s3fs_gives_them_and_fall_back_to_it(s3, monkeypatch):  # noqa: F811
    """The run folder's listings (its folders, a report's files, the done flags of a chunk task) and an input prefix's
    listing go through obstore: the same names, types, sizes and ETags as s3fs's ``ls`` and ``find``, without s3fs; a
    native listing that fails is done by s3fs, which then counts towards giving the native client up."""
    from cancernet_batch.runfolder import Run

    fs0 = s3.fs()
    tree = {"native/lst/a/c/0": b"\x01" * 16, "native/lst/a/c/1": b"\x00" * 17, "native/lst/a/d.json": b"{}",
            "native/lst/top.txt": b"x", "native/lstx/other.txt": b"not under native/lst"}
    for k, v in tree.items():
        fs0.pipe_file(f"{BUCKET}/{k}", v)
    fs = _fs(s3)
    plain = _fs(s3)
    monkeypatch.setitem(plain.__dict__, "_cancernet_native", None)  # s3fs alone, the reference

    def rows(entries):
        return sorted((str(e["name"]).rstrip("/"), e["type"], int(e["size"]), e.get("ETag")) for e in entries)

    n0 = dict(remote.NATIVE_COUNTS)
    level = remote.list_objects(fs, f"{BUCKET}/native/lst", lambda: pytest.fail("listed through s3fs"), recursive=False)
    deep = remote.list_objects(fs, f"{BUCKET}/native/lst", lambda: pytest.fail("listed through s3fs"), recursive=True)
    assert rows(level) == rows(plain.ls(f"{BUCKET}/native/lst", detail=True))
    assert rows(deep) == rows(plain.find(f"{BUCKET}/native/lst", detail=True).values())
    assert {e["name"] for e in deep} == {f"{BUCKET}/{k}" for k in tree if k.startswith("native/lst/")}
    assert remote.list_objects(fs, f"{BUCKET}/native/none", lambda: pytest.fail("s3fs"), recursive=True) == []
    assert remote.NATIVE_COUNTS["requests"] - n0["requests"] == 3 and remote.NATIVE_COUNTS["fallbacks"] == n0["fallbacks"]

    # an input prefix (its identity for resume: the same as through s3fs) and the run folder's own listings
    url = f"s3://{BUCKET}/native/lst"
    with_native = remote.listing(url, s3.options())
    assert remote.identity(with_native) == remote.identity({f"s3://{k}": v for k, v in
                                                           plain.find(f"{BUCKET}/native/lst", detail=True).items()})
    run = Run.of(f"s3://{BUCKET}/native", s3.options())
    run.fs.fs.__dict__.pop("_cancernet_native", None)  # fsspec's cached instance: an earlier test may have given it up
    monkeypatch.setattr(run.fs.fs, "find", lambda *a, **k: pytest.fail("found through s3fs"))
    monkeypatch.setattr(run.fs.fs, "ls", lambda *a, **k: pytest.fail("listed through s3fs"))
    assert run.fs.find(url) == {"a/c/0", "a/c/1", "a/d.json", "top.txt"}
    assert sorted(run.fs._entries(url)) == [("a", True), ("top.txt", False)]

    # a key that object_store will not take as a path (S3 allows it): s3fs lists that folder, as often as it takes,
    # and the native client stays (the folder's names, not the client, failed)
    for k in ("native/odd/a//b.png", "native/odd/tab\tname.png", "native/odd/ok.png"):
        fs0.pipe_file(f"{BUCKET}/{k}", b"x")
    for _ in range(remote.NATIVE_GIVE_UP + 1):
        odd = remote.list_objects(fs, f"{BUCKET}/native/odd", lambda: plain.find(f"{BUCKET}/native/odd", detail=True).values(),
                                  recursive=True)
        assert sorted(e["name"] for e in odd) == sorted(plain.find(f"{BUCKET}/native/odd"))
        assert len(odd) == 3
    assert remote._native(fs) is not None

    # a native listing that fails: s3fs lists, and that counts towards giving the native client up
    good = remote._native(fs)
    fs.__dict__["_cancernet_native"] = remote._Native({**good.config, "endpoint": "http://127.0.0.1:9"},
                                                      {**good.client_options, "connect_timeout": "2s"})
    f0 = remote.NATIVE_COUNTS["fallbacks"]
    for _ in range(remote.NATIVE_GIVE_UP):
        got = remote.list_objects(fs, f"{BUCKET}/native/lst", lambda: plain.find(f"{BUCKET}/native/lst", detail=True).values(),
                                  recursive=True)
        assert rows(got) == rows(deep)
    assert remote.NATIVE_COUNTS["fallbacks"] - f0 == remote.NATIVE_GIVE_UP
    assert fs.__dict__["_cancernet_native"] is None


def test_a_chunk_tasks_done_flags_are_listed_through_the_native_client(s3, monkeypatch):  # noqa: F811
    """store._listed_flags (a scoring chunk task's look at its input's done flags) lists through obstore on zarr's
    own loop: the flags as set, with no s3fs listing; with the native client off, the same flags through s3fs."""
    import numpy as np

    from cancernet_batch import store
    from cancernet_batch.runfolder import Run

    run = Run.of(f"s3://{BUCKET}/native/flags", s3.options()).create()
    g = run.open_store("a").require_group("inputs").create_group("g")
    done = g.create_array("done", shape=(6,), chunks=(1,), dtype=bool, fill_value=False)
    done[1] = True
    done[4] = True
    done[5] = False
    known = store.flag_encodings(done.metadata)
    calls = []
    real_ls = type(done.store_path.store.fs)._ls

    async def counted(self, *a, **k):
        calls.append(a)
        return await real_ls(self, *a, **k)

    monkeypatch.setattr(type(done.store_path.store.fs), "_ls", counted)
    # zarr's filesystem may be fsspec's cached instance, whose native client an earlier test gave up: a fresh decision
    done.store_path.store.fs.__dict__.pop("_cancernet_native", None)
    n0 = remote.NATIVE_COUNTS["requests"]
    got = store._listed_flags(done, 6, known)
    assert got is not None and got.tolist() == [False, True, False, False, True, False]
    assert calls == [] and remote.NATIVE_COUNTS["requests"] > n0
    done.store_path.store.fs.__dict__["_cancernet_native"] = None  # s3fs alone: the same flags, one s3fs listing
    assert store._listed_flags(done, 6, known).tolist() == got.tolist() and len(calls) == 1
    assert np.array_equal(done[:], got)

    # a native listing that fails: s3fs lists, and that counts towards giving the native client up, as in the
    # blocking listings
    good = remote._native(s3.fs())
    fs = done.store_path.store.fs
    broken = remote._Native({**good.config, "endpoint": "http://127.0.0.1:9"}, {**good.client_options, "connect_timeout": "2s"})
    fs.__dict__["_cancernet_native"] = broken
    f0 = remote.NATIVE_COUNTS["fallbacks"]
    for i in range(remote.NATIVE_GIVE_UP):
        assert fs.__dict__["_cancernet_native"] is broken  # not given up yet
        assert store._listed_flags(done, 6, known).tolist() == got.tolist() and len(calls) == 2 + i
    assert remote.NATIVE_COUNTS["fallbacks"] - f0 == remote.NATIVE_GIVE_UP
    assert fs.__dict__["_cancernet_native"] is None  # s3fs alone from now on
    fs.__dict__.pop("_cancernet_native", None)  # fsspec's cached instance: a fresh decision for the tests after this


def test_keys_object_store_will_not_name_are_read_and_written_by_s3fs_and_keep_the_native_client(s3):  # noqa: F811
    """S3 allows keys that object_store refuses as paths (an empty or ``.`` segment, a control character): their
    requests fail natively before anything is sent, s3fs serves them, and that is the name's fault, not the client's:
    however many there are, the filesystem keeps its native client for the others."""
    fs = _fs(s3)
    assert remote._native(fs) is not None
    odd = [f"{BUCKET}/native/odd-io/a//{i}.png" for i in range(remote.NATIVE_GIVE_UP + 1)]
    odd += [f"{BUCKET}/native/odd-io/./dot.png", f"{BUCKET}/native/odd-io/tab\there.png"]
    for k in odd:
        remote.put_objects(fs, [(k, k.encode())], lambda k=k: fs.pipe_file(k, k.encode()))
    for k in odd:
        assert remote.get_object(fs, k, lambda k=k: fs.cat_file(k)) == k.encode()
        assert remote._fetch_spans(fs, k, [(0, 5)]) == [k.encode()[:5]]
    got = remote.read_objects([f"s3://{k}" for k in odd], s3.options())
    assert got == {f"s3://{k}": k.encode() for k in odd}
    assert remote._native(fs) is not None and fs.__dict__["_cancernet_native"] is not None
    assert remote._names_it_refuses(ValueError("Could not parse path: x")) and not remote._names_it_refuses(OSError("x"))
