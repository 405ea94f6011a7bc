"""MQTT and AMQP over WebSockets on the HTTP(S) front's ``/$iothub/websocket`` (IoT Hub's port-443 path):
frames are piped to the MQTT / AMQP fronts, which answer as on their own ports."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import pytest

from adapters.mqtt.codec import MQTT_311, ConnAck, Connect, Decoder, PubAck, Publish, encode
from gateway.emulator import Hub
from gateway.emulator.sasl import SASL_HEADER
from gateway.emulator.serve import start_fronts
from tests.peers.tls import TlsFiles

STEP = 5.0
FOREVER = 4_000_000_000

pytestmark = pytest.mark.usefixtures("no_amqp_thread_left")


async def _mqtt_over_ws(url: str, hub: Hub, ssl: Any = None) -> tuple[int, int]:
    """CONNECT and one QoS 1 publish over the WebSocket; (CONNACK return code, PUBACK packet id)."""
    decoder = Decoder(MQTT_311)
    got: list[Any] = []
    async with aiohttp.ClientSession() as session, session.ws_connect(
            f"{url}/$iothub/websocket?iothub-no-client-cert=true", protocols=("mqtt",), ssl=ssl) as ws:
        assert ws.protocol == "mqtt"
        await ws.send_bytes(encode(Connect("d1", MQTT_311, f"{hub.host_name}/d1/", hub.token("d1", FOREVER).encode()),
                                   MQTT_311))
        await ws.send_bytes(encode(Publish("devices/d1/messages/events/$.mid=ws-1", b"x", 1, 7), MQTT_311))
        async with asyncio.timeout(STEP):
            while len(got) < 2:
                msg = await ws.receive()
                assert msg.type is aiohttp.WSMsgType.BINARY, msg
                got.extend(decoder.feed(msg.data))
    connack = next(p for p in got if isinstance(p, ConnAck))
    puback = next(p for p in got if isinstance(p, PubAck))
    return connack.reason_code, puback.packet_id


async def test_mqtt_and_amqp_over_websockets_through_the_https_front(hub: Hub, tls_files: TlsFiles) -> None:
    fronts = await start_fronts(hub, cert_file=str(tls_files.cert_pem), key_file=str(tls_files.key_pem))
    try:
        http: Any = fronts["http"]
        url = f"https://localhost:{http.port}"
        ctx = tls_files.client_context()
        assert await _mqtt_over_ws(url, hub, ctx) == (0, 7)
        assert hub.received_ids() == ["ws-1"]
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"{url}/$iothub/websocket", protocols=("AMQPWSB10",), ssl=ctx) as ws:
            await ws.send_bytes(SASL_HEADER)
            data = b""
            async with asyncio.timeout(STEP):
                while b"MSSBCBS" not in data:
                    msg = await ws.receive()
                    assert msg.type is aiohttp.WSMsgType.BINARY, msg
                    data += msg.data
            assert data.startswith(SASL_HEADER)
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"{url}/$iothub/websocket", protocols=("chat",), ssl=ctx) as ws:
            closed = await asyncio.wait_for(ws.receive(), STEP)
            assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)  # no such subprotocol
    finally:
        for front in fronts.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(front.stop(), STEP * 3)
