"""The MQTT adapter against a real, private mosquitto 2.0.11 (the broker's answers as observed on Debian 12).

IoT-Hub-specific answers (status user properties, twin errors, 0x8E takeovers) come from the emulator's
front in test_mqtt_emulator.py; this module is about what a real broker and real sockets do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl

import pytest

from adapters.mqtt.codec import Publish
from adapters.mqtt.transport import CONNECT_THREADS, MqttAnswer, MqttTransport
from gateway.errors import ConnectionLostError, IoTHubError, UnauthorizedError
from gateway.handler import Handler, State
from gateway.policy import Policy, PolicyConfig
from gateway.sas import make_sas_token
from gateway.transport import (
    C2DMessage,
    Disconnected,
    GetTwin,
    InvokeMethod,
    Message,
    PatchDesired,
    ReceiveC2D,
    SettleC2D,
    Transport,
    UnsupportedRequest,
)
from tests.peers.mosquitto import HUB, Mosquitto, RawClient, StartMosquitto, iothub_username
from tests.peers.tls import TlsFiles

PROTOCOLS = [pytest.param(4, id="mqtt311"), pytest.param(5, id="mqtt5")]


def make(broker: Mosquitto, device: str = "dev1", protocol: int = 4, password: str | None = None,
         **kw: object) -> MqttTransport:
    return MqttTransport(f"HostName={HUB};DeviceId={device}", host=broker.host, port=broker.port, ssl=None,
                         protocol=protocol, sas_token=password if password is not None else f"pw-{device}",
                         connect_timeout=5, **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def connected(transport: MqttTransport) -> AsyncIterator[MqttTransport]:
    await asyncio.wait_for(transport.connect(), 10)
    try:
        yield transport
    finally:
        await asyncio.wait_for(transport.close(), 10)


async def next_event(transport: MqttTransport, timeout: float = 5.0) -> object:
    async with asyncio.timeout(timeout):
        async for event in transport.events():
            return event
    return None


async def watcher(broker: Mosquitto, device: str = "dev2") -> RawClient:
    """A second client (our codec) subscribed to dev1's telemetry topic."""
    raw = RawClient(4)
    ack = await raw.connect(broker.host, broker.port, device, iothub_username(device), f"pw-{device}")
    assert ack.reason_code == 0
    assert (await raw.subscribe("devices/dev1/messages/events/#")).reason_codes == [1]
    return raw


def test_is_a_transport(mosquitto: Mosquitto) -> None:
    assert isinstance(make(mosquitto), Transport)
    assert make(mosquitto).username == f"{HUB}/dev1/?api-version=2021-04-12"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_telemetry_reaches_the_broker_with_message_id_and_properties(mosquitto: Mosquitto,
                                                                           protocol: int) -> None:
    raw = await watcher(mosquitto)
    try:
        async with connected(make(mosquitto, protocol=protocol)) as t:
            await asyncio.wait_for(t.send(Message("id 1/é", "dev1", b"\x00body", {"temp": "21 C", "a&b": "x=y"})), 5)
            got = await raw.expect(Publish)
    finally:
        raw.close()
    prefix = "devices/dev1/messages/events/"
    assert got.topic.startswith(prefix)
    bag = dict(parse_qsl(got.topic[len(prefix) :], keep_blank_values=True))
    assert bag == {"temp": "21 C", "a&b": "x=y", "$.mid": "id 1/é"}
    assert got.payload == b"\x00body"
    assert got.qos == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_bad_credentials_are_unauthorized(mosquitto: Mosquitto, protocol: int) -> None:
    t = make(mosquitto, protocol=protocol, password="wrong")
    with pytest.raises(UnauthorizedError) as info:
        await asyncio.wait_for(t.connect(), 10)
    err = info.value
    # mosquitto answers 3.1.1 CONNACK 5 and MQTT 5 135 (not 134); IoT Hub's reading: 401003, inexact.
    assert err.code == 401003 and not err.exact and err.transport == "mqtt"
    assert isinstance(err.__cause__, MqttAnswer) and err.__cause__.packet == "connack"
    assert err.native["reason_code"] == 135
    assert not t.connected
    await t.close()


