"""The emulated hub's state: registry, who is connected where, what arrived, what waits for devices.

Thread-safe (the AMQP front runs in proton's thread). The fronts own the wire; this owns the facts
that several fronts must agree on, e.g. a direct method call over HTTP fails with DeviceNotOnline
unless the device is connected over MQTT or AMQP.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.emulator.faults import FaultPlan
from gateway.sas import make_sas_token, verify_sas_token

__all__ = ["C2DFeedback", "DesiredListener", "Device", "Hub", "QueuedC2D", "Received", "Settlement"]

#: What a device may do with a locked cloud-to-device message.
Settlement = Literal["complete", "reject", "abandon"]

MAX_RECEIVED = 10_000  #: telemetry kept for reading back (oldest dropped first)
MAX_QUEUE = 50  #: cloud-to-device messages queued per device (IoT Hub's own limit)
MAX_DELIVERY_COUNT = 10  #: IoT Hub's default: past it a message is dead-lettered
MAX_FEEDBACK = 1_000


@dataclass
class QueuedC2D:
    """A cloud-to-device message as the hub keeps it: queued, then locked by one delivery at a time."""

    message_id: str
    body: bytes
    properties: dict[str, str] = field(default_factory=dict)
    correlation_id: str | None = None
    ack: str = "none"  #: the feedback the sender asked for: none, positive, negative, full
    delivery_count: int = 0  #: deliveries so far (the one in hand included)
    lock_token: str | None = None
    locked_until: float = 0.0  #: on the settling front's clock


@dataclass(frozen=True)
class C2DFeedback:
    """One feedback record, as the service's feedback receiver reads it."""

    device_id: str
    message_id: str
    status: str  #: Success, Expired, DeliveryCountExceeded, Rejected, Purged
    description: str
    at: str = ""  #: when the outcome was known (ISO 8601, UTC)


log = logging.getLogger(__name__)


@dataclass
class Device:
    device_id: str
    key: str  #: base64 symmetric key (primary)
    enabled: bool = True
    twin_desired: dict[str, Any] = field(default_factory=dict)
    twin_reported: dict[str, Any] = field(default_factory=dict)
    twin_version: int = 1  #: the whole twin's version: any change counts
    desired_version: int = 1  #: desired properties' ``$version``, counted on its own as IoT Hub does
    reported_version: int = 1  #: reported properties' ``$version``
    secondary_key: str = ""
    tags: dict[str, Any] = field(default_factory=dict)
    etag: str = field(default_factory=lambda: base64.b64encode(uuid.uuid4().bytes[:8]).decode())
    generation_id: str = field(default_factory=lambda: str(uuid.uuid4().int)[:18])
    desired_updated: dict[str, str] = field(default_factory=dict)  #: top-level key -> ISO time of its last change
    reported_updated: dict[str, str] = field(default_factory=dict)
    last_activity: str = "0001-01-01T00:00:00Z"
    status_updated: str = "0001-01-01T00:00:00Z"
    #: queued cloud-to-device messages; a bare ``(message id, body)`` appended here is taken as one too
    c2d: deque[Any] = field(default_factory=deque)
    locked: dict[str, QueuedC2D] = field(default_factory=dict)  #: lock token -> message in a device's hands


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
    enqueued: float = field(default_factory=time.time, compare=False)  #: wall-clock arrival (Event Hub enqueued time)
    #: IoT Hub's system properties as sent, by their MQTT names (``$.ct``, ``$.ce``, ``$.cid``, ``$.ctime``)
    system: dict[str, str] = field(default_factory=dict, compare=False)



