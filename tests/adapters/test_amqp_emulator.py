"""The emulator's AMQP front on its own terms: lifecycle, CBS on the wire, attach rules, fault plan matching.

A plain proton ``BlockingConnection`` plays the device where the adapter would hide the wire.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from adapters.amqp.emulator import AmqpFront
from adapters.amqp.transport import AmqpTransport
from gateway.emulator import Hub
from gateway.emulator.front import Front, FrontConfig
from gateway.errors import ConnectionLostError, IoTHubError
from gateway.transport import Disconnected, Message

STEP = 5.0


pytestmark = pytest.mark.usefixtures("no_amqp_thread_left")


@pytest.fixture
def front(amqp_front: AmqpFront) -> AmqpFront:
    return amqp_front


def adapter(hub: Hub, front: AmqpFront, **kw: Any) -> AmqpTransport:
    return AmqpTransport.from_connection_string(hub.connection_string("d1"), host="127.0.0.1", port=front.port,
                                                ssl=None, connect_timeout=STEP, send_timeout=STEP, **kw)


def put_token(port: int, audience: str, token: str, *, operation: str = "put-token") -> dict[str, Any]:
    """One put-token over a raw proton connection; the answer's application properties."""
    from proton import Message as PMessage
    from proton.utils import BlockingConnection

    conn = BlockingConnection(f"amqp://127.0.0.1:{port}", timeout=STEP, allowed_mechs="ANONYMOUS")
    try:
        receiver = conn.create_receiver("$cbs", credit=1)
        sender = conn.create_sender("$cbs")
        request = PMessage(body=token, id="req-1", reply_to="cbs")
        props: Any = {"operation": operation, "type": "azure-devices.net:sastoken", "name": audience}
        request.properties = props
        sender.send(request)
        answer = receiver.receive(timeout=STEP)
        receiver.accept()
        assert answer.correlation_id == "req-1"
        answered: dict[str, Any] = dict(answer.properties or {})
        return answered
    finally:
        conn.close()


async def test_front_protocol_and_lifecycle(hub: Hub) -> None:
    f = AmqpFront(hub)
    assert isinstance(f, Front) and f.transport == "amqp"
    await asyncio.wait_for(f.start(), STEP)
    await f.start()  # idempotent
    assert f.port > 0
    await f.stop()
    await f.stop()
    with pytest.raises(OSError):
        await asyncio.to_thread(lambda: __import__("socket").create_connection(("127.0.0.1", f.port), 1).close())


def test_an_ssl_context_alone_is_refused(hub: Hub, tls_files: Any) -> None:
    with pytest.raises(ValueError, match="cert_file"):
        AmqpFront(hub, FrontConfig(ssl_context=tls_files.server_context()))


async def test_cbs_answers_on_the_wire(hub: Hub, front: AmqpFront) -> None:
    audience = f"{hub.host_name}/devices/d1"
    ok = await asyncio.to_thread(put_token, front.port, audience, hub.token("d1", 4_000_000_000))
    assert ok["status-code"] == 200
    expired = await asyncio.to_thread(put_token, front.port, audience, hub.token("d1", 1000))
    assert expired["status-code"] == 401 and "ErrorCode:IotHubUnauthorized;" in expired["status-description"]
    garbage = await asyncio.to_thread(put_token, front.port, audience, "not a token")
    assert garbage["status-code"] == 401 and "IotHubUnauthorizedAccess" in garbage["status-description"]
    other = await asyncio.to_thread(put_token, front.port, audience, "x", operation="delete-token")
    assert other["status-code"] == 400


async def test_attach_without_a_token_is_unauthorized(hub: Hub, front: AmqpFront) -> None:
    t = AmqpTransport(host="127.0.0.1", port=front.port, device_id="d1", hub_host=hub.host_name, ssl=None,
                      cbs=False, connect_timeout=STEP)
    with pytest.raises(IoTHubError) as info:
        await asyncio.wait_for(_connect_and_send(t), STEP)
    assert info.value.name == "IotHubUnauthorized"
    await t.close()


async def test_attach_to_an_unknown_address(hub: Hub, front: AmqpFront) -> None:
    t = adapter(hub, front, events_address="/devices/d1/nowhere")
    with pytest.raises(IoTHubError) as info:
        await asyncio.wait_for(_connect_and_send(t), STEP)
    assert info.value.name == "AmqpAddressNotFound"
    await t.close()


async def _connect_and_send(t: AmqpTransport) -> None:
    # a refused attach may show after the link opened: the first send then reports it
    await t.connect()
    await t.send(Message("m", "d1", b"x"))
    async for event in t.events():
        if isinstance(event, Disconnected):
            raise event.error


async def test_presence_follows_the_connection(hub: Hub, front: AmqpFront) -> None:
    t = adapter(hub, front)
    await asyncio.wait_for(t.connect(), STEP)
    assert hub.online() == {"d1": "amqp"}
    await t.close()
    async with asyncio.timeout(STEP):
        while hub.is_online("d1"):
            await asyncio.sleep(0.01)


async def test_faults_for_other_transports_or_devices_do_not_apply(hub: Hub, front: AmqpFront) -> None:
    hub.plan.add("telemetry", 429001, transport="mqtt")
    hub.plan.add("telemetry", 429001, device="someone-else")
    t = adapter(hub, front)
    await asyncio.wait_for(t.connect(), STEP)
    try:
        await asyncio.wait_for(t.send(Message("m", "d1", b"x")), STEP)
        assert len(hub.plan.pending()) == 2
        hub.plan.add("telemetry", 429001, transport="amqp")
        with pytest.raises(IoTHubError):
            await asyncio.wait_for(t.send(Message("m2", "d1", b"x")), STEP)
    finally:
        await t.close()


async def test_no_ack_is_recorded_but_never_settled(hub: Hub, front: AmqpFront) -> None:
    t = adapter(hub, front)
    t.send_timeout = 0.2
    await asyncio.wait_for(t.connect(), STEP)
    try:
        hub.plan.add("telemetry", kind="no_ack")
        with pytest.raises(IoTHubError) as info:
            await asyncio.wait_for(t.send(Message("lost-ack", "d1", b"x")), STEP)
        assert info.value.name == "OperationTimedOut"
        assert hub.received_ids("d1") == ["lost-ack"]  # the hub has it: a resend is a duplicate
    finally:
        await t.close()


async def test_drop_all_cuts_every_connection(hub: Hub, front: AmqpFront) -> None:
    hub.add_device("d2")
    one = adapter(hub, front)
    two = AmqpTransport.from_connection_string(hub.connection_string("d2"), host="127.0.0.1", port=front.port,
                                               ssl=None, connect_timeout=STEP)
    await asyncio.wait_for(one.connect(), STEP)
    await asyncio.wait_for(two.connect(), STEP)
    try:
        assert front.connections() == 2
        await front.drop_all()
        for t in (one, two):
            async def last(t: AmqpTransport = t) -> Any:
                async for event in t.events():
                    return event
                return None

            event = await asyncio.wait_for(last(), STEP)
            assert isinstance(event, Disconnected) and isinstance(event.error, ConnectionLostError)
            # proton reports the vanished peer itself, as framing-error "connection aborted"
            assert event.error.__cause__.where == "transport"  # type: ignore[union-attr]
        assert front.connections() == 0
    finally:
        await one.close()
        await two.close()
