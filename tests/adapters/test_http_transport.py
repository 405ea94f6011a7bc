"""The HTTP adapter against the emulator's HTTP front over real loopback sockets, alone and with the Handler."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web

import adapters.http
from adapters.http.emulator import CHAOS_FORMS, FORMS, HttpFront
from adapters.http.transport import HttpTransport, ServiceCredential
from gateway.clock import SystemClock
from gateway.codes import all_codes
from gateway.emulator import Hub
from gateway.emulator.front import FrontConfig
from gateway.errors import (
    ConnectionLostError,
    DeviceOfflineError,
    IoTHubError,
    OperationTimeoutError,
    ThrottledError,
)
from gateway.handler import Handler, State, StateChange, Undelivered
from gateway.policy import Backoff, DeviceConfig, Policy, PolicyConfig, ThrottleBackoff
from gateway.transport import (
    C2DMessage,
    DeviceOnline,
    Disconnected,
    GetTwin,
    Inbound,
    InvokeMethod,
    Message,
    MethodResult,
    PatchDesired,
    PatchReported,
    ReceiveC2D,
    RespondMethod,
    SettleC2D,
    Transport,
    UnsupportedRequest,
)
from tests.peers.tls import TlsFiles

T = TypeVar("T")
HTTP_ROWS = [row for row in all_codes() if row.http_status is not None]


async def bounded(aw: Awaitable[T], seconds: float = 10.0) -> T:
    async with asyncio.timeout(seconds):
        return await aw


async def failure(aw: Awaitable[Any], seconds: float = 10.0) -> IoTHubError:
    """The IoTHubError ``aw`` raises (it must raise one, within ``seconds``)."""
    with pytest.raises(IoTHubError) as info:
        await bounded(aw, seconds)
    return info.value


@dataclass
class Env:
    hub: Hub
    front: HttpFront
    transport: HttpTransport

    def msg(self, mid: str, body: bytes = b"{}", **props: str) -> Message:
        return Message(mid, "d1", body, props)


def make_transport(hub: Hub, front: HttpFront, **kwargs: Any) -> HttpTransport:
    kwargs.setdefault("timeout", 5.0)
    kwargs.setdefault("ssl", None)
    return HttpTransport(hub.connection_string("d1"), service_connection_string=front.service_connection_string,
                         host=front.config.host, port=front.port, **kwargs)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    hub = Hub()
    hub.add_device("d1")
    hub.add_device("d2")
    front = HttpFront(hub)
    await bounded(front.start())
    transport = make_transport(hub, front)
    await bounded(transport.connect())
    yield Env(hub, front, transport)
    await bounded(transport.close())
    await bounded(front.stop())


# --- basics ------------------------------------------------------------------------------------------


def test_import_adapters_http_does_not_import_aiohttp() -> None:
    import subprocess
    import sys

    code = "import adapters.http, gateway, sys; assert 'aiohttp' not in sys.modules, 'aiohttp imported'"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
    assert "translate" in adapters.http.__all__


async def test_is_a_transport_and_sends_telemetry_with_id_and_properties(env: Env) -> None:
    assert isinstance(env.transport, Transport) and env.transport.name == "http"
    await bounded(env.transport.send(env.msg("m1", b"hello", temp="21", unit="C")))
    got = env.hub.received[0]
    assert (got.message_id, got.body, got.properties, got.transport) == ("m1", b"hello", {"temp": "21", "unit": "C"},
                                                                         "http")


async def test_not_connected_before_connect_and_after_close(env: Env) -> None:
    fresh = make_transport(env.hub, env.front)
    err = await failure(fresh.send(env.msg("m0")))
    assert err.code == 503904
    await bounded(env.transport.close())
    assert (await failure(env.transport.send(env.msg("m1")))).code == 503904
    await bounded(env.transport.close())  # idempotent
    await bounded(env.transport.connect())  # and reconnectable
    await bounded(env.transport.send(env.msg("m2")))
    assert env.hub.received_ids() == ["m2"]


async def test_one_session_closed_on_close(env: Env) -> None:
    pool = env.transport._pool
    assert pool is not None and not pool.session.closed
    await bounded(env.transport.connect())
    assert env.transport._pool is pool  # connect is idempotent: still one session
    await bounded(env.transport.close())
    assert pool.session.closed  # nothing was running on it: closed at once


def test_configured_by_host_port_and_ssl() -> None:
    conn = "HostName=hub.example;DeviceId=d1;SharedAccessKey=a2V5"
    assert HttpTransport(conn).url == "https://hub.example"  # IoT Hub: TLS on 443
    assert HttpTransport(conn, port=8443).url == "https://hub.example:8443"
    assert HttpTransport(conn, host="127.0.0.1", port=8080, ssl=None).url == "http://127.0.0.1:8080"
    assert HttpTransport(conn, host="::1", ssl=False).url == "http://[::1]"
    t = HttpTransport(conn)
    assert t.credential_expiry is None and t.ambiguous_drops is False  # tokens are per request
    with pytest.raises(TypeError):
        HttpTransport(conn, endpoint="https://hub.example")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        HttpTransport(conn, ssl="yes")  # type: ignore[arg-type]


async def test_reserved_and_empty_property_names_are_refused(env: Env) -> None:
    for props in ({"$.mid": "forged"}, {"": "x"}, {"$.ct": "text/plain"}):
        err = await failure(env.transport.send(Message("m1", "d1", b"x", props)))
        assert (err.code, err.retryable) == (400004, False), props
    assert env.hub.received == []


async def test_a_property_that_cannot_be_a_header_is_an_argument_error(env: Env) -> None:
    err = await failure(env.transport.send(env.msg("m1", bad="a\r\nInjected: yes")))
    assert err.code == 400004 and not err.retryable
    assert (await failure(env.transport.send(Message("m2", "d1", b"", {"bad name": "x"})))).code == 400004
    assert env.hub.received == []


# --- every code, every form, over the wire --------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
async def test_every_http_code_round_trips_over_the_wire(env: Env, form: str) -> None:
    wrong = []
    for row in HTTP_ROWS:
        env.hub.plan.add("telemetry", row.code, form=form)
        err = await failure(env.transport.send(env.msg(f"m{row.code}")))
        if (err.code, err.exact, err.transport, err.device_id) != (row.code, True, "http", "d1"):
            wrong.append((row.code, err.code, err.exact))
    assert wrong == []
    assert env.hub.received == []
    # and the connection pool survived ~190 error answers: a normal send still works
    await bounded(env.transport.send(env.msg("after")))
    assert env.hub.received_ids() == ["after"]


async def test_codes_on_every_endpoint(env: Env) -> None:
    env.front.enqueue_c2d("d1", b"x")
    t = env.transport
    calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("c2d_receive", t.receive_c2d),
        ("c2d_settle", partial(t.settle_c2d, "etag")),
        ("c2d_settle", partial(t.settle_c2d, "etag", "abandon")),
        ("twin_get", t.get_twin),
        ("method", partial(t.invoke_method, "d1", "m")),
    ]
    for operation, call in calls:
        env.hub.plan.add(operation, 503003, form="escaped")
        err = await failure(call())
        assert (err.code, err.exact) == (503003, True), operation


# --- Retry-After ---------------------------------------------------------------------------------------


async def test_retry_after_in_seconds(env: Env) -> None:
    env.hub.plan.add("telemetry", 429001, retry_after=7)
    before = time.time()
    err = await failure(env.transport.send(env.msg("m1")))
    assert isinstance(err, ThrottledError)
    assert err.retry_after == 7
    assert err.retry_at is not None and before + 7 <= err.retry_at <= time.time() + 7


async def test_retry_after_as_an_http_date(env: Env) -> None:
    env.front.retry_style = "date"
    env.hub.plan.add("telemetry", 429001, retry_after=120, form="top")
    err = await failure(env.transport.send(env.msg("m1")))
    assert err.retry_after is not None and 118 <= err.retry_after <= 121  # the date has 1 s resolution


async def test_retry_after_in_milliseconds(env: Env) -> None:
    env.hub.plan.add("telemetry", 503001, retry_after=0.25)
    err = await failure(env.transport.send(env.msg("m1")))
    assert (err.code, err.retry_after) == (503001, 0.25)


# --- hostile bodies and broken connections ------------------------------------------------------------


@pytest.mark.parametrize("form", CHAOS_FORMS)
async def test_malformed_html_and_endless_bodies_still_give_the_code(env: Env, form: str) -> None:
    env.hub.plan.add("telemetry", 429001, form=form)
    err = await failure(env.transport.send(env.msg("m1")), 10)
    assert err.code == 429001  # an endless body is not read to its end: the call returns, not times out
    assert len(err.native.get("body_excerpt", "")) <= 200


async def test_a_huge_success_body_is_cut_off_not_buffered(env: Env) -> None:
    env.front.enqueue_c2d("d1", b"x" * 100_000)
    small = make_transport(env.hub, env.front, max_body=10_000)
    await bounded(small.connect())
    try:
        err = await failure(small.receive_c2d())
        assert err.code == 400901 and not err.exact  # ProtocolViolation
    finally:
        await bounded(small.close())


async def test_slow_response_hits_the_timeout(env: Env) -> None:
    impatient = make_transport(env.hub, env.front, timeout=0.3)
    await bounded(impatient.connect())
    try:
        env.hub.plan.add("telemetry", kind="delay", delay=30)
        err = await failure(impatient.send(env.msg("m1")))
        assert isinstance(err, OperationTimeoutError) and err.code == 504901
        assert isinstance(err.__cause__, TimeoutError)
        assert (err.native["timeout"], err.native["phase"]) == ("read", "sent")  # the request went out
        # a caller's shorter deadline wins over the transport's
        env.hub.plan.add("twin_get", kind="delay", delay=30)
        err = await failure(env.transport.request(GetTwin(), timeout=0.2))
        assert err.code == 504901
    finally:
        await bounded(impatient.close())


async def test_no_ack_is_a_timeout_whose_message_was_accepted(env: Env) -> None:
    impatient = make_transport(env.hub, env.front, timeout=0.3)
    await bounded(impatient.connect())
    try:
        env.hub.plan.add("telemetry", kind="no_ack")
        assert (await failure(impatient.send(env.msg("m1")))).code == 504901
        assert env.hub.received_ids() == ["m1"]
    finally:
        await bounded(impatient.close())


async def test_connection_refused(env: Env) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: nothing accepts
        refused = HttpTransport(env.hub.connection_string("d1"), host="127.0.0.1", port=port, ssl=None, timeout=5)
        await bounded(refused.connect())
        try:
            err = await failure(refused.send(env.msg("m1")))
        finally:
            await bounded(refused.close())
    # nothing went out: NotConnected (a resend is no duplicate), the refusal kept as the cause
    assert err.code == 503904 and isinstance(err, ConnectionLostError) and not err.exact
    assert (err.native["cause_code"], err.native["phase"]) == (503901, "connect")
    assert isinstance(err.__cause__, aiohttp.ClientConnectorError)


async def test_reset_mid_body(env: Env) -> None:
    env.hub.plan.add("telemetry", kind="drop")
    err = await failure(env.transport.send(env.msg("m1")))
    assert err.code == 404104 and isinstance(err, ConnectionLostError)
    assert isinstance(err.__cause__, aiohttp.ClientPayloadError)
    assert env.hub.received_ids() == ["m1"]  # the hub took it; only the answer was lost
    await bounded(env.transport.send(env.msg("m2")))  # the pool recovers


async def test_tls_verification_failure_is_fatal(tls_files: TlsFiles) -> None:
    hub = Hub()
    hub.add_device("d1")
    front = HttpFront(hub, FrontConfig(ssl_context=tls_files.server_context()))
    await bounded(front.start())
    good = make_transport(hub, front, ssl=tls_files.client_context())
    bad = make_transport(hub, front, ssl=ssl.create_default_context())
    try:
        await bounded(good.connect())
        await bounded(bad.connect())
        await bounded(good.send(Message("m1", "d1", b"x")))
        err = await failure(bad.send(Message("m2", "d1", b"x")))
        assert err.code == 401901 and not err.retryable
    finally:
        await bounded(good.close())
        await bounded(bad.close())
        await bounded(front.stop())
    assert hub.received_ids() == ["m1"]


async def test_a_redirect_is_not_followed_but_classified() -> None:
    hits: list[str] = []

    async def moved(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=307, headers={"Location": "/elsewhere"})

    app = web.Application()
    app.router.add_post("/devices/d1/messages/events", moved)
    app.router.add_post("/elsewhere", moved)
    runner = web.AppRunner(app)
    await bounded(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await bounded(site.start())
    hub = Hub()
    t = HttpTransport(hub.connection_string("d1"), host="127.0.0.1", port=runner.addresses[0][1], ssl=None)
    try:
        await bounded(t.connect())
        err = await failure(t.send(Message("m1", "d1", b"x")))
    finally:
        await bounded(t.close())
        await bounded(runner.cleanup())
    assert (err.code, err.exact, err.http_status) == (307000, False, 307)
    assert hits == ["/devices/d1/messages/events"]


# --- SAS ---------------------------------------------------------------------------------------------


async def test_expired_token_is_401003_and_renewed_before_expiry(env: Env) -> None:
    real = time.time()
    adapter_now = [real - 3590]  # the adapter's clock lags: its first token expires in ~10 s of hub time
    t = make_transport(env.hub, env.front, clock=lambda: adapter_now[0], token_ttl=3600, renew_before=300)
    await bounded(t.connect())
    try:
        await bounded(t.send(env.msg("m1")))
        env.front.clock = lambda: real + 20  # the hub is now past that token's expiry
        adapter_now[0] = real - 3590 + 1  # not yet within renew_before: the old token is reused
        assert (await failure(t.send(env.msg("m2")))).code == 401003
        adapter_now[0] = real - 3590 + 3400  # within renew_before of expiry: a fresh token
        await bounded(t.send(env.msg("m3")))
    finally:
        await bounded(t.close())
    assert env.hub.received_ids() == ["m1", "m3"]


async def test_tokens_follow_wall_clock_steps_the_way_the_hub_judges_them(env: Env) -> None:
    """The hub judges a token's expiry by its clock: renewal compares our wall clock to it, never a duration."""
    real = time.time()
    wall = [real - 10 * 365 * 86400]  # an edge board booted without a real-time clock: years behind
    t = make_transport(env.hub, env.front, clock=lambda: wall[0], token_ttl=3600, renew_before=300)
    token = t._device_token
    assert token is not None
    await bounded(t.connect())
    try:
        assert (await failure(t.send(env.msg("m1")))).code == 401003  # signed with a years-old expiry
        wall[0] = real  # NTP steps the clock forward: the next request signs a good token at once
        await bounded(t.send(env.msg("m2")))
        assert token.expiry == int(real + 3600)
        wall[0] = real + 3600  # a step forward past the renewal point: renewed, no 401 first
        await bounded(t.send(env.msg("m3")))
        assert token.expiry == int(real + 7200)
        wall[0] = real  # stepped back: the token signed before is still good by the hub's clock, and reused
        await bounded(t.send(env.msg("m4")))
        assert token.expiry == int(real + 7200)
    finally:
        await bounded(t.close())
    assert env.hub.received_ids() == ["m2", "m3", "m4"]