async def test_connection_refused_keeps_the_os_error() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = MqttTransport(f"HostName={HUB};DeviceId=dev1", host="127.0.0.1", port=port, ssl=None, sas_token="x")
    with pytest.raises(IoTHubError) as info:
        await asyncio.wait_for(t.connect(), 10)
    assert info.value.code == 503901  # ConnectionRefused
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_same_client_id_takes_over_by_closing_the_old_socket(mosquitto: Mosquitto, protocol: int) -> None:
    first, second = make(mosquitto, protocol=protocol), make(mosquitto, protocol=protocol)
    async with connected(first), connected(second):
        event = await next_event(first)
        # mosquitto 2.0.11 sends no DISCONNECT 0x8E, even on MQTT 5: the 3.1.1 takeover pattern,
        # a plain drop, which the handler's policy recognises by its timing.
        assert isinstance(event, Disconnected)
        assert event.error.code == 404104 and event.error.native["from_server"] is False
        assert not first.connected and second.connected
        await asyncio.wait_for(second.send(Message("m", "dev1", b"x")), 5)
        with pytest.raises(IoTHubError) as info:
            await first.send(Message("m2", "dev1", b"x"))
        assert info.value.code == 503904  # NotConnected: nothing went out


async def test_max_packet_size_is_message_too_large_on_mqtt5(start_mosquitto: StartMosquitto) -> None:
    broker = start_mosquitto(users={iothub_username("dev1"): "pw-dev1"}, extra=["max_packet_size 200"])
    async with connected(make(broker, protocol=5)) as t:
        events = t.events()
        with pytest.raises(IoTHubError) as info:
            await asyncio.wait_for(t.send(Message("big", "dev1", b"x" * 1000)), 5)
        # the broker's DISCONNECT 149 (Packet too large) fails the pending PUBACK wait with its code
        assert info.value.code == 413001 and info.value.exact
        event = await asyncio.wait_for(anext(events), 5)
        assert isinstance(event, Disconnected) and event.error.code == 413001


async def test_max_packet_size_on_mqtt311_is_a_drop(start_mosquitto: StartMosquitto) -> None:
    broker = start_mosquitto(users={iothub_username("dev1"): "pw-dev1"}, extra=["max_packet_size 200"])
    async with connected(make(broker, protocol=4)) as t:
        with pytest.raises(ConnectionLostError) as info:
            await asyncio.wait_for(t.send(Message("big", "dev1", b"x" * 1000)), 5)
        assert info.value.code == 404104  # 3.1.1 cannot say why; never NotConnected: it was written


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_broker_killed_and_restarted(mosquitto: Mosquitto, protocol: int) -> None:
    t = make(mosquitto, protocol=protocol)
    async with connected(t):
        events = t.events()
        await asyncio.wait_for(t.send(Message("before", "dev1", b"x")), 5)
        mosquitto.kill()
        event = await asyncio.wait_for(anext(events), 5)
        assert isinstance(event, Disconnected) and event.error.code == 404104
        # publish while disconnected: refused at once, nothing went out
        with pytest.raises(IoTHubError) as info:
            await t.send(Message("while-down", "dev1", b"x"))
        assert info.value.code == 503904
        with pytest.raises(IoTHubError) as info:
            await asyncio.wait_for(t.connect(), 10)
        assert info.value.code == 503901
        mosquitto.start()
        await asyncio.wait_for(t.connect(), 10)
        await asyncio.wait_for(t.send(Message("after", "dev1", b"x")), 5)


