"""The local API against a sidecar whose upstream is the in-memory fake transport."""

from __future__ import annotations

import asyncio
import json
import platform
from pathlib import Path
from typing import Any

from adapters.amqp import translate as amqp_translate
from adapters.http import translate as http_translate
from adapters.mqtt import translate as mqtt_translate
from adapters.mqtt import translate_topic
from gateway.codes import all_codes, code_of, lookup
from gateway.errors import make_error
from gateway.sidecar.app import make_app
from tests.sidecar.fakes import Upstream, fake_config


async def _error(resp: Any, status: int, code: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert body["errorCode"] == code and body["code"] == code
    assert resp.headers["iothub-errorcode"] == body["name"]
    # Our own HTTP translator reads the API's error back exactly.
    err = http_translate(resp.status, dict(resp.headers), json.dumps(body))
    assert err is not None and err.code == code and err.exact
    return body


async def test_post_is_persisted_then_delivered_with_the_same_id_and_properties(tmp_path: Path, start_sidecar: Any):
    run = await start_sidecar(fake_config(tmp_path))
    resp = await run.client.post("/v1/devices/dev-mqtt/messages", data=b'{"t": 21.5}',
                                 headers={"Content-Type": "application/json", "iothub-app-room": "kitchen"})
    assert resp.status == 202
    body = await resp.json()
    mid = body["id"]
    assert resp.headers["Location"] == f"/v1/messages/{mid}"
    assert run.sidecar.outbox.get(mid) is not None  # durable before the answer
    await run.wait_for(lambda: any(m.id == mid for m in run.upstream.received))
    sent = next(m for m in run.upstream.received if m.id == mid)
    assert sent.body == b'{"t": 21.5}' and sent.device_id == "dev-mqtt" and dict(sent.properties) == {"room": "kitchen"}
    await run.wait_for(lambda: run.sidecar.outbox.get(mid).status == "delivered")  # type: ignore[union-attr]
    got = await (await run.client.get(f"/v1/messages/{mid}")).json()
    assert got["status"] == "delivered" and got["possible_duplicate"] is False


async def test_client_message_id_is_idempotent(tmp_path: Path, start_sidecar: Any):
    run = await start_sidecar(fake_config(tmp_path))
    first = await run.client.post("/v1/devices/dev-http/messages", data=b"x", headers={"iothub-messageid": "m-1"})
    again = await run.client.post("/v1/devices/dev-http/messages", data=b"x", headers={"iothub-messageid": "m-1"})
    assert first.status == again.status == 202
    assert (await first.json())["duplicate"] is False and (await again.json())["duplicate"] is True
    assert run.sidecar.outbox.counts()["pending"] + run.sidecar.outbox.counts()["inflight"] + \
        run.sidecar.outbox.counts()["delivered"] == 1
    other = await run.client.post("/v1/devices/dev-mqtt/messages", data=b"x", headers={"iothub-messageid": "m-1"})
    await _error(other, 400, 400004)
    bad = await run.client.post("/v1/devices/dev-mqtt/messages", data=b"x", headers={"iothub-messageid": "a b"})
    await _error(bad, 400, 400004)


async def test_api_errors_follow_the_catalog(tmp_path: Path, start_sidecar: Any):
    run = await start_sidecar(fake_config(tmp_path, api={"max_body": 100}))
    c = run.client
    await _error(await c.post("/v1/devices/nobody/messages", data=b"x"), 404, 404001)
    await _error(await c.get("/v1/devices/nobody"), 404, 404001)
    await _error(await c.post("/v1/classify", data=b"{not json"), 400, 400004)
    await _error(await c.post("/v1/classify", data=b"[1, 2]"), 400, 400004)
    await _error(await c.post("/v1/devices/dev-mqtt/messages", data=b"{oops",
                              headers={"Content-Type": "application/json"}), 400, 400004)
    body = await _error(await c.post("/v1/devices/dev-mqtt/messages", data=b"x" * 101), 413, 413001)
    assert "100" in body["message"]
    await _error(await c.post("/v1/classify", data=b"{" + b" " * 200 + b"}"), 413, 413001)
    await _error(await c.post("/v1/devices/dev-mqtt/messages?ttl=-1", data=b"x"), 400, 400004)
    await _error(await c.get("/v1/messages/no-such-id"), 404, 404000)
    await _error(await c.get("/v1/no-such-route"), 404, 404000)
    await _error(await c.delete("/v1/devices"), 405, 405000)
    await _error(await c.get("/v1/dead-letters?limit=0"), 400, 400004)
    assert run.sidecar.outbox.counts()["pending"] == 0 and len(run.upstream.received) == 0


async def test_outbox_full_is_backpressure_with_retry_after(tmp_path: Path, start_sidecar: Any):
    up = Upstream(block=asyncio.Event())  # nothing is ever acknowledged: the outbox fills
    run = await start_sidecar(fake_config(tmp_path, outbox={"max_messages": 3}), up)
    ids = []
    for _ in range(3):
        resp = await run.client.post("/v1/devices/dev-mqtt/messages", data=b"x")
        assert resp.status == 202
        ids.append((await resp.json())["id"])
    full = await run.client.post("/v1/devices/dev-mqtt/messages", data=b"x")
    body = await _error(full, 429, 429001)
    assert int(full.headers["Retry-After"]) >= 1 and "outbox is full" in body["message"]
    assert len(run.sidecar.outbox) == 3  # refused, not silently dropped nor stored
    up.block.set()  # type: ignore[union-attr]
    await run.wait_for(lambda: all(run.sidecar.outbox.get(i).status == "delivered" for i in ids))  # type: ignore[union-attr]
    assert (await run.client.post("/v1/devices/dev-mqtt/messages", data=b"x")).status == 202


async def test_classify_the_four_body_shapes(tmp_path: Path, start_sidecar: Any):
    run = await start_sidecar(fake_config(tmp_path))
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"transport": "http", "status": 429, "headers": {"Retry-After": "7"},
          "body": '{"errorCode":429001,"trackingId":"t-1","message":"slow down"}'},
         http_translate(429, {"Retry-After": "7"}, '{"errorCode":429001,"trackingId":"t-1","message":"slow down"}')),
        ({"transport": "mqtt", "reason_code": 142, "protocol_version": 5, "packet": "disconnect"},
         mqtt_translate(142, protocol_version=5, packet="disconnect")),
        ({"transport": "mqtt", "topic": "$iothub/twin/res/429/?$rid=1"},
         translate_topic("$iothub/twin/res/429/?$rid=1")),
        ({"transport": "amqp", "condition": "amqp:link:stolen", "description": "taken over",
          "info": {"com.microsoft:tracking-id": "x"}},
         amqp_translate("amqp:link:stolen", "taken over", {"com.microsoft:tracking-id": "x"})),
    ]
    for request, expected in cases:
        resp = await run.client.post("/v1/classify", json=request)
        assert resp.status == 200, await resp.text()
        assert await resp.json() == json.loads(json.dumps(expected.to_dict())), request
    assert (await run.client.post("/v1/classify", json={"transport": "mqtt", "topic": "$iothub/twin/res/429/?$rid=1"})
            ).status == 200
    assert (await run.client.post("/v1/classify", json={"transport": "http", "status": 204})).status == 200
    assert await (await run.client.post("/v1/classify", json={"transport": "http", "status": 204})).json() == \
        {"error": None}
    codes = {(await run.client.post("/v1/classify", json=r)).status for r in (
        {"transport": "smtp"}, {"transport": "http", "status": "429"}, {"transport": "http", "status": 99},
        {"transport": "mqtt", "reason_code": 999}, {"transport": "amqp", "condition": 5},
        {"transport": "http", "status": 429, "extra": 1})}
    assert codes == {400}


