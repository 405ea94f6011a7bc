"""gateway.testing: the in-memory transport users script their own tests with, driving the real handler."""

from __future__ import annotations

import asyncio

import pytest

from gateway.codes import code_of
from gateway.errors import make_error
from gateway.handler import Handler, State
from gateway.testing import FakeClock, MemoryTransport
from gateway.transport import GetTwin, Message, UnsupportedRequest


async def test_scripted_outage_and_throttle_through_the_real_handler() -> None:
    clock = FakeClock()
    transport = MemoryTransport("amqp")
    transport.connect_errors = [make_error(code_of("ConnectionRefused"), transport="amqp"), None]
    transport.send_errors = [make_error(code_of("ThrottlingException"), transport="amqp", retry_after=30)]
    async with Handler(transport, clock=clock) as handler:
        await clock.advance(5)  # the refused connect is retried on the reconnect curve, in virtual time
        assert handler.state is State.CONNECTED and transport.connects == 1
        task = asyncio.ensure_future(handler.send(Message("m1", "d1", b"{}"), timeout=600))
        await clock.advance(20)
        assert not task.done()  # still waiting out the hub's Retry-After of 30 s
        await clock.advance(20)  # past it (30 s plus at most 10 % jitter)
        receipt = await task
        assert receipt.id == "m1" and [m.id for m in transport.sent] == ["m1"]
        transport.drop(make_error(code_of("DeviceConnectionClosedRemotely"), transport="amqp"))
        await clock.advance(120)
        assert handler.state is State.CONNECTED and transport.connects == 2


async def test_request_must_be_scripted() -> None:
    with pytest.raises(UnsupportedRequest, match="GetTwin"):
        await MemoryTransport().request(GetTwin(), timeout=1)


async def test_token_lifetime_sets_the_credential_expiry_at_each_connect() -> None:
    clock = FakeClock()
    transport = MemoryTransport(clock=clock, token_lifetime=3600, ambiguous_drops=True)
    assert transport.credential_expiry is None and transport.ambiguous_drops
    await transport.connect()
    assert transport.credential_expiry == clock.wall() + 3600
    clock.step_wall(-100)
    await transport.connect()
    assert transport.credential_expiry == clock.wall() + 3600
