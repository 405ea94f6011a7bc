"""The sidecar on its default upstream, the bundled emulator in-process, with a client for its API.

``sidecar, client = await emulated_sidecar({...})`` parses the mapping as a config (the outbox goes to the
test's tmp_path), starts the sidecar and its API on a free port; both are stopped after the test.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.sidecar.app import make_app
from gateway.sidecar.config import OutboxConfig, parse_config
from gateway.sidecar.service import Sidecar

Started = tuple[Sidecar, TestClient[Any, Any]]


@pytest.fixture
async def emulated_sidecar(tmp_path: Path) -> AsyncIterator[Callable[[Mapping[str, Any]], Awaitable[Started]]]:
    started: list[Started] = []

    async def start(config: Mapping[str, Any]) -> Started:
        cfg = parse_config(dict(config), env={})
        outbox = tmp_path / f"outbox-{len(started)}.sqlite3"
        cfg = dataclasses.replace(cfg, outbox=OutboxConfig(path=str(outbox)))
        sidecar = Sidecar(cfg)
        await sidecar.start()
        client: TestClient[Any, Any] = TestClient(TestServer(make_app(sidecar)))
        await client.start_server()
        started.append((sidecar, client))
        return sidecar, client

    yield start
    for sidecar, client in reversed(started):
        await client.close()
        await sidecar.stop()
