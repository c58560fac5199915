"""A headless Chromium driven over the DevTools protocol (CDP), for tests of the report page.

Real input events (``Input.dispatchMouseEvent``: moves, clicks, wheel) reach the page as a user's
would. The protocol is spoken over the websocket client of tornado, which ``distributed`` already
brings, so no browser-automation package is needed; the browser is the system's ``chromium``.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    """``with Browser(url) as b: b.eval("1 + 1")``: one headless page on ``url``."""

    def __init__(self, url: str, *, width: int = 1200, height: int = 1600, timeout: float = 60.0):
        self.url, self.width, self.height, self.timeout = url, width, height, timeout
        self._ids = itertools.count(1)

    def __enter__(self) -> "Browser":
        from tornado.ioloop import IOLoop

        self._home = tempfile.mkdtemp(prefix="cdp-")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", f"--user-data-dir={self._home}",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + self.timeout
        port = None
        while port is None:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium gave no DevTools address: {line!r}")
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            port = int(m.group(1)) if m else None
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=self.timeout) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.loop = IOLoop(make_current=False)
        self.ws = self._run(self._connect(page["webSocketDebuggerUrl"]))
        self.send("Page.enable")
        self.send("Page.navigate", url=self.url)
        self.wait_for("document.readyState === 'complete'")
        return self

    async def _connect(self, url: str):
        from tornado.websocket import websocket_connect

        return await websocket_connect(url, max_message_size=256 * 1024 * 1024)

    def _run(self, coro):
        return self.loop.run_sync(lambda: coro, timeout=self.timeout)

    def send(self, method: str, **params) -> dict:
        """One CDP command; its result (events that arrive meanwhile are dropped)."""
        mid = next(self._ids)

        async def call():
            await self.ws.write_message(json.dumps({"id": mid, "method": method, "params": params}))
            while True:
                msg = await self.ws.read_message()
                if msg is None:
                    raise RuntimeError("chromium closed the DevTools connection")
                data = json.loads(msg)
                if data.get("id") == mid:
                    if "error" in data:
                        raise RuntimeError(f"{method}: {data['error']}")
                    return data.get("result", {})

        return self._run(call())

    def eval(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.eval(f"Boolean({expression})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not true within {self.timeout} s: {expression}")
            time.sleep(0.05)

    def mouse(self, kind: str, x: float, y: float, **extra) -> None:
        """``kind``: mouseMoved, mousePressed, mouseReleased or mouseWheel, at page CSS pixels."""
        self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, **extra)

    def click(self, x: float, y: float) -> None:
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y, button="left", clickCount=1)
        self.mouse("mouseReleased", x, y, button="left", clickCount=1)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])

    def __exit__(self, *exc) -> None:
        try:
            self._run(self._close())
        except Exception:  # noqa: BLE001 - the browser goes anyway
            pass
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.loop.close()
        shutil.rmtree(self._home, ignore_errors=True)

    async def _close(self):
        self.ws.close()
