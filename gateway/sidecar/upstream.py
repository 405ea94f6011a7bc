"""Per-device delivery: outbox -> ``Handler(transport).send`` -> ``outbox.delivered`` / ``dead_letter``.

One :class:`DevicePipeline` per configured device, each with its own transport and
:class:`~gateway.handler.Handler` (IoT Hub authenticates per device). A pipeline claims the oldest
pending messages of its device (up to ``max_inflight`` sends at a time, and more claimed ahead so the next
send starts the moment a slot frees), sends each with the stable outbox id as the message id, and settles
it in the outbox (the write goes on after the slot is free):

- delivered: ``outbox.delivered`` (flagged as a possible duplicate when an attempt was uncertain);
- a permanent refusal (the code's action is ``fail``): dead-lettered with that code;
- the message's own deadline passed: dead-lettered with the code that kept it from going;
- anything else (a transient code whose retries ran out, an uncertain outcome, the handler stopped for
  good, shutdown): released back to pending, in its place, to be tried again; the outbox's deadline
  sweep dead-letters it if that never succeeds.

Transports are built by a small factory per protocol that imports its adapter lazily, so a build
without one of them still runs the others, and a config that needs a missing one fails at start with a
clear error.

AMQP devices are multiplexed by default: :class:`AmqpPools` keeps one ``AmqpMux`` per upstream (one
proton thread for all of them, up to ``devices_per_connection`` devices per connection). A multiplexed
device whose transport lacks part of the device surface (twin, direct methods) says so explicitly: its
streams and requests answer 501 GenericNotImplemented naming the way out (``multiplex = false`` for that
device). The surface is read from the transport's ``supports`` attribute when it has one.

An idle pipeline costs nothing per second: it claims from the outbox only when the outbox's in-memory
counts say its device has messages waiting, and otherwise sleeps until a message is accepted for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import math
import ssl
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from gateway.aio import cancel_and_wait
from gateway.codes import Action, code_of, lookup
from gateway.errors import IoTHubError
from gateway.handler import Handler, State, StateChange, Undelivered
from gateway.outbox import OutboxItem, StorageError
from gateway.outbox_writer import AsyncOutbox
from gateway.policy import Policy
from gateway.sas import ConnectionString
from gateway.sidecar.metrics import DeviceSnapshot, Metrics
from gateway.sidecar.stats import Stats
from gateway.sidecar.surface import DeviceSurface
from gateway.tls import client_context
from gateway.transport import Message, Transport

__all__ = [
    "FACTORIES",
    "AmqpPools",
    "DevicePipeline",
    "EventHub",
    "ProtocolUnavailable",
    "TransportFactory",
    "TransportSpec",
    "build_transport",
    "rfc3339",
    "split_system",
    "storage_view",
]

log = logging.getLogger("gateway.sidecar")

_TIMED_OUT = code_of("OperationTimedOut")
_PERMANENT = frozenset({Action.FAIL})


#: Where the API keeps a message's system properties among its stored properties (MQTT's names: app
#: property names starting with ``$`` are refused, so these never collide with the app's).
SYSTEM_KEYS = {"$.ct": "content_type", "$.ce": "content_encoding", "$.cid": "correlation_id",
               "$.ctime": "creation_time"}


def rfc3339(epoch: float | None) -> str | None:
    """An epoch time as the API shows it: RFC 3339 in UTC with milliseconds (None stays None).

    Every delivery event carries one, so the seconds part is formatted once per second and kept; the
    result is the same as ``datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")``
    with ``Z`` (microseconds rounded half to even, then truncated to milliseconds).
    """
    if epoch is None:
        return None
    whole = math.floor(epoch)
    micros = round((epoch - whole) * 1_000_000)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    global _last_second
    if _last_second[0] != whole:
        _last_second = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_last_second[1]}.{micros // 1000:03d}Z"


_last_second: tuple[int | None, str] = (None, "")


def storage_view(failure: Any) -> dict[str, Any] | None:
    """A StorageFailure as the API shows it (``since`` in RFC 3339), or None."""
    if failure is None:
        return None
    data: dict[str, Any] = failure.to_dict()
    data["since"] = rfc3339(data.get("since"))
    return data


def split_system(properties: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Stored properties -> (application properties, Message system-property keyword arguments)."""
    app = {k: v for k, v in properties.items() if k not in SYSTEM_KEYS}
    system = {SYSTEM_KEYS[k]: v for k, v in properties.items() if k in SYSTEM_KEYS}
    return app, system


