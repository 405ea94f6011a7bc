"""The service side of the AMQP front, played by proton directly: a service token on ``$cbs``, C2D
messages on ``/messages/devicebound`` (IoT Hub's rules for ``to`` and ``iothub-ack``) and feedback
records on ``/messages/servicebound/feedback``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from adapters.amqp.emulator import AmqpFront
from gateway.emulator import Hub
from gateway.sas import make_sas_token

STEP = 5.0
FOREVER = 4_000_000_000

pytestmark = pytest.mark.usefixtures("no_amqp_thread_left")


def _service_session(port: int, hub: Hub, token: str) -> dict[str, Any]:
    """As azure-iot-hub does it (over ANONYMOUS here): put-token for the hub, send C2D, read feedback."""
    from proton import Message
    from proton.utils import BlockingConnection, SendException

    conn = BlockingConnection(f"amqp://127.0.0.1:{port}", timeout=STEP, allowed_mechs="ANONYMOUS")
    result: dict[str, Any] = {}
    try:
        receiver = conn.create_receiver("$cbs", credit=1)
        sender = conn.create_sender("$cbs")
        request = Message(body=token, id="r", reply_to="cbs")
        props: Any = {"operation": "put-token", "type": "servicebus.windows.net:sastoken", "name": hub.host_name}
        request.properties = props
        sender.send(request)
        answer = receiver.receive(timeout=STEP)
        receiver.accept()
        result["cbs"] = (answer.properties or {})["status-code"]
        if result["cbs"] != 200:
            return result
        c2d = conn.create_sender("/messages/devicebound")
        message = Message(body=b"cloud", id="svc-1", address="/devices/d1/messages/devicebound")
        message.properties = {"iothub-ack": "full", "k": "v"}
        c2d.send(message)
        result["sent"] = "svc-1"
        try:
            c2d.send(Message(body=b"x", address="/devices/nobody/messages/devicebound"))
        except SendException as exc:
            result["unknown"] = exc.state
        # the device completes it (here: straight through the hub) and feedback follows
        entry = hub.lock_c2d("d1", 60, now=0)
        assert entry is not None and entry.lock_token is not None
        result["queued"] = (entry.message_id, entry.body, entry.properties)
        hub.settle_c2d("d1", entry.lock_token, "complete", now=1)
        feedback = conn.create_receiver("/messages/servicebound/feedback", credit=1)
        got = feedback.receive(timeout=STEP)
        feedback.accept()
        result["feedback"] = json.loads(bytes(got.body))
        result["feedback_type"] = got.content_type
        return result
    finally:
        conn.close()


async def test_service_sends_c2d_and_reads_feedback(hub: Hub, amqp_front: AmqpFront) -> None:
    token = make_sas_token(hub.host_name, hub.service_key, FOREVER, hub.service_policy)
    result = await asyncio.to_thread(_service_session, amqp_front.port, hub, token)
    assert result["cbs"] == 200
    assert result["queued"] == ("svc-1", b"cloud", {"k": "v"})  # iothub-ack is the hub's, not the device's
    from proton import Delivery

    assert result["unknown"] == Delivery.REJECTED  # no such device: the hub refuses the message
    [record] = result["feedback"]
    assert (record["originalMessageId"], record["deviceId"], record["statusCode"]) == ("svc-1", "d1", "Success")
    assert result["feedback_type"] == "application/vnd.microsoft.iothub.feedback.json"


async def test_a_device_token_or_wrong_key_cannot_act_as_the_service(hub: Hub, amqp_front: AmqpFront) -> None:
    wrong = make_sas_token(hub.host_name, "b3RoZXIta2V5", FOREVER, hub.service_policy)
    assert (await asyncio.to_thread(_service_session, amqp_front.port, hub, wrong))["cbs"] == 401
    device = hub.token("d1", FOREVER)
    assert (await asyncio.to_thread(_service_session, amqp_front.port, hub, device))["cbs"] == 401


def _device_c2d(port: int, hub: Hub) -> list[tuple[str, Any, int, dict[str, Any]]]:
    """A device on proton: receive, release (abandon), receive again, reject. What it saw of each delivery."""
    from proton import Message
    from proton.utils import BlockingConnection

    conn = BlockingConnection(f"amqp://127.0.0.1:{port}", timeout=STEP, allowed_mechs="ANONYMOUS")
    seen: list[tuple[str, Any, int, dict[str, Any]]] = []
    try:
        receiver = conn.create_receiver("$cbs", credit=1)
        sender = conn.create_sender("$cbs")
        request = Message(body=hub.token("d1", FOREVER), id="r", reply_to="cbs")
        props: Any = {"operation": "put-token", "type": "azure-devices.net:sastoken",
                      "name": f"{hub.host_name}/devices/d1"}
        request.properties = props
        sender.send(request)
        assert (receiver.receive(timeout=STEP).properties or {})["status-code"] == 200
        receiver.accept()
        c2d = conn.create_receiver("/devices/d1/messages/devicebound", credit=1)
        for outcome in ("release", "reject"):
            msg = c2d.receive(timeout=STEP)
            seen.append((str(msg.id), msg.correlation_id, msg.delivery_count, dict(msg.properties or {})))
            c2d.release() if outcome == "release" else c2d.reject()
        return seen
    finally:
        conn.close()


async def test_amqp_device_abandon_redelivers_and_reject_dead_letters(hub: Hub, amqp_front: AmqpFront) -> None:
    mid = hub.send_c2d("d1", b"x", properties={"k": "v"}, correlation_id="c-1", ack="negative")
    seen = await asyncio.to_thread(_device_c2d, amqp_front.port, hub)
    assert seen == [(mid, "c-1", 0, {"k": "v"}), (mid, "c-1", 1, {"k": "v"})]  # delivery-count: earlier tries
    async with asyncio.timeout(STEP):
        while not hub.dead_letters:
            await asyncio.sleep(0.01)
    assert [(f.message_id, f.status) for f in hub.feedback] == [(mid, "Rejected")]