async def test_codes(tmp_path: Path, start_sidecar: Any):
    run = await start_sidecar(fake_config(tmp_path))
    listed = (await (await run.client.get("/v1/codes")).json())["codes"]
    assert [row["code"] for row in listed] == [row.code for row in all_codes()]
    by_number = await (await run.client.get("/v1/codes/429001")).json()
    by_name = await (await run.client.get("/v1/codes/ThrottlingException")).json()
    assert by_number == by_name and by_number["name"] == "ThrottlingException" and by_number["action"] == "throttle"
    family = await (await run.client.get("/v1/codes/429999")).json()
    assert family["known"] is False and family["code"] // 1000 == 429
    await _error(await run.client.get("/v1/codes/NoSuchCode"), 404, 404000)


async def test_device_status_shows_state_last_error_and_counts(tmp_path: Path, start_sidecar: Any):
    up = Upstream(send_script={"dev-mqtt": [make_error(429001, transport="mqtt", retry_after=0.05)]})
    run = await start_sidecar(fake_config(tmp_path), up)
    devices = (await (await run.client.get("/v1/devices")).json())["devices"]
    assert {d["id"] for d in devices} == {"dev-mqtt", "dev-http"}
    mid = (await (await run.client.post("/v1/devices/dev-mqtt/messages", data=b"x")).json())["id"]
    await run.wait_for(lambda: run.sidecar.outbox.get(mid).status == "delivered")  # type: ignore[union-attr]
    dev = await (await run.client.get("/v1/devices/dev-mqtt")).json()
    assert dev["state"] == "connected" and dev["protocol"] == "mqtt"
    assert dev["last_error"]["code"] == 429001 and dev["last_error"]["name"] == "ThrottlingException"
    assert dev["last_error"]["action"] == "throttle"
    assert dev["messages"]["delivered"] == 1 and dev["queued"] == 0 and dev["held"] == 0


