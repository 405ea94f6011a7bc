"""A scriptable in-memory transport and a running sidecar with an API client, for the sidecar tests."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from gateway.errors import IoTHubError
from gateway.sidecar.config import SidecarConfig, parse_config
from gateway.sidecar.service import Sidecar
from gateway.sidecar.upstream import TransportSpec
from gateway.testing import MemoryTransport
from gateway.transport import Message

HUB = "fake.azure-devices.net"
#: A planted secret: the device key of every fake device. It must never appear in any output.
PLANTED_KEY = base64.b64encode(b"planted-secret-key-0123456789ab").decode()


def connection_string(device_id: str, key: str = PLANTED_KEY) -> str:
    return f"HostName={HUB};DeviceId={device_id};SharedAccessKey={key}"


@dataclass
class Upstream:
    """What the fake transports of one test share: what arrived, and a script of failures."""

    received: list[Message] = field(default_factory=list)
    #: per device: errors the next sends raise, in order (None = succeed)
    send_script: dict[str, list[IoTHubError | None]] = field(default_factory=dict)
    block: asyncio.Event | None = None  #: when set to an unset Event, sends wait for it
    transports: dict[str, FakeTransport] = field(default_factory=dict)


class FakeTransport(MemoryTransport):
    """One device's connection to the shared :class:`Upstream`."""

    def __init__(self, spec: TransportSpec, upstream: Upstream) -> None:
        super().__init__(spec.protocol)
        self.device_id = spec.connection.device_id
        self.spec = spec
        self.upstream = upstream
        upstream.transports[self.device_id] = self

    async def send(self, message: Message) -> None:
        script = self.upstream.send_script.get(self.device_id)
        if script:
            err = script.pop(0)
            if err is not None:
                raise err
        if self.upstream.block is not None:
            await self.upstream.block.wait()
        self.upstream.received.append(message)


def fake_config(tmp_path: Path, *devices: tuple[str, str], extra: dict[str, Any] | None = None,
                **sections: dict[str, Any]) -> SidecarConfig:
    """A config for fake upstream devices (kind iothub on loopback, plain TCP: the factory never dials)."""
    data: dict[str, Any] = {
        "upstream": {"kind": "iothub", "host": "127.0.0.1", "tls": False},
        "outbox": {"path": str(tmp_path / "outbox.sqlite3")},
        "delivery": {"shutdown_deadline": 0.5},
        "devices": [{"id": d, "protocol": p, "connection_string": connection_string(d)}
                    for d, p in (devices or (("dev-mqtt", "mqtt"), ("dev-http", "http")))],
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    data.update(extra or {})
    return parse_config(data, source="test", env={})


@dataclass
class Running:
    sidecar: Sidecar
    client: TestClient[Any, Any]
    upstream: Upstream

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)

    async def status(self, message_id: str) -> str:
        resp = await self.client.get(f"/v1/messages/{message_id}")
        return str((await resp.json())["status"])


