"""A slide's tiles on S3 fetched in the background while the first ones are decoded (``RangeFile.prefetch``), against
moto's real S3 server: a prefetch returns with its requests on their way, they go out in the order the tiles will be
read, a read waits only for the request that brings its bytes, a request that fails is sent again by the read that
needs it (whose error is the one line the user sees), and closing the file drops what was not sent."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cancernet_batch import remote
from cancernet_batch.errors import InputError

from test_s3 import BUCKET, s3  # noqa: F401 - the module's server fixture

SIZE = 3_000_000


def _object(s3, name: str) -> tuple[str, bytes]:  # noqa: F811
    data = np.random.default_rng(len(name)).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    s3.fs().pipe_file(f"{BUCKET}/prefetch/{name}", data)
    return f"s3://{BUCKET}/prefetch/{name}", data


def _file(s3, url: str, native_on: bool, monkeypatch) -> remote.RangeFile:  # noqa: F811
    fs = remote.filesystem(url, s3.options())
    if not native_on:  # this filesystem reads through s3fs alone
        monkeypatch.setitem(fs.__dict__, "_cancernet_native", None)
    assert (remote._native(fs) is not None) == native_on
    return remote.RangeFile(url, s3.options(), size=SIZE)


def _hold(s3, start: int) -> threading.Event:  # noqa: F811
    """Keep the GET of the range that starts at ``start`` at the server until the event is set."""
    gate = threading.Event()
    s3.server.hold = (lambda method, path, rng: method == "GET" and (rng or "").startswith(f"bytes={start}-"), gate)
    return gate


def _starts(requests, name: str) -> list[int]:
    return [int(r.range.split("=")[1].split("-")[0]) for r in requests
            if r.method == "GET" and r.path.endswith(name) and r.range]


# the ranges of two regions, in the order they will be read: the end of the object first, then its start
LATER = [(2_000_000 + i * 42_000, 40_000) for i in range(10)]
FIRST = [(i * 42_000, 40_000) for i in range(10)]


@pytest.fixture
def pipeline(monkeypatch):
    monkeypatch.setattr(remote, "PIPELINE_IN_FLIGHT", 2)
    monkeypatch.setattr(remote, "PIPELINE_SPAN", 200_000)
    spans = remote._coalesce(LATER + FIRST, largest=200_000)
    assert len(spans) == 6 and all(b - a <= 200_000 for a, b in spans)
    return spans


@pytest.mark.parametrize("native_on", [True, False])
def test_a_prefetch_returns_with_its_requests_on_their_way_and_a_read_waits_only_for_its_own(s3, pipeline, native_on,
                                                                                             monkeypatch):  # noqa: F811
    url, data = _object(s3, f"order-{native_on}.bin")
    name = url.rsplit("/", 1)[1]
    f = _file(s3, url, native_on, monkeypatch)
    s3.server.reset()
    held = _hold(s3, 0)  # the request of the object's first bytes stays at the server
    try:
        f.prefetch(LATER + FIRST)
        # returned with that request not served: the rest are read meanwhile, each from its own request
        assert 0 not in _starts(s3.server.requests, name)
        for off, n in LATER + FIRST[6:]:
            assert f.pread(n, off) == data[off:off + n]
        assert 0 not in _starts(s3.server.requests, name)
    finally:
        held.set()
        s3.server.hold = None
    for off, n in FIRST:
        assert f.pread(n, off) == data[off:off + n]
    # one request a span, none twice
    assert sorted(_starts(s3.server.requests, name)) == [a for a, _ in pipeline]
    assert f.requests == len(pipeline) and f.bytes_read == sum(b - a for a, b in pipeline)
    f.close()


@pytest.mark.parametrize("native_on", [True, False])
def test_a_prefetchs_requests_go_out_in_the_order_of_reading(s3, pipeline, native_on, monkeypatch):  # noqa: F811
    """One at a time, so that the order the server sees them in is the order they were sent in (with more in
    flight, two sent one after the other may reach the server either way round)."""
    monkeypatch.setattr(remote, "PIPELINE_IN_FLIGHT", 1)
    url, data = _object(s3, f"sent-{native_on}.bin")
    name = url.rsplit("/", 1)[1]
    f = _file(s3, url, native_on, monkeypatch)
    s3.server.reset()
    f.prefetch(LATER + FIRST)
    for off, n in LATER + FIRST:
        assert f.pread(n, off) == data[off:off + n]
    a = [s for s, _ in pipeline]
    assert _starts(s3.server.arrived, name) == a[3:] + a[:3]  # the later region's spans first, as read
    f.close()


@pytest.mark.parametrize("native_on", [True, False])
def test_a_request_that_fails_on_its_way_is_sent_again_by_the_read_and_its_error_is_one_line(s3, pipeline, native_on,
                                                                                            monkeypatch):  # noqa: F811
    url, data = _object(s3, f"gone-{native_on}.bin")
    f = _file(s3, url, native_on, monkeypatch)
    held = _hold(s3, 0)
    try:
        f.prefetch(LATER + FIRST)
        for off, n in LATER:  # these arrive before the object goes
            assert f.pread(n, off) == data[off:off + n]
        s3.fs().rm_file(url)
    finally:
        held.set()
        s3.server.hold = None
    with pytest.raises(InputError) as e:
        f.pread(*FIRST[0][::-1])
    line = str(e.value)
    assert "no such object" in line and url in line and "\n" not in line
    assert f.pread(*LATER[3][::-1]) == data[LATER[3][0]:sum(LATER[3])]  # what arrived is still read from memory


def test_closing_a_file_drops_the_requests_not_yet_sent(s3, pipeline, monkeypatch):  # noqa: F811
    monkeypatch.setattr(remote, "PIPELINE_IN_FLIGHT", 1)
    url, data = _object(s3, "closed.bin")
    name = url.rsplit("/", 1)[1]
    f = _file(s3, url, True, monkeypatch)
    s3.server.reset()
    first = pipeline[3][0]  # the first span in reading order
    held = _hold(s3, first)
    try:
        f.prefetch(LATER + FIRST)
        pending = list(f._spans.values())
        assert len(pending) == len(pipeline) and all(isinstance(p, remote._Pending) for p in pending)
        deadline = time.monotonic() + 30
        while not _starts(s3.server.arrived, name) and time.monotonic() < deadline:  # the first is at the server
            time.sleep(0.01)
        f.close()
        assert sum(p.future.cancelled() for p in pending) == len(pipeline) - 1
    finally:
        held.set()
        s3.server.hold = None
    sent = next(p for p in pending if not p.future.cancelled())
    assert len(sent.future.result(timeout=30)) == sent.end - first
    time.sleep(0.3)  # the dropped ones had their turn after it: none was sent
    assert _starts(s3.server.arrived, name) == [first]


def test_spans_are_cut_for_the_pipeline_and_started_in_the_order_of_reading():
    ranges = [(1000 * i, 1000) for i in range(10)]  # touching: one span, or several of at most `largest` bytes
    assert remote._coalesce(ranges) == [(0, 10_000)]
    assert remote._coalesce(ranges, largest=3000) == [(0, 3000), (3000, 6000), (6000, 9000), (9000, 10_000)]
    assert remote._coalesce([(0, 5000), (2000, 5000)], largest=3000) == [(0, 7000)]  # overlapping: never cut
    spans = remote._coalesce(ranges, largest=3000)
    assert remote._first_needed(spans, [(9500, 10), (100, 10), (3100, 10), (200, 10)]) == [3, 0, 1, 2]


def test_a_levels_tiles_are_listed_in_the_order_of_the_boxes_that_read_them(synth_slide_dir):
    from cancernet_batch.slides import open_slide

    svs = sorted(synth_slide_dir.glob("*.svs"))[0]
    with open_slide(svs) as r:
        level = r.direct_level(0)
        tw, th = level.tw, level.th
        boxes = [(2 * tw + 1, th + 1, 3 * tw - 1, 2 * th - 1),  # inside tile (2, 1)
                 (0, 0, tw + 1, 1),  # tiles (0, 0) and (1, 0)
                 (2 * tw + 5, th + 5, 2 * tw + 9, th + 9)]  # tile (2, 1) again
        n = level.ntx
        assert level._tiles_in(boxes, in_box_order=True).tolist() == [n + 2, 0, 1]
        assert level._tiles_in(boxes).tolist() == [0, 1, n + 2]
