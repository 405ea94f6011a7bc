"""The sidecar's API under hostile requests (issue 13): every answer carries a catalog code, none hangs.

A real sidecar (in-memory upstream) behind aiohttp's real server on 127.0.0.1. Requests go out through
aiohttp's client, or as raw bytes over a socket where the client would refuse to send them (non-UTF-8
headers, malformed request lines). An error answer must be the catalog's: JSON ``errorCode`` = ``code``
and the ``iothub-errorcode`` header, never a bare 500.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.http import translate as http_translate
from gateway.codes import CATALOG
from tests.fuzz.hostile import json_like
from tests.sidecar.fakes import fake_config

TOKEN = "a-long-bearer-token-for-fuzzing"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# Each example is one request to a running server: few examples, generous deadline (CI load).
API_FUZZ = settings(max_examples=40, deadline=10_000,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def assert_coded_answer(status: int, headers: Any, body: bytes) -> None:
    """Success, or the catalog's error shape, which the package's own HTTP translator reads back exactly."""
    if status < 400:
        return
    assert headers.get("Content-Type", "").startswith("application/json"), (status, body[:200])
    data = json.loads(body)
    assert data["errorCode"] == data["code"] and data["code"] in CATALOG, data
    assert headers.get("iothub-errorcode") == data["name"]
    assert data["code"] // 1000 == status or data["http_status"] == status
    err = http_translate(status, dict(headers), body)
    assert err is not None and err.code == data["code"]


async def raw_request(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one HTTP/1.1 answer (the server closes after an error)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, _, value = line.partition(":")
                    headers[name.strip()] = value.strip()
            length = int(headers.get("Content-Length", "0"))
            body = await reader.readexactly(length)
    finally:
        writer.close()
    return status, headers, body


async def test_non_utf8_authorization_is_401_with_a_code(tmp_path: Path, start_sidecar: Any) -> None:
    run = await start_sidecar(fake_config(tmp_path, api={"token": TOKEN}))
    port = run.client.server.port
    for value in (b"Bearer \xff\xfe\xfa", b"\xff\xff", b"Bearer " + TOKEN.encode() + b"\xff"):
        request = b"GET /v1/devices HTTP/1.1\r\nHost: x\r\nAuthorization: " + value + b"\r\n\r\n"
        status, headers, body = await raw_request(port, request)
        assert status == 401
        assert_coded_answer(status, headers, body)
        assert json.loads(body)["code"] == 401002
    ok = await run.client.get("/v1/devices", headers=AUTH)
    assert ok.status == 200


async def test_undecodable_application_properties_are_refused_with_a_code(tmp_path: Path, start_sidecar: Any) -> None:
    run = await start_sidecar(fake_config(tmp_path))
    for header in (b"iothub-app-room: kitch\xffen", b"iothub-app-r\xffom: kitchen"):
        request = (b"POST /v1/devices/dev-mqtt/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                   + header + b"\r\n\r\nx")
        status, headers, body = await raw_request(run.client.server.port, request)
        assert status == 400
        assert_coded_answer(status, headers, body)
    assert run.sidecar.outbox.counts()["pending"] == 0  # nothing undeliverable was accepted


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 50_000, b"[" * 5_000 + b"]" * 5_000])
async def test_deeply_nested_json_is_400_argument_invalid(tmp_path: Path, start_sidecar: Any, body: bytes) -> None:
    run = await start_sidecar(fake_config(tmp_path, api={"max_body": 1_000_000}))
    for path in ("/v1/classify", "/v1/devices/dev-mqtt/messages"):
        resp = await run.client.post(path, data=body, headers={"Content-Type": "application/json"})
        raw = await resp.read()
        assert resp.status == 400, raw[:300]
        assert_coded_answer(resp.status, resp.headers, raw)
        assert json.loads(raw)["code"] == 400004


async def test_classify_with_a_deeply_nested_payload_is_coded(tmp_path: Path, start_sidecar: Any) -> None:
    run = await start_sidecar(fake_config(tmp_path, api={"max_body": 1_000_000}))
    nested = "[" * 900 + "]" * 900  # parses, but re-serializing it as a payload goes deep
    body = f'{{"transport": "mqtt", "topic": "$iothub/twin/res/400/?$rid=1", "payload": {nested}}}'
    resp = await run.client.post("/v1/classify", data=body.encode())
    assert_coded_answer(resp.status, resp.headers, await resp.read())
    assert resp.status in (200, 400)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /v1/codes/" + b"x" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # URL over 8190 bytes
        b"GET /v1/codes HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 20_000 + b"\r\n\r\n",  # a 20 kB header
        b"GET /v1/codes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"s" * 20_000 + b"\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",  # TLS to a plain port
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"G\x00T / HTTP/1.1\r\n\r\n",
        b"GET /v1/codes/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",  # a path that is not UTF-8
        b"GET /v1/events HTTP/1.1\r\nHost: x\r\nLast-Event-ID: \xff1\r\n\r\n",
        b"GET /v1/dead-letters?limit=%FF%FE HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["long-url", "big-header", "big-auth-header", "tls-hello", "bad-version", "smuggling", "nul-method",
         "non-utf8-path", "non-utf8-event-id", "non-utf8-query"],
)
async def test_errors_aiohttp_answers_itself_carry_the_catalog_body(
    tmp_path: Path, start_sidecar: Any, request_bytes: bytes
) -> None:
    run = await start_sidecar(fake_config(tmp_path))
    status, headers, body = await raw_request(run.client.server.port, request_bytes)
    assert status >= 400
    assert_coded_answer(status, headers, body)
    assert b"s" * 100 not in body and b"y" * 100 not in body  # a refused request is never echoed


# --- property-based: every route's body and parameters -----------------------------------------------------

bodies = st.one_of(
    st.binary(max_size=300),
    json_like.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"transport": st.sampled_from(["http", "mqtt", "amqp", "x", 5])},
        optional={
            "status": st.integers(-10, 1000) | json_like,
            "headers": json_like,
            "body": json_like,
            "reason_code": st.integers(-5, 300) | json_like,
            "protocol_version": st.integers(0, 7) | json_like,
            "packet": st.sampled_from(["puback", "connack", "x"]) | json_like,
            "properties": json_like,
            "topic": st.text(max_size=40) | st.just("$iothub/twin/res/429/?$rid=1"),
            "payload": json_like,
            "condition": st.sampled_from(["amqp:link:stolen", ""]) | json_like,
            "description": json_like,
            "info": json_like,
        },
    ).map(lambda d: json.dumps(d).encode()),
)
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@API_FUZZ
@given(body=bodies, content_type=st.sampled_from(["application/json", "text/plain", "application/octet-stream"]),
       message_id=st.none() | header_values, app_property=st.none() | header_values,
       ttl=st.none() | st.sampled_from(["1", "-1", "nan", "inf", "1e400", "x", ""]))
async def test_every_route_answers_with_a_code(
    tmp_path_factory: Any, start_sidecar: Any, body: bytes, content_type: str, message_id: str | None,
    app_property: str | None, ttl: str | None,
) -> None:
    run = await _shared(start_sidecar, tmp_path_factory)
    headers = {"Content-Type": content_type, **AUTH}
    if message_id is not None:
        headers["iothub-messageid"] = message_id
    if app_property is not None:
        headers["iothub-app-x"] = app_property
    query = {"ttl": ttl} if ttl is not None else {}
    for method, path in (("POST", "/v1/classify"), ("POST", "/v1/devices/dev-mqtt/messages"),
                         ("POST", "/v1/devices/nobody/messages"), ("GET", "/v1/dead-letters"),
                         ("GET", "/v1/codes/" + (message_id or "x"))):
        async with asyncio.timeout(10):
            resp = await run.client.request(method, path, data=body if method == "POST" else None, headers=headers,
                                            params=query)
            raw = await resp.read()
        assert resp.status != 500 or json.loads(raw)["code"] // 1000 == 500
        assert_coded_answer(resp.status, resp.headers, raw)


_RUNNING: dict[int, Any] = {}


async def _shared(start_sidecar: Any, tmp_path_factory: Any) -> Any:
    """One sidecar per test function run (hypothesis reuses the function-scoped fixture across examples)."""
    key = id(start_sidecar)
    if key not in _RUNNING:
        _RUNNING.clear()
        _RUNNING[key] = await start_sidecar(
            fake_config(tmp_path_factory.mktemp("api-fuzz"), api={"token": TOKEN, "rate_limit": 0})
        )
    return _RUNNING[key]