async def test_permanent_refusal_is_dead_lettered_with_its_code(tmp_path: Path, start_sidecar: Any):
    up = Upstream(send_script={"dev-http": [make_error(400004, transport="http", message="bad property")]})
    run = await start_sidecar(fake_config(tmp_path), up)
    mid = (await (await run.client.post("/v1/devices/dev-http/messages", data=b"x")).json())["id"]
    await run.wait_for(lambda: run.sidecar.outbox.get(mid).status == "dead")  # type: ignore[union-attr]
    got = await (await run.client.get(f"/v1/messages/{mid}")).json()
    assert got["code"] == 400004 and got["name"] == "ArgumentInvalid"
    dead = (await (await run.client.get("/v1/dead-letters?device=dev-http")).json())["dead_letters"]
    assert [d["id"] for d in dead] == [mid]
    assert (await (await run.client.get("/v1/dead-letters?device=dev-mqtt")).json())["dead_letters"] == []


async def test_transient_failure_is_retried_not_dead_lettered(tmp_path: Path, start_sidecar: Any):
    # retry budget of one attempt: the handler gives up at once, the pipeline keeps the message pending
    cfg = fake_config(tmp_path, policy={"retry": {"max_attempts": 1, "initial": 0.01, "cap": 0.01}})
    up = Upstream(send_script={"dev-http": [make_error(500001, transport="http")] * 2})
    run = await start_sidecar(cfg, up)
    mid = (await (await run.client.post("/v1/devices/dev-http/messages", data=b"x")).json())["id"]
    await run.wait_for(lambda: run.sidecar.outbox.get(mid).status == "delivered", timeout=15)  # type: ignore[union-attr]
    assert run.sidecar.outbox.get(mid).attempts == 3  # type: ignore[union-attr]


async def test_message_deadline_dead_letters_with_the_blocking_code(tmp_path: Path, start_sidecar: Any):
    up = Upstream(block=asyncio.Event())
    run = await start_sidecar(fake_config(tmp_path), up)
    mid = (await (await run.client.post("/v1/devices/dev-mqtt/messages?ttl=0.2", data=b"x")).json())["id"]
    await run.wait_for(lambda: run.sidecar.outbox.get(mid).status == "dead")  # type: ignore[union-attr]
    item = run.sidecar.outbox.get(mid)
    # the send was in flight when the deadline passed: outcome unknown, dead-lettered as OperationTimedOut
    assert item is not None and item.code == code_of("OperationTimedOut") and "deadline" in (item.reason or "")


async def test_events_stream_state_changes(tmp_path: Path, start_sidecar: Any):
    run = await start_sidecar(fake_config(tmp_path, policy={"reconnect": {"initial": 0.05, "cap": 0.05}}))
    resp = await run.client.get("/v1/events")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    await run.wait_for(lambda: "dev-mqtt" in run.upstream.transports)
    run.upstream.transports["dev-mqtt"].drop(make_error(503001, transport="mqtt", message="hub restarting"))
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while not any(e["state"] == "connected" for e in seen[1:]):
            line = (await resp.content.readline()).decode()
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
    down = next(e for e in seen if e["state"] == "disconnected-retrying")
    assert down["device"] == "dev-mqtt" and down["code"] == 503001 and down["name"] == "ServiceUnavailable"
    assert down["action"] == "retry" and down["until"] is not None
    resp.close()
    # late joiners get the recent events replayed
    replay = await run.client.get("/v1/events?after=0")
    async with asyncio.timeout(5):
        while True:
            line = (await replay.content.readline()).decode()
            if line.startswith("data: ") and json.loads(line[6:]).get("code") == 503001:
                break
    replay.close()


