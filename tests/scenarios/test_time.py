"""Edge boards' wall clocks jump (NTP after boot, a dead RTC battery, a manual fix); deadlines must not.

Every duration in the handler runs on the loop's monotonic clock. The wall clock only places the daily
quota reset and HTTP-date ``Retry-After`` values, and dates the tokens. Here the wall clock of the whole
client side (the handler and the transport's token minting) steps one hour back, then one hour forward,
in the middle of a throttle that the emulator really applies over TLS.
"""

from __future__ import annotations

import asyncio
import time

from gateway.clock import SystemClock
from gateway.codes import code_of
from gateway.emulator.faults import Operation
from gateway.errors import IoTHubError
from gateway.handler import Handler
from gateway.transport import Message
from tests.scenarios.conftest import Stage, fast_policy
from tests.scenarios.kit import transport_for

SCALE = 0.01
HOUR = 3600.0


class SteppedClock(SystemClock):
    """The real clock whose wall reading the test can step, as ``date -s`` would."""

    def __init__(self) -> None:
        self.offset = 0.0

    def wall(self) -> float:
        return time.time() + self.offset

    def epoch(self) -> float:  # what the transport dates its tokens with
        return self.wall()


async def test_deadlines_hold_when_the_wall_clock_steps_back_and_forward_during_a_throttle(stage: Stage) -> None:
    clock = SteppedClock()
    # tokens live two hours, so a token dated an hour back is still valid at the hub
    transport = transport_for(stage, "mqtt5", clock=clock.epoch, token_ttl=2 * HOUR)
    throttle = stage.hub.plan.add(Operation.TELEMETRY, code_of("ThrottlingException"), device="d1",
                                  transport="mqtt", times=None)
    async with Handler(transport, policy=fast_policy(SCALE), clock=clock, identity="d1") as handler:
        await handler.wait_connected(timeout=10)

        # One hour back while a send with a 2 s deadline waits out the throttle: it must still end on time
        # (on the wall clock its deadline would now be an hour away).
        pending = asyncio.ensure_future(handler.send(Message("back", "d1", b"x"), timeout=2.0))
        await asyncio.sleep(0.3)
        clock.offset -= HOUR
        async with asyncio.timeout(30):  # a guard against the hour-long hang, not a timing claim
            try:
                await pending
            except IoTHubError as err:
                refused = err
        assert refused.code == code_of("ThrottlingException")

        # One hour forward while a send with a generous deadline waits: it must not expire at once, and
        # is delivered when the throttle lifts.
        pending = asyncio.ensure_future(handler.send(Message("forward", "d1", b"y"), timeout=60.0))
        await asyncio.sleep(0.3)
        clock.offset += 2 * HOUR
        await asyncio.sleep(0.3)
        assert not pending.done(), pending
        assert stage.hub.plan.remove(throttle.fault_id)
        async with asyncio.timeout(30):
            receipt = await pending
        assert receipt.id == "forward"
    assert "forward" in stage.hub.received_ids("d1")
    assert "back" not in stage.hub.received_ids("d1")
