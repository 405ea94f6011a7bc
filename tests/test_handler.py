"""The supervisor against a scripted fake hub, in virtual time: no test here really sleeps."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.clock import FakeClock
from gateway.errors import IoTHubError, OperationTimeoutError, QuotaExceededError, UnauthorizedError, make_error
from gateway.handler import DeviceHolds, Handler, State, StateChange, Undelivered
from gateway.policy import Backoff, Policy, PolicyConfig, StopReason
from gateway.testing import MemoryTransport
from gateway.transport import (
    DeviceOnline,
    InvokeMethod,
    Message,
    MethodResult,
    Request,
    Transport,
    UnsupportedRequest,
)

REFUSED = 503901
CLOSED_REMOTELY = 404104
TAKEOVER = 400027


class Hub:
    """A scripted IoT Hub: up or down, one connection per identity, scripted answers."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.up = True
        self.owners: dict[str, FakeTransport] = {}
        self.kick_code = TAKEOVER
        self.connect_errors: list[IoTHubError] = []
        self.connect_delay = 0.0
        self.send_script: list[Any] = []
        self.throttle_until = 0.0
        self.throttle_retry_after: float | None = None
        self.quota_until = 0.0
        self.online: set[str] = set()
        self.valid_tokens: set[int] | None = None
        self.connects: list[tuple[float, int]] = []
        self.connect_attempts: list[float] = []
        self.attempts: list[tuple[float, str]] = []
        self.delivered: list[Message] = []
        self.requests: list[tuple[float, str, int]] = []
        self.connecting = 0
        self.max_connecting = 0

    def go_down(self, code: int = CLOSED_REMOTELY) -> None:
        self.up = False
        for t in list(self.owners.values()):
            t.drop(make_error(code, transport=t.name))


class FakeTransport(MemoryTransport):
    def __init__(self, hub: Hub, identity: str = "dev1", name: str = "mqtt") -> None:
        super().__init__(name)
        self.hub = hub
        self.identity = identity
        self.token = 1

    def err(self, code: int, **kw: Any) -> IoTHubError:
        return make_error(code, transport=self.name, **kw)

    async def connect(self) -> None:
        hub = self.hub
        hub.connect_attempts.append(hub.clock.now())
        hub.connecting += 1
        hub.max_connecting = max(hub.max_connecting, hub.connecting)
        try:
            if hub.connect_delay:
                await hub.clock.sleep(hub.connect_delay)
            if hub.connect_errors:
                raise hub.connect_errors.pop(0)
            if not hub.up:
                raise self.err(REFUSED)
            if hub.valid_tokens is not None and self.token not in hub.valid_tokens:
                raise self.err(401003)
            other = hub.owners.get(self.identity)
            if other is not None and other is not self:
                other.drop(self.err(hub.kick_code))
            hub.owners[self.identity] = self
            await super().connect()
            hub.connects.append((hub.clock.now(), id(self)))
        finally:
            hub.connecting -= 1

    def drop(self, error: IoTHubError) -> None:
        if self.connected:
            self._release()
            super().drop(error)

    async def close(self) -> None:
        if self.connected:
            self._release()
            await super().close()

    def _release(self) -> None:
        if self.hub.owners.get(self.identity) is self:
            del self.hub.owners[self.identity]

    async def send(self, message: Message) -> None:
        hub = self.hub
        if not self.connected:
            raise self.err(503904)
        now = hub.clock.now()
        hub.attempts.append((now, message.id))
        step = hub.send_script.pop(0) if hub.send_script else None
        if step == "hang":
            await asyncio.get_running_loop().create_future()
        if step == "drop-after-delivery":
            hub.delivered.append(message)
            err = self.err(CLOSED_REMOTELY)
            self.drop(err)
            raise err
        if isinstance(step, IoTHubError):
            raise step
        if now < hub.throttle_until:
            raise self.err(429001, retry_after=hub.throttle_retry_after)
        if now < hub.quota_until:
            raise self.err(403002)
        hub.delivered.append(message)

    async def request(self, request: Request, *, timeout: float) -> Any:
        hub = self.hub
        if not isinstance(request, InvokeMethod):
            raise UnsupportedRequest(type(request).__name__)
        if not self.connected:
            raise self.err(503904)
        device, n = request.device_id, request.payload["n"]
        hub.requests.append((hub.clock.now(), device, n))
        if device not in hub.online:
            raise make_error(404103, transport="http", device_id=device)
        return MethodResult(200, {"n": n})



