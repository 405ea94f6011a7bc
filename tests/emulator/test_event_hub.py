"""The built-in Event Hub-compatible endpoint on the AMQP front, read with proton as an Event Hubs client
reads it: a service token, ``$management`` READ, then a partition receiver with a selector filter."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from adapters.amqp.emulator import PARTITIONS, AmqpFront, _partition
from gateway.emulator import Hub
from gateway.emulator.hub import Received
from gateway.sas import make_sas_token

STEP = 5.0
FOREVER = 4_000_000_000

pytestmark = pytest.mark.usefixtures("no_amqp_thread_left")


def _read(port: int, hub: Hub, entity: str, partition: int, selector: str, want: int) -> dict[str, Any]:
    from proton import Message
    from proton.reactor import Selector
    from proton.utils import BlockingConnection

    conn = BlockingConnection(f"amqp://127.0.0.1:{port}", timeout=STEP, allowed_mechs="ANONYMOUS")
    out: dict[str, Any] = {}
    try:
        audience = f"amqps://{hub.host_name}/{entity}"
        cbs_in = conn.create_receiver("$cbs", credit=1)
        cbs_out = conn.create_sender("$cbs")
        request = Message(body=make_sas_token(audience, hub.service_key, FOREVER, hub.service_policy), id="t",
                          reply_to="cbs")
        request.properties = {"operation": "put-token", "type": "servicebus.windows.net:sastoken", "name": audience}
        cbs_out.send(request)
        assert (cbs_in.receive(timeout=STEP).properties or {})["status-code"] == 200
        cbs_in.accept()
        mgmt_in = conn.create_receiver("$management", credit=1)
        mgmt_out = conn.create_sender("$management")
        ask = Message(id="m", reply_to="mgmt", body=None)
        ask.properties = {"operation": "READ", "name": entity, "type": "com.microsoft:eventhub"}
        mgmt_out.send(ask)
        info = mgmt_in.receive(timeout=STEP)
        mgmt_in.accept()
        out["info"] = (info.properties or {}).get("status-code"), info.body
        receiver = conn.create_receiver(f"{entity}/ConsumerGroups/$Default/Partitions/{partition}",
                                        credit=10, options=Selector(selector))
        events = []
        for _ in range(want):
            event = receiver.receive(timeout=STEP)
            receiver.accept()
            events.append((event.id, bytes(event.body), dict(event.properties or {}),
                           {str(k): v for k, v in (event.annotations or {}).items()}))
        out["events"] = events
        return out
    finally:
        conn.close()


async def test_telemetry_is_read_from_its_partition_with_iot_hub_annotations(hub: Hub, amqp_front: AmqpFront) -> None:
    for n in range(3):
        hub.record(Received("d1", f"a{n}", f"one{n}".encode(), "mqtt", {"k": str(n)}))
        hub.record(Received("d2", f"b{n}", b"two", "http", {}))
    part = _partition("d1")
    mine = 3 if _partition("d2") != part else 6
    got = await asyncio.to_thread(_read, amqp_front.port, hub, amqp_front.event_hub_name, part,
                                  "amqp.annotation.x-opt-offset > '-1'", mine)
    status, body = got["info"]
    assert status == 200 and body["partition_ids"] == [str(p) for p in range(PARTITIONS)]
    d1 = [e for e in got["events"] if e[3]["iothub-connection-device-id"] == "d1"]
    assert [(e[0], e[1], e[2]) for e in d1] == [("a0", b"one0", {"k": "0"}), ("a1", b"one1", {"k": "1"}),
                                               ("a2", b"one2", {"k": "2"})]
    sequence = [e[3]["x-opt-sequence-number"] for e in got["events"]]
    assert sequence == sorted(sequence) and all(e[3]["x-opt-offset"] == str(e[3]["x-opt-sequence-number"])
                                                for e in got["events"])
    # a reader that starts after the first d1 message sees only what followed
    first = d1[0][3]["x-opt-sequence-number"]
    later = await asyncio.to_thread(_read, amqp_front.port, hub, amqp_front.event_hub_name, part,
                                    f"amqp.annotation.x-opt-sequence-number > {first}", 2)
    assert later["events"][0][3]["x-opt-sequence-number"] > first
    assert next(e[0] for e in later["events"] if e[3]["iothub-connection-device-id"] == "d1") == "a1"
