"""Benchmark: a whole run with inputs and ``--out`` on S3, both on one s3rver vs the inputs on one s3rver and the
run folder on a second (does the one server's queue make the difference?).

    python benchmarks/s3_split_servers.py [--work DIR] [--repeat 4] [--profile]

Uses the inputs ``benchmarks/s3_inputs.py --work DIR`` made there (``s0.svs``, ``s0.tiff``, ``s1.svs``, ``s1.tiff``
and ``model/``) and the IDC patients 9175, 9259, 8957, 9022 of ``../shared/data/idc``; one local Dask cluster of 2
worker processes x 2 threads; modes alternate, the first pair is a warm-up. Prints each run's wall time and
patches/s with the load average. ``--profile``: the client's cProfile of the last run (functions of
``cancernet_batch``, by cumulative time). Needs s3rver (see ``S3rverProcess`` in ``s3_inputs.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="the --work folder of benchmarks/s3_inputs.py")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    import cProfile
    import pstats

    from s3_inputs import S3rverProcess, upload_run_inputs

    from cancernet_batch.cluster import ClusterConfig, dask_client
    from cancernet_batch.config import PredictConfig, TileConfig
    from cancernet_batch.runfolder import Run
    from cancernet_batch.stages.report import ReportConfig
    from cancernet_batch.stages.run import run_pipeline

    work = Path(args.work)
    files = [work / n for n in ("s0.svs", "s0.tiff", "s1.svs", "s1.tiff")]
    idc = HERE.parent.parent / "shared" / "data" / "idc"
    patients = [idc / p for p in ("9175", "9259", "8957", "9022")]
    model = work / "model"
    cluster = ClusterConfig(workers=2, threads_per_worker=2, dashboard=False)
    pcfg = PredictConfig(model_dir=str(model), engine="onnx", batch_size=256, cluster=cluster)
    tcfg = TileConfig(target_mpp=4.0, decode="fast")
    prof = None
    with S3rverProcess() as a, S3rverProcess() as b, dask_client(cluster) as client:
        for srv in (a, b):
            srv.create_bucket("bench-runs")
        upload_run_inputs(a.fs(), files, patients)
        for rep in range(args.repeat):
            for mode, out in (("one server", a), ("two servers", b)):
                run = Run.of(f"s3://bench-runs/out/{mode.replace(' ', '-')}-{rep}", out.options(),
                             input_options=a.options())
                prof = cProfile.Profile() if args.profile else None
                t0 = time.perf_counter()
                if prof:
                    prof.enable()
                s = run_pipeline(["s3://bench-runs/in/"], run, tcfg, pcfg, ReportConfig(model_dir=str(model)),
                                 client=client)
                if prof:
                    prof.disable()
                wall = time.perf_counter() - t0
                print(f"rep {rep}{' (warm-up)' if rep == 0 else ''} {mode}: wall {wall:.2f} s, "
                      f"{s.predict.tiles_scored / wall:.0f} patches/s, failed {len(s.failed_inputs)}, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats("cancernet_batch", 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
