"""store.create_input makes a group and its arrays in one create_hierarchy batch: the same documents and data
as Group.create_group and one Group.create_array each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from cancernet_batch import PATCH_SIZE, store
from cancernet_batch.store import InputAttrs


def _attrs(source: str, n: int) -> InputAttrs:
    return InputAttrs(source=source, kind="slide", reader="openslide", patient="p", source_size=10, source_mtime=1.0,
                      target_mpp=4.0, grid_shape=(7, 5), n_tiles=n, extra={"levels": [[10, 20, 1.0]]})


def _one_call_each(root, attrs: InputAttrs, n: int, chunk: int, coords, tissue, thumb, labels: bool,
                   chunk_keys: dict | None = store.CHUNK_KEYS):
    """The group as create_input made it before: Group.create_group, one Group.create_array per array, the
    attributes, then coords, tissue and thumbnail written after, every chunk stored (zarr's ``write_empty_chunks``:
    a chunk that holds only the fill value is written too) - the reference for the batch version. ``chunk_keys``: the
    arrays' chunk key encoding (this tool's; None: zarr's default, nested folders, as stores made before it have)."""
    every = {"write_empty_chunks": True}
    k = {"chunk_key_encoding": chunk_keys} if chunk_keys else {}
    g = root.require_group("inputs").create_group(store.input_id(attrs.source))
    c = max(1, min(chunk, n)) if n else chunk
    g.create_array("tiles", shape=(n, PATCH_SIZE, PATCH_SIZE, 3), chunks=(c, PATCH_SIZE, PATCH_SIZE, 3), dtype="uint8",
                   compressors=store.tiles_compressor(), **k)
    g.create_array("coords", shape=(n, 2), chunks=(c, 2), dtype="int32", **k)
    if labels:
        g.create_array("labels", shape=(n,), chunks=(c,), dtype="int8", fill_value=-1, **k)
    g.create_array("tiled", shape=(len(store.chunk_bounds(n, c)),), chunks=(1,), dtype="bool", fill_value=False, **k)
    g.update_attributes({**attrs.to_json(), "complete": False, "chunk": c})
    if n:
        g["coords"].with_config(every)[:] = coords
    if tissue is not None:
        g.create_array("tissue", shape=tissue.shape, chunks=tissue.shape, dtype="float32", **k).with_config(every)[:] = tissue
        g.create_array("thumbnail", shape=thumb.shape, chunks=(min(thumb.shape[0], 1024), min(thumb.shape[1], 1024), 3),
                       dtype="uint8", **k).with_config(every)[:] = thumb


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_files(ours: dict[str, bytes], theirs: dict[str, bytes], document=json.loads) -> None:
    """The same files (:func:`_files`): metadata documents equal as JSON (key order and layout aside; ``document``
    reads ours), chunks byte for byte."""
    assert sorted(ours) == sorted(theirs)
    for name, got in ours.items():
        if name.endswith("zarr.json"):
            assert document(got) == json.loads(theirs[name]), name
        else:
            assert got == theirs[name], name


@pytest.mark.parametrize("n,chunk,labels,images", [(21, 64, False, True), (130, 64, False, True), (0, 64, False, True),
                                                   (9, 4, True, False)])
