"""The sidecar process: the outbox, one delivery pipeline per device, the emulator when it is the upstream,
and :func:`run` (``iothub-gateway run``) with its start-up errors and graceful shutdown. The start
banner goes to stderr with the logs; stdout is left empty.

Start-up order: bind the API port first (a port in use fails fast, before anything else starts), then
the outbox (one sidecar per outbox), the emulator (if configured), the transports (a protocol missing
from this build is a config error) and the pipelines; only then is the URL printed and ``/readyz`` ready.
Pipelines start paced (a bounded number of first connects under way, :class:`StartPace`; the first
batch before the URL is printed, the rest in the background): a fleet of 10,000 never opens 10,000 connections at once.
AMQP devices share connections (one ``AmqpMux`` per upstream, :class:`~gateway.sidecar.upstream.AmqpPools`).
Shutdown (SIGTERM or SIGINT): stop accepting, let in-flight sends finish for ``delivery.shutdown_deadline``
seconds, put the rest back to pending, close the handlers and the outbox, exit 0.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import errno
import fcntl
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal

from gateway.aio import cancel_and_wait
from gateway.codes import lookup
from gateway.emulator.admin import AdminServer
from gateway.handler import State
from gateway.outbox import NewMessage, Outbox, OutboxItem, Retention, StorageError
from gateway.outbox_writer import AsyncOutbox, StorageFailure
from gateway.sidecar.config import ConfigError, SidecarConfig, load_config
from gateway.sidecar.emulator_harness import EmulatorHarness
from gateway.sidecar.logs import setup_logging
from gateway.sidecar.metrics import DeviceSnapshot, Fleet, Metrics
from gateway.sidecar.security import Redactor
from gateway.sidecar.stats import Stats
from gateway.sidecar.upstream import (
    AmqpPools,
    ClaimBudget,
    DevicePipeline,
    EventHub,
    ProtocolUnavailable,
    TransportFactory,
    TransportSpec,
    build_transport,
    rfc3339,
    split_system,
    storage_view,
)

__all__ = ["START_CONCURRENCY", "Sidecar", "StartError", "StartPace", "UnknownDevice", "run"]

log = logging.getLogger("gateway.sidecar")


#: First connects under way at once when the sidecar starts (then adapted, see StartPace).
START_CONCURRENCY = 64


class StartPace:
    """How many first connects may be under way at once while the sidecar starts (pure: the caller
    passes the loop clock). Starts at ``high`` (``START_CONCURRENCY``); a first attempt slower than
    ``target`` seconds halves the limit (at most once per ``target``, so one slow batch counts once), a
    fast one (under a quarter of it) raises it by one, back up to ``high`` at most (growing past it let
    the queue run into the timeouts again): the queue in front of a busy upstream (a shared AMQP
    connection taking joins one by one) stays short enough that no connect waits out its timeout."""

    def __init__(self, target: float, *, low: int = 4, high: int = START_CONCURRENCY) -> None:
        self.target = target
        self.limit = high
        self.low = low
        self.high = high
        self.running = 0
        self._quiet_until = -math.inf

    def room(self) -> bool:
        return self.running < self.limit

    def begin(self) -> None:
        self.running += 1

    def done(self, took: float, now: float) -> None:
        self.running -= 1
        if took > self.target:
            if now >= self._quiet_until:
                self.limit = max(self.low, self.limit // 2)
                self._quiet_until = now + self.target
        elif took < self.target / 4:
            self.limit = min(self.high, self.limit + 1)


class StartError(RuntimeError):
    """The sidecar cannot start (port in use, outbox locked, ...): one line, no traceback."""


class UnknownDevice(KeyError):
    pass


class Sidecar:
    """Everything behind the API. ``factories`` replaces the transport factories (tests)."""

    def __init__(self, config: SidecarConfig, *, factories: Mapping[str, TransportFactory] | None = None,
                 clock: Callable[[], float] = time.time, redactor: Redactor | None = None,
                 emulator_admin_port: int | None = 0) -> None:
        self.config = config
        #: the built-in emulator's admin API (faults, received telemetry, C2D) on loopback: this port (0: a
        #: free one, None: none), so a user injects a throttle and watches the sidecar handle it
        self.emulator_admin_port = emulator_admin_port
        self.emulator_admin: AdminServer | None = None
        self.factories = factories
        self.clock = clock
        self.redactor = redactor or Redactor(config.secrets())
        self.metrics = Metrics()
        #: per-second counters for the status page's charts (wall clock only labels them)
        self.stats = Stats([d.id for d in config.devices], wall=clock)
        self.events = EventHub()
        self.pipelines: dict[str, DevicePipeline] = {}
        self.emulator: EmulatorHarness | None = None
        self._outbox: AsyncOutbox | None = None
        self._lock_file: IO[str] | None = None
        self.accepting = False
        self._stopped = False
        self._sweeper: asyncio.Task[None] | None = None
        self._starter: asyncio.Task[None] | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        self.pace: StartPace | None = None  #: the start's pacing (for tests and the bench)
        self.amqp_pools = AmqpPools(config.amqp.devices_per_connection)
        #: every device id, sorted: the order of GET /v1/devices and of the per-device metrics
        self.device_ids: list[str] = sorted(d.id for d in config.devices)
        self.metrics.watch(self._snapshots, self._counts, [s.value for s in State], storage=self._storage_view,
                           fleet=self._fleet)

    @property
    def outbox(self) -> AsyncOutbox:
        if self._outbox is None:
            raise RuntimeError("the sidecar is not started")
        return self._outbox

    @property
    def storage_failure(self) -> StorageFailure | None:
        """Why the outbox cannot store now (disk full, I/O error, locked, corrupt), or None."""
        return self._outbox.failure if self._outbox is not None else None

    @property
    def ready(self) -> bool:
        return self.accepting and self.storage_failure is None

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start upstream and pipelines; raises ProtocolUnavailable or StartError (and cleans up)."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        cfg = self.config
        # The outbox first: a second sidecar on the same outbox fails before it starts anything else.
        self._outbox = self._open_outbox()
        specs: dict[str, TransportSpec] = {}
        multiplexed = self._multiplexed()
        if cfg.upstream.kind == "emulator":
            self.emulator = EmulatorHarness(cfg.upstream.host_name, ports=cfg.upstream.ports)
            try:
                await self.emulator.start(sorted({d.protocol for d in cfg.devices}))
            except RuntimeError as exc:
                raise StartError(str(exc)) from exc
            if self.emulator_admin_port is not None:
                admin = AdminServer(self.emulator.hub, "127.0.0.1", self.emulator_admin_port)
                try:
                    await admin.start()
                except OSError as exc:
                    raise StartError(f"cannot listen for the emulator's admin API: {exc.strerror or exc}") from exc
                self.emulator_admin = admin
            if cfg.registry is not None:
                try:
                    self.emulator.hub.load_registry(cfg.registry)  # its keys, so tools using the file still fit
                except ValueError as exc:
                    raise StartError(str(exc)) from exc
            issued: list[str] = []
            for device in cfg.devices:
                if not self.emulator.available(device.protocol) and self.factories is None:
                    raise ProtocolUnavailable(f"protocol {device.protocol!r} is not available in this build "
                                              f"(no emulator front for it); device {device.id!r} needs it")
                port = self.emulator.port(device.protocol) if self.emulator.available(device.protocol) else 0
                cs = self.emulator.register(device.id)
                issued += [cs.shared_access_key or "", self.emulator.hub.connection_string(device.id)]
                specs[device.id] = TransportSpec(device.protocol, cs, "127.0.0.1", port, tls=False,
                                                 mqtt_version=device.mqtt_version, multiplex=device.id in multiplexed,
                                                 pool=self.amqp_pools)
            self.redactor.add(*issued)  # at once: the redactor rebuilds its matcher per call
        else:
            for device in cfg.devices:
                cs = device.parsed()
                host = cfg.upstream.host or cs.gateway_host_name or cs.host_name
                specs[device.id] = TransportSpec(device.protocol, cs, host, cfg.upstream.ports[device.protocol],
                                                 tls=cfg.upstream.tls, ca_file=cfg.upstream.ca_file,
                                                 mqtt_version=device.mqtt_version, multiplex=device.id in multiplexed,
                                                 pool=self.amqp_pools)
        transports = {device_id: build_transport(spec, self.factories) for device_id, spec in specs.items()}
        if self._outbox.recovered:
            log.warning("%d message(s) were in flight when the sidecar last stopped; they will be sent again "
                        "(flagged as possible duplicates)", self._outbox.recovered)
        budget = ClaimBudget(cfg.delivery.claim_budget, cfg.delivery.claim_ahead)
        for device in cfg.devices:
            self.pipelines[device.id] = DevicePipeline(
                device.id, device.protocol, transports[device.id], self._outbox, policy=cfg.policy,
                metrics=self.metrics, events=self.events, max_inflight=cfg.delivery.max_inflight, clock=self.clock,
                redact=self.redactor, c2d_poll_interval=cfg.delivery.c2d_poll_interval,
                c2d_max_held=cfg.delivery.c2d_max_held, multiplexed=self.amqp_pools.multiplexed(device.id),
                twin_poll_interval=cfg.delivery.twin_poll_interval, stats=self.stats,
                budget=budget,
            )
        legacy = self.config.outbox_path().parent / "outbox.sqlite3"
        if not cfg.outbox.path and legacy.exists():
            log.warning("an outbox from an earlier version is at %s; this sidecar uses %s (one per config file). "
                        "To send what is pending there, set [outbox] path = \"%s\"", legacy,
                        self.config.outbox_path(), legacy)
        orphans = set(self._outbox.devices_with_pending()) - set(self.pipelines)
        if orphans:
            log.warning("the outbox holds pending messages for devices no longer configured: %s",
                        ", ".join(sorted(orphans))[:500])
        await self._start_pipelines([self.pipelines[d] for d in self.device_ids if d in self.pipelines])
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="outbox-sweep")
        self.accepting = True

    def _multiplexed(self) -> set[str]:
        """The AMQP devices that share connections: ``multiplex`` (theirs, else ``[amqp]``)."""
        cfg = self.config
        return {d.id for d in cfg.devices if cfg.multiplexed(d)}

    async def _start_pipelines(self, pipelines: list[DevicePipeline]) -> None:
        """Start the pipelines with a bounded number of first connects under way (:class:`StartPace`):
        10,000 devices asking at once would queue their connects (AMQP joins on a shared connection, the
        MQTT connect pool) past the handlers' connect timeout, and every timeout adds a retry to the queue.
        A slot frees when a device's first attempt ends either way (connected, retrying, stopped). The
        first batch starts before this returns (a small sidecar starts as before); the rest from a
        background task. Messages for a device not yet started are accepted meanwhile."""
        loop = asyncio.get_running_loop()
        timeout = self.config.policy.config.operation.connect_timeout
        pace = self.pace = StartPace(target=timeout / 6)
        freed = asyncio.Event()
        watchers: set[asyncio.Task[None]] = self._watchers

        async def watch(pipeline: DevicePipeline, began: float) -> None:
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(pipeline.first_attempt), timeout + 5.0)
            finally:
                pace.done(loop.time() - began, loop.time())
                freed.set()

        async def start(pipeline: DevicePipeline) -> None:
            while not pace.room():
                freed.clear()
                await freed.wait()
            pace.begin()
            try:
                await pipeline.start()
            except BaseException:
                pace.done(0.0, loop.time())
                freed.set()
                raise
            task = loop.create_task(watch(pipeline, loop.time()), name=f"start-{pipeline.device_id}")
            watchers.add(task)
            task.add_done_callback(watchers.discard)

        async def rest(pipelines: list[DevicePipeline]) -> None:
            for pipeline in pipelines:
                try:
                    await start(pipeline)
                except Exception:
                    log.exception("starting the pipeline of %s failed", pipeline.device_id)

        for pipeline in pipelines[:START_CONCURRENCY]:
            await start(pipeline)
        if len(pipelines) > START_CONCURRENCY:
            self._starter = loop.create_task(rest(pipelines[START_CONCURRENCY:]), name="pipelines-start")

    def _open_outbox(self) -> AsyncOutbox:
        """Take the outbox's lock file (two sidecars on one outbox is a start error naming the holder), then
        open it. A file SQLite cannot use (corrupt, locked, I/O error) is not a start error: the sidecar
        serves with /readyz 503 and POST 503 naming the cause, and opens it once the cause clears."""
        path = self.config.outbox_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = Path(str(path) + ".lock").open("a+")  # noqa: SIM115 - held for the process's life
        except OSError as exc:
            raise StartError(f"cannot open the outbox at {path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            lock.seek(0)
            holder = " ".join(lock.read(300).split()) or "unknown"
            lock.close()
            raise StartError(f"the outbox {path} is in use by another iothub-gateway ({holder}); two sidecars "
                             f"must not share one outbox: set [outbox] path in {self.config.source} to give "
                             f"this one its own") from exc
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}, config {self.config.source}\n")
        lock.flush()
        self._lock_file = lock
        o = self.config.outbox
        retention = Retention(delivered_age=o.delivered_retention, delivered_max=o.delivered_max,
                              dead_age=o.dead_letter_retention, dead_max=o.dead_letter_max)
        return AsyncOutbox(lambda: Outbox(str(path), max_messages=o.max_messages, synchronous=o.synchronous,
                                          retention=retention),
                           on_health=self._on_storage, clock=self.clock)

    def _on_storage(self, failure: StorageFailure | None) -> None:
        """Storage failed or works again: say so on the event stream; wake the pipelines on recovery."""
        if failure is None:
            self.events.publish("storage", {"state": "ok", "at": rfc3339(self.clock())})
            for pipeline in self.pipelines.values():
                pipeline.notify()
        else:
            self.events.publish("storage", {"state": "failed", **(storage_view(failure) or {}),
                                            "at": rfc3339(self.clock())})

    async def _sweep(self) -> None:
        """Once a second: probe a failed storage, dead-letter pending messages whose deadline passed (those
        the pipelines never got to), apply retention. A failure here is logged, never ends the loop."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.sweep_once()
            except StorageError:
                pass  # the outbox reports it (health, log); the next round tries again
            except Exception:
                log.exception("outbox maintenance failed; trying again in a second")

    async def sweep_once(self) -> None:
        if await self.outbox.check() is not None:
            return
        for item in await self.outbox.expire(now=self.clock()):
            self._expired(item)
        purged = await self.outbox.purge(now=self.clock())
        if purged.dead:
            log.info("retention removed %d dead letter(s) (oldest %s, code %s)", len(purged.dead),
                     purged.dead[0].id, purged.dead[0].code)

    def _expired(self, item: OutboxItem) -> None:
        pipeline = self.pipelines.get(item.device_id)
        self.metrics.message(pipeline.protocol if pipeline else "unknown", "dead_letter", item.code)
        self.stats.add(item.device_id, "dead_letter", item.code)
        self.events.publish("dead_letter", {"device": item.device_id, "id": item.id, "code": item.code,
                                            "name": lookup(item.code).name if item.code else None,
                                            "reason": "deadline passed before delivery", "at": rfc3339(self.clock())})

    async def stop(self) -> None:
        """Stop accepting, stop the pipelines (within the shutdown deadline), close the outbox."""
        self.accepting = False
        if self._stopped:
            return
        self._stopped = True
        await cancel_and_wait(self._starter)
        await cancel_and_wait(set(self._watchers))
        await cancel_and_wait(self._sweeper)
        deadline = self.config.delivery.shutdown_deadline
        results = await asyncio.gather(*(p.stop(deadline) for p in self.pipelines.values()), return_exceptions=True)
        persisted = sum(r for r in results if isinstance(r, int))
        if persisted:
            log.info("%d in-flight message(s) put back to pending; they are sent after the restart", persisted)
        self.events.close()
        await self.amqp_pools.close()  # the handlers left their shared connections: close them and the thread
        if self._outbox is not None:
            await self._outbox.close()
            self._outbox = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        if self.emulator_admin is not None:
            await self.emulator_admin.stop()
            self.emulator_admin = None
        if self.emulator is not None:
            await self.emulator.stop()

    # -- what the API calls ----------------------------------------------------------------------------

    def pipeline(self, device_id: str) -> DevicePipeline | None:
        return self.pipelines.get(device_id)

    async def accept(self, device_id: str, body: bytes, *, properties: Mapping[str, str] | None = None,
                     message_id: str | None = None, ttl: float | None = None,
                     system: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Persist one message (durable on return). ``system``: its system properties, by their MQTT names
        (``$.ct``, ``$.ce``, ``$.cid``, ``$.ctime``), stored beside the application properties. Posting
        an id again answers the stored message's own status with ``duplicate`` true. Raises OutboxFull,
        UnknownDevice, ValueError or StorageError."""
        pipeline, now, deadline = self._admit(device_id, ttl)
        stored = {**(properties or {}), **(system or {})}
        try:
            mid = await self.outbox.put(device_id, body, now=now, properties=stored, deadline=deadline,
                                        message_id=message_id)
        except ValueError:
            # The app's id is taken: the same message posted again (idempotent while the first one is in
            # the outbox, i.e. within [outbox] delivered_retention after delivery), or another device's.
            existing = await self.outbox.aget(message_id) if message_id is not None else None
            if existing is None:
                raise
            if existing.device_id != device_id:
                raise ValueError(f"message id {message_id!r} is already used by another device's message") from None
            return _accepted(device_id, existing.id, existing)
        self._count_accepted(pipeline, 1)
        return _accepted(device_id, mid, None, deadline)

    async def accept_many(self, device_id: str, messages: Sequence[NewMessage], *,
                          ttl: float | None = None) -> list[dict[str, Any]]:
        """Persist a batch in ONE outbox write (one commit): all or nothing, durable on return. Each
        message's ``properties`` are as stored (application and system ones). Per message, in order, the
        answer :meth:`accept` gives: an id this device already stored answers the stored message's status
        with ``duplicate`` true (the others are stored). The pipeline is woken once. Raises OutboxFull (the
        batch does not fit), UnknownDevice, IdTaken (a ValueError: an id twice in the batch, or another
        device's) or StorageError."""
        pipeline, now, deadline = self._admit(device_id, ttl)
        stored = await self.outbox.put_many(device_id, messages, now=now, deadline=deadline)
        fresh = sum(existing is None for _, existing in stored)
        if fresh:
            self._count_accepted(pipeline, fresh)
        return [_accepted(device_id, mid, existing, deadline) for mid, existing in stored]

    def _admit(self, device_id: str, ttl: float | None) -> tuple[DevicePipeline, float, float | None]:
        """The device's pipeline (UnknownDevice), the acceptance time and the deadline ``ttl`` gives."""
        pipeline = self.pipelines.get(device_id)
        if pipeline is None:
            raise UnknownDevice(device_id)
        now = self.clock()
        ttl = ttl if ttl is not None else (self.config.outbox.ttl or None)
        return pipeline, now, (now + ttl if ttl else None)

    def _count_accepted(self, pipeline: DevicePipeline, n: int) -> None:
        """``n`` messages newly stored: counted (metrics, stats) and the pipeline woken, once."""
        self.metrics.message(pipeline.protocol, "accepted", n=n)
        self.stats.add(pipeline.device_id, "accepted", n=n)
        pipeline.notify()

    async def message(self, message_id: str) -> dict[str, Any] | None:
        item = await self.outbox.aget(message_id)
        return _view(item) if item is not None else None

    async def dead_letters(self, *, limit: int = 100, device_id: str | None = None) -> list[dict[str, Any]]:
        return [_view(item) for item in await self.outbox.dead_letters(limit=limit, device_id=device_id)]

    async def dead_letter(self, message_id: str) -> dict[str, Any] | None:
        """One dead letter with its body and properties, or None (no such id, or not dead)."""
        item = await self.outbox.aget(message_id)
        if item is None or item.status != "dead":
            return None
        return _view(item, with_body=True)

    async def replay(self, message_id: str) -> dict[str, Any] | None:
        """A dead letter back to pending with the same id and a fresh deadline; None when there is no dead
        letter with this id. Raises OutboxFull or StorageError."""
        now = self.clock()
        ttl = self.config.outbox.ttl
        try:
            item = await self.outbox.replay(message_id, now=now, deadline=now + ttl if ttl else None)
        except KeyError:
            return None
        pipeline = self.pipelines.get(item.device_id)
        if pipeline is not None:
            self.metrics.message(pipeline.protocol, "replayed")
            pipeline.notify()
        return _view(item)

    def _snapshots(self) -> list[Any]:
        """The devices given per-device series: at most ``[metrics] per_device_max`` (see metrics.py)."""
        if self._outbox is None:
            return []
        chosen = self.metrics.states.pick(self.device_ids, self.config.metrics.per_device_max)
        return [_with_last_error(self.pipelines[d]) for d in chosen if d in self.pipelines]

    def _fleet(self) -> Fleet:
        counts: dict[tuple[int | None, str, str], int] = {}
        for pipeline in self.pipelines.values():  # in memory, a few entries per handler
            for key, n in pipeline.handler.metrics().items():
                counts[key] = counts.get(key, 0) + n
        shown = min(len(self.pipelines), max(0, self.config.metrics.per_device_max))
        return Fleet(self.metrics.states.per_state, len(self.pipelines) - shown, counts,
                     self.amqp_pools.connections())

    def page(self, *, limit: int = 1000, after: str | None = None) -> tuple[list[DevicePipeline], str | None]:
        """Devices in id order after ``after`` (exclusive; any string works as a cursor), at most ``limit``;
        and the cursor of the next page (None at the end). O(log n + limit)."""
        start = bisect.bisect_right(self.device_ids, after) if after is not None else 0
        ids = self.device_ids[start:start + limit]
        more = start + limit < len(self.device_ids)
        return [self.pipelines[d] for d in ids if d in self.pipelines], (ids[-1] if more and ids else None)

    def _counts(self) -> dict[str, int]:
        return self._outbox.counts() if self._outbox is not None else {}

    def _storage_view(self) -> tuple[bool, int]:
        if self._outbox is None:
            return False, 0
        return self._outbox.failure is None, self._outbox.file_bytes()


def _with_last_error(pipeline: DevicePipeline) -> DeviceSnapshot:
    """The pipeline's snapshot plus its latest error, for the per-device last-error gauge."""
    snap = pipeline.snapshot()
    err, at = pipeline.last_error, pipeline.last_error_at
    if err is None or err.code is None or at is None:
        return snap
    return dataclasses.replace(snap, last_error=(err.code, err.name, at))


def _accepted(device_id: str, mid: str, existing: OutboxItem | None, deadline: float | None = None) -> dict[str, Any]:
    """The answer to an accepted message: a new one (pending, its ``deadline``) or, when ``existing`` is
    the message already stored under its id, that message's own status and deadline, ``duplicate`` true."""
    if existing is not None:
        return {"id": existing.id, "device_id": device_id, "status": existing.status, "duplicate": True,
                "deadline": rfc3339(existing.deadline)}
    return {"id": mid, "device_id": device_id, "status": "pending", "duplicate": False, "deadline": rfc3339(deadline)}


def _view(item: OutboxItem, *, with_body: bool = False) -> dict[str, Any]:
    data = item.to_dict(with_body=with_body)
    data["name"] = lookup(item.code).name if item.code is not None else None
    for key in ("accepted_at", "deadline", "done_at"):
        data[key] = rfc3339(data[key])
    if with_body:
        data["properties"], system = split_system(item.properties)
        data["system_properties"] = system
    return data


# -- the process -----------------------------------------------------------------------------------------

def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(config_path: str | None = None, *, port: int | None = None, log_format: str | None = None,
        factories: Mapping[str, TransportFactory] | None = None) -> int:
    """``iothub-gateway run``: returns the exit code (0 after a clean shutdown, 2 bad config, 1 cannot start)."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"iothub-gateway run: {problem}", file=sys.stderr)
        return 2
    if port is not None:
        config = dataclasses.replace(config, api=dataclasses.replace(config.api, port=port))
    if log_format is not None:
        fmt: Literal["text", "json"] = "json" if log_format == "json" else "text"
        config = dataclasses.replace(config, logging=dataclasses.replace(config.logging, format=fmt))
    redactor = Redactor(config.secrets())
    handler = setup_logging(config.logging.format, config.logging.level, redactor,
                            interval=config.logging.error_interval)
    banner = _Banner(handler if config.logging.format == "json" else None)
    try:
        return asyncio.run(_serve(config, redactor, factories, banner))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


class _Banner:
    """The start lines (URLs) go to stderr, beside the logs, so stdout stays free for a program's output.
    With JSON logs each line is a JSON log record (always written, whatever the log level), so the stream
    stays one JSON object per line."""

    def __init__(self, handler: logging.Handler | None = None) -> None:
        self._handler = handler

    def __call__(self, text: str) -> None:
        if self._handler is None:
            print(text, file=sys.stderr, flush=True)
            return
        record = logging.LogRecord("gateway.sidecar", logging.INFO, __file__, 0, "%s", (text,), None)
        self._handler.handle(record)


async def _serve(config: SidecarConfig, redactor: Redactor, factories: Mapping[str, TransportFactory] | None,
                 banner: Callable[[str], None] | None = None) -> int:
    say = banner or _Banner()
    from aiohttp import web

    from gateway.sidecar.app import make_app

    sidecar = Sidecar(config, factories=factories, redactor=redactor)
    app = make_app(sidecar)
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=max(1.0, config.delivery.shutdown_deadline))
    await runner.setup()
    host, want = config.api.host, config.api.port
    site = web.TCPSite(runner, host, want)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        why = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        print(f"iothub-gateway run: cannot listen on {_url(host, want)}: {why}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await sidecar.start()
        except ProtocolUnavailable as exc:
            print(f"iothub-gateway run: {config.source}: {exc}", file=sys.stderr)
            return 2
        except StartError as exc:
            print(f"iothub-gateway run: {exc}", file=sys.stderr)
            return 1
        bound = runner.addresses[0][1] if runner.addresses else want
        upstream = "the bundled emulator" if config.upstream.kind == "emulator" else "IoT Hub"
        say(f"iothub-gateway: API on {_url(host, bound)} (upstream: {upstream}, "
            f"{len(sidecar.pipelines)} device(s), outbox {config.outbox_path()})")
        if sidecar.emulator_admin is not None:
            say(f"iothub-gateway: emulator admin API on {sidecar.emulator_admin.url} "
                f"(iothub-gateway emulator fault add ... --admin {sidecar.emulator_admin.url})")
        log.info("listening on %s; pid %d", _url(host, bound), os.getpid())
        await stop.wait()
        log.info("shutting down: no new messages; in-flight sends get %.0fs", config.delivery.shutdown_deadline)
        sidecar.accepting = False
        sidecar.events.close()
        await site.stop()
        await sidecar.stop()
        log.info("stopped cleanly")
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await sidecar.stop()
        await runner.cleanup()