@dataclasses.dataclass
class Rig:
    clock: FakeClock
    hub: Hub
    transport: FakeTransport
    handler: Handler
    changes: list[StateChange]
    undelivered: list[Undelivered]


def make_rig(
    *, policy: Policy | None = None, start: float = FakeClock.DEFAULT_START, name: str = "mqtt",
    identity: str = "dev1", hub: Hub | None = None, clock: FakeClock | None = None, seed: int = 1, **kw: Any,
) -> Rig:
    clock = clock or FakeClock(start)
    hub = hub or Hub(clock)
    transport = FakeTransport(hub, identity, name)
    changes: list[StateChange] = []
    undelivered: list[Undelivered] = []
    handler = Handler(transport, policy=policy, clock=clock, rand=random.Random(seed), identity=identity,
                      on_state_change=changes.append, on_undelivered=undelivered.append, **kw)
    return Rig(clock, hub, transport, handler, changes, undelivered)


async def connected(rig: Rig) -> Rig:
    await rig.handler.start()
    assert await rig.clock.run_until(lambda: rig.handler.state is State.CONNECTED, limit=60)
    return rig


def msg(i: int | str, device: str = "dev1") -> Message:
    return Message(id=f"m{i}", device_id=device, body=b"{}")


def spawn(coro: Any) -> asyncio.Task[Any]:
    return asyncio.get_running_loop().create_task(coro)


def test_the_fake_satisfies_the_protocol() -> None:
    clock = FakeClock()
    assert isinstance(FakeTransport(Hub(clock)), Transport)


# -- outage and recovery -------------------------------------------------------------------------------


async def test_outage_and_recovery() -> None:
    rig = await connected(make_rig())
    h, hub, clock = rig.handler, rig.hub, rig.clock
    t0 = clock.now()
    hub.go_down()
    await clock.advance(0)
    assert h.state is State.RETRYING and h.last_change.code == CLOSED_REMOTELY
    sending = spawn(h.send(msg(1), timeout=600))
    await clock.advance(60)
    assert not sending.done() and hub.attempts == []
    attempts = [t - t0 for t in hub.connect_attempts[1:]]
    assert 3 <= len(attempts) <= 20
    gaps = [b - a for a, b in zip([0.0, *attempts], attempts, strict=False)]
    assert all(0 <= g <= 60 for g in gaps)
    hub.up = True
    assert await clock.run_until(sending.done, limit=61)  # at most one capped delay after recovery
    receipt = sending.result()
    assert receipt.id == "m1" and receipt.attempts == 1 and not receipt.possible_duplicate
    assert [m.id for m in hub.delivered] == ["m1"]
    assert h.last_change.state is State.CONNECTED
    states = [c.state for c in rig.changes]
    assert states[:3] == [State.CONNECTING, State.CONNECTED, State.RETRYING]
    assert states[-1] is State.CONNECTED
    assert rig.changes[-1].code == REFUSED  # the change says what it recovered from
    assert h.metrics()[(CLOSED_REMOTELY, "mqtt", "reconnect")] == 1
    assert h.metrics()[(REFUSED, "mqtt", "reconnect")] == len(attempts)  # every refused attempt counted
    await h.close()


async def test_operation_fails_fast_when_the_next_attempt_is_after_its_deadline() -> None:
    slow = Backoff(initial=30.0, cap=30.0, jitter=0.0, max_attempts=0, max_elapsed=0.0)
    rig = await connected(make_rig(policy=Policy(PolicyConfig(reconnect=slow))))
    rig.hub.go_down()
    await rig.clock.advance(1)
    now = rig.clock.now()
    with pytest.raises(IoTHubError) as info:
        await rig.handler.send(msg(1), timeout=5)
    assert rig.clock.now() == now
    assert info.value.code in {REFUSED, CLOSED_REMOTELY}
    assert "deadline" in info.value.message
    assert rig.hub.attempts == []
    assert [u.outcome for u in rig.undelivered] == ["expired"]
    await rig.handler.close()