def test_batch_creation_writes_what_one_create_array_each_wrote(tmp_path, n, chunk, labels, images):
    rng = np.random.default_rng(n)
    coords = rng.integers(0, 7, (n, 2)).astype(np.int32)
    tissue = rng.random((7, 5)).astype(np.float32) if images else None
    thumb = rng.integers(0, 256, (56, 40, 3), dtype=np.uint8) if images else None
    old = zarr.open_group(str(tmp_path / "old.zarr"), mode="a", zarr_format=3)
    new = zarr.open_group(str(tmp_path / "new.zarr"), mode="a", zarr_format=3)
    attrs = _attrs(str(tmp_path / "slide.svs"), n)
    _one_call_each(old, attrs, n, chunk, coords, tissue, thumb, labels)
    extra = {"arrays": {"tissue": dict(shape=tissue.shape, chunks=tissue.shape, dtype="float32"),
                        "thumbnail": dict(shape=thumb.shape, chunks=(56, 40, 3), dtype="uint8")}} if images else {}
    data = {"coords": coords, **({"tissue": tissue, "thumbnail": thumb} if images else {})}
    g = store.create_input(new, attrs, n, chunk=chunk, labels=labels, data=data, **extra)  # as prepare_slide_task
    a, b = _files(tmp_path / "old.zarr"), _files(tmp_path / "new.zarr")
    here = f"inputs/{store.input_id(attrs.source)}"
    # the group's document also carries its arrays' documents (store.ARRAY_DOCS): each the array's own, as written
    docs = json.loads(json.loads(b[f"{here}/zarr.json"])["attributes"].pop(store.ARRAY_DOCS))  # one JSON text
    arrays = sorted(k.split("/")[-2] for k in b if k.startswith(here + "/") and k.count("/") == here.count("/") + 2
                    and k.endswith("/zarr.json"))
    assert sorted(docs) == arrays == sorted({"tiles", "coords", "tiled"} | ({"labels"} if labels else set())
                                            | ({"tissue", "thumbnail"} if images else set()))
    for name, doc in docs.items():
        assert doc == json.loads(b[f"{here}/{name}/zarr.json"]), name
    def without_array_docs(doc: bytes) -> dict:
        got = json.loads(doc)
        got.get("attributes", {}).pop(store.ARRAY_DOCS, None)
        return got

    _same_files(b, a, without_array_docs)
    assert g.attrs["chunk"] == max(1, min(chunk, n)) if n else chunk
    if images:
        assert np.array_equal(g["tissue"][:], tissue) and np.array_equal(g["thumbnail"][:], thumb)
    assert np.array_equal(g["coords"][:], coords)


def test_batch_creation_replaces_an_old_group(tmp_path):
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="a", zarr_format=3)
    attrs = _attrs(str(tmp_path / "slide.svs"), 5)
    g = store.create_input(root, attrs, 5, chunk=4, arrays={"tissue": dict(shape=(7, 5), chunks=(7, 5), dtype="float32")})
    g["coords"][:] = np.ones((5, 2), np.int32)
    g = store.create_input(root, _attrs(str(tmp_path / "slide.svs"), 3), 3, chunk=4)
    assert "tissue" not in g and g["coords"].shape == (3, 2) and not g["coords"][:].any()
    assert g.attrs["n_tiles"] == 3 and g.attrs["complete"] is False


