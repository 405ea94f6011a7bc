"""The AMQP adapter against the emulator's AMQP front, over real loopback sockets.

Every failure must come back as the catalog code the front rendered, with the proton condition on
``__cause__``; every pending operation must end (no hang), and no proton thread may outlive a test.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from adapters.amqp.emulator import AmqpFront
from adapters.amqp.translate import render
from adapters.amqp.transport import AmqpRemoteError, AmqpTransport
from gateway.codes import all_codes
from gateway.emulator import Hub
from gateway.emulator.front import FrontConfig
from gateway.errors import ConnectionLostError, IdentityConflictError, IoTHubError, OperationTimeoutError
from gateway.handler import Handler, State
from gateway.policy import Backoff, IdentityBackoff, Policy, PolicyConfig, ThrottleBackoff
from gateway.sas import make_sas_token
from gateway.tls import client_context
from gateway.transport import C2DMessage, Disconnected, Inbound, Message, SettleC2D, Transport
from tests.peers.emulator import amqp_threads

AMQP_CODES = [row.code for row in all_codes() if "amqp" in row.transports]
STEP = 5.0  # bound on every single await that talks to a peer


pytestmark = pytest.mark.usefixtures("no_amqp_thread_left")


@pytest.fixture
def front(amqp_front: AmqpFront) -> AmqpFront:
    return amqp_front


def make(hub: Hub, front: AmqpFront, device: str = "d1", **kw: Any) -> AmqpTransport:
    kw.setdefault("send_timeout", STEP)
    kw.setdefault("connect_timeout", STEP)
    kw.setdefault("close_timeout", 2.0)
    return AmqpTransport.from_connection_string(hub.connection_string(device), host="127.0.0.1", port=front.port,
                                                ssl=None, **kw)


async def connected(hub: Hub, front: AmqpFront, device: str = "d1", **kw: Any) -> AmqpTransport:
    t = make(hub, front, device, **kw)
    await asyncio.wait_for(t.connect(), STEP)
    return t


async def next_event(t: AmqpTransport) -> Any:
    async def first() -> Any:
        async for event in t.events():
            return event
        return None

    return await asyncio.wait_for(first(), STEP)


async def send_error(t: AmqpTransport, msg_id: str = "m") -> IoTHubError:
    with pytest.raises(IoTHubError) as info:
        await asyncio.wait_for(t.send(Message(msg_id, t.device_id, b"x")), STEP * 2)
    return info.value


# -- the basics --------------------------------------------------------------------------------------


async def test_is_a_transport_and_send_is_recorded_with_its_id(hub: Hub, front: AmqpFront) -> None:
    t = await connected(hub, front)
    try:
        assert isinstance(t, Transport) and t.name == "amqp"
        await asyncio.wait_for(t.send(Message("m-1", "d1", b"hello", {"k": "v"})), STEP)
        assert hub.received_ids("d1") == ["m-1"]
        assert hub.received[0].body == b"hello" and hub.received[0].properties == {"k": "v"}
        assert hub.is_online("d1")
    finally:
        await t.close()
    assert t.thread is None


async def test_one_thread_per_connection_and_it_ends_on_close(hub: Hub, front: AmqpFront) -> None:
    t = make(hub, front)
    for _ in range(3):
        await asyncio.wait_for(t.connect(), STEP)
        mine = [x for x in amqp_threads() if x.name == "amqp-d1"]
        assert len(mine) == 1
        await t.close()
        assert [x for x in amqp_threads() if x.name == "amqp-d1"] == []
    await t.close()  # idempotent


async def test_send_when_not_connected_is_not_connected(hub: Hub, front: AmqpFront) -> None:
    t = make(hub, front)
    err = await send_error(t)
    assert err.name == "NotConnected"
    await asyncio.wait_for(t.connect(), STEP)
    await t.close()
    err = await send_error(t)
    assert err.name == "NotConnected"


async def test_connection_refused(hub: Hub) -> None:
    with socket_port() as port:
        pass  # closed again: nothing listens there
    t = AmqpTransport.from_connection_string(hub.connection_string("d1"), host="127.0.0.1", port=port, ssl=None,
                                             connect_timeout=STEP)
    with pytest.raises(IoTHubError) as info:
        await asyncio.wait_for(t.connect(), STEP * 2)
    assert info.value.name == "ConnectionRefused"
    assert isinstance(info.value.__cause__, AmqpRemoteError)
    await t.close()


# -- every code the catalog has for AMQP, rendered by the front, read back by the adapter -------------


async def test_every_amqp_code_round_trips_on_a_rejected_delivery(hub: Hub, front: AmqpFront) -> None:
    t = await connected(hub, front)
    try:
        checked = 0
        for code in AMQP_CODES:
            for index in range(len(render(code))):
                hub.plan.add("telemetry", code, device="d1", form=f"delivery:{index}")
                err = await send_error(t, f"m-{code}-{index}")
                assert err.code == code, (code, index, err)
                assert err.transport == "amqp"
                assert err.tracking_id is not None and err.tracking_id.startswith("emu-")
                assert isinstance(err.__cause__, AmqpRemoteError) and err.__cause__.where == "delivery"
                checked += 1
        assert checked > len(AMQP_CODES)  # the exact forms too, not only the generic one
        await asyncio.wait_for(t.send(Message("after", "d1", b"x")), STEP)  # the connection survived
        assert hub.received_ids("d1") == ["after"]
    finally:
        await t.close()


@pytest.mark.parametrize("where", ["link", "session", "connection"])
async def test_every_amqp_code_round_trips_on_an_endpoint_close(hub: Hub, front: AmqpFront, where: str) -> None:
    t = make(hub, front)
    for code in AMQP_CODES:
        await asyncio.wait_for(t.connect(), STEP)
        hub.plan.add("telemetry", code, device="d1", form=where)
        err = await send_error(t, f"m-{code}")
        assert err.name != "NotConnected"  # it went out: the outcome is unknown, not "never sent"
        event = await next_event(t)
        assert isinstance(event, Disconnected), event
        assert event.error.code == code, (where, code, event.error)
        assert event.error.tracking_id is not None
        cause = event.error.__cause__
        assert isinstance(cause, AmqpRemoteError) and cause.where == where
        err2 = await send_error(t)
        assert err2.name == "NotConnected"
        await t.close()


async def test_every_amqp_code_round_trips_on_a_cbs_answer(hub: Hub, front: AmqpFront) -> None:
    t = make(hub, front)
    for code in AMQP_CODES:
        hub.plan.add("connect", code, device="d1", form="cbs")
        with pytest.raises(IoTHubError) as info:
            await asyncio.wait_for(t.connect(), STEP)
        assert info.value.code == code
        assert isinstance(info.value.__cause__, AmqpRemoteError) and info.value.__cause__.where == "cbs"
    await asyncio.wait_for(t.connect(), STEP)  # and a clean one afterwards
    await t.close()


async def test_connect_fault_closes_the_connection_with_the_code(hub: Hub, front: AmqpFront) -> None:
    hub.plan.add("connect", 429001, device="d1")
    t = make(hub, front)
    with pytest.raises(IoTHubError) as info:
        await asyncio.wait_for(t.connect(), STEP)
    assert info.value.name == "ThrottlingException"
    assert info.value.__cause__.where == "connection"  # type: ignore[union-attr]
    await t.close()


# -- claims-based security ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("expired", "IotHubUnauthorized"),
        ("wrong-key", "IotHubUnauthorizedAccess"),
        ("unknown", "DeviceNotFound"),
        ("disabled", "DeviceDisabled"),
    ],
)
async def test_cbs_refusals(hub: Hub, front: AmqpFront, setup: str, expected: str) -> None:
    device = "d1"
    token: Any
    if setup == "expired":
        token = hub.token("d1", 1000)  # 1970
    elif setup == "wrong-key":
        token = make_sas_token(f"{hub.host_name}/devices/d1", "d3Jvbmcta2V5", 4_000_000_000)  # not d1's key
    elif setup == "unknown":
        device = "ghost"
        token = make_sas_token(f"{hub.host_name}/devices/ghost", "Z2hvc3Q=", 4_000_000_000)
    else:
        hub.device("d1").enabled = False  # type: ignore[union-attr]
        token = hub.token("d1", 4_000_000_000)
    t = AmqpTransport(host="127.0.0.1", port=front.port, device_id=device, hub_host=hub.host_name, token=token,
                      ssl=None, connect_timeout=STEP)
    with pytest.raises(IoTHubError) as info:
        await asyncio.wait_for(t.connect(), STEP * 2)
    assert info.value.name == expected
    assert isinstance(info.value.__cause__, AmqpRemoteError) and info.value.__cause__.where == "cbs"
    await t.close()


async def test_token_is_renewed_on_cbs_before_it_expires(hub: Hub, front: AmqpFront) -> None:
    import time

    calls: list[int] = []

    def token() -> str:
        expiry = int(time.time()) + 2
        calls.append(expiry)
        return hub.token("d1", expiry)

    t = AmqpTransport(host="127.0.0.1", port=front.port, device_id="d1", hub_host=hub.host_name, token=token,
                      ssl=None, connect_timeout=STEP, renew_margin=0.5)
    await asyncio.wait_for(t.connect(), STEP)
    try:
        async with asyncio.timeout(STEP):
            while len(calls) < 2:
                await asyncio.sleep(0.05)
        await asyncio.wait_for(t.send(Message("after-renew", "d1", b"x")), STEP)
    finally:
        await t.close()


# -- peers fighting over an identity, dying connections ------------------------------------------


async def test_link_stolen_by_a_second_adapter_with_the_same_device_id(hub: Hub, front: AmqpFront) -> None:
    first = await connected(hub, front)
    second = await connected(hub, front)
    try:
        event = await next_event(first)
        assert isinstance(event, Disconnected)
        assert event.error.name == "LinkCreationConflict" and event.error.code == 409002
        assert isinstance(event.error, IdentityConflictError)
        assert event.error.__cause__.condition == "amqp:link:stolen"  # type: ignore[union-attr]
        assert (await send_error(first)).name == "NotConnected"
        await asyncio.wait_for(second.send(Message("m2", "d1", b"x")), STEP)
        assert hub.received_ids("d1") == ["m2"]
    finally:
        await first.close()
        await second.close()


async def test_connection_forced_is_not_swallowed(hub: Hub, front: AmqpFront) -> None:
    t = await connected(hub, front)
    try:
        await front.close_all("amqp:connection:forced", "maintenance", {"com.microsoft:tracking-id": "tid-1"})
        event = await next_event(t)
        assert isinstance(event, Disconnected)
        assert event.error.name == "DeviceConnectionClosedRemotely"
        assert event.error.tracking_id == "tid-1"
    finally:
        await t.close()


async def test_connection_killed_mid_send_is_outcome_unknown(hub: Hub, front: AmqpFront) -> None:
    t = await connected(hub, front)
    try:
        hub.plan.add("telemetry", kind="drop", device="d1")
        err = await send_error(t)
        assert isinstance(err, ConnectionLostError) and err.name != "NotConnected"
        event = await next_event(t)
        assert isinstance(event, Disconnected) and isinstance(event.error, ConnectionLostError)
        assert event.error.name == "DeviceConnectionClosedRemotely"  # not a protocol violation
    finally:
        await t.close()


async def test_pending_sends_fail_at_once_when_the_connection_drops(hub: Hub, front: AmqpFront) -> None:
    t = await connected(hub, front, send_timeout=60.0)  # a hang would show as the test's own timeout
    try:
        hub.plan.add("telemetry", kind="no_ack", device="d1", times=3)
        sends = [asyncio.ensure_future(t.send(Message(f"p{i}", "d1", b"x"))) for i in range(3)]
        async with asyncio.timeout(STEP):
            while len(hub.received_ids("d1")) < 3:
                await asyncio.sleep(0.01)
        await front.drop_all()
        results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), STEP)
        for r in results:
            assert isinstance(r, IoTHubError) and r.name != "NotConnected", r
    finally:
        await t.close()


async def test_no_ack_times_out_as_outcome_unknown(hub: Hub, front: AmqpFront) -> None:
    t = await connected(hub, front, send_timeout=0.3)
    try:
        hub.plan.add("telemetry", kind="no_ack", device="d1")
        err = await send_error(t)
        assert isinstance(err, OperationTimeoutError) and err.name == "OperationTimedOut"
        await asyncio.wait_for(t.send(Message("next", "d1", b"x")), STEP)
    finally:
        await t.close()


async def test_delayed_acknowledgement_still_succeeds(hub: Hub, front: AmqpFront) -> None:
    t = await connected(hub, front)
    try:
        hub.plan.add("telemetry", kind="delay", delay=0.05, device="d1")
        await asyncio.wait_for(t.send(Message("slow", "d1", b"x")), STEP)
        assert hub.received_ids("d1") == ["slow"]
    finally:
        await t.close()


# -- cloud-to-device -------------------------------------------------------------------------------


async def test_c2d_receive_and_complete(hub: Hub, front: AmqpFront) -> None:
    t = await connected(hub, front)
    try:
        hub.device("d1").c2d.append(("c-1", b"cloud"))  # type: ignore[union-attr]
        event = await next_event(t)
        assert isinstance(event, Inbound) and event.kind == "c2d"
        msg = event.payload
        assert isinstance(msg, C2DMessage) and msg.message_id == "c-1" and msg.body == b"cloud"
        assert msg.device_id == "d1" and msg.delivery_count == 0
        await asyncio.wait_for(t.request(SettleC2D.of(msg), timeout=STEP), STEP)
        # settling the same lock twice: the hub no longer holds it
        with pytest.raises(IoTHubError) as info:
            await asyncio.wait_for(t.settle(msg.lock_token), STEP)
        assert info.value.name == "DeviceMessageLockLost"
    finally:
        await t.close()


async def test_c2d_is_pushed_when_queued_not_on_the_next_poll(hub: Hub) -> None:
    """IoT Hub delivers a queued C2D message at once: the front must not wait for its poll (an hour here)."""
    front = AmqpFront(hub, c2d_poll=3600.0)
    await asyncio.wait_for(front.start(), STEP)
    t = await connected(hub, front)
    try:
        await asyncio.sleep(0.1)  # the receiver link's credit is out
        for i in range(3):
            hub.send_c2d("d1", b"now", message_id=f"push-{i}")
            event = await next_event(t)
            assert isinstance(event, Inbound) and event.payload.message_id == f"push-{i}"
            await asyncio.wait_for(t.settle(event.payload.lock_token), STEP)
    finally:
        await t.close()
        await front.stop()


async def test_c2d_settlement_after_the_lock_expired(hub: Hub) -> None:
    now = [1_000.0]
    front = AmqpFront(hub, lock_timeout=30.0, clock=lambda: now[0])
    await asyncio.wait_for(front.start(), STEP)
    t = await connected(hub, front)
    try:
        hub.device("d1").c2d.append(("c-1", b"cloud"))  # type: ignore[union-attr]
        event = await next_event(t)
        now[0] += 31.0
        with pytest.raises(IoTHubError) as info:
            await asyncio.wait_for(t.settle(event.payload.lock_token), STEP)
        assert info.value.name == "DeviceMessageLockLost" and info.value.code == 412002
        assert info.value.__cause__.condition == "com.microsoft:message-lock-lost"  # type: ignore[union-attr]
        again = await next_event(t)  # the hub delivers it again
        assert isinstance(again, Inbound) and again.payload.message_id == "c-1"
        await asyncio.wait_for(t.settle(again.payload.lock_token), STEP)
    finally:
        await t.close()
        await front.stop()


async def test_c2d_abandon_redelivers_and_settle_fault_is_rendered(hub: Hub, front: AmqpFront) -> None:
    t = await connected(hub, front)
    try:
        hub.device("d1").c2d.append(("c-1", b"cloud"))  # type: ignore[union-attr]
        first = await next_event(t)
        await asyncio.wait_for(t.settle(first.payload.lock_token, "abandon"), STEP)
        second = await next_event(t)
        assert second.payload.message_id == "c-1"
        hub.plan.add("c2d_settle", 503001, device="d1")
        with pytest.raises(IoTHubError) as info:
            await asyncio.wait_for(t.settle(second.payload.lock_token, "reject"), STEP)
        assert info.value.name == "ServiceUnavailable"
    finally:
        await t.close()


# -- TLS ---------------------------------------------------------------------------------------------


async def test_tls_front_and_adapter(hub: Hub, tls_files: Any) -> None:
    front = AmqpFront(hub, FrontConfig(ssl_context=tls_files.server_context()),
                      cert_file=str(tls_files.cert_pem), key_file=str(tls_files.key_pem))
    await asyncio.wait_for(front.start(), STEP)
    good = AmqpTransport.from_connection_string(hub.connection_string("d1"), host="localhost", port=front.port,
                                                ssl=client_context(str(tls_files.ca_pem)), connect_timeout=STEP)
    untrusted = AmqpTransport.from_connection_string(hub.connection_string("d2"), host="localhost",
                                                     port=front.port, ssl=True, connect_timeout=STEP)
    try:
        await asyncio.wait_for(good.connect(), STEP)
        await asyncio.wait_for(good.send(Message("tls-1", "d1", b"x")), STEP)
        assert hub.received_ids("d1") == ["tls-1"]
        with pytest.raises(IoTHubError) as info:
            await asyncio.wait_for(untrusted.connect(), STEP)
        assert info.value.name in {"TlsVerificationFailed", "TlsHandshakeFailed"}
    finally:
        await good.close()
        await untrusted.close()
        await front.stop()


# -- with the shared handler ---------------------------------------------------------------------


def fast_policy() -> Policy:
    quick = Backoff(initial=0.02, multiplier=2.0, cap=0.1, jitter=0.0, max_attempts=0, max_elapsed=0.0)
    return Policy(PolicyConfig(
        retry=Backoff(initial=0.02, multiplier=2.0, cap=0.1, jitter=0.0, max_attempts=50, max_elapsed=0.0),
        reconnect=quick,
        throttle=ThrottleBackoff(initial=0.02, cap=0.1, jitter=0.0, max_retry_after=0.2),
        identity=IdentityBackoff(initial=0.02, cap=0.1, jitter=0.0),
    ))


async def test_handler_outage_and_recovery(hub: Hub, front: AmqpFront) -> None:
    states: list[State] = []
    handler = Handler(make(hub, front), policy=fast_policy(), identity="d1",
                      on_state_change=lambda c: states.append(c.state))
    async with handler:
        await handler.wait_connected(STEP)
        await asyncio.wait_for(handler.send(Message("a", "d1", b"x"), timeout=STEP), STEP)
        await front.drop_all()
        receipt = await asyncio.wait_for(handler.send(Message("b", "d1", b"x"), timeout=STEP * 2), STEP * 2)
        assert receipt.id == "b"
        assert State.RETRYING in states and states[-1] is State.CONNECTED
    assert hub.received_ids("d1")[-1] == "b"


async def test_handler_throttling(hub: Hub, front: AmqpFront) -> None:
    handler = Handler(make(hub, front), policy=fast_policy(), identity="d1")
    async with handler:
        await handler.wait_connected(STEP)
        hub.plan.add("telemetry", 429001, device="d1", times=2, retry_after=0.05)
        receipt = await asyncio.wait_for(handler.send(Message("t", "d1", b"x"), timeout=STEP), STEP)
        assert receipt.attempts == 3
        assert handler.metrics()[(429001, "amqp", "throttled")] == 2
    assert hub.received_ids("d1") == ["t"]


async def test_handler_identity_conflict_stops_after_repeated_takeovers(hub: Hub, front: AmqpFront) -> None:
    handler = Handler(make(hub, front), policy=fast_policy(), identity="d1")
    thief = make(hub, front)
    async with handler:
        await handler.wait_connected(STEP)
        def stopped() -> bool:
            return handler.state is State.STOPPED

        async with asyncio.timeout(STEP * 4):
            while not stopped():
                await thief.connect()  # takes the identity; the handler takes it back after its delay
                while not stopped() and (handler.state is not State.CONNECTED or thief.connected):
                    await asyncio.sleep(0.01)
        assert handler.last_change.code == 409002
        await thief.close()


async def test_handler_loses_no_accepted_message(hub: Hub, front: AmqpFront) -> None:
    handler = Handler(make(hub, front, send_timeout=0.5), policy=fast_policy(), identity="d1")
    ids = [f"n-{i}" for i in range(40)]
    async with handler:
        await handler.wait_connected(STEP)
        hub.plan.add("telemetry", kind="drop", device="d1", times=2)
        hub.plan.add("telemetry", kind="no_ack", device="d1", times=2)
        hub.plan.add("telemetry", 503001, device="d1", times=2)

        async def one(i: str) -> None:
            await handler.send(Message(i, "d1", b"x"), timeout=STEP * 3)

        sends = [asyncio.ensure_future(one(i)) for i in ids]
        await asyncio.sleep(0.05)
        await front.drop_all()
        results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), STEP * 4)
        assert [r for r in results if r is not None] == []
    assert set(ids) <= set(hub.received_ids("d1"))


class socket_port:
    """A free loopback port (bound, then released on exit)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
