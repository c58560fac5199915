"""Imported by the local workers' forkserver for a run on S3 (``cluster.start_forkserver``): reads botocore's data
for an S3 client into this process's shared aiobotocore session (:func:`cancernet_batch.runfolder.warm_s3_session`),
so every worker forked from it, and the preflight child each forks, starts with it read."""

from .runfolder import warm_s3_session

try:
    warm_s3_session()
except Exception:  # noqa: BLE001 - a worker then reads the data itself at its first request, as before
    pass
