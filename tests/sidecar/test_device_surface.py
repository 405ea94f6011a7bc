"""The device surface through the local API over each real transport to the bundled emulator (loopback
sockets): C2D streamed and settled by the app, direct methods answered by the app, the twin."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from gateway.codes import code_of
from gateway.emulator import Operation
from gateway.sidecar.service import Sidecar
from gateway.sidecar.surface import NO_SUBSCRIBER_STATUS

DEVICES = {"mqtt": "demo-mqtt", "amqp": "demo-amqp", "http": "demo-http"}
WAIT = 20.0


@pytest.fixture
async def emulated(emulated_sidecar: Any) -> tuple[Sidecar, TestClient[Any, Any]]:
    started: tuple[Sidecar, TestClient[Any, Any]] = await emulated_sidecar(
        {"policy": {"throttle": {"initial": 0.05, "cap": 0.1}},
         "delivery": {"c2d_poll_interval": 0.05}})  # HTTP C2D polling, fast for the test
    return started


async def next_event(resp: ClientResponse, timeout: float = WAIT) -> tuple[str, dict[str, Any]]:
    """The next server-sent event (comments and retry lines skipped)."""
    kind, data = "message", []
    async with asyncio.timeout(timeout):
        while True:
            raw = await resp.content.readline()
            assert raw, "the stream ended"
            line = raw.decode().rstrip("\r\n")
            if not line:
                if data:
                    return kind, json.loads("\n".join(data))
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                kind = value
            elif field == "data":
                data.append(value)


async def connected(client: TestClient[Any, Any], device: str) -> None:
    async with asyncio.timeout(WAIT):
        while (await (await client.get(f"/v1/devices/{device}")).json())["state"] != "connected":
            await asyncio.sleep(0.02)


async def listening(sidecar: Sidecar, device: str, kind: str) -> None:
    async with asyncio.timeout(WAIT):
        while sidecar.pipelines[device].surface.listeners()[kind] == 0:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("protocol", ["mqtt", "amqp", "http"])
async def test_c2d_reaches_the_app_with_its_lock_and_is_settled_only_by_the_app(emulated: Any, protocol: str):
    sidecar, client = emulated
    device = DEVICES[protocol]
    hub = sidecar.emulator.hub
    await connected(client, device)
    # No app listens: the message stays with the hub (queued, or locked but unsettled), never completed.
    hub.send_c2d(device, b'{"cmd": "on"}', message_id="c-1", properties={"k": "v"}, correlation_id="corr-1")
    await asyncio.sleep(0.3)
    state = hub.device(device)
    assert len(state.c2d) + len(state.locked) == 1
    assert not [f for f in hub.feedback if f.message_id == "c-1"]

    async with client.get(f"/v1/devices/{device}/c2d") as stream:
        assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
        kind, msg = await next_event(stream)
        assert kind == "c2d"
        assert msg["message_id"] == "c-1" and msg["correlation_id"] == "corr-1"
        assert msg["body"] == '{"cmd": "on"}' and msg["properties"].get("k") == "v"
        assert msg["received_at"].endswith("Z")
        assert len(hub.device(device).locked) == 1  # still the app's to settle

        settle = await client.post(f"/v1/devices/{device}/c2d/{msg['lock']}/complete")
        assert settle.status == 204, await settle.text()
        # MQTT's PUBACK has no answer: 204 says it was sent; the hub settles it when it reads it
        async with asyncio.timeout(5):
            while hub.device(device).locked:
                await asyncio.sleep(0.01)
        assert not hub.device(device).c2d
        again = await client.post(f"/v1/devices/{device}/c2d/{msg['lock']}/complete")
        body = await again.json()
        assert again.status == 412 and body["name"] == "DeviceMessageLockLost" and body["transport"] == "api"

        hub.send_c2d(device, b"second", message_id="c-2")
        kind, msg = await next_event(stream)
        assert msg["message_id"] == "c-2"
        reject = await client.post(f"/v1/devices/{device}/c2d/{msg['lock']}/reject")
        if protocol == "mqtt":  # MQTT has no negative acknowledgement: said with a code, the lock stays
            body = await reject.json()
            assert reject.status == 501 and body["name"] == "GenericNotImplemented" and body["transport"] == "mqtt"
            done = await client.post(f"/v1/devices/{device}/c2d/{msg['lock']}/complete")
            assert done.status == 204
        else:
            assert reject.status == 204, await reject.text()
            assert [e.message_id for _, e in hub.dead_letters] == ["c-2"]


@pytest.mark.parametrize("protocol", ["amqp", "http"])
async def test_a_message_the_app_left_unsettled_goes_to_the_next_app(emulated: Any, protocol: str):
    sidecar, client = emulated
    device = DEVICES[protocol]
    hub = sidecar.emulator.hub
    await connected(client, device)
    async with client.get(f"/v1/devices/{device}/c2d") as stream:
        hub.send_c2d(device, b"x", message_id="left")
        _, first = await next_event(stream)
        assert first["message_id"] == "left"
    async with client.get(f"/v1/devices/{device}/c2d") as stream:
        _, second = await next_event(stream)
        assert second["message_id"] == "left"
        assert (await client.post(f"/v1/devices/{device}/c2d/{second['lock']}/complete")).status == 204
    assert not hub.device(device).locked and not hub.device(device).c2d


@pytest.mark.parametrize("protocol", ["mqtt", "amqp"])
async def test_direct_methods_reach_the_subscribed_app_and_its_answer_reaches_the_caller(emulated: Any,
                                                                                         protocol: str):
    sidecar, client = emulated
    device = DEVICES[protocol]
    hub = sidecar.emulator.hub
    await connected(client, device)
    invoke = hub.method_invoker(device)
    assert invoke is not None
    # No app subscribed: answered at once with the SDKs' "not implemented", not left to time out.
    status, payload = await invoke("reboot", {"delay": 1}, 10.0)
    assert status == NO_SUBSCRIBER_STATUS and "no application" in payload["message"]

    async with client.get(f"/v1/devices/{device}/methods") as stream:
        await listening(sidecar, device, "methods")
        call = asyncio.ensure_future(invoke("reboot", {"delay": 2}, 10.0))
        kind, event = await next_event(stream)
        assert kind == "method" and event["name"] == "reboot" and event["payload"] == {"delay": 2}
        answer = await client.post(f"/v1/devices/{device}/methods/{event['rid']}/response",
                                   json={"status": 200, "payload": {"rebooting": True}})
        assert answer.status == 204, await answer.text()
        assert await asyncio.wait_for(call, WAIT) == (200, {"rebooting": True})
        late = await client.post(f"/v1/devices/{device}/methods/{event['rid']}/response", json={"status": 200})
        assert late.status == 404 and (await late.json())["transport"] == "api"
        bad = await client.post(f"/v1/devices/{device}/methods/x/response", json={"status": "ok"})
        assert bad.status == 400


@pytest.mark.parametrize("protocol", ["mqtt", "amqp"])
async def test_twin_get_patch_reported_and_desired_stream(emulated: Any, protocol: str):
    sidecar, client = emulated
    device = DEVICES[protocol]
    hub = sidecar.emulator.hub
    await connected(client, device)
    patched = await client.patch(f"/v1/devices/{device}/twin/reported", json={"firmware": "1.2"})
    assert patched.status == 200, await patched.text()
    version = (await patched.json())["version"]
    assert version is None or isinstance(version, int)
    assert hub.device(device).twin_reported.get("firmware") == "1.2"
    twin = await (await client.get(f"/v1/devices/{device}/twin")).json()
    assert twin["reported"]["firmware"] == "1.2"

    async with client.get(f"/v1/devices/{device}/twin/desired") as stream:
        await listening(sidecar, device, "desired")
        hub.update_desired(device, {"interval": 5})
        kind, event = await next_event(stream)
        assert kind == "desired" and event["patch"]["interval"] == 5


async def test_http_devices_say_which_surface_they_lack(emulated: Any):
    _, client = emulated
    device = DEVICES["http"]
    await connected(client, device)
    resp = await client.get(f"/v1/devices/{device}/methods")
    body = await resp.json()
    assert resp.status == 501 and body["name"] == "GenericNotImplemented" and body["transport"] == "http"
    resp = await client.patch(f"/v1/devices/{device}/twin/reported", json={"a": 1})
    assert resp.status == 501 and "mqtt or amqp" in (await resp.json())["message"].lower()
    twin = await client.get(f"/v1/devices/{device}/twin")  # the device REST surface reads its own twin
    assert twin.status == 200, await twin.text()
    assert "reported" in (await twin.json()).get("properties", await twin.json())
    resp = await client.get("/v1/devices/nobody/c2d")
    body = await resp.json()
    assert resp.status == 404 and body["transport"] == "api" and body["action"] == "fail"


@pytest.mark.parametrize("protocol", ["mqtt", "amqp"])
async def test_hub_refusals_come_back_as_their_codes_through_the_handler(emulated: Any, protocol: str):
    """The handler's behaviour applies: a throttled twin patch is retried and succeeds; a refusal comes
    back with its code and the upstream transport's name."""
    sidecar, client = emulated
    device = DEVICES[protocol]
    hub = sidecar.emulator.hub
    await connected(client, device)
    hints = {} if protocol == "mqtt" else {"retry_after": 0.05}
    hub.plan.add(Operation.TWIN_PATCH, code_of("ThrottlingException"), device=device, transport=protocol, **hints)
    ok = await client.patch(f"/v1/devices/{device}/twin/reported", json={"after": "throttle"})
    assert ok.status == 200, await ok.text()
    assert hub.device(device).twin_reported.get("after") == "throttle"

    hub.plan.add(Operation.TWIN_PATCH, code_of("ArgumentInvalid"), device=device, transport=protocol)
    refused = await client.patch(f"/v1/devices/{device}/twin/reported", json={"x": 1})
    body = await refused.json()
    assert refused.status == 400 and body["code"] // 1000 == 400 and body["transport"] == protocol


