"""JPEG decoding on the GPU against this machine's CPU cores (issue 17's GPU part): would it pay as a tiling option?

    python benchmarks/gpu_decode.py SLIDE... [--target-mpp 4.0] [--seconds 3] [--batch 256] [--processes N] [--json OUT]

The compressed tiles that ``cancernet tile`` decodes for each slide (its plan at ``--target-mpp``: the level it reads
and the stored tiles its tissue tiles touch, as ``cancernet bench``'s decode roof takes them), as whole JPEG streams
(the page's shared tables spliced in, as the direct decoder decodes them), are decoded for ``--seconds`` each way:

- **cpu**: libjpeg-turbo (simplejpeg, tiling's own decoder) in ``--processes`` processes (default: every core), each
  with its share of the streams, round after round;
- **gpu**: nvJPEG through ``torchvision.io.decode_jpeg(..., device="cuda")`` in batches of ``--batch`` streams, the
  pixels left on the GPU (``gpu``) and copied back to the host (``gpu+copy``: what tiling on the CPU would then get);
  and through nvImageCodec (``nvimgcodec``) where it is installed.

Prints tiles and megapixels per second of each, each GPU way's ratio to the CPU cores' (issue 17: worth a tiling option
at 3 or more), and how far the GPU's pixels are from libjpeg-turbo's on a sample (mean and largest absolute difference,
/255). A GPU way that cannot run here (no CUDA device, torchvision or nvImageCodec missing) is a row that says why.
The JSON (``--json``) holds the same with the machine (its GPUs from ``nvidia-smi``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

SAMPLE = 64
"""Streams whose pixels are compared between a GPU way and libjpeg-turbo."""


def streams(paths: list[str], target_mpp: float) -> tuple[list[bytes], float]:
    """The JPEG streams tiling decodes for ``paths`` at ``target_mpp``, and the mean pixels of a decoded tile."""
    from cancernet_batch.slides import open_slide
    from cancernet_batch.tiling import TileConfig, plan_slide

    cfg = TileConfig(target_mpp=target_mpp)
    out: list[bytes] = []
    px = 0
    for path in paths:
        with open_slide(path) as reader:
            plan = plan_slide(path, cfg, reader=reader)
            level = reader.direct_level(plan.level)
            if level is None or not level.jpeg:
                raise SystemExit(f"{path}: level {plan.level} is not a tiled JPEG page the direct decoder reads")
            idx = level.needed(plan.coords, plan.tile_px_level)
            mine = [s for s in (level.jpeg_stream(int(i)) for i in idx) if s]
            out += mine
            px += len(mine) * level.tw * level.th
    return out, px / max(1, len(out))


def _cpu_job(job: tuple[list[bytes], float, float]) -> int:
    """Decode ``streams`` round after round from ``start`` (a shared clock) for ``seconds``: streams decoded."""
    import simplejpeg

    data, start, seconds = job
    while time.time() < start:
        time.sleep(0.001)
    n, end = 0, start + seconds
    while time.time() < end:
        for s in data:
            simplejpeg.decode_jpeg(s, "RGB")
            n += 1
    return n


def cpu_rate(data: list[bytes], processes: int, seconds: float) -> dict:
    """Streams per second decoded by libjpeg-turbo in ``processes`` processes, all started before the clock."""
    share = [data[i::processes] for i in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_cpu_job, [(s[:1], 0.0, 0.0) for s in share]))  # started, simplejpeg imported
        start = time.time() + 0.2
        counts = list(pool.map(_cpu_job, [(s, start, seconds) for s in share]))
    return {"way": "cpu", "decoder": "libjpeg-turbo (simplejpeg)", "processes": processes,
            "streams": int(sum(counts)), "seconds": seconds, "tiles_per_second": sum(counts) / seconds}


def _reference(data: list[bytes]) -> list[np.ndarray]:
    import simplejpeg

    return [simplejpeg.decode_jpeg(s, "RGB") for s in data[:SAMPLE]]


def _difference(got: list[np.ndarray], want: list[np.ndarray]) -> dict:
    d = [np.abs(g.astype(np.int16) - w.astype(np.int16)) for g, w in zip(got, want)]
    return {"mean_abs_diff": float(np.mean([x.mean() for x in d])), "max_abs_diff": int(max(x.max() for x in d))}


def torchvision_rates(data: list[bytes], batch: int, seconds: float) -> list[dict]:
    """nvJPEG through torchvision, the pixels kept on the GPU and copied back; or one row saying why not."""
    rows = [{"way": w, "decoder": "nvJPEG (torchvision.io.decode_jpeg)"} for w in ("gpu", "gpu+copy")]
    try:
        import torch
        import torchvision
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as exc:
        return [{**r, "unavailable": f"torchvision is not installed ({exc})"} for r in rows]
    if not torch.cuda.is_available():
        return [{**r, "unavailable": f"no CUDA device (torch {torch.__version__})"} for r in rows]
    tensors = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in data]
    batches = [tensors[i:i + batch] for i in range(0, len(tensors), batch)]

    def decode(part, copy: bool):
        out = decode_jpeg(part, mode=ImageReadMode.RGB, device="cuda")
        return [t.cpu() for t in out] if copy else out

    for row, copy in zip(rows, (False, True)):
        decode(batches[0], copy)
        torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for part in batches:
                decode(part, copy)
                n += len(part)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        row.update(streams=n, seconds=dt, tiles_per_second=n / dt, batch=batch, device=torch.cuda.get_device_name(),
                   versions={"torch": torch.__version__, "torchvision": torchvision.__version__})
    got = [t.permute(1, 2, 0).cpu().numpy() for t in decode_jpeg(tensors[:SAMPLE], mode=ImageReadMode.RGB,
                                                                   device="cuda")]
    diff = _difference(got, _reference(data))
    return [{**r, **diff} for r in rows]


def nvimgcodec_rate(data: list[bytes], batch: int, seconds: float) -> dict:
    """nvImageCodec's batched decode (pixels on the GPU), or a row saying why not."""
    row = {"way": "nvimgcodec", "decoder": "nvImageCodec"}
    try:
        from nvidia import nvimgcodec
    except ImportError as exc:
        return {**row, "unavailable": f"nvImageCodec is not installed ({exc})"}
    try:
        dec = nvimgcodec.Decoder()
        batches = [data[i:i + batch] for i in range(0, len(data), batch)]
        dec.decode(batches[0])
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for part in batches:
                out = dec.decode(part)
                n += len(part)
        np.asarray(out[-1].cpu())  # the last batch finished
        dt = time.perf_counter() - t0
        got = [np.asarray(im.cpu()) for im in dec.decode(data[:SAMPLE])]
    except Exception as exc:  # noqa: BLE001 - its own errors, reported in the row
        return {**row, "unavailable": f"{type(exc).__name__}: {exc}"}
    return {**row, "streams": n, "seconds": dt, "tiles_per_second": n / dt, "batch": batch,
            **_difference([g[..., :3] for g in got], _reference(data))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("slides", nargs="+")
    ap.add_argument("--target-mpp", type=float, default=4.0)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cancernet_batch.machine import machine

    m = machine()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    data, px = streams(a.slides, a.target_mpp)
    if not data:
        raise SystemExit("no compressed tile to decode: the slides have no tissue tiles at this resolution")
    rows = [cpu_rate(data, a.processes, a.seconds), *torchvision_rates(data, a.batch, a.seconds),
            nvimgcodec_rate(data, a.batch, a.seconds)]
    cpu = rows[0]["tiles_per_second"]
    for r in rows:
        if "tiles_per_second" in r:
            r["megapixels_per_second"] = r["tiles_per_second"] * px / 1e6
            r["x_cpu"] = r["tiles_per_second"] / cpu
    print(f"{when}, {m.get('cpu')}, {m.get('cores')} cores, GPUs: {[g.get('name') for g in m.get('gpus') or []]}")
    print(f"{len(data)} JPEG tiles of {len(a.slides)} slides ({px:,.0f} px each on average) at {a.target_mpp:g} µm/px, "
          f"{a.seconds:g} s a way (issue 17: a GPU decoder is worth a tiling option at 3 x the CPU cores or more)\n")
    print("| way | decoder | tiles/s | Mpx/s | x the CPU cores | mean / max abs. diff. from libjpeg-turbo |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "unavailable" in r:
            print(f"| {r['way']} | {r['decoder']} | unavailable: {r['unavailable']} | | | |")
            continue
        diff = f"{r['mean_abs_diff']:.3f} / {r['max_abs_diff']}" if "mean_abs_diff" in r else "(the reference)"
        print(f"| {r['way']} | {r['decoder']} | {r['tiles_per_second']:,.0f} | {r['megapixels_per_second']:,.0f} | "
              f"{r['x_cpu']:.2f} | {diff} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"date": when, "machine": m, "args": vars(a), "tiles": len(data),
                                            "tile_pixels": px, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