class ProtocolUnavailable(RuntimeError):
    """The adapter for a configured protocol cannot be loaded in this build."""


@dataclass(frozen=True)
class TransportSpec:
    """Everything a factory needs to connect one device."""

    protocol: str
    connection: ConnectionString
    host: str  #: where the socket goes
    port: int
    tls: bool  #: False only for a loopback emulator
    ca_file: str | None = None
    mqtt_version: int = 4
    multiplex: bool = False  #: AMQP: a device on a shared connection (needs ``pool``)
    pool: AmqpPools | None = field(default=None, compare=False, repr=False)

    def ssl_context(self) -> ssl.SSLContext | None:
        """Verification on (hostname and chain): the system store plus an optional extra CA bundle."""
        return client_context(self.ca_file) if self.tls else None


TransportFactory = Callable[[TransportSpec], Transport]


def _adapter(protocol: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ProtocolUnavailable(f"protocol {protocol!r} is not available in this build ({exc})") from exc


def _http(spec: TransportSpec) -> Transport:
    mod = _adapter("http", "adapters.http.transport")
    transport: Transport = mod.HttpTransport(spec.connection, host=spec.host, port=spec.port, ssl=spec.ssl_context())
    return transport


def _mqtt(spec: TransportSpec) -> Transport:
    mod = _adapter("mqtt", "adapters.mqtt.transport")
    # The whole device surface: C2D is acknowledged only when an app settles it (see surface.py).
    transport: Transport = mod.MqttTransport(spec.connection, host=spec.host, port=spec.port, ssl=spec.ssl_context(),
                                             protocol=spec.mqtt_version, subscribe=("c2d", "twin", "methods"))
    return transport


def _amqp(spec: TransportSpec) -> Transport:
    if spec.multiplex and spec.pool is not None:
        return spec.pool.device(spec)
    mod = _adapter("amqp", "adapters.amqp.transport")
    transport: Transport = mod.AmqpTransport.from_connection_string(
        spec.connection, host=spec.host, port=spec.port, ssl=spec.ssl_context(), receive_c2d=True,
        subscribe=("methods", "twin"),
    )
    return transport


FACTORIES: Mapping[str, TransportFactory] = {"http": _http, "mqtt": _mqtt, "amqp": _amqp}

#: The device surface's parts: "c2d" (stream + settle), "methods" (stream + answer), "twin" (get, patch
#: reported, desired stream).
_TOKEN_TTL = 3600.0  #: seconds a multiplexed device's SAS token lives; CBS renews it on the live connection
#: An idle pipeline (no messages waiting) looks at the outbox again after this many seconds even if no
#: accept woke it (a safety net only: every accept, release, replay and storage recovery wakes it).
IDLE_RECHECK = 30.0
#: Seconds acknowledgements of a busy pipeline gather before they are written as one group.
ACK_GROUP_DELAY = 0.02


class ClaimBudget:
    """Messages claimed ahead of sending, beyond each device's own ``2 * max_inflight``, shared by every
    pipeline of a sidecar.

    Why claim far ahead: the outbox commits a claim's rows and their index pages once per claim, so 256
    rows in one claim cost a fraction of 16 claims of 16 (measured: ~15 µs against ~50 µs of SQLite per
    message), and a device with a backlog keeps its sends going while the writer thread is busy. Why a
    shared bound: claimed bodies sit in memory; 10,000 devices with a backlog each would otherwise hold
    ``10,000 * ahead`` of them. A device borrows only while its backlog lasts and gives back as it drains.
    """

    def __init__(self, total: int, per_device: int) -> None:
        self.free = total
        self.per_device = per_device

    def borrow(self, want: int) -> int:
        got = max(0, min(want, self.free))
        self.free -= got
        return got

    def give_back(self, n: int) -> None:
        self.free += n


class AmqpPools:
    """One ``AmqpMux`` per upstream (socket host, port, TLS settings, hub name): IoT Hub carries many
    device identities on one AMQPS connection, each with its own CBS token and links, so 10,000 devices
    cost one proton thread and ``ceil(10,000 / devices_per_connection)`` connections."""

    def __init__(self, devices_per_connection: int = 1000) -> None:
        self.devices_per_connection = devices_per_connection
        self._muxes: dict[tuple[str, int, bool, str | None, str], Any] = {}
        self._members: set[str] = set()

    def device(self, spec: TransportSpec) -> Transport:
        """The multiplexed transport of ``spec``'s device (its connection opens on ``connect()``), with
        the whole device surface: telemetry, C2D, twin and direct methods on its own links."""
        mod = _adapter("amqp", "adapters.amqp.mux")
        cs = spec.connection
        key = (spec.host, spec.port, spec.tls, spec.ca_file, cs.host_name)
        mux = self._muxes.get(key)
        if mux is None:
            mux = mod.AmqpMux(host=spec.host, port=spec.port, ssl=spec.ssl_context(), hub_host=cs.host_name,
                              devices_per_connection=self.devices_per_connection)
            self._muxes[key] = mux

        def token() -> str:
            return cs.token(int(time.time() + _TOKEN_TTL))  # an epoch expiry: the wall clock is right here

        self._members.add(cs.device_id)
        transport: Transport = mux.device(cs.device_id, token=token, receive_c2d=True,
                                          subscribe=("methods", "twin"))
        return transport

    def multiplexed(self, device_id: str) -> bool:
        """Whether the device was made here (it shares a connection)."""
        return device_id in self._members

    def connections(self) -> dict[str, list[int]]:
        """Devices per live shared connection, per upstream (``host:port``)."""
        out: dict[str, list[int]] = {}
        for (host, port, _tls, _ca, _hub), mux in self._muxes.items():
            out.setdefault(f"{host}:{port}", []).extend(mux.connections())
        return out

    async def close(self) -> None:
        """Close every shared connection and the proton thread (after the devices' handlers closed)."""
        muxes, self._muxes = list(self._muxes.values()), {}
        for mux in muxes:
            try:
                await mux.close()
            except Exception:
                log.exception("closing a shared AMQP connection pool failed")


def build_transport(spec: TransportSpec, factories: Mapping[str, TransportFactory] | None = None) -> Transport:
    """The transport for ``spec``; raises :class:`ProtocolUnavailable` with a one-line reason."""
    factory = (factories or FACTORIES).get(spec.protocol)
    if factory is None:
        raise ProtocolUnavailable(f"protocol {spec.protocol!r} is not available in this build")
    try:
        return factory(spec)
    except ProtocolUnavailable:
        raise
    except (ImportError, AttributeError, TypeError) as exc:  # an adapter that does not fit this build
        raise ProtocolUnavailable(f"protocol {spec.protocol!r} is not available in this build "
                                  f"({type(exc).__name__}: {exc})") from exc


class EventHub:
    """Fan-out of sidecar events (state changes, deliveries, dead letters) to SSE subscribers, with a short
    replay. ``delivered`` events are replayed from their own ring, so a busy sidecar's deliveries never
    push the rarer state changes and dead letters out of the replay a reconnecting page asks for."""

    def __init__(self, keep: int = 200, queue_size: int = 1000) -> None:
        self._recent: deque[tuple[int, str, dict[str, Any]]] = deque(maxlen=keep)
        self._delivered: deque[tuple[int, str, dict[str, Any]]] = deque(maxlen=keep)
        self._subscribers: set[asyncio.Queue[tuple[int, str, dict[str, Any]] | None]] = set()
        self._next = 1
        self._queue_size = queue_size

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        event = (self._next, kind, data)
        self._next += 1
        (self._delivered if kind == "delivered" else self._recent).append(event)
        for queue in list(self._subscribers):
            if queue.full():  # a stalled reader loses its oldest events, never blocks the sidecar
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    def recent(self, after: int = 0) -> list[tuple[int, str, dict[str, Any]]]:
        return sorted(e for ring in (self._recent, self._delivered) for e in ring if e[0] > after)

    async def subscribe(self, after: int | None = None) -> AsyncGenerator[tuple[int, str, dict[str, Any]], None]:
        queue: asyncio.Queue[tuple[int, str, dict[str, Any]] | None] = asyncio.Queue(self._queue_size)
        self._subscribers.add(queue)
        try:
            if after is not None:
                for event in self.recent(after):
                    yield event
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item
        finally:
            self._subscribers.discard(queue)

    def close(self) -> None:
        for queue in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)


