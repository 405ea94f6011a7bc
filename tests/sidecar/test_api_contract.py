"""The API's contract: real responses validated against openapi.json (openapi-core: status, content type,
body schema, RFC 3339 formats), message system properties carried to the transport, and the papercuts
found by a new user (401 text, 405 Allow, HEAD /healthz, the API's own errors, duplicate POSTs)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from openapi_core import Config, OpenAPI
from openapi_core.testing import MockRequest, MockResponse

from gateway.codes import code_of
from gateway.errors import make_error
from gateway.sidecar.app import openapi_text
from tests.sidecar.fakes import fake_config
from tests.sidecar.test_device_surface import DEVICES, connected, emulated, listening, next_event

__all__ = ["emulated"]  # the fixture, shared with the device-surface tests

# An event stream's body is text (openapi-core knows no deserializer for text/event-stream by itself).
SPEC = OpenAPI.from_dict(json.loads(openapi_text()), config=Config(
    extra_media_type_deserializers={"text/event-stream": lambda data: data.decode()}))
HOST = "http://127.0.0.1:8780"


async def conforms(resp: ClientResponse, *, data: bytes | None = None) -> bytes:
    """Validate a real answer against the document (raises with the schema error); its body."""
    body = await resp.read() if data is None else data
    request = MockRequest(HOST, resp.method.lower(), resp.url.raw_path)
    ctype = resp.headers.get("Content-Type", "application/json").split(";")[0]
    SPEC.validate_response(request, MockResponse(body, resp.status, dict(resp.headers), ctype))
    return body


def rfc3339(text: str) -> datetime:
    assert text.endswith("Z") and "T" in text, text
    return datetime.fromisoformat(text)


async def test_responses_of_every_plain_route_match_the_document(tmp_path: Path, start_sidecar: Any):
    run = await start_sidecar(fake_config(tmp_path))
    client: TestClient[Any, Any] = run.client
    posted = await client.post("/v1/devices/dev-mqtt/messages", data=b'{"a": 1}',
                               headers={"Content-Type": "application/json", "iothub-messageid": "m-1"})
    await conforms(posted)
    await run.wait_for(lambda: run.sidecar.outbox.get("m-1").status == "delivered")  # type: ignore[union-attr]
    again = await client.post("/v1/devices/dev-mqtt/messages", data=b"x", headers={"iothub-messageid": "m-1"})
    await conforms(again)
    run.upstream.send_script["dev-http"] = [make_error(code_of("MessageTooLarge"), transport="http")]
    dead = (await (await client.post("/v1/devices/dev-http/messages", data=b"big")).json())["id"]
    await run.wait_for(lambda: run.sidecar.outbox.get(dead).status == "dead")  # type: ignore[union-attr]
    for path in ("/v1/messages/m-1", "/v1/messages/nope", "/v1/devices", "/v1/devices/dev-mqtt",
                 "/v1/devices/nobody", "/v1/codes", "/v1/codes/DeviceNotFound", "/v1/codes/nope",
                 "/v1/dead-letters", f"/v1/dead-letters/{dead}", "/v1/dead-letters?limit=0", "/healthz",
                 "/readyz", "/v1/openapi.json"):
        await conforms(await client.get(path))
    await conforms(await client.post("/v1/classify", json={"transport": "http", "status": 429}))
    await conforms(await client.post("/v1/classify", json={"transport": "pigeon"}))
    await conforms(await client.post(f"/v1/dead-letters/{dead}/replay"))
    await conforms(await client.post("/v1/devices/nobody/messages", data=b"x"))
    batch = {"messages": [{"body": "t", "message_id": "m-1"}, {"body": {"a": 1}, "properties": {"k": "v"}},
                          {"body_base64": "AAE=", "content_type": "application/octet-stream"}]}
    _validate("BatchRequest", batch)  # the request the document describes is the one the route takes
    accepted = await conforms(await client.post("/v1/devices/dev-mqtt/messages/batch?ttl=60", json=batch))
    assert [m["duplicate"] for m in json.loads(accepted)["messages"]] == [True, False, False]
    for refused in ({"messages": []}, {"messages": [{"body": "x", "bdy": "x"}]}, [1]):
        await conforms(await client.post("/v1/devices/dev-mqtt/messages/batch", json=refused))  # 400
    await conforms(await client.post("/v1/devices/nobody/messages/batch", json=batch))  # 404
    too_large = {"messages": [{"body": "x" * 300_000}]}
    await conforms(await client.post("/v1/devices/dev-mqtt/messages/batch", json=too_large))  # 413
    not_allowed = await client.put("/v1/devices")  # no such operation to look up: its body is an Error
    assert not_allowed.status == 405
    _validate("Error", await not_allowed.json())


async def test_device_surface_responses_match_the_document(emulated: Any):
    sidecar, client = emulated
    for device in DEVICES.values():
        await connected(client, device)
    mqtt, amqp, http = DEVICES["mqtt"], DEVICES["amqp"], DEVICES["http"]
    await conforms(await client.get(f"/v1/devices/{amqp}/twin"))
    await conforms(await client.patch(f"/v1/devices/{amqp}/twin/reported", json={"x": 1}))
    await conforms(await client.patch(f"/v1/devices/{http}/twin/reported", json={"x": 1}))  # 501
    await conforms(await client.patch(f"/v1/devices/{amqp}/twin/reported", data=b"[1]"))  # 400
    await conforms(await client.get(f"/v1/devices/{http}/methods"))  # 501
    await conforms(await client.post(f"/v1/devices/{amqp}/methods/none/response", json={"status": 200}))  # 404
    await conforms(await client.post(f"/v1/devices/{amqp}/c2d/none/complete"))  # 412
    await conforms(await client.post(f"/v1/devices/{amqp}/c2d/none/defer"))  # 404
    hub = sidecar.emulator.hub
    async with client.get(f"/v1/devices/{mqtt}/c2d") as stream:
        await conforms(stream, data=b": the stream stays open; its status and content type are checked")
        hub.send_c2d(mqtt, b"\xff\x00", message_id="bin")
        kind, event = await next_event(stream)
        assert kind == "c2d" and event["body"] is None and event["body_base64"] == "/wA="
        _validate("C2DEvent", event)
        await conforms(await client.post(f"/v1/devices/{mqtt}/c2d/{event['lock']}/abandon"))  # 501 over MQTT
        await conforms(await client.post(f"/v1/devices/{mqtt}/c2d/{event['lock']}/complete"))  # 204
    async with client.get(f"/v1/devices/{amqp}/methods") as stream:
        await listening(sidecar, amqp, "methods")
        invoke = hub.method_invoker(amqp)
        assert invoke is not None
        call = asyncio.ensure_future(invoke("ping", None, 10.0))
        _, event = await next_event(stream)
        _validate("MethodEvent", event)
        await conforms(await client.post(f"/v1/devices/{amqp}/methods/{event['rid']}/response",
                                         json={"status": 201, "payload": [1, 2]}))
        assert await call == (201, [1, 2])
    async with client.get(f"/v1/devices/{mqtt}/twin/desired") as stream:
        await listening(sidecar, mqtt, "desired")
        hub.update_desired(mqtt, {"mode": "eco"})
        _, event = await next_event(stream)
        _validate("DesiredEvent", event)


def _validate(schema: str, data: dict[str, Any]) -> None:
    """One stream event's data against its named schema (with format checks)."""
    from jsonschema import Draft202012Validator, FormatChecker

    doc = json.loads(openapi_text())
    validator = Draft202012Validator({"$ref": f"#/components/schemas/{schema}", "components": doc["components"]},
                                     format_checker=FormatChecker())
    validator.validate(data)


