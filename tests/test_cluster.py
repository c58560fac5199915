"""Clusters: the local one listens on loopback only; a remote scheduler over TLS with certificates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cancernet_batch.cluster import ClusterConfig, dask_client, security, storage_drivers
from cancernet_batch.errors import ConfigError

ENV = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}


def _listening(pids: set[int]) -> list[str]:
    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            out.append(c.laddr.ip)
    return out


def test_local_cluster_listens_on_loopback_only():
    with dask_client(ClusterConfig(workers=2, dashboard=True)) as client:
        info = client.scheduler_info()
        assert info["address"].startswith("tcp://127.0.0.1:")
        assert all(w.startswith("tcp://127.0.0.1:") for w in info["workers"])
        assert "127.0.0.1" in client.dashboard_link
        me = psutil.Process()
        pids = {me.pid, *(p.pid for p in me.children(recursive=True))}
        ips = _listening(pids)
    assert ips, "expected the scheduler, workers and dashboard to listen somewhere"
    assert set(ips) <= {"127.0.0.1"}, ips


def test_failed_task_is_not_logged_by_the_workers(tmp_path, capfd):
    """A task that raises comes back to the client, which reports it (one line, a failures.csv row):
    the worker processes must not also print "Compute Failed" and a traceback on the terminal."""
    missing = str(tmp_path / "missing.svs")
    with dask_client(ClusterConfig(workers=1, dashboard=False)) as client:
        with pytest.raises(FileNotFoundError):
            client.submit(os.stat, missing, pure=False).result()
    err = capfd.readouterr().err
    assert "Compute Failed" not in err and "Traceback" not in err and missing not in err, err


def test_partial_tls_settings_refused(tmp_path):
    with pytest.raises(ConfigError, match="needs all of"):
        security(ClusterConfig(scheduler="tls://127.0.0.1:1", tls_ca_file=str(tmp_path / "ca.pem")))
    with pytest.raises(ConfigError, match="not found"):
        security(ClusterConfig(scheduler="tls://127.0.0.1:1", tls_ca_file="a", tls_cert="b", tls_key="c"))


def test_unreachable_scheduler_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cancernet_batch.cli", "predict", str(tmp_path), "--model", str(tmp_path),
                        "--scheduler", "tcp://127.0.0.1:9"], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A throwaway CA and one certificate for 127.0.0.1, made with the openssl command."""
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=cancernet-test-ca", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=127.0.0.1",
             cwd=d)
    _openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "node.pem",
             "-days", "1", "-extfile", "ext.cnf", cwd=d)
    return d


