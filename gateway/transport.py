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
from typing import Any, Literal, Protocol, TypeAlias, runtime_checkable

from gateway.codes import code_of
from gateway.errors import IoTHubError, make_error

__all__ = [
    "C2DMessage",
    "DesiredPatch",
    "DeviceOffline",
    "DeviceOnline",
    "Disconnected",
    "GetTwin",
    "Inbound",
    "InvokeMethod",
    "Message",
    "MethodCall",
    "MethodResult",
    "PatchDesired",
    "PatchReported",
    "ReceiveC2D",
    "Request",
    "RespondMethod",
    "SettleC2D",
    "SettleOutcome",
    "Transport",
    "TransportEvent",
    "UnsupportedRequest",
    "check_properties",
]

_ARGUMENT_INVALID = code_of("ArgumentInvalid")


@dataclass(frozen=True, slots=True)
class Message:
    """One telemetry message. ``id`` is stable across resends so the far end can drop duplicates.

    The system properties IoT Hub routes on (``content_type`` and ``content_encoding``: routing on the
    body needs both), ``correlation_id`` and ``creation_time`` (RFC 3339, UTC) are None when not set;
    each transport maps them to its wire (HTTP ``iothub-contenttype`` ..., MQTT ``$.ct`` ..., AMQP
    ``content-type`` ...).
    """

    id: str
    device_id: str
    body: bytes
    properties: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = None
    content_encoding: str | None = None
    correlation_id: str | None = None
    creation_time: str | None = None


def check_properties(message: Message, transport: str) -> None:
    """Refuse application property names the transport would read as its own.

    IoT Hub reserves names starting with ``$`` (``$.mid``, ``$.ct``, ...): on MQTT such a name lands in
    the topic beside ours and overrides the message id consumers de-duplicate on. An empty name is
    refused too. A refusal is ArgumentInvalid (a FAIL code: the message is dead-lettered, never retried).
    """
    for name in message.properties:
        if not isinstance(name, str) or not name or name.startswith("$"):
            raise make_error(_ARGUMENT_INVALID, transport=transport, device_id=message.device_id,
                             message=f"application property name {name!r} is reserved or empty "
                                     "(names starting with '$' belong to IoT Hub)")


# --------------------------------------------------------------------------------------------------
# Requests: one vocabulary across HTTP, MQTT and AMQP. A transport answers the ones its surface has and
# raises UnsupportedRequest (a programming error, never retried) for the others.

SettleOutcome: TypeAlias = Literal["complete", "reject", "abandon"]


class UnsupportedRequest(TypeError):
    """The transport has no such request (a device-side MQTT link cannot invoke a method, say).

    A ``TypeError``: it is a mistake in the calling code, so the handler raises it at once instead of
    classifying and retrying it.
    """


@dataclass(frozen=True, slots=True)
class GetTwin:
    """Read a twin -> its document (dict). ``device_id`` None: this device's own twin."""

    device_id: str | None = None


@dataclass(frozen=True, slots=True)
class PatchReported:
    """Patch this device's reported properties -> the new reported ``$version`` (int) or None if not told."""

    patch: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class PatchDesired:
    """Service side: patch a device's desired properties (``etag``: only if unchanged) -> the twin."""

    device_id: str
    desired: Mapping[str, Any]
    etag: str | None = None


@dataclass(frozen=True, slots=True)
class InvokeMethod:
    """Service side: call a direct method on ``device_id`` -> :class:`MethodResult`."""

    device_id: str
    method_name: str
    payload: Any = None
    response_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class RespondMethod:
    """Device side: answer the method call ``rid`` (from :class:`MethodCall`) -> None once accepted."""

    rid: str
    status: int
    payload: Any = None


@dataclass(frozen=True, slots=True)
class ReceiveC2D:
    """Poll for the next cloud-to-device message (HTTP) -> :class:`C2DMessage` or None."""


@dataclass(frozen=True, slots=True)
class SettleC2D:
    """Complete, reject (dead-letter) or abandon (redeliver) a received C2D message -> None."""

    lock_token: str
    outcome: SettleOutcome = "complete"

    def __post_init__(self) -> None:
        if self.outcome not in ("complete", "reject", "abandon"):
            raise ValueError(f"unknown settle outcome {self.outcome!r}: complete, reject or abandon")

    @classmethod
    def of(cls, message: C2DMessage, outcome: SettleOutcome = "complete") -> SettleC2D:
        return cls(message.lock_token, outcome)


Request: TypeAlias = GetTwin | PatchReported | PatchDesired | InvokeMethod | RespondMethod | ReceiveC2D | SettleC2D


@dataclass(frozen=True, slots=True)
class MethodResult:
    """The device's answer to a direct method: its own status and payload (not a hub error)."""

    status: int
    payload: Any = None


# --------------------------------------------------------------------------------------------------
# Inbound payloads: what ``Inbound.payload`` holds, the same shape whatever the transport.


@dataclass(frozen=True, slots=True)
class C2DMessage:
    """A cloud-to-device message, locked until settled with :class:`SettleC2D` (``lock_token``).

    Over MQTT the hub has no lock: ``lock_token`` is the packet id and settling acknowledges it
    (``complete``); MQTT cannot reject or abandon.
    """

    device_id: str
    lock_token: str
    message_id: str | None
    body: bytes
    properties: Mapping[str, str] = field(default_factory=dict)
    delivery_count: int = 0
    correlation_id: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None


@dataclass(frozen=True, slots=True)
class MethodCall:
    """A direct method call for this device; answer it with :class:`RespondMethod` (``rid``)."""

    name: str
    rid: str
    payload: Any = None


@dataclass(frozen=True, slots=True)
class DesiredPatch:
    """A desired-properties patch pushed by the hub; ``version`` is the desired ``$version``."""

    patch: Mapping[str, Any]
    version: int | None = None


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
    """Anything else the hub pushed: ``"c2d"`` (:class:`C2DMessage`), ``"method"`` (:class:`MethodCall`),
    ``"twin_desired"`` (:class:`DesiredPatch`)."""

    kind: Literal["c2d", "method", "twin_desired"]
    payload: C2DMessage | MethodCall | DesiredPatch
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
        Property names are checked with :func:`check_properties` (plus the transport's own limits).
        """
        ...

    async def request(self, request: Request, *, timeout: float) -> Any:
        """A request/response exchange (see :data:`Request`); the hub's answer.

        Raises :class:`UnsupportedRequest` for a request this transport's surface does not have.
        """
        ...

    def events(self) -> AsyncIterator[TransportEvent]:
        """Inbound events of the current connection, ending with ``Disconnected`` when it drops."""
        ...
