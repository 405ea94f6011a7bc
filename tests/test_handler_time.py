"""The handler on the monotonic clock, with wall steps, half-open links, token renewal, the probe and
cancellation (issue 10 #3-#7). Virtual time, except the cancellation tests, which use the real loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.clock import FakeClock
from gateway.codes import code_of
from gateway.errors import IoTHubError
from gateway.handler import Handler, State
from gateway.testing import MemoryTransport
from gateway.transport import GetTwin, InvokeMethod, Message, MethodResult, Request, UnsupportedRequest
from tests.test_handler import FakeTransport, connected, make_rig, msg, spawn

THROTTLED = code_of("ThrottlingException")
TIMED_OUT = code_of("OperationTimedOut")
HOUR = 3600.0


# -- wall-clock steps (#3) -------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [-HOUR, HOUR])
async def test_a_wall_step_during_a_throttle_moves_no_deadline(step: float) -> None:
    rig = await connected(make_rig())
    h, hub, clock = rig.handler, rig.hub, rig.clock
    t0 = clock.now()
    hub.throttle_until = t0 + 40
    hub.throttle_retry_after = 30.0
    first = spawn(h.send(msg(1), timeout=600))
    await clock.advance(0)
    assert h.state is State.THROTTLED
    clock.step_wall(step)
    short = spawn(h.send(msg(2), timeout=5))
    await clock.advance(5)
    assert short.done()  # expired at its own 5 s, whatever the wall clock did
    err = short.exception()
    assert isinstance(err, IoTHubError) and err.code == THROTTLED
    await clock.advance(20)
    assert not first.done()  # a forward step expired nothing
    assert [m for _, m in hub.attempts] == ["m1"]  # and the gate held: no attempt before 30 s
    assert await clock.run_until(first.done, limit=120)
    assert first.result().id == "m1"
    probes = [t - t0 for t, _ in hub.attempts]
    assert 30.0 <= probes[1] <= 33.0  # the peer's 30 s (+ <= 10 % jitter), on the monotonic clock
    await h.close()


class DateThrottle(FakeTransport):
    """Throttles with an HTTP-date Retry-After (an absolute epoch time, as HTTP's Retry-After: <date>)."""

    async def send(self, message: Message) -> None:
        hub = self.hub
        if hub.clock.now() < hub.throttle_until:
            hub.attempts.append((hub.clock.now(), message.id))
            raise self.err(THROTTLED, retry_at=hub.clock.wall() + 30.0)
        await super().send(message)


async def test_an_http_date_retry_after_is_turned_into_a_delay_once() -> None:
    rig = make_rig()
    transport = DateThrottle(rig.hub)
    rig.handler._transport = transport
    await connected(rig)
    clock, hub = rig.clock, rig.hub
    t0 = clock.now()
    hub.throttle_until = t0 + 1
    sending = spawn(rig.handler.send(msg(1), timeout=600))
    await clock.advance(0)
    clock.step_wall(-HOUR)  # after the decision: the delay is already on the monotonic clock
    assert await clock.run_until(sending.done, limit=600)
    assert [m.id for m in hub.delivered] == ["m1"]
    assert 30.0 <= clock.now() - t0 <= 33.0
    await rig.handler.close()


def test_state_changes_report_wall_times() -> None:
    async def run() -> None:
        rig = await connected(make_rig())
        rig.clock.step_wall(HOUR)
        rig.hub.go_down()
        await rig.clock.advance(0)
        change = rig.handler.last_change
        assert change.at == rig.clock.wall()  # for people: epoch seconds
        assert change.until is not None and rig.clock.wall() <= change.until <= rig.clock.wall() + 60
        await rig.handler.close()

    asyncio.run(run())


# -- the probe (#4) -------------------------------------------------------------------------------------


class ThrottledMethods(FakeTransport):
    async def request(self, request: Request, *, timeout: float) -> Any:
        if self.hub.clock.now() < self.hub.throttle_until:
            raise self.err(THROTTLED, retry_after=10.0)
        return await super().request(request, timeout=timeout)


async def test_a_probe_held_for_an_offline_device_releases_the_probe_slot_at_once() -> None:
    rig = make_rig()
    transport = ThrottledMethods(rig.hub)
    rig.handler._transport = transport
    await connected(rig)
    h, hub, clock = rig.handler, rig.hub, rig.clock
    t0 = clock.now()
    hub.throttle_until = t0 + 5
    call = spawn(h.request(InvokeMethod("d9", "reboot", {"n": 1}), timeout=600))  # d9 is offline
    await clock.advance(0)
    assert h.state is State.THROTTLED
    telemetry = spawn(h.send(msg(1), timeout=120))  # the gateway's own telemetry waits behind the gate
    assert await clock.run_until(telemetry.done, limit=120)
    assert telemetry.result().id == "m1"  # flowed when the throttle ended, not after the held call
    assert clock.now() - t0 <= 12.0
    assert not call.done() and h.held("d9") == 1  # the probe itself is held for its device
    hub.online.add("d9")
    h.device_online("d9")
    assert await clock.run_until(call.done, limit=10)
    assert isinstance(call.result(), MethodResult)
    await h.close()


# -- typed requests (#9) --------------------------------------------------------------------------------


async def test_an_unsupported_request_raises_at_once_unclassified_and_unreported() -> None:
    rig = await connected(make_rig())
    now = rig.clock.now()
    with pytest.raises(UnsupportedRequest):
        await rig.handler.request(GetTwin(), timeout=600)
    assert rig.clock.now() == now and rig.undelivered == []
    assert not any(outcome == "retry" for (_, _, outcome) in rig.handler.metrics())
    await rig.handler.close()


# -- half-open links (#6) -------------------------------------------------------------------------------


async def test_k_timeouts_in_a_row_drop_a_half_open_link() -> None:
    rig = await connected(make_rig())
    hub = rig.hub
    hub.send_script = [rig.transport.err(TIMED_OUT) for _ in range(3)]
    sending = spawn(rig.handler.send(msg(1), timeout=600))
    assert await rig.clock.run_until(sending.done, limit=600)
    assert sending.result().possible_duplicate
    assert len(hub.connects) == 2  # the third timeout in a row dropped the link and reconnected
    assert rig.handler.metrics()[(TIMED_OUT, "mqtt", "half_open")] == 1
    await rig.handler.close()


async def test_a_success_resets_the_timeout_count() -> None:
    rig = await connected(make_rig())
    hub = rig.hub
    t = rig.transport
    hub.send_script = [t.err(TIMED_OUT), t.err(TIMED_OUT), None, t.err(TIMED_OUT), t.err(TIMED_OUT)]
    first = spawn(rig.handler.send(msg(1), timeout=600))
    assert await rig.clock.run_until(first.done, limit=600)
    second = spawn(rig.handler.send(msg(2), timeout=600))
    assert await rig.clock.run_until(second.done, limit=600)
    assert len(hub.connects) == 1
    await rig.handler.close()


# -- token renewal (#7) ---------------------------------------------------------------------------------


class TokenTransport(MemoryTransport):
    """Each connect mints a 1 h token; the hub drops the link when it expires, as IoT Hub does."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__("mqtt", clock=clock, token_lifetime=HOUR)
        self.busy = 0
        self.closed_busy = 0
        self.expired_use = 0
        self.lifetimes: list[tuple[float, float]] = []  #: (closed at, expiry) in wall seconds
        self.send_time = 2.0

    async def close(self) -> None:
        if self.connected:
            assert self.clock is not None and self.credential_expiry is not None
            self.lifetimes.append((self.clock.wall(), self.credential_expiry))
            self.closed_busy += self.busy > 0
        await super().close()

    async def send(self, message: Message) -> None:
        assert self.clock is not None and self.credential_expiry is not None
        if self.clock.wall() >= self.credential_expiry:
            self.expired_use += 1
        self.busy += 1
        try:
            await self.clock.sleep(self.send_time)
            await super().send(message)
        finally:
            self.busy -= 1


async def test_three_hours_tokens_renewed_before_expiry_at_quiet_moments() -> None:
    clock = FakeClock()
    transport = TokenTransport(clock)
    refreshed: list[float] = []

    async def refresh() -> float | None:
        refreshed.append(clock.now())
        return None

    changes: list[Any] = []
    handler = Handler(transport, clock=clock, refresh_credentials=refresh, on_state_change=changes.append)
    await handler.start()
    assert await clock.run_until(lambda: handler.state is State.CONNECTED, limit=10)

    async def traffic() -> None:
        for i in range(3 * 360):  # a send every 10 s; each takes 2 s on the link
            await handler.send(Message(f"m{i}", "d", b"{}"), timeout=60)
            await clock.sleep(8.0)

    sender = spawn(traffic())
    clock.step_wall(-HOUR / 2)  # a wall step on the way: the expiry was turned into a delay at connect
    await clock.advance(3 * HOUR)
    assert not sender.done() or sender.exception() is None
    assert transport.expired_use == 0  # never sent on an expired token
    assert len(refreshed) >= 2 and transport.connects >= 3
    assert all(closed < expiry for closed, expiry in transport.lifetimes)  # renewed before each expiry
    assert transport.closed_busy == 0  # at a quiet moment: no send was cut
    assert changes and not any(c.state in (State.STOPPED, State.RETRYING) for c in changes)
    assert handler.metrics()[(None, "mqtt", "renew")] == len(refreshed)
    sender.cancel()
    await asyncio.gather(sender, return_exceptions=True)
    await handler.close()


async def test_renewal_goes_at_the_hard_margin_when_no_quiet_moment_comes() -> None:
    clock = FakeClock()
    transport = TokenTransport(clock)
    transport.send_time = 10 * HOUR  # a send that never finishes
    handler = Handler(transport, clock=clock)
    await handler.start()
    assert await clock.run_until(lambda: handler.state is State.CONNECTED, limit=10)
    hung = spawn(handler.send(Message("m1", "d", b"{}"), timeout=5 * HOUR))
    await clock.advance(HOUR)
    margin = handler._policy.config.operation.renew_margin
    assert transport.connects == 2
    closed, expiry = transport.lifetimes[0]
    assert closed == pytest.approx(expiry - margin)
    hung.cancel()
    await asyncio.gather(hung, return_exceptions=True)
    await handler.close()


# -- cancellation (#5): real loop time, tiny timeouts ----------------------------------------------------


class SlowClose(MemoryTransport):
    def __init__(self) -> None:
        super().__init__("amqp")
        self.release = asyncio.Event()

    async def close(self) -> None:
        await self.release.wait()  # a cleanup that takes its time (joins a thread, flushes a socket)
        await super().close()


def _leftovers() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


async def test_a_timeout_around_close_raises_and_leaves_the_handler_closed() -> None:
    transport = SlowClose()
    handler = Handler(transport)
    await handler.start()
    await handler.wait_connected(timeout=1)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await handler.close()
    assert handler.state is State.CLOSED  # closed all the same: nothing waits on it any more
    for _ in range(5):
        await asyncio.sleep(0)
    assert _leftovers() == []


class SlowCancel(MemoryTransport):
    """A send whose cancellation takes a while to clean up (a transport that must flush its socket)."""

    def __init__(self) -> None:
        super().__init__("amqp")
        self.cleanup = asyncio.Event()

    async def send(self, message: Message) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await self.cleanup.wait()
            raise


async def test_closing_does_not_swallow_the_callers_cancellation() -> None:
    transport = SlowCancel()
    handler = Handler(transport)
    await handler.start()
    await handler.wait_connected(timeout=1)
    sending = asyncio.ensure_future(handler.send(Message("m1", "d", b"{}"), timeout=60))
    await asyncio.sleep(0.01)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await handler.close()  # waits for the send's cleanup: the caller's timeout must win
    transport.cleanup.set()
    await asyncio.wait_for(asyncio.gather(sending, return_exceptions=True), 1)
    err = sending.exception()
    assert isinstance(err, IoTHubError) and err.code == code_of("NotConnected")
    assert handler.state is State.CLOSED
    for _ in range(5):
        await asyncio.sleep(0)
    assert _leftovers() == []


async def test_close_absorbs_only_its_own_cancellations() -> None:
    rig = await connected(make_rig())
    waiting = spawn(rig.handler.send(msg(1), timeout=600))
    rig.hub.go_down()
    await rig.clock.advance(0)
    await rig.handler.close()  # cancels the supervisor and the reader: no CancelledError reaches us
    assert rig.handler.state is State.CLOSED
    await asyncio.gather(waiting, return_exceptions=True)
    assert isinstance(waiting.exception(), IoTHubError)




async def test_a_credential_already_inside_the_margin_does_not_loop_reconnects() -> None:
    clock = FakeClock()
    transport = MemoryTransport("mqtt", clock=clock, token_lifetime=30.0)  # shorter than renew_margin
    handler = Handler(transport, clock=clock)
    await handler.start()
    await clock.advance(600)
    assert transport.connects == 1 and handler.state is State.CONNECTED
    await handler.close()


class BusyPeer(FakeTransport):
    """Answers "mfast*" sends in 0.5 s; the first attempt of each "mslow*" send times out after 1 s."""

    timed_out: set[str]

    async def send(self, message: Message) -> None:
        slow = message.id.startswith("mslow") and message.id not in self.timed_out
        await self.hub.clock.sleep(1.0 if slow else 0.5)
        if slow:
            self.timed_out.add(message.id)
            raise self.err(TIMED_OUT)
        await super().send(message)


async def test_slow_answers_under_load_are_not_a_half_open_link() -> None:
    """Attempts that time out while others on the same link succeed: a busy peer, not a dead link."""
    rig = make_rig()
    busy = BusyPeer(rig.hub)
    busy.timed_out = set()
    rig.handler._transport = busy
    await connected(rig)
    sends = [spawn(rig.handler.send(msg(f"{kind}{i}"), timeout=600)) for i in range(3) for kind in ("slow", "fast")]
    assert await rig.clock.run_until(lambda: all(s.done() for s in sends), limit=600)
    assert all(s.exception() is None for s in sends)
    assert len(busy.timed_out) == 3
    assert rig.handler.metrics().get((TIMED_OUT, "mqtt", "half_open"), 0) == 0
    assert len(rig.hub.connects) == 1
    await rig.handler.close()


async def test_the_quota_park_aims_at_midnight_on_the_wall_clock_then_waits_on_the_monotonic_one() -> None:
    import dataclasses
    from datetime import UTC, datetime

    from gateway.errors import QuotaExceededError
    from gateway.policy import Policy, PolicyConfig

    start = datetime(2024, 3, 1, 20, 0, tzinfo=UTC).timestamp()
    cfg = PolicyConfig()
    cfg = dataclasses.replace(cfg, quota=dataclasses.replace(cfg.quota, probe_interval=2 * 86_400, reset_jitter=0.0))
    rig = await connected(make_rig(policy=Policy(cfg), start=start))
    h, hub, clock = rig.handler, rig.hub, rig.clock
    clock.step_wall(2 * HOUR)  # the board's wall clock says 22:00 while monotonic time has not moved
    hub.quota_until = float("inf")
    parked = spawn(h.send(msg(1), timeout=6 * HOUR))
    await clock.advance(0)
    assert h.state is State.PARKED
    t0 = clock.now()
    with pytest.raises(QuotaExceededError) as info:
        await h.send(msg(2), timeout=60)
    midnight = datetime(2024, 3, 2, tzinfo=UTC).timestamp()
    assert info.value.retry_at == midnight  # reported in wall time: 00:00 UTC as the wall clock reads it
    clock.step_wall(-5 * HOUR)  # a later step does not move the park: it is a monotonic delay now
    hub.quota_until = 0.0
    assert await clock.run_until(lambda: len(hub.attempts) == 2, limit=6 * HOUR)
    assert clock.now() - t0 == 2 * HOUR  # 22:00 -> 00:00 by the wall clock at the time of the decision
    await asyncio.wait_for(parked, 1)
    await h.close()
