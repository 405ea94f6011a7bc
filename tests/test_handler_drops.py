"""MQTT 3.1.1 drops through the real handler (issue 10 #2): attributed to the sends in flight, poison
dead-lettered, drop-throttling ridden out, inferred takeovers parked, never stopped. Virtual time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.clock import FakeClock
from gateway.codes import code_of
from gateway.handler import State
from gateway.transport import Message
from tests.test_handler import CLOSED_REMOTELY, FakeTransport, Hub, Rig, make_rig, msg, spawn

ARGUMENT_INVALID = code_of("ArgumentInvalid")
TOO_LARGE = code_of("MessageTooLarge")


class DroppingTransport(FakeTransport):
    """MQTT 3.1.1 as IoT Hub speaks it: a refused publish closes the socket, with no code."""

    def __init__(self, hub: Hub, identity: str = "dev1", name: str = "mqtt") -> None:
        super().__init__(hub, identity, name)
        self.ambiguous_drops = True
        self.poison: set[str] = set()  #: message ids the hub refuses every time
        self.drop_all_until = 0.0  #: the hub drops every publish until then (throttling, 3.1.1 style)
        self.in_flight_peak = 0
        self._in_flight = 0

    async def send(self, message: Message) -> None:
        self._in_flight += 1
        self.in_flight_peak = max(self.in_flight_peak, self._in_flight)
        try:
            await asyncio.sleep(0)  # let concurrent sends overlap, as on a real link
            if self.connected and (message.id in self.poison or self.hub.clock.now() < self.drop_all_until):
                self.hub.attempts.append((self.hub.clock.now(), message.id))
                err = self.err(CLOSED_REMOTELY, exact=False)
                self.drop(err)
                raise err
            await super().send(message)
        finally:
            self._in_flight -= 1


def dropping_rig(**kw: Any) -> tuple[Rig, DroppingTransport]:
    rig = make_rig(**kw)
    transport = DroppingTransport(rig.hub, "dev1")
    rig.handler._transport = transport  # same handler wiring, the 3.1.1 transport (read again at connect)
    rig.transport = transport
    return rig, transport


async def started(rig: Rig) -> None:
    await rig.handler.start()
    assert await rig.clock.run_until(lambda: rig.handler.state is State.CONNECTED, limit=60)


@pytest.mark.parametrize(("size", "code"), [(2, ARGUMENT_INVALID), (300 * 1024, TOO_LARGE)])
async def test_a_poison_message_is_dead_lettered_and_the_rest_flow(size: int, code: int) -> None:
    rig, transport = dropping_rig()
    await started(rig)
    transport.poison = {"m3"}
    messages = [msg(i) if i != 3 else Message("m3", "dev1", b"x" * size) for i in range(8)]
    sends = [spawn(rig.handler.send(m, timeout=600)) for m in messages]
    assert await rig.clock.run_until(lambda: all(s.done() for s in sends), limit=600)
    bad = sends[3].exception()
    assert bad is not None and getattr(bad, "code", None) == code and not bad.exact  # type: ignore[attr-defined]
    assert all(s.result().id == f"m{i}" for i, s in enumerate(sends) if i != 3)
    assert sorted({m.id for m in rig.hub.delivered}) == sorted(f"m{i}" for i in range(8) if i != 3)
    assert [(u.id, u.outcome, u.error.code) for u in rig.undelivered] == [("m3", "failed", code)]
    assert await rig.clock.run_until(lambda: rig.handler.state is State.CONNECTED, limit=60)
    assert not any(c.state is State.STOPPED for c in rig.changes)
    assert rig.handler.metrics()[(code, "mqtt", "poison")] == 1
    drops_of_m3 = [mid for _, mid in rig.hub.attempts if mid == "m3"]
    assert len(drops_of_m3) <= 1 + rig.handler._policy.config.drops.poison_after  # found quickly
    await rig.handler.close()


async def test_persistent_drop_throttling_is_ridden_out_never_stopped() -> None:
    rig, transport = dropping_rig()
    await started(rig)
    t0 = rig.clock.now()
    transport.drop_all_until = t0 + 120  # two minutes of "every publish closes the socket"
    sends = [spawn(rig.handler.send(msg(i), timeout=900)) for i in range(20)]
    assert await rig.clock.run_until(lambda: all(s.done() for s in sends), limit=900)
    assert [s.result().id for s in sends] == [f"m{i}" for i in range(20)]  # everything delivered
    assert sorted({m.id for m in rig.hub.delivered}) == sorted(f"m{i}" for i in range(20))
    assert rig.undelivered == []
    assert not any(c.state is State.STOPPED for c in rig.changes)
    throttled = [c for c in rig.changes if c.state is State.THROTTLED]
    assert throttled and "throttled" in throttled[0].reason  # attributed to throttling, not to a takeover
    assert rig.handler.metrics()[(CLOSED_REMOTELY, "mqtt", "throttled_drops")] >= 2
    assert not any("identity" in c.reason for c in rig.changes)
    # during the throttle the drops came one send at a time, spaced by the throttle curve, not hot
    during = [t for t, _ in rig.hub.attempts if t0 <= t < t0 + 120]
    assert 2 <= len(during) <= 10
    assert rig.handler.state is State.CONNECTED
    await rig.handler.close()


async def test_suspect_mode_sends_one_at_a_time_then_concurrency_returns() -> None:
    rig, transport = dropping_rig()
    await started(rig)
    transport.drop_all_until = rig.clock.now() + 1  # one drop with several in flight
    first = [spawn(rig.handler.send(msg(i), timeout=600)) for i in range(5)]
    await rig.clock.advance(0)
    assert transport.in_flight_peak == 5
    assert await rig.clock.run_until(lambda: all(s.done() for s in first), limit=600)
    transport.in_flight_peak = 0
    more = [spawn(rig.handler.send(msg(i), timeout=600)) for i in range(5, 9)]
    assert await rig.clock.run_until(lambda: all(s.done() for s in more), limit=60)
    assert transport.in_flight_peak == 1  # still suspect: one at a time
    while rig.handler.history.suspect:
        await rig.handler.send(msg(f"x{rig.handler.history.suspect}"))
    transport.in_flight_peak = 0
    last = [spawn(rig.handler.send(msg(i), timeout=600)) for i in range(20, 25)]
    assert await rig.clock.run_until(lambda: all(s.done() for s in last), limit=60)
    assert transport.in_flight_peak == 5  # suspect mode over
    await rig.handler.close()


async def test_bare_drops_with_nothing_in_flight_park_and_alert_never_stop(caplog: Any) -> None:
    clock = FakeClock()
    hub = Hub(clock)
    hub.kick_code = CLOSED_REMOTELY
    rigs = []
    for seed in (1, 2):
        rig = make_rig(clock=clock, hub=hub, seed=seed)
        transport = DroppingTransport(hub, "dev1")
        rig.handler._transport = transport
        rig.transport = transport
        rigs.append(rig)

    def kick_exact_false(t: FakeTransport) -> None:  # the hub's takeover of a 3.1.1 connection: a bare drop
        other = hub.owners.get(t.identity)
        if other is not None and other is not t:
            other.drop(other.err(CLOSED_REMOTELY, exact=False))
            hub.owners.pop(t.identity, None)

    for rig in rigs:
        original = rig.transport.connect

        async def connect(t: FakeTransport = rig.transport, original: Any = original) -> None:
            kick_exact_false(t)
            await original()

        rig.transport.connect = connect  # type: ignore[method-assign]
    await started(rigs[0])
    await rigs[1].handler.start()
    await clock.advance(6 * 3600)
    changes = [c for r in rigs for c in r.changes]
    assert not any(c.state is State.STOPPED for c in changes)
    parked = [c for c in changes if c.state is State.PARKED]
    assert parked and "identity" in parked[0].reason and "not stopping" in parked[0].reason
    assert sum(r.handler.metrics().get((CLOSED_REMOTELY, "mqtt", "inferred_takeover_park"), 0) for r in rigs) >= 1
    assert any("parked" in rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING")
    # long parks: about one round of takeover_repeat drops each per half hour, no ping-pong storm
    assert len(hub.connects) <= 6 * 2 * (2 * 3 + 2)
    for rig in rigs:
        await rig.handler.close()