def test_tls_scheduler_end_to_end(certs, tmp_path, tiny_model_dir):
    """`cancernet predict --scheduler tls://...` with certificates scores a run on a TLS-only cluster."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_score import make_run, reference, stored_probs  # noqa: E402 - shared helpers

    import numpy as np

    model_dir = tiny_model_dir
    run = tmp_path / "run"
    tiles = make_run(run, {"t": 200}, chunk=100)
    tls = ["--tls-ca-file", str(certs / "ca.pem"), "--tls-cert", str(certs / "node.pem"), "--tls-key", str(certs / "node.key")]
    bindir = Path(sys.executable).parent
    sched_file = tmp_path / "sched.json"
    sched = subprocess.Popen([str(bindir / "dask"), "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0",
                              "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched_file), *tls],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("tls://127.0.0.1:")
        worker = subprocess.Popen([str(bindir / "dask"), "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                                   "--no-dashboard", *tls], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # without certificates the client cannot talk to it: a one-line error, not a hang or traceback
        bad = subprocess.run([sys.executable, "-m", "cancernet_batch.cli", "predict", str(run), "--model", str(model_dir),
                              "--scheduler", address], capture_output=True, text=True, env=ENV, timeout=120)
        assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
        ok = subprocess.run([sys.executable, "-m", "cancernet_batch.cli", "predict", str(run), "--model", str(model_dir),
                             "--scheduler", address, "--engine", "onnx", *tls], capture_output=True, text=True, env=ENV,
                            timeout=300)
        assert ok.returncode == 0, ok.stderr
    finally:
        for p in (worker, sched):
            if p is not None:
                p.terminate()
                p.wait(timeout=30)
    (gid, t), = tiles.items()
    np.testing.assert_allclose(stored_probs(run)[gid], reference(model_dir, t), atol=1e-5)


def _worker_env() -> dict:
    return {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "OMP_NUM_THREADS")}


def test_local_workers_get_fast_malloc_settings_and_a_core_share():
    before = _worker_env()
    with dask_client(ClusterConfig(workers=2, threads_per_worker=1, dashboard=False)) as client:
        envs = client.run(_worker_env)
    assert len(envs) == 2
    cores = len(os.sched_getaffinity(0))
    for env in envs.values():
        # not Dask's 65,536-byte trim threshold, under which every large buffer is mapped and zeroed afresh
        assert env["MALLOC_TRIM_THRESHOLD_"] == str(128 * 2**20) and env["MALLOC_MMAP_THRESHOLD_"] == str(32 * 2**20)
        assert env["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert _worker_env() == before  # this process keeps its own environment


def test_the_clients_run_modules_are_imported_while_a_local_cluster_starts():
    """A run's client needs zarr (0.25 s of import) as soon as its cluster is up: a local cluster's start, which
    leaves the process waiting for its workers, imports it meanwhile (cluster.CLIENT_PRELOAD, in a thread)."""
    code = ("import sys, time\n"
            "from cancernet_batch.cluster import CLIENT_PRELOAD, ClusterConfig, dask_client\n"
            "assert not [m for m in CLIENT_PRELOAD if m in sys.modules], 'imported before the cluster'\n"
            "with dask_client(ClusterConfig(workers=1, dashboard=False)) as c:\n"
            "    t = time.monotonic()\n"
            "    while [m for m in CLIENT_PRELOAD if m not in sys.modules] and time.monotonic() - t < 30:\n"
            "        time.sleep(0.05)\n"
            "    print(sorted(m for m in CLIENT_PRELOAD if m in sys.modules) == sorted(CLIENT_PRELOAD))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "True", r.stdout


_FORKED_SERVER = """
import json, os, sys
from cancernet_batch.cluster import ClusterConfig, dask_client, start_forkserver
import multiprocessing.forkserver as forkserver
import psutil
held = open(sys.argv[1], "w")  # a file the command holds open, as it holds its run folder's lock
import logging
logging.getLogger("cancernet_batch").addHandler(logging.StreamHandler())  # as the CLI's logging does
cfg = ClusterConfig(workers=2, threads_per_worker=1, dashboard=False)
assert start_forkserver(cfg)
server = psutil.Process(forkserver._forkserver._forkserver_pid)

def probe():
    import gc, logging, os, psutil
    return {"ppid": os.getppid(), "omp": os.environ.get("OMP_NUM_THREADS"), "frozen": gc.get_freeze_count(),
            "files": [f.path for f in psutil.Process().open_files()],
            "handlers": len(logging.getLogger("cancernet_batch").handlers)}

with dask_client(cfg) as client:
    workers = list(client.run(probe).values())
import gc
print(json.dumps({"me": os.getpid(), "cmdline": psutil.Process().cmdline(), "server": server.pid, "frozen": gc.get_freeze_count(),
                  "server_parent": server.ppid(), "server_cmdline": server.cmdline(), "workers": workers}))
"""


@pytest.mark.parametrize("spawned", [False, True], ids=["forked from the command", "spawned"])
def test_the_workers_fork_server_is_forked_from_the_command_once_it_has_imported_the_stack(tmp_path, spawned):
    """A command that starts a local cluster before it has imported numpy (as ``cancernet tile`` and ``run`` do)
    makes itself the workers' fork server: it imports the stack, then forks; the workers fork from that child
    (no second interpreter importing the same stack beside it). Each worker starts as from a fresh server: the
    workers' thread settings, the package's logger without the command's handlers, and none of the command's
    open files (its run folder's lock stays with it alone). ``CANCERNET_SPAWNED_FORKSERVER=1``: started as
    multiprocessing does, the same for the workers."""
    env = {**ENV, "CANCERNET_SPAWNED_FORKSERVER": "1" if spawned else "0"}
    held = tmp_path / "held.lock"
    r = subprocess.run([sys.executable, "-c", _FORKED_SERVER, str(held)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["server_parent"] == d["me"]
    if spawned:
        assert "from multiprocessing.forkserver import main" in " ".join(d["server_cmdline"])
    else:
        assert d["server_cmdline"] == d["cmdline"]  # a fork of the command, no interpreter of its own
    assert len(d["workers"]) == 2
    for w in d["workers"]:
        assert w["ppid"] == d["server"] and w["omp"] == "1" and w["handlers"] == 0, w  # 2 cores, 2 workers: 1 each
        assert str(held) not in w["files"], w
        # forked: the stack's objects, imported before the fork, are frozen (out of every collection's walk), in the
        # command and in each worker; a spawned server freezes nothing
        assert (w["frozen"] > 50_000) if not spawned else w["frozen"] == 0, w
    assert (d["frozen"] > 50_000) if not spawned else d["frozen"] == 0


_CLUSTERS_IN_TURN = """
import json, os
from cancernet_batch.cluster import ClusterConfig, dask_client

before = dict(os.environ)
out = []
for split in (1, None):  # a split cluster (its workers start after the cluster), then an ordinary one
    with dask_client(ClusterConfig(workers=2, threads_per_worker=1, dashboard=False, score_workers=split)) as c:
        out.append({"parents": sorted(set(c.run(os.getppid).values())),
                    "changed": sorted(k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k))})
    out[-1]["after"] = sorted(k for k in set(os.environ) | set(before) if os.environ.get(k) != before.get(k))