async def test_send_in_flight_when_the_broker_dies_is_outcome_unknown(mosquitto: Mosquitto) -> None:
    # Enough in flight that some are certainly pending when the socket goes.
    t = make(mosquitto)
    async with connected(t):
        sends = [asyncio.ensure_future(t.send(Message(f"m{i}", "dev1", b"x" * 2000))) for i in range(300)]
        await asyncio.sleep(0)
        mosquitto.kill()
        results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), 10)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures, "the kill came too late to catch a send in flight"
    for failure in failures:
        assert isinstance(failure, IoTHubError)
        assert failure.code == 404104, failure  # never NotConnected: the handler must resend it


async def test_publish_before_connect_and_after_close(mosquitto: Mosquitto) -> None:
    t = make(mosquitto)
    with pytest.raises(IoTHubError) as info:
        await t.send(Message("m", "dev1", b"x"))
    assert info.value.code == 503904
    async with connected(t):
        pass
    with pytest.raises(IoTHubError) as info:
        await t.request(GetTwin(), timeout=1)
    assert info.value.code == 503904
    await t.close()  # idempotent


@pytest.mark.parametrize("name", ["$.mid", "$.cid", "$anything", ""])
async def test_reserved_property_names_are_refused_before_the_wire(mosquitto: Mosquitto, name: str) -> None:
    """An app property named ``$.mid`` would land in the topic beside ours and override the id consumers
    de-duplicate on (issue 10 #8): refused (ArgumentInvalid, a dead letter), nothing published."""
    raw = await watcher(mosquitto)
    try:
        async with connected(make(mosquitto)) as t:
            with pytest.raises(IoTHubError) as info:
                await asyncio.wait_for(t.send(Message("ours", "dev1", b"x", {name: "evil", "k": "v"})), 5)
            assert info.value.code == 400004
            await asyncio.wait_for(t.send(Message("next", "dev1", b"y", {"k": "v"})), 5)
            got = await raw.expect(Publish)
    finally:
        raw.close()
    assert got.payload == b"y" and got.topic.endswith("$.mid=next")  # the refused one never went out


async def test_property_text_cannot_smuggle_a_message_id(mosquitto: Mosquitto) -> None:
    raw = await watcher(mosquitto)
    try:
        async with connected(make(mosquitto)) as t:
            props = {"k": "1&$.mid=evil", "a&$.mid=evil2": "x=1", "x.$.mid": "2"}
            await asyncio.wait_for(t.send(Message("ours", "dev1", b"x", props)), 5)
            got = await raw.expect(Publish)
    finally:
        raw.close()
    pairs = parse_qsl(got.topic[len("devices/dev1/messages/events/") :], keep_blank_values=True)
    assert [v for k, v in pairs if k == "$.mid"] == ["ours"]
    assert dict(pairs) == {**props, "$.mid": "ours"}


async def test_half_open_link_is_detected_by_keepalive(mosquitto: Mosquitto) -> None:
    """The peer stops answering but keeps the socket (a SIGSTOPped broker: the kernel still holds the TCP
    connection). Keep-alive notices within about two periods and reports a connection loss (404104);
    a send in flight fails with it too, so the handler resends it."""
    keepalive = 2
    t = make(mosquitto, keepalive=keepalive)
    assert mosquitto.proc is not None
    async with connected(t):
        events = t.events()
        await asyncio.wait_for(t.send(Message("before", "dev1", b"x")), 5)
        os.kill(mosquitto.proc.pid, signal.SIGSTOP)
        try:
            sending = asyncio.ensure_future(t.send(Message("during", "dev1", b"x")))
            loop = asyncio.get_running_loop()
            start = loop.time()
            event = await asyncio.wait_for(anext(events), 5 * keepalive)
            detected = loop.time() - start
            with pytest.raises(IoTHubError) as info:
                await asyncio.wait_for(sending, 1)
        finally:
            os.kill(mosquitto.proc.pid, signal.SIGCONT)
    assert isinstance(event, Disconnected) and event.error.code == 404104
    assert event.error.native["from_server"] is False
    assert info.value.code == 404104  # never NotConnected: it was written
    assert detected <= 2 * keepalive + 1  # two periods, plus the keep-alive check's own tick


