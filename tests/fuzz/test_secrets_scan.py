"""No secret leaks from a running sidecar, even when the upstream echoes them back (issue 13).

A hostile upstream (aiohttp over TLS on 127.0.0.1) answers every device request with an error whose
message echoes the request's SAS token and signature in several spellings, next to ``sr=`` and ``se=``.
The sidecar runs its real HTTP transport against it. Planted secrets: the device keys, the connection
strings, the API bearer token, and every token the process mints. After driving traffic, every output
surface is scanned for each of them: the log (text and JSON), every API answer, the event stream,
the metrics page and the outbox's text columns.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, quote_plus, unquote

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.sas import minted_secrets
from gateway.sidecar.app import make_app
from gateway.sidecar.config import parse_config
from gateway.sidecar.logs import TextFormatter, setup_logging
from gateway.sidecar.security import MASK
from gateway.sidecar.service import Sidecar
from tests.peers.tls import TlsFiles
from tests.sidecar.fakes import PLANTED_KEY, connection_string

BEARER = "planted-bearer-token-0f3a9c"
OTHER_KEY = "b3RoZXItcGxhbnRlZC1rZXktZm9yLWRldi0yMiE="  # a second device's key (base64)


class HostileHub:
    """Echoes each request's SAS token back in its error: 400 for telemetry (dead-letter), 401 otherwise."""

    def __init__(self) -> None:
        self.tokens: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "")
        self.tokens.append(token)
        fields = parse_qs(token.removeprefix("SharedAccessSignature "))
        sig = fields.get("sig", [""])[0]
        sr, se = quote_plus(fields.get("sr", [""])[0]), fields.get("se", [""])[0]
        echo = (f"signature {sig} (sent as {quote(sig, safe='')}) does not match sr={sr}&se={se}; "
                f"token was {token}")
        body = {"Message": f"ErrorCode:ArgumentInvalid;{echo}", "ExceptionMessage": f"Tracking ID:t-1 {echo}"}
        status = 400 if request.path.endswith("/messages/events") else 401
        return web.json_response(body, status=status, headers={"iothub-errorcode": "ArgumentInvalid"})


@pytest.fixture
async def hostile_hub(tls_files: TlsFiles) -> AsyncIterator[tuple[HostileHub, int]]:
    hub = HostileHub()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hub.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls_files.server_context())
    await site.start()
    port = runner.addresses[0][1]
    yield hub, port
    await runner.cleanup()


async def test_no_planted_or_minted_secret_reaches_any_output(
    tmp_path: Path, tls_files: TlsFiles, hostile_hub: tuple[HostileHub, int]
) -> None:
    hub, port = hostile_hub
    devices = [("dev-a", connection_string("dev-a")), ("dev-b", connection_string("dev-b", OTHER_KEY))]
    config = parse_config({
        "api": {"token": BEARER, "rate_limit": 0},
        "upstream": {"kind": "iothub", "host": "127.0.0.1", "tls": True, "ca_file": str(tls_files.ca_pem),
                     "ports": {"http": port}},
        "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
        "delivery": {"shutdown_deadline": 0.5},
        "devices": [{"id": d, "protocol": "http", "connection_string": cs} for d, cs in devices],
    }, source="test", env={})
    sidecar = Sidecar(config)
    logs = io.StringIO()  # both formats, as the process would write them
    root = logging.getLogger()
    level = root.level
    json_handler = setup_logging("json", "DEBUG", sidecar.redactor, interval=0, stream=logs)
    text_handler = logging.StreamHandler(logs)
    text_handler.setFormatter(TextFormatter(sidecar.redactor))
    root.addHandler(text_handler)
    await sidecar.start()
    client: TestClient[Any, Any] = TestClient(TestServer(make_app(sidecar)))
    await client.start_server()
    auth = {"Authorization": f"Bearer {BEARER}"}
    answers: list[str] = []
    try:
        ids = []
        for device, _ in devices:
            resp = await client.post(f"/v1/devices/{device}/messages", data=b'{"t": 1}', headers=auth)
            assert resp.status == 202, await resp.text()
            ids.append((await resp.json())["id"])
        async with asyncio.timeout(30):
            while len(await sidecar.dead_letters(limit=10)) < len(ids):
                await asyncio.sleep(0.05)
        # Planted secrets in requests the API answers about (echoed back in its errors).
        for body in (
            {"transport": "amqp", "condition": "x", "description": f"key {PLANTED_KEY} in {devices[0][1]}"},
            {"transport": "http", "status": 400, "body": {"Message": f"ErrorCode:ArgumentInvalid;{hub.tokens[0]}"}},
            {"transport": "bogus", "extra": BEARER},
        ):
            resp = await client.post("/v1/classify", json=body, headers=auth)
            answers.append(await resp.text())
        wrong = await client.get("/v1/devices", headers={"Authorization": f"Bearer {BEARER}x"})
        answers.append(await wrong.text())
        for path in ["/v1/devices", "/v1/dead-letters", "/metrics", "/v1/codes/ArgumentInvalid",
                     *(f"/v1/devices/{d}" for d, _ in devices), *(f"/v1/messages/{i}" for i in ids)]:
            resp = await client.get(path, headers=auth)
            assert resp.status == 200, path
            answers.append(await resp.text())
        events = await _read_events(client, auth)
        assert "dead_letter" in events
    finally:
        await client.close()
        await sidecar.stop()
        for handler in (json_handler, text_handler):
            root.removeHandler(handler)
        root.setLevel(level)
    with sqlite3.connect(config.outbox_path()) as db:
        columns = [" ".join(str(v) for v in row) for row in db.execute(
            "SELECT id, device_id, properties, status, code, reason FROM messages")]

    # The hostile upstream did see tokens and echoed them: the scan has something to find.
    assert hub.tokens and all(t.startswith("SharedAccessSignature ") for t in hub.tokens)
    for answer in answers[-len(ids):]:  # /v1/messages/{id}: dead-lettered with the echo masked
        dead = json.loads(answer)
        assert dead["status"] == "dead" and dead["code"] == 400004 and MASK in dead["reason"], dead

    signatures = {parse_qs(t.removeprefix("SharedAccessSignature "))["sig"][0] for t in hub.tokens}
    planted = {PLANTED_KEY, OTHER_KEY, BEARER, *(cs for _, cs in devices), *hub.tokens}
    planted |= {form for sig in signatures for form in (sig, quote(sig, safe=""), quote_plus(sig))}
    planted |= {unquote(v) for v in minted_secrets()[1] if len(v) >= 20}
    surfaces = {"log": logs.getvalue(), "events": events, "outbox": "\n".join(columns)}
    surfaces |= {f"answer {n}": text for n, text in enumerate(answers)}
    assert surfaces["log"], "nothing was logged: the log scan would prove nothing"
    for name, text in surfaces.items():
        for secret in planted:
            assert secret not in text, f"{secret[:12]}... leaked into {name}: {text[:300]}"


async def _read_events(client: TestClient[Any, Any], auth: dict[str, str]) -> str:
    """The event stream's replay (everything since id 0), read until it goes quiet."""
    chunks: list[str] = []
    async with client.get("/v1/events", params={"after": "0"}, headers=auth) as resp:
        assert resp.status == 200
        while True:
            try:
                async with asyncio.timeout(1.0):
                    chunk = await resp.content.readany()
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk.decode())
    return "".join(chunks)

