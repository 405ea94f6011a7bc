"""Properties: for any sequence of errors, delays stay within [0, cap], attempts within the limits, and
no held operation is lost."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.clock import FakeClock
from gateway.codes import Action, all_codes, code_of
from gateway.errors import IoTHubError, make_error
from gateway.handler import Handler, State, Undelivered
from gateway.policy import (
    Backoff,
    DeadLetter,
    History,
    HoldForDevice,
    Operation,
    ParkUntil,
    Policy,
    PolicyConfig,
    ReconnectAfter,
    RefreshCredentials,
    RetryAfter,
    Stop,
    StopReason,
)
from gateway.transport import DeviceOnline, Disconnected, InvokeMethod, Message, Request, TransportEvent

CODES = [c.code for c in all_codes()]
TRANSPORT = st.sampled_from(["http", "mqtt", "amqp"])

# One step: (code, transport, retry_after or None, operation attempt or None (connection level), dt, then)
# where ``then`` is what happens after the decision: nothing, a successful connect, or a successful operation.
steps = st.lists(
    st.tuples(
        st.sampled_from(CODES),
        TRANSPORT,
        st.one_of(st.none(), st.floats(min_value=0, max_value=1e7, allow_nan=False)),
        st.one_of(st.none(), st.integers(min_value=1, max_value=50)),
        st.floats(min_value=0, max_value=5000, allow_nan=False),
        st.sampled_from(["none", "connected", "success"]),
        st.floats(min_value=0, max_value=1, exclude_max=True),
    ),
    max_size=60,
)

configs = st.builds(
    lambda r, c, t, k: PolicyConfig(
        retry=Backoff(initial=r[0], cap=r[0] + r[1], multiplier=r[2], max_attempts=r[3], max_elapsed=r[4]),
        reconnect=Backoff(initial=c[0], cap=c[0] + c[1], multiplier=c[2], max_attempts=c[3], max_elapsed=c[4]),
        throttle=PolicyConfig().throttle.__class__(initial=t[0], cap=t[0] + t[1], max_retry_after=t[2]),
        identity=PolicyConfig().identity.__class__(max_takeovers=k),
    ),
    st.tuples(st.floats(0, 10), st.floats(0, 100), st.floats(1, 4), st.integers(0, 12), st.floats(0, 500)),
    st.tuples(st.floats(0, 10), st.floats(0, 100), st.floats(1, 4), st.integers(0, 12), st.floats(0, 500)),
    st.tuples(st.floats(0, 30), st.floats(0, 300), st.floats(0, 900)),
    st.integers(1, 6),
)


@given(configs, steps)
@settings(max_examples=300, deadline=None)
def test_any_error_sequence_keeps_delays_and_attempts_within_limits(
    config: PolicyConfig, script: list[tuple[int, str, float | None, int | None, float, str, float]],
) -> None:
    policy = Policy(config)
    hist = History(identity="dev", can_refresh=True)
    now = 1_700_000_000.0
    cap = policy.max_delay()
    for code, transport, retry_after, attempt, dt, then, u in script:
        now += dt
        err = make_error(code, transport=transport, retry_after=retry_after)
        op = Operation(attempt, now - dt, "other") if attempt is not None else None
        before = hist
        decision, hist = policy.step(err, hist, now=now, rand=u, op=op)
        assert decision.code == code
        action = policy.action_for(err)
        if isinstance(decision, (RetryAfter, ReconnectAfter)):
            assert 0.0 <= decision.delay <= cap
            if decision.throttled:
                assert decision.delay <= max(config.throttle.cap, config.throttle.max_retry_after)
            elif isinstance(decision, ReconnectAfter) and decision.identity_conflict:
                assert decision.delay <= config.identity.cap
            elif op is None:
                assert decision.delay <= config.reconnect.cap
                assert config.reconnect.max_attempts == 0 or decision.attempt < config.reconnect.max_attempts
            elif isinstance(decision, RetryAfter):
                assert decision.delay <= config.retry.cap
                assert config.retry.max_attempts == 0 or decision.attempt < config.retry.max_attempts
                assert config.retry.max_elapsed == 0 or now - op.started < config.retry.max_elapsed
        elif isinstance(decision, ParkUntil):
            assert now < decision.until <= now + config.quota.probe_interval
            assert action is Action.WAIT_FOR_QUOTA_RESET
        elif isinstance(decision, HoldForDevice):
            assert op is not None and decision.deadline == now + config.device.hold_timeout
        elif isinstance(decision, DeadLetter):
            assert op is not None  # only an operation is dead-lettered; a connection stops
        elif isinstance(decision, Stop):
            if decision.reason is StopReason.IDENTITY_CONFLICT:
                assert len(hist.takeovers) >= config.identity.max_takeovers
                assert all(now - t < config.identity.window for t in hist.takeovers)
            if decision.reason is StopReason.RETRY_EXPIRED:
                assert op is None
                assert (config.reconnect.max_attempts and hist.attempt + 1 >= config.reconnect.max_attempts) or (
                    config.reconnect.max_elapsed and before.retry_since is not None)
        else:
            assert isinstance(decision, RefreshCredentials) and action is Action.REFRESH_CREDENTIALS
        assert hist.attempt >= 0 and hist.throttle_attempt >= 0
        if then == "connected":
            hist = hist.on_connected(now)
        elif then == "success":
            hist = hist.on_success()
            assert hist.throttle_attempt == 0


# -- MQTT 3.1.1: ambiguous drops never stop a device -------------------------------------------------------

AMBIGUOUS_CODES = [code_of("DeviceConnectionClosedRemotely"), code_of("ConnectionForcefullyClosedOnNewConnection"),
                   code_of("LinkCreationConflict")]
drop_steps = st.lists(
    st.one_of(
        st.tuples(st.just("drop"), st.sampled_from(AMBIGUOUS_CODES),
                  st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), max_size=4, unique=True)),
        st.tuples(st.just("ok"), st.just(0), st.lists(st.sampled_from(["a", "b", "c", "x"]), min_size=1, max_size=1)),
    ),
    max_size=80,
)


@given(drop_steps, st.integers(1, 4), st.integers(1, 3), st.floats(min_value=0, max_value=1, exclude_max=True))
@settings(max_examples=100, deadline=None)
def test_inexact_drops_on_mqtt311_never_stop_and_poison_only_what_was_alone(
    script: list[tuple[str, int, list[str]]], poison_after: int, max_tracked: int, u: float,
) -> None:
    base = PolicyConfig()
    policy = Policy(PolicyConfig(drops=base.drops.__class__(poison_after=poison_after, max_tracked=max_tracked)))
    caps = max(policy.max_delay(), base.drops.takeover_park)
    hist = History(identity="dev", ambiguous_drops=True).on_connected(0.0)
    solo: dict[str, int] = {}
    now = 0.0
    for what, code, ids in script:
        now += 7.0
        if what == "ok":
            hist = hist.on_delivered(ids[0])
            continue
        err = make_error(code, transport="mqtt", exact=False)
        decision, hist = policy.step(err, hist, now=now, rand=u, in_flight=tuple(ids))
        assert not isinstance(decision, Stop)
        assert isinstance(decision, (ReconnectAfter, ParkUntil))
        if isinstance(decision, ParkUntil):
            assert decision.takeover and decision.until - now <= caps
        else:
            assert 0 <= decision.delay <= caps
        if len(ids) == 1:
            solo[ids[0]] = solo.get(ids[0], 0) + 1
        for mid in decision.poison if isinstance(decision, ReconnectAfter) else ():
            assert ids == [mid] and solo[mid] >= poison_after
            solo.pop(mid)
        assert len(hist.drop_records) <= max_tracked
        hist = hist.on_connected(now + 1.0)


# -- no held operation is lost ---------------------------------------------------------------------------


class _Hub:
    def __init__(self, clock: FakeClock, answers: list[str]) -> None:
        self.clock = clock
        self.answers = answers
        self.online: set[str] = set()


class _Transport:
    name = "http"

    def __init__(self, hub: _Hub) -> None:
        self.hub = hub
        self.queue: asyncio.Queue[TransportEvent | None] = asyncio.Queue()
        self.connected = False

    async def connect(self) -> None:
        self.connected = True
        self.queue = asyncio.Queue()

    async def close(self) -> None:
        if self.connected:
            self.connected = False
            self.queue.put_nowait(None)

    async def send(self, message: Message) -> None:
        raise AssertionError("not used")

    async def request(self, request: Request, *, timeout: float) -> Any:
        assert isinstance(request, InvokeMethod)
        device, payload = request.device_id, request.payload
        answer = self.hub.answers.pop(0) if self.hub.answers else "ok"
        if answer == "drop":
            err = make_error(404104, transport="http")
            if self.connected:
                self.connected = False
                self.queue.put_nowait(Disconnected(err))
            raise err
        if answer == "fail":
            raise make_error(400004, transport="http", device_id=device)
        if answer == "busy":
            raise make_error(503005, transport="http", device_id=device)
        if device not in self.hub.online or answer == "offline":
            raise make_error(404103, transport="http", device_id=device)
        return payload["n"]

    async def events(self) -> Any:
        queue = self.queue
        while True:
            event = await queue.get()
            if event is None:
                return
            yield event
            if isinstance(event, Disconnected):
                return


ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(["d1", "d2", "d3"]),  # target device
        st.floats(min_value=1, max_value=900),  # timeout
        st.floats(min_value=0, max_value=120),  # start delay
    ),
    min_size=1,
    max_size=25,
)
presence = st.lists(st.tuples(st.floats(0, 1200), st.sampled_from(["d1", "d2", "d3"]), st.booleans()), max_size=10)
answers = st.lists(st.sampled_from(["ok", "offline", "fail", "busy", "drop"]), max_size=40)


@given(ops_strategy, presence, answers, st.integers(1, 5), st.booleans())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_no_held_operation_is_lost(
    ops: list[tuple[str, float, float]], flips: list[tuple[float, str, bool]], script: list[str], max_held: int,
    close_early: bool,
) -> None:
    asyncio.run(_no_held_operation_is_lost(ops, flips, script, max_held, close_early))


async def _no_held_operation_is_lost(
    ops: list[tuple[str, float, float]], flips: list[tuple[float, str, bool]], script: list[str], max_held: int,
    close_early: bool,
) -> None:
    clock = FakeClock()
    hub = _Hub(clock, list(script))
    transport = _Transport(hub)
    base = PolicyConfig()
    config = PolicyConfig(device=base.device.__class__(hold_timeout=300.0, max_held=max_held))
    undelivered: list[Undelivered] = []
    handler = Handler(transport, policy=Policy(config), clock=clock, rand=random.Random(0),
                      on_undelivered=undelivered.append)
    await handler.start()
    assert await clock.run_until(lambda: handler.state is State.CONNECTED, limit=10)

    async def one(n: int, device: str, timeout: float, delay: float) -> object:
        await clock.sleep(delay)
        return await handler.request(InvokeMethod(device, "m", {"n": n}), timeout=timeout)

    async def presence_flips() -> None:
        t = 0.0
        for at, device, online in sorted(flips):
            await clock.sleep(at - t)
            t = at
            if online:
                hub.online.add(device)
                transport.queue.put_nowait(DeviceOnline(device))
            else:
                hub.online.discard(device)
                handler.device_offline(device)

    tasks = [asyncio.get_running_loop().create_task(one(n, d, to, dl)) for n, (d, to, dl) in enumerate(ops)]
    flipper = asyncio.get_running_loop().create_task(presence_flips())
    if close_early:
        await clock.advance(60)
        await handler.close()
    await clock.run_until(lambda: all(t.done() for t in tasks), limit=5000)
    flipper.cancel()
    await asyncio.gather(flipper, return_exceptions=True)
    await handler.close()
    await clock.advance(0)
    assert all(t.done() for t in tasks), "an operation never ended"
    delivered = failed = 0
    for n, task in enumerate(tasks):
        exc = task.exception()
        if exc is None:
            assert task.result() == n
            delivered += 1
        else:
            assert isinstance(exc, IoTHubError) and exc.code  # failed or expired with a code
            failed += 1
    assert delivered + failed == len(ops)
    assert len(undelivered) == failed  # every failure reached the hook too
    assert {u.outcome for u in undelivered} <= {"failed", "expired", "unknown"}
    assert handler.held() == 0
    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert leftovers == []