def test_service_credential_parse_and_repr() -> None:
    cred = ServiceCredential.parse("HostName=h;SharedAccessKeyName=p;SharedAccessKey=a2V5")
    assert (cred.host_name, cred.key_name) == ("h", "p") and "a2V5" not in repr(cred)
    with pytest.raises(ValueError, match="SharedAccessKeyName"):
        ServiceCredential.parse("HostName=h;SharedAccessKey=a2V5")
    with pytest.raises(ValueError):
        HttpTransport()


# --- C2D, twin, methods, events ------------------------------------------------------------------------


async def test_c2d_receive_complete_reject_abandon(env: Env) -> None:
    t = env.transport
    assert await bounded(t.receive_c2d()) is None
    env.front.enqueue_c2d("d1", b"one", "c1")
    env.front.enqueue_c2d("d1", b"two", "c2")
    first = await bounded(t.request(ReceiveC2D(), timeout=5))
    assert isinstance(first, C2DMessage) and (first.message_id, first.body, first.device_id) == ("c1", b"one", "d1")
    assert first.lock_token  # the ETag
    await bounded(t.request(SettleC2D.of(first, "abandon"), timeout=5))
    again = await bounded(t.request(ReceiveC2D(), timeout=5))
    assert again is not None and again.message_id == "c1" and again.lock_token != first.lock_token
    await bounded(t.request(SettleC2D(again.lock_token, "complete"), timeout=5))
    second = await bounded(t.receive_c2d())
    assert second is not None and second.message_id == "c2"
    await bounded(t.request(SettleC2D.of(second, "reject"), timeout=5))
    assert await bounded(t.receive_c2d()) is None
    err = await failure(t.settle_c2d(second.lock_token))  # already settled: the lock means nothing now
    assert err.code == 412001


