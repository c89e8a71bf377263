"""Shared test helpers: run the real `ablate` command line in a subprocess."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"  # screenshots of browser tests, kept for people to look at


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self):
        return json.loads(self.out)


def ablate(*args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path | None = None) -> Result:
    """`ablate ARGS` as a user runs it, with the environment's ABLATE_* overrides applied."""
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env={**os.environ, **(env or {})})
    return Result(proc.returncode, proc.stdout, proc.stderr)


def wait_for(predicate, timeout: float = 120.0, every: float = 0.2) -> bool:
    """Poll until `predicate()` holds or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def alias_bomb(levels: int = 9, fanout: int = 10) -> str:
    """A grid in a few hundred bytes of YAML whose `seeds` stand for `fanout ** levels` values through
    aliases (nine levels of ten: 10^9 values in about 600 bytes)."""
    chain = ["&a0 [0]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * fanout)}]" for i in range(1, levels + 1)]
    return ("name: bomb\ndataset: synthetic\ndepths: [8]\nblock: basic\nvariants: [original]\n"
            f"seeds: [{', '.join(chain)}]\n")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render_in_browser(url: str, screenshot: Path, until: str = "document.readyState === 'complete'",
                      timeout: float = 150.0, size: str = "1280,2400") -> str:
    """The DOM once the page shows what the test waits for, and a screenshot of that same moment.

    `until` is a JavaScript expression polled in the page over Chromium's DevTools protocol until it is true, so a
    single-page app (the MLflow UI) is read when it has drawn its data, however long its fetches take on a loaded
    machine. After `timeout` seconds the page is returned as it stands, for the test's assertion to report."""
    return asyncio.run(_render(url, screenshot, until, timeout, size))


async def _render(url: str, screenshot: Path, until: str, timeout: float, size: str) -> str:
    import aiohttp  # Ray's own dependency; used here only as a DevTools client

    profile = Path(tempfile.mkdtemp())
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile}",
             f"--window-size={size}", "about:blank"]
    browser = subprocess.Popen([chromium(), *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Chromium writes the port it chose into the profile once it listens
        port_file = profile / "DevToolsActivePort"
        assert wait_for(lambda: port_file.exists() and port_file.read_text().count("\n") >= 1, 60, 0.05), \
            "Chromium did not open its DevTools port"
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                target = next(t for t in await r.json() if t["type"] == "page")
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 1 << 30))

                async def call(method: str, **params):
                    n = next(ids)
                    await ws.send_json({"id": n, "method": method, "params": params})
                    while True:  # events arrive between replies; skip them
                        msg = await ws.receive_json()
                        if msg.get("id") == n:
                            return msg.get("result", {})

                async def evaluate(expression: str):
                    out = await call("Runtime.evaluate", expression=expression, returnByValue=True)
                    return out.get("result", {}).get("value")

                await call("Page.navigate", url=url)
                deadline = time.monotonic() + timeout
                while not await evaluate(f"Boolean({until})") and time.monotonic() < deadline:
                    await asyncio.sleep(0.25)
                dom = await evaluate("document.documentElement.outerHTML")
                shot = await call("Page.captureScreenshot", format="png")
                screenshot.write_bytes(base64.b64decode(shot["data"]))
                return dom or ""
    finally:
        browser.kill()
        browser.wait()
        shutil.rmtree(profile, ignore_errors=True)
