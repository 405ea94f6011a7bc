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
import os
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
        # no CDN, no fonts (the SVG namespace is a name, never fetched)
        text = (await resp.text()).replace('"http://www.w3.org/2000/svg"', "")
        assert "http://" not in text and "https://" not in text
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


def _series_sum(chart: str, series: str) -> str:
    return (f"Number(document.querySelector('#{chart} polyline[data-series=\"{series}\"]')"
            "?.dataset.sum ?? -1)")


async def test_charts_are_drawn_from_real_traffic_and_counts_agree(sidecar_url: Any):
    """Messages through the sidecar to the emulator, some dead-lettered by an injected permanent refusal:
    the page's SVG series add up to what the emulator received and the outbox dead-lettered; the device,
    code and chart counts agree; GET 404s and 405s are not counted as messages, a refused POST is."""
    sidecar, client, url = sidecar_url
    invalid = code_of("ArgumentInvalid")  # a permanent refusal: the handler fails it, the pipeline dead-letters
    sent = {"demo-amqp": 5, "demo-mqtt": 4, "demo-http": 3}
    dead = 2
    async with chromium() as browser:
        await browser.call("Page.navigate", {"url": url})
        await browser.wait_for("document.getElementById('live')?.textContent === 'live'", what="live stream")
        await browser.wait_for("document.querySelectorAll('#devices tbody tr').length === 3", what="3 devices")
        for device in sent:
            await browser.wait_for(
                f"document.querySelector('[data-device=\"{device}\"] .state')?.textContent === 'connected'",
                what=f"{device} connected")
        sidecar.emulator.hub.plan.add(Operation.TELEMETRY, invalid, device="demo-http", transport="http", times=dead)
        for device, n in sent.items():
            for i in range(n):
                resp = await client.post(f"/v1/devices/{device}/messages", data=json.dumps({"i": i}).encode(),
                                         headers={"Content-Type": "application/json"})
                assert resp.status == 202
                await asyncio.sleep(0.2)  # spread over a few seconds: several points on the charts
        # Not messages: a GET of nothing (404), a method a resource lacks (405), an unknown device's status.
        assert (await client.get("/v1/nothing-here")).status == 404
        assert (await client.put("/v1/devices/demo-http/messages", data=b"x")).status == 405
        assert (await client.get("/v1/devices/nobody")).status == 404
        # A message the API refuses is one: posted for a device this sidecar does not have.
        refused = await client.post("/v1/devices/nobody/messages", data=b"x")
        assert refused.status == 404
        refused_code = (await refused.json())["errorCode"]

        async def settled() -> dict[str, int]:
            counts = sidecar.outbox.counts()
            return counts if counts["pending"] + counts["inflight"] == 0 else {}

        async with asyncio.timeout(30):
            while not (counts := await settled()):
                await asyncio.sleep(0.1)
        assert counts["dead"] == dead
        received = {d: len(sidecar.emulator.hub.received_ids(d)) for d in sent}
        assert received == {d: n - (dead if d == "demo-http" else 0) for d, n in sent.items()}

        # The chart of messages per second adds up to what reached the hub and what was dead-lettered.
        total = sum(received.values())
        await browser.wait_for(f"{_series_sum('chart-messages', 'delivered')} === {total} && "
                               f"{_series_sum('chart-messages', 'dead_letter')} === {dead}",
                               what=f"{total} delivered and {dead} dead-lettered in the chart")
        values = await browser.evaluate(
            "document.querySelector('#chart-messages polyline[data-series=\"delivered\"]').dataset.values")
        per_second = [int(v) for v in values.split(",")]
        assert len(per_second) == sidecar.stats.window and sum(per_second) == total
        # The codes chart has the refusal's code as a series with both dead letters in it, and the refused POST.
        await browser.wait_for(f"{_series_sum('chart-codes', str(invalid))} >= {dead}", what=f"{invalid} series")
        await browser.wait_for(f"{_series_sum('chart-codes', str(refused_code))} === 1", what="the refused POST")
        # Per device: pick demo-amqp by clicking its row; its chart shows its own deliveries only.
        await browser.evaluate("document.querySelector('#devices tr[data-device=\"demo-amqp\"]').click()")
        await browser.wait_for("document.getElementById('chart-device').dataset.for === 'demo-amqp' && "
                               f"{_series_sum('chart-device', 'delivered')} === {received['demo-amqp']}",
                               what="demo-amqp's own chart")

        # The tables agree with the charts and each other: the same counters, the same span.
        cell = "Number(document.querySelector('[data-device=\"{}\"] .{}')?.textContent)"
        for device, n in received.items():
            await browser.wait_for(f"{cell.format(device, 'delivered')} === {n}", what=f"{device} delivered {n}")
        assert await browser.evaluate(cell.format("demo-http", "dead")) == dead
        device_codes = sum([await browser.evaluate(cell.format(d, "errors")) for d in sent])
        code_rows = await browser.evaluate(
            "[...document.querySelectorAll('#codes tbody tr')].map(tr => [tr.dataset.code, "
            "Number(tr.querySelector('.count').textContent), tr.querySelector('.outcomes').textContent])")
        by_code = {int(code): (count, outcomes) for code, count, outcomes in code_rows}
        assert sum(count for count, _ in by_code.values()) == device_codes + 1  # + the device-less refused POST
        assert by_code[refused_code] == (1, "rejected 1")
        assert f"dead_letter {dead}" in by_code[invalid][1]
        assert not {c for c in by_code if c // 1000 in (404, 405)} - {refused_code}  # no GET 404, no 405
        stats = await (await client.get("/v1/stats")).json()
        assert stats["totals"]["rejected"] == 1 and stats["totals"]["delivered"] == total
        metrics = await (await client.get("/metrics")).text()
        rejected = [line for line in metrics.splitlines() if 'outcome="rejected"' in line]
        assert rejected == [f'iothub_gateway_messages_total{{code="{refused_code}",outcome="rejected",'
                            'transport="api"} 1.0']

        target = os.environ.get("DOCS_SCREENSHOT")
        if target:
            await browser.call("Emulation.setDeviceMetricsOverride",
                               {"width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
            await asyncio.sleep(0.5)
            shot = await browser.call("Page.captureScreenshot", {"format": "png"})
            Path(target).write_bytes(base64.b64decode(shot["data"]))


async def test_stats_answers_match_the_document(sidecar_url: Any):
    from tests.sidecar.test_api_contract import conforms

    sidecar, client, _ = sidecar_url
    assert (await client.post("/v1/devices/demo-mqtt/messages", data=b"x")).status == 202
    for path in ("/v1/stats", "/v1/stats?device=demo-mqtt", "/v1/stats?limit=2&after=demo-amqp",
                 "/v1/stats?device=nobody", "/v1/stats?limit=5000", "/v1/stats?limit=x"):
        await conforms(await client.get(path))
    page = await (await client.get("/v1/stats?limit=2&after=demo-amqp")).json()
    assert list(page["devices"]) == ["demo-http", "demo-mqtt"]  # the page GET /v1/devices?limit=2&after= gives
    assert page["devices"]["demo-mqtt"]["accepted"] == 1 and page["totals"]["accepted"] == 1
    assert len(page["series"]["accepted"]) == sidecar.stats.window == page["window"]


async def test_many_devices_are_shown_one_page_at_a_time(tmp_path: Path, start_sidecar: Any):
    """1,500 devices: the page shows 100 rows and the totals, pages with next/previous, and asks the API
    only for pages (``GET /v1/devices?limit=...``), never for every device nor for /metrics."""
    from aiohttp import web

    from tests.sidecar.fakes import fake_config

    n = 1500
    run = await start_sidecar(fake_config(tmp_path, *((f"dev-{i:05}", "mqtt") for i in range(n))))
    asked: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        asked.append(request.path_qs)
        return await handler(request)

    app = make_app(run.sidecar)
    app.middlewares.insert(0, record)
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        assert (await client.post("/v1/devices/dev-00150/messages", data=b"x")).status == 202
        rows = "document.querySelectorAll('#devices tbody tr')"
        async with chromium() as browser:
            await browser.call("Page.navigate", {"url": str(client.make_url("/"))})
            await browser.wait_for(f"{rows}.length === 100 && "
                                   f"document.getElementById('device-range').textContent === '1–100 of {n}'",
                                   what="the first page of 100")
            await browser.evaluate("document.getElementById('next').click()")
            await browser.wait_for(f"document.getElementById('device-range').textContent === '101–200 of {n}' && "
                                   f"{rows}[0].dataset.device === 'dev-00100'", what="the second page")
            await browser.wait_for("Number(document.querySelector('[data-device=\"dev-00150\"] .delivered')"
                                   "?.textContent) === 1", what="dev-00150's delivery on page 2")
            await browser.evaluate("document.getElementById('prev').click()")
            await browser.wait_for(f"{rows}[0].dataset.device === 'dev-00000'", what="back to the first page")
    finally:
        await client.close()
    pages = [q for q in asked if q.startswith("/v1/devices") and not q.startswith("/v1/devices/")]
    assert pages and all("limit=100" in q for q in pages), pages
    assert not [q for q in asked if q.startswith("/metrics")]
    stats = [q for q in asked if q.startswith("/v1/stats") and "device=" not in q]
    assert stats and all("limit=100" in q for q in stats)