async def test_reconnect_is_single_flight() -> None:
    rig = await connected(make_rig())
    hub = rig.hub
    hub.connect_delay = 2.0
    hub.send_script = [rig.transport.err(CLOSED_REMOTELY) for _ in range(20)]
    sends = [spawn(rig.handler.send(msg(i), timeout=300)) for i in range(20)]
    assert await rig.clock.run_until(lambda: all(s.done() for s in sends), limit=300)
    assert hub.max_connecting == 1
    assert len(hub.connects) == 2  # the first connect and exactly one reconnect
    assert sorted(m.id for m in hub.delivered) == sorted(f"m{i}" for i in range(20))
    assert all(s.result().possible_duplicate for s in sends)
    await rig.handler.close()


async def test_stopped_handler_fails_operations_at_once() -> None:
    rig = make_rig()
    rig.hub.connect_errors = [rig.transport.err(403012)]  # DeviceDisabled
    await rig.handler.start()
    assert await rig.clock.run_until(lambda: rig.handler.state is State.STOPPED, limit=10)
    assert rig.handler.last_change.code == 403012
    with pytest.raises(IoTHubError) as info:
        await rig.handler.send(msg(1))
    assert info.value.code == 403012 and info.value.native["reason"] == StopReason.REFUSED.value
    assert len(rig.hub.connect_attempts) == 1  # no retry loop against a permanent refusal
    await rig.clock.advance(3600)
    assert len(rig.hub.connect_attempts) == 1
    await rig.handler.close()


# -- throttling ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", [7.0, None])
async def test_throttle_storm(retry_after: float | None) -> None:
    rig = await connected(make_rig())
    h, hub, clock = rig.handler, rig.hub, rig.clock
    t0 = clock.now()
    hub.throttle_until = t0 + 40
    hub.throttle_retry_after = retry_after
    sends = [spawn(h.send(msg(i), timeout=600)) for i in range(10)]
    await clock.advance(0)
    assert h.state is State.THROTTLED and h.last_change.code == 429001
    assert await clock.run_until(lambda: all(s.done() for s in sends), limit=600)
    assert sorted(m.id for m in hub.delivered) == sorted(f"m{i}" for i in range(10))
    after_burst = [t for t, _ in hub.attempts if t > t0]
    throttled = [t for t in after_burst if t < t0 + 40]
    # While throttled only one probe at a time goes out: never two attempts at one instant.
    assert len(set(throttled)) == len(throttled)
    gaps = [b - a for a, b in zip([t0, *throttled], throttled, strict=False)]
    if retry_after is not None:
        assert all(7.0 <= g <= 7.7 for g in gaps)
        assert len(throttled) >= 4
    else:
        steps = [10.0 * 2**i for i in range(len(gaps))]
        assert all(s / 2 <= g <= s for g, s in zip(gaps, steps, strict=True))
    assert h.last_change.state is State.CONNECTED
    assert h.history.throttle_attempt == 0  # throttle state decays after success
    assert len(hub.connects) == 1
    assert h.metrics()[(429001, "mqtt", "throttled")] == 10 + len(throttled)
    await h.close()


async def test_throttle_induced_disconnect_is_throttled_reconnect() -> None:
    rig = await connected(make_rig(name="amqp"))
    t0 = rig.clock.now()
    rig.transport.drop(rig.transport.err(429002, retry_after=20.0))
    await rig.clock.advance(0)
    assert rig.handler.state is State.THROTTLED and rig.handler.last_change.code == 429002
    assert await rig.clock.run_until(lambda: len(rig.hub.connects) == 2, limit=100)
    assert 20.0 <= rig.hub.connects[1][0] - t0 <= 22.0
    await rig.handler.close()


# -- quota ---------------------------------------------------------------------------------------------


