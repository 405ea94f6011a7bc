"""Two instances sharing one identity, as IoT Hub makes them fight: each connect closes the other.

Where the hub says so exactly (MQTT 5 DISCONNECT 0x8E, AMQP's 400027 condition), the handler may stop
after K takeovers in the window: the fight settles with one instance connected and the other stopped,
naming the identity. On MQTT 3.1.1 the hub only closes the older socket; a bare drop with nothing in
flight is ambiguous evidence, so it parks long and alerts (state, metric) but never stops for good.
"""

from __future__ import annotations

import dataclasses

import pytest

from gateway.handler import Handler, State
from gateway.policy import PolicyConfig
from tests.scenarios.conftest import Stage, fast_policy
from tests.scenarios.kit import Recorder, outcomes, transport_for, until

SCALE = 0.01


@pytest.mark.parametrize("kind", ["mqtt5", "amqp"])
async def test_an_exact_takeover_settles_with_one_instance_stopped(stage: Stage, kind: str) -> None:
    policy = fast_policy(SCALE)
    first, second = Recorder(), Recorder()
    a = Handler(transport_for(stage, kind), policy=policy, identity="d1", on_state_change=first)
    b = Handler(transport_for(stage, kind), policy=policy, identity="d1", on_state_change=second)
    try:
        await a.start()
        await a.wait_connected(timeout=10)
        await b.start()
        settled = await until(lambda: {a.state, b.state} == {State.CONNECTED, State.STOPPED}, timeout=60)
        assert settled, (a.last_change, b.last_change)
        loser = a if a.state is State.STOPPED else b
        assert loser.last_change.cause is not None and loser.last_change.cause.exact
        stop = loser.last_change
        assert "identity" in stop.reason and "d1" in stop.reason
        # the winner keeps the identity: it is the one the hub sees online
        assert stage.hub.is_online("d1")
    finally:
        await a.close()
        await b.close()


async def test_bare_drops_on_mqtt311_park_and_alert_but_never_stop(stage: Stage) -> None:
    # park for long enough that the fight visibly settles while we watch
    policy = fast_policy(SCALE, drops=dataclasses.replace(PolicyConfig().drops, takeover_park=600))
    first, second = Recorder(), Recorder()
    a = Handler(transport_for(stage, "mqtt311"), policy=policy, identity="d1", on_state_change=first)
    b = Handler(transport_for(stage, "mqtt311"), policy=policy, identity="d1", on_state_change=second)
    try:
        await a.start()
        await a.wait_connected(timeout=10)
        await b.start()
        settled = await until(lambda: {a.state, b.state} == {State.CONNECTED, State.PARKED}, timeout=60)
        assert settled, (a.last_change, b.last_change)
        parked = a if a.state is State.PARKED else b
        assert "takeover" in parked.last_change.reason or "identity" in parked.last_change.reason
        assert parked.last_change.until is not None  # it will try again: parked, not stopped
        assert outcomes(parked, "inferred_takeover_park") >= 1  # the alert, as a metric
        assert State.STOPPED not in first.states() | second.states()
    finally:
        await a.close()
        await b.close()
