"""IoT Hub routes on a message's system properties (content type and encoding: routing on the body needs
both), and back ends correlate on its correlation id: each transport must put them on its own wire, over
TLS, where the emulator reads them the way the hub does."""

from __future__ import annotations

import pytest

from gateway.transport import Message
from tests.scenarios.conftest import Stage
from tests.scenarios.kit import transport_for


@pytest.mark.parametrize("kind", ["mqtt311", "mqtt5", "amqp", "http"])
async def test_system_properties_reach_the_hub_on_every_transport(stage: Stage, kind: str) -> None:
    transport = transport_for(stage, kind)
    message = Message("sys-1", "d1", b'{"t": 21.5}', {"kind": "temp"}, content_type="application/json",
                      content_encoding="utf-8", correlation_id="corr-7", creation_time="2026-11-26T01:00:00Z")
    plain = Message("sys-2", "d1", b"raw")
    await transport.connect()
    try:
        await transport.send(message)
        await transport.send(plain)
    finally:
        await transport.close()
    got = {r.message_id: r for r in stage.hub.received}
    assert got["sys-1"].properties == {"kind": "temp"}  # application properties stay apart
    assert got["sys-1"].system == {"$.ct": "application/json", "$.ce": "utf-8", "$.cid": "corr-7",
                                   "$.ctime": "2026-11-26T01:00:00Z"}
    assert got["sys-2"].system == {} and got["sys-2"].properties == {}