@pytest.mark.parametrize("kw", [
    dict(shape=(846, PATCH_SIZE, PATCH_SIZE, 3), chunks=(846, PATCH_SIZE, PATCH_SIZE, 3), dtype="uint8"),
    dict(shape=(0, PATCH_SIZE, PATCH_SIZE, 3), chunks=(1024, PATCH_SIZE, PATCH_SIZE, 3), dtype="uint8"),
    dict(shape=(846, PATCH_SIZE, PATCH_SIZE, 3), chunks=(846, PATCH_SIZE, PATCH_SIZE, 3), dtype="uint8",
         compressors=store.tiles_compressor()),
    dict(shape=(5000, 2), chunks=(1024, 2), dtype="int32"),
    dict(shape=(9,), chunks=(4,), dtype="int8", fill_value=-1),
    dict(shape=(3,), chunks=(1,), dtype="bool", fill_value=False),
    dict(shape=(50, 40), chunks=(50, 40), dtype="float32"),
    dict(shape=(400, 320, 3), chunks=(400, 320, 3), dtype="uint8"),
    dict(shape=(10,), chunks=(4,), dtype="float32", fill_value=np.nan, attributes={"model_id": "abc"}),
    dict(shape=(7, 5), chunks=(7, 5), dtype="float32", fill_value=np.nan, attributes={"model_id": "m", "description": "d"}),
])
def test_array_metadata_from_a_template_is_zarrs_own(kw):
    """_array_metadata reuses one zarr-made document per kind of array: for every kind this project makes, and
    shapes, chunks and attributes that differ from the template's, it is equal to zarr's own, byte for byte."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    def doc(meta) -> bytes:
        return meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()

    store._METADATA_TEMPLATES.clear()
    other = {**kw, "shape": tuple(s + 3 for s in kw["shape"]), "chunks": tuple(c + 1 for c in kw["chunks"]),
             "attributes": {"other": 1}}
    store._array_metadata(**other)  # the template of this kind is made from other values
    assert len(store._METADATA_TEMPLATES) == 1
    for args in (kw, other):
        mine = store._array_metadata(**args)
        assert doc(mine) == doc(zarr.create_array(MemoryStore(), **args, chunk_key_encoding=store.CHUNK_KEYS).metadata)
    assert len(store._METADATA_TEMPLATES) == 1  # the same kind: no second zarr call
    # another kind (dtype or fill value) never reuses it
    for i, change in enumerate(({"dtype": "float64"}, {"dtype": "float64", "fill_value": 7})):
        another = {**{k: v for k, v in kw.items() if k != "fill_value"}, **change}
        assert doc(store._array_metadata(**another)) == doc(zarr.create_array(MemoryStore(), **another,
                                                                            chunk_key_encoding=store.CHUNK_KEYS).metadata)
        assert len(store._METADATA_TEMPLATES) == 2 + i


def test_tiles_are_zstd_level_1_and_read_back_as_written(tmp_path):
    """The tiles array is compressed with zstd at level 1 (benchmarks/tile_codecs.py: the same ratio within about
    1 %, a third of the encoding CPU); what is read back is what was written, and other arrays keep zarr's default."""
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="a", zarr_format=3)
    g = store.create_input(root, _attrs(str(tmp_path / "slide.svs"), 40), 40, chunk=16)
    tiles = np.random.default_rng(3).integers(0, 256, (40, PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)
    tiles[:20] //= 16  # some compressible tiles too
    g["tiles"][:] = tiles
    doc = json.loads((tmp_path / "s.zarr" / "inputs" / store.input_id(str(tmp_path / "slide.svs")) / "tiles"
                      / "zarr.json").read_text())
    assert [c for c in doc["codecs"] if c["name"] == "zstd"] == [{"name": "zstd", "configuration": {"level": 1, "checksum": False}}]
    again = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert np.array_equal(again[f"inputs/{store.input_id(str(tmp_path / 'slide.svs'))}/tiles"][:], tiles)
    coords_doc = json.loads((tmp_path / "s.zarr" / "inputs" / store.input_id(str(tmp_path / "slide.svs")) / "coords"
                             / "zarr.json").read_text())
    assert [c for c in coords_doc["codecs"] if c["name"] == "zstd"][0]["configuration"]["level"] == 0


def test_write_tiles_stores_every_chunk_as_written(tmp_path):
    """store.write_tiles skips zarr's comparison of each chunk with the fill value: a chunk of all-zero tiles is
    stored like any other (zarr's default leaves it out), and every chunk reads back as written."""
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="a", zarr_format=3)
    src = str(tmp_path / "slide.svs")
    g = store.create_input(root, _attrs(src, 40), 40, chunk=16)
    tiles = np.random.default_rng(4).integers(0, 256, (40, PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)
    tiles[16:32] = 0  # chunk 1: nothing but zeros (the fill value)
    for s, e in store.chunk_bounds(40, 16):
        store.write_tiles(g, s, e, tiles[s:e])
    folder = tmp_path / "s.zarr" / "inputs" / store.input_id(src) / "tiles"  # chunk k: c.k.0.0.0 (store.CHUNK_KEYS)
    stored = lambda: sorted(k for k in range(3) if (folder / g["tiles"].metadata.encode_chunk_key((k, 0, 0, 0))).is_file())  # noqa: E731
    assert stored() == [0, 1, 2] and not [p for p in folder.rglob("*") if p.is_dir()]  # no folder per chunk
    assert np.array_equal(zarr.open_group(str(tmp_path / "s.zarr"), mode="r")[f"inputs/{store.input_id(src)}/tiles"][:],
                          tiles)
    g["tiles"][16:32] = tiles[16:32]  # for contrast: zarr's own default removes the all-zero chunk
    assert stored() == [0, 2]


def test_a_killed_writers_partial_chunks_go_when_the_store_is_next_opened_to_write(tmp_path):
    """A run killed mid-write leaves ``*.partial`` files: a chunk of tiles (up to 7.7 MB), a flag, a document. Since
    chunks lie in their array's folder (``store.CHUNK_KEYS``) the next command's opening of the store removes them all,
    and nothing else; a read-only opening, or a worker's (``clean=False``: other writers' files are in flight), removes
    none."""
    from cancernet_batch.runfolder import Run

    run = Run.of(tmp_path / "run").create()
    root = run.open_store("a")
    src = str(tmp_path / "slide.svs")
    g = store.create_input(root, _attrs(src, 40), 40, chunk=16)
    tiles = np.zeros((16, PATCH_SIZE, PATCH_SIZE, 3), np.uint8)
    store.write_tiles(g, 0, 16, tiles)
    store.set_flag(g, "tiled", 0)
    folder = run.store_path / "inputs" / store.input_id(src)
    kept = sorted(p for p in folder.rglob("*") if p.is_file())
    partial = [folder / "tiles" / "c.1.0.0.0.5f3a9c0e1b2d4f6a.partial", folder / "tiled" / "c.1.0a1b2c3d4e5f6a7b.partial",
               folder / "coords" / "zarr.json.77aa.partial", folder / "zarr.json.88bb.partial"]
    for p in partial:
        p.write_bytes(b"cut short")
    run.open_store("r")
    run.open_store("r+", clean=False)
    assert all(p.exists() for p in partial)
    run.open_store("a")
    assert not any(p.exists() for p in partial)
    assert sorted(p for p in folder.rglob("*") if p.is_file()) == kept
    assert np.array_equal(run.open_store("r")[f"inputs/{store.input_id(src)}/tiles"][:16], tiles)


def test_an_input_stored_with_nested_chunk_keys_keeps_them(tmp_path):
    """A store made before :data:`store.CHUNK_KEYS` (zarr's default encoding: ``tiles/c/1/0/0/0``, a folder per index)
    is resumed as it is: its tiles and flags are written and read where its arrays' documents say, and zarr reads
    them back; a new input beside it gets this tool's keys (``c.1.0.0.0``, no folder per chunk)."""
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="a", zarr_format=3)
    old_src, new_src = str(tmp_path / "old.svs"), str(tmp_path / "new.svs")
    coords = np.zeros((40, 2), np.int32)
    _one_call_each(root, _attrs(old_src, 40), 40, 16, coords, None, None, False, chunk_keys=None)
    old = root["inputs"][store.input_id(old_src)]
    new = store.create_input(root, _attrs(new_src, 40), 40, chunk=16)
    tiles = np.random.default_rng(5).integers(0, 256, (40, PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)
    for g in (old, new):
        store.write_tiles(g, 16, 32, tiles[16:32])
        store.set_flag(g, "tiled", 1)
    inputs = tmp_path / "s.zarr" / "inputs"
    for src, tile_file, flag_file in ((old_src, "tiles/c/1/0/0/0", "tiled/c/1"), (new_src, "tiles/c.1.0.0.0", "tiled/c.1")):
        folder = inputs / store.input_id(src)
        assert (folder / tile_file).is_file() and (folder / flag_file).is_file(), sorted(folder.rglob("*"))
        back = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["inputs"][store.input_id(src)]
        assert store.tiled_mask(back).tolist() == [False, True, False]
        assert np.array_equal(back["tiles"][16:32], tiles[16:32])
    folder = inputs / store.input_id(new_src)  # its arrays' folders, and nothing deeper
    assert not [p for p in folder.rglob("*") if p.is_dir() and p.parent != folder]


@pytest.mark.parametrize("kw", [
    dict(shape=(9, 2), chunks=(4, 2), dtype="int32"),  # an edge chunk padded with the fill value
    dict(shape=(130, 90, 3), chunks=(64, 64, 3), dtype="uint8", compressors=store.tiles_compressor()),  # 2-D edges
    dict(shape=(7, 5), chunks=(7, 5), dtype="float32", fill_value=np.nan),
    dict(shape=(5,), chunks=(2,), dtype="bool", fill_value=False),
    dict(shape=(6,), chunks=(4,), dtype="int8", fill_value=-1, compressors=None),
])
def test_chunks_encoded_whole_are_the_files_zarr_writes(tmp_path, kw):
    """store._encode_whole (zarr's codecs, called directly) gives each chunk the bytes zarr's own write stores, every
    chunk kept (write_empty_chunks), and zarr reads the arrays back; values of the wrong shape are refused."""
    rng = np.random.default_rng(len(kw["shape"]))
    values = (rng.random(kw["shape"]) * 200).astype(kw["dtype"])
    values[tuple(slice(0, c) for c in kw["chunks"])] = kw.get("fill_value", 0)  # a chunk of the fill value: stored too
    a = zarr.create_array(str(tmp_path / "a.zarr"), **kw)
    a.with_config({"write_empty_chunks": True})[...] = values
    folder = tmp_path / "a.zarr"
    chunks = {k: v for k, v in _files(folder).items() if k != "zarr.json"}
    encoded = store._encode_whole(a.metadata, values)
    assert sorted(encoded) == sorted(chunks)
    assert {k: v.to_bytes() for k, v in encoded.items()} == chunks
    root = zarr.open_group(str(tmp_path / "b.zarr"), mode="a", zarr_format=3)
    g = store._make_group(root, "g", {"x": a.metadata}, {"x": values}, {"k": 1})
    back = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["g"]
    assert back.attrs["k"] == 1 and np.array_equal(back["x"][...], values, equal_nan=True)
    assert np.array_equal(g["x"][...], values, equal_nan=True)
    with pytest.raises(ValueError, match="shape"):
        store._encode_whole(a.metadata, values[:1])


@pytest.mark.parametrize("kw, start, stop", [
    (dict(shape=(40, PATCH_SIZE, PATCH_SIZE, 3), chunks=(16, PATCH_SIZE, PATCH_SIZE, 3), dtype="uint8",
          compressors=store.tiles_compressor()), 16, 32),  # one whole chunk of tiles
    (dict(shape=(40, PATCH_SIZE, PATCH_SIZE, 3), chunks=(16, PATCH_SIZE, PATCH_SIZE, 3), dtype="uint8",
          compressors=store.tiles_compressor()), 0, 40),  # every chunk, the last one short: padded as zarr pads it
    (dict(shape=(9,), chunks=(4,), dtype="float32", fill_value=np.nan), 8, 9),  # probabilities, the edge chunk
    (dict(shape=(9, 2), chunks=(4, 2), dtype="int32"), 4, 8),  # coords
    (dict(shape=(6,), chunks=(1,), dtype="bool", fill_value=False), 3, 4),  # a flag
    (dict(shape=(9,), chunks=(4,), dtype="float32", fill_value=np.nan), 2, 7),  # not whole chunks: zarr writes it
])
def test_rows_written_straight_are_the_files_zarr_writes(tmp_path, kw, start, stop):
    """store.write_rows writes whole chunks of a local array straight (encoded by the array's codecs, then a file
    renamed into place): the same files, byte for byte, as zarr's own write with every chunk stored, and the same
    values read back; anything but whole chunks goes through zarr."""
    rng = np.random.default_rng(stop)
    values = (rng.random((stop - start,) + kw["shape"][1:]) * 200).astype(kw["dtype"])
    ours = zarr.create_array(str(tmp_path / "ours.zarr"), **kw)
    theirs = zarr.create_array(str(tmp_path / "theirs.zarr"), **kw)
    store.write_rows(ours, start, stop, values)
    theirs.with_config({"write_empty_chunks": True})[start:stop] = values
    assert _files(tmp_path / "ours.zarr") == _files(tmp_path / "theirs.zarr")
    back = zarr.open_array(str(tmp_path / "ours.zarr"), mode="r")
    assert np.array_equal(back[start:stop], values, equal_nan=True)
    assert not list((tmp_path / "ours.zarr").rglob("*.partial"))
    if len(values) > 1:
        with pytest.raises(ValueError):  # fewer values than rows: zarr's own error, not a chunk padded with the fill
            store.write_rows(ours, start, stop, values[:-1])


def test_flags_read_straight_are_zarrs_and_a_file_they_do_not_know_goes_through_zarr(tmp_path):
    """store.read_flags reads a local flag array's chunk files itself: a missing chunk is the fill value, the array's
    own encodings of True and False are those values (as zarr reads them, set by store.set_flag or by zarr); a chunk
    file of other bytes sends the read through zarr, which raises on a damaged one as before."""
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="a", zarr_format=3)
    src = str(tmp_path / "slide.svs")
    g = store.create_input(root, _attrs(src, 40), 40, chunk=8)
    assert store.tiled_mask(g).tolist() == [False] * 5
    store.set_flag(g, "tiled", 1)
    g["tiled"][3] = True  # zarr's own write
    g["tiled"].with_config({"write_empty_chunks": True})[4] = False  # a stored False
    assert store.tiled_mask(g).tolist() == [False, True, False, True, False]
    assert store.tiled_mask(g).tolist() == np.asarray(g["tiled"][:]).tolist()
    again = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")[f"inputs/{store.input_id(src)}"]
    assert store.read_flags(again["tiled"]).tolist() == [False, True, False, True, False]  # a read-only store too
    chunk = tmp_path / "s.zarr" / "inputs" / store.input_id(src) / "tiled" / g["tiled"].metadata.encode_chunk_key((2,))
    chunk.write_bytes(b"not a zstd frame")
    calls = []
    real = zarr.Array.__getitem__

    def counting(self, sel):
        calls.append(sel)
        return real(self, sel)

    import unittest.mock
    with unittest.mock.patch.object(zarr.Array, "__getitem__", counting), pytest.raises(Exception):
        store.tiled_mask(g)
    assert calls  # zarr read it, and said what is wrong


