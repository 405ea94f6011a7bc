"""The sidecar process: the outbox, one delivery pipeline per device, the emulator when it is the upstream,
and :func:`run` (``iothub-gateway run``) with its start-up errors and graceful shutdown.

Start-up order: bind the API port first (a port in use fails fast, before anything else starts), then
the emulator (if configured), the transports (a protocol missing from this build is a config error),
the outbox and the pipelines; only then is the URL printed and ``/readyz`` ready. Shutdown (SIGTERM or
SIGINT): stop accepting, let in-flight sends finish for ``delivery.shutdown_deadline`` seconds, put the
rest back to pending, close the handlers and the outbox, exit 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Literal

from gateway.aio import cancel_and_wait
from gateway.codes import lookup
from gateway.handler import State
from gateway.outbox import Outbox
from gateway.sidecar.config import ConfigError, SidecarConfig, load_config
from gateway.sidecar.emulator_harness import EmulatorHarness
from gateway.sidecar.logs import setup_logging
from gateway.sidecar.metrics import Metrics
from gateway.sidecar.security import Redactor
from gateway.sidecar.upstream import (
    DevicePipeline,
    EventHub,
    ProtocolUnavailable,
    TransportFactory,
    TransportSpec,
    build_transport,
)

__all__ = ["Sidecar", "StartError", "UnknownDevice", "run"]

log = logging.getLogger("gateway.sidecar")


class StartError(RuntimeError):
    """The sidecar cannot start (port in use, outbox locked, ...): one line, no traceback."""


class UnknownDevice(KeyError):
    pass


class Sidecar:
    """Everything behind the API. ``factories`` replaces the transport factories (tests)."""

    def __init__(self, config: SidecarConfig, *, factories: Mapping[str, TransportFactory] | None = None,
                 clock: Callable[[], float] = time.time, redactor: Redactor | None = None) -> None:
        self.config = config
        self.factories = factories
        self.clock = clock
        self.redactor = redactor or Redactor(config.secrets())
        self.metrics = Metrics()
        self.events = EventHub()
        self.pipelines: dict[str, DevicePipeline] = {}
        self.emulator: EmulatorHarness | None = None
        self._outbox: Outbox | None = None
        self._lock_file: IO[str] | None = None
        self.accepting = False
        self._stopped = False
        self._sweeper: asyncio.Task[None] | None = None
        self.metrics.watch(self._snapshots, self._counts, [s.value for s in State])

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            raise RuntimeError("the sidecar is not started")
        return self._outbox

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
        specs: dict[str, TransportSpec] = {}
        if cfg.upstream.kind == "emulator":
            self.emulator = EmulatorHarness(cfg.upstream.host_name, ports=cfg.upstream.ports)
            try:
                await self.emulator.start(sorted({d.protocol for d in cfg.devices}))
            except RuntimeError as exc:
                raise StartError(str(exc)) from exc
            for device in cfg.devices:
                if not self.emulator.available(device.protocol) and self.factories is None:
                    raise ProtocolUnavailable(f"protocol {device.protocol!r} is not available in this build "
                                              f"(no emulator front for it); device {device.id!r} needs it")
                port = self.emulator.port(device.protocol) if self.emulator.available(device.protocol) else 0
                cs = self.emulator.register(device.id)
                self.redactor.add(cs.shared_access_key or "", self.emulator.hub.connection_string(device.id))
                specs[device.id] = TransportSpec(device.protocol, cs, "127.0.0.1", port, tls=False,
                                                 mqtt_version=device.mqtt_version)
        else:
            for device in cfg.devices:
                cs = device.parsed()
                host = cfg.upstream.host or cs.gateway_host_name or cs.host_name
                specs[device.id] = TransportSpec(device.protocol, cs, host, cfg.upstream.ports[device.protocol],
                                                 tls=cfg.upstream.tls, ca_file=cfg.upstream.ca_file,
                                                 mqtt_version=device.mqtt_version)
        transports = {device_id: build_transport(spec, self.factories) for device_id, spec in specs.items()}
        self._outbox = self._open_outbox()
        if self._outbox.recovered:
            log.warning("%d message(s) were in flight when the sidecar last stopped; they will be sent again "
                        "(flagged as possible duplicates)", self._outbox.recovered)
        for device in cfg.devices:
            self.pipelines[device.id] = DevicePipeline(
                device.id, device.protocol, transports[device.id], self._outbox, policy=cfg.policy,
                metrics=self.metrics, events=self.events, max_inflight=cfg.delivery.max_inflight, clock=self.clock,
                redact=self.redactor,
            )
        orphans = set(self._outbox.devices_with_pending()) - set(self.pipelines)
        if orphans:
            log.warning("the outbox holds pending messages for devices no longer configured: %s",
                        ", ".join(sorted(orphans))[:500])
        for pipeline in self.pipelines.values():
            await pipeline.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="outbox-sweep")
        self.accepting = True

    def _open_outbox(self) -> Outbox:
        path = self.config.outbox_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = Path(str(path) + ".lock").open("w")  # noqa: SIM115 - held for the process's life
        except OSError as exc:
            raise StartError(f"cannot open the outbox at {path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            lock.close()
            raise StartError(f"the outbox {path} is in use by another process (two sidecars must not share "
                             f"one outbox)") from exc
        self._lock_file = lock
        try:
            return Outbox(str(path), max_messages=self.config.outbox.max_messages,
                          synchronous=self.config.outbox.synchronous)
        except Exception as exc:
            raise StartError(f"cannot open the outbox at {path}: {exc}") from exc

    async def _sweep(self) -> None:
        """Dead-letter pending messages whose deadline passed (those the pipelines never got to)."""
        while True:
            await asyncio.sleep(1.0)
            for mid in self.outbox.expire(now=self.clock()):
                item = self.outbox.get(mid)
                device = item.device_id if item is not None else "?"
                pipeline = self.pipelines.get(device)
                self.metrics.message(pipeline.protocol if pipeline else "unknown", "dead_letter",
                                     item.code if item else None)
                self.events.publish("dead_letter", {"device": device, "id": mid, "code": item.code if item else None,
                                                    "name": lookup(item.code).name if item and item.code else None,
                                                    "reason": "deadline passed before delivery", "at": self.clock()})

    async def stop(self) -> None:
        """Stop accepting, stop the pipelines (within the shutdown deadline), close the outbox."""
        self.accepting = False
        if self._stopped:
            return
        self._stopped = True
        await cancel_and_wait(self._sweeper)
        deadline = self.config.delivery.shutdown_deadline
        results = await asyncio.gather(*(p.stop(deadline) for p in self.pipelines.values()), return_exceptions=True)
        persisted = sum(r for r in results if isinstance(r, int))
        if persisted:
            log.info("%d in-flight message(s) put back to pending; they are sent after the restart", persisted)
        self.events.close()
        if self._outbox is not None:
            self._outbox.close()
            self._outbox = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        if self.emulator is not None:
            await self.emulator.stop()

    # -- what the API calls ----------------------------------------------------------------------------

    def pipeline(self, device_id: str) -> DevicePipeline | None:
        return self.pipelines.get(device_id)

    def accept(self, device_id: str, body: bytes, *, properties: Mapping[str, str] | None = None,
               message_id: str | None = None, ttl: float | None = None) -> dict[str, Any]:
        """Persist one message (durable on return). Raises OutboxFull, UnknownDevice or ValueError."""
        pipeline = self.pipelines.get(device_id)
        if pipeline is None:
            raise UnknownDevice(device_id)
        now = self.clock()
        ttl = ttl if ttl is not None else (self.config.outbox.ttl or None)
        deadline = now + ttl if ttl else None
        duplicate = False
        if message_id is not None and (existing := self.outbox.get(message_id)) is not None:
            if existing.device_id != device_id:
                raise ValueError(f"message id {message_id!r} is already used by another device's message")
            mid, duplicate, deadline = existing.id, True, existing.deadline
        else:
            mid = self.outbox.put(device_id, body, now=now, properties=properties, deadline=deadline,
                                  message_id=message_id)
            self.metrics.message(pipeline.protocol, "accepted")
            pipeline.notify()
        return {"id": mid, "device_id": device_id, "status": "pending" if not duplicate else "duplicate",
                "duplicate": duplicate, "deadline": deadline}

    def message(self, message_id: str) -> dict[str, Any] | None:
        item = self.outbox.get(message_id)
        if item is None:
            return None
        data = item.to_dict()
        data["name"] = lookup(item.code).name if item.code is not None else None
        return data

    def dead_letters(self, *, limit: int = 100, device_id: str | None = None) -> list[dict[str, Any]]:
        out = []
        for item in self.outbox.dead_letters(limit=limit, device_id=device_id):
            data = item.to_dict()
            data["name"] = lookup(item.code).name if item.code is not None else None
            out.append(data)
        return out

    def _snapshots(self) -> list[Any]:
        if self._outbox is None:
            return []
        return [p.snapshot() for p in self.pipelines.values()]

    def _counts(self) -> dict[str, int]:
        return self._outbox.counts() if self._outbox is not None else {}


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
    setup_logging(config.logging.format, config.logging.level, redactor, interval=config.logging.error_interval)
    try:
        return asyncio.run(_serve(config, redactor, factories))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


async def _serve(config: SidecarConfig, redactor: Redactor, factories: Mapping[str, TransportFactory] | None) -> int:
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
        print(f"iothub-gateway: API on {_url(host, bound)} (upstream: {upstream}, "
              f"{len(sidecar.pipelines)} device(s), outbox {config.outbox_path()})", flush=True)
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
