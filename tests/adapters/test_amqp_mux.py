"""The AMQP mux against the emulator's AMQP front over TLS: many devices on one connection, one thread,
and every failure reaching exactly the devices it belongs to."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from adapters.amqp.emulator import AmqpFront
from adapters.amqp.mux import DEVICES_PER_CONNECTION, AmqpMux, MuxDevice
from adapters.amqp.transport import AmqpTransport
from gateway.codes import code_of
from gateway.emulator import Hub
from gateway.errors import IoTHubError
from gateway.handler import Handler, State, StateChange
from gateway.tls import client_context
from gateway.transport import C2DMessage, Disconnected, GetTwin, Inbound, Message, SettleC2D, UnsupportedRequest
from tests.peers.emulator import tls_amqp_front

STEP = 5.0
DEVICES = [f"leaf-{i}" for i in range(6)]
_CLOSED = code_of("DeviceConnectionClosedRemotely")
_UNAUTHORIZED = code_of("IotHubUnauthorized")
_THROTTLED = code_of("ThrottlingException")


def mux_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("amqp-")]


@pytest.fixture
def hub() -> Hub:
    h = Hub()
    for device in DEVICES:
        h.add_device(device)
    return h


@pytest.fixture
async def front(hub: Hub, tls_files: Any) -> AsyncIterator[AmqpFront]:
    async with tls_amqp_front(hub, tls_files) as f:
        yield f


@pytest.fixture
async def mux(hub: Hub, front: AmqpFront, tls_files: Any) -> AsyncIterator[AmqpMux]:
    before = set(mux_threads())
    m = AmqpMux(host="localhost", port=front.port, ssl=client_context(str(tls_files.ca_pem)),
                hub_host=hub.host_name, backoff=(0.05, 0.2), rng=random.Random(7))
    yield m
    await asyncio.wait_for(m.close(), STEP * 3)
    left = [t for t in mux_threads() if t not in before]
    for t in left:
        t.join(2.0)
    assert [t.name for t in left if t.is_alive()] == []


def device(mux: AmqpMux, hub: Hub, device_id: str, **kw: Any) -> MuxDevice:
    return mux.device(device_id, token=lambda: hub.token(device_id, int(time.time() + 3600)),
                      connect_timeout=STEP, send_timeout=STEP, **kw)


def ids(hub: Hub, device_id: str) -> list[str | None]:
    return [r.message_id for r in hub.received if r.device_id == device_id]


async def connect_all(devices: list[MuxDevice]) -> None:
    await asyncio.wait_for(asyncio.gather(*(d.connect() for d in devices)), STEP * 2)


async def next_event(d: MuxDevice) -> Any:
    async def first() -> Any:
        async for event in d.events():
            return event
        return None

    return await asyncio.wait_for(first(), STEP)


async def test_devices_share_one_connection_and_one_thread(hub: Hub, front: AmqpFront, mux: AmqpMux) -> None:
    assert DEVICES_PER_CONNECTION == 1000
    devices = [device(mux, hub, d) for d in DEVICES]
    await connect_all(devices)
    assert front.connections() == 1 and mux.connections() == [len(DEVICES)]
    assert [t.name for t in mux_threads() if t.name != "amqp-front"] == ["amqp-mux"]
    await asyncio.gather(*(d.send(Message(f"{d.device_id}-1", d.device_id, b"x")) for d in devices))
    for d in DEVICES:
        assert ids(hub, d) == [f"{d}-1"]
    assert isinstance(await devices[0].request(GetTwin(), timeout=STEP), dict)  # its twin link, attached lazily
    with pytest.raises(UnsupportedRequest):  # a device reads only its own twin
        await devices[0].request(GetTwin(devices[1].device_id), timeout=STEP)
    await devices[0].close()  # one device leaves: the connection stays for the others
    await devices[1].send(Message("after-leave", devices[1].device_id, b"x"))
    assert front.connections() == 1 and mux.connections() == [len(DEVICES) - 1]
    for leaving in devices[1:]:  # the last one out closes the connection
        await leaving.close()
    assert mux.connections() == []
    for _ in range(50):
        if front.connections() == 0:
            break
        await asyncio.sleep(0.05)
    assert front.connections() == 0
    await devices[0].connect()  # and a device coming back opens a new one
    await devices[0].send(Message("reopened", devices[0].device_id, b"x"))
    assert mux.connection_attempts == 2 and front.connections() == 1


async def test_the_pool_opens_a_new_connection_past_the_cap(hub: Hub, front: AmqpFront, tls_files: Any) -> None:
    m = AmqpMux(host="localhost", port=front.port, ssl=client_context(str(tls_files.ca_pem)),
                hub_host=hub.host_name, devices_per_connection=4)
    try:
        devices = [device(m, hub, d) for d in DEVICES]
        await connect_all(devices)
        assert sorted(m.connections()) == [2, 4] and front.connections() == 2 and m.connection_attempts == 2
        await asyncio.gather(*(d.send(Message(f"{d.device_id}-c", d.device_id, b"x")) for d in devices))
        assert all(ids(hub, d) == [f"{d}-c"] for d in DEVICES)
    finally:
        await m.close()


async def test_one_devices_token_refused_leaves_its_neighbours_alone(hub: Hub, front: AmqpFront,
                                                                      mux: AmqpMux) -> None:
    neighbours = [device(mux, hub, d) for d in DEVICES[1:]]
    await connect_all(neighbours)
    hub.plan.add("connect", _UNAUTHORIZED, device=DEVICES[0], transport="amqp")
    refused = device(mux, hub, DEVICES[0])
    with pytest.raises(IoTHubError) as caught:
        await asyncio.wait_for(refused.connect(), STEP)
    assert caught.value.code == _UNAUTHORIZED and caught.value.device_id == DEVICES[0]
    assert not refused.connected
    # the neighbours never noticed: same connection, still sending, nothing in their event streams
    await asyncio.gather(*(d.send(Message(f"{d.device_id}-n", d.device_id, b"x")) for d in neighbours))
    assert front.connections() == 1 and mux.connection_attempts == 1
    for d in neighbours:
        assert d.connected and ids(hub, d.device_id) == [f"{d.device_id}-n"]
    # its own handler decides; a later attempt joins the same connection
    await asyncio.wait_for(refused.connect(), STEP)
    await refused.send(Message("back", DEVICES[0], b"x"))
    assert ids(hub, DEVICES[0]) == ["back"] and mux.connection_attempts == 1


@pytest.mark.parametrize("form", ["link", "session"])
async def test_a_link_or_session_error_reaches_only_its_device(hub: Hub, front: AmqpFront, mux: AmqpMux,
                                                               form: str) -> None:
    devices = [device(mux, hub, d) for d in DEVICES[:3]]
    await connect_all(devices)
    victim, others = devices[0], devices[1:]
    hub.plan.add("telemetry", _THROTTLED, device=victim.device_id, transport="amqp", form=form)
    with pytest.raises(IoTHubError):
        await victim.send(Message("v-1", victim.device_id, b"x"))
    event = await next_event(victim)
    assert isinstance(event, Disconnected) and event.error.code == _THROTTLED
    assert event.error.device_id == victim.device_id and not victim.connected
    await asyncio.gather(*(d.send(Message(f"{d.device_id}-o", d.device_id, b"x")) for d in others))
    assert all(d.connected for d in others) and front.connections() == 1
    await asyncio.wait_for(victim.connect(), STEP)  # rejoins the same connection, a new session
    await victim.send(Message("v-2", victim.device_id, b"x"))
    assert ids(hub, victim.device_id)[-1] == "v-2" and mux.connection_attempts == 1


async def test_a_delivery_refusal_is_that_messages_alone(hub: Hub, front: AmqpFront, mux: AmqpMux) -> None:
    a, b = device(mux, hub, DEVICES[0]), device(mux, hub, DEVICES[1])
    await connect_all([a, b])
    hub.plan.add("telemetry", _THROTTLED, device=a.device_id, transport="amqp")
    with pytest.raises(IoTHubError) as caught:
        await a.send(Message("a-1", a.device_id, b"x"))
    assert caught.value.code == _THROTTLED
    await a.send(Message("a-2", a.device_id, b"x"))
    await b.send(Message("b-1", b.device_id, b"x"))
    assert a.connected and b.connected and ids(hub, a.device_id) == ["a-2"]


@pytest.mark.parametrize("how", ["close", "drop"])
async def test_a_connection_loss_reaches_every_device_once_with_its_code(hub: Hub, front: AmqpFront,
                                                                        mux: AmqpMux, how: str) -> None:
    devices = [device(mux, hub, d) for d in DEVICES]
    await connect_all(devices)
    if how == "close":
        await front.close_all("amqp:connection:forced", "the hub restarts")
    else:
        await front.drop_all()
    seen: dict[str, list[Any]] = {}

    async def collect(d: MuxDevice) -> None:
        seen[d.device_id] = [event async for event in d.events()]

    await asyncio.wait_for(asyncio.gather(*(collect(d) for d in devices)), STEP)
    for d in devices:
        events = seen[d.device_id]
        assert len(events) == 1 and isinstance(events[0], Disconnected), events
        err = events[0].error
        assert err.device_id == d.device_id and err.action.value == "reconnect"
        if how == "close":
            assert err.code == _CLOSED
    # reconnecting is single-flight: six devices asking at once open ONE connection
    await connect_all(devices)
    assert mux.connection_attempts == 2 and front.connections() == 1 and mux.connections() == [len(DEVICES)]
    await asyncio.gather(*(d.send(Message(f"{d.device_id}-r", d.device_id, b"x")) for d in devices))


async def test_a_failed_open_is_one_attempt_for_every_waiting_device(hub: Hub, tls_files: Any) -> None:
    accepted: list[int] = []

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.close()  # a peer that hangs up at once: the open fails

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    m = AmqpMux(host="localhost", port=port, ssl=client_context(str(tls_files.ca_pem)), hub_host=hub.host_name,
                backoff=(30.0, 60.0), rng=random.Random(1))
    try:
        devices = [device(m, hub, d) for d in DEVICES[:4]]
        results = await asyncio.wait_for(asyncio.gather(*(d.connect() for d in devices), return_exceptions=True),
                                         STEP * 2)
        assert all(isinstance(r, IoTHubError) for r in results), results
        assert {r.device_id for r in results if isinstance(r, IoTHubError)} == set(DEVICES[:4])
        assert len(accepted) == 1  # four devices, one socket
        # the pool's one backoff (15-30 s here): a device asking meanwhile waits for it, no new socket
        late = device(m, hub, DEVICES[0])
        late.connect_timeout = 0.3
        with pytest.raises(IoTHubError) as caught:
            await late.connect()
        assert caught.value.code == code_of("OperationTimedOut") and len(accepted) == 1
    finally:
        await m.close()
        server.close()
        await server.wait_closed()


async def test_handlers_deliver_everything_across_a_dropped_shared_connection(hub: Hub, front: AmqpFront,
                                                                             mux: AmqpMux) -> None:
    handlers = [Handler(device(mux, hub, d), identity=d) for d in DEVICES]
    for h in handlers:
        await h.start()
    try:
        await asyncio.wait_for(asyncio.gather(*(h.wait_connected() for h in handlers)), STEP * 2)
        hub.plan.add("telemetry", kind="no_ack", device=DEVICES[0], transport="amqp")  # in flight at the drop

        async def burst(h: Handler, device_id: str) -> list[Any]:
            return [await h.send(Message(f"{device_id}-{i}", device_id, b"x"), timeout=STEP * 4)
                    for i in range(5)]

        sending = [asyncio.create_task(burst(h, d)) for h, d in zip(handlers, DEVICES, strict=True)]
        await asyncio.sleep(0.05)
        await front.drop_all()
        receipts = await asyncio.wait_for(asyncio.gather(*sending), STEP * 5)
        for device_id, got in zip(DEVICES, receipts, strict=True):
            assert [r.id for r in got] == [f"{device_id}-{i}" for i in range(5)]
            assert set(ids(hub, device_id)) == {f"{device_id}-{i}" for i in range(5)}  # nothing lost
        assert any(r.possible_duplicate for r in receipts[0])  # the unacknowledged one was resent, flagged
        assert mux.connection_attempts == 2 and front.connections() == 1
    finally:
        for h in handlers:
            await h.close()


async def test_c2d_reaches_its_device_only_and_settles(hub: Hub, front: AmqpFront, mux: AmqpMux) -> None:
    a, b = device(mux, hub, DEVICES[0]), device(mux, hub, DEVICES[1])
    await connect_all([a, b])
    hub.send_c2d(a.device_id, b"for-a", message_id="c2d-1")
    event = await next_event(a)
    assert isinstance(event, Inbound) and event.kind == "c2d"
    c2d = event.payload
    assert isinstance(c2d, C2DMessage) and c2d.device_id == a.device_id and c2d.body == b"for-a"
    await a.request(SettleC2D.of(c2d), timeout=STEP)
    known = hub.device(a.device_id)
    assert known is not None and not known.c2d and not known.locked  # completed: gone from the hub
    with pytest.raises(IoTHubError) as caught:  # settled once: its lock is gone
        await a.request(SettleC2D.of(c2d), timeout=STEP)
    assert caught.value.code == code_of("DeviceMessageLockLost")
    await b.send(Message("b-quiet", b.device_id, b"x"))  # the neighbour heard nothing meanwhile
    assert b.connected


async def test_a_stolen_link_affects_only_that_device(hub: Hub, front: AmqpFront, mux: AmqpMux,
                                                      tls_files: Any) -> None:
    devices = [device(mux, hub, d) for d in DEVICES[:3]]
    await connect_all(devices)
    thief = AmqpTransport.from_connection_string(hub.connection_string(DEVICES[0]), host="localhost",
                                                 port=front.port, ssl=client_context(str(tls_files.ca_pem)),
                                                 connect_timeout=STEP)
    try:
        await asyncio.wait_for(thief.connect(), STEP)
        event = await next_event(devices[0])
        assert isinstance(event, Disconnected) and event.error.code == code_of("LinkCreationConflict")
        assert event.error.device_id == DEVICES[0]
        await asyncio.gather(*(d.send(Message(f"{d.device_id}-s", d.device_id, b"x")) for d in devices[1:]))
        assert front.connections() == 2 and mux.connections() == [2]
    finally:
        await thief.close()


async def test_cbs_renews_each_devices_token_on_the_live_connection(hub: Hub, front: AmqpFront,
                                                                    mux: AmqpMux) -> None:
    minted: list[str] = []

    def short_token() -> str:
        minted.append(DEVICES[0])
        return hub.token(DEVICES[0], int(time.time() + 2))  # renewed after max(1 s, 80% of ~2 s)

    renewing = mux.device(DEVICES[0], token=short_token, connect_timeout=STEP, send_timeout=STEP)
    steady = device(mux, hub, DEVICES[1])
    await connect_all([renewing, steady])
    assert renewing.credential_expiry is None  # CBS renews: the handler never reconnects for it
    deadline = asyncio.get_running_loop().time() + STEP
    while len(minted) < 3 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    assert len(minted) >= 3 and renewing.connected and steady.connected
    await renewing.send(Message("renewed", DEVICES[0], b"x"))
    assert mux.connection_attempts == 1


async def test_a_shared_session_error_reaches_every_device_on_it_once(hub: Hub, front: AmqpFront,
                                                                      tls_files: Any) -> None:
    m = AmqpMux(host="localhost", port=front.port, ssl=client_context(str(tls_files.ca_pem)),
                hub_host=hub.host_name, session_per_device=False)
    try:
        devices = [device(m, hub, d) for d in DEVICES[:4]]
        await connect_all(devices)
        hub.plan.add("telemetry", _THROTTLED, device=DEVICES[0], transport="amqp", form="session")
        with pytest.raises(IoTHubError):
            await devices[0].send(Message("s-1", DEVICES[0], b"x"))
        async def stream(d: MuxDevice) -> list[Any]:
            return [e async for e in d.events()]

        seen = await asyncio.wait_for(asyncio.gather(*(stream(d) for d in devices)), STEP)
        for d, events in zip(devices, seen, strict=True):
            assert len(events) == 1 and isinstance(events[0], Disconnected)
            assert events[0].error.code == _THROTTLED and events[0].error.device_id == d.device_id
        # the connection itself stayed: everyone rejoins it on a new shared session
        await connect_all(devices)
        await asyncio.gather(*(d.send(Message(f"{d.device_id}-s", d.device_id, b"x")) for d in devices))
        assert m.connection_attempts == 1 and front.connections() == 1
    finally:
        await m.close()


async def test_handlers_one_devices_401_and_throttle_leave_the_neighbours_connected(hub: Hub, front: AmqpFront,
                                                                                   mux: AmqpMux) -> None:
    changes: dict[str, list[State]] = {d: [] for d in DEVICES[:4]}
    def recorder(device_id: str) -> Callable[[StateChange], None]:
        return lambda change: changes[device_id].append(change.state)

    handlers = [Handler(device(mux, hub, d), identity=d, on_state_change=recorder(d)) for d in DEVICES[:4]]
    try:
        for h in handlers[1:]:
            await h.start()
        await asyncio.wait_for(asyncio.gather(*(h.wait_connected() for h in handlers[1:])), STEP * 2)
        hub.plan.add("connect", _UNAUTHORIZED, device=DEVICES[0], transport="amqp")
        hub.plan.add("telemetry", _THROTTLED, device=DEVICES[1], transport="amqp", form="link")
        await handlers[0].start()  # its first connect is refused: its own policy decides what next
        sends = [h.send(Message(f"{d}-h", d, b"x"), timeout=STEP * 4)
                 for h, d in zip(handlers[1:], DEVICES[1:4], strict=True)]
        receipts = await asyncio.wait_for(asyncio.gather(*sends), STEP * 5)
        assert [r.id for r in receipts] == [f"{d}-h" for d in DEVICES[1:4]]
        assert State.CONNECTED not in changes[DEVICES[0]][:2] and changes[DEVICES[0]]  # refused first
        assert changes[DEVICES[1]].count(State.CONNECTED) >= 2  # throttled, its link dropped, came back
        for d in DEVICES[2:4]:  # the neighbours never left CONNECTED
            assert changes[d] == [State.CONNECTING, State.CONNECTED], changes[d]
        assert front.connections() == 1 and mux.connection_attempts == 1
    finally:
        for h in handlers:
            await h.close()
