"""The half-open proxy used by the heartbeat tests really forwards, really goes silent, really cuts."""

from __future__ import annotations

import asyncio

from tests.peers.proxy import TcpProxy


async def _echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def test_forwards_then_freezes_without_closing_then_cuts() -> None:
    server = await _echo_server()
    port = server.sockets[0].getsockname()[1]
    async with TcpProxy("127.0.0.1", port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"

        assert proxy.freeze() == 1
        writer.write(b"lost")
        await writer.drain()
        read = asyncio.ensure_future(reader.read(4))
        done, _ = await asyncio.wait({read}, timeout=0.3)
        assert not done, "a frozen link must stay silent"
        assert not reader.at_eof(), "a frozen link must not close"

        # a new connection (a reconnect) is forwarded again
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer2.write(b"again")
        assert await reader2.readexactly(5) == b"again"
        assert proxy.accepted == 2

        assert proxy.cut() >= 1
        try:
            tail = await reader2.read(10)
        except ConnectionResetError:
            tail = b""
        assert tail == b""
        read.cancel()
        writer.close()
        writer2.close()
    server.close()
    await server.wait_closed()
