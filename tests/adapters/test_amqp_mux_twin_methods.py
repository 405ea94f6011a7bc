"""Twin and direct methods on multiplexed AMQP devices, against the emulator's AMQP front over TLS.

The same semantics and error mapping as ``AmqpTransport`` (test_amqp_twin_methods.py), per device on
one shared connection: each device's twin and method links are its own, so an answer, a refusal or a
lost link reaches that device alone while its neighbours keep their twins, methods and telemetry.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from adapters.amqp.core import AmqpRemoteError
from adapters.amqp.emulator import AmqpFront
from adapters.amqp.mux import AmqpMux, MuxDevice
from adapters.http.emulator import HttpFront
from adapters.http.transport import HttpTransport, MethodResult
from gateway.emulator import Hub
from gateway.errors import IoTHubError
from gateway.handler import Handler
from gateway.tls import client_context
from gateway.transport import (
    DesiredPatch,
    Disconnected,
    GetTwin,
    Inbound,
    InvokeMethod,
    Message,
    MethodCall,
    PatchReported,
    ReceiveC2D,
    RespondMethod,
    TransportEvent,
    UnsupportedRequest,
)
from tests.peers.emulator import tls_amqp_front

STEP = 5.0
DEVICES = ["m1", "m2", "m3"]


@pytest.fixture
def hub() -> Hub:
    h = Hub()
    for d in DEVICES:
        h.add_device(d)
    return h


@pytest.fixture
async def front(hub: Hub, tls_files: Any) -> AsyncIterator[AmqpFront]:
    async with tls_amqp_front(hub, tls_files) as f:
        yield f


@pytest.fixture
async def mux(hub: Hub, front: AmqpFront, tls_files: Any) -> AsyncIterator[AmqpMux]:
    m = AmqpMux(host="localhost", port=front.port, ssl=client_context(str(tls_files.ca_pem)),
                hub_host=hub.host_name, backoff=(0.05, 0.2), rng=random.Random(3))
    yield m
    await asyncio.wait_for(m.close(), STEP * 3)
    thread = m.thread
    if thread is not None:
        thread.join(2.0)
        assert not thread.is_alive()


@pytest.fixture
async def service(hub: Hub) -> AsyncIterator[HttpTransport]:
    """The service side (direct methods are invoked over HTTP), on the same hub."""
    http = HttpFront(hub)
    await asyncio.wait_for(http.start(), STEP)
    t = HttpTransport(hub.connection_string("m3"), service_connection_string=http.service_connection_string,
                      host="127.0.0.1", port=http.port, ssl=None, timeout=STEP)
    await asyncio.wait_for(t.connect(), STEP)
    yield t
    await asyncio.wait_for(t.close(), STEP)
    await asyncio.wait_for(http.stop(), STEP)


def device(mux: AmqpMux, hub: Hub, device_id: str, **kw: Any) -> MuxDevice:
    return mux.device(device_id, token=lambda: hub.token(device_id, int(time.time() + 3600)),
                      connect_timeout=STEP, send_timeout=STEP, **kw)


async def connected(mux: AmqpMux, hub: Hub, *device_ids: str, **kw: Any) -> list[MuxDevice]:
    ds = [device(mux, hub, d, **kw) for d in device_ids]
    await asyncio.wait_for(asyncio.gather(*(d.connect() for d in ds)), STEP * 2)
    return ds


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(STEP):
        while not condition():
            await asyncio.sleep(0.01)


async def next_event(d: MuxDevice) -> TransportEvent:
    async def first() -> TransportEvent:
        async for event in d.events():
            return event
        raise AssertionError("the event stream ended")

    return await asyncio.wait_for(first(), STEP)


async def answer_methods(d: MuxDevice, seen: list[MethodCall], status: int = 200) -> None:
    async for event in d.events():
        if isinstance(event, Inbound) and event.kind == "method":
            call = event.payload
            assert isinstance(call, MethodCall)
            await d.request(RespondMethod(call.rid, status, {"by": d.device_id, "echo": call.payload}),
                            timeout=STEP)
            seen.append(call)


# -- twin ---------------------------------------------------------------------------------------------


async def test_each_device_reads_and_patches_its_own_twin_on_one_connection(
    hub: Hub, front: AmqpFront, mux: AmqpMux
) -> None:
    hub.device("m1").twin_desired["fan"] = "on"  # type: ignore[union-attr]
    one, two = await connected(mux, hub, "m1", "m2")
    assert front.connections() == 1 and mux.connections() == [2]
    twin = await asyncio.wait_for(one.request(GetTwin(), timeout=STEP), STEP)
    assert twin["desired"] == {"fan": "on", "$version": 1}
    assert await asyncio.wait_for(one.request(PatchReported({"temp": 21.5}), timeout=STEP), STEP) == 2
    assert await asyncio.wait_for(two.request(PatchReported({"mode": "eco"}), timeout=STEP), STEP) == 2
    assert await asyncio.wait_for(one.request(PatchReported({"temp": None, "x": 1}), timeout=STEP), STEP) == 3
    assert hub.device("m1").twin_reported == {"x": 1}  # type: ignore[union-attr]
    assert hub.device("m2").twin_reported == {"mode": "eco"}  # type: ignore[union-attr]
    twin = await asyncio.wait_for(two.request(GetTwin(), timeout=STEP), STEP)
    assert twin["reported"] == {"mode": "eco", "$version": 2} and twin["desired"] == {"$version": 1}
    await asyncio.wait_for(two.send(Message("beside", "m2", b"x")), STEP)  # telemetry beside the twin links
    assert hub.received_ids("m2") == ["beside"]
    assert front.connections() == 1


async def test_desired_patches_reach_only_their_device(hub: Hub, mux: AmqpMux) -> None:
    one, two = await connected(mux, hub, "m1", "m2", subscribe=("twin",))
    await until(lambda: hub.watches_desired("m1") and hub.watches_desired("m2"))
    version = hub.update_desired("m2", {"rate": 5})
    event = await next_event(two)
    assert isinstance(event, Inbound) and event.kind == "twin_desired" and event.device_id == "m2"
    assert isinstance(event.payload, DesiredPatch)
    assert event.payload.version == version and event.payload.patch["rate"] == 5
    with pytest.raises(TimeoutError):  # m1 heard nothing of m2's patch
        await asyncio.wait_for(next_event(one), 0.3)


@pytest.mark.parametrize("code", [400027, 404001, 412002, 429001, 503003])
async def test_twin_errors_come_back_exact_to_that_device_alone(hub: Hub, mux: AmqpMux, code: int) -> None:
    hub.plan.add("twin_get", code, device="m1", transport="amqp")
    hub.plan.add("twin_patch", code, device="m1", transport="amqp")
    one, two = await connected(mux, hub, "m1", "m2")
    for request in (GetTwin(), PatchReported({"x": 1})):
        with pytest.raises(IoTHubError) as info:
            await asyncio.wait_for(one.request(request, timeout=STEP), STEP * 2)
        err = info.value
        assert (err.code, err.exact, err.transport, err.device_id) == (code, True, "amqp", "m1")
        assert isinstance(err.__cause__, AmqpRemoteError) and err.__cause__.where == "twin"
    assert await asyncio.wait_for(two.request(PatchReported({"y": 1}), timeout=STEP), STEP) == 2
    assert await asyncio.wait_for(one.request(PatchReported({"x": 2}), timeout=STEP), STEP) == 2  # used up
    assert one.connected and two.connected


async def test_a_twin_link_fault_disconnects_that_device_alone(hub: Hub, front: AmqpFront, mux: AmqpMux) -> None:
    hub.plan.add("twin_get", 429001, device="m1", transport="amqp", form="link")
    one, two = await connected(mux, hub, "m1", "m2")
    with pytest.raises(IoTHubError) as info:
        await asyncio.wait_for(one.request(GetTwin(), timeout=STEP), STEP * 2)
    # in flight when the link went: outcome unknown, with the link's condition as the cause
    assert info.value.name == "DeviceConnectionClosedRemotely" and isinstance(info.value.__cause__, IoTHubError)
    assert info.value.__cause__.code == 429001
    event = await next_event(one)
    assert isinstance(event, Disconnected) and event.error.code == 429001 and event.error.device_id == "m1"
    assert not one.connected and two.connected
    await asyncio.wait_for(two.send(Message("neighbour", "m2", b"x")), STEP)
    assert isinstance(await asyncio.wait_for(two.request(GetTwin(), timeout=STEP), STEP), dict)
    await asyncio.wait_for(one.connect(), STEP)  # rejoins the same shared connection
    assert front.connections() == 1 and mux.connection_attempts == 1
    assert isinstance(await asyncio.wait_for(one.request(GetTwin(), timeout=STEP), STEP), dict)


async def test_a_twin_request_without_answer_times_out_and_is_forgotten(hub: Hub, mux: AmqpMux) -> None:
    hub.plan.add("twin_patch", kind="no_ack", device="m1", transport="amqp")
    (one,) = await connected(mux, hub, "m1")
    with pytest.raises(IoTHubError) as info:
        await asyncio.wait_for(one.request(PatchReported({"x": 1}), timeout=0.5), STEP)
    assert info.value.name == "OperationTimedOut"
    assert await asyncio.wait_for(one.request(GetTwin(), timeout=STEP), STEP)  # commands run in order
    member = one._member
    assert member is not None and member.links.twin_requests == {}


# -- direct methods -----------------------------------------------------------------------------------


async def test_methods_reach_each_multiplexed_device_and_answers_come_back(
    hub: Hub, front: AmqpFront, mux: AmqpMux, service: HttpTransport
) -> None:
    one, two = await connected(mux, hub, "m1", "m2", subscribe=("methods",))
    seen: dict[str, list[MethodCall]] = {"m1": [], "m2": []}
    tasks = [asyncio.create_task(answer_methods(d, seen[d.device_id])) for d in (one, two)]
    try:
        first = await asyncio.wait_for(service.invoke_method("m1", "reboot", {"delay": 3}), STEP * 2)
        second = await asyncio.wait_for(service.invoke_method("m2", "blink", 7), STEP * 2)
        assert first == MethodResult(200, {"by": "m1", "echo": {"delay": 3}})
        assert second == MethodResult(200, {"by": "m2", "echo": 7})
        await until(lambda: len(seen["m1"]) == 1 and len(seen["m2"]) == 1)
        assert seen["m1"][0].name == "reboot" and seen["m2"][0].name == "blink"
        assert front.connections() == 1
    finally:
        await one.close()
        await two.close()
        await asyncio.wait_for(asyncio.gather(*tasks), STEP)


async def test_method_status_is_passed_through_and_a_device_without_links_is_offline(
    hub: Hub, mux: AmqpMux, service: HttpTransport
) -> None:
    (one,) = await connected(mux, hub, "m1", subscribe=("methods",))
    (plain,) = await connected(mux, hub, "m2")  # never attached the method links
    seen: list[MethodCall] = []
    task = asyncio.create_task(answer_methods(one, seen, status=404))
    try:
        result = await asyncio.wait_for(service.invoke_method("m1", "missing", {"a": 1}), STEP * 2)
        assert result.status == 404
        with pytest.raises(IoTHubError) as info:
            await asyncio.wait_for(service.invoke_method("m2", "m", None), STEP * 2)
        assert info.value.code == 404103
        with pytest.raises(IoTHubError) as info:  # and it cannot answer what it never got
            await asyncio.wait_for(plain.request(RespondMethod("1", 200), timeout=STEP), STEP)
        assert info.value.name == "NotConnected" and plain.connected
    finally:
        await one.close()
        await asyncio.wait_for(task, STEP)


@pytest.mark.parametrize("request_", [ReceiveC2D(), InvokeMethod("m2", "reboot"), GetTwin("m2"), "twin_get"])
async def test_a_request_the_surface_lacks_is_a_programming_error_at_once(
    hub: Hub, mux: AmqpMux, request_: Any
) -> None:
    (one,) = await connected(mux, hub, "m1")
    with pytest.raises(UnsupportedRequest):
        await asyncio.wait_for(one.request(request_, timeout=STEP), STEP)
    with pytest.raises(TypeError):
        await one.request(PatchReported(["not", "a", "mapping"]), timeout=STEP)  # type: ignore[arg-type]
    assert one.connected


async def test_the_handler_drives_twin_and_methods_over_the_mux(
    hub: Hub, mux: AmqpMux, service: HttpTransport
) -> None:
    from gateway.policy import Backoff, Policy, PolicyConfig, ThrottleBackoff

    quick = Backoff(initial=0.02, multiplier=2.0, cap=0.1, jitter=0.0, max_attempts=20, max_elapsed=0.0)
    policy = Policy(PolicyConfig(retry=quick, reconnect=quick,
                                 throttle=ThrottleBackoff(initial=0.02, cap=0.1, jitter=0.0, max_retry_after=0.2)))
    calls: asyncio.Queue[MethodCall] = asyncio.Queue()

    def on_inbound(event: Inbound) -> None:
        if event.kind == "method":
            assert isinstance(event.payload, MethodCall)
            calls.put_nowait(event.payload)

    async with Handler(device(mux, hub, "m1", subscribe=("twin", "methods")), policy=policy,
                       identity="m1", on_inbound=on_inbound) as handler:
        await handler.wait_connected(STEP)
        hub.plan.add("twin_patch", 429001, device="m1", times=2, retry_after=0.05)
        answer = await asyncio.wait_for(handler.request(PatchReported({"fw": "2.0"}), timeout=STEP), STEP * 2)
        assert answer == hub.device("m1").twin_version  # type: ignore[union-attr]
        assert handler.metrics()[(429001, "amqp", "throttled")] == 2

        async def serve() -> None:
            call = await calls.get()
            await handler.request(RespondMethod(call.rid, 200, {"ok": True, "name": call.name}), timeout=STEP)

        task = asyncio.create_task(serve())
        result = await asyncio.wait_for(service.invoke_method("m1", "ping", None), STEP * 2)
        assert result == MethodResult(200, {"ok": True, "name": "ping"})
        await asyncio.wait_for(task, STEP)


async def test_a_send_in_flight_when_the_device_leaves_is_outcome_unknown(hub: Hub, mux: AmqpMux) -> None:
    """Closing one device locally: its unsettled send may have reached the hub (never "not connected")."""
    hub.plan.add("telemetry", kind="no_ack", device="m1", transport="amqp")
    one, two = await connected(mux, hub, "m1", "m2")
    sending = asyncio.create_task(one.send(Message("limbo", "m1", b"x")))
    await asyncio.sleep(0.2)  # the transfer is out, its settlement never comes
    await asyncio.wait_for(one.close(), STEP)
    with pytest.raises(IoTHubError) as info:
        await asyncio.wait_for(sending, STEP)
    assert info.value.name == "OperationTimedOut" and "outcome unknown" in info.value.message
    await asyncio.wait_for(two.send(Message("still", "m2", b"x")), STEP)