class Hub:
    """One emulated IoT Hub, shared by the three fronts."""

    def __init__(self, host_name: str = "emulator.azure-devices.net", plan: FaultPlan | None = None, *,
                 max_delivery_count: int = MAX_DELIVERY_COUNT, service_key: str | None = None,
                 service_policy: str = "iothubowner") -> None:
        self.host_name = host_name
        self.plan = plan or FaultPlan()
        self.max_delivery_count = max_delivery_count
        self.service_policy = service_policy
        self.service_key = service_key or _random_key()  #: the ``iothubowner`` key; random unless given
        self._lock = threading.RLock()
        self._devices: dict[str, Device] = {}
        self._connections: dict[str, tuple[str, object]] = {}  # device -> (transport, session handle)
        self._invokers: dict[str, tuple[object, MethodInvoker]] = {}
        self._kickers: dict[str, tuple[object, Callable[[], None]]] = {}
        self._desired: dict[str, tuple[object, DesiredListener]] = {}
        self._c2d_listeners: dict[str, tuple[object, Callable[[], None]]] = {}
        self.received: list[Received] = []  #: the last telemetry (bounded: the oldest are dropped in chunks)
        self.received_total = 0  #: how many telemetry messages arrived in all (``received`` keeps the last ones)
        self.feedback: deque[C2DFeedback] = deque(maxlen=MAX_FEEDBACK)  #: the history (admin API reads it)
        self._feedback_queue: deque[C2DFeedback] = deque(maxlen=MAX_FEEDBACK)  #: not yet taken by a service
        self.dead_letters: deque[tuple[str, QueuedC2D]] = deque(maxlen=MAX_FEEDBACK)
        self._expired_tokens: deque[str] = deque(maxlen=MAX_FEEDBACK)  # to tell "lock lost" from "never issued"

    # -- registry ---------------------------------------------------------------------------
    def add_device(self, device_id: str, key: str | None = None, *, secondary_key: str | None = None,
                   enabled: bool = True) -> Device:
        """Register a device (or return the one registered); keys are random unless given."""
        with self._lock:
            device = self._devices.get(device_id)
            if device is None:
                device = Device(device_id, key or _random_key(), enabled=enabled,
                                secondary_key=secondary_key or _random_key())
                self._devices[device_id] = device
        return device

    def remove_device(self, device_id: str) -> bool:
        """Delete the identity; its connections stay until they next authenticate (as on IoT Hub)."""
        with self._lock:
            return self._devices.pop(device_id, None) is not None

    def devices(self) -> list[Device]:
        with self._lock:
            return list(self._devices.values())

    def device(self, device_id: str) -> Device | None:
        with self._lock:
            return self._devices.get(device_id)

    def save_registry(self, path: str | os.PathLike[str]) -> None:
        """Write the identities (ids, keys, status) and the service key, so a restart keeps them."""
        with self._lock:
            data = {"service_key": self.service_key,
                    "devices": {d.device_id: {"primaryKey": d.key, "secondaryKey": d.secondary_key,
                                              "status": "enabled" if d.enabled else "disabled"}
                                for d in self._devices.values()}}
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(target)  # never a half-written registry

    def load_registry(self, path: str | os.PathLike[str]) -> None:
        """Read what :meth:`save_registry` wrote (a clear ``ValueError`` when it is not that)."""
        try:
            data = json.loads(Path(path).read_text())
            key = data.get("service_key")
            devices = data["devices"]
            if not isinstance(devices, dict):
                raise TypeError("devices is not a table")
            entries = [(str(i), str(v["primaryKey"]), str(v.get("secondaryKey") or ""), v.get("status", "enabled"))
                       for i, v in devices.items()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: not an emulator registry ({exc})") from None
        with self._lock:
            if isinstance(key, str) and key:
                self.service_key = key
            for device_id, primary, secondary, status in entries:
                device = self.add_device(device_id, primary, secondary_key=secondary or None)
                device.key, device.enabled = primary, status != "disabled"

    @property
    def service_connection_string(self) -> str:
        """The ``iothubowner`` connection string: registry, twins, methods, C2D."""
        return (f"HostName={self.host_name};SharedAccessKeyName={self.service_policy};"
                f"SharedAccessKey={self.service_key}")

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
        why = verify_sas_token(token or "", f"{self.host_name}/devices/{device_id}", device.key, now)
        if why == "mismatch" and device.secondary_key:
            again = verify_sas_token(token or "", f"{self.host_name}/devices/{device_id}", device.secondary_key, now)
            why = why if again == "mismatch" else again
        return why

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
            self._touch(device_id)
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
            listener = self._c2d_listeners.get(device_id)
            if listener is not None and listener[0] is handle:
                del self._c2d_listeners[device_id]

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
            _stamp(device.desired_updated, patch)
            device.twin_version += 1
            device.desired_version += 1
            version = device.desired_version
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
            return {
                "desired": {**_copy(device.twin_desired), "$version": device.desired_version},
                "reported": {**_copy(device.twin_reported), "$version": device.reported_version},
            }

    def service_twin(self, device_id: str) -> dict[str, Any]:
        """The twin as the service reads it (``GET /twins/{id}``): versions, etags, metadata, state.

        Raises ``KeyError`` for an unknown device.
        """
        with self._lock:
            device = self._devices.get(device_id)
            if device is None:
                raise KeyError(device_id)
            desired = {**_copy(device.twin_desired), "$metadata": _metadata(device.desired_updated, True,
                                                                                device.desired_version),
                       "$version": device.desired_version}
            reported = {**_copy(device.twin_reported), "$metadata": _metadata(device.reported_updated, False,
                                                                                  device.reported_version),
                        "$version": device.reported_version}
            return {
                "deviceId": device_id,
                "etag": twin_etag(device.twin_version),
                "deviceEtag": device.etag,
                "version": device.twin_version,
                "status": "enabled" if device.enabled else "disabled",
                "statusUpdateTime": device.status_updated,
                "connectionState": "Connected" if device_id in self._connections else "Disconnected",
                "lastActivityTime": device.last_activity,
                "cloudToDeviceMessageCount": len(device.c2d) + len(device.locked),
                "authenticationType": "sas",
                "x509Thumbprint": {"primaryThumbprint": None, "secondaryThumbprint": None},
                "modelId": "",
                "tags": _copy(device.tags),
                "properties": {"desired": desired, "reported": reported},
                "capabilities": {"iotEdge": False},
            }

    def registry_entry(self, device_id: str) -> dict[str, Any]:
        """The device identity as ``GET /devices/{id}`` answers it. Raises ``KeyError``."""
        with self._lock:
            device = self._devices.get(device_id)
            if device is None:
                raise KeyError(device_id)
            return {
                "deviceId": device_id,
                "generationId": device.generation_id,
                "etag": device.etag,
                "connectionState": "Connected" if device_id in self._connections else "Disconnected",
                "status": "enabled" if device.enabled else "disabled",
                "statusReason": None,
                "connectionStateUpdatedTime": device.last_activity,
                "statusUpdatedTime": device.status_updated,
                "lastActivityTime": device.last_activity,
                "cloudToDeviceMessageCount": len(device.c2d) + len(device.locked),
                "authentication": {
                    "type": "sas",
                    "symmetricKey": {"primaryKey": device.key, "secondaryKey": device.secondary_key},
                    "x509Thumbprint": {"primaryThumbprint": None, "secondaryThumbprint": None},
                },
                "capabilities": {"iotEdge": False},
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
            _stamp(device.reported_updated, patch)
            device.twin_version += 1
            device.reported_version += 1
            self._touch(device_id)
            return device.reported_version

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
            self.received_total += 1
            if len(self.received) > MAX_RECEIVED + MAX_RECEIVED // 10:
                del self.received[: len(self.received) - MAX_RECEIVED]
            self._touch(received.device_id)

    def received_ids(self, device_id: str | None = None) -> list[str | None]:
        with self._lock:
            return [r.message_id for r in self.received if device_id in (None, r.device_id)]

    def received_since(self, index: int = 0, device_id: str | None = None) -> tuple[list[Received], int]:
        """Telemetry after the ``index``-th message ever received (for polling readers) and the next index.

        Messages older than what ``received`` keeps are gone; the reader just skips ahead.
        """
        with self._lock:
            first = self.received_total - len(self.received)
            items = self.received[max(0, index - first):]
            return [r for r in items if device_id in (None, r.device_id)], self.received_total

    def telemetry_from(self, index: int) -> list[tuple[int, Received]]:
        """Telemetry from the ``index``-th message ever received on, each with its index (the Event
        Hub-compatible endpoint's sequence number); what is no longer kept is skipped."""
        with self._lock:
            first = self.received_total - len(self.received)
            start = max(0, index - first)
            return [(first + start + n, r) for n, r in enumerate(self.received[start:])]

    def _touch(self, device_id: str) -> None:
        device = self._devices.get(device_id)
        if device is not None:
            device.last_activity = _iso(time.time())

    # -- cloud-to-device ------------------------------------------------------------------------
    def send_c2d(self, device_id: str, body: bytes, *, message_id: str | None = None,
                 properties: Mapping[str, str] | None = None, correlation_id: str | None = None,
                 ack: str = "none") -> str:
        """Queue a message for the device (a message id is made when none is given); the id.

        Raises ``KeyError`` for an unknown device and ``OverflowError`` when its queue is full
        (IoT Hub's DeviceMaximumQueueDepthExceeded).
        """
        if ack not in ("none", "positive", "negative", "full"):
            raise ValueError(f"ack must be none, positive, negative or full, not {ack!r}")
        entry = QueuedC2D(message_id or str(uuid.uuid4()), bytes(body), dict(properties or {}), correlation_id, ack)
        with self._lock:
            device = self._devices.get(device_id)
            if device is None:
                raise KeyError(device_id)
            if len(device.c2d) + len(device.locked) >= MAX_QUEUE:
                raise OverflowError(f"device {device_id} has {MAX_QUEUE} cloud-to-device messages queued")
            device.c2d.append(entry)
            listener = self._c2d_listeners.get(device_id)
        self._tell(device_id, listener)
        return entry.message_id

    @staticmethod
    def _tell(device_id: str, listener: tuple[object, Callable[[], None]] | None) -> None:
        """Tell the device's front that messages wait (outside the lock: the listener hops threads)."""
        if listener is not None:
            try:
                listener[1]()
            except Exception:  # the front is going: the message stays queued
                log.warning("cloud-to-device notification for %s failed", device_id, exc_info=True)

    def watch_c2d(self, device_id: str, handle: object, listener: Callable[[], None]) -> None:
        """The connection ``handle`` takes the device's C2D messages; ``listener`` (thread-safe) hears of new ones."""
        with self._lock:
            self._c2d_listeners[device_id] = (handle, listener)

    def lock_c2d(self, device_id: str, lock_seconds: float, now: float) -> QueuedC2D | None:
        """The next message for the device, locked until ``now + lock_seconds`` (``math.inf``: until
        settled or given back), or None. Expired locks go back to the queue first."""
        with self._lock:
            device = self._devices.get(device_id)
            if device is None:
                return None
            self._expire_locks(device, now)
            while device.c2d:
                entry = _queued(device.c2d.popleft())
                entry.delivery_count += 1
                entry.lock_token = str(uuid.uuid4())
                entry.locked_until = now + lock_seconds
                device.locked[entry.lock_token] = entry
                return entry
        return None

    def settle_c2d(self, device_id: str, lock_token: str, outcome: Settlement, now: float) -> str | None:
        """Settle a locked message; None on success, else why not: ``"lost"`` (the lock expired or it
        was settled already: DeviceMessageLockLost) or ``"unknown"`` (never issued: PreconditionFailed)."""
        with self._lock:
            device = self._devices.get(device_id)
            if device is None:
                return "unknown"
            self._expire_locks(device, now)
            entry = device.locked.pop(lock_token, None)
            if entry is None:
                return "lost" if lock_token in self._expired_tokens else "unknown"
            if outcome == "complete":
                self._feedback(device_id, entry, "Success")
            elif outcome == "reject":
                self._dead_letter(device_id, entry, "Rejected")
            else:
                self._requeue(device, entry)
        return None

    def release_c2d(self, device_id: str, lock_tokens: Iterable[str]) -> None:
        """Give locked messages back (their delivery went with a closed connection): redelivered later."""
        with self._lock:
            device = self._devices.get(device_id)
            if device is None:
                return
            for token in lock_tokens:
                entry = device.locked.pop(token, None)
                if entry is not None:
                    self._requeue(device, entry)
            listener = self._c2d_listeners.get(device_id)
        self._tell(device_id, listener)

    def lock_valid(self, device_id: str, lock_token: str, now: float) -> bool:
        """Whether the lock is still held at ``now`` (its message not yet given back)."""
        with self._lock:
            device = self._devices.get(device_id)
            entry = device.locked.get(lock_token) if device is not None else None
            return entry is not None and entry.locked_until > now

    def _expire_locks(self, device: Device, now: float) -> None:
        for token, entry in list(device.locked.items()):
            if entry.locked_until <= now:
                del device.locked[token]
                self._expired_tokens.append(token)
                self._requeue(device, entry)

    def _requeue(self, device: Device, entry: QueuedC2D) -> None:
        entry.lock_token = None
        if entry.delivery_count >= self.max_delivery_count:
            self._dead_letter(device.device_id, entry, "DeliveryCountExceeded")
        else:
            device.c2d.appendleft(entry)  # its place at the head of the queue: order is kept

    def _dead_letter(self, device_id: str, entry: QueuedC2D, status: str) -> None:
        self.dead_letters.append((device_id, entry))
        self._feedback(device_id, entry, status)

    def _feedback(self, device_id: str, entry: QueuedC2D, status: str) -> None:
        wanted = {"full": True, "positive": status == "Success", "negative": status != "Success"}.get(entry.ack, False)
        if wanted:
            record = C2DFeedback(device_id, entry.message_id, status, _FEEDBACK_TEXT[status], _iso(time.time()))
            self.feedback.append(record)
            self._feedback_queue.append(record)

    def take_feedback(self, limit: int = 100) -> list[C2DFeedback]:
        """Feedback records not yet handed to a service feedback receiver (taken: they go out once)."""
        with self._lock:
            taken: list[C2DFeedback] = []
            while self._feedback_queue and len(taken) < limit:
                taken.append(self._feedback_queue.popleft())
            return taken

    def return_feedback(self, records: list[C2DFeedback]) -> None:
        """Give back records a receiver abandoned: the next receiver gets them first."""
        with self._lock:
            self._feedback_queue.extendleft(reversed(records))


_FEEDBACK_TEXT = {
    "Success": "Success",
    "Rejected": "Message rejected",
    "DeliveryCountExceeded": "Message delivery count exceeded",
    "Expired": "Message expired",
}


def twin_etag(version: int) -> str:
    """The twin's etag for a version (the HTTP front's ``If-Match`` compares against it)."""
    return f"AAAAAAAAAA{version}="


def _random_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _iso(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e7):07d}Z"


def _queued(item: Any) -> QueuedC2D:
    """A queue entry, whatever its shape: a QueuedC2D, or a bare ``(message id, body)`` tuple."""
    if isinstance(item, QueuedC2D):
        return item
    mid, body = item
    return QueuedC2D(str(mid), body if isinstance(body, bytes) else str(body).encode())


def _stamp(updated: dict[str, str], patch: Mapping[str, Any]) -> None:
    when = _iso(time.time())
    for key, value in patch.items():
        if value is None:
            updated.pop(key, None)
        else:
            updated[key] = when


def _metadata(updated: Mapping[str, str], desired: bool, version: int) -> dict[str, Any]:
    """IoT Hub's ``$metadata``: when the section and each top-level property last changed (desired
    properties also say in which version)."""
    last = max(updated.values(), default="0001-01-01T00:00:00Z")
    meta: dict[str, Any] = {"$lastUpdated": last}
    if desired:
        meta["$lastUpdatedVersion"] = version
    for key, when in updated.items():
        meta[key] = {"$lastUpdated": when, **({"$lastUpdatedVersion": version} if desired else {})}
    return meta


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
