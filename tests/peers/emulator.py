"""The emulator's fronts as fixtures, and the guard that no proton thread outlives its test."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from adapters.amqp.emulator import AmqpFront
from adapters.mqtt.emulator import MqttFront
from gateway.emulator import Hub

STEP = 5.0  # bound on starting or stopping a front


def amqp_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("amqp-")]


@pytest.fixture
def no_amqp_thread_left() -> Iterator[None]:
    """One proton thread per connection at most, and it ends with the connection (issue 5)."""
    before = set(amqp_threads())
    yield
    left = [t for t in amqp_threads() if t not in before]
    for t in left:
        t.join(2.0)
    assert [t.name for t in left if t.is_alive()] == []


@pytest.fixture
def hub() -> Hub:
    """An emulated hub with devices d1 and d2 registered."""
    h = Hub()
    h.add_device("d1")
    h.add_device("d2")
    return h


@pytest.fixture
async def amqp_front(hub: Hub) -> AsyncIterator[AmqpFront]:
    f = AmqpFront(hub)
    await asyncio.wait_for(f.start(), STEP)
    yield f
    await asyncio.wait_for(f.stop(), STEP * 3)


@pytest.fixture
async def mqtt_front(hub: Hub) -> AsyncIterator[MqttFront]:
    f = MqttFront(hub)
    await asyncio.wait_for(f.start(), STEP)
    yield f
    await asyncio.wait_for(f.stop(), STEP * 2)
