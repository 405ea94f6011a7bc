"""A loopback TCP proxy that can play a half-open link: the peer goes silent but keeps the socket.

Real links go half-open (a NAT forgets the flow, a cellular modem sleeps, the hub's front end hangs):
nothing is closed, nothing arrives. Only a heartbeat (MQTT keep-alive, AMQP idle timeout) or an
operation timeout can tell. The proxy sits between a client and any real peer on 127.0.0.1 and forwards
bytes untouched (TLS passes through end to end), until the test calls :meth:`TcpProxy.freeze`: from then
on it reads nothing and writes nothing on the connections open at that moment, while their sockets stay
open. New connections made after a freeze are forwarded normally, as after a real reconnect.

    async with TcpProxy("127.0.0.1", broker_port) as proxy:
        client = connect_to("127.0.0.1", proxy.port)
        proxy.freeze()      # half-open: the client must notice by itself
        proxy.cut()         # or: reset every open connection at once
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

__all__ = ["TcpProxy", "tcp_proxy"]


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    frozen: bool = False


class TcpProxy:
    """Forward 127.0.0.1:``port`` to ``(host, target_port)``; freeze or cut the open connections on demand."""

    def __init__(self, host: str, target_port: int) -> None:
        self.host = host
        self.target_port = target_port
        self.port = 0
        self.accepted = 0  #: connections accepted so far (a reconnect shows here)
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def open_connections(self) -> int:
        return sum(1 for p in self._pairs if not p.client.is_closing())

    def freeze(self) -> int:
        """Stop forwarding on every open connection, keeping the sockets open. Returns how many."""
        count = 0
        for pair in self._pairs:
            if not pair.frozen:
                pair.frozen = True
                for task in pair.pumps:
                    task.cancel()  # no more reads: the kernel buffers fill, nothing is closed
                count += 1
        return count

    def cut(self) -> int:
        """Reset every open connection (RST where the platform allows). Returns how many."""
        count = 0
        for pair in list(self._pairs):
            for writer in (pair.client, pair.upstream):
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                writer.transport.abort()
            for task in pair.pumps:
                task.cancel()
            self._pairs.discard(pair)
            count += 1
        return count

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for pair in list(self._pairs):
            for writer in (pair.client, pair.upstream):
                writer.transport.abort()
        self._pairs.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = _Pair(writer, up_writer)
        self._pairs.add(pair)
        pair.pumps = [self._spawn(self._pump(reader, up_writer, pair)),
                      self._spawn(self._pump(up_reader, writer, pair))]

    def _spawn(self, coro: object) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, pair: _Pair) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            if pair.frozen:
                return  # frozen: leave both sockets open and silent
            raise
        if not pair.frozen:  # one side closed: close the other, as a real middlebox would
            for writer in (pair.client, pair.upstream):
                writer.close()
            self._pairs.discard(pair)


@pytest.fixture
async def tcp_proxy() -> AsyncIterator[Callable[[str, int], asyncio.Future[TcpProxy]]]:
    """A factory: ``proxy = await tcp_proxy("127.0.0.1", port)``; every proxy is closed after the test."""
    proxies: list[TcpProxy] = []

    def make(host: str, port: int) -> asyncio.Future[TcpProxy]:
        proxy = TcpProxy(host, port)
        proxies.append(proxy)
        return asyncio.ensure_future(proxy.start())

    yield make
    for proxy in proxies:
        await proxy.close()
