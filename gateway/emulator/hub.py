"""The emulated hub's state: registry, who is connected where, what arrived, what waits for devices.

Thread-safe (the AMQP front runs in proton's thread). The fronts own the wire; this owns the facts
that several fronts must agree on, e.g. a direct method call over HTTP fails with DeviceNotOnline
unless the device is connected over MQTT or AMQP.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.emulator.faults import FaultPlan
from gateway.sas import make_sas_token, verify_sas_token

__all__ = ["DesiredListener", "Device", "Hub", "Received"]

log = logging.getLogger(__name__)


@dataclass
class Device:
    device_id: str
    key: str  #: base64 symmetric key
    enabled: bool = True
    twin_desired: dict[str, Any] = field(default_factory=dict)
    twin_reported: dict[str, Any] = field(default_factory=dict)
    twin_version: int = 1
    c2d: deque[tuple[str, bytes]] = field(default_factory=deque)  #: (message id, body)


#: How a front lets the hub call a direct method on a device connected to it: (name, payload, timeout)
#: -> (status, payload). Called on the emulator's event loop; a front that answers from another thread
#: hops threads itself. Raises ``TimeoutError`` when the device does not answer in time.
MethodInvoker = Callable[[str, Any, float], Awaitable[tuple[int, Any]]]

#: How a front hears that the service patched a device's desired properties: (patch, new twin version).
#: Called on whichever thread made the update, so it must be thread-safe: a front hops to its own
#: thread (``loop.call_soon_threadsafe``, the proton front's ``post``) before touching its wire.
DesiredListener = Callable[[dict[str, Any], int], None]


@dataclass(frozen=True)
class Received:
    device_id: str
    message_id: str | None
    body: bytes
    transport: str
    properties: dict[str, str]



class Hub:
    """One emulated IoT Hub, shared by the three fronts."""

    def __init__(self, host_name: str = "emulator.azure-devices.net", plan: FaultPlan | None = None) -> None:
        self.host_name = host_name
        self.plan = plan or FaultPlan()
        self._lock = threading.RLock()
        self._devices: dict[str, Device] = {}
        self._connections: dict[str, tuple[str, object]] = {}  # device -> (transport, session handle)
        self._invokers: dict[str, tuple[object, MethodInvoker]] = {}
        self._kickers: dict[str, tuple[object, Callable[[], None]]] = {}
        self._desired: dict[str, tuple[object, DesiredListener]] = {}
        self.received: list[Received] = []

    # -- registry ---------------------------------------------------------------------------
    def add_device(self, device_id: str, key: str | None = None) -> Device:
        key = key or base64.b64encode(f"emulator-key-{device_id}".encode().ljust(32, b"=")).decode()
        with self._lock:
            device = self._devices.setdefault(device_id, Device(device_id, key))
        return device

    def device(self, device_id: str) -> Device | None:
        with self._lock:
            return self._devices.get(device_id)

    def connection_string(self, device_id: str) -> str:
        device = self.device(device_id) or self.add_device(device_id)
        return f"HostName={self.host_name};DeviceId={device_id};SharedAccessKey={device.key}"

    def token(self, device_id: str, expiry: int) -> str:
        device = self.device(device_id) or self.add_device(device_id)
        return make_sas_token(f"{self.host_name}/devices/{device_id}", device.key, expiry)

    def authenticate(self, device_id: str, token: str | None, now: float) -> str | None:
        """Why this device may not connect with this token, or None when it may.

        Answers: ``"unknown"`` (not registered), ``"disabled"``, ``"malformed"``, ``"mismatch"``,
        ``"expired"``.
        """
        device = self.device(device_id)
        if device is None:
            return "unknown"
        if not device.enabled:
            return "disabled"
        return verify_sas_token(token or "", f"{self.host_name}/devices/{device_id}", device.key, now)

    # -- connections ------------------------------------------------------------------------
    def attach(
        self, device_id: str, transport: str, handle: object, kick: Callable[[], None] | None = None
    ) -> tuple[str, object] | None:
        """Record a new connection for the device; returns the one it takes over, if any.

        IoT Hub allows one connection per identity and closes the older one (400027 / 409002). Each
        front enforces that among its own connections; across transports (a device on MQTT connects
        over AMQP) the hub calls the older connection's ``kick``, which must be thread-safe: it is
        called from whichever thread the new connection's front runs on.
        """
        with self._lock:
            previous = self._connections.get(device_id)
            self._connections[device_id] = (transport, handle)
            old_kick = self._kickers.pop(device_id, None)
            if kick is not None:
                self._kickers[device_id] = (handle, kick)
        if previous is None or previous[1] is handle:
            return None
        if previous[0] != transport and old_kick is not None and old_kick[0] is previous[1]:
            old_kick[1]()
        return previous

    def detach(self, device_id: str, handle: object) -> None:
        with self._lock:
            current = self._connections.get(device_id)
            if current is not None and current[1] is handle:
                del self._connections[device_id]
            invoker = self._invokers.get(device_id)
            if invoker is not None and invoker[0] is handle:
                del self._invokers[device_id]
            kicker = self._kickers.get(device_id)
            if kicker is not None and kicker[0] is handle:
                del self._kickers[device_id]
            desired = self._desired.get(device_id)
            if desired is not None and desired[0] is handle:
                del self._desired[device_id]

    def serve_methods(self, device_id: str, handle: object, invoker: MethodInvoker) -> None:
        """The device on connection ``handle`` subscribed to direct methods."""
        with self._lock:
            self._invokers[device_id] = (handle, invoker)

    def method_invoker(self, device_id: str) -> MethodInvoker | None:
        """How to reach the device for a direct method, or None: IoT Hub then answers DeviceNotOnline."""
        with self._lock:
            entry = self._invokers.get(device_id)
        return entry[1] if entry is not None else None

    def watch_desired(self, device_id: str, handle: object, listener: DesiredListener) -> None:
        """The device on connection ``handle`` subscribed to desired-property patches (one per device)."""
        with self._lock:
            self._desired[device_id] = (handle, listener)

    def watches_desired(self, device_id: str) -> bool:
        """Whether a connected device listens for desired-property patches."""
        with self._lock:
            return device_id in self._desired

    # -- twins ------------------------------------------------------------------------------
    def update_desired(self, device_id: str, patch: dict[str, Any]) -> int:
        """Merge a service patch into the desired properties (null deletes); returns the new version.

        Nested objects merge key by key, as IoT Hub merges twin patches. The subscribed device, if
        any, is told after the lock is released: its listener may hop threads, and a listener that
        fails (its front is stopping) must not fail the service's update. Raises ``KeyError`` for an
        unknown device.
        """
        with self._lock:
            device = self._devices.get(device_id)
            if device is None:
                raise KeyError(device_id)
            _merge(device.twin_desired, patch)
            device.twin_version += 1
            version = device.twin_version
            entry = self._desired.get(device_id)
        if entry is not None:
            try:
                entry[1](_copy(patch), version)
            except Exception:  # the front is gone or going: the twin is updated all the same
                log.warning("desired-property notification for %s failed", device_id, exc_info=True)
        return version

    def twin_properties(self, device_id: str) -> dict[str, Any]:
        """The twin's properties as devices read them: ``{"desired": {...}, "reported": {...}}``, each with
        its ``$version``. Raises ``KeyError`` for an unknown device."""
        with self._lock:
            device = self._devices.get(device_id)
            if device is None:
                raise KeyError(device_id)
            version = device.twin_version
            return {
                "desired": {**_copy(device.twin_desired), "$version": version},
                "reported": {**_copy(device.twin_reported), "$version": version},
            }

    def update_reported(self, device_id: str, patch: dict[str, Any]) -> int:
        """Merge a device's reported-properties patch (null deletes, objects merge); the new version.

        One place for every front, under the hub's lock. Raises ``KeyError`` for an unknown device.
        """
        with self._lock:
            device = self._devices.get(device_id)
            if device is None:
                raise KeyError(device_id)
            _merge(device.twin_reported, patch)
            device.twin_version += 1
            return device.twin_version

    def is_online(self, device_id: str) -> bool:
        with self._lock:
            return device_id in self._connections

    def online(self) -> dict[str, str]:
        with self._lock:
            return {d: t for d, (t, _) in self._connections.items()}

    # -- messages ---------------------------------------------------------------------------
    def record(self, received: Received) -> None:
        with self._lock:
            self.received.append(received)

    def received_ids(self, device_id: str | None = None) -> list[str | None]:
        with self._lock:
            return [r.message_id for r in self.received if device_id in (None, r.device_id)]


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            if not isinstance(target.get(key), dict):
                target[key] = {}
            _merge(target[key], value)
        else:
            target[key] = value


def _copy(value: dict[str, Any]) -> dict[str, Any]:
    """A copy the listener may keep: nested objects are not shared with the stored twin."""
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in value.items()}
