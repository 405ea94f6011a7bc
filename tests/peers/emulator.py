"""The emulator's fronts as fixtures, and the guard that no proton thread outlives its test."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from adapters.amqp.emulator import AmqpFront
from adapters.mqtt.emulator import MqttFront
from gateway.emulator import Hub
from gateway.emulator.front import FrontConfig

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


@contextlib.asynccontextmanager
async def tls_amqp_front(hub: Hub, tls_files: Any) -> AsyncIterator[AmqpFront]:
    """The AMQP front over TLS (proton takes the certificate as files), started and stopped within bounds."""
    f = AmqpFront(hub, FrontConfig(ssl_context=tls_files.server_context()),
                  cert_file=str(tls_files.cert_pem), key_file=str(tls_files.key_pem))
    await asyncio.wait_for(f.start(), STEP)
    try:
        yield f
    finally:
        await asyncio.wait_for(f.stop(), STEP * 3)
