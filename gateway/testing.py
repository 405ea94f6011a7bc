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
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from gateway.clock import FakeClock
from gateway.errors import IoTHubError
from gateway.transport import Disconnected, Message, TransportEvent

__all__ = ["FakeClock", "MemoryTransport"]


class MemoryTransport:
    """A :class:`~gateway.transport.Transport` in memory: connects at once and keeps what it is sent.

    Script failures by overriding the methods, or with ``connect_errors`` / ``send_errors``: errors the
    next calls raise, in order (``None`` means that call succeeds).
    """

    def __init__(self, name: str = "mqtt") -> None:
        self.name = name
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

    async def request(self, kind: str, payload: Any, *, timeout: float) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no {kind!r} requests: override request()")

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
