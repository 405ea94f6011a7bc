"""The emulator's MQTT front with the adapter (paho) as its client: IoT Hub's own answers, the round
trip of every code MQTT can carry, and the handler riding out what the fault plan scripts."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapters.mqtt import render
from adapters.mqtt.codec import MQTT_5, ConnAck, Disconnect, PubAck, Publish
from adapters.mqtt.emulator import MqttFront
from adapters.mqtt.transport import MqttAnswer, MqttTransport
from gateway.codes import all_codes, lookup
from gateway.emulator import FaultKind, Hub, Operation
from gateway.emulator.front import Front, FrontConfig
from gateway.errors import IoTHubError
from gateway.handler import Handler, Receipt, State, Undelivered
from gateway.policy import Policy, PolicyConfig
from gateway.sas import make_sas_token
from gateway.transport import (
    C2DMessage,
    Disconnected,
    GetTwin,
    Inbound,
    InvokeMethod,
    Message,
    MethodCall,
    PatchReported,
    RespondMethod,
    UnsupportedRequest,
)
from tests.peers.mosquitto import RawClient
from tests.peers.tls import TlsFiles


@pytest.fixture
def front(mqtt_front: MqttFront) -> MqttFront:
    return mqtt_front

PROTOCOLS = [pytest.param(4, id="mqtt311"), pytest.param(5, id="mqtt5")]


def make(hub: Hub, front: MqttFront, device: str = "d1", protocol: int = 4, **kw: Any) -> MqttTransport:
    kw.setdefault("ssl", None)
    kw.setdefault("connect_timeout", 5)
    kw.setdefault("send_timeout", 5)
    return MqttTransport(hub.connection_string(device), host="127.0.0.1", port=front.port, protocol=protocol, **kw)


@contextlib.asynccontextmanager
async def connected(t: MqttTransport) -> AsyncIterator[MqttTransport]:
    await asyncio.wait_for(t.connect(), 10)
    try:
        yield t
    finally:
        await asyncio.wait_for(t.close(), 10)


async def failure(aw: Any, timeout: float = 5.0) -> IoTHubError:
    """The IoTHubError ``aw`` raises (a success or another exception fails the test)."""
    try:
        await asyncio.wait_for(aw, timeout)
    except IoTHubError as exc:
        return exc
    raise AssertionError("expected an IoTHubError")


def test_is_a_front(hub: Hub) -> None:
    assert isinstance(MqttFront(hub), Front)


# -- connect and authentication -------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_telemetry_is_recorded_with_its_message_id(hub: Hub, front: MqttFront, protocol: int) -> None:
    async with connected(make(hub, front, protocol=protocol)) as t:
        await asyncio.wait_for(t.send(Message("m-1", "d1", b"payload", {"k": "v w"})), 5)
    assert hub.received_ids("d1") == ["m-1"]
    assert hub.received[0].properties == {"k": "v w"} and hub.received[0].transport == "mqtt"


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("case", "code"),
    [("expired", 401003), ("wrong-key", 401003), ("unknown", 401003), ("disabled", 503001), ("wrong-hub", 401003)],
)
async def test_authentication_refusals(hub: Hub, front: MqttFront, protocol: int, case: str, code: int) -> None:
    kw: dict[str, Any] = {}
    device = "d1"
    if case == "expired":
        kw["sas_token"] = hub.token("d1", expiry=1_000)
    elif case == "wrong-key":
        kw["sas_token"] = make_sas_token(f"{hub.host_name}/devices/d1", "b3RoZXIta2V5", 4_000_000_000)
    elif case == "unknown":
        device = "nobody"
    elif case == "disabled":
        hub.add_device("d1").enabled = False
    t = make(hub, front, device, protocol, **kw)
    if case == "unknown":
        hub._devices.pop("nobody")  # connection_string() registered it
    if case == "wrong-hub":
        t.connection = type(t.connection)("other.azure-devices.net", "d1", t.connection.shared_access_key)
        t.set_sas_token(hub.token("d1", expiry=4_000_000_000))
    err = await failure(t.connect(), 10)
    assert err.code == code
    assert isinstance(err.__cause__, MqttAnswer) and err.__cause__.packet == "connack"
    # IoT Hub refuses every credential problem with "not authorized": CONNACK 5, MQTT 5's 0x87
    rc = getattr(err.__cause__.reason_code, "value", err.__cause__.reason_code)
    if case != "disabled":
        assert rc == 0x87  # paho hands 3.1.1 CONNACK 5 over as 0x87 too; tests/emulator checks the raw 5
    assert hub.online() == {}


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_second_connection_takes_over(hub: Hub, front: MqttFront, protocol: int) -> None:
    async with connected(make(hub, front, protocol=protocol)) as first:
        events = first.events()
        async with connected(make(hub, front, protocol=protocol)) as second:
            event = await asyncio.wait_for(anext(events), 5)
            assert isinstance(event, Disconnected)
            if protocol == MQTT_5:  # DISCONNECT 0x8E: IoT Hub says it exactly
                assert event.error.code == 400027 and event.error.exact
            else:  # 3.1.1: the old socket is just closed
                assert event.error.code == 404104
            await asyncio.wait_for(second.send(Message("m", "d1", b"x")), 5)
            assert hub.online() == {"d1": "mqtt"} and front.sessions("d1") == 1


async def test_raw_takeover_bytes_on_mqtt5(hub: Hub, front: MqttFront) -> None:
    first, second = RawClient(MQTT_5), RawClient(MQTT_5)
    user = f"{hub.host_name}/d1/?api-version=2021-04-12"
    token = hub.token("d1", 4_000_000_000)
    try:
        assert (await first.connect("127.0.0.1", front.port, "d1", user, token)).reason_code == 0
        assert (await second.connect("127.0.0.1", front.port, "d1", user, token)).reason_code == 0
        assert await first.expect(Disconnect) == Disconnect(0x8E)
        assert await first.closed()
    finally:
        first.close()
        second.close()


async def test_unsupported_protocol_level_gets_connack_1(hub: Hub, front: MqttFront) -> None:
    raw = RawClient(4)
    await raw.open("127.0.0.1", front.port)
    body = bytes([0, 6]) + b"MQIsdp" + bytes([3, 2, 0, 60, 0, 2]) + b"d1"
    raw.writer.write(bytes([0x10, len(body)]) + body)
    try:
        assert await raw.expect(ConnAck) == ConnAck(1)
    finally:
        raw.close()


async def test_tls_front(hub: Hub, tls_files: TlsFiles) -> None:
    front = MqttFront(hub, FrontConfig(ssl_context=tls_files.server_context()))
    await front.start()
    try:
        t = make(hub, front, ssl=tls_files.client_context())
        async with connected(t):
            await asyncio.wait_for(t.send(Message("tls", "d1", b"x")), 5)
        untrusted = make(hub, front, ssl=True)  # the system trust store does not know the test CA
        err = await failure(untrusted.connect(), 10)
        assert err.code == 401901 and isinstance(err.__cause__, Exception)  # TlsVerificationFailed
    finally:
        await front.stop()
    assert hub.received_ids() == ["tls"]


# -- faults ---------------------------------------------------------------------------------------------


async def test_puback_carries_status_and_trace_id(hub: Hub, front: MqttFront) -> None:
    hub.plan.add(Operation.TELEMETRY, 429001, device="d1", times=2)
    async with connected(make(hub, front, protocol=5)) as t:
        for _ in range(2):
            err = await failure(t.send(Message("m", "d1", b"x")))
            assert err.code == 429001 and err.exact and err.retryable
            assert err.native["status"] == "0501" and err.tracking_id
        await asyncio.wait_for(t.send(Message("m", "d1", b"x")), 5)
    assert hub.received_ids() == ["m"]  # the refused attempts were not recorded


async def test_raw_puback_bytes(hub: Hub, front: MqttFront) -> None:
    hub.plan.add(Operation.TELEMETRY, 403002, device="d1")
    raw = RawClient(MQTT_5)
    try:
        ack = await raw.connect("127.0.0.1", front.port, "d1", f"{hub.host_name}/d1/?api-version=x",
                                hub.token("d1", 4_000_000_000))
        assert ack.reason_code == 0 and ack.properties.values  # IoT Hub's limits are announced
        raw.send(Publish("devices/d1/messages/events/", b"x", 1, 9))
        ack = await raw.expect(PubAck)
        assert (ack.packet_id, ack.reason_code) == (9, 0x97)
        assert ack.properties.user_value("status") == "0502" and ack.properties.user_value("trace-id")
    finally:
        raw.close()


async def test_mqtt311_telemetry_error_drops_the_connection(hub: Hub, front: MqttFront) -> None:
    hub.plan.add(Operation.TELEMETRY, 429001, device="d1")
    async with connected(make(hub, front, protocol=4)) as t:
        events = t.events()
        err = await failure(t.send(Message("m", "d1", b"x")))
        assert err.code == 404104  # 3.1.1 has no failing PUBACK: IoT Hub just drops the client
        assert isinstance(await asyncio.wait_for(anext(events), 5), Disconnected)
    assert hub.received_ids() == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_twin_round_trip_and_errors(hub: Hub, front: MqttFront, protocol: int) -> None:
    hub.device("d1").twin_desired["rate"] = 5  # type: ignore[union-attr]
    hub.plan.add(Operation.TWIN_GET, 429001, device="d1")
    hub.plan.add(Operation.TWIN_PATCH, 412001, device="d1")
    async with connected(make(hub, front, protocol=protocol)) as t:
        err = await failure(t.request(GetTwin(), timeout=5))
        assert err.code == 429001 and err.exact and err.native["status"] == 429 and err.tracking_id
        twin = await asyncio.wait_for(t.request(GetTwin(), timeout=5), 5)
        assert twin["desired"]["rate"] == 5
        err = await failure(t.request(PatchReported({"t": 1}), timeout=5))
        assert err.code == 412001 and isinstance(err.__cause__, MqttAnswer)
        assert await asyncio.wait_for(t.request(PatchReported({"t": 1}), timeout=5), 5) == 2
        with pytest.raises(UnsupportedRequest):  # a programming error, raised at once
            await t.request(InvokeMethod("d1", "nonsense"), timeout=5)


async def test_drop_no_ack_and_delay(hub: Hub, front: MqttFront) -> None:
    hub.plan.add(Operation.TELEMETRY, kind=FaultKind.DELAY, delay=0.2, device="d1")
    hub.plan.add(Operation.TELEMETRY, kind=FaultKind.NO_ACK, device="d1")
    hub.plan.add(Operation.TELEMETRY, kind=FaultKind.DROP, device="d1")
    t = make(hub, front, protocol=5, send_timeout=0.3)
    async with connected(t):
        await asyncio.wait_for(t.send(Message("delayed", "d1", b"x")), 5)
        err = await failure(t.send(Message("unacked", "d1", b"x")))
        assert err.code == 504901  # OperationTimedOut: outcome unknown, the hub did take it
        err = await failure(t.send(Message("dropped", "d1", b"x")))
        assert err.code == 404104
    assert hub.received_ids() == ["delayed", "unacked"]


async def test_cancelled_send_leaves_nothing_pending(hub: Hub, front: MqttFront) -> None:
    hub.plan.add(Operation.TELEMETRY, kind=FaultKind.NO_ACK, device="d1")
    t = make(hub, front, protocol=5, send_timeout=30)
    async with connected(t):
        task = asyncio.ensure_future(t.send(Message("m", "d1", b"x")))
        async with asyncio.timeout(5):
            while hub.received_ids() != ["m"]:
                await asyncio.sleep(0.01)
        task.cancel()  # e.g. the handler's deadline
        with pytest.raises(asyncio.CancelledError):
            await task
        assert t._link is not None and t._link.publishes == {}
        await asyncio.wait_for(t.send(Message("n", "d1", b"x")), 5)
    assert hub.received_ids() == ["m", "n"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_connect_faults(hub: Hub, front: MqttFront, protocol: int) -> None:
    hub.plan.add(Operation.CONNECT, kind=FaultKind.DROP, device="d1")
    hub.plan.add(Operation.CONNECT, kind=FaultKind.NO_ACK, device="d1")
    hub.plan.add(Operation.CONNECT, 503005, device="d1")  # ServerBusy
    err = await failure(make(hub, front, protocol=protocol).connect(), 10)
    assert err.code == 404104
    err = await failure(make(hub, front, protocol=protocol, connect_timeout=0.5).connect(), 10)
    assert err.code == 504901
    err = await failure(make(hub, front, protocol=protocol).connect(), 10)
    # MQTT 5: CONNACK 0x89 Server busy; 3.1.1 has no CONNACK for it: a drop
    assert err.code == (503005 if protocol == MQTT_5 else 404104)
    async with connected(make(hub, front, protocol=protocol)):
        pass


async def test_direct_method_round_trip(hub: Hub, front: MqttFront) -> None:
    t = make(hub, front, protocol=4)
    async with connected(t):
        invoker = hub.method_invoker("d1")
        assert invoker is not None
        call = asyncio.ensure_future(invoker("reboot", {"delay": 1}, 5))
        event = await asyncio.wait_for(anext(t.events()), 5)
        assert isinstance(event, Inbound) and isinstance(event.payload, MethodCall)
        assert event.payload.name == "reboot" and event.payload.payload == {"delay": 1}
        await asyncio.wait_for(t.request(RespondMethod(event.payload.rid, 201, {"ok": True}), timeout=5), 5)
        assert await asyncio.wait_for(call, 5) == (201, {"ok": True})
    assert hub.method_invoker("d1") is None  # the device left: IoT Hub would answer DeviceNotOnline


async def test_c2d_delivery(hub: Hub, front: MqttFront) -> None:
    front.send_c2d("d1", b"queued", {"a": "1"})
    async with connected(make(hub, front)) as t:
        event = await asyncio.wait_for(anext(t.events()), 5)
        assert isinstance(event, Inbound) and isinstance(event.payload, C2DMessage)
        assert event.payload.body == b"queued" and event.payload.properties["a"] == "1"
        assert event.payload.message_id  # IoT Hub adds a message id when the sender gives none


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_publishing_for_another_device_is_refused(hub: Hub, front: MqttFront, protocol: int) -> None:
    async with connected(make(hub, front, protocol=protocol)) as t:
        err = await failure(t.send(Message("m", "d2", b"x")))
        assert err.code == (400004 if protocol == MQTT_5 else 404104)  # PUBACK 0x90, or a 3.1.1 drop
    assert hub.received_ids() == []


# -- round trip: every code MQTT can express, through render -> front -> paho -> translate ---------------


def _forms(version: int) -> list[tuple[int, Any]]:
    return [(info.code, form) for info in all_codes() for form in render(info.code, version)]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_round_trip_every_rendered_form(hub: Hub, front: MqttFront, protocol: int) -> None:
    forms = _forms(protocol)
    assert len(forms) >= (6 if protocol == 4 else 60)
    seen: list[str] = []
    t = make(hub, front, protocol=protocol)
    for code, form in forms:
        hint = f"{form.packet}:{form.reason_code}:{form.status or ''}"
        if form.packet in ("connack", "suback"):
            await t.close()
            hub.plan.add(Operation.CONNECT, code, device="d1", form=hint)
            err = await failure(t.connect(), 10)
        else:
            if not t.connected:
                await asyncio.wait_for(t.connect(), 10)
            hub.plan.add(Operation.TELEMETRY, code, device="d1", form=hint)
            err = await failure(t.send(Message("m", "d1", b"x")))
        if protocol == 4 and (form.packet, form.reason_code) == ("connack", 1):
            # paho quirk: on 3.1.1 CONNACK 1 means "try MQTT 3.1"; with reconnect_on_failure off paho
            # never calls on_connect, only on_disconnect(130 Protocol error). The code cannot survive.
            assert err.code == 400901, err
            continue
        assert (err.code, err.exact) == (code, form.exact), (hint, err)
        if form.status:
            assert err.tracking_id  # the trace-id user property travelled too
        seen.append(form.packet)
    await t.close()
    assert set(seen) == ({"connack", "suback"} if protocol == 4 else {"connack", "puback", "disconnect", "suback"})
    assert hub.received_ids() == []


async def test_round_trip_every_catalog_code_on_mqtt5_puback_and_twin(hub: Hub, front: MqttFront) -> None:
    """With the six-digit ``status`` extension, MQTT 5 can carry every code; twin responses carry every
    code in their ``errorCode`` body on both versions."""
    codes = [info.code for info in all_codes()]
    async with connected(make(hub, front, protocol=5)) as t:
        for code in codes:
            hub.plan.add(Operation.TELEMETRY, code, device="d1")
            err = await failure(t.send(Message("m", "d1", b"x")))
            assert (err.code, err.exact) == (code, True), (err, err.message)
            if not t.connected:  # the form was a DISCONNECT (e.g. 0x8E for 400027)
                await asyncio.wait_for(t.connect(), 5)
            hub.plan.add(Operation.TWIN_GET, code, device="d1")
            err = await failure(t.request(GetTwin(), timeout=5))
            assert (err.code, err.exact) == (code, True), err
            assert err.native["status"] == (lookup(code).http_status or code // 1000)


# -- with the handler ----------------------------------------------------------------------------------

FAST_MAPPING: dict[str, Any] = {
    "reconnect": {"initial": 0.02, "cap": 0.1},
    "retry": {"initial": 0.02, "cap": 0.1, "max_attempts": 0, "max_elapsed": 0.0},
    "throttle": {"initial": 0.05, "cap": 0.1},
    "identity": {"initial": 0.05, "cap": 0.1, "max_takeovers": 3, "window": 60.0},
    "quota": {"probe_interval": 0.2, "reset_jitter": 0.0},
    "operation": {"connect_timeout": 5.0},
}
FAST = PolicyConfig.from_mapping(FAST_MAPPING)


def handler(t: MqttTransport, config: PolicyConfig = FAST, **kw: Any) -> Handler:
    return Handler(t, policy=Policy(config), identity=t.device_id, **kw)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_handler_outage_and_recovery(hub: Hub, protocol: int) -> None:
    front = MqttFront(hub)
    await front.start()
    port = front.port
    states: list[State] = []
    async with handler(make(hub, front, protocol=protocol), on_state_change=lambda c: states.append(c.state)) as h:
        await h.wait_connected(10)
        await h.send(Message("before", "d1", b"x"), timeout=10)
        await front.stop()  # the hub goes away entirely
        sending = asyncio.ensure_future(h.send(Message("during", "d1", b"x"), timeout=30))
        async with asyncio.timeout(10):
            while h.state is not State.RETRYING:
                await asyncio.sleep(0.01)
        assert not sending.done()
        front = MqttFront(hub, FrontConfig(port=port))
        await front.start()
        try:
            receipt = await asyncio.wait_for(sending, 30)
            assert receipt.id == "during" and h.state.value == "connected"
        finally:
            await front.stop()
    assert "during" in hub.received_ids() and State.RETRYING in states


async def test_handler_throttling_then_success(hub: Hub, front: MqttFront) -> None:
    hub.plan.add(Operation.TELEMETRY, 429001, device="d1", times=3)
    states: list[State] = []
    async with handler(make(hub, front, protocol=5), on_state_change=lambda c: states.append(c.state)) as h:
        await h.wait_connected(10)
        receipt = await h.send(Message("t", "d1", b"x"), timeout=20)
    assert receipt.attempts == 4 and not receipt.possible_duplicate
    assert State.THROTTLED in states and hub.received_ids() == ["t"]
    assert h.metrics()[(429001, "mqtt", "throttled")] == 3


async def test_handler_quota_parks_then_probes(hub: Hub, front: MqttFront) -> None:
    hub.plan.add(Operation.TELEMETRY, 403002, device="d1")
    states: list[State] = []
    async with handler(make(hub, front, protocol=5), on_state_change=lambda c: states.append(c.state)) as h:
        await h.wait_connected(10)
        receipt = await h.send(Message("q", "d1", b"x"), timeout=20)
    assert State.PARKED in states and receipt.attempts == 2 and hub.received_ids() == ["q"]


async def test_handler_identity_conflict_between_two_adapters(hub: Hub, front: MqttFront) -> None:
    a, b = handler(make(hub, front, protocol=5)), handler(make(hub, front, protocol=5))
    try:
        await a.start()
        await a.wait_connected(10)
        await b.start()
        async with asyncio.timeout(30):
            while State.STOPPED not in (a.state, b.state):
                await asyncio.sleep(0.02)
        stopped, survivor = (a, b) if a.state is State.STOPPED else (b, a)
        await survivor.wait_connected(10)
        await asyncio.sleep(0.3)
        assert (stopped.state, survivor.state) == (State.STOPPED, State.CONNECTED)
        assert stopped.last_change.code == 400027
        await survivor.send(Message("ok", "d1", b"x"), timeout=5)
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_handler_loses_no_accepted_message(hub: Hub, front: MqttFront, protocol: int) -> None:
    """Drops, missing PUBACKs, busy answers and a full outage in the middle of 200 concurrent sends:
    every send ends with a receipt, and every receipted message is in the hub."""
    hub.plan.add(Operation.TELEMETRY, kind=FaultKind.DROP, device="d1", times=2)
    hub.plan.add(Operation.TELEMETRY, kind=FaultKind.NO_ACK, device="d1", times=2)
    hub.plan.add(Operation.TELEMETRY, 503005, device="d1", times=2)
    lost: list[Undelivered] = []
    t = make(hub, front, protocol=protocol, send_timeout=0.5)
    # On 3.1.1 every one of these faults is a drop right after connecting, which the policy would (rightly)
    # read as another client taking the identity over; here they are just faults.
    config = PolicyConfig.from_mapping(FAST_MAPPING)
    async with handler(t, config, on_undelivered=lost.append) as h:
        await h.wait_connected(10)
        sends = [asyncio.ensure_future(h.send(Message(f"m{i}", "d1", json.dumps(i).encode()), timeout=45))
                 for i in range(200)]
        await asyncio.sleep(0.05)
        await front.drop_all()
        results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), 50)
    receipts = [r for r in results if isinstance(r, Receipt)]
    assert not lost and len(receipts) == 200, [r for r in results if not isinstance(r, Receipt)][:3]
    received = set(hub.received_ids("d1"))
    assert {r.id for r in receipts} <= received
    assert any(r.possible_duplicate for r in receipts)  # the unacknowledged ones were resent