async def test_system_properties_reach_the_transport_and_times_are_rfc3339(tmp_path: Path, start_sidecar: Any):
    run = await start_sidecar(fake_config(tmp_path))
    client = run.client
    resp = await client.post("/v1/devices/dev-mqtt/messages", data=b'{"t": 1}', headers={
        "Content-Type": "application/json", "iothub-contentencoding": "utf-8", "iothub-correlationid": "corr-9",
        "iothub-app-room": "kitchen"})
    first = (await resp.json())["id"]
    resp = await client.post("/v1/devices/dev-mqtt/messages", data=b"raw",
                             headers={"iothub-creation-time-utc": "2026-01-31T12:00:00Z"})
    second = (await resp.json())["id"]
    await run.wait_for(lambda: {m.id for m in run.upstream.received} >= {first, second})
    sent = {m.id: m for m in run.upstream.received}
    a, b = sent[first], sent[second]
    assert (a.content_type, a.content_encoding, a.correlation_id) == ("application/json", "utf-8", "corr-9")
    assert dict(a.properties) == {"room": "kitchen"}  # system properties never leak into the app's
    assert a.creation_time is not None and rfc3339(a.creation_time)  # the time it was accepted
    assert b.creation_time == "2026-01-31T12:00:00Z" and b.content_type == "application/octet-stream"  # as posted
    bad = await client.post("/v1/devices/dev-mqtt/messages", data=b"x", headers={"iothub-creation-time-utc": "today"})
    assert bad.status == 400
    reserved = await client.post("/v1/devices/dev-mqtt/messages", data=b"x", headers={"iothub-app-$.ct": "x"})
    assert reserved.status == 400  # a '$' name would pass for a system property

    # the hub's acknowledgement is written down after the send's slot is free: wait for it
    await run.wait_for(lambda: run.sidecar.outbox.counts("dev-mqtt")["delivered"] == 2)
    message = await (await client.get(f"/v1/messages/{first}")).json()
    rfc3339(message["accepted_at"])
    rfc3339(message["done_at"])
    device = await (await client.get("/v1/devices/dev-mqtt")).json()
    rfc3339(device["since"])


