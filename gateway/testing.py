"""Helpers for testing code built on the gateway: an in-memory transport and the fake clock.

With them a test drives the real :class:`~gateway.handler.Handler` and policy through outages,
throttling or takeovers without a socket and without sleeping::

    clock = FakeClock()
    transport = MemoryTransport()
    async with Handler(transport, clock=clock) as handler:
        transport.drop(make_error(code_of("DeviceConnectionClosedRemotely"), transport="mqtt"))
        await clock.advance(60)            # the handler's backoff runs in virtual time

Subclass :class:`MemoryTransport` and override ``connect``, ``send`` or ``request`` to script the peer;
the event stream (``events``, ``drop``, ``emit``) is the part every fake needs and gets right here.
``ambiguous_drops`` (settable) makes it look like MQTT 3.1.1 to the handler; with a ``clock`` and a
``token_lifetime`` each connect sets ``credential_expiry`` (epoch) as a SAS-token transport does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from gateway.clock import Clock, FakeClock
from gateway.errors import IoTHubError
from gateway.transport import Disconnected, Message, Request, TransportEvent, UnsupportedRequest

__all__ = ["FakeClock", "MemoryTransport"]


class MemoryTransport:
    """A :class:`~gateway.transport.Transport` in memory: connects at once and keeps what it is sent.

    Script failures by overriding the methods, or with ``connect_errors`` / ``send_errors``: errors the
    next calls raise, in order (``None`` means that call succeeds).
    """

    def __init__(self, name: str = "mqtt", *, ambiguous_drops: bool = False, clock: Clock | None = None,
                 token_lifetime: float | None = None) -> None:
        self.name = name
        self.ambiguous_drops = ambiguous_drops
        self.credential_expiry: float | None = None  #: epoch seconds; set at each connect with a token_lifetime
        self.clock = clock
        self.token_lifetime = token_lifetime
        self.connected = False
        self.connects = 0
        self.sent: list[Message] = []
        self.connect_errors: list[IoTHubError | None] = []
        self.send_errors: list[IoTHubError | None] = []
        self._queue: asyncio.Queue[TransportEvent | None] = asyncio.Queue()

    async def connect(self) -> None:
        if self.connect_errors:
            err = self.connect_errors.pop(0)
            if err is not None:
                raise err
        self.connects += 1
        self.connected = True
        if self.clock is not None and self.token_lifetime is not None:
            self.credential_expiry = self.clock.wall() + self.token_lifetime
        self._queue = asyncio.Queue()  # a fresh stream per connection

    async def close(self) -> None:
        self.connected = False
        self._queue.put_nowait(None)

    async def send(self, message: Message) -> None:
        if self.send_errors:
            err = self.send_errors.pop(0)
            if err is not None:
                raise err
        self.sent.append(message)

    async def request(self, request: Request, *, timeout: float) -> Any:
        """No request is scripted by default: override to answer the ones a test needs."""
        raise UnsupportedRequest(f"{type(self).__name__} has no {type(request).__name__} requests: override request()")

    async def events(self) -> AsyncIterator[TransportEvent]:
        queue = self._queue
        while True:
            event = await queue.get()
            if event is None:  # closed by us: the stream just ends
                return
            yield event
            if isinstance(event, Disconnected):
                return

    def drop(self, error: IoTHubError) -> None:
        """The peer went away: the current stream ends with ``Disconnected(error)``."""
        self.connected = False
        self._queue.put_nowait(Disconnected(error))

    def emit(self, event: TransportEvent) -> None:
        """Push an inbound event (a C2D message, a method call, a presence change) to the stream."""
        self._queue.put_nowait(event)
