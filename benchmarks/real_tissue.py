"""Real tissue through the slide path: each patient of a Kaggle patch folder rebuilt as a slide,
tiled and scored like any slide, and compared with the same patient's patch folder.

    python benchmarks/real_tissue.py --data ../shared/data/idc --model MODEL --work WORK \
        [--mpp 1.0] [--fine 9175 --fine-mpp 0.25] [--patients 8863 9175] [--results benchmarks/REAL_TISSUE.md]

Per patient: ``cancernet synth slides --from-patches`` (library: ``synth.slide_from_patches``), then
``stages.tile.tile_run`` on the slide and on the patient folder in one run, ``stages.score.predict_run`` with MODEL, and
per grid position: patches kept by default tissue detection, extra slide tiles where no patch is,
the IDC fraction (tiles with probability >= the model's threshold) from the slide and from the
folder, and the correlation of the probabilities where both scored a tile. Writes a markdown table
with the date and machine (``--results``) and the rows as JSON (``WORK/real_tissue.json``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

BARS = {"kept": 0.95, "extra": 0.10, "idc_diff": 0.03, "corr": 0.99}


def measure(patient_dirs: list[Path], work: Path, model_dir: Path, mpp: float, *, workers: int = 1,
            fmt: str = "svs", reuse: bool = False, subsampling: tuple[int, int] = (1, 1),
            quality: int | None = None, decode: str = "fast") -> list[dict]:
    """Rebuild, tile, score and compare each patient (see the module doc); one dict per patient.

    ``subsampling``/``quality``: the rebuilt slides' JPEG (default: ``synth.REBUILD_QUALITY``, 4:4:4); other
    settings get their own slide and run folders in ``work``; ``decode``: tiling's ``--decode`` (its own run folder)."""
    from cancernet_batch import store
    from cancernet_batch.runfolder import Run
    from cancernet_batch.aggregate import load_scored
    from cancernet_batch.cluster import dask_client
    from cancernet_batch.config import ClusterConfig, PredictConfig, TileConfig
    from cancernet_batch.model import read_meta
    from cancernet_batch.stages.score import predict_run
    from cancernet_batch.stages.tile import tile_run
    from cancernet_batch.synth import REBUILD_QUALITY, SlideTruth, patch_mosaic, slide_from_patches

    meta = read_meta(model_dir)
    quality = quality or REBUILD_QUALITY
    jpeg = ("" if (tuple(subsampling), quality) == ((1, 1), REBUILD_QUALITY)
            else f"-{_chroma(subsampling).replace(':', '')}-q{quality}")  # e.g. slides-0.5-420-q90
    slides = work / f"slides-{mpp:g}{jpeg}"
    run = work / f"run-{mpp:g}{jpeg}{'' if decode == 'fast' else '-' + decode}"
    slides.mkdir(parents=True, exist_ok=True)
    built = {}
    for d in patient_dirs:
        path = slides / f"{d.name}.{fmt}"
        t0 = time.perf_counter()
        if reuse and path.is_file() and (slides / f"{d.name}.truth.npz").is_file():  # built by an earlier call
            truth, mosaic = SlideTruth.load(slides / f"{d.name}.truth.npz"), patch_mosaic(d)
        else:
            truth, mosaic = slide_from_patches(d, path, mpp=mpp, fmt=fmt, quality=quality, subsampling=subsampling)
            truth.save(slides / f"{d.name}.truth.npz")
        built[d] = (path, truth, mosaic, time.perf_counter() - t0)
    inputs = [str(x) for d in patient_dirs for x in (built[d][0], d)]
    with dask_client(ClusterConfig(workers=workers)) as client:
        ts = tile_run(inputs, run, TileConfig(target_mpp=meta.mpp, decode=decode), client=client)
        if ts.failures:
            raise RuntimeError(f"tiling failed: {ts.failures[0].message}")
        predict_run(run, PredictConfig(model_dir=str(model_dir)), client=client)
    root = Run.of(run).open_store("r")
    rows = []
    for d in patient_dirs:
        path, truth, mosaic, build_s = built[d]
        s = load_scored(store.input_id(str(path.resolve())), root["inputs"][store.input_id(str(path.resolve()))], d.name)
        f = load_scored(store.input_id(str(d.resolve())), root["inputs"][store.input_id(str(d.resolve()))], d.name)
        shape = truth.tissue.shape
        smap = np.full(shape, np.nan, np.float32)
        smap[s.coords[:, 0], s.coords[:, 1]] = s.probs
        fmap = np.full(shape, np.nan, np.float32)
        fmap[f.coords[:, 0], f.coords[:, 1]] = f.probs
        patch = np.isfinite(fmap)
        slide = np.isfinite(smap)
        both = patch & slide
        thr = meta.threshold
        labels = mosaic.labels
        corr = float(np.corrcoef(smap[both], fmap[both])[0, 1]) if both.sum() > 2 and np.std(fmap[both]) > 0 else float("nan")
        # the pixels themselves, tile by tile at the same grid position (model-free resampling check)
        sg, fg = root["inputs"][s.input_id], root["inputs"][f.input_id]
        sidx = {(int(r), int(c)): i for i, (r, c) in enumerate(s.coords)}
        pairs = [(sidx[(int(r), int(c))], i) for i, (r, c) in enumerate(f.coords) if (int(r), int(c)) in sidx]
        if pairs:
            st = np.asarray(sg["tiles"].get_orthogonal_selection(([a for a, _ in pairs],)), np.float32)
            ft = np.asarray(fg["tiles"].get_orthogonal_selection(([b for _, b in pairs],)), np.float32)
            pixel_mae = float(np.abs(st - ft).mean())
            pixel_corr = float(np.corrcoef(st.ravel(), ft.ravel())[0, 1])
        else:
            pixel_mae = pixel_corr = float("nan")
        rows.append({
            "patient": d.name, "mpp": mpp, "grid": list(shape), "patches": int(patch.sum()),
            "kept": float(both.sum() / patch.sum()), "extra": float((slide & ~patch).sum() / patch.sum()),
            "idc_folder": float((fmap[patch] >= thr).mean()), "idc_slide": float((smap[slide] >= thr).mean()) if slide.any() else float("nan"),
            "label_idc_folder": float((labels[patch] == 1).mean()),
            "label_idc_slide": float((labels[slide] == 1).sum() / max(1, slide.sum())),
            "corr": corr, "max_abs_prob_diff": float(np.nanmax(np.abs(smap[both] - fmap[both]))) if both.any() else float("nan"),
            "pixel_mae": pixel_mae, "pixel_corr": pixel_corr,
            "small_patches": mosaic.small, "build_s": round(build_s, 1),
            # where the plan's tissue view came from: a pyramid level, or the slide's thumbnail (tiling._overview)
            "view": (sg.attrs.get("extra") or {}).get("view_source", ""),
            # how the tiles were decoded (a level read at 2x or more is scaled in the DCT with --decode fast)
            "decode_path": (sg.attrs.get("extra") or {}).get("decode_path", ""),
            "jpeg": f"Q{quality} {_chroma(subsampling)}",
        })
    return rows


