"""Small pieces the scenarios share: transports for the TLS stage, a state recorder, metric sums."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from adapters.amqp.transport import AmqpTransport
from adapters.http.transport import HttpTransport
from adapters.mqtt.transport import MqttTransport
from gateway.handler import Handler, State, StateChange
from gateway.transport import Message, Transport
from tests.scenarios.conftest import Stage

#: (transport, MQTT protocol): the ways a device talks to the stage
KINDS = {"mqtt311": ("mqtt", 4), "mqtt5": ("mqtt", 5), "amqp": ("amqp", 0), "http": ("http", 0)}


def transport_for(stage: Stage, kind: str, device: str = "d1", *, port: int | None = None,
                  **options: Any) -> Transport:
    """A real transport for ``device`` over TLS to the stage (or to ``port``, e.g. a proxy in front of it)."""
    name, protocol = KINDS[kind]
    cs = stage.hub.connection_string(device)
    target = port if port is not None else stage.port(name)
    if name == "mqtt":
        options.setdefault("subscribe", ())
        return MqttTransport(cs, host="127.0.0.1", port=target, ssl=stage.client_ssl, protocol=protocol, **options)
    if name == "amqp":
        options.setdefault("receive_c2d", False)
        return AmqpTransport.from_connection_string(cs, host="127.0.0.1", port=target, ssl=stage.client_ssl,
                                                    **options)
    return HttpTransport(cs, host="127.0.0.1", port=target, ssl=stage.client_ssl, **options)


class Recorder:
    """Every state change of a handler, for assertions such as "never stopped"."""

    def __init__(self) -> None:
        self.changes: list[StateChange] = []

    def __call__(self, change: StateChange) -> None:
        self.changes.append(change)

    def states(self) -> set[State]:
        return {c.state for c in self.changes}


def outcomes(handler: Handler, outcome: str) -> int:
    """How many times the handler counted ``outcome`` (any code)."""
    return sum(n for (_, _, name), n in handler.metrics().items() if name == outcome)


def messages(device: str, count: int, prefix: str = "m", *,
             poison: Iterable[int] = ()) -> list[Message]:
    bad = set(poison)
    return [Message(f"{prefix}{i}", device, f"body {i}".encode(), {"poison": "1"} if i in bad else {})
            for i in range(count)]


async def until(predicate: Callable[[], bool], timeout: float = 30.0, step: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes (a guard against hangs, not a timing claim)."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(step)
    except TimeoutError:
        return predicate()
    return True