async def test_late_complete_is_lock_lost(env: Env) -> None:
    now = [time.time()]
    env.front.clock = lambda: now[0]
    env.front.enqueue_c2d("d1", b"late")
    msg = await bounded(env.transport.receive_c2d())
    assert msg is not None
    now[0] += 61
    err = await failure(env.transport.settle_c2d(msg.lock_token))
    assert (err.code, err.exact, err.retryable) == (412002, True, False)


async def test_twin_read_and_desired_patch(env: Env) -> None:
    t = env.transport
    twin = await bounded(t.request(GetTwin(), timeout=5))
    assert twin["deviceId"] == "d1"
    other = await bounded(t.request(GetTwin("d2"), timeout=5))  # another device: with the service credential
    assert other["deviceId"] == "d2"
    assert (await failure(t.request(GetTwin("ghost"), timeout=5))).code == 404001
    patched = await bounded(t.request(PatchDesired("d2", {"fan": "on"}), timeout=5))
    assert patched["properties"]["desired"]["fan"] == "on"
    stale = await failure(t.request(PatchDesired("d2", {"fan": "off"}, etag=other["etag"]), timeout=5))
    assert stale.code // 1000 == 412  # the twin moved on since that etag
    again = await bounded(t.request(GetTwin("d2"), timeout=5))
    assert again["properties"]["desired"]["fan"] == "on"


