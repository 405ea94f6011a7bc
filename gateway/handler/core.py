"""The driver: one upstream connection kept up by the policy, with deadlines on every operation.

This is the only part of the package that waits, reconnects, holds or parks; it asks
:class:`~gateway.policy.Policy` what to do and does it, moving :class:`~.machine.ConnectionMachine`,
:class:`~.gate.Gate` and :class:`~.holds.DeviceHolds` (pure bookkeeping) and publishing through
:class:`~.report.Publisher`. Everything that waits goes through the injected
:class:`~gateway.clock.Clock` (durations on its monotonic ``now()``, the wall clock only to aim at a
wall-clock target once), and every random draw through the injected ``random.Random``, so a test drives
hours of outages in milliseconds.

- One supervisor task owns the connection: only it calls ``transport.connect()``, so a reconnect is
  single-flight however many operations see the drop.
- An operation (``send``, ``request``) runs in the caller's task with a deadline. It waits while the
  connection is down unless the handler already knows it cannot succeed in time (stopped, parked past
  the deadline, next attempt past the deadline): then it fails at once with a classified ``IoTHubError``.
- Every end of an operation is reported: delivered (maybe as a possible duplicate), failed with a code,
  expired with a code, or outcome unknown; the last three also reach the ``on_undelivered`` hook.
- State changes carry the code and the cause, and reach a property, an async iterator and a callback.
- MQTT 3.1.1 drops (``transport.ambiguous_drops``) are read as the policy's docstring says: the sends in
  flight are passed to the policy, suspect mode sends one at a time, poison is dead-lettered.
- A token is renewed before ``transport.credential_expiry`` at a quiet moment; K operation timeouts in a
  row on one connection count as a half-open link and drop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from gateway.clock import Clock, SystemClock
from gateway.codes import Action, code_of
from gateway.errors import IoTHubError, make_error
from gateway.handler.gate import Gate
from gateway.handler.holds import DeviceHolds, _Held
from gateway.handler.machine import ConnectionMachine, Event, State
from gateway.handler.report import Publisher, Receipt, StateChange, Undelivered
from gateway.handler.retry import Step, after_failure
from gateway.normalize import normalize
from gateway.policy import (
    History,
    Operation,
    ParkUntil,
    Policy,
    ReconnectAfter,
    RefreshCredentials,
    RetryAfter,
    Stop,
    StopReason,
    poison_code,
)
from gateway.transport import (
    DeviceOffline,
    DeviceOnline,
    Disconnected,
    Inbound,
    InvokeMethod,
    Message,
    PatchDesired,
    Request,
    Transport,
)

__all__ = ["Handler", "RefreshHook"]

log = logging.getLogger("gateway.handler")
T = TypeVar("T")

_NOT_CONNECTED = code_of("NotConnected")
_TIMED_OUT = code_of("OperationTimedOut")
_OFFLINE = code_of("DeviceNotOnline")  # the code of a held item whose deadline passed (see Undelivered)
_QUOTA = code_of("IotHubQuotaExceeded")
#: The jitter source of every handler given no ``rand``: successive draws of one generator are as independent
#: as draws of many, and a generator's state is ~2.9 KB, a tenth of a multiplexed device's whole cost.
_JITTER = random.Random()
_CONNECTION_ACTIONS = frozenset(
    {Action.RECONNECT, Action.REFRESH_CREDENTIALS, Action.STOP_IDENTITY_CONFLICT, Action.STOP}
)


class _DeadlineExceeded(Exception):
    pass


_AGAIN = object()  #: an attempt's "go round once more"


@dataclass(eq=False)
class _Op:
    kind: str
    id: str
    device_id: str | None  #: the device the operation is aimed at (holds apply to it)
    message: Message | None = None
    payload: Any = None
    attempts: int = 0
    duplicate: bool = False
    released: bool = False  #: it was held and released once: a re-hold goes to the front of the queue
    outcome: str = "failed"  #: how it ended if it raised: failed, expired or unknown
    last_error: IoTHubError | None = None
    held: _Held | None = field(default=None, repr=False)
    poison: IoTHubError | None = None  #: dead-lettered as poison by an ambiguous-drop verdict


RefreshHook = Callable[[], Awaitable[float | None]]


class Handler:
    """Owns one upstream connection through a :class:`~gateway.transport.Transport`.

    ``refresh_credentials`` is awaited when the hub says the token expired, and before a known expiry: after
    each connect the handler reads ``transport.credential_expiry`` (epoch seconds; else the
    ``credential_expiry`` given here or returned by the hook), turns it into a monotonic delay once, and
    reconnects ``renew_before`` seconds ahead at a quiet moment (no operation in flight), at the latest
    ``renew_margin`` seconds ahead. The hook must make the transport's next ``connect()`` use the new
    credential; without a hook the reconnect alone renews (transports that mint a token per connect).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        policy: Policy | None = None,
        clock: Clock | None = None,
        rand: random.Random | None = None,
        identity: str = "",
        refresh_credentials: RefreshHook | None = None,
        credential_expiry: float | None = None,
        on_state_change: Callable[[StateChange], None] | None = None,
        on_undelivered: Callable[[Undelivered], None] | None = None,
        on_inbound: Callable[[Inbound], None] | None = None,
    ) -> None:
        self._transport = transport
        self._policy = policy or Policy()
        self._clock: Clock = clock or SystemClock()
        self._rand = rand or _JITTER
        self._refresh_hook = refresh_credentials
        self._credential_expiry = credential_expiry
        self._on_undelivered = on_undelivered
        self._on_inbound = on_inbound
        self._history = History(identity=identity, can_refresh=refresh_credentials is not None,
                                ambiguous_drops=bool(getattr(transport, "ambiguous_drops", False)))
        self._last_until: float | None = None
        self._changed = asyncio.Event()
        self._up = False
        self._gen = 0
        self._loss: asyncio.Future[IoTHubError | None] | None = None
        self._down_cause: IoTHubError | None = None
        self._next_attempt_at: float | None = None
        self._stop_error: IoTHubError | None = None
        self._closed = False
        self._gate = Gate()
        self._holds = DeviceHolds(self._policy.config.device.max_held)
        self._offline: set[str] = set()
        self._releasing: set[str] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._inflight: set[asyncio.Task[Any]] = set()
        self._renew_task: asyncio.Task[None] | None = None
        self._renewing = False  #: a renewal waits for a quiet moment: no new attempt starts
        self._timeouts = 0  #: OperationTimedOut in a row on the current connection
        self._answered_at = float("-inf")  #: when an attempt last succeeded (monotonic)
        self._sending: dict[_Op, int] = {}  #: sends in flight -> the connection they went out on
        self._sends: dict[_Op, int] = {}  #: live send operations -> arrival order
        self._lane: set[_Op] = set()  #: sends waiting for their turn in ``_wait_ready``
        self._turn: tuple[asyncio.Event, _Op] | None = None  #: suspect mode: whose turn, as of a wake-up
        self._arrivals = itertools.count()
        self._loss_in_flight: tuple[str, ...] = ()  #: the sends in flight when the connection was lost
        self._machine = ConnectionMachine()
        self._pub = Publisher(transport.name, StateChange(State.IDLE, self._clock.wall()), on_state_change)
        self.counters = self._pub.counters

    # -- public surface -----------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._machine.state

    @property
    def last_change(self) -> StateChange:
        """The latest state change: state, code, cause, until (epoch), reason."""
        return self._pub.last

    @property
    def history(self) -> History:
        """What the policy currently remembers about this connection (read-only snapshot)."""
        return self._history

    @property
    def transport(self) -> Transport:
        return self._transport

    def held(self, device_id: str | None = None) -> int:
        """How many operations are held for ``device_id`` (or for all devices)."""
        return self._holds.count(device_id)

    def offline_devices(self) -> frozenset[str]:
        return frozenset(self._offline)

    def metrics(self) -> dict[tuple[int | None, str, str], int]:
        """Counts keyed by (code or None, transport, outcome)."""
        return self._pub.metrics()

    async def changes(self) -> AsyncIterator[StateChange]:
        """Every state change from now on; ends when the handler is closed."""
        queue: asyncio.Queue[StateChange | None] = asyncio.Queue()
        self._pub.subscribers.append(queue)
        try:
            while True:
                change = await queue.get()
                if change is None:
                    return
                yield change
        finally:
            with contextlib.suppress(ValueError):
                self._pub.subscribers.remove(queue)

    async def start(self) -> None:
        """Start the supervisor (returns at once; watch ``state`` or ``wait_connected``)."""
        if self._closed:
            raise RuntimeError("handler is closed")
        if self._supervisor is not None:
            return
        self._move(Event.START)
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name="iothub-supervisor")

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected; raise the stop error if the handler stops first."""
        deadline = self._clock.now() + (timeout if timeout is not None else self._policy.config.operation.timeout)
        op = _Op("wait", "", None)
        await self._wait_ready(op, deadline, gates=False)

    async def close(self) -> None:
        """Stop everything, fail what is still waiting with NotConnected, and leave no task behind.

        Only the cancellations this method causes are absorbed: if the caller is cancelled (a timeout
        around ``close()``), the ``CancelledError`` propagates, and the handler is still left closed.
        """
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._supervisor, self._reader, self._renew_task) if t is not None]
        tasks += list(self._background) + list(self._inflight)
        for task in tasks:
            task.cancel()
        try:
            if tasks:
                await asyncio.wait(tasks)  # returns when they end; raises only if *we* are cancelled
            for task in tasks:
                if not task.cancelled() and task.exception() is not None:
                    log.debug("task %s ended with %r while closing", task.get_name(), task.exception())
            self._up = False
            try:
                await self._transport.close()
            except Exception:
                log.debug("transport.close() raised", exc_info=True)
        finally:
            self._up = False
            for item in self._holds.drain():
                if not item.waiter.done():
                    item.waiter.set_result(False)
            self._move(Event.CLOSED, reason="closed by the application")
            self._notify()
            self._pub.end()

    async def __aenter__(self) -> Handler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def device_online(self, device_id: str) -> None:
        """Mark a device online and release its held operations, oldest first."""
        self._offline.discard(device_id)
        if self._holds.count(device_id) and device_id not in self._releasing and not self._closed:
            self._releasing.add(device_id)
            self._spawn(self._release(device_id), f"iothub-release-{device_id}")
        self._notify()

    def device_offline(self, device_id: str) -> None:
        """Mark a device offline: new work for it is held instead of sent."""
        self._offline.add(device_id)

    async def send(self, message: Message, *, timeout: float | None = None) -> Receipt:
        """Send telemetry; resends keep ``message.id``. Raises ``IoTHubError`` when not delivered."""
        op = _Op("send", message.id, message.device_id, message=message)

        async def call(_remaining: float) -> None:
            await self._transport.send(message)

        self._sends[op] = next(self._arrivals)
        try:
            await self._operate(op, call, timeout)
        finally:
            del self._sends[op]
        return Receipt(message.id, op.attempts, op.duplicate)

    async def request(self, request: Request, *, timeout: float | None = None) -> Any:
        """A typed request/response exchange (see :data:`gateway.transport.Request`); the hub's answer.

        An :class:`~gateway.transport.InvokeMethod` or :class:`~gateway.transport.PatchDesired` is aimed at
        its ``device_id`` (held while that device is offline). ``UnsupportedRequest`` (any ``TypeError``)
        from the transport is a programming error: it is raised at once, never retried nor reported as
        undelivered.
        """
        device = request.device_id if isinstance(request, (InvokeMethod, PatchDesired)) else None
        op = _Op(type(request).__name__, getattr(request, "rid", ""), device, payload=request)

        async def call(remaining: float) -> Any:
            return await self._transport.request(request, timeout=remaining)

        return await self._operate(op, call, timeout)

    # -- operations -----------------------------------------------------------------------------------

    async def _operate(self, op: _Op, call: Callable[[float], Awaitable[T]], timeout: float | None) -> T:
        started = self._clock.now()
        deadline = started + (timeout if timeout is not None else self._policy.config.operation.timeout)
        try:
            return await self._attempts(op, call, started, deadline)
        except IoTHubError as err:
            self._report_undelivered(op, err)
            raise
        finally:
            if self._gate.release(op):  # the probe failed (or will be re-gated): let another one try
                self._notify()
            self._settle_held(op)

    async def _attempts(self, op: _Op, call: Callable[[float], Awaitable[T]], started: float, deadline: float) -> T:
        while True:
            self._raise_if_down(op)
            device = op.device_id
            if device is not None and self._must_hold(device, op):
                hold_until = min(deadline, self._clock.now() + self._policy.config.device.hold_timeout)
                await self._hold(op, device, hold_until, None)
                continue
            gen = await self._wait_ready(op, deadline, gates=True)
            op.attempts += 1
            if op.kind == "send":
                self._sending[op] = gen  # for ambiguous drops: which publishes were in flight
            try:
                outcome = await self._attempt(op, call, gen, started, deadline)
            finally:
                if self._sending.pop(op, None) is not None and self._history.suspect:
                    self._notify()  # suspect mode: the next send may go
            if outcome is not _AGAIN:
                return cast(T, outcome)

    async def _attempt(self, op: _Op, call: Callable[[float], Awaitable[T]], gen: int, started: float,
                       deadline: float) -> object:
        """One attempt: its result, or _AGAIN to go round once more; raises when the operation ends."""
        now = began = self._clock.now()
        try:
            result = await self._within(call(deadline - now), deadline - now, track=True)
        except _DeadlineExceeded:
            self._timed_out(gen, began)
            raise self._expired(op, in_flight=True) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                raise self._closed_error() from None  # we cancelled the attempt, not our caller
            raise
        except TypeError:
            raise  # UnsupportedRequest and friends: a programming error, raised at once, never retried
        except IoTHubError as exc:
            err = exc
        except Exception as exc:
            err = normalize(exc, transport=self._err_transport())
        else:
            self._succeeded(op)
            return result
        op.last_error = err
        self._settle_held(op)
        self._release_probe(op)  # one probe per attempt: whatever happens next, another may probe
        if err.code == _TIMED_OUT:
            self._timed_out(gen, began)
        now = self._clock.now()
        decision, history = self._policy.step(err, self._history, now=now, wall=self._clock.wall(),
                                              rand=self._rand, op=Operation(op.attempts, started, op.device_id))
        nxt = after_failure(decision, now=now, deadline=deadline, duplicate=op.duplicate)
        op.duplicate = nxt.duplicate
        if nxt.step is Step.AWAIT_CONNECTION or self._policy.action_for(err) in _CONNECTION_ACTIONS:
            # The connection itself is at stake: the supervisor decides (once) what to do about it, and
            # this operation waits for its verdict (reconnected, or stopped).
            self._report_loss(err, gen)
        if nxt.adopt_history:
            self._history = history
        step = nxt.step
        if step is Step.AWAIT_CONNECTION:
            pass
        elif step is Step.THROTTLE:
            self._count(err.code, "throttled")
            self._throttle(err, nxt.until)
        elif step is Step.RETRY:
            self._count(err.code, "retry")
            await self._clock.sleep(nxt.delay)
        elif step is Step.EXPIRE:
            self._count(err.code, "retry")
            raise self._expired(op)
        elif step is Step.PARK:
            self._count(err.code, "parked")
            self._park(err, nxt.until)
        elif step is Step.HOLD:
            assert nxt.device is not None
            self._count(err.code, "held")
            self._offline.add(nxt.device)
            await self._hold(op, nxt.device, nxt.until, err)
        else:
            self._count(err.code, "dead_letter")
            if step is Step.UNKNOWN:
                raise self._unknown(op, err)
            failed = make_error(err.code, transport=err.transport, message=nxt.detail,
                                device_id=err.device_id or op.device_id, native=err.native,
                                retry_after=err.retry_after)
            failed.__cause__ = err
            raise failed
        return _AGAIN

    def _release_probe(self, op: _Op) -> None:
        if self._gate.release(op):
            self._notify()

    def _timed_out(self, gen: int, began: float) -> None:
        """An attempt begun at ``began`` timed out on connection ``gen``; K in a row mean a half-open link.

        "In a row" means no attempt succeeded meanwhile: if one did after this attempt began, the link is
        alive and this was only a slow answer (a loaded peer), so it does not count.
        """
        if gen != self._gen:
            return
        if self._answered_at >= began:
            return  # the success itself reset the count
        self._timeouts += 1
        limit = self._policy.config.operation.timeouts_to_drop
        if self._timeouts >= limit and self._up:
            self._count(_TIMED_OUT, "half_open")
            err = make_error(_TIMED_OUT, transport=self._err_transport(),
                             message=f"{self._timeouts} operations in a row timed out on this connection: "
                                     f"taken as a half-open link, reconnecting")
            self._report_loss(err, gen)

    def _succeeded(self, op: _Op) -> None:
        self._timeouts = 0
        self._answered_at = self._clock.now()
        self._history = self._history.on_success()
        if op.kind == "send" and self._history.ambiguous_drops:
            was_suspect = self._history.suspect
            self._history = self._history.on_delivered(op.id)
            if was_suspect and not self._history.suspect:
                self._notify()  # suspect mode is over: every waiting send may go
        self._count(None, "duplicate" if op.duplicate else "delivered")
        if op.device_id is not None and op.device_id in self._offline:
            self.device_online(op.device_id)
        if self._gate.open():
            # The probe went through: the throttle or the quota park is over for everyone.
            if self._up and self.state in (State.THROTTLED, State.PARKED):
                self._move(Event.CONNECTED, reason="recovered")
            self._notify()

    def _must_hold(self, device: str, op: _Op) -> bool:
        if op.held is not None:
            return False  # just released: this is its turn
        return device in self._offline or device in self._releasing or self._holds.count(device) > 0

    async def _hold(self, op: _Op, device: str, deadline: float, cause: IoTHubError | None) -> None:
        """Wait in the device's queue until released; raise the expiry or stop error otherwise."""
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        item = _Held(device, deadline, waiter)
        if not self._holds.add(item, front=op.released):
            self._count(_OFFLINE, "failed")
            err = make_error(_OFFLINE, transport=self._err_transport(cause), device_id=device,
                             message=f"device {device!r} is offline and its hold queue is full "
                                     f"({self._holds.max_per_device} items)")
            err.__cause__ = cause
            raise err
        if device not in self._offline and device not in self._releasing:
            self.device_online(device)  # nothing says it is offline (any more): release at once
        released = False
        try:
            released = await self._within(waiter, deadline - self._clock.now())
        except _DeadlineExceeded:
            pass
        finally:
            if not released:
                self._holds.remove(item)
                if not waiter.done():
                    waiter.cancel()
        if released:
            op.held = item
            op.released = True
            return
        self._raise_if_down(op)
        if op.duplicate:
            raise self._unknown(op, cause)
        op.outcome = "expired"
        self._count(_OFFLINE, "expired")
        err = make_error(_OFFLINE, transport=self._err_transport(cause), device_id=device,
                         message=f"held for offline device {device!r} until its deadline passed; not sent again")
        err.__cause__ = cause
        raise err

    def _settle_held(self, op: _Op) -> None:
        item = op.held
        op.held = None
        if item is not None and item.settled is not None and not item.settled.done():
            item.settled.set_result(None)

    async def _release(self, device: str) -> None:
        """Release a device's held operations one at a time, oldest first, so their order is kept."""
        try:
            while device not in self._offline and not self._closed:
                item = self._holds.pop(device)
                if item is None:
                    break
                item.settled = asyncio.get_running_loop().create_future()
                item.waiter.set_result(True)
                self._count(_OFFLINE, "released")
                await item.settled
        finally:
            self._releasing.discard(device)
            if self._holds.count(device) and device not in self._offline and not self._closed:
                self.device_online(device)

    async def _wait_ready(self, op: _Op, deadline: float, *, gates: bool) -> int:
        """Wait until an attempt may go out; fail fast when it cannot happen before ``deadline``."""
        lane = gates and op.kind == "send"
        if lane:
            self._lane.add(op)
        try:
            return await self._wait_turn(op, deadline, gates=gates, lane=lane)
        finally:
            if lane:
                self._lane.discard(op)
                if self._history.suspect:
                    self._notify()

    def _my_turn(self, op: _Op) -> bool:
        """Suspect mode: one send at a time, fewest drops first, then arrival order."""
        if not self._history.suspect:
            return True
        gen = self._gen
        if any(g == gen for g in self._sending.values()):
            return False  # a send is in flight on this connection (one stuck on an old one does not count)
        cached = self._turn
        if cached is not None and cached[0] is self._changed and cached[1] in self._lane:
            return cached[1] is op  # computed once per wake-up, not once per waiter
        drops = self._history.drops_of
        best = min(self._lane, key=lambda o: (drops(o.id), self._sends.get(o, 0)))
        self._turn = (self._changed, best)
        return best is op

    async def _wait_turn(self, op: _Op, deadline: float, *, gates: bool, lane: bool) -> int:
        while True:
            self._raise_if_down(op)
            now = self._clock.now()
            gate = max(self._gate.parked_until, self._gate.throttled_until) if gates else 0.0
            closed = gates and self._gate.closed_to(op, now)
            waiting = gates and (self._renewing or (lane and not self._my_turn(op)))
            if self._up and not closed and not waiting:
                if gates:
                    self._gate.enter(op)  # after a throttle or a park, this attempt is the probe
                return self._gen
            if gates and self._gate.parked_until > max(now, deadline):
                op.outcome = "expired"
                self._count(_QUOTA, "failed_fast")
                cause = self._gate.cause
                retry_at = self._to_wall(self._gate.parked_until)
                err = make_error(_QUOTA, transport=self._err_transport(cause), retry_at=retry_at,
                                 device_id=op.device_id,
                                 message=f"daily quota used up; sending is parked until {retry_at:.0f} (epoch), "
                                         f"after this operation's deadline")
                err.__cause__ = cause
                raise err
            if not self._up and self._next_attempt_at is not None and self._next_attempt_at > deadline:
                raise self._fail_fast(op, deadline)
            if now >= deadline:
                raise self._expired(op)
            wake = deadline if gate <= now else min(deadline, gate)
            changed = self._changed
            with contextlib.suppress(_DeadlineExceeded):
                await self._within(changed.wait(), wake - now)

    def _raise_if_down(self, op: _Op) -> None:
        if self._closed:
            raise self._closed_error()
        if op.poison is not None:
            op.outcome = "failed"
            raise op.poison
        if self._stop_error is not None:
            stop = self._stop_error
            err = make_error(stop.code, transport=stop.transport, message=stop.message, device_id=op.device_id,
                             native=stop.native)
            err.__cause__ = stop.__cause__
            raise err

    def _fail_fast(self, op: _Op, deadline: float) -> IoTHubError:
        op.outcome = "expired"
        cause = self._down_cause
        code = cause.code if cause is not None else _NOT_CONNECTED
        self._count(code, "failed_fast")
        now = self._clock.now()
        nxt = self._next_attempt_at if self._next_attempt_at is not None else now
        err = make_error(code, transport=self._err_transport(cause), device_id=op.device_id,
                         message=f"connection is down ({cause.name if cause else 'not connected'}); "
                                 f"the next attempt, in {nxt - now:.0f}s, is after "
                                 f"this operation's deadline (in {deadline - self._clock.now():.0f}s)")
        err.__cause__ = cause
        return err

    def _expired(self, op: _Op, *, in_flight: bool = False) -> IoTHubError:
        """The deadline passed. Unknown if an attempt may have been delivered; else expired with a code."""
        if op.duplicate or in_flight:
            return self._unknown(op, op.last_error)
        op.outcome = "expired"
        cause = op.last_error or (self._down_cause if not self._up else self._gate.cause)  # what it waited on
        if cause is None:
            self._count(_NOT_CONNECTED, "expired")
            return make_error(_NOT_CONNECTED, transport=self._err_transport(), device_id=op.device_id,
                              message="deadline passed before the operation could be sent")
        self._count(cause.code, "expired")
        err = make_error(cause.code, transport=cause.transport, device_id=op.device_id, retry_after=cause.retry_after,
                         message=f"deadline passed before a successful attempt; last: {cause.message}")
        err.__cause__ = cause
        return err

    def _unknown(self, op: _Op, cause: IoTHubError | None) -> IoTHubError:
        op.outcome = "unknown"
        self._count(_TIMED_OUT, "unknown")
        err = make_error(_TIMED_OUT, transport=self._err_transport(cause), device_id=op.device_id,
                         message=f"outcome unknown after {op.attempts} attempts of {op.kind} {op.id!r}: "
                                 f"it may have been delivered",
                         native={"id": op.id, "possible_duplicate": True})
        err.__cause__ = cause
        return err

    def _closed_error(self) -> IoTHubError:
        return make_error(_NOT_CONNECTED, transport=self._err_transport(), message="the handler was closed")

    def _report_undelivered(self, op: _Op, err: IoTHubError) -> None:
        if self._on_undelivered is None or op.kind == "wait":
            return
        record = Undelivered(op.kind, op.id, op.device_id, op.outcome, err, op.message, op.payload)
        try:
            self._on_undelivered(record)
        except Exception:
            log.exception("on_undelivered hook raised")

    def _throttle(self, err: IoTHubError, until: float) -> None:
        end = self._gate.throttle(err, until)
        if self._machine.active:  # an answer that comes back after a stop changes nothing
            self._move(Event.THROTTLED, code=err.code, cause=err, until=end, reason="throttled by the hub")
        self._spawn(self._ungate(), "iothub-unthrottle")

    def _park(self, err: IoTHubError, until: float) -> None:
        end = self._gate.park(err, until)
        if self._machine.active:
            self._move(Event.PARKED, code=err.code, cause=err, until=end, reason="daily message quota used up")
        self._spawn(self._ungate(), "iothub-unpark")

    async def _ungate(self) -> None:
        """At the end of a park or throttle, wake the waiting operations (one of them probes)."""
        until = self._gate.until
        await self._clock.sleep(until - self._clock.now())
        if self._gate.until != until:
            return  # extended meanwhile; a later timer handles it
        self._gate.parked_until = 0.0
        self._notify()

    # -- the supervisor -------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        err: IoTHubError | None = None
        try:
            while True:
                if err is not None and not await self._apply_connection_decision(err):
                    return
                err = await self._connect_once()
                if err is not None:
                    continue
                err = await self._run_connection()
                self._up = False
                self._gen += 1
                await self._close_transport()
                if err is None:  # a scheduled renewal: refresh, then reconnect at once
                    self._history = self._history.on_closed()
                    err = await self._refresh()
                    if err is None:
                        self._down_cause = None
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not leave callers waiting forever
            log.exception("handler supervisor failed")
            internal = make_error(code_of("UnclassifiedTransportError"), transport=self._err_transport(),
                                  message="the handler's supervisor failed; see the log")
            self._stop(Stop(reason=StopReason.RETRY_EXPIRED, code=internal.code, detail=internal.message), internal)

    async def _connect_once(self) -> IoTHubError | None:
        timeout = self._policy.config.operation.connect_timeout
        self._next_attempt_at = None
        try:
            await self._within(self._transport.connect(), timeout)
        except _DeadlineExceeded:
            return make_error(_TIMED_OUT, transport=self._err_transport(),
                              message=f"connect did not complete within {timeout:g}s")
        except IoTHubError as exc:
            return exc
        except Exception as exc:
            name = self._transport.name
            return normalize(exc, transport=name if name in {"http", "mqtt", "amqp"} else "network")
        now = self._clock.now()
        cause = self._down_cause
        self._history = self._history.on_connected(now)
        ambiguous = bool(getattr(self._transport, "ambiguous_drops", False))  # may depend on what was negotiated
        if ambiguous is not self._history.ambiguous_drops:
            self._history = dataclasses.replace(self._history, ambiguous_drops=ambiguous)
        self._gen += 1
        self._up = True
        self._down_cause = None
        self._count(None, "connected")
        loss: asyncio.Future[IoTHubError | None] = asyncio.get_running_loop().create_future()
        self._loss = loss
        self._reader = asyncio.get_running_loop().create_task(self._read(loss), name="iothub-reader")
        event = Event.CONNECTED
        if self._gate.parked_until > now:
            event = Event.PARKED
        elif self._gate.throttled_until > now:
            event = Event.THROTTLED
        self._move(event, code=cause.code if cause else None, cause=cause, until=self._gate.until or None,
                   reason="connected" if event is Event.CONNECTED else "connected; still waiting")
        self._timeouts = 0
        self._schedule_renewal()
        self._notify()
        return None

    async def _run_connection(self) -> IoTHubError | None:
        loss = self._loss
        assert loss is not None
        try:
            return await loss
        finally:
            reader = self._reader
            self._reader = None
            if reader is not None:
                reader.cancel()
                await asyncio.wait({reader})  # our own cancellation of the reader is not ours to raise
                if not reader.cancelled() and reader.exception() is not None:
                    log.debug("reader ended with %r", reader.exception())

    async def _read(self, loss: asyncio.Future[IoTHubError | None]) -> None:
        name = self._transport.name
        try:
            async for event in self._transport.events():
                if isinstance(event, Disconnected):
                    self._lose(loss, event.error)
                    return
                if isinstance(event, DeviceOnline):
                    self.device_online(event.device_id)
                elif isinstance(event, DeviceOffline):
                    self.device_offline(event.device_id)
                elif isinstance(event, Inbound):
                    self._count(None, "inbound")
                    if self._on_inbound is not None:
                        try:
                            self._on_inbound(event)
                        except Exception:
                            log.exception("on_inbound hook raised")
            err = make_error(_NOT_CONNECTED, transport=self._err_transport(),
                             message="the transport's event stream ended without a reason")
        except asyncio.CancelledError:
            raise
        except IoTHubError as exc:
            err = exc
        except Exception as exc:
            err = normalize(exc, transport=name if name in {"http", "mqtt", "amqp"} else "network")
        self._lose(loss, err)

    def _lose(self, loss: asyncio.Future[IoTHubError | None], err: IoTHubError | None) -> None:
        """The connection ended (once): remember which sends were in flight, for ambiguous drops."""
        if loss.done():
            return
        gen = self._gen
        self._loss_in_flight = tuple(op.id for op, g in self._sending.items() if g == gen)
        loss.set_result(err)

    def _report_loss(self, err: IoTHubError, gen: int) -> None:
        """An operation saw the connection fail: hand it to the supervisor, once per connection."""
        loss = self._loss
        if gen == self._gen and self._up and loss is not None:
            self._lose(loss, err)
        # mark down at once so other operations wait instead of hitting a dead connection
        if gen == self._gen and self._up:
            self._up = False
            self._down_cause = err

    async def _apply_connection_decision(self, err: IoTHubError) -> bool:
        """Act on a connection-level error. False means stop the supervisor."""
        self._up = False
        self._down_cause = err
        now = self._clock.now()
        in_flight, self._loss_in_flight = self._loss_in_flight, ()
        decision, self._history = self._policy.step(err, self._history, now=now, wall=self._clock.wall(),
                                                    rand=self._rand, in_flight=in_flight)
        self._notify()
        if isinstance(decision, Stop):
            self._count(err.code, "stopped")
            self._stop(decision, err)
            return False
        if isinstance(decision, RefreshCredentials):
            self._count(err.code, "refresh")
            self._move(Event.LOST, code=err.code, cause=err, until=now, reason="refreshing credentials")
            failure = await self._refresh()
            if failure is not None:
                return await self._apply_connection_decision(failure)
            return True
        if isinstance(decision, ParkUntil) and decision.takeover:
            self._count(err.code, "inferred_takeover_park")
            self._next_attempt_at = decision.until
            reason = (f"the connection keeps being dropped with nothing in flight, as when another client takes "
                      f"this identity: parked for {decision.until - now:.0f}s, then trying again (not stopping: "
                      f"the evidence is ambiguous)")
            log.warning("%s: %s", self._history.identity or self._transport.name, reason)
            self._move(Event.PARKED, code=err.code, cause=err, until=decision.until, reason=reason)
            self._notify()
            await self._clock.sleep(decision.until - now)
            return True
        if isinstance(decision, ParkUntil):
            self._count(err.code, "parked")
            self._gate.park(err, decision.until)
            self._next_attempt_at = decision.until
            self._move(Event.PARKED, code=err.code, cause=err, until=decision.until,
                       reason="daily message quota used up")
            self._notify()
            await self._clock.sleep(decision.until - now)
            if self._gate.parked_until == decision.until:
                self._gate.parked_until = 0.0
            return True
        delay = decision.delay if isinstance(decision, (ReconnectAfter, RetryAfter)) else 0.0
        throttled = isinstance(decision, ReconnectAfter) and decision.throttled
        reason = "reconnecting"
        if isinstance(decision, ReconnectAfter):
            self._dead_letter_poison(decision, err)
            if decision.identity_conflict:
                reason = "another client took this identity; reconnecting after a long delay"
            elif decision.attributed and throttled:
                reason = "every publish is answered by a dropped connection (MQTT 3.1.1): throttled"
                self._count(err.code, "throttled_drops")
            elif decision.attributed:
                reason = "the connection dropped with publishes in flight: reconnecting, one send at a time"
                self._count(err.code, "attributed_drop")
            elif decision.inferred_takeover:
                reason = "the connection dropped with nothing in flight (maybe another client took this identity)"
                self._count(err.code, "inferred_takeover")
        self._count(err.code, "throttled" if throttled else "reconnect")
        self._next_attempt_at = now + delay
        if throttled:
            self._gate.throttled_until = max(self._gate.throttled_until, now + delay)
        self._move(Event.THROTTLED if throttled else Event.LOST, code=err.code, cause=err,
                   until=now + delay, reason=reason)
        self._notify()
        await self._clock.sleep(delay)
        return True

    def _dead_letter_poison(self, decision: ReconnectAfter, err: IoTHubError) -> None:
        if not decision.poison:
            return
        ids = set(decision.poison)
        limit = self._policy.config.drops.poison_after
        for op in self._sends:
            if op.id in ids and op.poison is None:
                message = op.message
                size = None if message is None else len(message.body) + sum(
                    len(k) + len(v) for k, v in message.properties.items())
                poison = make_error(poison_code(size), transport=err.transport, exact=False, device_id=op.device_id,
                                    message=f"message {op.id!r} was alone in flight at {limit} dropped connections "
                                            f"while other messages were delivered: the hub refuses it (inferred: "
                                            f"MQTT 3.1.1 cannot say why)",
                                    native={"id": op.id, "drops": limit})
                poison.__cause__ = err
                op.poison = poison
                self._count(poison.code, "poison")
                log.warning("dead-lettering poison message %r after %d drops", op.id, limit)

    async def _refresh(self) -> IoTHubError | None:
        hook = self._refresh_hook
        if hook is None:
            return None
        timeout = self._policy.config.operation.refresh_timeout
        try:
            expiry = await self._within(hook(), timeout)
        except _DeadlineExceeded:
            return make_error(_TIMED_OUT, transport=self._err_transport(),
                              message=f"the credential-refresh hook did not finish within {timeout:g}s")
        except IoTHubError as exc:
            return exc
        except Exception as exc:
            log.exception("credential-refresh hook raised")
            err = make_error(code_of("IotHubUnauthorizedAccess"), transport=self._err_transport(),
                             message=f"the credential-refresh hook raised {type(exc).__name__}: {exc}")
            err.__cause__ = exc
            return err
        self._count(None, "refreshed")
        self._credential_expiry = expiry
        return None

    def _schedule_renewal(self) -> None:
        """Read the credential's expiry (epoch) once and turn it into monotonic times to renew at."""
        if self._renew_task is not None:
            self._renew_task.cancel()
            self._renew_task = None
        expiry = getattr(self._transport, "credential_expiry", None)
        if expiry is None:
            expiry = self._credential_expiry
        if expiry is None:
            return
        cfg = self._policy.config.operation
        left = float(expiry) - self._clock.wall()
        if left <= cfg.renew_margin:
            # A credential this close to expiry (or a stale expiry) would make every connect renew at
            # once: a reconnect loop. Let the hub's expiry (an expired-token drop -> refresh hook) handle it instead.
            log.warning("credential expires in %.0fs, inside the renewal margin; not scheduling a renewal", left)
            return
        now = self._clock.now()
        soft, hard = now + left - cfg.renew_before, now + left - cfg.renew_margin
        self._renew_task = asyncio.get_running_loop().create_task(self._renew_at(soft, max(soft, hard), self._gen),
                                                                  name="iothub-renew")

    async def _renew_at(self, soft: float, hard: float, gen: int) -> None:
        """At ``soft``, stop new attempts and wait until nothing is in flight (or ``hard``), then renew."""
        await self._clock.sleep(soft - self._clock.now())
        if gen != self._gen or not self._up:
            return
        self._renewing = True
        try:
            while self._inflight and self._clock.now() < hard and gen == self._gen:
                changed = self._changed
                with contextlib.suppress(_DeadlineExceeded):
                    await self._within(changed.wait(), hard - self._clock.now())
            loss = self._loss
            if gen == self._gen and self._up and loss is not None and not loss.done():
                self._count(None, "renew")
                self._lose(loss, None)
        finally:
            self._renewing = False
            self._notify()

    def _stop(self, decision: Stop, err: IoTHubError) -> None:
        stop = make_error(decision.code, transport=err.transport, message=decision.detail,
                          device_id=err.device_id, native={"reason": decision.reason.value})
        stop.__cause__ = err
        self._stop_error = stop
        self._up = False
        self._next_attempt_at = None
        for item in self._holds.drain():
            if not item.waiter.done():
                item.waiter.set_result(False)
        self._move(Event.STOPPED, code=decision.code, cause=err, reason=decision.detail)
        self._notify()
        self._spawn(self._close_transport(), "iothub-close")

    async def _close_transport(self) -> None:
        try:
            await self._transport.close()
        except Exception:
            log.debug("transport.close() raised", exc_info=True)

    # -- plumbing -------------------------------------------------------------------------------------

    async def _within(self, aw: Awaitable[T], timeout: float, *, track: bool = False) -> T:
        """Await ``aw`` for at most ``timeout`` seconds of the handler's clock."""
        task: asyncio.Future[T] = asyncio.ensure_future(aw)
        if track and isinstance(task, asyncio.Task):
            self._inflight.add(task)
            task.add_done_callback(self._call_done)
        if task.done():
            return task.result()
        if timeout <= 0:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise _DeadlineExceeded
        call_later = getattr(self._clock, "call_later", None)
        if call_later is not None:
            return await self._within_timer(task, timeout, call_later)
        timer = asyncio.ensure_future(self._clock.sleep(timeout))  # a Clock without call_later
        both: set[asyncio.Future[Any]] = {task, timer}
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            timer.cancel()
            await asyncio.gather(task, timer, return_exceptions=True)
            raise
        if task.done():
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if task.done() and not task.cancelled() and task.exception() is None:
            return task.result()  # finished while being cancelled: keep the result
        raise _DeadlineExceeded

    @staticmethod
    async def _within_timer(task: asyncio.Future[T], timeout: float,
                            call_later: Callable[[float, Callable[[], object]], Any]) -> T:
        """``_within`` with a timer callback instead of a sleeping task and ``asyncio.wait``: one timer
        handle per operation rather than a second task, a waiter and a gather (this runs once per message
        sent). Awaiting ``task`` directly also passes a cancellation of the caller on to it."""
        fired = False

        def expire() -> None:
            nonlocal fired
            fired = True
            task.cancel()

        timer = call_later(timeout, expire)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if fired and (current is None or not current.cancelling()):
                raise _DeadlineExceeded from None
            raise
        except Exception:
            if fired:  # it failed while being cut short: the deadline is what ended it
                raise _DeadlineExceeded from None
            raise
        finally:
            timer.cancel()

    def _call_done(self, task: asyncio.Task[Any]) -> None:
        self._inflight.discard(task)
        if self._renewing and not self._inflight:
            self._notify()  # a quiet moment: the renewal may go

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        if self._closed:
            coro.close()  # close() already gathered the tasks it cancels: nothing new may outlive it
            return
        task = asyncio.ensure_future(coro)
        if isinstance(task, asyncio.Task):
            task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _move(self, event: Event, *, code: int | None = None, cause: IoTHubError | None = None,
              until: float | None = None, reason: str = "") -> None:
        """Fire ``event`` on the state machine and publish the change (``until`` is monotonic)."""
        last = self._pub.last
        before = self._machine.state
        state = self._machine.fire(event)  # an illegal move raises: a bug in this driver
        if (before, last.code, self._last_until, last.reason) == (state, code, until, reason) and last.state is state:
            return
        self._last_until = until
        self._pub.publish(StateChange(state, self._clock.wall(), code, cause,
                                      self._to_wall(until) if until is not None else None, reason))

    def _to_wall(self, monotonic: float) -> float:
        """A monotonic instant as epoch seconds, for people and for errors' ``retry_at`` (reports only)."""
        return self._clock.wall() + (monotonic - self._clock.now())

    def _count(self, code: int | None, outcome: str) -> None:
        self._pub.count(code, outcome)

    def _err_transport(self, cause: IoTHubError | None = None) -> str:
        if cause is not None:
            return cause.transport
        name = self._transport.name
        return name if name in {"http", "mqtt", "amqp"} else "network"