def test_keepalive_is_on_by_default() -> None:
    t = MqttTransport(f"HostName={HUB};DeviceId=dev1", sas_token="x")
    assert 0 < t.keepalive <= 300


async def test_connects_share_one_bounded_pool(start_mosquitto: StartMosquitto) -> None:
    """No thread per device: many transports connecting at once use at most CONNECT_THREADS threads."""
    devices = [f"dev{i}" for i in range(CONNECT_THREADS + 4)]
    broker = start_mosquitto(users={iothub_username(d): f"pw-{d}" for d in devices})
    transports = [make(broker, device) for device in devices]
    try:
        await asyncio.wait_for(asyncio.gather(*(t.connect() for t in transports)), 20)
        threads = [th for th in threading.enumerate() if th.name.startswith("mqtt-connect")]
        assert 0 < len(threads) <= CONNECT_THREADS
    finally:
        await asyncio.wait_for(asyncio.gather(*(t.close() for t in transports)), 20)


@pytest.mark.parametrize(
    "request_",
    [PatchDesired("dev1", {"a": 1}), InvokeMethod("dev2", "reboot"), ReceiveC2D(), GetTwin("dev2"),
     SettleC2D("1:1:1", "reject"), SettleC2D("1:1:1", "abandon")],
    ids=lambda r: type(r).__name__ + getattr(r, "outcome", getattr(r, "device_id", "") or ""),
)
async def test_requests_the_device_surface_lacks_raise_at_once(mosquitto: Mosquitto, request_: object) -> None:
    t = make(mosquitto)
    with pytest.raises(UnsupportedRequest):  # before connecting: a programming error, not a state
        await t.request(request_, timeout=1)  # type: ignore[arg-type]
    async with connected(t):
        with pytest.raises(UnsupportedRequest):
            await t.request(request_, timeout=1)  # type: ignore[arg-type]


async def test_settle_with_a_foreign_token_is_an_argument_error(mosquitto: Mosquitto) -> None:
    async with connected(make(mosquitto)) as t:
        with pytest.raises(IoTHubError) as info:
            await t.request(SettleC2D.of(C2DMessage("dev1", "not-a-token", None, b"")), timeout=1)
        assert info.value.code == 400004


def test_drops_are_ambiguous_only_on_mqtt311() -> None:
    assert MqttTransport(f"HostName={HUB};DeviceId=d", sas_token="x", protocol=4).ambiguous_drops is True
    assert MqttTransport(f"HostName={HUB};DeviceId=d", sas_token="x", protocol=5).ambiguous_drops is False


async def test_credential_expiry_is_the_given_tokens(mosquitto: Mosquitto) -> None:
    token = make_sas_token(f"{HUB}/devices/dev1", "a2V5", 4_000_000_000)
    broker_user = iothub_username("dev1")
    mosquitto.users[broker_user] = token
    mosquitto.write_config()
    mosquitto.restart()
    t = make(mosquitto, password=token)
    assert t.credential_expiry is None  # no connection yet
    async with connected(t):
        assert t.credential_expiry == 4_000_000_000
    assert t.credential_expiry is None
    t.set_sas_token("opaque")  # a token that does not say when it expires
    mosquitto.users[broker_user] = "opaque"
    mosquitto.write_config()
    mosquitto.restart()
    async with connected(t):
        assert t.credential_expiry is None


