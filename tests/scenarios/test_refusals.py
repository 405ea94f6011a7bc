"""Throttling and poison messages as each transport meets them, over TLS, through the handler.

MQTT 3.1.1 is the hard case: IoT Hub refuses a publish (throttled, malformed) by closing the socket, and
the same message is resent after the reconnect. The handler must read those drops as what they are:
throttling when nothing gets through, a poison message when others flow and one keeps being in flight at
the drops; never an identity conflict, never a stop.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.codes import code_of
from gateway.emulator.faults import Operation
from gateway.errors import IoTHubError
from gateway.handler import Handler, State
from tests.scenarios.conftest import Stage, fast_policy
from tests.scenarios.kit import Recorder, messages, outcomes, transport_for

SCALE = 0.01  # the shipped policy's delays, x0.01: two minutes of throttling play out in 1.2 s


async def test_two_minutes_of_throttling_on_mqtt311_then_lifted_delivers_everything(stage: Stage) -> None:
    # IoT Hub throttles by dropping every publish for (scaled) two minutes, then lets traffic through.
    stage.hub.plan.add(Operation.TELEMETRY, code_of("ThrottlingException"), device="d1", transport="mqtt",
                       for_seconds=120 * SCALE)
    record = Recorder()
    batch = messages("d1", 12)
    async with Handler(transport_for(stage, "mqtt311"), policy=fast_policy(SCALE), identity="d1",
                       on_state_change=record) as handler:
        receipts = await asyncio.wait_for(
            asyncio.gather(*(handler.send(m, timeout=120) for m in batch)), 60)
        assert handler.state is State.CONNECTED
    assert sorted(r.id for r in receipts) == sorted(m.id for m in batch)
    assert set(stage.hub.received_ids("d1")) == {m.id for m in batch}
    assert State.STOPPED not in record.states()
    assert outcomes(handler, "throttled_drops") >= 1, handler.metrics()  # attributed to throttling ...
    assert outcomes(handler, "poison") == 0  # ... not to a message
    assert outcomes(handler, "inferred_takeover") == 0  # ... and never to another client


@pytest.mark.parametrize("kind", ["mqtt311", "mqtt5", "amqp", "http"])
async def test_a_poison_message_is_dead_lettered_and_the_rest_flow(stage: Stage, kind: str) -> None:
    # The hub refuses one message every time it sees it: with a code where the transport can say one
    # (MQTT 5 PUBACK, AMQP rejected outcome, HTTP 400), by dropping the connection on MQTT 3.1.1.
    name = kind[:4]
    stage.hub.plan.add(Operation.TELEMETRY, code_of("ArgumentInvalid"), device="d1", transport=name, times=None,
                       match_property={"poison": "1"})
    record = Recorder()
    batch = messages("d1", 8, poison=[2])
    async with Handler(transport_for(stage, kind), policy=fast_policy(SCALE), identity="d1",
                       on_state_change=record) as handler:
        results = await asyncio.wait_for(
            asyncio.gather(*(handler.send(m, timeout=120) for m in batch), return_exceptions=True), 90)
        good = [m for i, m in enumerate(batch) if i != 2]
        assert not any(isinstance(results[i], BaseException) for i in range(len(batch)) if i != 2), results
        refused = results[2]
        assert isinstance(refused, IoTHubError), refused
        assert refused.code == code_of("ArgumentInvalid")
        # exact where the hub said it; inferred (and marked so) where it could only drop the connection
        assert refused.exact is (kind != "mqtt311")
        await handler.wait_connected(timeout=30)  # on 3.1.1 the last drop was the poison's: it reconnects
    received = set(stage.hub.received_ids("d1"))
    assert {m.id for m in good} <= received
    assert batch[2].id not in received
    assert State.STOPPED not in record.states()
    if kind == "mqtt311":
        assert outcomes(handler, "poison") == 1
