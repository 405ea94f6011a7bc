"""The bundled emulator as the sidecar's default upstream: one :class:`~gateway.emulator.Hub`, and the
HTTP, MQTT and AMQP fronts started in-process on loopback (plain TCP, free ports).

Each front is imported lazily from ``adapters.<t>.emulator``; a front that is missing from the build is
skipped, and only a device that needs it makes the start fail (with a clear message).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping

from gateway.emulator import FaultPlan, Hub
from gateway.emulator.front import Front, FrontConfig, load_front
from gateway.sas import ConnectionString

__all__ = ["EmulatorHarness", "load_front"]

log = logging.getLogger("gateway.sidecar")

class EmulatorHarness:
    """Starts and stops the emulated hub's fronts; registers the sidecar's devices with the hub."""

    def __init__(self, host_name: str = "emulator.azure-devices.net", *, ports: Mapping[str, int] | None = None,
                 plan: FaultPlan | None = None) -> None:
        self.hub = Hub(host_name, plan)
        self.ports = dict(ports or {})
        self.fronts: dict[str, Front] = {}

    @property
    def plan(self) -> FaultPlan:
        return self.hub.plan

    async def start(self, protocols: Iterable[str] = ("http", "mqtt", "amqp")) -> None:
        """Start a front per protocol; raises RuntimeError naming the first that cannot start."""
        for protocol in protocols:
            if protocol in self.fronts:
                continue
            cls = load_front(protocol)
            if cls is None:
                continue
            front: Front = cls(self.hub, FrontConfig("127.0.0.1", self.ports.get(protocol, 0)))
            try:
                await front.start()
            except OSError as exc:
                await self.stop()
                raise RuntimeError(f"cannot start the emulator's {protocol} front on 127.0.0.1:"
                                   f"{self.ports.get(protocol, 0)}: {exc.strerror or exc}") from exc
            self.fronts[protocol] = front
            log.info("emulator %s front on 127.0.0.1:%d", protocol, front.port)

    def available(self, protocol: str) -> bool:
        return protocol in self.fronts

    def register(self, device_id: str) -> ConnectionString:
        """Register a device with the emulated hub; its connection string (the key stays in-process)."""
        self.hub.add_device(device_id)
        return ConnectionString.parse(self.hub.connection_string(device_id))

    def port(self, protocol: str) -> int:
        return self.fronts[protocol].port

    async def stop(self) -> None:
        fronts, self.fronts = self.fronts, {}
        for front in fronts.values():
            with contextlib.suppress(Exception):
                await front.stop()