@pytest.mark.parametrize("protocol", ["amqp", "http"])
async def test_a_settle_the_hub_refuses_answers_its_code(emulated: Any, protocol: str):
    sidecar, client = emulated
    device = DEVICES[protocol]
    hub = sidecar.emulator.hub
    await connected(client, device)
    async with client.get(f"/v1/devices/{device}/c2d") as stream:
        hub.send_c2d(device, b"x", message_id="lost")
        _, msg = await next_event(stream)
        hub.plan.add(Operation.C2D_SETTLE, code_of("DeviceMessageLockLost"), device=device, transport=protocol)
        resp = await client.post(f"/v1/devices/{device}/c2d/{msg['lock']}/complete")
        body = await resp.json()
        assert resp.status == 412 and body["name"] == "DeviceMessageLockLost" and body["transport"] == protocol


@pytest.mark.parametrize("protocol", ["mqtt", "amqp"])
async def test_past_the_hold_bound_messages_stay_with_the_hub_unsettled(emulated_sidecar: Any, protocol: str):
    device = "bounded"
    sidecar, client = await emulated_sidecar({"delivery": {"c2d_max_held": 1},
                                              "devices": [{"id": device, "protocol": protocol}]})
    hub = sidecar.emulator.hub
    await connected(client, device)
    for mid in ("one", "two", "three"):
        hub.send_c2d(device, mid.encode(), message_id=mid)
    async with asyncio.timeout(WAIT):
        while not sidecar.pipelines[device].surface._held:
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    async with client.get(f"/v1/devices/{device}/c2d") as stream:
        _, msg = await next_event(stream)
        assert msg["message_id"] == "one"
        assert (await client.post(f"/v1/devices/{device}/c2d/{msg['lock']}/complete")).status == 204
    await asyncio.sleep(0.3)
    state = hub.device(device)
    waiting = {e.message_id for e in state.locked.values()} | {getattr(e, "message_id", None) for e in state.c2d}
    assert {"two", "three"} <= waiting  # not completed, not abandoned into a redelivery loop
    assert not hub.dead_letters and all(e.delivery_count <= 1 for e in state.locked.values())


