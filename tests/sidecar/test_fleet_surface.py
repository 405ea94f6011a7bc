"""Which AMQP devices share a connection, and what the device surface answers for them, on the bundled
emulator; the emulator's registry as the device list keeps its keys."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from gateway.emulator import Hub


async def _connected(sidecar: Any, n: int) -> None:
    async with asyncio.timeout(30):
        while sum(v for (_, state), v in sidecar.metrics.states.per_state.items() if state == "connected") < n:
            await asyncio.sleep(0.02)


async def test_a_lone_amqp_device_shares_the_pool_with_the_whole_surface(emulated_sidecar: Any) -> None:
    sidecar, client = await emulated_sidecar({"devices": [{"id": "solo", "protocol": "amqp"}]})
    await _connected(sidecar, 1)
    status = await (await client.get("/v1/devices/solo")).json()
    assert status["multiplexed"] is True  # the default, alone or not
    resp = await client.get("/v1/devices/solo/twin")
    assert resp.status == 200 and "desired" in await resp.json()
    resp = await client.patch("/v1/devices/solo/twin/reported", json={"fleet": 1})
    assert resp.status == 200


async def test_shared_and_own_connections_serve_the_same_device_surface(emulated_sidecar: Any) -> None:
    sidecar, client = await emulated_sidecar({"devices": [
        {"id": "m1", "protocol": "amqp", "multiplex": True},
        {"id": "own", "protocol": "amqp", "multiplex": False},
    ]})
    await _connected(sidecar, 2)
    assert sidecar.pipeline("m1").multiplexed and not sidecar.pipeline("own").multiplexed
    assert sidecar.amqp_pools.connections() and sum(sum(v) for v in sidecar.amqp_pools.connections().values()) == 1
    for device in ("m1", "own"):
        for method, path in [("GET", "twin"), ("PATCH", "twin/reported"), ("GET", "twin/desired"), ("GET", "methods")]:
            resp = await client.request(method, f"/v1/devices/{device}/{path}",
                                        json={"a": 1} if method == "PATCH" else None)
            assert resp.status == 200, (device, path, await resp.text() if resp.status != 200 else "")
            resp.close()
    # the reported patches reached the hub, over the shared connection and over its own
    assert all(sidecar.emulator.hub.twin_properties(d)["reported"]["a"] == 1 for d in ("m1", "own"))
    for device in ("m1", "own"):
        resp = await client.post(f"/v1/devices/{device}/messages", data=b"x")
        assert resp.status == 202
    async with asyncio.timeout(20):
        while sidecar.outbox.counts()["delivered"] < 2:
            await asyncio.sleep(0.02)


async def test_the_emulators_registry_is_the_device_list_with_its_keys(emulated_sidecar: Any,
                                                                         tmp_path: Path) -> None:
    hub = Hub()
    for i in range(5):
        hub.add_device(f"reg-{i}")
    registry = tmp_path / "registry.json"
    hub.save_registry(registry)
    sidecar, client = await emulated_sidecar({"devices": {"registry": str(registry), "protocol": "mqtt"}})
    await _connected(sidecar, 5)
    page = await (await client.get("/v1/devices")).json()
    assert [d["id"] for d in page["devices"]] == [f"reg-{i}" for i in range(5)] and page["total"] == 5
    for i in range(5):
        device, original = sidecar.emulator.hub.device(f"reg-{i}"), hub.device(f"reg-{i}")
        assert device is not None and original is not None and device.key == original.key