print(json.dumps({"me": os.getpid(), "clusters": out}))
"""


def test_clusters_one_after_another_keep_the_environment_and_the_fork_server():
    """Dask's nannies set their workers' variables (malloc, thread counts, PYTHONHASHSEED) and their own
    ``__DASK_PARENT_PID`` in the environment of the process they run in, as they start workers. The split cluster's
    workers start after the cluster does: those variables stayed in the command's process, and every later cluster
    of the process (``cancernet bench`` starts several) saw an environment other than its fork server's and spawned
    its workers, which imported the stack again in their first tasks. Now the process keeps its environment while
    a cluster runs and after it, and the second cluster's workers fork from the same server as the first's."""
    r = subprocess.run([sys.executable, "-c", _CLUSTERS_IN_TURN], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    first, second = d["clusters"]
    for c in (first, second):
        assert c["changed"] == [] and c["after"] == [], c
        assert len(c["parents"]) == 1 and c["parents"][0] != d["me"], c  # one fork server, not the nannies' process
    assert second["parents"] == first["parents"]


def test_a_run_on_object_storage_has_its_storage_driver_imported_once_for_all_local_workers():
    """s3fs (with botocore and aiohttp) costs each process about 0.3 s of CPU to import, and botocore's data for an
    S3 client more: a run whose inputs or run folder are on S3 has the forkserver import it and read that data into
    the process's shared session, so each local worker (and the preflight child it forks) starts with both; a run on
    local disk does not pay for them."""
    assert storage_drivers(["s3://b/in/x.svs", "/data/y.svs", "file:///tmp/run"]) == ("s3fs",)
    assert storage_drivers(["/data/y.svs", "relative/run"]) == ()
    code = ("import sys\n"
            "from cancernet_batch.cluster import ClusterConfig, dask_client, start_forkserver, storage_drivers\n"
            "def has():\n"
            "    import sys\n"
            "    from cancernet_batch import runfolder\n"
            "    from aiobotocore.httpsession import AIOHTTPSession\n"
            "    return ('s3fs' in sys.modules and bool(runfolder._S3_SESSIONS)\n"
            "            and getattr(AIOHTTPSession._build_ssl_contexts, 'shared_by_cancernet', False))\n"
            "cfg = ClusterConfig(workers=1, dashboard=False)\n"
            "assert start_forkserver(cfg, also=storage_drivers(sys.argv[1:]))\n"
            "with dask_client(cfg) as c:\n"
            "    print(list(c.run(has).values()))\n")
    for locations, want in ((["s3://bucket/in/", "s3://bucket/run"], "[True]"), (["/data/in", "/data/run"], "[False]")):
        r = subprocess.run([sys.executable, "-c", code, *locations], capture_output=True, text=True, env=ENV, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip().splitlines()[-1] == want, (locations, r.stdout)


def test_local_workers_run_no_statistical_profiler_unless_the_users_dask_config_asks():
    """Dask's profiler samples every thread's stack each 10 ms (py-spy found it among a worker's largest costs): off
    in the local workers, on where the user's own Dask config turns it on."""
    code = ("from cancernet_batch.cluster import ClusterConfig, dask_client\n"
            "with dask_client(ClusterConfig(workers=1, dashboard=False)) as c:\n"
            "    print(list(c.run(lambda dask_worker: 'profile' in dask_worker.periodic_callbacks).values()))\n")
    for extra, want in (({}, "[False]"), ({"DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "True"}, "[True]")):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**ENV, **extra},
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip().splitlines()[-1] == want, (extra, r.stdout)


def test_the_s3_clients_of_a_process_share_one_ssl_context_per_set_of_tls_settings():
    """aiobotocore loads the CA bundle into a new SSL context for every client (16 CPU ms, for an http:// endpoint
    too); once shared, two clients with the same settings get the same context, and other settings another."""
    from aiobotocore.httpsession import AIOHTTPSession

    from cancernet_batch.runfolder import share_ssl_contexts

    share_ssl_contexts()
    a, b = AIOHTTPSession(verify=True), AIOHTTPSession(verify=True)
    ctx, proxy_ctx = a._build_ssl_contexts(None)
    assert b._build_ssl_contexts(None)[0] is ctx and proxy_ctx is None
    assert ctx.check_hostname and ctx.verify_mode.name == "CERT_REQUIRED"
    off = AIOHTTPSession(verify=False)._build_ssl_contexts(None)[0]
    assert off is not ctx and not off.check_hostname and off.verify_mode.name == "CERT_NONE"
    share_ssl_contexts()  # a second call changes nothing
    assert AIOHTTPSession(verify=True)._build_ssl_contexts(None)[0] is ctx


def test_a_command_on_object_storage_gives_each_local_worker_more_threads():
    """A task on object storage waits through its round trips: a command whose inputs or run folder are there
    starts its local workers with ``REMOTE_THREADS`` threads each (40 small slides behind 20 ms a request: 27.0 s
    with 1 thread, 16.8 s with 2), unless threads or a scheduler are given; on local disk, one thread as before.
    The workers' environment follows (each engine's share of the cores)."""
    from cancernet_batch.cluster import REMOTE_THREADS, for_locations

    base = ClusterConfig(workers=1, dashboard=False)
    assert for_locations(base, ["/data/in", "file:///tmp/run"]) is base
    assert for_locations(base, ["/data/in", "s3://bucket/run"]).threads_per_worker == REMOTE_THREADS == 2
    given = ClusterConfig(workers=1, threads_per_worker=1, dashboard=False)
    assert for_locations(given, ["s3://bucket/in/"]) is given  # --threads-per-worker 1 wins
    remote = ClusterConfig(scheduler="tcp://127.0.0.1:8786")
    assert for_locations(remote, ["s3://bucket/in/"]) is remote  # an existing cluster keeps its shape
    code = ("import os, sys\n"
            "from cancernet_batch.cluster import ClusterConfig, dask_client, for_locations, start_forkserver\n"
            "cfg = for_locations(ClusterConfig(workers=1, dashboard=False), sys.argv[1:])\n"
            "start_forkserver(cfg)\n"
            "with dask_client(cfg) as c:\n"
            "    print(list(c.nthreads().values()), list(c.run(lambda: os.environ['OMP_NUM_THREADS']).values()))\n")
    cores = len(os.sched_getaffinity(0))
    for locations, threads in ((["s3://bucket/in/", "/data/run"], REMOTE_THREADS), (["/data/in", "/data/run"], 1)):
        r = subprocess.run([sys.executable, "-c", code, *locations], capture_output=True, text=True, env=ENV, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip().splitlines()[-1] == f"[{threads}] ['{max(1, cores // threads)}']", (locations, r.stdout)


def test_import_preload_pauses_the_collector_and_skips_a_missing_module(monkeypatch):
    """The fork server's imports run with the cyclic collector off (it walked their million objects again and again)
    and put it back as it was; a module that is not installed is skipped, as multiprocessing's own server does."""
    import gc
    import importlib

    from cancernet_batch.cluster import import_preload

    seen = []
    real = importlib.import_module

    def spy(name, *a, **k):
        seen.append((name, gc.isenabled()))
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", spy)
    assert gc.isenabled()
    import_preload(["json", "cancernet_no_such_module", "colorsys"])
    assert gc.isenabled() and seen == [("json", False), ("cancernet_no_such_module", False), ("colorsys", False)]
    gc.disable()
    try:
        import_preload(["json"])
        assert not gc.isenabled()  # left as it was
    finally:
        gc.enable()