def test_rows_and_flags_of_a_zarr_v2_array_go_through_zarr(tmp_path):
    """store.write_rows and read_flags take the straight path only for zarr v3 arrays (whose codecs they call); a
    v2 array (another tool's store) is written and read by zarr, with the same values."""
    flags = zarr.create_array(str(tmp_path / "f.zarr"), shape=(5,), chunks=(1,), dtype=bool, fill_value=False,
                              zarr_format=2)
    store.write_rows(flags, 2, 3, np.ones(1, bool))
    assert store.read_flags(flags).tolist() == [False, False, True, False, False]
    probs = zarr.create_array(str(tmp_path / "p.zarr"), shape=(9,), chunks=(4,), dtype="float32", fill_value=np.nan,
                              zarr_format=2)
    store.write_rows(probs, 4, 8, np.arange(4, dtype="float32"))
    assert np.array_equal(probs[:], [np.nan] * 4 + [0, 1, 2, 3] + [np.nan], equal_nan=True)


def _disk_full_at(monkeypatch, n: int) -> list[str]:
    """Make the ``n``-th rename into place fail as on a full disk (``ENOSPC``); the renames' destinations, as seen."""
    import errno
    import os

    replace, calls = os.replace, []

    def full_disk(src, dst):
        calls.append(str(dst))
        if len(calls) == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    return calls