async def test_requests_the_http_surface_lacks_raise_at_once(env: Env) -> None:
    t = env.transport
    before = env.front.stats.requests
    for request in (PatchReported({"a": 1}), RespondMethod("rid", 200, None)):
        with pytest.raises(UnsupportedRequest) as info:
            await bounded(t.request(request, timeout=5))
        assert isinstance(info.value, TypeError)  # a programming error, never classified and retried
    with pytest.raises(UnsupportedRequest):
        await bounded(t.request("twin_get", timeout=5))  # type: ignore[arg-type]  # the old string kinds
    with pytest.raises(UnsupportedRequest):
        await bounded(t.settle_c2d("etag", "bury"))  # type: ignore[arg-type]
    assert env.front.stats.requests == before  # nothing went to the wire


async def test_method_offline_timeout_and_success(env: Env) -> None:
    t = env.transport
    err = await failure(t.request(InvokeMethod("d2", "reboot"), timeout=5))
    assert isinstance(err, DeviceOfflineError) and (err.code, err.device_id) == (404103, "d2")
    assert t.watched == {"d2"}
    handle = object()

    async def never(name: str, payload: Any, timeout: float) -> tuple[int, Any]:
        await asyncio.sleep(60)
        return 200, None

    env.hub.attach("d2", "test", handle)
    env.hub.serve_methods("d2", handle, never)
    err = await failure(t.invoke_method("d2", "reboot", response_timeout=0.2))
    assert isinstance(err, DeviceOfflineError) and err.code == 504101

    async def answer(name: str, payload: Any, timeout: float) -> tuple[int, Any]:
        return 200, {"echo": payload}

    env.hub.serve_methods("d2", handle, answer)
    result = await bounded(t.request(InvokeMethod("d2", "m", [1]), timeout=5))
    assert result == MethodResult(200, {"echo": [1]})


