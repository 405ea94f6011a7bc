"""The scenario suite's stage: the emulated hub behind its three fronts, always over TLS, as IoT Hub is.

Each scenario drives the real :class:`~gateway.handler.Handler` over a real transport, through real TLS
on 127.0.0.1, against the emulator with a fault plan, and asserts what a gateway builder would see.
The policy is the shipped one with its delays scaled down (``fast_policy``), so minutes of the hub's
behaviour play out in seconds of real time without changing a rule.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from adapters.amqp.emulator import AmqpFront
from adapters.http.emulator import HttpFront
from adapters.mqtt.emulator import MqttFront
from gateway.emulator import Hub
from gateway.emulator.front import FrontConfig
from gateway.policy import Backoff, Policy, PolicyConfig
from tests.peers.tls import TlsFiles

STEP = 10.0  # bound on starting or stopping a front


@dataclass
class Stage:
    hub: Hub
    mqtt: MqttFront
    amqp: AmqpFront
    http: HttpFront
    client_ssl: ssl.SSLContext  #: trusts the stage's private CA; verifies the chain and the host name
    ca_file: str

    def port(self, transport: str) -> int:
        return {"mqtt": self.mqtt.port, "amqp": self.amqp.port, "http": self.http.port}[transport]


@pytest.fixture
async def stage(tls_files: TlsFiles) -> AsyncIterator[Stage]:
    hub = Hub()
    for device in ("d1", "d2", "d3"):
        hub.add_device(device)
    tls = FrontConfig(ssl_context=tls_files.server_context())
    mqtt = MqttFront(hub, tls)
    amqp = AmqpFront(hub, cert_file=str(tls_files.cert_pem), key_file=str(tls_files.key_pem))
    http = HttpFront(hub, tls)
    fronts = (mqtt, amqp, http)
    for front in fronts:
        await asyncio.wait_for(front.start(), STEP)
    try:
        yield Stage(hub, mqtt, amqp, http, tls_files.client_context(), str(tls_files.ca_pem))
    finally:
        for front in fronts:
            await asyncio.wait_for(front.stop(), STEP * 3)


def fast_policy(scale: float = 0.01, **sections: object) -> Policy:
    """The shipped policy with every delay multiplied by ``scale`` (counts and rules unchanged)."""
    config = PolicyConfig()
    replaced: dict[str, object] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Backoff):
            changes = {k: getattr(value, k) * scale for k in ("initial", "cap", "max_elapsed")}
            for k in ("max_retry_after", "window"):
                if hasattr(value, k):
                    changes[k] = getattr(value, k) * scale
            replaced[f.name] = dataclasses.replace(value, **changes)
    replaced["drops"] = dataclasses.replace(config.drops, takeover_park=config.drops.takeover_park * scale)
    replaced["quota"] = dataclasses.replace(config.quota, probe_interval=config.quota.probe_interval * scale)
    replaced.update(sections)
    return Policy(dataclasses.replace(config, **replaced))  # type: ignore[arg-type]
