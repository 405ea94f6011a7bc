"""The small protocol every upstream adapter (HTTP, MQTT, AMQP) implements for the handler.

An adapter knows its wire; the handler knows when to retry. So an adapter never retries, never sleeps
between attempts and never reconnects by itself (paho's ``reconnect_on_failure`` and proton's
``reconnect=`` stay off): it reports every failure as an :class:`~gateway.errors.IoTHubError`, and the
handler decides.

Lifecycle: ``connect()``, then ``events()`` yields inbound traffic until the connection ends; its last
item is a :class:`Disconnected` carrying the classified cause (it simply ends after ``close()``).
``connect()`` may be called again after a disconnect: one transport object lives as long as the handler.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, runtime_checkable

from gateway.errors import IoTHubError

__all__ = [
    "DeviceOffline",
    "DeviceOnline",
    "Disconnected",
    "Inbound",
    "Message",
    "Transport",
    "TransportEvent",
]


@dataclass(frozen=True, slots=True)
class Message:
    """One telemetry message. ``id`` is stable across resends so the far end can drop duplicates."""

    id: str
    device_id: str
    body: bytes
    properties: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection is gone; ``error`` says why (a clean close by us yields no event)."""

    error: IoTHubError


@dataclass(frozen=True, slots=True)
class DeviceOnline:
    """The adapter saw ``device_id`` connected (presence event, an answer from it, ...)."""

    device_id: str


@dataclass(frozen=True, slots=True)
class DeviceOffline:
    """The adapter saw ``device_id`` go away."""

    device_id: str


@dataclass(frozen=True, slots=True)
class Inbound:
    """Anything else the hub pushed: a cloud-to-device message, a method call, a desired-property patch."""

    kind: str
    payload: Any
    device_id: str | None = None


TransportEvent: TypeAlias = Disconnected | DeviceOnline | DeviceOffline | Inbound


@runtime_checkable
class Transport(Protocol):
    """One upstream connection. Every failure is raised (or reported) as an ``IoTHubError``."""

    #: "http", "mqtt" or "amqp": the label under which the handler counts this transport's events.
    name: str

    async def connect(self) -> None:
        """Open the connection (TLS, auth, links/subscriptions). Raises IoTHubError on failure."""
        ...

    async def close(self) -> None:
        """Close the connection if open. Idempotent; never raises for an already closed connection."""
        ...

    async def send(self, message: Message) -> None:
        """Send telemetry and return once the hub acknowledged it.

        Raise ``NotConnected`` (503904) only when nothing went out; any failure after the message may
        have been written (a drop, a timeout) is taken as "outcome unknown" and resent with the same id.
        """
        ...

    async def request(self, kind: str, payload: Any, *, timeout: float) -> Any:
        """A request/response exchange (twin get or patch, method invocation); the hub's answer."""
        ...

    def events(self) -> AsyncIterator[TransportEvent]:
        """Inbound events of the current connection, ending with ``Disconnected`` when it drops."""
        ...
