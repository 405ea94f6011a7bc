"""The faults the handler's scenarios script: a half-open link (stall), a throttle that lasts a while,
a poison message, and the combinations the plan refuses. Raw protocol clients (the codec over asyncio
streams, proton directly) play the device, so these do not lean on the transports."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from adapters.amqp.emulator import AmqpFront
from adapters.mqtt.codec import MQTT_5, MQTT_311, ConnAck, PingReq, PingResp, PubAck, Publish
from adapters.mqtt.emulator import MqttFront
from gateway.emulator import Fault, FaultKind, FaultPlan, Hub, Operation
from tests.peers.mosquitto import RawClient

STEP = 5.0
FOREVER = 4_000_000_000
PROTOCOLS = [pytest.param(MQTT_311, id="mqtt311"), pytest.param(MQTT_5, id="mqtt5")]


async def mqtt_client(hub: Hub, front: MqttFront, device: str = "d1", level: int = MQTT_311) -> RawClient:
    raw = RawClient(level)
    ack = await raw.connect("127.0.0.1", front.port, device, f"{hub.host_name}/{device}/?api-version=2021-04-12",
                            hub.token(device, FOREVER))
    assert isinstance(ack, ConnAck) and ack.reason_code == 0
    return raw


async def open_and_silent(raw: RawClient) -> bool:
    """True when the peer neither sends anything nor closes for a moment (a correct stall never does,
    so a loaded machine can only make this pass, never fail, falsely)."""
    if raw.packets:
        return False
    try:
        await asyncio.wait_for(raw.reader.read(1), 0.2)
    except TimeoutError:
        return True
    return False  # data, or b"": the peer closed


async def until(predicate: Any, what: str) -> None:
    async with asyncio.timeout(STEP):
        while not predicate():
            await asyncio.sleep(0.01)


# -- stall: a half-open link ------------------------------------------------------------------------------


@pytest.mark.parametrize("level", PROTOCOLS)
async def test_mqtt_stall_stops_answering_and_reading_but_keeps_the_socket(
        hub: Hub, mqtt_front: MqttFront, level: int) -> None:
    hub.plan.add(Operation.TELEMETRY, kind=FaultKind.STALL, device="d1", transport="mqtt")
    raw = await mqtt_client(hub, mqtt_front, level=level)
    try:
        raw.send(Publish("devices/d1/messages/events/", b"first", 1, 1))
        await until(lambda: "stall d1" in mqtt_front.log, "the front stalls")
        raw.send(PingReq())  # a live hub answers PINGREQ at once; a stalled one never reads it
        raw.send(Publish("devices/d1/messages/events/", b"second", 1, 2))
        await raw.writer.drain()
        assert await open_and_silent(raw)
        assert hub.received_ids() == [] and mqtt_front.sessions("d1") == 1
        # the device reconnects (its keep-alive gave up): the new connection works and ends the dead one
        second = await mqtt_client(hub, mqtt_front, level=level)
        try:
            second.send(Publish("devices/d1/messages/events/$.mid=m2", b"again", 1, 3))
            assert (await second.expect(PubAck)).packet_id == 3
            with contextlib.suppress(ConnectionResetError):  # unread bytes on a closed socket: RST
                assert await raw.closed()
            assert [p for p in raw.packets if isinstance(p, (PubAck, PingResp))] == []
        finally:
            second.close()
    finally:
        raw.close()
    assert hub.received_ids() == ["m2"]


async def test_mqtt_stall_on_connect_never_answers_connack(hub: Hub, mqtt_front: MqttFront) -> None:
    hub.plan.add(Operation.CONNECT, kind=FaultKind.STALL, device="d1")
    raw = RawClient(MQTT_311)
    await raw.open("127.0.0.1", mqtt_front.port)
    try:
        from adapters.mqtt.codec import Connect

        raw.send(Connect("d1", MQTT_311, f"{hub.host_name}/d1/", hub.token("d1", FOREVER).encode()))
        await raw.writer.drain()
        await until(lambda: "stall d1" in mqtt_front.log, "the front stalls")
        assert await open_and_silent(raw) and hub.online() == {}
    finally:
        raw.close()


async def test_a_method_to_a_stalled_device_times_out(hub: Hub, mqtt_front: MqttFront) -> None:
    hub.plan.add(Operation.METHOD, kind=FaultKind.STALL, device="d1")
    raw = await mqtt_client(hub, mqtt_front)
    try:
        await raw.subscribe("$iothub/methods/POST/#")
        invoker = hub.method_invoker("d1")
        assert invoker is not None
        with pytest.raises(TimeoutError):
            await invoker("reboot", None, 0.2)
        assert await open_and_silent(raw) and "stall d1" in mqtt_front.log
    finally:
        raw.close()


def _amqp_send(port: int, hub: Hub, body: bytes, timeout: float) -> str:
    """Authenticate over CBS and send one message; "accepted", "timeout" or the error's text."""
    from proton import Message as PMessage
    from proton.utils import BlockingConnection, SendException

    conn = BlockingConnection(f"amqp://127.0.0.1:{port}", timeout=STEP, allowed_mechs="ANONYMOUS")
    try:
        receiver = conn.create_receiver("$cbs", credit=1)
        sender = conn.create_sender("$cbs")
        request = PMessage(body=hub.token("d1", FOREVER), id="r", reply_to="cbs")
        props: Any = {"operation": "put-token", "type": "azure-devices.net:sastoken",
                      "name": f"{hub.host_name}/devices/d1"}
        request.properties = props
        sender.send(request)
        assert (receiver.receive(timeout=STEP).properties or {})["status-code"] == 200
        receiver.accept()
        events = conn.create_sender("/devices/d1/messages/events")
        try:
            events.send(PMessage(body=body), timeout=timeout)
        except SendException as exc:
            return str(exc)
        except Exception as exc:  # proton's Timeout
            return "timeout" if "timeout" in type(exc).__name__.lower() or "Timeout" in str(exc) else repr(exc)
        return "accepted"
    finally:
        transport = conn.conn.transport
        if transport is not None:  # close our end without waiting for a peer that may never answer
            transport.close_tail()
            transport.close_head()
        with contextlib.suppress(Exception):
            conn.close()


