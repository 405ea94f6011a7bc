"""The sidecar on its default upstream, the bundled emulator in-process: faults injected through the
emulator's fault plan come back through the real HTTP, MQTT and AMQP wires as codes the API reports."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.codes import code_of
from gateway.emulator import Operation
from gateway.sidecar.service import Sidecar

DEVICES = {"mqtt": "demo-mqtt", "amqp": "demo-amqp", "http": "demo-http"}


@pytest.fixture
async def emulated(emulated_sidecar: Any) -> Any:
    return await emulated_sidecar({"policy": {"throttle": {"initial": 0.05, "cap": 0.1}}})


async def _settled(sidecar: Sidecar, mid: str, timeout: float = 20.0) -> str:
    async with asyncio.timeout(timeout):
        while True:
            item = sidecar.outbox.get(mid)
            assert item is not None
            if item.status in ("delivered", "dead"):
                return item.status
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("protocol", ["mqtt", "amqp", "http"])
async def test_permanent_refusal_over_each_transport(emulated: Any, protocol: str):
    sidecar, client = emulated
    device = DEVICES[protocol]
    hub = sidecar.emulator.hub
    resp = await client.post(f"/v1/devices/{device}/messages", data=b"hello", headers={"iothub-app-k": "v"})
    mid = (await resp.json())["id"]
    assert await _settled(sidecar, mid) == "delivered"
    assert mid in hub.received_ids(device)  # the outbox id travels as the message id
    assert next(r for r in hub.received if r.message_id == mid).properties.get("k") == "v"

    # a permanent refusal rendered on the wire comes back as its exact code and dead-letters the message
    too_large = code_of("MessageTooLarge")
    hub.plan.add(Operation.TELEMETRY, too_large, device=device, transport=protocol)
    mid = (await (await client.post(f"/v1/devices/{device}/messages", data=b"big")).json())["id"]
    status = await _settled(sidecar, mid)
    got = await (await client.get(f"/v1/messages/{mid}")).json()
    dev = await (await client.get(f"/v1/devices/{device}")).json()
    if status == "dead":
        assert got["code"] == too_large and got["name"] == "MessageTooLarge"
        assert dev["last_error"]["code"] == too_large and dev["last_error"]["action"] == "fail"
    else:  # a wire that cannot say it (MQTT 3.1.1 PUBACK) drops instead: resent, flagged, never lost
        assert got["possible_duplicate"] is True and dev["last_error"] is not None



@pytest.mark.parametrize("protocol", ["mqtt", "amqp", "http"])
async def test_throttling_over_each_transport(emulated: Any, protocol: str):
    """Throttled (MQTT 3.1.1 can only drop the connection): retried and delivered, the code reported."""
    sidecar, client = emulated
    device = DEVICES[protocol]
    hub = sidecar.emulator.hub
    # IoT Hub has no way to say Retry-After over MQTT; the other two carry it
    hints = {} if protocol == "mqtt" else {"retry_after": 0.05}
    hub.plan.add(Operation.TELEMETRY, code_of("ThrottlingException"), device=device, transport=protocol, **hints)
    mid = (await (await client.post(f"/v1/devices/{device}/messages", data=b"again")).json())["id"]
    assert await _settled(sidecar, mid) == "delivered"
    dev = await (await client.get(f"/v1/devices/{device}")).json()
    assert dev["state"] == "connected" and dev["last_error"] is not None


async def test_an_mqtt5_device_gets_exact_codes_where_3_1_1_can_only_drop(emulated_sidecar: Any):
    sidecar, client = await emulated_sidecar({"policy": {"throttle": {"initial": 0.05, "cap": 0.1}},
                                              "devices": [{"id": "m5", "protocol": "mqtt", "mqtt_version": 5}]})
    hub = sidecar.emulator.hub
    too_large = code_of("MessageTooLarge")
    hub.plan.add(Operation.TELEMETRY, too_large, device="m5", transport="mqtt")
    mid = (await (await client.post("/v1/devices/m5/messages", data=b"big")).json())["id"]
    assert await _settled(sidecar, mid) == "dead"  # MQTT 5 says it in the PUBACK: no drop, no resend
    got = await (await client.get(f"/v1/messages/{mid}")).json()
    assert got["code"] == too_large and got["possible_duplicate"] is False
    hub.plan.add(Operation.TELEMETRY, code_of("ThrottlingException"), device="m5", transport="mqtt", times=2)
    mid = (await (await client.post("/v1/devices/m5/messages", data=b"t")).json())["id"]
    assert await _settled(sidecar, mid) == "delivered"
    dev = await (await client.get("/v1/devices/m5")).json()
    assert dev["last_error"]["code"] == code_of("ThrottlingException")
    assert dev["last_error"]["action"] == "throttle"
