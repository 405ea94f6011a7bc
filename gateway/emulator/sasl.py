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


#: each AMQP performative's field count (AMQP 1.0 section 2.7), by its small-ulong descriptor
_FIELDS: Final = {0x10: 10, 0x11: 8, 0x12: 14, 0x13: 11, 0x14: 11, 0x15: 6, 0x16: 3, 0x17: 1, 0x18: 1}
_NULL: Final = b"\x40"


def pad_performative(frame: bytes) -> bytes:
    """The frame with its performative's list carried to the full field count (trailing nulls).

    AMQP lets a peer leave trailing null fields out, and proton does; the hub does not, and
    azure-eventhub's pyamqp indexes fields without checking they are there (_pyamqp/_connection.py
    ``_incoming_open`` frame[9], session.py ``_incoming_begin`` frame[7], receiver.py ``_incoming_transfer``
    frame[11] is the payload only when all eleven fields precede it). Anything else passes unchanged.
    """
    if len(frame) < 12 or frame[4] < 2 or frame[5] != 0:  # too short, a bad data offset, or not AMQP
        return frame
    start = frame[4] * 4
    body = frame[start:]
    if len(body) < 4 or body[0] != 0x00 or body[1] != 0x53 or body[2] not in _FIELDS:
        return frame
    full, at = _FIELDS[body[2]], 3
    kind = body[at]
    if kind == 0x45:  # list0
        count, elements, end = 0, b"", at + 1
    elif kind == 0xC0 and len(body) >= at + 3:  # list8: size, count
        size, count = body[at + 1], body[at + 2]
        elements, end = body[at + 3:at + 2 + size], at + 2 + size
    elif kind == 0xD0 and len(body) >= at + 9:  # list32
        size, count = struct.unpack(">II", body[at + 1:at + 9])
        elements, end = body[at + 9:at + 5 + size], at + 5 + size
    else:
        return frame
    if count >= full or end > len(body):
        return frame
    elements += _NULL * (full - count)
    listed = b"\xd0" + struct.pack(">II", len(elements) + 4, full) + elements
    new_body = body[:at] + listed + body[end:]
    header = frame[:start]
    return struct.pack(">I", len(header) + len(new_body)) + header[4:] + new_body


async def _pad_frames(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy proton's AMQP frames to the client, each performative padded (:func:`pad_performative`)."""
    try:
        sink.write(await source.readexactly(8))  # the AMQP header
        while True:
            head = await source.readexactly(4)
            (size,) = struct.unpack(">I", head)
            if size < 8:
                return
            sink.write(pad_performative(head + await source.readexactly(size - 4)))
            await sink.drain()
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            sink.close()


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
            await asyncio.gather(self._pipe(reader, backend), _pad_frames(b_reader, writer))
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
