"""Small scored runs built straight into a tile store, with known probabilities (no model needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cancernet_batch import store
from cancernet_batch.store import InputAttrs
from cancernet_batch.runfolder import Run

MODEL_ID = "model-test-0001"


def add_input(run: Path, source: str | Path, coords, probs, *, kind: str = "slide", patient: str = "",
              grid_shape: tuple[int, int] = (4, 5), tile_px: float = 400.0, target_mpp: float = 4.0,
              source_mpp: float | None = 0.5, chunk: int = 4, scored_chunks: int | None = None,
              complete: bool = True, tiles: np.ndarray | None = None, source_size: int = 0) -> str:
    """Add one input to ``run``'s store; score its first ``scored_chunks`` chunks (default: all)."""
    coords = np.asarray(coords, np.int32).reshape(-1, 2)
    probs = np.asarray(probs, np.float32)
    n = len(coords)
    attrs = InputAttrs(source=str(source), kind=kind, reader="test", patient=patient, source_size=source_size,
                       source_mtime=0.0, target_mpp=target_mpp, grid_shape=grid_shape, n_tiles=n,
                       source_mpp=source_mpp, level0_tile_px=tile_px)
    root = Run.of(run).open_store()
    g = store.create_input(root, attrs, n, chunk=chunk)
    if n:
        if tiles is None:
            tiles = np.full((n, 50, 50, 3), 255, np.uint8)
            tiles[:, 10:40, 10:40] = (200, 120, 160)  # a pink square on white
        g["tiles"][:] = tiles
        g["coords"][:] = coords
    if complete:
        store.mark_complete(g)
    probs_arr, done = store.ensure_predictions(g, MODEL_ID)
    bounds = store.chunk_bounds(n, int(g.attrs["chunk"]))
    for i, (a, b) in enumerate(bounds[:len(bounds) if scored_chunks is None else scored_chunks]):
        probs_arr[a:b] = probs[a:b]
        done[i] = True
    return store.input_id(source)
