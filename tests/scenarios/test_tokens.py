"""SAS tokens expire, and IoT Hub closes the connection when they do. A gateway that runs for hours must
renew before that moment, at a quiet time, so no send is caught in an expiry drop.

Token lifetimes are scaled: a 3 s token stands for IoT Hub's usual hour, nine seconds for three hours.
"""

from __future__ import annotations

import asyncio
import dataclasses

from adapters.mqtt.transport import MqttTransport
from gateway.handler import Handler, State
from gateway.transport import Disconnected, Message
from tests.scenarios.conftest import Stage, fast_policy
from tests.scenarios.kit import Recorder, outcomes, transport_for

TTL = 3.0  # seconds, standing for an hour


async def test_the_emulator_closes_a_connection_whose_token_expired(stage: Stage) -> None:
    transport = transport_for(stage, "mqtt311", token_ttl=TTL)
    assert isinstance(transport, MqttTransport)
    await transport.connect()
    try:
        async with asyncio.timeout(TTL * 5):
            async for event in transport.events():
                if isinstance(event, Disconnected):
                    break
        assert stage.mqtt.expired_drops == 1
    finally:
        await transport.close()


async def test_three_hours_of_traffic_renew_every_token_before_it_expires(stage: Stage) -> None:
    base = fast_policy(0.01)
    policy = type(base)(dataclasses.replace(
        base.config, operation=dataclasses.replace(base.config.operation, renew_before=TTL / 2, renew_margin=0.5)))
    record = Recorder()
    sent: list[str] = []
    async with Handler(transport_for(stage, "mqtt311", token_ttl=TTL), policy=policy, identity="d1",
                       on_state_change=record) as handler:
        await handler.wait_connected(timeout=10)
        loop = asyncio.get_running_loop()
        end = loop.time() + 3 * TTL
        i = 0
        while loop.time() < end:  # steady traffic, so renewal has to find its quiet moment
            message = Message(f"t{i}", "d1", b"reading")
            await handler.send(message, timeout=30)
            sent.append(message.id)
            i += 1
            await asyncio.sleep(0.05)
        renewals = outcomes(handler, "renew")
        assert handler.state is State.CONNECTED
    assert renewals >= 2, handler.metrics()
    assert stage.mqtt.expired_drops == 0  # the hub never had to close an expired connection
    assert set(sent) <= set(stage.hub.received_ids("d1"))
    assert State.STOPPED not in record.states()
