"""The sidecar's built-in emulator exposes the emulator's admin API: a user injects a throttle through it
and watches the sidecar handle it, without a second process."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.codes import code_of
from gateway.sidecar.config import OutboxConfig, parse_config
from gateway.sidecar.service import Sidecar


@pytest.fixture
async def sidecar(tmp_path: Path) -> Any:
    cfg = parse_config({"policy": {"throttle": {"initial": 0.05, "cap": 0.1}}}, env={})
    cfg = dataclasses.replace(cfg, outbox=OutboxConfig(path=str(tmp_path / "outbox.sqlite3")))
    running = Sidecar(cfg)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()
    assert running.emulator_admin is None  # stopped with the sidecar


async def test_a_throttle_added_through_the_admin_api_reaches_the_sidecar(sidecar: Sidecar) -> None:
    assert sidecar.emulator is not None and sidecar.emulator_admin is not None
    device = next(d for d in sidecar.config.devices if d.protocol == "http").id
    url = sidecar.emulator_admin.url
    async with aiohttp.ClientSession() as session:
        fault = {"operation": "telemetry", "code": code_of("ThrottlingException"), "device": device, "times": 1}
        async with session.post(f"{url}/faults", json=fault) as resp:
            assert resp.status == 201
        mid = (await sidecar.accept(device, b"through a throttle"))["id"]
        async with asyncio.timeout(20):
            while (item := sidecar.outbox.get(mid)) is None or item.status != "delivered":
                await asyncio.sleep(0.02)
        async with session.get(f"{url}/faults") as resp:
            assert await resp.json() == []  # used up: the sidecar was refused once, then delivered
        async with session.get(f"{url}/messages", params={"device": device}) as resp:
            bodies = [m["body"] for m in (await resp.json())["messages"]]
    assert bodies == ["through a throttle"]
    assert sidecar.emulator.hub.plan.pending() == []


async def test_no_admin_api_when_asked_for_none(tmp_path: Path) -> None:
    cfg = dataclasses.replace(parse_config({}, env={}), outbox=OutboxConfig(path=str(tmp_path / "o.sqlite3")))
    quiet = Sidecar(cfg, emulator_admin_port=None)
    await quiet.start()
    try:
        assert quiet.emulator is not None and quiet.emulator_admin is None
    finally:
        await quiet.stop()