async def test_metrics(tmp_path: Path, start_sidecar: Any):
    up = Upstream(send_script={"dev-http": [make_error(400004, transport="http")]})
    run = await start_sidecar(fake_config(tmp_path), up)
    for device in ("dev-http", "dev-mqtt"):
        await run.client.post(f"/v1/devices/{device}/messages", data=b"x")
    await run.wait_for(lambda: run.sidecar.outbox.counts()["pending"] + run.sidecar.outbox.counts()["inflight"] == 0)
    await run.client.post("/v1/devices/nobody/messages", data=b"x")
    resp = await run.client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert 'iothub_gateway_messages_total{code="",outcome="delivered",transport="mqtt"} 1.0' in text
    assert 'iothub_gateway_messages_total{code="400004",outcome="dead_letter",transport="http"} 1.0' in text
    assert 'iothub_gateway_messages_total{code="404001",outcome="rejected",transport="api"} 1.0' in text
    assert 'iothub_gateway_delivery_latency_seconds_count{transport="mqtt"} 1.0' in text
    assert 'iothub_gateway_outbox_messages{status="delivered"} 1.0' in text
    assert 'iothub_gateway_queue_depth{device="dev-mqtt",transport="mqtt"} 0.0' in text
    assert 'iothub_gateway_connection_state{device="dev-mqtt",state="connected",transport="mqtt"} 1.0' in text
    assert 'iothub_gateway_handler_events_total{code="400004",outcome="dead_letter",transport="http"} 1.0' in text
    # Prometheus conventions: build info, process metrics, no _created series, a last-error gauge per device.
    from gateway.cli import package_version

    assert f'iothub_gateway_build_info{{python="{platform.python_version()}",version="{package_version()}"}} 1.0' \
        in text
    assert "process_resident_memory_bytes " in text and "process_start_time_seconds " in text
    assert "_created" not in text
    last = [line for line in text.splitlines() if line.startswith("iothub_gateway_device_last_error_timestamp")]
    assert len(last) == 1, last  # only the device that failed, once
    series, value = last[0].rsplit(" ", 1)
    assert series == ('iothub_gateway_device_last_error_timestamp_seconds{code="400004",device="dev-http",'
                      f'name="{lookup(400004).name}",transport="http"}}')
    assert float(value) == run.sidecar.pipelines["dev-http"].last_error_at


async def test_health_and_readiness(tmp_path: Path, start_sidecar: Any):
    run = await start_sidecar(fake_config(tmp_path))
    assert (await run.client.get("/healthz")).status == 200
    assert (await run.client.get("/readyz")).status == 200
    run.sidecar.accepting = False
    assert (await run.client.get("/readyz")).status == 503
    await _error(await run.client.post("/v1/devices/dev-mqtt/messages", data=b"x"), 503, 503001)


async def test_restart_resumes_pending_messages(tmp_path: Path, start_sidecar: Any):
    blocked = Upstream(block=asyncio.Event())
    first = await start_sidecar(fake_config(tmp_path), blocked)
    ids = [(await (await first.client.post("/v1/devices/dev-mqtt/messages", data=str(i).encode())).json())["id"]
           for i in range(20)]
    await first.client.close()
    await first.sidecar.stop()  # the shutdown deadline passes with sends in flight: they go back to pending
    assert blocked.received == []
    second = await start_sidecar(fake_config(tmp_path))
    await second.wait_for(lambda: all(second.sidecar.outbox.get(i).status == "delivered" for i in ids))  # type: ignore[union-attr]
    assert sorted(m.id for m in second.upstream.received) == sorted(ids)


def test_openapi_document_matches_the_routes(tmp_path: Path):
    from gateway.sidecar.app import openapi_text
    from gateway.sidecar.service import Sidecar

    doc = json.loads(openapi_text())
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    app = make_app(Sidecar(fake_config(tmp_path)))
    routed = {(route.method, route.resource.canonical) for route in app.router.routes()
              if route.resource is not None and route.method != "HEAD"}
    assert documented == routed
    for path, ops in doc["paths"].items():
        for op in ops.values():
            params = {p["name"] for p in op.get("parameters", ()) if p["in"] == "path"}
            assert params == {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}, path