def test_a_group_whose_files_cannot_all_be_written_leaves_no_group_and_no_temporary_file(tmp_path, monkeypatch):
    """A write that fails part-way (a full disk) raises, leaves no ``*.partial`` file and no group document (the
    group is not there: listings pass over its folder, a resume makes it again); the next creation succeeds."""
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="a", zarr_format=3)
    attrs = _attrs(str(tmp_path / "slide.svs"), 9)
    data = {"coords": np.arange(18, dtype=np.int32).reshape(9, 2)}
    _disk_full_at(monkeypatch, 3)
    with pytest.raises(OSError, match="No space"):
        store.create_input(root, attrs, 9, chunk=4, data=data)
    monkeypatch.undo()
    folder = tmp_path / "s.zarr" / "inputs" / store.input_id(attrs.source)
    assert not [p for p in folder.rglob("*") if p.name.endswith(".partial")]
    assert not (folder / "zarr.json").exists() and folder.is_dir()  # written files left, but no group
    assert store.input_id(attrs.source) not in root.require_group("inputs")
    g = store.create_input(root, attrs, 9, chunk=4, data=data)
    assert np.array_equal(g["coords"][:], data["coords"]) and g.attrs["n_tiles"] == 9


def test_a_group_is_not_made_in_a_store_opened_read_only(tmp_path):
    zarr.open_group(str(tmp_path / "s.zarr"), mode="a", zarr_format=3).require_group("inputs")
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r", zarr_format=3)
    with pytest.raises(ValueError, match="read-only"):
        store._make_group(root["inputs"], "g", {}, {}, {"k": 1})
    assert not (tmp_path / "s.zarr" / "inputs" / "g").exists()


