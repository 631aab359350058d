"""Headless Chromium over the DevTools protocol, for tests and screenshots of pages ovseg writes or serves.

``render(url)`` starts Debian's ``chromium`` (``apt-get install -y chromium``; ``.ci/run`` installs it)
with the flags this project's machines need (no sandbox as root, no background networking on a
closed network), opens the page, waits for its load event and network quiet, and returns what
the page logged (console messages, uncaught exceptions, failed loads), the text of its
headings, its images that did not decode, its full height, and optionally a full-page PNG.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--remote-debugging-port=0", "--remote-allow-origins=*")
START_SECONDS = 60.0  # chromium start-up on a loaded 2-core machine


@dataclass
class Rendered:
    """What a page did in headless Chromium."""

    console: list[str] = field(default_factory=list)  # "level: text" of every console message
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, failed loads
    headings: list[str] = field(default_factory=list)  # text of every h1-h4, in page order
    broken_images: int = 0  # <img> elements that did not decode
    images: int = 0
    height: int = 0  # full page height in CSS pixels
    text: str = ""  # document.body.innerText


def available() -> bool:
    return shutil.which("chromium") is not None


class _Session:
    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=START_SECONDS)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, timeout: float = 60.0, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        end = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic())))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60.0) -> None:
        if any(e.get("method") == method for e in self.events):
            return
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            msg = json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic())))
            self.events.append(msg)
            if msg.get("method") == method:
                return
        raise TimeoutError(f"no {method} within {timeout} s")

    def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=max(0.05, end - time.monotonic()))))
            except TimeoutError:
                return


def _evaluate(s: _Session, expression: str) -> Any:
    return s.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def render(url: str, width: int = 1400, height: int = 1000, screenshot: Path | None = None, settle: float = 1.0,
           wait_js: str | None = None, timeout: float = 90.0) -> Rendered:
    """Open ``url`` in headless Chromium and report what it did (see the module docstring).

    Args:
        url: page address (``file://`` or ``http://127.0.0.1:...``).
        width, height: viewport in CSS pixels (the screenshot covers the full page height).
        screenshot: write a full-page PNG there.
        settle: seconds to keep listening after the load event (late console messages, script-built pages).
        wait_js: a JavaScript expression polled until true before the checks (pages built by scripts).
        timeout: seconds for the whole visit.
    """
    profile = Path(tempfile.mkdtemp(prefix="ovseg-chromium-"))
    proc = subprocess.Popen(["chromium", *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        end = time.monotonic() + START_SECONDS
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"chromium did not start (exit code {proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:  # noqa: S310 - loopback
            page = next(t for t in json.load(r) if t["type"] == "page")
        s = _Session(page["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log", "Network"):
            s.call(f"{domain}.enable")
        s.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        s.events.clear()
        s.call("Page.navigate", url=url)
        s.wait_for("Page.loadEventFired", timeout)
        if wait_js:
            end = time.monotonic() + timeout
            while not _evaluate(s, wait_js):
                if time.monotonic() > end:
                    raise TimeoutError(f"{wait_js!r} not true within {timeout} s")
                s.drain(0.5)
        s.drain(settle)
        out = Rendered()
        out.headings = _evaluate(s, "[...document.querySelectorAll('h1,h2,h3,h4')].map(h => h.innerText.trim())") or []
        out.images = _evaluate(s, "document.images.length") or 0
        out.broken_images = _evaluate(
            s, "[...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).length") or 0
        out.height = int(_evaluate(s, "Math.ceil(document.documentElement.scrollHeight)") or height)
        out.text = _evaluate(s, "document.body ? document.body.innerText : ''") or ""
        for e in s.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                out.console.append(f"{p.get('type')}: {text}")
                if p.get("type") in ("error", "assert"):
                    out.errors.append(f"console.{p.get('type')}: {text}")
            elif e.get("method") == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.errors.append(f"uncaught: {d.get('exception', {}).get('description') or d.get('text')}")
            elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
            elif e.get("method") == "Network.loadingFailed" and not p.get("canceled"):
                out.errors.append(f"load failed: {p.get('errorText')} ({p.get('type')})")
        if screenshot is not None:
            s.call("Emulation.setDeviceMetricsOverride", width=width, height=out.height, deviceScaleFactor=1,
                   mobile=False)
            s.drain(0.3)
            shot = s.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
        s.ws.close()
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
