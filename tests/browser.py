"""Headless Chromium driven over the DevTools protocol, for the dashboard test.

Talking CDP over a websocket needs only the `chromium` package and the `websockets` library:
no chromedriver, no Selenium, no browser download. The test skips when no Chromium is found.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

# Flags Chromium needs to run headless as root in a container, quietly and offline.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-port=0")


def find_chromium() -> str | None:
    """The Chromium (or Chrome) binary on this machine, if any."""
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """One headless browser with one page; `close()` ends the process."""

    def __init__(self, binary: str, profile: Path, width: int = 1280, height: int = 900):
        profile.mkdir(parents=True, exist_ok=True)
        self._log = open(profile / "chromium.log", "wb")
        self._process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
             "about:blank"], stdout=self._log, stderr=subprocess.STDOUT)
        self._ids = itertools.count(1)
        self._stack = ExitStack()
        try:
            self._socket = self._stack.enter_context(
                connect(self._browser_url(profile), max_size=None, open_timeout=30))
            target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self._session = self.send("Target.attachToTarget",
                                      {"targetId": target, "flatten": True})["sessionId"]
            self.send("Emulation.setDeviceMetricsOverride", {
                "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                page=True)
        except BaseException:
            self.close()
            raise

    def _browser_url(self, profile: Path, timeout: float = 30) -> str:
        """The browser's websocket, from the DevToolsActivePort file Chromium writes."""
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self._process.returncode}; "
                                   f"see {profile / 'chromium.log'}")
            lines = port_file.read_text().split() if port_file.exists() else []
            if len(lines) == 2:
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            time.sleep(0.05)
        raise RuntimeError("chromium did not open its DevTools port")

    def send(self, method: str, params: dict | None = None, page: bool = False,
             timeout: float = 30) -> dict:
        """Call a DevTools method (on the page when `page`) and return its result."""
        message: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params or {}}
        if page:
            message["sessionId"] = self._session
        self._socket.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self._socket.recv(timeout=max(0.01, deadline - time.monotonic())))
            if reply.get("id") == message["id"]:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str, timeout: float = 30) -> None:
        """Navigate the page to `url` and wait until it has loaded."""
        self.send("Page.navigate", {"url": url}, page=True)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'",
                      timeout)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, page=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.1)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"}, page=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        socket = getattr(self, "_socket", None)
        if socket is not None:
            try:
                self.send("Browser.close", timeout=5)
            except Exception:
                pass  # the process is ended below either way
        self._stack.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._log.close()
