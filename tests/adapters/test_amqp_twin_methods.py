"""Twin and direct-method links of the AMQP adapter against the emulator's AMQP front, over real sockets.

A direct method is invoked through the HTTP front (service side) and must reach the AMQP-connected
device through the hub, its answer coming back to the HTTP caller; twin answers with an error status
must come back as the exact code in their body, or the status family without one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.amqp.emulator import AmqpFront
from adapters.amqp.transport import AmqpRemoteError, AmqpTransport, _twin_error
from adapters.http.emulator import HttpFront
from adapters.http.transport import HttpTransport, MethodResult
from gateway.emulator import Hub
from gateway.errors import IoTHubError
from gateway.transport import (
    Disconnected,
    GetTwin,
    Inbound,
    InvokeMethod,
    Message,
    MethodCall,
    PatchReported,
    ReceiveC2D,
    Request,
    RespondMethod,
    UnsupportedRequest,
)

STEP = 5.0


pytestmark = pytest.mark.usefixtures("no_amqp_thread_left")


@pytest.fixture
def front(amqp_front: AmqpFront) -> AmqpFront:
    return amqp_front


@pytest.fixture
async def service(hub: Hub) -> AsyncIterator[HttpTransport]:
    """The service side: an HTTP transport with the service credential, on the same hub."""
    http = HttpFront(hub)
    await asyncio.wait_for(http.start(), STEP)
    t = HttpTransport(hub.connection_string("d2"), service_connection_string=http.service_connection_string,
                      host="127.0.0.1", port=http.port, ssl=None, timeout=STEP)
    await asyncio.wait_for(t.connect(), STEP)
    yield t
    await asyncio.wait_for(t.close(), STEP)
    await asyncio.wait_for(http.stop(), STEP)


async def connected(hub: Hub, front: AmqpFront, device: str = "d1", **kw: Any) -> AmqpTransport:
    kw.setdefault("send_timeout", STEP)
    kw.setdefault("connect_timeout", STEP)
    kw.setdefault("close_timeout", 2.0)
    t = AmqpTransport.from_connection_string(hub.connection_string(device), host="127.0.0.1", port=front.port,
                                             ssl=None, **kw)
    await asyncio.wait_for(t.connect(), STEP)
    return t


async def twin_error(t: AmqpTransport, request: Request) -> IoTHubError:
    with pytest.raises(IoTHubError) as info:
        await asyncio.wait_for(t.request(request, timeout=STEP), STEP * 2)
    return info.value


async def until(condition: Callable[[], bool]) -> None:
    """Wait (bounded) for something another thread does next."""
    async with asyncio.timeout(STEP):
        while not condition():
            await asyncio.sleep(0.01)


async def answer_methods(t: AmqpTransport, seen: list[MethodCall], status: int = 200) -> None:
    """The device side: answer every method call with its payload echoed (``seen`` once the hub took it)."""
    async for event in t.events():
        if isinstance(event, Inbound) and event.kind == "method":
            call = event.payload
            assert isinstance(call, MethodCall)
            await t.request(RespondMethod(call.rid, status, {"echo": call.payload, "name": call.name}), timeout=STEP)
            seen.append(call)


# -- twin --------------------------------------------------------------------------------------------


async def test_twin_get_and_patch_round_trip_with_version(hub: Hub, front: AmqpFront) -> None:
    device = hub.device("d1")
    assert device is not None
    device.twin_desired["fan"] = "on"
    t = await connected(hub, front)  # default: no twin links until a twin request asks for them
    try:
        twin = await asyncio.wait_for(t.request(GetTwin(), timeout=STEP), STEP)
        assert twin["desired"] == {"fan": "on", "$version": 1}
        assert twin["reported"] == {"$version": 1}
        answer = await asyncio.wait_for(t.request(PatchReported({"temp": 21.5, "mode": "eco"}), timeout=STEP), STEP)
        assert answer == 2
        assert device.twin_reported == {"temp": 21.5, "mode": "eco"}
        answer = await asyncio.wait_for(t.request(PatchReported({"mode": None}), timeout=STEP), STEP)
        assert answer == 3 and device.twin_reported == {"temp": 21.5}
        twin = await asyncio.wait_for(t.request(GetTwin(), timeout=STEP), STEP)
        assert twin["reported"] == {"temp": 21.5, "$version": 3}
        # telemetry still flows beside the twin links
        await asyncio.wait_for(t.send(Message("m-1", "d1", b"x")), STEP)
        assert hub.received_ids("d1") == ["m-1"]
    finally:
        await t.close()


async def test_twin_subscription_attaches_at_connect(hub: Hub, front: AmqpFront) -> None:
    t = await connected(hub, front, subscribe=("twin", "methods"))
    try:
        assert t._bridge is not None and t._bridge.attached == {"twin", "methods"}
        assert await asyncio.wait_for(t.request(PatchReported({"a": 1}), timeout=STEP), STEP) == 2
    finally:
        await t.close()


@pytest.mark.parametrize("code", [400027, 401003, 404001, 412002, 429001, 500001, 503003])
async def test_twin_errors_come_back_exact(hub: Hub, front: AmqpFront, code: int) -> None:
    hub.plan.add("twin_get", code, device="d1", transport="amqp")
    hub.plan.add("twin_patch", code, device="d1", transport="amqp")
    t = await connected(hub, front)
    try:
        for request in (GetTwin(), PatchReported({"x": 1})):
            err = await twin_error(t, request)
            assert (err.code, err.exact, err.transport, err.device_id) == (code, True, "amqp", "d1")
            assert isinstance(err.__cause__, AmqpRemoteError) and err.__cause__.where == "twin"
            assert err.tracking_id is not None and err.tracking_id.startswith("emu-")
        # the connection is fine afterwards: the fault was used up
        assert await asyncio.wait_for(t.request(PatchReported({"x": 2}), timeout=STEP), STEP) == 2
    finally:
        await t.close()


def test_twin_answer_without_error_code_is_its_status_family() -> None:
    err = _twin_error(404, b'{"message": "no such twin"}')
    assert err is not None and (err.code, err.exact) == (404000, False)
    err = _twin_error(503, b"")
    assert err is not None and (err.code, err.exact) == (503000, False)
    err = _twin_error(429, b'{"errorCode": 429001, "trackingId": "t-1"}')
    assert err is not None and (err.code, err.exact, err.tracking_id) == (429001, True, "t-1")
    assert _twin_error(200, b"{}") is None and _twin_error(204, b"") is None and _twin_error(None, b"") is None
    err = _twin_error("junk", b"")
    assert err is not None and err.name == "ProtocolViolation"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@given(status=st.none() | st.integers() | st.text(max_size=10) | st.binary(max_size=10) | st.booleans(),
       body=st.binary(max_size=200) | _JSON.map(lambda v: json.dumps(v).encode())
       | st.dictionaries(st.sampled_from(["errorCode", "message", "trackingId", "x"]), _JSON, max_size=4)
       .map(lambda v: json.dumps(v).encode()))
def test_hostile_twin_answers_never_crash(status: object, body: bytes) -> None:
    err = _twin_error(status, body)
    assert err is None or (isinstance(err, IoTHubError) and 100_000 <= err.code <= 999_999)


async def test_twin_fault_on_the_link_disconnects_with_that_code(hub: Hub, front: AmqpFront) -> None:
    hub.plan.add("twin_get", 429001, device="d1", transport="amqp", form="link")
    t = await connected(hub, front)
    try:
        err = await twin_error(t, GetTwin())
        # in flight when the link went: outcome unknown, with the link's condition as the cause
        assert err.name == "DeviceConnectionClosedRemotely" and isinstance(err.__cause__, IoTHubError)
        assert err.__cause__.code == 429001
        events = [e async for e in t.events()]
        assert isinstance(events[-1], Disconnected) and events[-1].error.code == 429001
    finally:
        await t.close()


async def test_twin_no_answer_times_out(hub: Hub, front: AmqpFront) -> None:
    hub.plan.add("twin_patch", kind="no_ack", device="d1", transport="amqp")
    t = await connected(hub, front)
    try:
        with pytest.raises(IoTHubError) as info:
            await asyncio.wait_for(t.request(PatchReported({"x": 1}), timeout=0.5), STEP)
        assert info.value.name == "OperationTimedOut"
        assert await asyncio.wait_for(t.request(GetTwin(), timeout=STEP), STEP)  # commands run in order
        assert t._bridge is not None and t._bridge.twin_requests == {}  # so the timed-out waiter is forgotten
    finally:
        await t.close()


# -- direct methods through the HTTP front ------------------------------------------------------------


async def test_method_over_http_reaches_the_amqp_device_and_its_answer_comes_back(
    hub: Hub, front: AmqpFront, service: HttpTransport
) -> None:
    t = await connected(hub, front, subscribe=("methods",))
    seen: list[MethodCall] = []
    task = asyncio.create_task(answer_methods(t, seen))
    try:
        result = await asyncio.wait_for(
            service.invoke_method("d1", "reboot", {"delay": 3}), STEP * 2)
        assert result == MethodResult(200, {"echo": {"delay": 3}, "name": "reboot"})
        await until(lambda: len(seen) == 1)
        assert seen[0].name == "reboot" and seen[0].payload == {"delay": 3} and seen[0].rid
    finally:
        await t.close()
        await asyncio.wait_for(task, STEP)


async def test_method_status_from_the_device_is_passed_through(
    hub: Hub, front: AmqpFront, service: HttpTransport
) -> None:
    t = await connected(hub, front, subscribe=("methods",))
    seen: list[MethodCall] = []
    task = asyncio.create_task(answer_methods(t, seen, status=404))
    try:
        result = await asyncio.wait_for(service.invoke_method("d1", "missing", {"a": 1}), STEP * 2)
        assert result.status == 404
        await until(lambda: len(seen) == 1)
    finally:
        await t.close()
        await asyncio.wait_for(task, STEP)


async def test_method_to_a_device_that_never_answers_is_gateway_timeout(
    hub: Hub, front: AmqpFront, service: HttpTransport
) -> None:
    t = await connected(hub, front, subscribe=("methods",))
    got: list[Any] = []

    async def listen() -> None:
        async for event in t.events():
            got.append(event)

    task = asyncio.create_task(listen())
    try:
        with pytest.raises(IoTHubError) as info:
            await asyncio.wait_for(service.invoke_method("d1", "slow", None, response_timeout=1), STEP * 2)
        assert info.value.code == 504101
        assert [e.kind for e in got if isinstance(e, Inbound)] == ["method"]  # it arrived, nobody answered
        await until(lambda: front._server.pending_methods == {})  # the front forgot the call
    finally:
        await t.close()
        await asyncio.wait_for(task, STEP)


async def test_method_to_a_device_without_method_links_is_not_online(
    hub: Hub, front: AmqpFront, service: HttpTransport
) -> None:
    t = await connected(hub, front)  # connected, but never attached the method links
    try:
        with pytest.raises(IoTHubError) as info:
            await asyncio.wait_for(service.invoke_method("d1", "m", None), STEP * 2)
        assert info.value.code == 404103
    finally:
        await t.close()


async def test_method_fault_on_the_amqp_side_never_reaching_the_device_times_out(
    hub: Hub, front: AmqpFront, service: HttpTransport
) -> None:
    hub.plan.add("method", kind="no_ack", device="d1", transport="amqp")
    t = await connected(hub, front, subscribe=("methods",))
    seen: list[MethodCall] = []
    task = asyncio.create_task(answer_methods(t, seen))
    try:
        with pytest.raises(IoTHubError) as info:
            await asyncio.wait_for(service.invoke_method("d1", "m", None, response_timeout=1), STEP * 2)
        assert info.value.code == 504101 and seen == []
        result = await asyncio.wait_for(service.invoke_method("d1", "m", 7), STEP * 2)
        assert result.payload == {"echo": 7, "name": "m"}
        await until(lambda: len(seen) == 1)
    finally:
        await t.close()
        await asyncio.wait_for(task, STEP)


async def test_method_response_needs_an_open_link(hub: Hub, front: AmqpFront) -> None:
    t = await connected(hub, front)  # no method links attached
    try:
        with pytest.raises(IoTHubError) as info:
            await asyncio.wait_for(t.request(RespondMethod("1", 200), timeout=STEP), STEP)
        assert info.value.name == "NotConnected"
    finally:
        await t.close()


@pytest.mark.parametrize("request_", [
    ReceiveC2D(),
    InvokeMethod("d2", "reboot"),
    GetTwin("d2"),
    "twin_get",  # the old string vocabulary is gone
])
async def test_a_request_the_surface_lacks_is_a_programming_error_at_once(
    hub: Hub, front: AmqpFront, request_: Any
) -> None:
    t = await connected(hub, front)
    try:
        with pytest.raises(UnsupportedRequest) as info:
            await asyncio.wait_for(t.request(request_, timeout=STEP), STEP)
        assert isinstance(info.value, TypeError) and not isinstance(info.value, IoTHubError)
        assert t.connected  # nothing was sent, the connection is untouched
    finally:
        await t.close()


async def test_malformed_requests_raise_type_errors_before_anything_is_sent(hub: Hub, front: AmqpFront) -> None:
    t = await connected(hub, front, subscribe=("methods",))
    try:
        for bad in (RespondMethod("1", "200"),  # type: ignore[arg-type]
                    RespondMethod("1", 200, object()),
                    PatchReported(["not", "a", "mapping"])):  # type: ignore[arg-type]
            with pytest.raises(TypeError) as info:
                await asyncio.wait_for(t.request(bad, timeout=STEP), STEP)
            assert not isinstance(info.value, IoTHubError)
        with pytest.raises(ValueError):
            await asyncio.wait_for(t.request(RespondMethod("1", 2**40), timeout=STEP), STEP)
        assert t.connected  # none of them reached the proton thread, let alone the wire
        assert hub.device("d1").twin_version == 1  # type: ignore[union-attr]
    finally:
        await t.close()


def test_unknown_subscription_is_refused(hub: Hub) -> None:
    with pytest.raises(ValueError):
        AmqpTransport.from_connection_string(hub.connection_string("d1"), subscribe=("c2d-bogus",))


async def test_twin_requests_through_the_handler_ride_out_throttling(hub: Hub, front: AmqpFront) -> None:
    """The handler treats a twin request over AMQP like any operation: throttled, waited, retried."""
    from gateway.handler import Handler
    from gateway.policy import Backoff, Policy, PolicyConfig, ThrottleBackoff

    quick = Backoff(initial=0.02, multiplier=2.0, cap=0.1, jitter=0.0, max_attempts=20, max_elapsed=0.0)
    policy = Policy(PolicyConfig(retry=quick, reconnect=quick,
                                 throttle=ThrottleBackoff(initial=0.02, cap=0.1, jitter=0.0, max_retry_after=0.2)))
    transport = AmqpTransport.from_connection_string(
        hub.connection_string("d1"), host="127.0.0.1", port=front.port, ssl=None, subscribe=("twin",),
        send_timeout=STEP, connect_timeout=STEP, close_timeout=2.0)
    async with Handler(transport, policy=policy, identity="d1") as handler:
        await handler.wait_connected(STEP)
        hub.plan.add("twin_patch", 429001, device="d1", times=2, retry_after=0.05)
        answer = await asyncio.wait_for(handler.request(PatchReported({"fw": "2.0"}), timeout=STEP), STEP * 2)
        assert answer == hub.device("d1").twin_version  # type: ignore[union-attr]
        assert hub.device("d1").twin_reported["fw"] == "2.0"  # type: ignore[union-attr]
        assert handler.metrics()[(429001, "amqp", "throttled")] == 2
        twin = await asyncio.wait_for(handler.request(GetTwin(), timeout=STEP), STEP)
        assert twin["reported"]["fw"] == "2.0"
