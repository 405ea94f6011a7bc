"""The MQTT adapter against a scripted IoT-Hub-like peer over TLS: conditions a broker will not produce on
demand, on a real TLS socket on 127.0.0.1.

- Several answers in ONE TLS record (the peer coalesces its answers into one write): what OpenSSL has
  already decrypted is invisible to ``add_reader``; the adapter must drain it (issue 10 #1).
- C2D at QoS 1 as IoT Hub sends it: the PUBACK must wait for the application's settle (issue 10 #9), and a
  full inbound queue must leave the message unacknowledged; method calls and desired patches under a
  full queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import pytest

from adapters.mqtt.codec import (
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
    encode,
)
from adapters.mqtt.transport import MqttTransport
from gateway.errors import IoTHubError
from gateway.transport import (
    C2DMessage,
    DesiredPatch,
    GetTwin,
    Inbound,
    Message,
    MethodCall,
    SettleC2D,
    UnsupportedRequest,
)
from tests.peers.tls import TlsFiles

HUB = "scripted-hub.azure-devices.net"
TWIN = {"desired": {"$version": 1}, "reported": {"$version": 1}}


class ScriptedHub:
    """An MQTT 3.1.1 server playing IoT Hub's device surface for one client at a time.

    Answers (CONNACK, SUBACK, twin responses, PUBACKs for telemetry) are held until ``batch`` of them are
    pending and then written with ONE write, i.e. one TLS record when they fit in 16 KiB; what is left
    goes out after ``idle`` seconds without new requests (None: never). The test pushes C2D messages,
    method calls and desired patches with :meth:`push`, and reads what the client sent back.
    """

    def __init__(self, tls: TlsFiles, batch: int = 1, idle: float | None = 0.05) -> None:
        self.tls = tls
        self.batch = batch
        self.idle = idle
        self.server: asyncio.Server | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending: list[Packet] = []
        self.acks: list[int] = []  #: PUBACK packet ids from the client (our C2D deliveries)
        self.published: list[Publish] = []  #: what the client published (method responses, telemetry)
        self.connects = 0
        self.connected = asyncio.Event()
        self._ids = 0
        self._flush: asyncio.TimerHandle | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls.server_context())

    async def stop(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    def drop(self) -> None:
        """Close the client's socket (a 3.1.1 hub's way of ending a connection)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.connected.clear()

    def push(self, packet: Publish) -> int:
        """Send ``packet`` to the client now (QoS 1: with a fresh packet id, returned)."""
        assert self.writer is not None
        if packet.qos:
            self._ids = self._ids % 0xFFFF + 1
            packet.packet_id = self._ids
        self.writer.write(encode(packet, 4))
        return packet.packet_id or 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = Decoder()
        self.writer = writer
        try:
            while data := await reader.read(65536):
                for packet in decoder.feed(data):
                    self._handle(packet, writer)
                if len(self.pending) >= self.batch:
                    self._write(writer)
                elif self.pending and self.idle is not None:
                    if self._flush is not None:
                        self._flush.cancel()
                    self._flush = asyncio.get_running_loop().call_later(self.idle, self._write, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _handle(self, packet: Packet, writer: asyncio.StreamWriter) -> None:
        if isinstance(packet, Connect):
            self.connects += 1
            writer.write(encode(ConnAck(0), 4))
            self.connected.set()
        elif isinstance(packet, Subscribe):
            writer.write(encode(SubAck(packet.packet_id, [min(qos, 1) for _, qos in packet.filters]), 4))
        elif isinstance(packet, PingReq):
            writer.write(encode(PingResp(), 4))
        elif isinstance(packet, PubAck):
            self.acks.append(packet.packet_id)
        elif isinstance(packet, Disconnect):
            writer.close()
        elif isinstance(packet, Publish):
            self._publish(packet, writer)

    def _publish(self, packet: Publish, writer: asyncio.StreamWriter) -> None:
        rid = dict(parse_qsl(packet.topic.partition("?")[2])).get("$rid", "")
        if packet.topic.startswith("$iothub/twin/GET/"):
            self.pending.append(Publish(f"$iothub/twin/res/200/?$rid={rid}", json.dumps(TWIN).encode()))
        elif packet.topic.startswith("$iothub/twin/PATCH/properties/reported/"):
            self.pending.append(Publish(f"$iothub/twin/res/204/?$rid={rid}&$version=2"))
        else:
            self.published.append(packet)
            if packet.qos:
                self.pending.append(PubAck(packet.packet_id or 0))

    def _write(self, writer: asyncio.StreamWriter) -> None:
        if self.pending and not writer.is_closing():
            writer.write(b"".join(encode(p, 4) for p in self.pending))  # one write: one TLS record
        self.pending.clear()


@pytest.fixture
async def scripted(tls_files: TlsFiles) -> AsyncIterator[ScriptedHub]:
    peer = ScriptedHub(tls_files)
    await peer.start()
    yield peer
    await peer.stop()


def make(peer: ScriptedHub, **kw: Any) -> MqttTransport:
    kw.setdefault("ssl", peer.tls.client_context())
    return MqttTransport(f"HostName={HUB};DeviceId=d1", host="127.0.0.1", port=peer.port, sas_token="token",
                         connect_timeout=5, send_timeout=10, **kw)


@contextlib.asynccontextmanager
async def connected(t: MqttTransport) -> AsyncIterator[MqttTransport]:
    await asyncio.wait_for(t.connect(), 10)
    try:
        yield t
    finally:
        await asyncio.wait_for(t.close(), 10)


async def until(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


# -- TLS: several packets in one record ------------------------------------------------------------------


async def test_two_twin_answers_in_one_tls_record(scripted: ScriptedHub) -> None:
    scripted.batch, scripted.idle = 2, None  # both answers in one write, nothing written before that
    async with connected(make(scripted)) as t:
        first, second = await asyncio.wait_for(
            asyncio.gather(t.request(GetTwin(), timeout=3), t.request(GetTwin(), timeout=3)), 5)
    assert first == second == TWIN


@pytest.mark.parametrize("sends", [0, 1000], ids=["twins", "twins+telemetry"])
async def test_a_burst_of_twin_answers_and_pubacks_over_tls(scripted: ScriptedHub, sends: int) -> None:
    """1,000 twin requests (and 1,000 QoS 1 sends) in flight at once; the peer answers 16 to a record.
    Twin answers alone are the hard case: paho reads one packet per call when no QoS 1 message of its
    own is in flight."""
    scripted.batch = 16
    async with connected(make(scripted, max_inflight=100)) as t:
        twins = [t.request(GetTwin(), timeout=20) for _ in range(1000)]
        telemetry = [t.send(Message(f"m{i}", "d1", b"x" * 32)) for i in range(sends)]
        results = await asyncio.wait_for(asyncio.gather(*twins, *telemetry, return_exceptions=True), 30)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == []
    assert results[:1000] == [TWIN] * 1000
    assert len(scripted.published) == sends


# -- C2D: acknowledged when settled ----------------------------------------------------------------------


def c2d(body: bytes, bag: str = "%24.mid=c-1&%24.cid=corr&a=1") -> Publish:
    return Publish(f"devices/d1/messages/devicebound/{bag}", body, 1)


async def next_inbound(events: AsyncIterator[Any], timeout: float = 5.0) -> Inbound:
    event = await asyncio.wait_for(anext(events), timeout)
    assert isinstance(event, Inbound), event
    return event


async def test_c2d_is_acknowledged_only_when_settled(scripted: ScriptedHub) -> None:
    async with connected(make(scripted)) as t:
        events = t.events()
        mid = scripted.push(c2d(b"hello"))
        event = await next_inbound(events)
        assert event.kind == "c2d" and event.device_id == "d1"
        message = event.payload
        assert isinstance(message, C2DMessage)
        assert (message.body, message.message_id, message.correlation_id) == (b"hello", "c-1", "corr")
        assert message.properties == {"a": "1"} and message.device_id == "d1"
        await asyncio.sleep(0.2)
        assert scripted.acks == []  # delivered to the app, not yet acknowledged to the hub
        with pytest.raises(UnsupportedRequest):  # MQTT has no negative acknowledgement
            await t.request(SettleC2D.of(message, "reject"), timeout=5)
        with pytest.raises(UnsupportedRequest):
            await t.request(SettleC2D.of(message, "abandon"), timeout=5)
        assert await t.request(SettleC2D.of(message), timeout=5) is None
        await until(lambda: scripted.acks == [mid])
        with pytest.raises(IoTHubError) as info:  # settled already: the lock is gone
            await t.request(SettleC2D.of(message), timeout=5)
        assert info.value.code == 412002 and not info.value.exact
    assert scripted.acks == [mid]


async def test_a_lock_from_an_earlier_connection_is_lost(scripted: ScriptedHub) -> None:
    t = make(scripted)
    async with connected(t):
        events = t.events()
        scripted.push(c2d(b"one"))
        message = (await next_inbound(events)).payload
    with pytest.raises(IoTHubError) as info:  # while disconnected: the lock died with the connection
        await t.request(SettleC2D.of(message), timeout=5)  # type: ignore[arg-type]
    assert info.value.code == 412002
    async with connected(t):
        with pytest.raises(IoTHubError) as info:
            await t.request(SettleC2D.of(message), timeout=5)  # type: ignore[arg-type]
        assert info.value.code == 412002
    assert scripted.acks == []


async def test_a_full_queue_leaves_c2d_unacknowledged(scripted: ScriptedHub) -> None:
    async with connected(make(scripted, max_events=2)) as t:
        ids = [scripted.push(c2d(f"m{i}".encode(), f"%24.mid=m{i}")) for i in range(3)]
        await asyncio.sleep(0.3)  # all three arrived; nobody read events() yet
        events = t.events()
        got = [(await next_inbound(events)).payload for _ in range(2)]
        assert [m.body for m in got if isinstance(m, C2DMessage)] == [b"m0", b"m1"]
        with pytest.raises(TimeoutError):  # the third was refused, not queued
            await next_inbound(events, timeout=0.3)
        for message in got:
            await t.request(SettleC2D.of(message), timeout=5)  # type: ignore[arg-type]
        await until(lambda: len(scripted.acks) == 2)
        assert scripted.acks == ids[:2]  # the third stays with the hub, which redelivers it


async def test_method_call_on_a_full_queue_is_answered_busy(scripted: ScriptedHub) -> None:
    async with connected(make(scripted, max_events=1)) as t:
        scripted.push(Publish("$iothub/methods/POST/first/?$rid=1", b'{"a": 1}'))
        scripted.push(Publish("$iothub/methods/POST/second/?$rid=2", b"{}"))
        await until(lambda: any(p.topic.startswith("$iothub/methods/res/") for p in scripted.published))
        busy = [p for p in scripted.published if p.topic.startswith("$iothub/methods/res/")]
        assert [p.topic for p in busy] == ["$iothub/methods/res/503/?$rid=2"]
        event = await next_inbound(t.events())
        assert event.payload == MethodCall("first", "1", {"a": 1})


async def test_desired_patches_on_a_full_queue_are_merged_not_lost(scripted: ScriptedHub) -> None:
    async with connected(make(scripted, max_events=1)) as t:
        patches: list[dict[str, Any]] = [{"a": 1}, {"b": {"x": 1, "y": 2}}, {"b": {"y": None}, "c": 3}, {"a": 4}]
        for version, patch in enumerate(patches, start=2):
            body = json.dumps({**patch, "$version": version}).encode()
            scripted.push(Publish(f"$iothub/twin/PATCH/properties/desired/?$version={version}", body))
        await asyncio.sleep(0.3)
        events = t.events()
        first = (await next_inbound(events)).payload
        merged = (await next_inbound(events)).payload
    assert first == DesiredPatch({"a": 1, "$version": 2}, 2)
    # the three that found the queue full, as one merge patch with the last version
    assert merged == DesiredPatch({"b": {"x": 1, "y": None}, "c": 3, "a": 4, "$version": 5}, 5)


async def test_qos1_publishes_other_than_c2d_are_acknowledged_at_once(scripted: ScriptedHub) -> None:
    """Only C2D waits for the application's settle; a method call or twin answer sent at QoS 1 (IoT Hub
    uses QoS 0 there) must not sit unacknowledged in the peer's in-flight window."""
    async with connected(make(scripted)) as t:
        mid = scripted.push(Publish("$iothub/methods/POST/m/?$rid=7", b"{}", 1))
        await until(lambda: scripted.acks == [mid])
        event = await next_inbound(t.events())
        assert event.payload == MethodCall("m", "7", {})
