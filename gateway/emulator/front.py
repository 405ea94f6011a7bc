"""What every emulator front (HTTP, MQTT, AMQP) offers, so a harness can start and stop them alike."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Front", "FrontConfig"]


@dataclass(frozen=True)
class FrontConfig:
    """Where a front listens. ``port=0`` picks a free port; IoT Hub's own are 443, 8883 and 5671 (TLS)."""

    host: str = "127.0.0.1"
    port: int = 0
    ssl_context: ssl.SSLContext | None = None  #: server-side TLS; None for plain TCP on loopback


@runtime_checkable
class Front(Protocol):
    """One transport's face of the emulated hub, serving a shared :class:`~gateway.emulator.Hub`."""

    transport: str  #: "http", "mqtt" or "amqp"

    @property
    def port(self) -> int:
        """The bound port (valid after ``start``)."""
        ...

    async def start(self) -> None:
        """Bind and serve; returns once the port accepts connections."""
        ...

    async def stop(self) -> None:
        """Close every connection and the listener; idempotent."""
        ...

    async def drop_all(self) -> None:
        """Close every client connection abruptly (no protocol goodbye): an outage as clients see it."""
        ...