async def test_events_end_on_close_when_nothing_is_watched(env: Env) -> None:
    stream = env.transport.events()
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)
    assert not pending.done()
    await bounded(env.transport.close())
    with pytest.raises(StopAsyncIteration):
        await bounded(pending)


async def test_events_poll_c2d_and_presence(env: Env) -> None:
    t = make_transport(env.hub, env.front, c2d_poll_interval=0.02, presence_interval=0.02)
    await bounded(t.connect())
    try:
        stream = t.events()
        env.front.enqueue_c2d("d1", b"pushed", "c9")
        event = await bounded(anext(stream))
        assert isinstance(event, Inbound) and event.kind == "c2d" and isinstance(event.payload, C2DMessage)
        assert event.payload.message_id == "c9" and event.device_id == "d1"
        await failure(t.invoke_method("d2", "m"))
        env.hub.attach("d2", "test", object())
        event = await bounded(anext(stream))
        assert event == DeviceOnline("d2") and t.watched == frozenset()
        await bounded(env.front.stop())  # the hub goes away: the poll fails with a connection-level code
        event = await bounded(anext(stream))
        assert isinstance(event, Disconnected) and event.error.code == 503904  # refused: nothing went out
        assert event.error.native["cause_code"] == 503901
    finally:
        await bounded(t.close())


