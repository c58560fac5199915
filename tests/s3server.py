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

    def _app(self, app):
        def wrapped(environ, start_response):
            method, path = environ["REQUEST_METHOD"], unquote(environ.get("PATH_INFO", ""))
            rng = environ.get("HTTP_RANGE")
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

    def gets(self, key_part: str = "") -> list[Request]:
        """The GET requests of objects whose path contains ``key_part`` (listings excluded)."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and key_part in r.path and r.path.count("/") >= 2
                    and not r.path.endswith("/")]