async def test_delivered_events_on_the_event_stream(tmp_path: Path, start_sidecar: Any):
    run = await start_sidecar(fake_config(tmp_path))
    async with run.client.get("/v1/events?after=0") as stream:
        mid = (await (await run.client.post("/v1/devices/dev-http/messages", data=b"x")).json())["id"]
        async with asyncio.timeout(10):
            while True:
                kind, data = await next_event(stream)
                if kind == "delivered" and data["id"] == mid:
                    break
        _validate("DeliveredEvent", data)
        assert data["device"] == "dev-http" and data["possible_duplicate"] is False


async def test_papercuts(tmp_path: Path, start_sidecar: Any):
    run = await start_sidecar(fake_config(tmp_path, api={"host": "0.0.0.0", "token": "a-long-bearer-token"}))
    client = run.client
    auth = {"Authorization": "Bearer a-long-bearer-token"}
    refused = await client.get("/v1/devices")
    body = await refused.json()
    assert refused.status == 401 and "***" not in body["message"] and "API token" in body["message"]
    assert body["transport"] == "api" and body["action"] == "fail"

    wrong_method = await client.put("/v1/devices", headers=auth)
    assert wrong_method.status == 405 and "GET" in wrong_method.headers["Allow"]
    assert (await wrong_method.json())["code"] == code_of("GenericMethodNotAllowed")

    head = await client.head("/healthz")
    assert head.status == 200
    assert (await client.head("/readyz")).status == 200

    unknown = await client.post("/v1/devices/nobody/messages", data=b"x", headers=auth)
    body = await unknown.json()
    assert unknown.status == 404 and body["name"] == "DeviceNotFound"
    assert body["transport"] == "api" and body["action"] == "fail"  # not the hub's "http" / "stop"

    headers = {**auth, "iothub-messageid": "twice"}
    first = await (await client.post("/v1/devices/dev-mqtt/messages", data=b"x", headers=headers)).json()
    await run.wait_for(lambda: run.sidecar.outbox.get("twice").status == "delivered")  # type: ignore[union-attr]
    again = await (await client.post("/v1/devices/dev-mqtt/messages", data=b"x", headers=headers)).json()
    assert first["status"] == "pending" and first["duplicate"] is False
    assert again["status"] == "delivered" and again["duplicate"] is True  # the stored message's own status


def test_deliveries_do_not_push_state_changes_out_of_the_replay():
    from gateway.sidecar.upstream import EventHub

    hub = EventHub(keep=10)
    hub.publish("state", {"state": "connected"})
    for i in range(50):
        hub.publish("delivered", {"id": str(i)})
    replay = hub.recent(0)
    assert [kind for _, kind, _ in replay].count("state") == 1 and len(replay) == 11
    assert [e[0] for e in replay] == sorted(e[0] for e in replay)


def test_the_demo_reads_the_events_rfc3339_times():
    import io
    import time

    from gateway.sidecar.demo import Story
    from gateway.sidecar.upstream import rfc3339

    out = io.StringIO()
    story = Story(out)
    story.quiet = False
    story.state_event({"device": "d", "state": "throttled", "code": 429001, "name": "ThrottlingException",
                            "action": "throttle", "until": rfc3339(time.time() + 5)})
    assert "next try in" in out.getvalue()
