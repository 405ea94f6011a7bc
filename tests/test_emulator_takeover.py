"""One identity, one connection, across transports: the emulated hub closes the older connection when
the same device connects over another transport, as IoT Hub does (400027), on real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapters.amqp.emulator import AmqpFront
from adapters.amqp.transport import AmqpTransport
from adapters.mqtt.emulator import MqttFront
from adapters.mqtt.transport import MqttTransport
from gateway.emulator import Hub
from gateway.transport import Disconnected

STEP = 5.0


@pytest.fixture
async def fronts() -> AsyncIterator[tuple[Hub, MqttFront, AmqpFront]]:
    hub = Hub()
    hub.add_device("d1")
    mqtt, amqp = MqttFront(hub), AmqpFront(hub)
    await asyncio.wait_for(mqtt.start(), STEP)
    await asyncio.wait_for(amqp.start(), STEP)
    try:
        yield hub, mqtt, amqp
    finally:
        await asyncio.wait_for(mqtt.stop(), STEP)
        await asyncio.wait_for(amqp.stop(), STEP * 3)


async def _disconnect_of(transport: Any) -> Disconnected:
    async with asyncio.timeout(STEP):
        async for event in transport.events():
            if isinstance(event, Disconnected):
                return event
    raise AssertionError("the event stream ended without Disconnected")


async def test_amqp_connection_takes_the_identity_from_mqtt(fronts: tuple[Hub, MqttFront, AmqpFront]) -> None:
    hub, mqtt_front, amqp_front = fronts
    mqtt = MqttTransport(hub.connection_string("d1"), host="127.0.0.1", port=mqtt_front.port, ssl=None, protocol=5)
    amqp = AmqpTransport.from_connection_string(hub.connection_string("d1"), host="127.0.0.1",
                                                port=amqp_front.port, ssl=None)
    try:
        await asyncio.wait_for(mqtt.connect(), STEP)
        assert hub.online() == {"d1": "mqtt"}
        await asyncio.wait_for(amqp.connect(), STEP)
        event = await _disconnect_of(mqtt)
        assert event.error.code == 400027 and event.error.exact  # MQTT 5 DISCONNECT 0x8E
        assert hub.online() == {"d1": "amqp"}
    finally:
        await mqtt.close()
        await amqp.close()


async def test_mqtt_connection_takes_the_identity_from_amqp(fronts: tuple[Hub, MqttFront, AmqpFront]) -> None:
    hub, mqtt_front, amqp_front = fronts
    amqp = AmqpTransport.from_connection_string(hub.connection_string("d1"), host="127.0.0.1",
                                                port=amqp_front.port, ssl=None)
    mqtt = MqttTransport(hub.connection_string("d1"), host="127.0.0.1", port=mqtt_front.port, ssl=None)
    try:
        await asyncio.wait_for(amqp.connect(), STEP)
        await asyncio.wait_for(mqtt.connect(), STEP)
        event = await _disconnect_of(amqp)
        assert event.error.code == 400027 and event.error.exact  # the condition's ErrorCode names it
        assert hub.online() == {"d1": "mqtt"}
    finally:
        await amqp.close()
        await mqtt.close()
