"""The SASL layer that lets uamqp-style clients in: MSSBCBS offered and accepted on the wire, then AMQP
piped to proton; proton clients (ANONYMOUS) and TLS work through it unchanged."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.amqp.emulator import AmqpFront
from gateway.emulator import FaultKind, Hub, Operation
from gateway.emulator.front import FrontConfig
from gateway.emulator.sasl import AMQP_HEADER, SASL_HEADER, frame_descriptor, outcome_frame
from tests.emulator.test_faults_scenarios import _amqp_send
from tests.peers.tls import TlsFiles

STEP = 5.0

pytestmark = pytest.mark.usefixtures("no_amqp_thread_left")


@pytest.fixture
async def shim_front(hub: Hub) -> AsyncIterator[AmqpFront]:
    front = AmqpFront(hub, offer_mssbcbs=True)
    await asyncio.wait_for(front.start(), STEP)
    yield front
    await asyncio.wait_for(front.stop(), STEP * 3)


def sasl_init(mechanism: str) -> bytes:
    body = b"\x00\x53\x41" + bytes([0xC0, 2 + len(mechanism), 1, 0xA3, len(mechanism)]) + mechanism.encode()
    return struct.pack(">IBBH", 8 + len(body), 2, 1, 0) + body


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(4)
    return head + await reader.readexactly(struct.unpack(">I", head)[0] - 4)


async def test_mssbcbs_is_offered_and_accepted_then_amqp_reaches_proton(shim_front: AmqpFront) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", shim_front.port)
    try:
        async with asyncio.timeout(STEP):
            writer.write(SASL_HEADER)
            assert await reader.readexactly(8) == SASL_HEADER
            mechanisms = await read_frame(reader)
            assert frame_descriptor(mechanisms) == 0x40 and b"MSSBCBS" in mechanisms and b"ANONYMOUS" in mechanisms
            writer.write(sasl_init("MSSBCBS"))
            assert await read_frame(reader) == outcome_frame(0)
            writer.write(AMQP_HEADER)
            assert await reader.readexactly(8) == AMQP_HEADER  # proton answered through the pipe
    finally:
        writer.close()


async def test_a_proton_client_and_a_stall_work_through_the_shim(hub: Hub, shim_front: AmqpFront) -> None:
    assert await asyncio.to_thread(_amqp_send, shim_front.port, hub, b"x", STEP) == "accepted"
    assert len(hub.received) == 1
    hub.plan.add(Operation.TELEMETRY, kind=FaultKind.STALL, device="d1")
    assert await asyncio.to_thread(_amqp_send, shim_front.port, hub, b"y", 0.5) == "timeout"
    assert shim_front.stalled() == ["d1"] and len(hub.received) == 1


async def test_tls_is_terminated_by_the_shim(hub: Hub, tls_files: TlsFiles) -> None:
    front = AmqpFront(hub, FrontConfig(ssl_context=tls_files.server_context()), offer_mssbcbs=True)
    await asyncio.wait_for(front.start(), STEP)
    try:
        assert front.tls
        reader, writer = await asyncio.open_connection("127.0.0.1", front.port, ssl=tls_files.client_context(),
                                                       server_hostname="localhost")
        try:
            writer.write(SASL_HEADER)
            assert await asyncio.wait_for(reader.readexactly(8), STEP) == SASL_HEADER
        finally:
            writer.close()
    finally:
        await asyncio.wait_for(front.stop(), STEP * 3)


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=64))
def test_hostile_bytes_never_hang_or_crash_the_shim(data: bytes) -> None:
    async def run() -> None:
        from gateway.emulator.sasl import SaslShim

        shim = SaslShim(backend_port=1)  # nothing listens there: a client that gets that far is closed
        await shim.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", shim.port)
            writer.write(SASL_HEADER + data)
            writer.write_eof()
            async with asyncio.timeout(STEP):  # the shim answers or closes; it never waits for ever
                await reader.read()
            writer.close()
        finally:
            await shim.stop()

    asyncio.run(run())
