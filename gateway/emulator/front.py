"""What every emulator front (HTTP, MQTT, AMQP) offers, so a harness can start and stop them alike."""

from __future__ import annotations

import importlib
import ssl
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = ["FRONT_CLASSES", "Front", "FrontConfig", "load_front"]

#: Where each transport's front lives: ``adapters.<protocol>.emulator.<class>``.
FRONT_CLASSES = {"http": "HttpFront", "mqtt": "MqttFront", "amqp": "AmqpFront"}


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


def load_front(protocol: str) -> type[Any] | None:
    """The front class for ``protocol``, or None when this build has none (imported on first use)."""
    try:
        module = importlib.import_module(f"adapters.{protocol}.emulator")
    except ImportError:
        return None
    cls = getattr(module, FRONT_CLASSES[protocol], None)
    return cls if isinstance(cls, type) else None