async def _no_refresh() -> float | None:
    """The adapters mint a fresh SAS token from the device key at every connect: nothing to do here."""
    return None


class DevicePipeline:
    """Delivers one device's outbox through its own handler."""

    handler: Handler

    def __init__(
        self,
        device_id: str,
        protocol: str,
        transport: Transport,
        outbox: AsyncOutbox,
        *,
        policy: Policy,
        metrics: Metrics,
        events: EventHub,
        max_inflight: int = 8,
        clock: Callable[[], float] = time.time,
        redact: Callable[[str], str] = str,
        c2d_poll_interval: float = 1.0,
        c2d_max_held: int = 100,
        multiplexed: bool = False,
        twin_poll_interval: float = 30.0,
        stats: Stats | None = None,
        budget: ClaimBudget | None = None,
    ) -> None:
        self.device_id = device_id
        self._budget = budget or ClaimBudget(0, 0)
        self._borrowed = 0  #: claim-ahead room borrowed from the budget (given back as the backlog drains)
        self.multiplexed = multiplexed
        self.stats = stats or Stats([device_id])
        self._redact = redact
        self.protocol = protocol
        self.outbox = outbox
        self.policy = policy
        self.metrics = metrics
        self.events = events
        self.max_inflight = max_inflight
        self._clock = clock
        self.last_error: IoTHubError | None = None
        self.last_error_at: float | None = None
        self.surface = DeviceSurface(device_id, protocol, lambda: self.handler,
                                     now=lambda: rfc3339(self._clock()) or "",
                                     timeout=lambda: self.policy.config.operation.timeout,
                                     poll_interval=c2d_poll_interval, max_held=c2d_max_held,
                                     twin_poll_interval=twin_poll_interval)
        self.handler = Handler(transport, policy=policy, identity=device_id, refresh_credentials=_no_refresh,
                               on_state_change=self._on_state, on_undelivered=self._on_undelivered,
                               on_inbound=self.surface.on_inbound)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()  #: sends in flight (at most max_inflight)
        #: deliveries being written to the outbox: a send's slot is free once the hub acknowledged it, so
        #: the next send does not wait for this write (the writer thread commits them in groups)
        self._settling: set[asyncio.Task[None]] = set()
        #: claimed ahead, not yet sent: released, unflagged, when the pipeline stops
        self._ready: deque[OutboxItem] = deque()
        #: acknowledged by the hub, to be written as delivered by the one writing task (``_flusher``)
        self._acked: list[tuple[OutboxItem, int, float, bool]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._releasing: asyncio.Task[None] | None = None  #: claimed messages going back to pending
        self._outcomes: dict[str, str] = {}
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False
        self._failures = 0  #: consecutive released failures: the pipeline pauses before claiming again
        metrics.states.set(device_id, protocol, self.handler.state.value)
        #: done when the first connect attempt ended, either way (the sidecar paces its start with it)
        self.first_attempt: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.handler.start()
        self._runner = asyncio.get_running_loop().create_task(self._run(), name=f"pipeline-{self.device_id}")

    def notify(self) -> None:
        """A message for this device was accepted."""
        self._wake.set()

    async def stop(self, deadline: float) -> int:
        """Stop claiming; let sends finish for ``deadline`` seconds, then persist the rest. Returns how many
        were still in flight and went back to pending."""
        self._stopping = True
        self._wake.set()
        await cancel_and_wait(self._runner)
        while self._ready:  # never sent: back to pending as they were
            item = self._ready.popleft()
            with contextlib.suppress(StorageError):
                await self.outbox.release(item.id)
        pending = set(self._tasks)
        if pending and deadline > 0:
            _, pending = await asyncio.wait(pending, timeout=deadline)
        await cancel_and_wait(pending)
        if self._settling:  # acknowledged by the hub: write them down (a cut-short write is sent again later)
            _, late = await asyncio.wait(set(self._settling), timeout=max(deadline, 1.0))
            await cancel_and_wait(late)
        self._give_back()
        await self.surface.close()
        await self.handler.close()
        return len(pending)

    # -- status ----------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        change = self.handler.last_change
        counts = self.outbox.counts(self.device_id)
        return {
            "id": self.device_id,
            "protocol": self.protocol,
            "state": change.state.value,
            "connected": change.state in (State.CONNECTED, State.THROTTLED) and self.handler.state is not State.PARKED,
            "since": rfc3339(change.at),
            "reason": change.reason,
            "next_attempt_at": rfc3339(change.until),
            "last_error": self._error_view(),
            "held": self.handler.held(self.device_id),
            "queued": counts["pending"] + counts["inflight"],
            "inflight": len(self._tasks),
            "messages": counts,
            "storage": storage_view(self.outbox.failure),
            "listeners": self.surface.listeners(),
            "multiplexed": self.multiplexed,
        }

    def snapshot(self) -> DeviceSnapshot:
        counts = self.outbox.counts(self.device_id)
        return DeviceSnapshot(self.device_id, self.protocol, self.handler.state.value,
                              counts["pending"] + counts["inflight"], self.handler.metrics())

    def _error_view(self) -> dict[str, Any] | None:
        err = self.last_error
        if err is None:
            return None
        return {"code": err.code, "name": err.name, "action": self.policy.action_for(err).value,
                "message": err.message, "transport": err.transport, "at": rfc3339(self.last_error_at)}

    # -- the loop --------------------------------------------------------------------------------------

    async def _run(self) -> None:
        """Claim and send until stopped. Nothing that goes wrong in one round ends the loop: a storage
        failure (disk full, locked ...) waits and tries again, so delivery resumes by itself when it clears;
        anything else is logged and retried too."""
        trouble = 0
        while not self._stopping:
            try:
                await self._round()
                trouble = 0
            except StorageError:
                trouble += 1  # the outbox reports it (health, /readyz, log); wait for it to clear
                await self._sleep_or_wake(min(5.0, 0.1 * 2 ** min(trouble, 6)))
            except Exception:
                trouble += 1
                log.exception("the delivery loop of %s failed; it goes on", self.device_id,
                              extra={"device": self.device_id})
                await self._sleep_or_wake(min(5.0, 0.1 * 2 ** min(trouble, 6)))

    async def _round(self) -> None:
        """One round: wait for room or work, claim what fits, start sending it."""
        if self.handler.state in (State.STOPPED, State.CLOSED):
            # Given up for good (credentials refused, identity conflict ...): keep the messages
            # pending for a restart with a fixed config; the deadline sweep ends them otherwise.
            await self._sleep_or_wake(5.0)
            return
        if self._failures:
            await asyncio.sleep(min(30.0, 0.5 * 2 ** min(self._failures, 8)))
            if self._stopping:
                return
        while self._ready and len(self._tasks) < self.max_inflight:
            item = self._ready.popleft()
            task = asyncio.get_running_loop().create_task(self._deliver(item), name=f"send-{item.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        pending = self.outbox.counts(self.device_id)["pending"]
        room = self._window(pending) - len(self._tasks) - len(self._ready)
        if self._tasks and (room <= 0 or len(self._ready) > max(self.max_inflight, self._borrowed) // 2):
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)
            return
        if room <= 0:  # no usable link: nothing is claimed until it is back (its state change wakes us)
            self._wake.clear()
            if self.handler.state is not State.CONNECTED:
                await self._sleep_or_wake(1.0)
            return
        # Claim ahead (max_inflight more than are being sent, and what the budget lends while there is a
        # backlog): the next send starts the moment a slot frees, not after a round trip to the writer
        # thread, and one claim carries many rows.
        self._wake.clear()
        if not self._tasks and not self._ready and pending == 0:
            # Nothing waits (the counts are published after each commit, before an accept returns and
            # wakes us): no claim, no timer per second; 10,000 idle devices cost nothing.
            await self._sleep_or_wake(IDLE_RECHECK)
            return
        releasing = self._releasing
        if releasing is not None and not releasing.done():
            await asyncio.wait({releasing})  # what went back to pending is older than what a claim would take
            return
        items = await self.outbox.claim(self.device_id, limit=room)
        if items:
            self._ready.extend(items)
            if self.handler.state is not State.CONNECTED:  # the link went down while the claim was written
                self._release_ready()
            return
        if self._tasks:
            waker = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait({waker, *self._tasks}, return_when=asyncio.FIRST_COMPLETED, timeout=1.0)
            waker.cancel()
        else:
            await self._sleep_or_wake(1.0)

    def _window(self, pending: int) -> int:
        """How many may be claimed (in flight and ready) now: ``2 * max_inflight``, plus what the budget
        lends while pending messages wait, given back as the backlog drains. Without a usable link, no
        more than the sends already waiting in the handler: the rest stays pending, in reach of the
        deadline sweep, until the link is back (see :meth:`_release_ready`)."""
        if self.handler.state is not State.CONNECTED:
            self._give_back()
            return len(self._tasks)
        base = 2 * self.max_inflight
        wanted = min(self._budget.per_device, max(0, len(self._tasks) + len(self._ready) + pending - base))
        if wanted > self._borrowed:
            self._borrowed += self._budget.borrow(wanted - self._borrowed)
        elif wanted < self._borrowed:
            self._budget.give_back(self._borrowed - wanted)
            self._borrowed = wanted
        return base + self._borrowed

    def _give_back(self) -> None:
        self._budget.give_back(self._borrowed)
        self._borrowed = 0

    def _release_ready(self) -> None:
        """The link is down (or throttled, parked, stopped): what was claimed and not yet sent goes back to
        pending, unflagged, in its place (the sends under way are older than all of it). Held in memory it
        would be out of reach of the deadline sweep, show as in flight, and come back flagged as a possible
        duplicate after a crash, though never sent. The next claim waits for these writes, so it cannot
        overtake them."""
        items = list(self._ready)
        self._ready.clear()
        self._give_back()
        if not items:
            return
        earlier = self._releasing

        async def release() -> None:
            if earlier is not None:
                await asyncio.wait({earlier})
            await asyncio.gather(*(self._record(partial(self.outbox.release, item.id)) for item in items))

        task = asyncio.get_running_loop().create_task(release(), name=f"release-{self.device_id}")
        self._releasing = task
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _sleep_or_wake(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _deliver(self, item: OutboxItem) -> None:
        now = self._clock()
        timeout = self.policy.config.operation.timeout
        if item.deadline is not None:
            timeout = min(timeout, item.deadline - now)
        if timeout <= 0:
            await self._dead(item, _TIMED_OUT, "deadline passed before delivery", now)
            return
        app, system = split_system(item.properties)
        message = Message(item.id, self.device_id, item.body, app, **system)
        try:
            receipt = await self.handler.send(message, timeout=timeout)
        except asyncio.CancelledError:
            # Shutdown: it may have gone out, so it comes back flagged; the same id is sent again later.
            # (Should this write not happen, the restart does the same: in flight at open = possible duplicate.)
            self._outcomes.pop(item.id, None)
            with contextlib.suppress(StorageError, asyncio.CancelledError):
                await self.outbox.release(item.id, possible_duplicate=True)
            raise
        except IoTHubError as err:
            await self._failed(item, err, self._outcomes.pop(item.id, "failed"))
            return
        except Exception:  # a bug in an adapter must not lose the message
            log.exception("sending %s failed unexpectedly", item.id, extra={"device": self.device_id})
            self._failures += 1
            await self._record(lambda: self.outbox.release(item.id, possible_duplicate=True))
            return
        done = self._clock()
        duplicate = receipt.possible_duplicate or item.possible_duplicate
        self._failures = 0
        self.metrics.delivered(self.protocol, done - item.accepted_at, duplicate=duplicate)
        self.stats.add(self.device_id, "delivered")
        # The slot is free now. The write goes on beside the sends, in one task that writes what was
        # acknowledged meanwhile as one operation (one wake-up of the writer thread for many messages).
        self._acked.append((item, receipt.attempts, done, duplicate))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._write_delivered(),
                                                                   name=f"delivered-{self.device_id}")
            self._settling.add(self._flusher)
            self._flusher.add_done_callback(self._settling.discard)

    async def _write_delivered(self) -> None:
        try:
            # While sends are still coming back, let acknowledgements gather for a moment: a commit costs
            # the same for one row as for hundreds (each touched index page is written to the WAL once),
            # and the hub already has these messages, so only their status waits (a crash meanwhile sends
            # them again, flagged as possible duplicates).
            if self._tasks and not self._stopping:
                await asyncio.sleep(ACK_GROUP_DELAY)
            else:
                await asyncio.sleep(0)  # the acknowledgements read in this turn of the loop join the first write
            while self._acked:
                batch, self._acked = self._acked, []
                acks = [(item.id, done, duplicate) for item, _, done, duplicate in batch]
                if not await self._record(partial(self.outbox.delivered_many, acks)):
                    return  # shutdown while storage fails: in flight in the file, sent again after a restart
                for item, attempts, done, duplicate in batch:
                    self.events.publish("delivered", {"device": self.device_id, "id": item.id, "attempts": attempts,
                                                      "possible_duplicate": duplicate, "at": rfc3339(done)})
        finally:
            self._flusher = None

    async def _record(self, write: Callable[[], Awaitable[Any]]) -> bool:
        """Settle a message in the outbox. The send already happened, so while storage fails keep trying
        (the message stays in flight in the file meanwhile: a restart sends it again, flagged as a possible
        duplicate, never loses it). False when shutdown cut it short."""
        delay = 0.1
        while True:
            try:
                await write()
                return True
            except StorageError:
                if self._stopping:
                    return False
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    async def _failed(self, item: OutboxItem, err: IoTHubError, outcome: str) -> None:
        now = self._clock()
        self._note_error(err)
        past_deadline = item.deadline is not None and now >= item.deadline
        if self._stopping:
            await self._record(lambda: self.outbox.release(item.id, possible_duplicate=outcome == "unknown"))
            return
        if past_deadline:
            code = _TIMED_OUT if outcome == "unknown" else err.code
            await self._dead(item, code, f"deadline passed before delivery; last: {err}", now)
            return
        if self.handler.state not in (State.STOPPED, State.CLOSED) and self.policy.action_for(err) in _PERMANENT:
            await self._dead(item, err.code, str(err), now)
            return
        self.metrics.message(self.protocol, "retry_later", err.code)
        self.stats.add(self.device_id, "retry_later", err.code)
        self._failures += 1
        await self._record(lambda: self.outbox.release(item.id, possible_duplicate=outcome == "unknown"))
        self._wake.set()

    async def _dead(self, item: OutboxItem, code: int, reason: str, now: float) -> None:
        reason = self._redact(reason)  # kept in the outbox file and shown by the API: no secrets
        if not await self._record(lambda: self.outbox.dead_letter(item.id, code=code, reason=reason, now=now)):
            return
        self.metrics.message(self.protocol, "dead_letter", code)
        self.stats.add(self.device_id, "dead_letter", code)
        row = lookup(code)
        log.warning("message %s dead-lettered: %s %s", item.id, code, row.name,
                    extra={"device": self.device_id, "code": code, "code_name": row.name, "action": "dead_letter",
                           "message_id": item.id})
        self.events.publish("dead_letter", {"device": self.device_id, "id": item.id, "code": code,
                                            "name": row.name, "reason": reason[:200], "at": rfc3339(now)})

    def _note_error(self, err: IoTHubError) -> None:
        self.last_error = err
        self.last_error_at = self._clock()

    # -- handler hooks ---------------------------------------------------------------------------------

    def _on_undelivered(self, record: Undelivered) -> None:
        if record.kind == "send":
            self._outcomes[record.id] = record.outcome

    def _on_state(self, change: StateChange) -> None:
        self.metrics.states.set(self.device_id, self.protocol, change.state.value)
        if change.state not in (State.IDLE, State.CONNECTING) and not self.first_attempt.done():
            self.first_attempt.set_result(None)
        if change.cause is not None:
            self.last_error = change.cause
            self.last_error_at = change.at
        name = lookup(change.code).name if change.code is not None else None
        action = None
        if change.cause is not None:
            action = self.policy.action_for(change.cause).value
        elif change.code is not None:
            action = lookup(change.code).action.value
        level = logging.WARNING if change.state in (State.STOPPED,) else logging.INFO
        log.log(level, "%s %s%s", self.device_id, change.state.value,
                f": {change.code} {name} -> {action}" if change.code is not None else "",
                extra={"device": self.device_id, "transport": self.protocol, "state": change.state.value,
                       "code": change.code, "code_name": name, "action": action, "until": change.until,
                       "reason": change.reason or None})
        self.events.publish("state", {
            "device": self.device_id, "transport": self.protocol, "state": change.state.value,
            "code": change.code, "name": name, "action": action, "until": rfc3339(change.until),
            "reason": change.reason, "at": rfc3339(change.at),
        })
        if change.code is not None:
            self.stats.add(self.device_id, change.state.value, change.code)
        self.surface.on_state(change)
        if change.state is not State.CONNECTED and self._ready and not self._stopping:
            self._release_ready()
        if change.state is State.CONNECTED:
            self._failures = 0
            self._wake.set()
