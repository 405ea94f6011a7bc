"""The MQTT adapter's typed requests and inbound shapes against the emulator's MQTT front (IoT Hub's
device surface): twin GET and reported PATCH, method responses, C2D and desired patches as the shared
types, a fresh token at every connect, and bursts over the front's TLS listener."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapters.mqtt.emulator import MqttFront
from adapters.mqtt.transport import MqttAnswer, MqttTransport
from gateway.emulator import FaultKind, Hub, Operation
from gateway.emulator.front import FrontConfig
from gateway.errors import IoTHubError
from gateway.handler import Handler, State
from gateway.policy import Policy, PolicyConfig
from gateway.transport import (
    C2DMessage,
    DesiredPatch,
    Disconnected,
    GetTwin,
    Inbound,
    Message,
    MethodCall,
    PatchReported,
    RespondMethod,
    SettleC2D,
)
from tests.peers.proxy import TcpProxy
from tests.peers.tls import TlsFiles

PROTOCOLS = [pytest.param(4, id="mqtt311"), pytest.param(5, id="mqtt5")]


def make(hub: Hub, front: MqttFront, protocol: int = 4, **kw: Any) -> MqttTransport:
    kw.setdefault("ssl", None)
    kw.setdefault("send_timeout", 5)
    return MqttTransport(hub.connection_string("d1"), host="127.0.0.1", port=front.port, protocol=protocol,
                         connect_timeout=5, **kw)


@contextlib.asynccontextmanager
async def connected(t: MqttTransport) -> AsyncIterator[MqttTransport]:
    await asyncio.wait_for(t.connect(), 10)
    try:
        yield t
    finally:
        await asyncio.wait_for(t.close(), 10)


async def failure(aw: Any) -> IoTHubError:
    with pytest.raises(IoTHubError) as info:
        await asyncio.wait_for(aw, 5)
    return info.value


async def next_inbound(t: MqttTransport) -> Inbound:
    event = await asyncio.wait_for(anext(t.events()), 5)
    assert isinstance(event, Inbound), event
    return event


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_twin_get_and_reported_patch(hub: Hub, mqtt_front: MqttFront, protocol: int) -> None:
    hub.device("d1").twin_desired["rate"] = 5  # type: ignore[union-attr]
    hub.plan.add(Operation.TWIN_GET, 429001, device="d1")
    hub.plan.add(Operation.TWIN_PATCH, 412001, device="d1")
    async with connected(make(hub, mqtt_front, protocol)) as t:
        err = await failure(t.request(GetTwin(), timeout=5))
        assert err.code == 429001 and err.exact and err.tracking_id
        twin = await asyncio.wait_for(t.request(GetTwin(), timeout=5), 5)
        assert twin["desired"]["rate"] == 5
        err = await failure(t.request(PatchReported({"t": 1}), timeout=5))
        assert err.code == 412001 and isinstance(err.__cause__, MqttAnswer)
        version = await asyncio.wait_for(t.request(PatchReported({"t": 1}), timeout=5), 5)
        assert isinstance(version, int) and version >= 2
        assert (await t.request(GetTwin("d1"), timeout=5))["reported"]["t"] == 1  # its own id is fine


async def test_twin_request_without_an_answer_times_out_on_the_loop_clock(hub: Hub, mqtt_front: MqttFront) -> None:
    hub.plan.add(Operation.TWIN_GET, kind=FaultKind.NO_ACK, device="d1")
    async with connected(make(hub, mqtt_front)) as t:
        err = await failure(t.request(GetTwin(), timeout=0.2))
        assert err.code == 504901 and not err.exact
        assert t._link is not None and t._link.requests == {}  # nothing left behind
        assert isinstance(await t.request(GetTwin(), timeout=5), dict)


async def test_method_call_and_response(hub: Hub, mqtt_front: MqttFront) -> None:
    async with connected(make(hub, mqtt_front)) as t:
        invoker = hub.method_invoker("d1")
        assert invoker is not None
        call = asyncio.ensure_future(invoker("reboot", {"delay": 1}, 5))
        event = await next_inbound(t)
        assert event.kind == "method" and event.device_id == "d1"
        method = event.payload
        assert isinstance(method, MethodCall)
        assert (method.name, method.payload) == ("reboot", {"delay": 1})
        assert await t.request(RespondMethod(method.rid, 201, {"ok": True}), timeout=5) is None
        assert await asyncio.wait_for(call, 5) == (201, {"ok": True})


async def test_c2d_and_desired_patch_shapes(hub: Hub, mqtt_front: MqttFront) -> None:
    async with connected(make(hub, mqtt_front)) as t:
        mqtt_front.send_c2d("d1", b"queued", {"a": "1"})
        event = await next_inbound(t)
        assert event.kind == "c2d"
        message = event.payload
        assert isinstance(message, C2DMessage)
        assert (message.device_id, message.body, dict(message.properties)) == ("d1", b"queued", {"a": "1"})
        assert await t.request(SettleC2D.of(message), timeout=5) is None
        version = hub.update_desired("d1", {"rate": 7})
        event = await next_inbound(t)
        assert event.kind == "twin_desired"
        assert isinstance(event.payload, DesiredPatch)
        assert event.payload.version == version and event.payload.patch["rate"] == 7


async def test_each_connect_mints_a_fresh_token(hub: Hub, mqtt_front: MqttFront) -> None:
    """MQTT cannot renew on a live connection: every connect must bring a token of its own, so the
    handler's reconnect before ``credential_expiry`` renews it."""
    now = [1_900_000_000.0]
    mqtt_front.clock = lambda: now[0]
    t = make(hub, mqtt_front, clock=lambda: now[0], token_ttl=3600)
    async with connected(t):
        assert t.credential_expiry == now[0] + 3600
        first = t.credential_expiry
    stale = make(hub, mqtt_front, sas_token=hub.token("d1", int(now[0] + 3600)))
    now[0] += 3 * 3600  # the first token expired long ago
    async with connected(t):
        assert t.credential_expiry == now[0] + 3600 and t.credential_expiry > first
    err = await failure(stale.connect())  # the same token again would be refused as expired
    assert err.code == 401003


