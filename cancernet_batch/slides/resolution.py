"""Source resolution (µm/px) and the choice of pyramid level for a target resolution.

Rules:

* The source µm/px is the file's own (OpenSlide ``openslide.mpp-x/y``, TIFF tags, OME metadata)
  when it is plausible (:data:`MPP_MIN` to :data:`MPP_MAX`). ``--mpp-override`` is used only for a
  slide that states none or an implausible one; a slide with a plausible value keeps it.
* Level: the largest downsample ``d`` whose resolution ``mpp0 * d`` still has at least the detail
  the model needs (``<= target * (1 + LEVEL_TOLERANCE)``); pixels are then area-averaged to exactly
  the target. A slide coarser than the target is refused: it does not hold the detail.
"""

from __future__ import annotations

import logging

from ..errors import ResolutionError
from .base import SlideInfo

log = logging.getLogger(__name__)

from ..config import MPP_MAX, MPP_MIN, check_mpp

LEVEL_TOLERANCE = 1e-3
_HINT = "pass --mpp-override MPP with the scan's µm/px, e.g. 0.25 at 40x or 0.5 at 20x"


check_plausible = check_mpp  # the bounds and message are defined once, in config.py


def resolve_mpp(info: SlideInfo, override: float | None = None) -> tuple[float, str]:
    """``(mpp, source)`` of a slide: ``source`` is ``"file"`` or ``"override"``; :class:`ResolutionError` if none."""
    mpp = info.mpp
    if mpp is not None and MPP_MIN <= mpp <= MPP_MAX:
        if info.mpp_x and info.mpp_y and abs(info.mpp_x - info.mpp_y) > 0.01 * mpp:
            log.warning("%s: pixels are not square (%.4g x %.4g µm); using their mean %.4g µm/px",
                        info.path, info.mpp_x, info.mpp_y, mpp)
        return mpp, "file"
    if override is not None:
        return check_plausible(float(override)), "override"
    if mpp is None:
        raise ResolutionError("the file states no resolution (µm/px)", path=info.path, hint=_HINT)
    raise ResolutionError(f"the stated resolution {mpp:.6g} µm/px is implausible "
                          f"(expected {MPP_MIN:g}-{MPP_MAX:g})", path=info.path, hint=_HINT)


def choose_level(mpp0: float, downsamples: tuple[float, ...] | list[float], target: float, *,
                 path: object = None) -> int:
    """Index of the level with the largest downsample whose µm/px is still at or below ``target``."""
    best, best_d = None, 0.0
    for i, d in enumerate(downsamples):
        if mpp0 * d <= target * (1 + LEVEL_TOLERANCE) and d > best_d:
            best, best_d = i, d
    if best is None:
        raise ResolutionError(f"scanned at {mpp0:.4g} µm/px, coarser than the model's {target:g} µm/px", path=path,
                              hint="the slide lacks the detail the model needs; check --mpp-override, or use a model "
                                   "trained at a coarser resolution")
    return best