@pytest.mark.usefixtures("no_amqp_thread_left")
async def test_amqp_stall_holds_the_socket_open_and_silent(hub: Hub, amqp_front: AmqpFront) -> None:
    hub.plan.add(Operation.TELEMETRY, kind=FaultKind.STALL, device="d1", transport="amqp")
    outcome = await asyncio.to_thread(_amqp_send, amqp_front.port, hub, b"x", 0.5)
    assert outcome == "timeout"
    assert amqp_front.stalled() == ["d1"] and hub.received_ids() == []
    # the fault was used up: the device's next connection works and closes the held one
    assert await asyncio.to_thread(_amqp_send, amqp_front.port, hub, b"y", STEP) == "accepted"
    assert amqp_front.stalled() == [] and len(hub.received) == 1


# -- throttle for a while; poison messages -------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_fault_for_seconds_lasts_from_its_first_match_then_lifts() -> None:
    clock = Clock()
    plan = FaultPlan(clock=clock)
    fault = plan.add(Operation.TELEMETRY, 429001, device="d", for_seconds=120)
    assert fault.times is None  # a duration alone: no count limit
    clock.now = 500.0  # time before the first match does not count
    assert plan.take("d", Operation.TELEMETRY, "http") is fault
    clock.now = 619.9
    assert plan.take("d", Operation.TELEMETRY, "amqp") is fault
    clock.now = 620.0
    assert plan.take("d", Operation.TELEMETRY, "http") is None and plan.pending() == []
    limited = plan.add(Operation.TELEMETRY, 429001, for_seconds=60, times=2)  # whichever ends first
    assert [plan.take("d", Operation.TELEMETRY, "http") for _ in range(3)] == [limited, limited, None]


def test_a_poison_message_fault_matches_only_its_message() -> None:
    plan = FaultPlan()
    poison = plan.add(Operation.TELEMETRY, 400004, match_property={"poison": "1"}, times=None)
    body = plan.add(Operation.TELEMETRY, 400004, match_body="BAD", times=None)
    assert plan.take("d", Operation.TELEMETRY, "mqtt", properties={"poison": "0"}, body=b"ok") is None
    assert plan.take("d", Operation.TELEMETRY, "mqtt", properties={"poison": "1"}, body=b"ok") is poison
    assert plan.take("d", Operation.TELEMETRY, "mqtt", properties={}, body=b"a BAD one") is body
    assert plan.take("d", Operation.TELEMETRY, "mqtt") is None  # no message: a poison fault never matches


async def test_poison_message_over_mqtt5_is_refused_and_the_rest_flow(hub: Hub, mqtt_front: MqttFront) -> None:
    hub.plan.add(Operation.TELEMETRY, 400004, match_property={"poison": "1"}, times=None)
    raw = await mqtt_client(hub, mqtt_front, level=MQTT_5)
    try:
        raw.send(Publish("devices/d1/messages/events/$.mid=a&poison=0", b"x", 1, 1))
        raw.send(Publish("devices/d1/messages/events/$.mid=b&poison=1", b"x", 1, 2))
        raw.send(Publish("devices/d1/messages/events/$.mid=c", b"x", 1, 3))
        acks = {}
        for _ in range(3):
            ack = await raw.expect(PubAck)
            acks[ack.packet_id] = ack.reason_code
        assert acks[1] == 0 and acks[3] == 0 and acks[2] >= 0x80
    finally:
        raw.close()
    assert hub.received_ids() == ["a", "c"]


def test_poison_fault_from_a_fault_file_table() -> None:
    fault = Fault.from_dict({"operation": "telemetry", "code": 400004, "match_property": {"poison": 1},
                             "for_seconds": 5})
    assert fault.match_property == {"poison": "1"} and fault.times is None
    again = Fault.from_dict(fault.to_dict())  # a listed fault (with its id and hits) can be added again
    assert again.match_property == {"poison": "1"} and again.for_seconds == 5


def test_retry_after_over_mqtt_is_refused_when_the_fault_is_made() -> None:
    with pytest.raises(ValueError, match="MQTT"):
        Fault(Operation.TELEMETRY, code=429001, retry_after=5, transport="mqtt")
    assert Fault(Operation.TELEMETRY, code=429001, retry_after=5, transport="amqp").retry_after == 5


@pytest.mark.parametrize("bad", [{"for_seconds": 0}, {"match_property": {}}, {"match_body": 3},
                                 {"kind": "stall", "transport": "http"}])
def test_bad_new_fault_fields_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Fault.from_dict({"operation": "telemetry", "code": 429001} | bad)


def test_faults_can_be_listed_and_removed_by_id() -> None:
    plan = FaultPlan()
    a = plan.add(Operation.TELEMETRY, 429001, times=None)
    b = plan.add(Operation.CONNECT, kind="drop")
    assert [f.fault_id for f in plan.pending()] == [a.fault_id, b.fault_id] and a.fault_id != b.fault_id
    assert plan.remove(a.fault_id) and not plan.remove(a.fault_id)
    assert plan.pending() == [b]
