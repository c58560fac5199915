"""Probability pyramids that viewers open: OME-Zarr (NGFF 0.4) and pyramidal OME-TIFF, aligned to the slide.

Per reported input, two files in ``RUN/report/pyramids/`` (named by ``runfolder.InputFiles``):

* ``<id>.ome.zarr`` — an NGFF 0.4 image (zarr format 2, which napari-ome-zarr, QuPath, Bio-Formats and
  ``ome-zarr`` read): the multiscale **IDC probability** map (float32, axes ``y, x`` in micrometres,
  NaN where no tile was scored: background or filtered out), with an NGFF label image
  ``labels/IDC`` (uint8: 1 IDC, 0 scored and not IDC, 0 background too; ``image-label`` colours).
* ``<id>.ome.tif`` — the same as a tiled, pyramidal OME-TIFF (sub-IFDs), two float32 channels
  (probability, IDC mask: 1, 0 or NaN where not scored), for viewers that do not read zarr.

**Alignment.** One map pixel is one model tile: ``T = level0_tile_px`` level-0 pixels of the slide
(the tile grid starts at the slide's level-0 origin), i.e. ``T * mpp0`` µm. In the slide's physical
frame, where the slide's level 0 is ``scale = mpp0`` with no translation (NGFF puts a pixel's centre
at its coordinate), map level ``k`` (downsampled by ``f = 2**k``) has
``scale = f * T * mpp0`` and ``translation = (f * T - 1) / 2 * mpp0`` on both axes, so each map pixel's
centre sits on the centre of the slide pixels it covers. Patient folders use the Kaggle image's pixels
(``T = 50`` at the model's µm/px). The same numbers are in the OME-TIFF's ``PhysicalSizeX/Y`` (level 0).

Coarser levels: the probability is the mean of the scored tiles of each 2 x 2 block (NaN when none
was scored); the IDC mask is their maximum (a focus stays visible when zoomed out). Levels stop at
256 px on the longer side.

Both are written beside their final name and renamed into place (:func:`cancernet_batch.atomic.atomic_dir`,
:func:`cancernet_batch.atomic.atomic_path`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

NGFF_VERSION = "0.4"
MIN_SIDE = 256  # stop downsampling once the longer side is at most this
CHUNK = 256


def _down(prob: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One 2 x 2 step: nan-mean of the probability, max of the mask (odd edges padded)."""
    h, w = prob.shape
    H, W = -(-h // 2) * 2, -(-w // 2) * 2
    p = np.full((H, W), np.nan, np.float32)
    m = np.zeros((H, W), np.uint8)
    p[:h, :w], m[:h, :w] = prob, mask
    blocks = p.reshape(H // 2, 2, W // 2, 2)
    n = np.sum(~np.isnan(blocks), axis=(1, 3))
    s = np.nansum(blocks, axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, s / np.maximum(n, 1), np.nan).astype(np.float32)
    return mean, m.reshape(H // 2, 2, W // 2, 2).max(axis=(1, 3))


def levels(prob: np.ndarray, threshold: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """The pyramid: ``[(probability, mask), ...]`` from full resolution down to <= MIN_SIDE px."""
    prob = np.asarray(prob, np.float32)
    with np.errstate(invalid="ignore"):
        mask = (prob >= threshold).astype(np.uint8)  # NaN compares False: background is 0
    out = [(prob, mask)]
    while max(out[-1][0].shape) > MIN_SIDE:
        out.append(_down(*out[-1]))
    return out


def transforms(tile_px: float, mpp0: float, n_levels: int) -> list[list[dict]]:
    """NGFF ``coordinateTransformations`` of each level (see the module doc: slide-aligned, µm)."""
    out = []
    for k in range(n_levels):
        f = 2 ** k
        s = f * tile_px * mpp0
        t = (f * tile_px - 1) / 2 * mpp0
        out.append([{"type": "scale", "scale": [s, s]}, {"type": "translation", "translation": [t, t]}])
    return out


def _multiscales(name: str, tile_px: float, mpp0: float, n: int) -> list[dict]:
    return [{"version": NGFF_VERSION, "name": name,
             "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                      {"name": "x", "type": "space", "unit": "micrometer"}],
             "datasets": [{"path": str(k), "coordinateTransformations": ct}
                          for k, ct in enumerate(transforms(tile_px, mpp0, n))],
             "type": "mean (probability), max (IDC mask)"}]


def _arrays(group, data: list[np.ndarray], fill) -> None:
    for k, a in enumerate(data):
        group.create_array(str(k), data=a, chunks=(min(CHUNK, a.shape[0]), min(CHUNK, a.shape[1])),
                           fill_value=fill, chunk_key_encoding={"name": "v2", "separator": "/"})


def fill_ome_zarr(root, lv: list, *, threshold: float, tile_px: float, mpp0: float, name: str, model_id: str = "") -> None:
    """Write the OME-Zarr's attributes, arrays and label image of the pyramid ``lv`` into the empty zarr
    format 2 group ``root``."""
    root.update_attributes({
        "multiscales": _multiscales(f"{name} IDC probability", tile_px, mpp0, len(lv)),
        "omero": {"name": name, "version": NGFF_VERSION, "channels": [
            {"label": "IDC probability", "color": "FF0000", "active": True, "coefficient": 1,
             "family": "linear", "inverted": False, "window": {"start": 0, "end": 1, "min": 0, "max": 1}}],
            "rdefs": {"model": "color"}},
        "cancernet": {"threshold": threshold, "level0_tile_px": tile_px, "source_mpp": mpp0,
                      "model_id": model_id, "nan": "no tile scored (background or filtered out)"}})
    _arrays(root, [p for p, _ in lv], float("nan"))
    labels = root.create_group("labels")
    labels.attrs["labels"] = ["IDC"]
    idc = labels.create_group("IDC")
    idc.update_attributes({
        "multiscales": _multiscales(f"{name} IDC mask", tile_px, mpp0, len(lv)),
        "image-label": {"version": NGFF_VERSION, "source": {"image": "../../"},
                        "colors": [{"label-value": 1, "rgba": [255, 0, 0, 160]}],
                        "properties": [{"label-value": 1, "class": "IDC"}]}})
    _arrays(idc, [m for _, m in lv], 0)


def write_ome_zarr(path: str | Path, lv: list, *, threshold: float, tile_px: float, mpp0: float,
                   name: str, model_id: str = "") -> Path:
    """Write the OME-Zarr of one input's pyramid ``lv`` (:func:`levels`; atomically: a new folder renamed in)."""
    import zarr
    from zarr.storage import MemoryStore

    from .atomic import atomic_dir

    # made in memory, then its files written at once: through zarr's local store each of the dozen small
    # documents and chunks is a round trip to its I/O thread (about half the CPU of this file went there)
    files: dict = {}
    fill_ome_zarr(zarr.open_group(MemoryStore(files), mode="w", zarr_format=2), lv, threshold=threshold,
                  tile_px=tile_px, mpp0=mpp0, name=name, model_id=model_id)
    with atomic_dir(path) as tmp:
        for key in sorted(files):
            if _empty_attributes(key, files[key]):
                continue
            out = tmp.joinpath(*key.split("/"))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(files[key].to_bytes())
    return Path(path)


def _empty_attributes(key: str, value) -> bool:
    """Whether ``key`` is a zarr format 2 ``.zattrs`` document holding no attribute: zarr writes one for each array
    (``{}``), and format 2 makes the file optional (a reader takes a missing one as no attributes). Left out, an
    input's OME-Zarr is 10 files, not 12: two objects fewer to PUT a report part on object storage."""
    import json

    if key.rsplit("/", 1)[-1] != ".zattrs":
        return False
    try:
        return json.loads(value.to_bytes()) == {}
    except ValueError:
        return False


def _uuid(name: str, prob: np.ndarray) -> str:
    """A UUID from the name and the map, so the same map gives the same file (tifffile's default is random)."""
    import hashlib
    import uuid

    h = hashlib.sha256(name.encode("utf-8", "surrogateescape") + np.ascontiguousarray(prob).tobytes()).hexdigest()
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, 'cancernet-batch:' + h)}"


def write_ome_tiff(path: str | Path, lv: list, *, tile_px: float, mpp0: float, name: str) -> Path:
    """Write the pyramid ``lv`` (:func:`levels`) as an OME-TIFF: channels (probability, IDC mask), sub-IFD levels."""
    import tifffile

    from .atomic import atomic_path

    um = tile_px * mpp0

    def plane(p: np.ndarray, m: np.ndarray) -> np.ndarray:
        return np.stack([p, np.where(np.isnan(p), np.nan, m.astype(np.float32))]).astype(np.float32)

    def tile_of(a: np.ndarray) -> tuple[int, int] | None:
        # TIFF tiles are multiples of 16; tiny levels are written as strips
        return (CHUNK, CHUNK) if min(a.shape[-2:]) >= CHUNK else None

    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=False, ome=True) as tw:
            first = plane(*lv[0])
            tw.write(first, subifds=len(lv) - 1, tile=tile_of(first), compression="zlib", photometric="minisblack",
                     resolution=(1e4 / um, 1e4 / um), resolutionunit="CENTIMETER",
                     metadata={"axes": "CYX", "Name": f"{name} IDC probability", "UUID": _uuid(name, lv[0][0]),
                               "PhysicalSizeX": um, "PhysicalSizeXUnit": "µm",
                               "PhysicalSizeY": um, "PhysicalSizeYUnit": "µm",
                               "Channel": {"Name": ["IDC probability", "IDC mask"]}})
            for k, (p, m) in enumerate(lv[1:], start=1):
                a = plane(p, m)
                f = 2 ** k
                tw.write(a, subfiletype=1, tile=tile_of(a), compression="zlib", photometric="minisblack",
                         resolution=(1e4 / (um * f), 1e4 / (um * f)), resolutionunit="CENTIMETER")
    return Path(path)


def write_pyramids(zarr_path: str | Path, tiff_path: str | Path, prob: np.ndarray, *, threshold: float,
                   tile_px: float, mpp0: float, name: str, model_id: str = "") -> tuple[Path, Path]:
    """Both files of one input: the OME-Zarr at ``zarr_path`` and the OME-TIFF at ``tiff_path``."""
    if not (math.isfinite(tile_px) and tile_px > 0 and math.isfinite(mpp0) and mpp0 > 0):
        raise ValueError(f"tile size {tile_px} px and {mpp0} µm/px must be positive")
    lv = levels(prob, threshold)  # once, for both files
    z = write_ome_zarr(Path(zarr_path), lv, threshold=threshold, tile_px=tile_px, mpp0=mpp0, name=name,
                       model_id=model_id)
    t = write_ome_tiff(Path(tiff_path), lv, tile_px=tile_px, mpp0=mpp0, name=name)
    return z, t