async def test_quota_parks_until_the_utc_reset() -> None:
    start = datetime(2024, 3, 1, 20, 0, tzinfo=UTC).timestamp()
    midnight = datetime(2024, 3, 2, tzinfo=UTC).timestamp()
    cfg = PolicyConfig()
    cfg = dataclasses.replace(cfg, quota=dataclasses.replace(cfg.quota, probe_interval=2 * 86_400))
    rig = await connected(make_rig(policy=Policy(cfg), start=start))
    h, hub, clock = rig.handler, rig.hub, rig.clock
    hub.quota_until = midnight
    first = spawn(h.send(msg(1), timeout=6 * 3600))
    await clock.advance(0)
    assert h.state is State.PARKED
    until = h.last_change.until
    assert until is not None and midnight <= until <= midnight + 300
    with pytest.raises(QuotaExceededError) as info:  # cannot make it before the park ends: fail fast
        await h.send(msg(2), timeout=60)
    assert info.value.retry_at == until
    waiting = [spawn(h.send(msg(i), timeout=6 * 3600)) for i in range(3, 8)]
    await clock.advance(3 * 3600)
    assert [m for _, m in hub.attempts] == ["m1"]  # no retry storm while parked
    assert await clock.run_until(lambda: first.done() and all(w.done() for w in waiting), limit=3 * 3600)
    assert first.result().attempts == 2
    assert [t for t, _ in hub.attempts][1] == until
    assert len(hub.delivered) == 6 and len(hub.connects) == 1
    assert h.last_change.state is State.CONNECTED
    assert [(u.id, u.outcome) for u in rig.undelivered] == [("m2", "expired")]
    await h.close()


async def test_quota_probe_before_midnight_parks_again() -> None:
    start = datetime(2024, 3, 1, 20, 0, tzinfo=UTC).timestamp()
    rig = await connected(make_rig(start=start))
    rig.hub.quota_until = datetime(2024, 3, 2, tzinfo=UTC).timestamp()
    sending = spawn(rig.handler.send(msg(1), timeout=86_400))
    assert await rig.clock.run_until(sending.done, limit=86_400)
    times = [t - start for t, _ in rig.hub.attempts]
    assert times[:4] == [0, 3600, 7200, 10800]  # one probe an hour, then the reset
    assert len(times) == 5
    await rig.handler.close()


# -- credentials ---------------------------------------------------------------------------------------


async def test_token_expiry_refresh_and_reconnect() -> None:
    calls: list[float] = []
    rig: Rig

    async def refresh() -> float | None:
        calls.append(rig.clock.now())
        rig.transport.token += 1
        return None

    rig = await connected(make_rig(refresh_credentials=refresh))
    rig.hub.valid_tokens = {2}
    rig.transport.drop(rig.transport.err(401003))
    assert await rig.clock.run_until(lambda: len(rig.hub.connects) == 2, limit=10)
    assert len(calls) == 1 and rig.handler.state is State.CONNECTED
    reasons = [(c.state, c.code, c.reason) for c in rig.changes]
    assert (State.RETRYING, 401003, "refreshing credentials") in reasons
    receipt = await rig.handler.send(msg(1))
    assert receipt.attempts == 1
    await rig.handler.close()


async def test_refreshed_credential_refused_again_stops_unauthorized() -> None:
    calls = 0

    async def refresh() -> float | None:
        nonlocal calls
        calls += 1
        return None

    rig = await connected(make_rig(refresh_credentials=refresh))
    rig.hub.connect_errors = [rig.transport.err(401003)]
    rig.transport.drop(rig.transport.err(401003))
    assert await rig.clock.run_until(lambda: rig.handler.state is State.STOPPED, limit=60)
    assert calls == 1
    assert "refreshed credential was refused" in rig.handler.last_change.reason
    with pytest.raises(UnauthorizedError):
        await rig.handler.send(msg(1))
    await rig.handler.close()


async def test_token_is_renewed_before_it_expires() -> None:
    calls: list[float] = []
    clock = FakeClock()

    async def refresh() -> float | None:
        calls.append(clock.now())
        return clock.now() + 3600

    rig = await connected(make_rig(clock=clock, refresh_credentials=refresh, credential_expiry=clock.now() + 3600))
    t0 = clock.now()
    await clock.advance(3400)
    assert [c - t0 for c in calls] == [3300]
    assert len(rig.hub.connects) == 2 and rig.handler.state is State.CONNECTED
    await clock.advance(3400)
    assert [c - t0 for c in calls] == [3300, 6600]
    assert not any(c.state is State.STOPPED for c in rig.changes)
    await rig.handler.close()


