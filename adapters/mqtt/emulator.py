"""The emulator's MQTT front: IoT Hub's MQTT device surface (3.1.1 and 5) on a local port.

Not a general broker: it answers the way IoT Hub answers a device, from the shared
:class:`~gateway.emulator.Hub` (registry, connections, received telemetry, twins, methods) and its
:class:`~gateway.emulator.FaultPlan`. Every failure is put on the wire with
:func:`adapters.mqtt.translate.render`, so what the adapter reads back is the code the plan named.

How a fault is rendered (``Fault.form`` may pick the wire form: ``"packet[:reason[:status]]"``, e.g.
``"disconnect"``, ``"puback:151"`` or ``"puback:151:"`` for no ``status``):

- CONNECT: a refusing CONNACK (3.1.1 return code or MQTT 5 reason code + ``status``); ``form="suback"``
  accepts the connection and refuses the first subscription instead. A code 3.1.1 cannot say: the
  socket is closed without a CONNACK.
- TELEMETRY: MQTT 5 PUBACK (or DISCONNECT) with the reason code and IoT Hub's ``status`` and
  ``trace-id`` user properties. 3.1.1 has no failure PUBACK, so the connection is dropped, as IoT Hub
  does; the message is not recorded.
- TWIN_GET / TWIN_PATCH: ``$iothub/twin/res/{status}/?$rid=`` with an ``errorCode`` body.
- DROP closes the socket without a word, NO_ACK records / accepts but never answers, DELAY answers
  after ``Fault.delay`` seconds (without holding up other packets), STALL leaves the link half-open
  (nothing read or answered any more, the socket kept until the device reconnects).
- C2D_RECEIVE (a delivery to the device): DROP or STALL takes the link down with the message, which
  is redelivered on the next connection.

Cloud-to-device messages go out at QoS 1 and stay locked in the hub until the PUBACK (at least once).

A second connection for a device takes over the first: MQTT 5 gets DISCONNECT 0x8E (Session taken
over, read as ConnectionForcefullyClosedOnNewConnection); 3.1.1 has no way to say it, so the old socket
is simply closed (what IoT Hub and mosquitto do).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, quote

from adapters.mqtt.codec import (
    MQTT_5,
    MQTT_311,
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    MalformedPacket,
    Packet,
    PacketTooLarge,
    PingReq,
    PingResp,
    Prop,
    Properties,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    UnsupportedProtocol,
    encode,
)
from adapters.mqtt.translate import WireForm, render
from gateway.codes import code_of, lookup
from gateway.emulator.faults import Fault, FaultKind, Operation
from gateway.emulator.front import FrontConfig
from gateway.emulator.hub import Hub, QueuedC2D, Received, Settlement
from gateway.sas import parse_sas_token

__all__ = ["MqttFront"]

log = logging.getLogger(__name__)

_TAKEOVER = code_of("ConnectionForcefullyClosedOnNewConnection")
_EXPIRED = code_of("IotHubUnauthorized")
_UNAVAILABLE = code_of("ServiceUnavailable")
_TOO_LARGE = code_of("MessageTooLarge")
_PROTOCOL = code_of("ProtocolViolation")
_ARGUMENT = code_of("ArgumentInvalid")
_VERSION = code_of("InvalidProtocolVersion")

# Hub.authenticate's answers -> (code, wire form). IoT Hub refuses a wrong key, an expired token and
# an unknown device alike with CONNACK 5 "not authorized" on 3.1.1 (azure-iot-sdk-c #373, iotedge #526),
# which MQTT 5 says as 0x87; a disabled device gets "server unavailable" (3 / 0x88).
_NOT_AUTHORIZED = {MQTT_311: "connack:5", MQTT_5: "connack:0x87"}
_AUTH_CODES = {
    "expired": _EXPIRED,
    "mismatch": _EXPIRED,
    "malformed": _EXPIRED,
    "unknown": _EXPIRED,
    "disabled": _UNAVAILABLE,
}
_DESIRED_FILTER = "$iothub/twin/PATCH/properties/desired/#"
_MAX_PACKET = 256 * 1024  # IoT Hub's announced Maximum Packet Size
_C2D_WINDOW = 16  # cloud-to-device messages in flight (unacknowledged) per connection
_SUCCESS = 0


def _pick(code: int, version: int, packets: tuple[str, ...], hint: str | None) -> WireForm | None:
    """The wire form for ``code`` on one of ``packets`` (first = preferred), or None (3.1.1 cannot say it)."""
    forms = render(code, version, extended=version == MQTT_5)
    if hint:
        parts = hint.split(":")
        packet = parts[0].strip().lower()
        reason = int(parts[1], 0) if len(parts) > 1 and parts[1] else None
        status = parts[2] if len(parts) > 2 else None  # "" means: no status property
        for form in forms:
            if form.packet == packet and reason in (None, form.reason_code) and (
                status is None or (form.status or "") == status
            ):
                return form
        if reason is not None:  # a scripted form outside render's list: send it as given
            return WireForm(packet, reason, status or None, False)
    for packet in packets:
        for form in forms:
            if form.packet == packet:
                return form
    if version == MQTT_5:
        # No form on the wanted packet: carry the first status form on it (0x83/0x87/0x97 are valid everywhere).
        for form in forms:
            if form.status is not None:
                return WireForm(packets[0], form.reason_code, form.status, form.exact)
    return None


def _user_props(form: WireForm) -> Properties:
    props = Properties()
    if form.status is not None:
        props.user.append(("status", form.status))
        props.user.append(("trace-id", uuid.uuid4().hex))
    return props


def _twin_status(code: int) -> int:
    info = lookup(code)
    return info.http_status or info.family_status


class _Session:
    """One client connection."""

    def __init__(self, front: MqttFront, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.front = front
        self.reader = reader
        self.writer = writer
        self.decoder = Decoder(max_packet_size=front.max_packet_size)
        self.version = MQTT_311
        self.device_id: str | None = None
        self.subscriptions: set[str] = set()
        self.pending_methods: dict[str, asyncio.Future[tuple[int, Any]]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closed = False
        self.stalled = False  #: half-open: nothing is read or written any more (FaultKind.STALL)
        self.released = asyncio.Event()  #: set when a stalled session may end (closed, taken over, stopped)
        self._ids = itertools.cycle(range(1, 0x10000))
        self._rids = itertools.count(1)
        self.subscribe_fault: Fault | None = None
        self.c2d_inflight: dict[int, str] = {}  #: packet id -> the hub's lock token, until the PUBACK
        self.c2d_qos = 1

    # -- output ---------------------------------------------------------------------------------
    def send(self, packet: Packet) -> None:
        if not self.closed and not self.stalled and not self.writer.is_closing():
            self.writer.write(encode(packet, self.version))

    def abort(self) -> None:
        """Close the socket without a goodbye (RST where possible)."""
        self.closed = True
        self.released.set()
        transport = self.writer.transport
        with contextlib.suppress(Exception):
            transport.abort()

    def kick(self, code: int) -> None:
        """Close with MQTT 5 DISCONNECT ``code`` (3.1.1: just close)."""
        if self.version == MQTT_5:
            form = _pick(code, MQTT_5, ("disconnect",), None)
            if form is not None:
                self.send(Disconnect(form.reason_code, _user_props(form)))
        self.closed = True
        self.released.set()
        with contextlib.suppress(Exception):
            self.writer.close()

    def stall(self) -> None:
        """Go half-open: stop reading (the client's writes back up in TCP) and answering; keep the socket.

        The session ends only when it is taken over, dropped or the front stops, as a dead link stays
        open on the hub's side until something closes it.
        """
        self.stalled = True
        transport = self.writer.transport
        if isinstance(transport, asyncio.ReadTransport):
            transport.pause_reading()
        self.front._log(f"stall {self.device_id}")

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- the connection -------------------------------------------------------------------------
    async def run(self) -> None:
        first = await self._read_connect()
        if first is None or not await self._accept(first[0]):
            return
        packets = first[1]  # whatever the client sent right behind its CONNECT
        while not self.closed:
            for packet in packets:
                if self.closed:
                    return
                await self._handle(packet)
                if self.stalled:
                    await self.released.wait()
                    return
            await self.writer.drain()
            data = await self.reader.read(65536)
            if not data:
                return
            try:
                packets = self.decoder.feed(data)
            except PacketTooLarge:
                self.kick(_TOO_LARGE)
                return
            except MalformedPacket:
                self.kick(_PROTOCOL)
                return

    async def _read_connect(self) -> tuple[Connect, list[Packet]] | None:
        try:
            async with asyncio.timeout(self.front.connect_timeout):
                while True:
                    data = await self.reader.read(65536)
                    if not data:
                        return None
                    packets = self.decoder.feed(data)
                    if packets:
                        break
        except UnsupportedProtocol:
            form = _pick(_VERSION, MQTT_311, ("connack",), None)
            if form is not None:
                self.send(ConnAck(form.reason_code))
            return None
        except (MalformedPacket, TimeoutError):
            return None
        first = packets[0]
        if not isinstance(first, Connect):  # the decoder refuses anything else first
            return None
        self.version = first.protocol_level
        return first, packets[1:]

    async def _accept(self, connect: Connect) -> bool:
        hub = self.front.hub
        device_id = connect.client_id
        username = connect.username or ""
        password = (connect.password or b"").decode("utf-8", "replace")
        expected = f"{hub.host_name}/{device_id}/"
        why = hub.authenticate(device_id, password, self.front.clock())
        if why is None and not username.startswith(expected):
            why = "mismatch"  # IoT Hub checks that the user name names this hub and device
        if why is not None:
            code = _AUTH_CODES.get(why, _EXPIRED)
            self._refuse(code, _NOT_AUTHORIZED[self.version] if code == _EXPIRED else None)
            return False
        fault = hub.plan.take(device_id, Operation.CONNECT, "mqtt")
        if fault is not None:
            if fault.kind is FaultKind.STALL:
                self.device_id = device_id
                self.stall()
                await self.released.wait()
                return False
            if fault.kind is FaultKind.DROP:
                self.abort()
                return False
            if fault.kind is FaultKind.NO_ACK:
                await self.reader.read()  # wait until the client gives up
                return False
            if fault.kind is FaultKind.DELAY:
                await asyncio.sleep(fault.delay)
            elif fault.code is not None:
                if (fault.form or "").lower().startswith("suback"):
                    self.subscribe_fault = fault
                else:
                    self._refuse(fault.code, fault.form)
                    return False
        self.device_id = device_id
        loop = asyncio.get_running_loop()

        def kick() -> None:  # another transport took the identity; called from that front's thread
            with contextlib.suppress(RuntimeError):  # the loop is already closed: nothing left to kick
                loop.call_soon_threadsafe(self.kick, _TAKEOVER)

        previous = hub.attach(device_id, "mqtt", self, kick=kick)
        if previous is not None and isinstance(previous[1], _Session):
            previous[1].kick(_TAKEOVER)
        props = Properties()
        if self.version == MQTT_5:
            props.values.update({
                Prop.MAXIMUM_QOS: 1,
                Prop.RETAIN_AVAILABLE: 0,
                Prop.MAXIMUM_PACKET_SIZE: self.front.max_packet_size,
                Prop.SHARED_SUBSCRIPTION_AVAILABLE: 0,
            })
        self.send(ConnAck(_SUCCESS, False, props))
        self.front._log(f"connect {device_id} mqtt{'5' if self.version == MQTT_5 else '3.1.1'}")
        with contextlib.suppress(ValueError):  # authenticate() already refused a token without se=
            self.spawn(self._expire_at(parse_sas_token(password).expiry))
        return True

    async def _expire_at(self, expiry: float) -> None:
        """IoT Hub closes a connection when its SAS token expires: the device must reconnect with a new one.

        The wall-clock expiry is turned into a delay once, when the connection is accepted. On the wire
        (assumed): MQTT 5 gets DISCONNECT 0x87 Not authorized, 3.1.1 a bare close.
        """
        await asyncio.sleep(max(0.0, expiry - self.front.clock()))
        self.front.expired_drops += 1
        self.front._log(f"token expired {self.device_id}")
        self.kick(_EXPIRED)

    def _refuse(self, code: int, hint: str | None) -> None:
        form = _pick(code, self.version, ("connack",), hint)
        if form is None or form.packet != "connack":
            self.abort()  # 3.1.1 has no CONNACK for it: IoT Hub closes the socket
            return
        self.send(ConnAck(form.reason_code, False, _user_props(form)))
        self.closed = True
        with contextlib.suppress(Exception):
            self.writer.close()

    async def _handle(self, packet: Packet) -> None:
        if isinstance(packet, Publish):
            await self._publish(packet)
        elif isinstance(packet, Subscribe):
            self._subscribe(packet)
        elif isinstance(packet, Unsubscribe):
            for topic in packet.filters:
                self.subscriptions.discard(topic)
            self.send(UnsubAck(packet.packet_id, [_SUCCESS] * len(packet.filters)))
        elif isinstance(packet, PingReq):
            self.send(PingResp())
        elif isinstance(packet, Disconnect):
            self.closed = True
            with contextlib.suppress(Exception):
                self.writer.close()
        elif isinstance(packet, PubAck):
            self._c2d_acked(packet)
        else:  # anything else a client may not send
            self.kick(_PROTOCOL)

    def _subscribe(self, packet: Subscribe) -> None:
        device = self.device_id or ""
        allowed = {
            f"devices/{device}/messages/devicebound/#",
            "$iothub/twin/res/#",
            "$iothub/methods/POST/#",
            _DESIRED_FILTER,
        }
        codes: list[int] = []
        props = Properties()
        for topic, options in packet.filters:
            fault, self.subscribe_fault = self.subscribe_fault, None
            if fault is not None and fault.code is not None:
                form = _pick(fault.code, self.version, ("suback",), fault.form)
                codes.append(form.reason_code if form is not None else 0x80)
                if form is not None and self.version == MQTT_5:
                    props = _user_props(form)
            elif topic in allowed:
                codes.append(min(options & 3, 1))
                self.subscriptions.add(topic)
                if topic.endswith("/messages/devicebound/#"):
                    self.c2d_qos = min(options & 3, 1)
                    self.front.hub.watch_c2d(device, self, self._c2d_listener())
                elif topic == "$iothub/methods/POST/#":
                    self.front.hub.serve_methods(device, self, self.invoke)
                elif topic == _DESIRED_FILTER:
                    self.front.hub.watch_desired(device, self, self._desired_listener())
            else:
                form = _pick(_ARGUMENT, self.version, ("suback",), None)
                codes.append(form.reason_code if form is not None else 0x80)
        self.send(SubAck(packet.packet_id, codes, props))
        if f"devices/{device}/messages/devicebound/#" in self.subscriptions:
            self.pump_c2d()

    # -- cloud-to-device: at least once -----------------------------------------------------------
    def _c2d_listener(self) -> Callable[[], None]:
        loop = asyncio.get_running_loop()

        def listener() -> None:  # any thread (the admin surface, AMQP's service link)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.pump_c2d)

        return listener

    def pump_c2d(self) -> None:
        """Deliver queued messages, each locked until its PUBACK (QoS 1), as IoT Hub does; what is not
        acknowledged when the connection ends goes back to the queue (``fail_pending``)."""
        device = self.device_id or ""
        if self.closed or self.stalled or f"devices/{device}/messages/devicebound/#" not in self.subscriptions:
            return
        hub = self.front.hub
        while len(self.c2d_inflight) < _C2D_WINDOW:
            entry = hub.lock_c2d(device, float("inf"), time.monotonic())
            if entry is None or entry.lock_token is None:
                return
            topic = f"devices/{device}/messages/devicebound/{_c2d_bag(device, entry)}"
            fault = hub.plan.take(device, Operation.C2D_RECEIVE, "mqtt", properties=entry.properties, body=entry.body)
            if fault is not None and fault.kind in (FaultKind.DROP, FaultKind.STALL):
                # the delivery dies with the link: given back when the session ends, redelivered later
                self.c2d_inflight[-1] = entry.lock_token  # no packet id: only fail_pending gives it back
                if fault.kind is FaultKind.DROP:
                    self.abort()
                else:
                    self.stall()
                return
            if self.c2d_qos == 0:  # the device asked for at most once: it is done as it leaves
                self.send(Publish(topic, entry.body, 0))
                hub.settle_c2d(device, entry.lock_token, "complete", time.monotonic())
                continue
            packet_id = next(self._ids)
            self.c2d_inflight[packet_id] = entry.lock_token
            self.send(Publish(topic, entry.body, 1, packet_id))

    def _c2d_acked(self, packet: PubAck) -> None:
        token = self.c2d_inflight.pop(packet.packet_id, None)
        if token is None:
            return
        # an MQTT 5 failure PUBACK gives the message back (IoT Hub's "abandon"); success completes it
        outcome: Settlement = "abandon" if packet.reason_code >= 0x80 else "complete"
        self.front.hub.settle_c2d(self.device_id or "", token, outcome, time.monotonic())
        self.pump_c2d()

    async def _publish(self, packet: Publish) -> None:
        topic = packet.topic
        device = self.device_id or ""
        events = f"devices/{device}/messages/events/"
        if topic.startswith(events):
            await self._telemetry(packet, topic[len(events) :])
        elif topic.startswith("$iothub/twin/GET/"):
            await self._twin(packet, Operation.TWIN_GET)
        elif topic.startswith("$iothub/twin/PATCH/properties/reported/"):
            await self._twin(packet, Operation.TWIN_PATCH)
        elif topic.startswith("$iothub/methods/res/"):
            self._ack(packet)
            self._method_response(packet)
        elif self.version == MQTT_5 and packet.qos:
            form = _pick(_ARGUMENT, MQTT_5, ("puback",), "puback:0x90")
            self.send(PubAck(packet.packet_id or 0, form.reason_code if form else 0x90))
        else:
            self.kick(_ARGUMENT)  # IoT Hub drops a 3.1.1 client publishing to a topic it does not serve

    def _ack(self, packet: Publish) -> None:
        if packet.qos and packet.packet_id:
            self.send(PubAck(packet.packet_id))

    async def _telemetry(self, packet: Publish, bag: str) -> None:
        device = self.device_id or ""
        props = dict(parse_qsl(bag.rstrip("/"), keep_blank_values=True))
        message_id = props.pop("$.mid", None)
        system = {k: props.pop(k) for k in [k for k in props if k.startswith("$")]}  # $.ct, $.ce, $.cid, ...
        received = Received(device, message_id, packet.payload, "mqtt", props, system=system)
        fault = self.front.hub.plan.take(device, Operation.TELEMETRY, "mqtt", properties=props, body=packet.payload)
        if fault is None:
            self.front.hub.record(received)
            self._ack(packet)
            return
        if fault.kind is FaultKind.STALL:
            self.stall()
        elif fault.kind is FaultKind.DROP:
            self.abort()
        elif fault.kind is FaultKind.NO_ACK:
            self.front.hub.record(received)
        elif fault.kind is FaultKind.DELAY:
            def deliver() -> None:
                self.front.hub.record(received)
                self._ack(packet)

            self.spawn(self._later(fault.delay, deliver))
        elif fault.code is not None:
            self._fail_publish(packet, fault)

    def _fail_publish(self, packet: Publish, fault: Fault) -> None:
        assert fault.code is not None
        form = _pick(fault.code, self.version, ("puback", "disconnect"), fault.form) if self.version == MQTT_5 else None
        if form is None:
            self.abort()  # 3.1.1: no failure PUBACK exists; IoT Hub drops the connection
        elif form.packet == "disconnect" or not packet.qos:
            self.send(Disconnect(form.reason_code, _user_props(form)))
            self.closed = True
            with contextlib.suppress(Exception):
                self.writer.close()
        else:
            self.send(PubAck(packet.packet_id or 0, form.reason_code, _user_props(form)))

    async def _later(self, delay: float, action: Callable[[], object]) -> None:
        await asyncio.sleep(delay)
        if not self.closed:
            action()
            with contextlib.suppress(Exception):
                await self.writer.drain()

    async def _twin(self, packet: Publish, operation: Operation) -> None:
        self._ack(packet)
        query = dict(parse_qsl(packet.topic.partition("?")[2], keep_blank_values=True))
        rid = query.get("$rid", "")
        device = self.front.hub.device(self.device_id or "")
        if device is None:
            return
        fault = self.front.hub.plan.take(device.device_id, operation, "mqtt")
        if fault is not None and fault.kind is FaultKind.STALL:
            self.stall()
            return
        if fault is not None and fault.kind is FaultKind.DROP:
            self.abort()
            return
        if fault is not None and fault.kind is FaultKind.NO_ACK:
            return
        if fault is not None and fault.kind is FaultKind.ERROR and fault.code is not None:
            status = _twin_status(fault.code)
            body = {"errorCode": fault.code, "trackingId": uuid.uuid4().hex,
                    "message": f"{lookup(fault.code).name} (emulated)", "timestampUtc": ""}
            self._respond(f"$iothub/twin/res/{status}/?$rid={rid}", json.dumps(body).encode())
            return
        if operation is Operation.TWIN_GET:
            twin = self.front.hub.twin_properties(device.device_id)
            response = (f"$iothub/twin/res/200/?$rid={rid}", json.dumps(twin).encode())
        else:
            try:
                patch = json.loads(packet.payload or b"{}")
            except ValueError:
                patch = None
            if not isinstance(patch, dict):
                body = {"errorCode": _ARGUMENT, "message": "the reported-properties patch is not a JSON object"}
                response = (f"$iothub/twin/res/{_twin_status(_ARGUMENT)}/?$rid={rid}", json.dumps(body).encode())
            else:
                version = self.front.hub.update_reported(device.device_id, patch)
                response = (f"$iothub/twin/res/204/?$rid={rid}&$version={version}", b"")
        if fault is not None and fault.kind is FaultKind.DELAY:
            self.spawn(self._later(fault.delay, lambda: self._respond(*response)))
        else:
            self._respond(*response)

    def _respond(self, topic: str, payload: bytes) -> None:
        self.send(Publish(topic, payload, 0))

    def _desired_listener(self) -> Callable[[dict[str, Any], int], None]:
        """Hub.DesiredListener for this session: the service may patch from any thread."""
        loop = asyncio.get_running_loop()

        def listener(patch: dict[str, Any], version: int) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody left to tell
                loop.call_soon_threadsafe(self._notify_desired, patch, version)

        return listener

    def _notify_desired(self, patch: dict[str, Any], version: int) -> None:
        """Publish the patch as IoT Hub does: the body carries ``$version`` too, the topic repeats it."""
        if self.closed or _DESIRED_FILTER not in self.subscriptions:
            return  # unsubscribed since (or gone): IoT Hub only tells subscribers
        body = json.dumps({**patch, "$version": version}).encode()
        self.send(Publish(f"$iothub/twin/PATCH/properties/desired/?$version={version}", body, 0))

    # -- direct methods -------------------------------------------------------------------------
    async def invoke(self, name: str, payload: Any, timeout: float) -> tuple[int, Any]:
        """Hub.MethodInvoker: forward a method call to this device and await its answer."""
        rid = f"{next(self._rids):x}"
        future: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
        fault = self.front.hub.plan.take(self.device_id or "", Operation.METHOD, "mqtt")
        if fault is not None:
            if fault.kind is FaultKind.STALL:
                self.stall()  # the request is never sent: the caller times out (GatewayTimeout)
            elif fault.kind is FaultKind.DROP:
                self.abort()
                raise ConnectionError("the device's connection dropped")
            elif fault.kind is FaultKind.DELAY:
                await asyncio.sleep(fault.delay)
            elif fault.kind is FaultKind.ERROR:
                raise ConnectionError(f"method request refused with {fault.code}")
            if fault.kind in (FaultKind.STALL, FaultKind.NO_ACK):
                await asyncio.sleep(timeout)
                raise TimeoutError
        self.pending_methods[rid] = future
        try:
            self.send(Publish(f"$iothub/methods/POST/{name}/?$rid={rid}", json.dumps(payload).encode(), 0))
            await self.writer.drain()
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self.pending_methods.pop(rid, None)

    def _method_response(self, packet: Publish) -> None:
        head, _, query = packet.topic.partition("?")
        status_text = head[len("$iothub/methods/res/") :].strip("/")
        rid = dict(parse_qsl(query, keep_blank_values=True)).get("$rid", "")
        future = self.pending_methods.get(rid)
        if future is None or future.done() or not status_text.isdigit():
            return
        try:
            body: Any = json.loads(packet.payload) if packet.payload else None
        except ValueError:
            body = packet.payload.decode("utf-8", "replace")
        future.set_result((int(status_text), body))

    def fail_pending(self) -> None:
        for future in self.pending_methods.values():
            if not future.done():
                future.set_exception(ConnectionError("the device disconnected before answering"))
        if self.c2d_inflight and self.device_id is not None:  # unacknowledged: redelivered on reconnect
            self.front.hub.release_c2d(self.device_id, list(self.c2d_inflight.values()))
            self.c2d_inflight.clear()


def _c2d_bag(device: str, entry: QueuedC2D) -> str:
    """The topic's property bag as IoT Hub writes it: system properties (``$.mid``, ``$.to``, ``$.cid``)
    and the application properties, URL-encoded."""
    pairs = [("$.mid", entry.message_id), ("$.to", f"/devices/{device}/messages/deviceBound")]
    if entry.correlation_id:
        pairs.append(("$.cid", entry.correlation_id))
    pairs += sorted(entry.properties.items())
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)


class MqttFront:
    """IoT Hub's MQTT device surface for one :class:`Hub`; implements ``gateway.emulator.front.Front``."""

    transport = "mqtt"

    def __init__(
        self,
        hub: Hub,
        config: FrontConfig = FrontConfig(),  # noqa: B008 - frozen dataclass, safe as a default
        *,
        max_packet_size: int = _MAX_PACKET,
        connect_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.hub = hub
        self.config = config
        self.max_packet_size = max_packet_size
        self.connect_timeout = connect_timeout
        self.clock = clock  #: the time SAS token expiry is checked against
        self.log: list[str] = []  #: a short trail of what happened, for test failure messages
        self._server: asyncio.Server | None = None
        self._plain: asyncio.Server | None = None
        self._sessions: set[_Session] = set()
        self.expired_drops = 0  #: connections closed because their SAS token expired
        self._port = 0
        self._plain_port = 0

    @property
    def port(self) -> int:
        return self._port

    @property
    def plain_port(self) -> int:
        """A loopback port without TLS, for the HTTP front's WebSocket bridge (TLS is on the HTTPS side)."""
        return self._plain_port or self._port

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._serve, self.config.host, self.config.port, ssl=self.config.ssl_context
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        if self.config.ssl_context is not None:
            self._plain = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self._plain_port = int(self._plain.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        server, self._server = self._server, None
        plain, self._plain = self._plain, None
        if plain is not None:
            plain.close()
        if server is not None:
            server.close()
        await self.drop_all()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)

    async def drop_all(self) -> None:
        sessions = list(self._sessions)
        for session in sessions:
            session.abort()
        await asyncio.sleep(0)

    async def __aenter__(self) -> MqttFront:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def sessions(self, device_id: str | None = None) -> int:
        """How many connections are open (for ``device_id``, or in all)."""
        return sum(1 for s in self._sessions if not s.closed and device_id in (None, s.device_id))

    def send_c2d(self, device_id: str, body: bytes, properties: dict[str, str] | None = None,
                 message_id: str | None = None) -> str:
        """Queue a cloud-to-device message (``Hub.send_c2d``); delivered now if the device listens."""
        if self.hub.device(device_id) is None:
            self.hub.add_device(device_id)
        return self.hub.send_c2d(device_id, body, properties=properties, message_id=message_id)

    def _log(self, line: str) -> None:
        self.log.append(line)
        del self.log[:-200]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = _Session(self, reader, writer)
        self._sessions.add(session)
        try:
            await session.run()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except Exception:  # a bug must not kill the server, but must be visible
            log.exception("MQTT front: connection handler failed")
        finally:
            session.closed = True
            self._sessions.discard(session)
            for task in list(session.tasks):
                task.cancel()
            session.fail_pending()
            if session.device_id is not None:
                self.hub.detach(session.device_id, session)
            with contextlib.suppress(Exception):
                writer.close()
            if session.device_id is not None:
                self._log(f"disconnect {session.device_id}")
