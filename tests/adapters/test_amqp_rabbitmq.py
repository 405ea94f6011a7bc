"""The AMQP adapter against a real, independent AMQP 1.0 peer: a private RabbitMQ node.

RabbitMQ is no IoT Hub (no CBS, no device addresses), so the adapter runs with ``cbs=False``, SASL
PLAIN and explicit queue addresses. What this proves is the transport layer against a peer we did
not write: SASL refusal, a refused attach, a broker crash mid-send, and a plain round trip.
The node kill test runs last in this module; the fixture restarts the node for any later user.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from adapters.amqp.transport import AmqpRemoteError, AmqpTransport
from gateway.errors import ConnectionLostError, IoTHubError
from gateway.transport import C2DMessage, Disconnected, Inbound, Message
from tests.peers.rabbitmq import RabbitNode

pytestmark = pytest.mark.rabbitmq
STEP = 10.0


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    before = {t for t in threading.enumerate() if t.name.startswith("amqp-")}
    yield
    left = [t for t in threading.enumerate() if t.name.startswith("amqp-") and t not in before]
    for t in left:
        t.join(2.0)
    assert [t.name for t in left if t.is_alive()] == []


def broker(node: RabbitNode, *, queue: str | None = None, password: str | None = None, **kw: Any) -> AmqpTransport:
    q = queue or f"q-{uuid.uuid4().hex[:8]}"
    kw.setdefault("receive_c2d", False)
    kw.setdefault("settle_mode", "first")  # RabbitMQ refuses rcv-settle-mode second (amqp:not-implemented)
    return AmqpTransport(host="127.0.0.1", port=node.port, device_id="rabbit", ssl=None, cbs=False,
                         user=node.user, password=node.password if password is None else password,
                         events_address=f"/queue/{q}", c2d_address=f"/queue/{q}",
                         connect_timeout=STEP, send_timeout=STEP, close_timeout=3.0, **kw)


async def test_send_and_receive_round_trip(rabbitmq: RabbitNode) -> None:
    sender = broker(rabbitmq, queue="round-trip")
    receiver = broker(rabbitmq, queue="round-trip", receive_c2d=True)
    try:
        await asyncio.wait_for(sender.connect(), STEP)
        await asyncio.wait_for(sender.send(Message("r-1", "rabbit", b"over rabbit", {"k": "v"})), STEP)
        await asyncio.wait_for(receiver.connect(), STEP)

        async def first() -> Any:
            async for event in receiver.events():
                return event
            return None

        event = await asyncio.wait_for(first(), STEP)
        assert isinstance(event, Inbound) and isinstance(event.payload, C2DMessage)
        assert event.payload.message_id == "r-1" and event.payload.body == b"over rabbit"
        assert event.payload.properties == {"k": "v"}
        await asyncio.wait_for(receiver.settle(event.payload.lock_token), STEP)
    finally:
        await sender.close()
        await receiver.close()


async def test_bad_sasl_plain_credentials(rabbitmq: RabbitNode) -> None:
    t = broker(rabbitmq, password="wrong")
    with pytest.raises(IoTHubError) as info:
        await asyncio.wait_for(t.connect(), STEP)
    err = info.value
    assert err.name == "IotHubUnauthorized"  # amqp:unauthorized-access
    assert isinstance(err.__cause__, AmqpRemoteError)
    assert err.__cause__.condition == "amqp:unauthorized-access"
    await t.close()


async def test_attach_to_an_address_that_does_not_exist(rabbitmq: RabbitNode) -> None:
    t = broker(rabbitmq)
    t.events_address = "/exchange/no-such-exchange/key"
    with pytest.raises(IoTHubError) as info:
        await asyncio.wait_for(t.connect(), STEP)
    # RabbitMQ 3.10 ends the session with amqp:not-found "no exchange ..." (no hang, no silent close)
    assert isinstance(info.value.__cause__, AmqpRemoteError)
    assert info.value.__cause__.condition == "amqp:not-found"
    assert info.value.name == "DeviceNotFound"
    await t.close()


async def test_zz_broker_killed_mid_send(rabbitmq: RabbitNode) -> None:
    t = broker(rabbitmq)
    await asyncio.wait_for(t.connect(), STEP)
    try:
        await asyncio.wait_for(t.send(Message("before", "rabbit", b"x")), STEP)
        sends = [asyncio.ensure_future(t.send(Message(f"k-{i}", "rabbit", b"x" * 1000))) for i in range(2000)]
        await asyncio.sleep(0)
        rabbitmq.kill()
        results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), STEP)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert failed, "the broker died with 2000 sends in flight; some must fail"
        for r in failed:
            assert isinstance(r, IoTHubError), r
        assert any(isinstance(r, ConnectionLostError) and r.name != "NotConnected" for r in failed)

        async def last() -> Any:
            async for event in t.events():
                if isinstance(event, Disconnected):
                    return event
            return None

        event = await asyncio.wait_for(last(), STEP)
        assert isinstance(event, Disconnected) and isinstance(event.error, ConnectionLostError)
    finally:
        await t.close()
