"""A real Azure Blob Storage server for tests: Azurite, Microsoft's own emulator of the Blob service (Node.js, from
the npm registry), on 127.0.0.1 in memory. adlfs reaches it over HTTP with the emulator's well-known development
account, exactly as it reaches ``<account>.blob.core.windows.net``: no client call is mocked.

Azurite is not a Python package, so the first test that needs it installs it with the machine's npm into
``.azurite/`` at the repository's root (git-ignored; about 190 MB, 15-30 s once). Without Node.js and npm the tests
that need it are skipped, saying why; CI's machines have both."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

VERSION = "3.35.0"
ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / ".azurite"

ACCOUNT = "devstoreaccount1"
# The emulator's published development key (the same in every Azurite): not a secret, but the tests check that no
# message ever shows it, as they would a real one.
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_binary(install: bool = True) -> str | None:
    """``azurite-blob``: ``$AZURITE_BLOB``, else ``.azurite/`` (installed there with npm when missing and
    ``install``), else on PATH; None when there is none and npm cannot install it."""
    if os.environ.get("AZURITE_BLOB"):
        return os.environ["AZURITE_BLOB"]
    here = HOME / "node_modules" / ".bin" / "azurite-blob"
    if here.exists():
        return str(here)
    npm = shutil.which("npm")
    if install and npm and shutil.which("node"):
        import fcntl

        HOME.mkdir(exist_ok=True)
        with open(HOME / ".install.lock", "w") as lock:  # the test processes (pytest-xdist): one installs, the
            fcntl.flock(lock, fcntl.LOCK_EX)              # others wait for it and find it there
            if here.exists():
                return str(here)
            done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(HOME),
                                   f"azurite@{VERSION}"], capture_output=True, text=True, timeout=600)
        if done.returncode == 0 and here.exists():
            return str(here)
    return shutil.which("azurite-blob")


class Azurite:
    """``azurite-blob`` on a free port of 127.0.0.1, in memory; :meth:`options` are adlfs's storage options."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self, timeout: float = 60.0) -> "Azurite":
        binary = azurite_binary()
        if binary is None:
            raise RuntimeError("azurite-blob is not installed and npm cannot install it")
        self.proc = subprocess.Popen([binary, "--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence",
                                      "--disableTelemetry", "--skipApiVersionCheck", "--loose"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            m = re.search(r"listens on (http://127\.0\.0\.1:\d+)", line)
            if m:
                self.endpoint = m.group(1)
                # keep reading its log so its pipe never fills (a full pipe would stall the server)
                import threading

                threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
                return self
        self.stop()
        raise RuntimeError("Azurite did not start: " + "".join(seen)[-500:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def connection_string(self, key: str = KEY) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};"
                f"BlobEndpoint={self.endpoint}/{ACCOUNT};")

    def options(self, key: str = KEY) -> dict:
        return {"connection_string": self.connection_string(key)}

    def fs(self, key: str = KEY):
        import adlfs

        return adlfs.AzureBlobFileSystem(skip_instance_cache=True, **self.options(key))
