"""The same MQTT 3.1.1 refusals, met through the sidecar: an app POSTs, the sidecar's handler reads the
drops, and the outbox ends every accepted message delivered or dead-lettered with its code.

The sidecar runs in-process on its default upstream, the bundled emulator (plain TCP on loopback: TLS is
proven for the transports in the other scenarios), so the fault plan can be driven while it runs.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.codes import code_of
from gateway.emulator import Operation
from gateway.sidecar.service import Sidecar
from tests.scenarios.kit import until

DEVICE = "demo-mqtt"  # the default config's MQTT 3.1.1 device
FAST = {"throttle": {"initial": 0.05, "cap": 0.2}, "reconnect": {"initial": 0.05, "cap": 0.2},
        "retry": {"initial": 0.05, "cap": 0.2}}


@pytest.fixture
async def sidecar(emulated_sidecar: Any) -> tuple[Sidecar, TestClient[Any, Any]]:
    started: tuple[Sidecar, TestClient[Any, Any]] = await emulated_sidecar({"policy": FAST})
    return started


async def _post(client: TestClient[Any, Any], body: bytes, headers: dict[str, str] | None = None) -> str:
    resp = await client.post(f"/v1/devices/{DEVICE}/messages", data=body, headers=headers or {})
    assert resp.status == 202, await resp.text()
    mid: str = (await resp.json())["id"]
    return mid


def _status(car: Sidecar, mid: str) -> str | None:
    item = car.outbox.get(mid)
    return item.status if item is not None else None


async def test_a_poison_message_is_dead_lettered_with_its_code_and_the_rest_flow(
        sidecar: tuple[Sidecar, TestClient[Any, Any]]) -> None:
    car, client = sidecar
    assert car.emulator is not None
    hub = car.emulator.hub
    hub.plan.add(Operation.TELEMETRY, code_of("ArgumentInvalid"), device=DEVICE, transport="mqtt", times=None,
                 match_property={"poison": "1"})
    ids = [await _post(client, f"m{i}".encode(), {"iothub-app-poison": "1"} if i == 2 else None) for i in range(6)]
    assert await until(lambda: all(_status(car, i) in ("delivered", "dead") for i in ids), timeout=60)
    poison = await (await client.get(f"/v1/messages/{ids[2]}")).json()
    assert poison["status"] == "dead" and poison["code"] == code_of("ArgumentInvalid"), poison
    assert all(_status(car, i) == "delivered" for i in ids if i != ids[2])
    assert set(ids) - {ids[2]} <= set(hub.received_ids(DEVICE))
    device = await (await client.get(f"/v1/devices/{DEVICE}")).json()
    assert device["state"] != "stopped"


async def test_throttling_by_drops_is_ridden_out_and_nothing_is_lost(
        sidecar: tuple[Sidecar, TestClient[Any, Any]]) -> None:
    car, client = sidecar
    assert car.emulator is not None
    hub = car.emulator.hub
    hub.plan.add(Operation.TELEMETRY, code_of("ThrottlingException"), device=DEVICE, transport="mqtt",
                 for_seconds=1.5)
    ids = [await _post(client, f"t{i}".encode()) for i in range(10)]
    assert await until(lambda: all(_status(car, i) == "delivered" for i in ids), timeout=60), \
        [_status(car, i) for i in ids]
    assert set(ids) <= set(hub.received_ids(DEVICE))
    device = await (await client.get(f"/v1/devices/{DEVICE}")).json()
    assert device["state"] == "connected"
