"""What the hub keeps the way IoT Hub keeps it: C2D at least once (lock, settle, redelivery, maximum
delivery count, dead letters, feedback), twin versions counted apart, the service twin's fields, and
the registry over REST. Raw clients (aiohttp, the MQTT codec over asyncio streams) talk to the fronts."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from adapters.http.emulator import HttpFront
from adapters.http.translate import translate
from adapters.mqtt.codec import MQTT_5, MQTT_311, ConnAck, PubAck, Publish, Subscribe
from adapters.mqtt.emulator import MqttFront
from gateway.emulator import Hub
from gateway.sas import make_sas_token
from tests.peers.mosquitto import RawClient

FOREVER = 4_000_000_000


# -- the hub on its own ----------------------------------------------------------------------------------


def test_c2d_lock_complete_reject_abandon_and_feedback() -> None:
    hub = Hub()
    hub.add_device("d")
    given = hub.send_c2d("d", b"a", message_id="m-a", ack="full")
    made = hub.send_c2d("d", b"b", properties={"k": "v"}, correlation_id="c", ack="negative")
    assert given == "m-a" and made and made != given  # an id is made when the sender gives none
    first = hub.lock_c2d("d", 60, now=0)
    assert first is not None and first.message_id == "m-a" and first.delivery_count == 1
    first_token = first.lock_token  # the entry is the hub's own: it changes with the next delivery
    assert first_token is not None
    assert hub.settle_c2d("d", first_token, "abandon", now=1) is None
    again = hub.lock_c2d("d", 60, now=2)  # abandoned: back at the head of the queue, counted again
    assert again is not None and again.message_id == "m-a" and again.delivery_count == 2
    assert again.lock_token is not None and again.lock_token != first_token
    assert hub.settle_c2d("d", first_token, "complete", now=3) == "unknown"  # an old token means nothing
    assert hub.settle_c2d("d", again.lock_token, "complete", now=3) is None
    second = hub.lock_c2d("d", 60, now=4)
    assert second is not None and (second.properties, second.correlation_id) == ({"k": "v"}, "c")
    assert second.lock_token is not None
    assert hub.settle_c2d("d", second.lock_token, "reject", now=5) is None
    assert hub.lock_c2d("d", 60, now=6) is None
    assert [(f.message_id, f.status) for f in hub.feedback] == [("m-a", "Success"), (made, "Rejected")]
    assert [entry.message_id for _, entry in hub.dead_letters] == [made]


def test_an_expired_lock_redelivers_and_a_late_settle_is_lock_lost() -> None:
    hub = Hub()
    hub.add_device("d")
    hub.send_c2d("d", b"x", message_id="m")
    held = hub.lock_c2d("d", 60, now=0)
    assert held is not None and held.lock_token is not None
    token = held.lock_token
    assert hub.lock_valid("d", token, 59.9) and not hub.lock_valid("d", token, 60)
    redelivered = hub.lock_c2d("d", 60, now=61)
    assert redelivered is not None and redelivered.delivery_count == 2
    assert hub.settle_c2d("d", token, "complete", now=62) == "lost"


def test_past_the_maximum_delivery_count_a_message_is_dead_lettered() -> None:
    hub = Hub(max_delivery_count=3)
    hub.add_device("d")
    hub.send_c2d("d", b"x", message_id="m", ack="negative")
    for n in range(3):
        entry = hub.lock_c2d("d", math.inf, now=n)
        assert entry is not None and entry.delivery_count == n + 1 and entry.lock_token is not None
        hub.release_c2d("d", [entry.lock_token])  # e.g. the connection closed before the PUBACK
    assert hub.lock_c2d("d", math.inf, now=9) is None
    assert [(f.message_id, f.status) for f in hub.feedback] == [("m", "DeliveryCountExceeded")]


def test_queue_is_bounded_and_old_tuples_still_queue() -> None:
    hub = Hub()
    device = hub.add_device("d")
    device.c2d.append(("legacy", b"body"))  # the shape older tests append directly
    entry = hub.lock_c2d("d", 60, now=0)
    assert entry is not None and (entry.message_id, entry.body) == ("legacy", b"body")
    for n in range(49):
        hub.send_c2d("d", b"x", message_id=str(n))
    with pytest.raises(OverflowError):
        hub.send_c2d("d", b"x")
    with pytest.raises(KeyError):
        hub.send_c2d("nobody", b"x")


def test_twin_versions_are_counted_apart() -> None:
    hub = Hub()
    hub.add_device("d")
    assert hub.update_reported("d", {"t": 1}) == 2
    assert hub.update_reported("d", {"t": 2}) == 3
    assert hub.update_desired("d", {"fan": "on"}) == 2
    props = hub.twin_properties("d")
    assert (props["desired"]["$version"], props["reported"]["$version"]) == (2, 3)
    twin = hub.service_twin("d")
    assert twin["version"] == 4  # the whole twin counts every change
    for key in ("deviceEtag", "lastActivityTime", "cloudToDeviceMessageCount", "authenticationType", "etag"):
        assert key in twin
    assert twin["authenticationType"] == "sas" and twin["lastActivityTime"] != "0001-01-01T00:00:00Z"
    desired = twin["properties"]["desired"]
    assert desired["$metadata"]["fan"]["$lastUpdatedVersion"] == 2 and desired["fan"] == "on"
    assert "t" in twin["properties"]["reported"]["$metadata"]
    hub.send_c2d("d", b"x")
    assert hub.service_twin("d")["cloudToDeviceMessageCount"] == 1


def test_keys_are_random_per_hub() -> None:
    a, b = Hub(), Hub()
    assert a.add_device("d").key != b.add_device("d").key
    assert a.service_key != b.service_key and "SharedAccessKeyName=iothubowner" in a.service_connection_string
    assert Hub(service_key="c2VjcmV0").service_key == "c2VjcmV0"


def test_received_is_bounded_and_readable_since_an_index() -> None:
    from gateway.emulator.hub import MAX_RECEIVED, Received

    hub = Hub()
    for n in range(MAX_RECEIVED + MAX_RECEIVED // 10 + 5):
        hub.record(Received("d", str(n), b"", "http", {}))
    assert len(hub.received) <= MAX_RECEIVED + MAX_RECEIVED // 10
    last, cursor = hub.received_since(hub.received_total - 2)
    assert [r.message_id for r in last] == [str(hub.received_total - 2), str(hub.received_total - 1)]
    assert hub.received_since(cursor) == ([], cursor)
    oldest, _ = hub.received_since(0)  # what was dropped is skipped
    assert len(oldest) == len(hub.received)


# -- over the wire --------------------------------------------------------------------------------------


@pytest.fixture
async def http_front(hub: Hub) -> AsyncIterator[HttpFront]:
    front = HttpFront(hub)
    await asyncio.wait_for(front.start(), 5)
    yield front
    await asyncio.wait_for(front.stop(), 10)


async def call(method: str, url: str, **kwargs: Any) -> tuple[int, Any, bytes]:
    async with asyncio.timeout(10), aiohttp.ClientSession() as s, s.request(method, url, **kwargs) as r:
        return r.status, r.headers, await r.read()


def service(front: HttpFront) -> dict[str, str]:
    return {"Authorization": make_sas_token(front.hub.host_name, front.hub.service_key, FOREVER, "iothubowner")}


def device(front: HttpFront, device_id: str = "d1") -> dict[str, str]:
    return {"Authorization": front.hub.token(device_id, FOREVER)}


async def test_unknown_device_is_an_iot_hub_error_body_in_todays_form(http_front: HttpFront) -> None:
    status, headers, body = await call("GET", f"{http_front.url}/devices/nobody?api-version=2021-04-12",
                                       headers=service(http_front))
    assert status == 404
    outer = json.loads(body)
    assert json.loads(outer["Message"])["errorCode"] == 404001  # numeric, JSON escaped inside Message
    err = translate(status, headers, body)
    assert err is not None and err.code == 404001


async def test_registry_put_get_list_delete(http_front: HttpFront) -> None:
    base = f"{http_front.url}/devices"
    new = {"deviceId": "d9", "authentication": {"symmetricKey": {"primaryKey": "cHJpbWFyeQ==", "secondaryKey": ""}}}
    status, _, body = await call("PUT", f"{base}/d9", json=new, headers=service(http_front))
    created = json.loads(body)
    assert status == 200 and created["authentication"]["symmetricKey"]["primaryKey"] == "cHJpbWFyeQ=="
    assert created["authentication"]["symmetricKey"]["secondaryKey"]  # random when not given
    status, _, body = await call("PUT", f"{base}/d9", json=new, headers=service(http_front))
    err = translate(status, {}, body)
    assert status == 409 and err is not None and err.code == 409001
    disable = {"deviceId": "d9", "status": "disabled"}
    status, _, body = await call("PUT", f"{base}/d9", json=disable, headers=service(http_front) | {"If-Match": "*"})
    assert status == 200 and json.loads(body)["status"] == "disabled"
    status, _, body = await call("GET", base, headers=service(http_front))
    assert status == 200 and {d["deviceId"] for d in json.loads(body)} == {"d1", "d2", "d9"}
    status, _, _ = await call("GET", f"{base}/d9", headers=device(http_front, "d1"))  # not a service token
    assert status == 401
    assert (await call("DELETE", f"{base}/d9", headers=service(http_front)))[0] == 204
    assert (await call("GET", f"{base}/d9", headers=service(http_front)))[0] == 404
    assert http_front.hub.device("d9") is None


async def test_http_reject_dead_letters_and_headers_carry_properties(http_front: HttpFront) -> None:
    hub = http_front.hub
    hub.send_c2d("d1", b"x", properties={"k": "v"}, correlation_id="c-1", ack="full")
    base = f"{http_front.url}/devices/d1/messages/deviceBound"
    status, headers, body = await call("GET", base, headers=device(http_front))
    assert status == 200 and body == b"x" and headers["iothub-app-k"] == "v"
    assert headers["iothub-correlationid"] == "c-1" and headers["iothub-messageid"]
    etag = headers["ETag"].strip('"')
    assert (await call("DELETE", f"{base}/{etag}?reject", headers=device(http_front)))[0] == 204
    assert [f.status for f in hub.feedback] == ["Rejected"] and len(hub.dead_letters) == 1


async def mqtt_device(hub: Hub, front: MqttFront, level: int) -> RawClient:
    raw = RawClient(level)
    ack = await raw.connect("127.0.0.1", front.port, "d1", f"{hub.host_name}/d1/?api-version=2021-04-12",
                            hub.token("d1", FOREVER))
    assert isinstance(ack, ConnAck) and ack.reason_code == 0
    return raw


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
async def test_mqtt_c2d_is_at_least_once(hub: Hub, mqtt_front: MqttFront, level: int) -> None:
    mid = hub.send_c2d("d1", b"hello", properties={"k": "v w"})
    raw = await mqtt_device(hub, mqtt_front, level)
    try:
        await raw.subscribe("devices/d1/messages/devicebound/#", qos=1)
        first = await raw.expect(Publish)
        assert first.qos == 1 and first.payload == b"hello"
        assert f"%24.mid={mid}" in first.topic and "k=v%20w" in first.topic
    finally:
        raw.close()  # no PUBACK: the hub keeps it
    await asyncio.sleep(0)
    raw = await mqtt_device(hub, mqtt_front, level)
    try:
        await raw.subscribe("devices/d1/messages/devicebound/#", qos=1)
        again = await raw.expect(Publish)
        assert again.payload == b"hello" and f"%24.mid={mid}" in again.topic
        raw.send(PubAck(again.packet_id))
        await raw.writer.drain()
        async with asyncio.timeout(5):
            while hub.device("d1").locked:  # type: ignore[union-attr]
                await asyncio.sleep(0.01)
        assert [f for f in hub.feedback] == []  # no ack asked: no feedback, but the message is done
        assert not hub.device("d1").c2d  # type: ignore[union-attr]
    finally:
        raw.close()


@pytest.mark.parametrize(("level", "code"), [(MQTT_311, 5), (MQTT_5, 0x87)])
async def test_wrong_key_is_not_authorized_on_the_wire(hub: Hub, mqtt_front: MqttFront, level: int,
                                                     code: int) -> None:
    raw = RawClient(level)
    try:
        wrong = make_sas_token(f"{hub.host_name}/devices/d1", "b3RoZXIta2V5", FOREVER)
        ack = await raw.connect("127.0.0.1", mqtt_front.port, "d1", f"{hub.host_name}/d1/", wrong)
        assert isinstance(ack, ConnAck) and ack.reason_code == code
        unknown = RawClient(level)
        ack = await unknown.connect("127.0.0.1", mqtt_front.port, "nobody", f"{hub.host_name}/nobody/", wrong)
        unknown.close()
        assert ack.reason_code == code
    finally:
        raw.close()


async def test_a_c2d_delivery_that_drops_the_link_is_redelivered(hub: Hub, mqtt_front: MqttFront) -> None:
    from gateway.emulator import FaultKind, Operation

    hub.plan.add(Operation.C2D_RECEIVE, kind=FaultKind.DROP, device="d1")
    mid = hub.send_c2d("d1", b"once")
    raw = await mqtt_device(hub, mqtt_front, MQTT_311)
    try:
        raw.send(Subscribe(raw.next_id(), [("devices/d1/messages/devicebound/#", 1)]))
        assert await raw.expect(Publish) is None  # the link went down instead of the message
    finally:
        raw.close()
    raw = await mqtt_device(hub, mqtt_front, MQTT_311)
    try:
        await raw.subscribe("devices/d1/messages/devicebound/#", qos=1)
        again = await raw.expect(Publish)
        assert again.payload == b"once" and f"%24.mid={mid}" in again.topic
    finally:
        raw.close()
