"""Imported by the local cluster's forkserver only (``cluster.FORKSERVER_PRELOAD``): each worker forked from it
forks its slide-preflight child ready to serve (:func:`cancernet_batch.preflight.arm_prefork`)."""

from .preflight import arm_prefork

arm_prefork()