# --- with the Handler ---------------------------------------------------------------------------------


def quick_policy(**device: Any) -> Policy:
    fast = Backoff(initial=0.01, multiplier=2.0, cap=0.05, jitter=1.0, max_attempts=50, max_elapsed=30.0)
    return Policy(PolicyConfig(
        retry=fast,
        reconnect=Backoff(initial=0.01, multiplier=2.0, cap=0.05, jitter=1.0, max_attempts=0, max_elapsed=0.0),
        throttle=ThrottleBackoff(initial=0.05, cap=0.2),
        device=DeviceConfig(**device) if device else DeviceConfig(),
    ))


class RecordingClock(SystemClock):
    """The real clock, remembering every wait the handler asked for (behaviour, not wall time)."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await super().sleep(seconds)


@contextlib.asynccontextmanager
async def running(handler: Handler) -> AsyncIterator[Handler]:
    await bounded(handler.start())
    try:
        await bounded(handler.wait_connected(5))
        yield handler
    finally:
        await bounded(handler.close())


# The handler takes typed requests (Handler.request(InvokeMethod(...))) from the wave-2 handler on; until that
# lands on this branch, the old handler would hand the transport a string kind.


async def test_handler_holds_a_method_for_an_offline_device_and_delivers_it_when_online(env: Env) -> None:
    t = make_transport(env.hub, env.front, presence_interval=0.05)
    calls: list[tuple[str, Any]] = []

    async def invoker(name: str, payload: Any, timeout: float) -> tuple[int, Any]:
        calls.append((name, payload))
        return 200, "rebooted"

    async with running(Handler(t, policy=quick_policy())) as handler:
        call = asyncio.ensure_future(handler.request(InvokeMethod("d2", "reboot", 1), timeout=20))
        async with asyncio.timeout(10):
            while handler.held("d2") == 0:
                await asyncio.sleep(0.01)
        assert not call.done() and calls == [] and "d2" in handler.offline_devices()
        handle = object()  # the device connects (through some front) and subscribes to methods
        env.hub.attach("d2", "test", handle)
        env.hub.serve_methods("d2", handle, invoker)
        result = await bounded(call)
    assert result == MethodResult(200, "rebooted")
    assert calls == [("reboot", 1)]


async def test_handler_honours_retry_after_on_throttling(env: Env) -> None:
    clock = RecordingClock()
    changes: list[StateChange] = []
    t = make_transport(env.hub, env.front)
    env.hub.plan.add("telemetry", 429001, retry_after=0.3, form="nested")
    async with running(Handler(t, policy=quick_policy(), clock=clock, on_state_change=changes.append)) as handler:
        receipt = await bounded(handler.send(Message("m1", "d1", b"x"), timeout=10))
    assert receipt.attempts == 2
    throttled = [c for c in changes if c.state is State.THROTTLED]
    assert throttled and throttled[0].code == 429001 and throttled[0].cause is not None
    assert throttled[0].cause.retry_after == 0.3
    assert throttled[0].until is not None and throttled[0].until - throttled[0].at >= 0.3
    # the wait before the second attempt was the hub's 0.3 s (plus jitter), not the 0.05 s throttle curve;
    # the gate sleeps ``until - now`` from a task that a loaded machine starts late, so it can be shorter
    assert any(0.2 <= s <= 0.34 for s in clock.sleeps), clock.sleeps
    assert env.hub.received_ids() == ["m1"]


async def test_handler_loses_no_accepted_telemetry(env: Env) -> None:
    # The timeout only has to outlast the scripted no-ack; short enough to keep the test quick, long
    # enough that a slow answer on a loaded machine is not one more (unscripted) possible duplicate.
    impatient = make_transport(env.hub, env.front, timeout=1.5)
    plan = env.hub.plan
    plan.add("telemetry", 503001, times=3)
    plan.add("telemetry", kind="drop", times=2)
    plan.add("telemetry", 500001, form="header", times=2)
    plan.add("telemetry", kind="no_ack", times=1)
    plan.add("telemetry", 429001, retry_after=0.1, times=1)
    plan.add("telemetry", kind="delay", delay=0.05, times=3)
    undelivered: list[Undelivered] = []
    ids = [f"m{i}" for i in range(40)]
    async with running(Handler(impatient, policy=quick_policy(), on_undelivered=undelivered.append)) as handler:
        receipts = await bounded(asyncio.gather(*(handler.send(Message(i, "d1", i.encode()), timeout=20)
                                                  for i in ids)), 30)
    assert env.hub.plan.pending() == []  # every scripted fault was met
    assert undelivered == []
    assert [r.id for r in receipts] == ids
    received = env.hub.received_ids()
    assert set(received) == set(ids)  # every message arrived; drops may have delivered some twice
    assert len(received) - len(set(received)) <= 3
    duplicates = {r.id for r in receipts if r.possible_duplicate}
    assert {i for i in received if received.count(i) > 1} <= duplicates


async def test_handler_refreshes_the_token_on_401003(env: Env) -> None:
    real = time.time()
    adapter_now = [real - 3590]  # the first token expires ~10 s from now in hub time
    t = make_transport(env.hub, env.front, clock=lambda: adapter_now[0])
    refreshes: list[float | None] = []

    async def refresh() -> float | None:
        adapter_now[0] = time.time()  # the adapter's clock catches up; the next token is good for an hour
        expiry = await t.refresh_credentials()
        refreshes.append(expiry)
        return expiry

    async with running(Handler(t, policy=quick_policy(), refresh_credentials=refresh)) as handler:
        env.front.clock = lambda: real + 20  # the hub is past the first token's expiry
        receipt = await bounded(handler.send(Message("m1", "d1", b"x"), timeout=10))
    assert receipt.attempts == 2
    assert len(refreshes) == 1 and refreshes[0] is not None and refreshes[0] > real + 3000
    assert env.hub.received_ids() == ["m1"]
