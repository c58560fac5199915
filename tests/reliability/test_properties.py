"""Property-based: generated names (any bytes), patch coordinates, images, store contents and option
values thrown at discovery, patch loading, the store and the CLI's number type. Nothing may crash: every
outcome is a result or the library's own one-line error (or Click's usage error)."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import click
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from cancernet_batch import cli, patches, store
from cancernet_batch.runfolder import Run
from cancernet_batch.errors import CancerNetError, InputError, printable
from cancernet_batch.failures import Failure, read_failures, write_failures
from cancernet_batch.tiling import discover

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))

# any bytes a POSIX file name may hold: no "/" and no NUL, not "." or "..", at most 255 bytes
names = st.binary(min_size=1, max_size=60).map(lambda b: b.replace(b"/", b"_").replace(b"\x00", b"_")).filter(
    lambda b: b not in (b".", b".."))


def _touch(path: bytes, data: bytes = b"") -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.close(fd)


@SETTINGS
@given(st.lists(names, min_size=1, max_size=6, unique=True), st.sampled_from([b".svs", b".tif", b".png", b""]))
def test_discovery_and_failures_survive_any_names(raw, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        base = os.fsencode(tmp)
        patient = os.path.join(base, b"P1")
        os.makedirs(os.path.join(patient, b"0"))
        for name in raw:
            _touch(os.path.join(base, name[:200] + suffix), b"junk")
            _touch(os.path.join(patient, b"0", name[:200] + suffix), b"junk")
        specs, failures = discover([tmp])
        for s in specs:
            gid = store.input_id(s.source)
            gid.encode("ascii")
            assert "/" not in gid and not gid.startswith(".")
        try:
            records, scan_failures = patches.scan(os.fsdecode(patient))
        except InputError as exc:
            records, scan_failures = [], []
            assert "\n" not in str(exc)
        rows = failures + scan_failures + [Failure(s.source, "tile", "X", printable(s.source)) for s in specs]
        for f in rows:
            assert "\n" not in f.message
            f.message.encode("utf-8")
        write_failures(os.path.join(tmp, "failures.csv"), rows)
        assert read_failures(os.path.join(tmp, "failures.csv")) == [
            Failure(f.input, f.stage, f.error_class, f.message if not f.message.startswith(("=", "+", "-", "@"))
                    else "'" + f.message) for f in rows]


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 10**15), st.integers(0, 10**15)), min_size=1, max_size=30),
       st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), min_size=0, max_size=40))
def test_patch_positions_are_bounded(wild, tame):
    recs = [patches.PatchRecord(Path(f"/p/P_idx5_x{x}_y{y}_class0.png"), "P", (y - 1) // 50, (x - 1) // 50, 0)
            for x, y in [(50 * c + 1, 50 * r + 1) for r, c in tame] + list(wild)]
    keep, failures = patches.bound_positions(recs)
    assert len(keep) + len(failures) == len(recs)
    known = [r for r in keep if r.row >= 0]
    if known:
        rows, cols = max(r.row for r in known) + 1, max(r.col for r in known) + 1
        assert rows <= patches.MAX_GRID_SIDE + 1 and cols <= patches.MAX_GRID_SIDE + 1
        assert rows * cols <= patches.MAX_GRID_CELLS
    for f in failures:
        assert "\n" not in f.message and "grid position" in f.message


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "I", "I;16", "F", "CMYK", "YCbCr"]


@SETTINGS
@given(st.sampled_from(MODES), st.integers(1, 70), st.integers(1, 70), st.integers(0, 2**32 - 1),
       st.sampled_from(["PNG", "TIFF", "BMP", "JPEG", "garbage"]))
def test_patch_loading_never_crashes(mode, w, h, seed, fmt):
    from PIL import Image

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.png"
        if fmt == "garbage":
            path.write_bytes(rng.integers(0, 256, rng.integers(0, 200), dtype=np.uint8).tobytes())
        else:
            im = Image.frombytes(mode, (w, h), rng.integers(0, 256, 8 * w * h, dtype=np.uint8).tobytes())
            buf = io.BytesIO()
            try:
                im.save(buf, format=fmt)
            except (OSError, ValueError, KeyError):
                return  # PIL cannot write this mode in this format: nothing to read
            path.write_bytes(buf.getvalue())
        try:
            arr, padded, _ = patches._read_one(path)
        except InputError as exc:
            assert "\n" not in str(exc)
        else:
            assert arr.shape == (50, 50, 3) and arr.dtype == np.uint8


store_contents = st.fixed_dictionaries({
    "n": st.integers(0, 12),
    "grid": st.tuples(st.integers(-2, 6), st.integers(-2, 6)),
    "coords": st.lists(st.tuples(st.integers(-(2**31), 2**31 - 1), st.integers(-(2**31), 2**31 - 1)), max_size=12),
    "probs": st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=12),
    "done": st.lists(st.booleans(), max_size=4),
    "dtype": st.sampled_from(["uint8", "float32", "int16"]),
    "kind": st.sampled_from(["slide", "patches"]),
    "damage": st.one_of(st.none(), st.binary(max_size=80)),
})


@SETTINGS
@given(store_contents)
def test_store_validation_never_crashes(c):
    from cancernet_batch.store import InputAttrs

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        n = c["n"]
        attrs = InputAttrs(source=str(Path(tmp) / "a.svs"), kind=c["kind"], reader="t", patient="p", source_size=0,
                           source_mtime=0.0, target_mpp=4.0, grid_shape=c["grid"], n_tiles=n)
        root = Run.of(run).open_store()
        g = store.create_input(root, attrs, n, chunk=4)
        if c["dtype"] != "uint8":
            del g["tiles"]
            g.create_array("tiles", shape=(n, 50, 50, 3), chunks=(4, 50, 50, 3), dtype=c["dtype"])
        coords = (c["coords"] + [(0, 0)] * n)[:n]
        if n:
            g["coords"][:] = np.array(coords, np.int64).astype(np.int32).reshape(-1, 2)
        store.mark_complete(g)
        probs, done = store.ensure_predictions(g, "m")
        if n:
            probs[:] = np.array((c["probs"] + [0.5] * n)[:n], np.float32)
        for i, flag in enumerate(c["done"][:done.shape[0]]):
            done[i] = flag
        why = store.validate_input(g)
        assert why is None or ("\n" not in why)
        store.clear_unproven_done(g)
        if c["damage"] is not None:
            (Run.of(run).store_path / "inputs" / store.input_id(attrs.source) / "zarr.json").write_bytes(c["damage"])
        damaged: list = []
        listed = list(store.iter_inputs(Run.of(run).open_store("r"), complete_only=False, damaged=damaged))
        assert len(listed) + len(damaged) == 1
        if listed:
            try:
                store.check_input(listed[0][1], listed[0][0])
            except CancerNetError as exc:
                assert "\n" not in str(exc)
        shutil.rmtree(run)


NUMBER_TYPES = sorted({(p.type.low, p.type.high, p.type.low_open, p.type.high_open): p.type
                       for cmd in cli.cli.commands.values() for c in ([cmd] if not isinstance(cmd, click.Group)
                                                                        else cmd.commands.values())
                       for p in c.params if isinstance(p.type, cli.Number)}.items())


@SETTINGS
@given(st.sampled_from([t for _, t in NUMBER_TYPES]),
       st.one_of(st.text(max_size=30), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                 st.integers(-(10**30), 10**30).map(str)))
def test_number_options_accept_only_finite_values_in_range(kind, text):
    import math

    try:
        v = kind.convert(text, None, None)
    except click.BadParameter:
        return
    assert math.isfinite(v) and kind.low <= v <= kind.high
