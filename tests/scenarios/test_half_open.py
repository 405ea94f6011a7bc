"""A half-open link: the path to the hub stops carrying anything, yet no socket is closed.

A NAT that forgets the flow, a modem that sleeps, a front end that hangs: only a heartbeat (MQTT
keep-alive, AMQP idle timeout, both on by default) can tell. A proxy between the device and the TLS
front freezes the connection; the transport must notice within two heartbeat periods, the handler must
reconnect (through the same proxy, which forwards new connections), and nothing accepted may be lost.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.handler import Handler, State
from tests.peers.proxy import TcpProxy
from tests.scenarios.conftest import Stage, fast_policy
from tests.scenarios.kit import Recorder, messages, transport_for, until

HEARTBEAT = 1.0  # seconds: MQTT keep-alive / AMQP idle timeout for the test


@pytest.mark.parametrize("kind", ["mqtt311", "mqtt5", "amqp"])
async def test_a_half_open_link_is_detected_reconnected_and_nothing_is_lost(stage: Stage, kind: str) -> None:
    options = {"keepalive": int(HEARTBEAT)} if kind.startswith("mqtt") else {"idle_timeout": HEARTBEAT}
    async with TcpProxy("127.0.0.1", stage.port(kind[:4])) as proxy:
        record = Recorder()
        transport = transport_for(stage, kind, port=proxy.port, **options)
        async with Handler(transport, policy=fast_policy(0.01), identity="d1", on_state_change=record) as handler:
            await handler.wait_connected(timeout=10)
            before = messages("d1", 3, "before")
            await asyncio.gather(*(handler.send(m, timeout=30) for m in before))

            assert proxy.freeze() == 1
            loop = asyncio.get_running_loop()
            frozen_at = loop.time()
            after = messages("d1", 5, "after")
            sends = asyncio.gather(*(handler.send(m, timeout=60) for m in after))
            # the link is noticed dead and replaced by a new connection through the proxy
            assert await until(lambda: proxy.accepted >= 2, timeout=30), record.changes[-3:]
            noticed = loop.time() - frozen_at
            receipts = await asyncio.wait_for(sends, 30)
            assert handler.state is State.CONNECTED
        assert {r.id for r in receipts} == {m.id for m in after}
        assert {m.id for m in before + after} <= set(stage.hub.received_ids("d1"))
        assert State.RETRYING in record.states() or State.CONNECTING in record.states()
        # within two heartbeat periods plus the reconnect's own first backoff step and TLS handshake
        assert noticed < 2 * HEARTBEAT + 5.0, noticed
