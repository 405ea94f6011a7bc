"""1,000 AMQP devices through the sidecar on ONE shared connection to the emulator over TLS: every posted
message delivered, one connection and one proton thread, the device list and the metrics read from memory."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from adapters.amqp.emulator import AmqpFront
from gateway.emulator import Hub
from gateway.sidecar.app import make_app
from gateway.sidecar.config import parse_config
from gateway.sidecar.service import Sidecar
from tests.peers.emulator import tls_amqp_front

N = 1000
STEP = 5.0


@pytest.fixture
def hub() -> Hub:
    h = Hub("fleet.azure-devices.net")
    for i in range(N):
        h.add_device(f"leaf-{i:04}")
    return h


@pytest.fixture
async def front(hub: Hub, tls_files: Any) -> AsyncIterator[AmqpFront]:
    async with tls_amqp_front(hub, tls_files) as f:
        yield f


def _threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("amqp-") and t.name != "amqp-front")


async def test_a_thousand_amqp_devices_share_one_tls_connection_and_deliver_everything(
        hub: Hub, front: AmqpFront, tls_files: Any, tmp_path: Path) -> None:
    # The fleet as a JSON Lines file; the secrets inline in it (a file only this user reads).
    lines = [json.dumps({"id": d.device_id, "connection_string": hub.connection_string(d.device_id)})
             for d in hub.devices()]
    (tmp_path / "devices.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "devices.jsonl").chmod(0o600)
    cfg = parse_config({
        "upstream": {"kind": "iothub", "host": "localhost", "ca_file": str(tls_files.ca_pem),
                     "ports": {"amqp": front.port}},
        "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
        "delivery": {"shutdown_deadline": 1.0},
        "devices": {"file": "devices.jsonl", "protocol": "amqp"},
    }, source="test", base=tmp_path, env={})
    before = _threads()
    sidecar = Sidecar(cfg)
    await sidecar.start()
    client: TestClient[Any, Any] = TestClient(TestServer(make_app(sidecar)))
    await client.start_server()
    try:
        async with asyncio.timeout(180):
            while sidecar.metrics.states.per_state.get(("amqp", "connected")) != N:
                await asyncio.sleep(0.1)
        assert front.connections() == 1  # the emulator sees one connection for 1,000 devices
        assert sidecar.amqp_pools.connections() == {f"localhost:{front.port}": [N]}
        assert [t for t in _threads() if t not in before] == ["amqp-mux"]  # one thread, not 1,000

        posted: dict[str, str] = {}

        async def post(device: str, n: int) -> None:
            resp = await client.post(f"/v1/devices/{device}/messages", data=json.dumps({"n": n}).encode(),
                                     headers={"iothub-app-seq": str(n)})
            assert resp.status == 202, await resp.text()
            posted[(await resp.json())["id"]] = device

        ids = [f"leaf-{i:04}" for i in range(N)]
        for start in range(0, N, 100):  # a message for every device, and a second for every third one
            await asyncio.gather(*(post(d, 1) for d in ids[start:start + 100]))
        await asyncio.gather(*(post(d, 2) for d in ids[::3]))
        async with asyncio.timeout(180):
            while sidecar.outbox.counts()["delivered"] < len(posted):
                await asyncio.sleep(0.1)
        counts = sidecar.outbox.counts()
        assert counts["pending"] == counts["inflight"] == counts["dead"] == 0
        arrived = {(r.message_id, r.device_id) for r in hub.received}
        assert set(posted.items()) <= arrived  # each on its own device's identity
        assert front.connections() == 1

        page = await (await client.get("/v1/devices?limit=2")).json()
        assert page["total"] == N and page["next"] == "leaf-0001"
        assert [(d["id"], d["multiplexed"], d["messages"]["delivered"]) for d in page["devices"]] == [
            ("leaf-0000", True, 2), ("leaf-0001", True, 1)]
        text = await (await client.get("/metrics")).text()
        assert f'iothub_gateway_amqp_connections{{upstream="localhost:{front.port}"}} 1.0' in text
        assert f'iothub_gateway_amqp_multiplexed_devices{{upstream="localhost:{front.port}"}} 1000.0' in text
        assert 'iothub_gateway_devices{state="connected",transport="amqp"} 1000.0' in text
        assert len({m for m in re.findall(r'device="([^"]+)"', text)}) == 100  # capped per-device series

        # The whole device surface over the shared connection.
        hub.send_c2d("leaf-0007", b"to the device")  # C2D arrives over the shared connection
        resp = await client.get("/v1/devices/leaf-0007/c2d")
        assert resp.status == 200
        async with asyncio.timeout(20):
            while True:
                line = (await resp.content.readline()).decode()
                if line.startswith("data:"):
                    assert json.loads(line[5:])["body"] == "to the device"
                    break
        resp.close()
        for path in ("/v1/devices/leaf-0007/twin", "/v1/devices/leaf-0007/methods"):
            resp = await client.get(path)
            assert resp.status == 200, path
            resp.close()
    finally:
        await client.close()
        await sidecar.stop()
    for _ in range(100):
        if front.connections() == 0 and [t for t in _threads() if t not in before] == []:
            break
        await asyncio.sleep(0.05)
    assert front.connections() == 0 and [t for t in _threads() if t not in before] == []