# -- identity conflicts --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kick"), [("amqp", TAKEOVER), ("mqtt", 409002)])
async def test_two_instances_sharing_an_identity_settle(name: str, kick: int) -> None:
    clock = FakeClock()
    hub = Hub(clock)
    hub.kick_code = kick  # exact codes only: bare MQTT 3.1.1 drops park instead (test_handler_drops.py)
    a = make_rig(clock=clock, hub=hub, name=name, seed=1)
    b = make_rig(clock=clock, hub=hub, name=name, seed=2)
    await connected(a)
    await b.handler.start()
    handlers = (a.handler, b.handler)
    assert await clock.run_until(lambda: any(h.state is State.STOPPED for h in handlers), limit=3600)
    stopped = [h for h in handlers if h.state is State.STOPPED]
    assert len(stopped) == 1
    change = stopped[0].last_change
    assert "identity conflict" in change.reason and "'dev1'" in change.reason
    survivor = a.handler if stopped[0] is b.handler else b.handler
    assert await clock.run_until(lambda: survivor.state is State.CONNECTED, limit=600)
    connects = len(hub.connects)
    await clock.advance(6 * 3600)
    assert len(hub.connects) == connects  # settled: no more ping-pong
    assert survivor.state is State.CONNECTED
    assert (await survivor.send(msg(1))).attempts == 1
    await a.handler.close()
    await b.handler.close()


# -- device offline ------------------------------------------------------------------------------------


async def test_device_offline_then_online_releases_held_work_in_order() -> None:
    rig = await connected(make_rig())
    h, hub, clock = rig.handler, rig.hub, rig.clock

    def call(n: int, timeout: float = 600) -> asyncio.Task[Any]:
        return spawn(h.request(InvokeMethod("d9", "m", {"n": n}), timeout=timeout))

    first = call(0)
    await clock.advance(0)
    assert "d9" in h.offline_devices()
    others = [call(n) for n in range(1, 5)]
    short = call(99, timeout=30)
    await clock.advance(0)
    assert h.held("d9") == 6
    await clock.advance(100)
    assert [n for _, _, n in hub.requests] == [0]  # never hot-retried while offline
    assert short.done()
    with pytest.raises(IoTHubError) as info:
        short.result()
    assert info.value.code == 404103 and "deadline" in info.value.message
    assert [(u.kind, u.payload.payload["n"], u.outcome) for u in rig.undelivered] == [("InvokeMethod", 99, "expired")]
    hub.online.add("d9")
    rig.transport.emit(DeviceOnline("d9"))
    assert await clock.run_until(lambda: first.done() and all(o.done() for o in others), limit=10)
    assert [n for _, _, n in hub.requests] == [0, 0, 1, 2, 3, 4]
    assert [t.result().payload["n"] for t in [first, *others]] == [0, 1, 2, 3, 4]
    assert h.held() == 0 and "d9" not in h.offline_devices()
    await h.close()


async def test_hold_queue_is_bounded() -> None:
    cfg = PolicyConfig()
    cfg = dataclasses.replace(cfg, device=dataclasses.replace(cfg.device, max_held=2))
    rig = await connected(make_rig(policy=Policy(cfg)))
    h = rig.handler
    tasks = [spawn(h.request(InvokeMethod("d1", "m", {"n": n}), timeout=60)) for n in range(3)]
    await rig.clock.advance(0)
    assert tasks[2].done()
    err = tasks[2].exception()
    assert isinstance(err, IoTHubError) and err.code == 404103 and "full" in err.message
    assert await rig.clock.run_until(lambda: all(t.done() for t in tasks), limit=120)
    assert [u.outcome for u in rig.undelivered] == ["failed", "expired", "expired"]
    await h.close()


# -- outcome unknown -----------------------------------------------------------------------------------


async def test_drop_after_delivery_resends_with_the_same_id() -> None:
    rig = await connected(make_rig())
    rig.hub.send_script = ["drop-after-delivery"]
    receipt = spawn(rig.handler.send(msg(1), timeout=120))
    assert await rig.clock.run_until(receipt.done, limit=120)
    assert receipt.result().possible_duplicate and receipt.result().attempts == 2
    assert [m.id for m in rig.hub.delivered] == ["m1", "m1"]
    assert rig.handler.metrics()[(None, "mqtt", "duplicate")] == 1
    assert rig.undelivered == []
    await rig.handler.close()


class SleepOnlyClock(FakeClock):
    """A user's Clock with only the protocol's three methods: the handler's deadlines fall back to a
    sleeping task instead of ``call_later``."""

    def __getattribute__(self, name: str) -> Any:
        if name == "call_later":
            raise AttributeError(name)
        return super().__getattribute__(name)


