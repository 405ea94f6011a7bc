"""The AMQP mux against RabbitMQ, an independent AMQP 1.0 peer, for what it supports.

RabbitMQ has no CBS node: it lets the mux open the connection and its ``$cbs`` links (SASL ANONYMOUS on
loopback) but never answers a put-token. The devices waiting on the shared connection must not hang nor
fight: each ends at its own connect deadline with OperationTimedOut, all from ONE connection attempt.
"""

from __future__ import annotations

import asyncio

import pytest

from adapters.amqp.mux import AmqpMux
from gateway.codes import code_of
from gateway.errors import IoTHubError
from tests.peers.rabbitmq import RabbitNode

pytestmark = pytest.mark.rabbitmq
STEP = 3.0


async def test_a_peer_that_never_answers_put_token_times_each_device_out_from_one_connection(
        rabbitmq: RabbitNode) -> None:
    mux = AmqpMux(host="127.0.0.1", port=rabbitmq.port, ssl=None, hub_host="rabbit.local", backoff=(0.05, 0.2))
    devices = [mux.device(f"r{i}", token=f"SharedAccessSignature sr=rabbit.local%2Fdevices%2Fr{i}&sig=x&se=1",
                          connect_timeout=STEP) for i in range(3)]
    try:
        results = await asyncio.wait_for(asyncio.gather(*(d.connect() for d in devices), return_exceptions=True),
                                         STEP * 5)
        assert all(isinstance(r, IoTHubError) for r in results), results
        assert {r.code for r in results if isinstance(r, IoTHubError)} == {code_of("OperationTimedOut")}
        assert mux.connection_attempts == 1
        assert not any(d.connected for d in devices)
    finally:
        await asyncio.wait_for(mux.close(), STEP * 3)
