"""Test helper: a DICOM WSI series (one instance a pyramid level, and a thumbnail), written with pydicom.

OpenSlide reads a DICOM slide from the instances of one series that lie in one folder, whichever of them it is
given. The shared data's ``boxes_0.dcm`` (a PixelMed conversion of an Aperio slide, 16 x 16 px) is the template:
its attributes are kept, and what makes an instance a level of another slide is set anew (UIDs, the pixel
matrix, tiles as JPEG frames, pixel spacing, image type).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

TEMPLATE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "boxes_0.dcm"


def _frames(rgb: np.ndarray, tile: int, quality: int) -> list[bytes]:
    """The image's tiles, row by row (TILED_FULL), each a baseline JPEG (4:2:2); edge tiles padded white."""
    from PIL import Image

    from cancernet_batch.synth import image_tiles

    out = []
    for t in image_tiles(rgb, tile):
        buf = io.BytesIO()
        Image.fromarray(t).save(buf, "JPEG", quality=quality, subsampling=1)
        out.append(buf.getvalue())
    return out


def write_series(folder: str | Path, name: str, levels: list[np.ndarray], mpp: float, *, tile: int = 256,
                 thumbnail: np.ndarray | None = None, quality: int = 90) -> list[Path]:
    """Write ``levels`` (RGB arrays, level 0 first, at ``mpp`` µm/px times each level's downsample from level 0)
    as the instances ``NAME_L.dcm`` of one new series in ``folder``, and ``thumbnail`` as ``NAME_thumb.dcm``;
    returns their paths."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series, pyramid, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    w0 = levels[0].shape[1]
    paths = []
    parts = [(f"{name}_{i}.dcm", rgb, "VOLUME") for i, rgb in enumerate(levels)]
    if thumbnail is not None:
        parts.append((f"{name}_thumb.dcm", thumbnail, "THUMBNAIL"))
    for i, (fname, rgb, kind) in enumerate(parts):
        ds = pydicom.dcmread(TEMPLATE)
        h, w = rgb.shape[:2]
        t = min(tile, max(h, w)) if kind == "THUMBNAIL" else tile
        frames = _frames(rgb, t, quality)
        uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.SOPInstanceUID = uid
        ds.SeriesInstanceUID, ds.PyramidUID, ds.FrameOfReferenceUID = series, pyramid, frame_of_ref
        ds.InstanceNumber = i + 1
        ds.ImageType = ["DERIVED", "PRIMARY", kind, "RESAMPLED" if i else "NONE"]
        ds.SharedFunctionalGroupsSequence[0].WholeSlideMicroscopyImageFrameTypeSequence[0].FrameType = ds.ImageType
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.Rows = ds.Columns = t
        ds.NumberOfFrames = len(frames)
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
        spacing_mm = mpp * (w0 / w) / 1000.0
        ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [spacing_mm, spacing_mm]
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = w0 * mpp / 1000.0, levels[0].shape[0] * mpp / 1000.0
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        for k in ("LossyImageCompressionRatio",):
            if k in ds:
                del ds[k]
        path = folder / fname
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