@pytest.mark.parametrize("clock_kind", [FakeClock, SleepOnlyClock])
async def test_send_that_never_answers_ends_as_outcome_unknown(clock_kind: type[FakeClock]) -> None:
    rig = await connected(make_rig(clock=clock_kind()))
    assert hasattr(rig.clock, "call_later") is (clock_kind is FakeClock)
    rig.hub.send_script = ["hang"]
    sending = spawn(rig.handler.send(msg(1), timeout=10))
    await rig.clock.advance(10)
    assert sending.done()
    err = sending.exception()
    assert isinstance(err, OperationTimeoutError) and err.native["possible_duplicate"] is True
    assert [(u.id, u.outcome) for u in rig.undelivered] == [("m1", "unknown")]
    await rig.handler.close()


async def test_permanent_error_fails_the_operation_with_its_code() -> None:
    rig = await connected(make_rig())
    rig.hub.send_script = [rig.transport.err(413001)]
    with pytest.raises(IoTHubError) as info:
        await rig.handler.send(msg(1))
    assert info.value.code == 413001
    assert [(u.id, u.outcome, u.error.code) for u in rig.undelivered] == [("m1", "failed", 413001)]
    assert rig.hub.attempts == [(rig.clock.now(), "m1")]
    assert rig.handler.state is State.CONNECTED
    await rig.handler.close()


async def test_transient_error_is_retried_on_the_same_connection() -> None:
    rig = await connected(make_rig())
    rig.hub.send_script = [rig.transport.err(500001), rig.transport.err(503005)]
    sending = spawn(rig.handler.send(msg(1)))
    assert await rig.clock.run_until(sending.done, limit=60)
    assert sending.result().attempts == 3 and not sending.result().possible_duplicate
    assert len(rig.hub.connects) == 1
    await rig.handler.close()


# -- state stream, shutdown ----------------------------------------------------------------------------


async def test_state_changes_reach_the_iterator() -> None:
    rig = make_rig()
    seen: list[StateChange] = []

    async def watch() -> None:
        async for change in rig.handler.changes():
            seen.append(change)

    watcher = spawn(watch())
    await rig.clock.advance(0)
    await connected(rig)
    rig.hub.go_down()
    await rig.clock.advance(1)
    await rig.handler.close()
    await asyncio.wait_for(watcher, 1)  # the iterator ends on close
    assert seen == rig.changes[: len(seen)] and seen[-1].state is State.CLOSED
    assert [c.state for c in seen][:3] == [State.CONNECTING, State.CONNECTED, State.RETRYING]
    assert seen[2].cause is not None and seen[2].cause.code == CLOSED_REMOTELY


async def test_shutdown_mid_reconnect_leaves_nothing_behind() -> None:
    rig = await connected(make_rig())
    h, hub, clock = rig.handler, rig.hub, rig.clock
    hub.go_down()
    hub.connect_delay = 1000.0  # the reconnect hangs
    await clock.advance(5)
    assert hub.connecting == 1
    sending = spawn(h.send(msg(1), timeout=3600))
    holding = spawn(h.request(InvokeMethod("d1", "m", {"n": 0}), timeout=3600))
    h.device_offline("d1")
    await clock.advance(1)
    await h.close()
    assert h.state is State.CLOSED
    for task in (sending, holding):
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 1)
        err = task.exception()
        assert isinstance(err, IoTHubError) and err.code == 503904 and "closed" in err.message
    assert hub.connecting == 0
    await clock.advance(0)
    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert leftovers == []
    assert clock.sleepers == 0


async def test_handler_works_as_a_context_manager() -> None:
    rig = make_rig()
    async with rig.handler as h:
        assert await rig.clock.run_until(lambda: h.state is State.CONNECTED, limit=10)
    assert rig.handler.state is State.CLOSED and not rig.transport.connected


def test_device_holds_is_fifo_with_front_requeue() -> None:
    loop = asyncio.new_event_loop()
    try:
        from gateway.handler import _Held

        holds = DeviceHolds(2)
        items = [_Held("d", float(i), loop.create_future()) for i in range(3)]
        assert holds.add(items[0]) and holds.add(items[1]) and not holds.add(items[2])
        assert holds.add(items[2], front=True)
        assert [holds.pop("d") for _ in range(4)] == [items[2], items[0], items[1], None]
    finally:
        loop.close()