async def test_a_lost_connection_voids_the_locks_it_gave(tmp_path: Path, start_sidecar: Any):
    """MQTT/AMQP locks die with their connection: the app's late settle is 412 DeviceMessageLockLost (the
    hub redelivers the message), and nothing held from the dead connection is streamed later."""
    from gateway.errors import make_error
    from gateway.transport import C2DMessage, Inbound
    from tests.sidecar.fakes import fake_config

    run = await start_sidecar(fake_config(tmp_path, ("dev-amqp", "amqp")))
    transport = run.upstream.transports["dev-amqp"]
    await run.wait_for(lambda: run.sidecar.pipelines["dev-amqp"].handler.state.value == "connected")
    async with run.client.get("/v1/devices/dev-amqp/c2d") as stream:
        transport.emit(Inbound("c2d", C2DMessage("dev-amqp", "lock-1", "m-1", b"x"), "dev-amqp"))
        _, msg = await next_event(stream)
        assert msg["lock"] == "lock-1"
        transport.drop(make_error(code_of("ServerBusy"), transport="amqp"))
        await run.wait_for(lambda: not run.sidecar.pipelines["dev-amqp"].surface._outstanding)
        late = await run.client.post("/v1/devices/dev-amqp/c2d/lock-1/complete")
        body = await late.json()
        assert late.status == 412 and body["name"] == "DeviceMessageLockLost"


async def test_http_desired_stream_polls_the_twin_and_sends_the_whole_desired_section(emulated_sidecar: Any):
    """IoT Hub's HTTP device API has no push: the sidecar reads the twin (GetTwin through the handler) every
    twin_poll_interval while an app listens, and a grown desired.$version becomes one event."""
    sidecar, client = await emulated_sidecar({"delivery": {"twin_poll_interval": 0.05}})
    device = DEVICES["http"]
    hub = sidecar.emulator.hub
    surface = sidecar.pipelines[device].surface
    await connected(client, device)
    hub.update_desired(device, {"before": 1})  # made before anyone listened: the first read is the baseline
    async with client.get(f"/v1/devices/{device}/twin/desired") as stream:
        assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
        async with asyncio.timeout(WAIT):
            while surface.desired_version is None:  # the first read sets the version to compare with
                await asyncio.sleep(0.01)
        baseline = surface.desired_version
        assert baseline == hub.twin_properties(device)["desired"]["$version"]
        version = hub.update_desired(device, {"interval": 5, "mode": {"eco": True}})  # the service's patch
        kind, event = await next_event(stream)
        assert kind == "desired" and event["version"] == version > baseline and event["whole"] is True
        assert event["patch"]["interval"] == 5 and event["patch"]["mode"] == {"eco": True}
        assert event["patch"]["before"] == 1 and "$metadata" not in event["patch"]  # the whole section
        # no change, no event: the next one is the next change
        version = hub.update_desired(device, {"interval": None})
        kind, event = await next_event(stream)
        assert event["version"] == version and "interval" not in event["patch"]
    async with asyncio.timeout(WAIT):  # the app left: the polling stops with it
        while surface.listeners()["desired"] or not surface._twin_poller or not surface._twin_poller.done():
            await asyncio.sleep(0.02)