def _chroma(subsampling: tuple[int, int]) -> str:
    return {(1, 1): "4:4:4", (2, 1): "4:2:2", (2, 2): "4:2:0"}.get(tuple(subsampling), f"{subsampling}")


def passes(r: dict) -> dict[str, bool]:
    corr_ok = (r["corr"] >= BARS["corr"]) or (not np.isfinite(r["corr"]) and r["max_abs_prob_diff"] < 0.01)
    return {"kept": r["kept"] >= BARS["kept"], "extra": r["extra"] <= BARS["extra"],
            "idc": abs(r["idc_slide"] - r["idc_folder"]) <= BARS["idc_diff"], "corr": bool(corr_ok)}


def markdown(rows: list[dict], command: str, model: str, note: str = "") -> str:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = [f"# Real tissue through the slide path ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
           f"Machine: {platform.node()}, {cpu}, {os.cpu_count()} cores (shared with other jobs while measured), "
           f"Python {platform.python_version()}.", f"Command: `{command}`", f"Model: `{model}` {note}".rstrip(), "",
           f"Bars: kept >= {BARS['kept']:.0%} of the patient's patches, extra <= {BARS['extra']:.0%}, "
           f"|IDC fraction slide - folder| <= {BARS['idc_diff']}, probability correlation >= {BARS['corr']} "
           "(where every probability is the same, the largest difference < 0.01 instead).", "",
           "IDC fraction = tiles with probability >= the model's threshold; label IDC = share of class-1 patches "
           "among the folder's patches / among the slide's kept tiles.", "",
           "| patient | µm/px | grid | patches | kept | extra | IDC folder | IDC slide | diff | label IDC folder | "
           "label IDC slide | corr | max abs diff | pixel MAE | <50 px | view | JPEG, decode | pass |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = passes(r)
        out.append(f"| {r['patient']} | {r['mpp']:g} | {r['grid'][0]}x{r['grid'][1]} | {r['patches']} | {r['kept']:.3f} | "
                   f"{r['extra']:.3f} | {r['idc_folder']:.3f} | {r['idc_slide']:.3f} | "
                   f"{abs(r['idc_slide'] - r['idc_folder']):.3f} | {r['label_idc_folder']:.3f} | "
                   f"{r['label_idc_slide']:.3f} | {r['corr']:.4f} | {r['max_abs_prob_diff']:.3f} | {r['pixel_mae']:.2f} | "
                   f"{r['small_patches']} | {r.get('view', '')} | "
                   f"{r.get('jpeg', 'Q98 4:4:4')}, {r.get('decode_path', '') or 'direct jpeg'} | "
                   f"{'yes' if all(ok.values()) else 'NO: ' + ', '.join(k for k, v in ok.items() if not v)} |")
    n = sum(r["patches"] for r in rows)
    kept = sum(r["kept"] * r["patches"] for r in rows) / n
    out += ["", f"All patients: {n} patches, {kept:.4f} kept; "
            f"{sum(all(passes(r).values()) for r in rows)} of {len(rows)} rows pass every bar."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="Folder of patient folders (Kaggle layout).")
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--mpp", type=float, default=1.0)
    ap.add_argument("--patients", nargs="*", default=None, help="Patient ids (default: every patient).")
    ap.add_argument("--fine", nargs="*", default=[], help="Patients also rebuilt at --fine-mpp.")
    ap.add_argument("--fine-mpp", type=float, default=0.25)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--reuse-slides", action="store_true", help="Use slides already built in WORK (same --mpp).")
    ap.add_argument("--chroma", choices=["444", "420"], default="444",
                    help="JPEG chroma subsampling of the rebuilt slides (420: as most scanners write; at --mpp 0.5 the "
                         "model's 4 µm/px is then read from the 2 µm/px level, at 1/2 in the DCT with --decode fast)")
    ap.add_argument("--quality", type=int, default=None, help="JPEG quality of the rebuilt slides (default 98)")
    ap.add_argument("--decode", choices=["fast", "exact", "reader"], default="fast", help="tiling's --decode")
    ap.add_argument("--results", type=Path, default=None, help="Markdown file to write.")
    ap.add_argument("--model-note", default="", help="How the model was made (goes into the markdown).")
    ap.add_argument("--from-json", type=Path, default=None, help="Only re-render the markdown from a real_tissue.json.")
    a = ap.parse_args(argv)
    from cancernet_batch.patches import find_patient_folders

    if a.from_json:
        rows = json.loads(a.from_json.read_text())
        text = markdown(rows, "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
                        str(a.model), a.model_note)
        if a.results:
            from cancernet_batch.atomic import write_text

            write_text(a.results, text)
        print(text)
        return 0
    dirs = find_patient_folders(a.data)
    if a.patients:
        dirs = [d for d in dirs if d.name in set(a.patients)]
    jpeg = dict(subsampling=(2, 2) if a.chroma == "420" else (1, 1), quality=a.quality, decode=a.decode)
    rows = measure(dirs, a.work, a.model, a.mpp, workers=a.workers, reuse=a.reuse_slides, **jpeg)
    if a.fine:
        rows += measure([d for d in find_patient_folders(a.data) if d.name in set(a.fine)], a.work, a.model,
                        a.fine_mpp, workers=a.workers, reuse=a.reuse_slides, **jpeg)
    (a.work / "real_tissue.json").write_text(json.dumps(rows, indent=1))
    text = markdown(rows, "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]), str(a.model),
                    a.model_note)
    if a.results:
        from cancernet_batch.atomic import write_text

        write_text(a.results, text)
    print(text)
    return 0 if all(all(passes(r).values()) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
