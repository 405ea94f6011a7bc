"""Fixtures for the sidecar tests (helpers in tests/sidecar/fakes.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.sidecar.app import make_app
from gateway.sidecar.config import SidecarConfig
from gateway.sidecar.service import Sidecar
from tests.sidecar.fakes import FakeTransport, Running, Upstream


@pytest.fixture
async def start_sidecar() -> AsyncIterator[Callable[..., Any]]:
    started: list[Running] = []

    async def start(config: SidecarConfig, upstream: Upstream | None = None) -> Running:
        up = upstream or Upstream()
        factories = {p: (lambda spec, up=up: FakeTransport(spec, up)) for p in ("mqtt", "amqp", "http")}
        sidecar = Sidecar(config, factories=factories)
        await sidecar.start()
        client: TestClient[Any, Any] = TestClient(TestServer(make_app(sidecar)))
        await client.start_server()
        running = Running(sidecar, client, up)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.upstream.block is not None:
            running.upstream.block.set()
        await running.client.close()
        await running.sidecar.stop()
