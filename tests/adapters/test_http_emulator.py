"""The emulator's HTTP front: rendering from the catalog, and the endpoints over real sockets (raw aiohttp)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from adapters.http import translate
from adapters.http.emulator import CHAOS_FORMS, FORMS, HttpFront, render
from gateway.codes import CodeInfo, all_codes, lookup
from gateway.emulator import Hub
from gateway.emulator.front import Front, FrontConfig
from gateway.errors import IoTHubError
from tests.peers.tls import TlsFiles

HTTP_ROWS = [row for row in all_codes() if row.http_status is not None]
ALL_FORMS = FORMS + CHAOS_FORMS


def back(code: int, form: str, **kwargs: Any) -> IoTHubError:
    r = render(code, form, **kwargs)
    err = translate(r.status, r.headers, r.body, now=kwargs.get("now"))
    assert isinstance(err, IoTHubError)
    return err


# --- render, pure ------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ALL_FORMS)
def test_every_http_code_round_trips_through_translate_in_every_form(form: str) -> None:
    wrong = [(row.code, e.code, e.exact) for row in HTTP_ROWS
             if ((e := back(row.code, form)).code, e.exact) != (row.code, True)]
    assert wrong == []
    assert len(HTTP_ROWS) > 150


def test_status_and_name_come_from_the_catalog() -> None:
    r = render(404103, "legacy", tracking_id="abc")
    assert r.status == 404
    assert json.loads(r.body or b"") == {"Message": f"ErrorCode:DeviceNotOnline;{lookup(404103).description}",
                                         "ExceptionMessage": "Tracking ID:abc"}
    header = render(429001, "header")
    assert header.body is None and header.headers["iothub-errorcode"] == "ThrottlingException"
    escaped = json.loads(render(504101, "escaped").body or b"")
    assert json.loads(escaped["Message"])["errorCode"] == 504101
    assert json.loads(render(500001, "top").body or b"")["errorCode"] == 500001
    assert json.loads(render(500001, "nested").body or b"")["Message"]["errorCode"] == 500001


def test_a_code_without_an_http_form_uses_its_family_status() -> None:
    assert lookup(412002).http_status is None
    r = render(412002, "legacy")
    assert r.status == 412
    err = back(412002, "legacy")
    assert (err.code, err.exact) == (412002, True)


def test_304_cannot_carry_a_body_so_every_form_falls_back_to_the_header() -> None:
    for form in FORMS:
        r = render(304000, form)
        assert r.body is None and r.headers["iothub-errorcode"] == lookup(304000).name


def test_retry_after_styles() -> None:
    now = 1_700_000_000.0
    assert render(429001, retry_after=7, now=now).headers["Retry-After"] == "7"
    assert render(429001, retry_after=0.25, now=now).headers["x-ms-retry-after-ms"] == "250"
    assert render(429001, retry_after=2, retry_style="ms", now=now).headers["x-ms-retry-after-ms"] == "2000"
    dated = render(429001, retry_after=120, retry_style="date", now=now).headers["Retry-After"]
    assert email.utils.parsedate_to_datetime(dated).timestamp() == now + 120
    assert back(429001, "legacy", retry_after=120, retry_style="date", now=now).retry_after == 120
    assert back(429001, "legacy", retry_after=0.25, now=now).retry_after == 0.25


def test_unknown_form_and_non_code_are_refused() -> None:
    with pytest.raises(ValueError, match="form"):
        render(429001, "xml")
    with pytest.raises(ValueError):
        render(200000)
    with pytest.raises(ValueError):
        HttpFront(Hub(), default_form="xml")


@given(code=st.integers(300_000, 599_999), form=st.sampled_from(ALL_FORMS),
       message=st.text(max_size=300), retry=st.none() | st.floats(0, 10_000, allow_nan=False))
def test_any_code_any_form_any_message_round_trips(code: int, form: str, message: str, retry: float | None) -> None:
    info: CodeInfo = lookup(code)
    err = back(code, form, message=message or None, retry_after=retry, now=1_700_000_000.0)
    assert err.code == info.code  # an unlisted code is rendered, and read back, as its family's
    if info.known:
        assert err.exact
    if retry is not None:
        assert err.retry_after is not None and abs(err.retry_after - retry) <= 0.001


# --- the front over real sockets ---------------------------------------------------------------------


@pytest.fixture
async def front() -> AsyncIterator[HttpFront]:
    hub = Hub()
    hub.add_device("d1")
    f = HttpFront(hub)
    async with asyncio.timeout(5):
        await f.start()
    yield f
    async with asyncio.timeout(5):
        await f.stop()


def auth(front: HttpFront, device: str = "d1", expiry: int | None = None) -> dict[str, str]:
    return {"Authorization": front.hub.token(device, expiry or int(time.time()) + 3600)}


def service_auth(front: HttpFront, expiry: int | None = None) -> dict[str, str]:
    from adapters.http.transport import ServiceCredential

    cred = ServiceCredential.parse(front.service_connection_string)
    return {"Authorization": cred.token(expiry or int(time.time()) + 3600)}


async def call(method: str, url: str, **kwargs: Any) -> tuple[int, CIMultiDict[str], bytes]:
    async with asyncio.timeout(10), aiohttp.ClientSession() as s, \
            s.request(method, url, allow_redirects=False, **kwargs) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


def code_of_answer(status: int, headers: CIMultiDict[str], body: bytes) -> int:
    err = translate(status, headers, body)
    assert err is not None
    return err.code


async def test_front_satisfies_the_protocol(front: HttpFront) -> None:
    assert isinstance(front, Front)
    assert front.transport == "http" and front.port > 0


async def test_telemetry_is_recorded_with_id_and_properties(front: HttpFront) -> None:
    headers = {**auth(front), "iothub-messageid": "m1", "iothub-app-temp": "21"}
    status, _, _ = await call("POST", f"{front.url}/devices/d1/messages/events", data=b"x", headers=headers)
    assert status == 204
    assert front.hub.received[0].properties == {"temp": "21"}
    assert front.hub.received_ids() == ["m1"]


async def test_auth_failures(front: HttpFront) -> None:
    url = f"{front.url}/devices/d1/messages/events"
    assert code_of_answer(*await call("POST", url, headers=auth(front, expiry=int(time.time()) - 5))) == 401003
    assert code_of_answer(*await call("POST", url, headers={"Authorization": "garbage"})) == 401002
    assert code_of_answer(*await call("POST", url)) == 401002
    wrong = {"Authorization": front.hub.token("d2", int(time.time()) + 60)}  # d2's token for d1's path
    assert code_of_answer(*await call("POST", url, headers=wrong)) == 401002
    unknown = f"{front.url}/devices/nobody/messages/events"
    assert code_of_answer(*await call("POST", unknown, headers=auth(front))) == 404001
    assert front.hub.received == []


async def test_message_over_256k_is_message_too_large(front: HttpFront) -> None:
    answer = await call("POST", f"{front.url}/devices/d1/messages/events", data=b"x" * (256 * 1024 + 1),
                        headers=auth(front))
    assert code_of_answer(*answer) == 413001


async def test_c2d_lock_expiry_makes_a_late_complete_lock_lost(front: HttpFront) -> None:
    now = [time.time()]
    front.clock = lambda: now[0]
    front.enqueue_c2d("d1", b"hello", "c1")
    base = f"{front.url}/devices/d1/messages/deviceBound"
    status, headers, body = await call("GET", base, headers=auth(front))
    assert (status, body, headers["iothub-messageid"]) == (200, b"hello", "c1")
    etag = headers["ETag"].strip('"')
    now[0] += 61  # past the one-minute lock
    assert code_of_answer(*await call("DELETE", f"{base}/{etag}", headers=auth(front))) == 412002
    # the message went back to the queue and can be received and completed again
    status, headers, body = await call("GET", base, headers=auth(front))
    assert (status, body) == (200, b"hello")
    assert (await call("DELETE", f"{base}/{headers['ETag'].strip(chr(34))}", headers=auth(front)))[0] == 204
    assert (await call("GET", base, headers=auth(front)))[0] == 204
    assert code_of_answer(*await call("DELETE", f"{base}/never-issued", headers=auth(front))) == 412001


async def test_c2d_abandon_redelivers(front: HttpFront) -> None:
    front.enqueue_c2d("d1", b"again", "c2")
    base = f"{front.url}/devices/d1/messages/deviceBound"
    _, headers, _ = await call("GET", base, headers=auth(front))
    etag = headers["ETag"].strip('"')
    assert (await call("POST", f"{base}/{etag}/abandon", headers=auth(front)))[0] == 204
    status, headers, body = await call("GET", base, headers=auth(front))
    assert (status, body, headers["iothub-messageid"]) == (200, b"again", "c2")


async def test_direct_method_offline_timeout_and_success(front: HttpFront) -> None:
    url = f"{front.url}/twins/d1/methods"
    body = {"methodName": "reboot", "responseTimeoutInSeconds": 0.2, "payload": {"a": 1}}
    assert code_of_answer(*await call("POST", url, json=body, headers=service_auth(front))) == 404103

    handle = object()
    seen: list[tuple[str, Any]] = []

    async def slow(name: str, payload: Any, timeout: float) -> tuple[int, Any]:
        await asyncio.sleep(30)
        return 200, None

    async def quick(name: str, payload: Any, timeout: float) -> tuple[int, Any]:
        seen.append((name, payload))
        return 201, {"done": True}

    front.hub.attach("d1", "test", handle)
    front.hub.serve_methods("d1", handle, slow)
    assert code_of_answer(*await call("POST", url, json=body, headers=service_auth(front))) == 504101
    front.hub.serve_methods("d1", handle, quick)
    status, _, answer = await call("POST", url, json=body, headers=service_auth(front))
    assert (status, json.loads(answer)) == (200, {"status": 201, "payload": {"done": True}})
    assert seen == [("reboot", {"a": 1})]
    # a device token is not a service credential, and a bad body is an argument error
    assert code_of_answer(*await call("POST", url, json=body, headers=auth(front))) == 401002
    assert code_of_answer(*await call("POST", url, data=b"{", headers=service_auth(front))) == 400004
    assert code_of_answer(*await call("POST", f"{front.url}/twins/ghost/methods", json=body,
                                      headers=service_auth(front))) == 404001


async def test_twin_reports_connection_state(front: HttpFront) -> None:
    status, _, body = await call("GET", f"{front.url}/twins/d1", headers=auth(front))
    assert status == 200 and json.loads(body)["connectionState"] == "Disconnected"
    front.hub.attach("d1", "test", object())
    status, _, body = await call("GET", f"{front.url}/twins/d1", headers=service_auth(front))
    assert json.loads(body)["connectionState"] == "Connected"


async def test_fault_plan_forms_and_retry_after_on_the_wire(front: HttpFront) -> None:
    url = f"{front.url}/devices/d1/messages/events"
    front.hub.plan.add("telemetry", 429001, form="header", retry_after=3, transport="http")
    status, headers, body = await call("POST", url, headers=auth(front), data=b"x")
    assert (status, headers["iothub-errorcode"], headers["Retry-After"], body) == (429, "ThrottlingException", "3", b"")
    front.default_form = "top"
    front.hub.plan.add("telemetry", 503001)
    status, _, body = await call("POST", url, headers=auth(front), data=b"x")
    assert (status, json.loads(body)["errorCode"]) == (503, 503001)
    assert front.hub.received == []  # errors are not recorded


async def test_drop_all_cuts_connections(front: HttpFront) -> None:
    front.hub.plan.add("telemetry", kind="no_ack")
    async with aiohttp.ClientSession() as s:
        post = asyncio.ensure_future(s.post(f"{front.url}/devices/d1/messages/events", data=b"x",
                                            headers=auth(front)))
        async with asyncio.timeout(5):
            while not front.hub.received:
                await asyncio.sleep(0.01)
            await front.drop_all()
            with pytest.raises(aiohttp.ClientError):
                await post
    assert front.hub.received_ids() == [None]  # accepted, never acknowledged


async def test_https_with_a_configured_certificate(tls_files: TlsFiles) -> None:
    hub = Hub()
    hub.add_device("d1")
    f = HttpFront(hub, FrontConfig(ssl_context=tls_files.server_context()))
    async with asyncio.timeout(10):
        await f.start()
        try:
            assert f.url.startswith("https://")
            status, _, _ = await call("POST", f"{f.url}/devices/d1/messages/events", data=b"x",
                                      headers=auth(f), ssl=tls_files.client_context())
            assert status == 204
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await call("POST", f"{f.url}/devices/d1/messages/events", ssl=ssl.create_default_context())
        finally:
            await f.stop()
            await f.stop()  # idempotent


async def test_a_method_channel_that_closed_under_the_call_is_device_not_online() -> None:
    """IoT Hub's 404103 means "not connected, or not subscribed to methods"; never a 500."""
    import aiohttp

    from adapters.http.emulator import HttpFront
    from adapters.http.transport import ServiceCredential
    from gateway.emulator import Hub

    hub = Hub()
    hub.add_device("d1")

    async def gone(name: str, payload: object, timeout: float) -> tuple[int, object]:
        raise ConnectionError("method link closed")

    hub.serve_methods("d1", object(), gone)
    front = HttpFront(hub)
    await front.start()
    try:
        cred = ServiceCredential.parse(front.service_connection_string)
        async with aiohttp.ClientSession() as session:
            resp = await session.post(f"{front.url}/twins/d1/methods?api-version=2021-04-12",
                                      json={"methodName": "reboot", "responseTimeoutInSeconds": 5},
                                      headers={"Authorization": cred.token(2**31 - 1)})
            assert resp.status == 404
            assert "404103" in await resp.text()  # today's numeric form, escaped in Message
    finally:
        await front.stop()