async def test_bursts_over_the_fronts_tls(hub: Hub, tls_files: TlsFiles) -> None:
    """1,000 twin requests and 1,000 telemetry messages in flight at once over TLS (issue 10 bursts)."""
    front = MqttFront(hub, FrontConfig(ssl_context=tls_files.server_context()))
    await front.start()
    try:
        async with connected(make(hub, front, ssl=tls_files.client_context(), max_inflight=100,
                                  send_timeout=30)) as t:
            twins = [t.request(GetTwin(), timeout=30) for _ in range(1000)]
            sends = [t.send(Message(f"m{i}", "d1", b"x" * 64)) for i in range(1000)]
            results = await asyncio.wait_for(asyncio.gather(*twins, *sends, return_exceptions=True), 60)
    finally:
        await front.stop()
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert all(isinstance(r, dict) for r in results[:1000])
    assert len(hub.received_ids("d1")) == 1000


async def test_unacknowledged_sends_time_out_in_order_and_leave_nothing(hub: Hub, mqtt_front: MqttFront) -> None:
    """Send deadlines share one loop timer; each unanswered send still fails on its own deadline."""
    hub.plan.add(Operation.TELEMETRY, kind=FaultKind.NO_ACK, device="d1", times=3)
    async with connected(make(hub, mqtt_front, protocol=5, send_timeout=0.3)) as t:
        results = await asyncio.wait_for(asyncio.gather(
            *(t.send(Message(f"lost{i}", "d1", b"x")) for i in range(3)), return_exceptions=True), 5)
        assert [getattr(r, "code", r) for r in results] == [504901] * 3
        await asyncio.wait_for(t.send(Message("ok", "d1", b"x")), 5)
        assert t._link is not None and t._link.publishes == {}
    assert hub.received_ids("d1") == ["lost0", "lost1", "lost2", "ok"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_half_open_link_over_tls_is_detected_and_a_reconnect_loses_nothing(
        hub: Hub, tls_files: TlsFiles, protocol: int) -> None:
    """A proxy freezes the link (silent, sockets open) under a TLS connection to the hub: keep-alive
    reports a connection loss (404104) within about two periods, the send caught in it fails with that
    code (so the handler resends it), and the next connection delivers."""
    keepalive = 2
    front = MqttFront(hub, FrontConfig(ssl_context=tls_files.server_context()))
    await front.start()
    try:
        async with TcpProxy("127.0.0.1", front.port) as proxy:
            t = MqttTransport(hub.connection_string("d1"), host="127.0.0.1", port=proxy.port, protocol=protocol,
                              ssl=tls_files.client_context(), keepalive=keepalive, connect_timeout=5,
                              send_timeout=30)
            async with connected(t):
                events = t.events()
                await asyncio.wait_for(t.send(Message("before", "d1", b"x")), 5)
                assert proxy.freeze() == 1
                loop = asyncio.get_running_loop()
                start = loop.time()
                caught = asyncio.ensure_future(t.send(Message("caught", "d1", b"x")))
                event = await asyncio.wait_for(anext(events), 5 * keepalive)
                detected = loop.time() - start
                assert isinstance(event, Disconnected) and event.error.code == 404104
                assert detected <= 2 * keepalive + 1  # two periods plus the keep-alive check's tick
                err = await failure(caught)
                assert err.code == 404104  # outcome unknown, never NotConnected
                await asyncio.wait_for(t.connect(), 10)  # a new connection through the proxy
                await asyncio.wait_for(t.send(Message("caught", "d1", b"x")), 5)  # the resend
            assert proxy.accepted == 2
    finally:
        await front.stop()
    assert hub.received_ids("d1")[0] == "before" and "caught" in hub.received_ids("d1")


async def test_handler_renews_the_token_by_reconnecting_before_it_expires(hub: Hub, mqtt_front: MqttFront) -> None:
    """Through the handler: the transport's credential_expiry schedules a reconnect ahead of the token's
    expiry, each reconnect brings a fresh token, and sends keep flowing past the first token's lifetime
    (a reconnect with the first token would now be refused as expired)."""
    config = PolicyConfig.from_mapping({"reconnect": {"initial": 0.02, "cap": 0.1},
                                        "operation": {"renew_before": 2.0, "renew_margin": 0.5}})
    t = make(hub, mqtt_front, token_ttl=4)
    states: list[State] = []
    async with Handler(t, policy=Policy(config), identity="d1", on_state_change=lambda c: states.append(c.state)) as h:
        await h.wait_connected(10)
        first = t.credential_expiry
        assert first is not None
        expiries = {first}
        loop = asyncio.get_running_loop()
        end = loop.time() + 6  # past the first token's expiry
        i = 0
        while loop.time() < end:
            await h.send(Message(f"m{i}", "d1", b"x"), timeout=10)
            if t.credential_expiry is not None:
                expiries.add(t.credential_expiry)
            i += 1
            await asyncio.sleep(0.05)
        assert len(expiries) >= 2 and max(expiries) > first  # renewed, with a later expiry each time
        assert h.state is State.CONNECTED
    assert set(hub.received_ids("d1")) >= {f"m{n}" for n in range(i)}  # every receipted send arrived
    assert State.STOPPED not in states
