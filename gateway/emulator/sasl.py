"""A SASL layer in front of the emulator's AMQP listener, so clients that insist on ``MSSBCBS`` connect.

Azure's AMQP stack (uamqp, under ``azure-iot-hub``'s C2D and ``azure-eventhub``) asks for the
``MSSBCBS`` mechanism and authenticates afterwards on ``$cbs``; proton's built-in SASL (without Cyrus)
cannot offer it. This shim terminates TLS, plays the SASL exchange itself (offering ``MSSBCBS``,
``ANONYMOUS`` and ``PLAIN``, accepting each: identity is proven by the CBS put-token that follows, as on
IoT Hub) and then pipes the AMQP bytes to proton on a loopback port, which takes an AMQP header
without SASL. A client that skips SASL is piped straight through.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from typing import Final

__all__ = ["MECHANISMS", "SaslShim"]

MECHANISMS: Final = ("MSSBCBS", "ANONYMOUS", "PLAIN")
SASL_HEADER: Final = b"AMQP\x03\x01\x00\x00"
AMQP_HEADER: Final = b"AMQP\x00\x01\x00\x00"
_MAX_FRAME: Final = 64 * 1024
_SASL_INIT: Final = 0x41
_HANDSHAKE_TIMEOUT: Final = 30.0  # IoT Hub gives a client this long between TLS and its first frame
_CHUNK: Final = 65536


def _frame(body: bytes) -> bytes:
    """A SASL frame: size, data offset 2, type 1 (SASL), channel 0."""
    return struct.pack(">IBBH", 8 + len(body), 2, 1, 0) + body


def mechanisms_frame(mechanisms: tuple[str, ...] = MECHANISMS) -> bytes:
    """``sasl-mechanisms`` (descriptor 0x40) with a symbol array: one list field."""
    elements = b"".join(bytes([len(m)]) + m.encode("ascii") for m in mechanisms)
    array = bytes([0xE0, 2 + len(elements), len(mechanisms), 0xA3]) + elements
    return _frame(b"\x00\x53\x40" + bytes([0xC0, 1 + len(array), 1]) + array)


def outcome_frame(code: int = 0) -> bytes:
    """``sasl-outcome`` (descriptor 0x44) with ``code`` (0: ok)."""
    return _frame(b"\x00\x53\x44" + bytes([0xC0, 3, 1, 0x50, code]))


def frame_descriptor(frame: bytes) -> int | None:
    """The small-ulong descriptor of a SASL frame's body, or None when it is not one."""
    if len(frame) < 11:
        return None
    offset = frame[4] * 4
    body = frame[offset:]
    if len(body) >= 3 and body[0] == 0x00 and body[1] == 0x53:
        return body[2]
    return None


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(4)
    (size,) = struct.unpack(">I", head)
    if not 8 <= size <= _MAX_FRAME:
        raise ValueError(f"SASL frame of {size} bytes")
    return head + await reader.readexactly(size - 4)


class SaslShim:
    """Listens on ``host:port`` (TLS with ``ssl_context``), speaks SASL, pipes AMQP to the backend."""

    def __init__(self, backend_port: int, host: str = "127.0.0.1", port: int = 0,
                 ssl_context: ssl.SSLContext | None = None, mechanisms: tuple[str, ...] = MECHANISMS) -> None:
        self.backend_port = backend_port
        self.host = host
        self._want = port
        self.ssl_context = ssl_context
        self.mechanisms = mechanisms
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self._want, ssl=self.ssl_context)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self.abort_all()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)

    def abort_all(self) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        backend: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(_HANDSHAKE_TIMEOUT):
                header = await reader.readexactly(8)
                if header == SASL_HEADER:
                    writer.write(SASL_HEADER + mechanisms_frame(self.mechanisms))
                    init = await _read_frame(reader)
                    ok = frame_descriptor(init) == _SASL_INIT
                    writer.write(outcome_frame(0 if ok else 2))  # 2: sys (a malformed exchange)
                    await writer.drain()
                    if not ok:
                        return
                    header = await reader.readexactly(8)
                if header != AMQP_HEADER:
                    writer.write(AMQP_HEADER)  # the version we speak, then goodbye (AMQP 1.0 section 2.2)
                    return
                b_reader, backend = await asyncio.open_connection("127.0.0.1", self.backend_port)
            backend.write(header)
            await asyncio.gather(self._pipe(reader, backend), self._pipe(b_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError, TimeoutError):
            pass
        finally:
            self._writers.discard(writer)
            for end in (writer, backend):
                if end is not None:
                    with contextlib.suppress(Exception):
                        end.close()

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Copy until the source ends, then end the sink: a close on one side reaches the other."""
        try:
            while data := await source.read(_CHUNK):
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                sink.close()