@pytest.mark.parametrize("absent", [True, False])
def test_arrays_made_with_their_data_are_the_files_zarr_writes(tmp_path, absent):
    """create_arrays with ``data`` (the report's idc_map, an input's probs/done): the files are those of one
    create_array and one write each (every chunk stored), on the batch path (``absent``: chunks, then documents,
    in this thread) and on zarr's (``create_hierarchy``, then a write); the nodes it returns read the values."""
    rng = np.random.default_rng(3)
    idc = rng.random((70, 45)).astype(np.float32)
    idc[:30, :20] = np.nan  # background: a chunk of the fill value, stored too
    specs = {"idc_map": dict(shape=idc.shape, chunks=(32, 32), dtype="float32", fill_value=np.nan,
                             attributes={"model_id": "m1"}),
             "done": dict(shape=(5,), chunks=(1,), dtype="bool", fill_value=False)}
    done = np.array([True, False, True, True, False])
    ref = zarr.open_group(str(tmp_path / "ref.zarr"), mode="a", zarr_format=3).require_group("g")
    for name, kw in specs.items():
        ref.create_array(name, **kw, chunk_key_encoding=store.CHUNK_KEYS).with_config({"write_empty_chunks": True})[...] = {"idc_map": idc, "done": done}[name]
    g = zarr.open_group(str(tmp_path / "new.zarr"), mode="a", zarr_format=3).require_group("g")
    made = store.create_arrays(g, specs, absent=absent, data={"idc_map": idc, "done": done})
    ours = _files(tmp_path / "new.zarr" / "g")
    _same_files(ours, _files(tmp_path / "ref.zarr" / "g"))
    for name, got in ours.items():  # the batch path's documents compact (g's own is require_group's)
        if absent and name.endswith("zarr.json") and "/" in name:
            assert b"\n" not in got, name
    assert np.array_equal(made["idc_map"][...], idc, equal_nan=True) and np.array_equal(made["done"][...], done)
    assert made["idc_map"].attrs["model_id"] == "m1"
    back = zarr.open_group(str(tmp_path / "new.zarr"), mode="r")["g"]
    assert np.array_equal(back["idc_map"][...], idc, equal_nan=True)
    with pytest.raises(ValueError, match="not made here"):
        store.create_arrays(g, {}, absent=True, data={"idc_map": idc})


def test_an_array_whose_chunks_cannot_all_be_written_has_no_document(tmp_path, monkeypatch):
    """On disk the batch writes an array's chunks before its document: a write that fails part-way (a full disk)
    leaves chunks but no document (the array is not there; the report is made again) and no temporary file."""
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="a", zarr_format=3).require_group("g")
    idc = np.ones((70, 45), np.float32)
    spec = {"idc_map": dict(shape=idc.shape, chunks=(32, 32), dtype="float32", fill_value=np.nan)}
    calls = _disk_full_at(monkeypatch, 4)
    with pytest.raises(OSError, match="No space"):
        store.create_arrays(g, spec, absent=True, data={"idc_map": idc})
    monkeypatch.undo()
    assert not any(c.endswith("zarr.json") for c in calls[:3])  # chunks went first
    folder = tmp_path / "s.zarr" / "g" / "idc_map"
    assert not (folder / "zarr.json").exists() and not [p for p in folder.rglob("*") if p.name.endswith(".partial")]
    assert "idc_map" not in zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["g"]
    made = store.create_arrays(g, spec, absent=True, data={"idc_map": idc})
    assert np.array_equal(made["idc_map"][...], idc)