async def test_tls_to_mosquitto(start_mosquitto: StartMosquitto, tls_files: TlsFiles) -> None:
    """A real TLS listener: telemetry bursts and a refused handshake (untrusted CA -> 401901)."""
    broker = start_mosquitto(users={iothub_username("dev1"): "pw-dev1"},
                             extra=[f"certfile {tls_files.cert_pem}", f"keyfile {tls_files.key_pem}"])
    t = MqttTransport(f"HostName={HUB};DeviceId=dev1", host="127.0.0.1", port=broker.port,
                      ssl=tls_files.client_context(), sas_token="pw-dev1", connect_timeout=5)
    async with connected(t):
        await asyncio.wait_for(asyncio.gather(*(t.send(Message(f"m{i}", "dev1", b"x" * 64)) for i in range(1000))),
                               30)
    untrusted = MqttTransport(f"HostName={HUB};DeviceId=dev1", host="127.0.0.1", port=broker.port, ssl=True,
                              sas_token="pw-dev1", connect_timeout=5)
    with pytest.raises(IoTHubError) as info:
        await asyncio.wait_for(untrusted.connect(), 10)
    assert info.value.code == 401901


# -- with the handler ----------------------------------------------------------------------------------

FAST = PolicyConfig.from_mapping({
    "reconnect": {"initial": 0.05, "cap": 0.2},
    "retry": {"initial": 0.05, "cap": 0.2},
    "identity": {"initial": 0.1, "cap": 0.3, "max_takeovers": 3, "window": 60.0},
    "drops": {"takeover_repeat": 3, "takeover_park": 600.0},
    "operation": {"connect_timeout": 5.0},
})


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_handler_rides_out_a_broker_restart(mosquitto: Mosquitto, protocol: int) -> None:
    raw = await watcher(mosquitto)
    raw.close()
    states: list[State] = []
    async with Handler(make(mosquitto, protocol=protocol), policy=Policy(FAST), identity="dev1",
                       on_state_change=lambda c: states.append(c.state)) as handler:
        await handler.wait_connected(10)
        first = await handler.send(Message("a", "dev1", b"x"), timeout=10)
        mosquitto.kill()
        sending = asyncio.ensure_future(handler.send(Message("b", "dev1", b"x"), timeout=20))
        async with asyncio.timeout(10):
            while handler.state is not State.RETRYING:
                await asyncio.sleep(0.02)
        mosquitto.start()
        receipt = await asyncio.wait_for(sending, 20)
        assert handler.state.value == "connected"  # (mypy narrowed the state to RETRYING above)
    assert first.attempts == 1 and receipt.id == "b"
    assert State.RETRYING in states and states.count(State.CONNECTED) >= 2
    assert handler.last_change.state is State.CLOSED


async def test_handler_two_instances_on_mqtt311_park_and_never_stop(mosquitto: Mosquitto) -> None:
    """Two gateways configured with the same device: mosquitto drops whichever connected first, over and
    over, with nothing in flight. On 3.1.1 that is only inferred evidence of a takeover (issue 10 #2):
    one of them parks, saying why (state, metric), and neither stops for good; the other one sends."""
    a = Handler(make(mosquitto), policy=Policy(FAST), identity="dev1")
    b = Handler(make(mosquitto), policy=Policy(FAST), identity="dev1")
    try:
        await a.start()
        await a.wait_connected(10)
        await b.start()
        async with asyncio.timeout(30):
            while State.PARKED not in (a.state, b.state):
                assert State.STOPPED not in (a.state, b.state)
                await asyncio.sleep(0.05)
        parked, survivor = (a, b) if a.state is State.PARKED else (b, a)
        await survivor.wait_connected(10)
        await asyncio.sleep(0.5)  # the parked one no longer steals the connection
        assert (parked.state, survivor.state) == (State.PARKED, State.CONNECTED)
        assert parked.last_change.code == 404104 and "identity" in parked.last_change.reason
        assert sum(count for (code, transport, what), count in parked.metrics().items()
                   if what == "inferred_takeover_park") >= 1
        await survivor.send(Message("y", "dev1", b"x"), timeout=5)
    finally:
        await a.close()
        await b.close()
