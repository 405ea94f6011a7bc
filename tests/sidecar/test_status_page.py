"""The status page at ``GET /`` in a real headless Chromium, driven over the DevTools protocol.

The sidecar runs in-process on the bundled emulator; the test loads the page, sees the demo devices,
injects a throttle through the emulator's fault plan and watches the page pick the code up from the
live event stream. Chromium is the Debian package (``.ci/run`` installs it); with ``CI=true`` a missing
browser fails the test instead of skipping it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.codes import code_of
from gateway.emulator import Operation
from gateway.sidecar.app import make_app
from gateway.sidecar.config import OutboxConfig, parse_config
from gateway.sidecar.service import Sidecar
from tests.peers import missing_peer

SCREENSHOT = Path("/tmp/status.png")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    missing_peer("chromium is not installed (apt-get install chromium)")


class DevTools:
    """A minimal DevTools-protocol client: one page target, flattened session, request/response by id."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.session: str | None = None
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            future = self.pending.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("DevTools connection closed"))

    async def call(self, method: str, params: dict[str, Any] | None = None, *, session: bool = True,
                   timeout: float = 15.0) -> dict[str, Any]:
        ident = next(self.ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session and self.session is not None:
            message["sessionId"] = self.session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[ident] = future
        await self.ws.send_str(json.dumps(message))
        async with asyncio.timeout(timeout):
            answer = await future
        if "error" in answer:
            raise AssertionError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def open_page(self) -> None:
        target = await self.call("Target.createTarget", {"url": "about:blank"}, session=False)
        attached = await self.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True},
                                   session=False)
        self.session = attached["sessionId"]
        await self.call("Page.enable")
        await self.call("Runtime.enable")

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True})
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} raised in the page: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, *, timeout: float = 20.0, what: str = "") -> Any:
        """Poll ``expression`` in the page until it is truthy; a hang becomes a failure."""
        last: Any = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    last = await self.evaluate(expression)
                    if last:
                        return last
                    await asyncio.sleep(0.1)
        except TimeoutError:
            text = await self.evaluate("document.body ? document.body.innerText : ''")
            raise AssertionError(f"page never showed {what or expression!r} (last {last!r}); page text:\n"
                                 f"{str(text)[:3000]}") from None


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[DevTools]:
    binary = _chromium()
    profile = tempfile.mkdtemp(prefix="status-page-chromium-")
    proc = await asyncio.create_subprocess_exec(
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={profile}",
        "--remote-debugging-port=0", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        async with asyncio.timeout(30):
            while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
                if proc.returncode is not None:
                    raise AssertionError(f"chromium exited with {proc.returncode} before it listened")
                await asyncio.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0) as ws:
            tools = DevTools(ws)
            try:
                await tools.open_page()
                yield tools
            finally:
                tools.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await tools.reader
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
async def sidecar_url(tmp_path: Path) -> AsyncIterator[tuple[Sidecar, TestClient[Any, Any], str]]:
    cfg = parse_config({"policy": {"throttle": {"initial": 0.2, "cap": 1.0}}}, env={})
    cfg = dataclasses.replace(cfg, outbox=OutboxConfig(path=str(tmp_path / "outbox.sqlite3")))
    sidecar = Sidecar(cfg)
    await sidecar.start()
    client: TestClient[Any, Any] = TestClient(TestServer(make_app(sidecar), host="127.0.0.1"))
    await client.start_server()
    try:
        yield sidecar, client, str(client.make_url("/"))
    finally:
        await client.close()
        await sidecar.stop()


async def test_static_files_are_served_with_a_strict_policy(sidecar_url: Any):
    _, client, _ = sidecar_url
    page = await client.get("/")
    assert page.status == 200 and page.content_type == "text/html"
    html = await page.text()
    assert "/static/status.js" in html and "/static/status.css" in html
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    for name, kind in (("status.js", "text/javascript"), ("status.css", "text/css")):
        resp = await client.get(f"/static/{name}")
        assert resp.status == 200 and resp.content_type == kind
        assert "http://" not in await resp.text() and "https://" not in await resp.text()  # no CDN, no fonts
    missing = await client.get("/static/../app.py")
    assert missing.status == 404
    missing = await client.get("/static/nope.js")
    assert missing.status == 404 and (await missing.json())["errorCode"] == 404000


async def test_page_shows_devices_and_reflects_an_injected_fault(sidecar_url: Any):
    sidecar, client, url = sidecar_url
    throttled = code_of("ThrottlingException")
    async with chromium() as browser:
        await browser.call("Page.navigate", {"url": url})
        await browser.wait_for("document.getElementById('live')?.textContent === 'live'", what="live stream")
        for device in ("demo-mqtt", "demo-amqp", "demo-http"):
            await browser.wait_for(
                f"document.querySelector('[data-device=\"{device}\"] .state')?.textContent === 'connected'",
                what=f"{device} connected")
        assert await browser.evaluate(
            "document.querySelector('[data-device=\"demo-http\"] .protocol').textContent") == "http"
        assert await browser.evaluate("document.getElementById('no-codes').hidden") is False  # no errors yet

        # A throttle with Retry-After, injected through the emulator: the page learns it from /v1/events.
        sidecar.emulator.hub.plan.add(Operation.TELEMETRY, throttled, device="demo-http", transport="http",
                                      retry_after=1)
        resp = await client.post("/v1/devices/demo-http/messages", data=b'{"t": 1}')
        assert resp.status == 202
        last_code = "document.querySelector('[data-device=\"demo-http\"] .last-code')?.textContent || ''"
        await browser.wait_for(f"({last_code}).startsWith('{throttled} ThrottlingException')",
                               what="the device's last code 429001")
        assert await browser.evaluate(
            "document.querySelector('[data-device=\"demo-http\"] .action').textContent") == "throttle"
        await browser.wait_for(
            f"[...document.querySelectorAll('#events li.state')].some(li => li.dataset.code === '{throttled}'"
            " && li.textContent.includes('throttled'))", what="a throttled event")
        await browser.wait_for(f"document.querySelector('#codes tr[data-code=\"{throttled}\"] .count')"
                               "?.textContent === '1'", what="the per-code count")
        # delivered after the hub's Retry-After: the device is connected again and the count moved
        await browser.wait_for(
            "document.querySelector('[data-device=\"demo-http\"] .state')?.textContent === 'connected' && "
            "document.querySelector('[data-device=\"demo-http\"] .delivered')?.textContent === '1'",
            what="demo-http connected again with 1 delivered")
        assert await browser.evaluate(f"({last_code}).startsWith('{throttled}')")
        assert await browser.evaluate(
            "document.getElementById('no-codes').hidden && "
            "!document.querySelector('#events li.dead_letter')")

        shot = await browser.call("Page.captureScreenshot", {"format": "png"})
        data = base64.b64decode(shot["data"])
        assert data.startswith(b"\x89PNG")
        with contextlib.suppress(OSError):
            SCREENSHOT.write_bytes(data)
