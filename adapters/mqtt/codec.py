"""A small sans-I/O MQTT 3.1.1 / 5 codec for the packets IoT Hub's device surface uses.

Why our own: the emulator's front must speak 3.1.1 (IoT Hub's classic surface, paho's default) and 5,
and the PyPI codecs cover one or the other. Only what a device surface needs is here: CONNECT, CONNACK,
PUBLISH (QoS 0/1), PUBACK, SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP and DISCONNECT,
with MQTT 5 properties (user properties included). QoS 2 and AUTH are refused as unsupported, as IoT
Hub does.

:class:`Decoder` turns a byte stream into packets and raises only :class:`MalformedPacket` (a
``ValueError``) on bad input, whatever the bytes; :func:`encode` is its inverse.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Final, TypeAlias

__all__ = [
    "MQTT_5",
    "MQTT_311",
    "ConnAck",
    "Connect",
    "Decoder",
    "Disconnect",
    "MalformedPacket",
    "Packet",
    "PacketTooLarge",
    "PingReq",
    "PingResp",
    "Prop",
    "Properties",
    "PubAck",
    "Publish",
    "SubAck",
    "Subscribe",
    "UnsubAck",
    "Unsubscribe",
    "UnsupportedProtocol",
    "Will",
    "encode",
]

MQTT_311: Final = 4  #: protocol level of MQTT 3.1.1
MQTT_5: Final = 5
MAX_REMAINING: Final = 268_435_455  #: the largest remaining length a 4-byte varint can say


class MalformedPacket(ValueError):
    """The bytes are not a packet this codec accepts (the peer answers by closing the connection)."""


class PacketTooLarge(MalformedPacket):
    """The packet is larger than the decoder's ``max_packet_size`` (MQTT 5: DISCONNECT 0x95)."""


class Prop(enum.IntEnum):
    """MQTT 5 property identifiers (section 2.2.2.2)."""

    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


# Wire type of each property: "byte", "int2", "int4", "varint", "str", "bin".
_PROP_TYPES: Final[dict[int, str]] = {
    Prop.PAYLOAD_FORMAT_INDICATOR: "byte",
    Prop.MESSAGE_EXPIRY_INTERVAL: "int4",
    Prop.CONTENT_TYPE: "str",
    Prop.RESPONSE_TOPIC: "str",
    Prop.CORRELATION_DATA: "bin",
    Prop.SUBSCRIPTION_IDENTIFIER: "varint",
    Prop.SESSION_EXPIRY_INTERVAL: "int4",
    Prop.ASSIGNED_CLIENT_IDENTIFIER: "str",
    Prop.SERVER_KEEP_ALIVE: "int2",
    Prop.AUTHENTICATION_METHOD: "str",
    Prop.AUTHENTICATION_DATA: "bin",
    Prop.REQUEST_PROBLEM_INFORMATION: "byte",
    Prop.WILL_DELAY_INTERVAL: "int4",
    Prop.REQUEST_RESPONSE_INFORMATION: "byte",
    Prop.RESPONSE_INFORMATION: "str",
    Prop.SERVER_REFERENCE: "str",
    Prop.REASON_STRING: "str",
    Prop.RECEIVE_MAXIMUM: "int2",
    Prop.TOPIC_ALIAS_MAXIMUM: "int2",
    Prop.TOPIC_ALIAS: "int2",
    Prop.MAXIMUM_QOS: "byte",
    Prop.RETAIN_AVAILABLE: "byte",
    Prop.MAXIMUM_PACKET_SIZE: "int4",
    Prop.WILDCARD_SUBSCRIPTION_AVAILABLE: "byte",
    Prop.SUBSCRIPTION_IDENTIFIER_AVAILABLE: "byte",
    Prop.SHARED_SUBSCRIPTION_AVAILABLE: "byte",
}
_INT_LIMITS: Final = {"byte": 0xFF, "int2": 0xFFFF, "int4": 0xFFFF_FFFF, "varint": MAX_REMAINING}

PropValue: TypeAlias = int | str | bytes


@dataclass(slots=True)
class Properties:
    """MQTT 5 properties: single-valued ones by id, user properties as ordered pairs (repeats allowed)."""

    values: dict[int, PropValue] = field(default_factory=dict)
    user: list[tuple[str, str]] = field(default_factory=list)

    def get(self, prop: int) -> PropValue | None:
        return self.values.get(prop)

    def user_value(self, key: str) -> str | None:
        """The first user property named ``key``."""
        for k, v in self.user:
            if k == key:
                return v
        return None

    def __bool__(self) -> bool:
        return bool(self.values or self.user)


def _props() -> Properties:
    return Properties()


@dataclass(slots=True)
class Will:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    properties: Properties = field(default_factory=_props)


@dataclass(slots=True)
class Connect:
    client_id: str
    protocol_level: int = MQTT_311
    username: str | None = None
    password: bytes | None = None
    keepalive: int = 60
    clean_start: bool = True
    will: Will | None = None
    properties: Properties = field(default_factory=_props)


@dataclass(slots=True)
class ConnAck:
    reason_code: int = 0  #: the 3.1.1 return code or the MQTT 5 reason code
    session_present: bool = False
    properties: Properties = field(default_factory=_props)


@dataclass(slots=True)
class Publish:
    topic: str
    payload: bytes = b""
    qos: int = 0
    packet_id: int | None = None
    retain: bool = False
    dup: bool = False
    properties: Properties = field(default_factory=_props)


@dataclass(slots=True)
class PubAck:
    packet_id: int
    reason_code: int = 0
    properties: Properties = field(default_factory=_props)


@dataclass(slots=True)
class Subscribe:
    packet_id: int
    filters: list[tuple[str, int]]  #: (topic filter, options byte; 3.1.1: the requested QoS)
    properties: Properties = field(default_factory=_props)


@dataclass(slots=True)
class SubAck:
    packet_id: int
    reason_codes: list[int]
    properties: Properties = field(default_factory=_props)


@dataclass(slots=True)
class Unsubscribe:
    packet_id: int
    filters: list[str]
    properties: Properties = field(default_factory=_props)


@dataclass(slots=True)
class UnsubAck:
    packet_id: int
    reason_codes: list[int] = field(default_factory=list)  #: MQTT 5 only
    properties: Properties = field(default_factory=_props)


@dataclass(slots=True)
class PingReq:
    pass


@dataclass(slots=True)
class PingResp:
    pass


@dataclass(slots=True)
class Disconnect:
    reason_code: int = 0  #: MQTT 5 only; 3.1.1 DISCONNECT carries nothing
    properties: Properties = field(default_factory=_props)


Packet: TypeAlias = (
    Connect | ConnAck | Publish | PubAck | Subscribe | SubAck | Unsubscribe | UnsubAck | PingReq | PingResp | Disconnect
)

_CONNECT, _CONNACK, _PUBLISH, _PUBACK = 1, 2, 3, 4
_SUBSCRIBE, _SUBACK, _UNSUBSCRIBE, _UNSUBACK = 8, 9, 10, 11
_PINGREQ, _PINGRESP, _DISCONNECT = 12, 13, 14
_FIXED_FLAGS: Final = {_SUBSCRIBE: 0b0010, _UNSUBSCRIBE: 0b0010}  # every other type (not PUBLISH): 0
_UNSUPPORTED: Final = {5: "PUBREC", 6: "PUBREL", 7: "PUBCOMP", 15: "AUTH", 0: "reserved type 0"}


# --------------------------------------------------------------------------------------------------
# decoding


class _Buf:
    """A bounds-checked reader over one packet's variable header and payload."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes | memoryview, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise MalformedPacket("packet ends early")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def byte(self) -> int:
        if self.pos >= self.end:
            raise MalformedPacket("packet ends early")
        value = self.data[self.pos]
        self.pos += 1
        return int(value)

    def int2(self) -> int:
        value: int = struct.unpack("!H", self.take(2))[0]
        return value

    def int4(self) -> int:
        value: int = struct.unpack("!I", self.take(4))[0]
        return value

    def varint(self) -> int:
        value, shift = 0, 0
        for _ in range(4):
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
        raise MalformedPacket("variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.int2())

    def text(self) -> str:
        raw = self.binary()
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedPacket("string is not UTF-8") from exc
        if "\x00" in value:
            raise MalformedPacket("string contains U+0000")
        return value

    def properties(self) -> Properties:
        length = self.varint()
        if length > self.left():
            raise MalformedPacket("properties run past the packet")
        sub = _Buf(self.data, self.pos, self.pos + length)
        self.pos += length
        props = Properties()
        while sub.left():
            ident = sub.varint()
            kind = _PROP_TYPES.get(ident)
            if ident == Prop.USER_PROPERTY:
                props.user.append((sub.text(), sub.text()))
                continue
            if kind is None:
                raise MalformedPacket(f"unknown property 0x{ident:02X}")
            if ident in props.values and ident != Prop.SUBSCRIPTION_IDENTIFIER:
                raise MalformedPacket(f"property 0x{ident:02X} repeated")
            value: PropValue
            if kind == "byte":
                value = sub.byte()
            elif kind == "int2":
                value = sub.int2()
            elif kind == "int4":
                value = sub.int4()
            elif kind == "varint":
                value = sub.varint()
            elif kind == "str":
                value = sub.text()
            else:
                value = sub.binary()
            props.values[ident] = value
        return props


class Decoder:
    """Incremental decoder for one connection.

    ``protocol_level`` is learnt from the CONNECT when not given (a server's decoder); a decoder for a
    client's side must be told. Packets whose remaining length exceeds ``max_packet_size`` raise
    :class:`PacketTooLarge` as soon as the header is read, before the body is buffered.
    """

    def __init__(self, protocol_level: int | None = None, *, max_packet_size: int = MAX_REMAINING) -> None:
        if protocol_level not in (None, MQTT_311, MQTT_5):
            raise ValueError(f"unsupported protocol level {protocol_level!r}")
        self.protocol_level = protocol_level
        self.max_packet_size = max_packet_size
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Packet]:
        """Add bytes; return every packet now complete. After a MalformedPacket the stream is dead."""
        self._buf += data
        out: list[Packet] = []
        while True:
            header = self._header()
            if header is None:
                return out
            first, start, length = header
            if len(self._buf) < start + length:
                return out
            body = memoryview(self._buf)[start : start + length]
            try:
                packet = self._decode(first, body)
            finally:
                body.release()
            del self._buf[: start + length]
            out.append(packet)

    def _header(self) -> tuple[int, int, int] | None:
        buf = self._buf
        if not buf:
            return None
        length, shift = 0, 0
        for i in range(1, 5):
            if i >= len(buf):
                return None
            b = buf[i]
            length |= (b & 0x7F) << shift
            if not b & 0x80:
                if length + i + 1 > self.max_packet_size:
                    raise PacketTooLarge(f"packet of {length + i + 1} bytes exceeds {self.max_packet_size}")
                return buf[0], i + 1, length
            shift += 7
        raise MalformedPacket("remaining length longer than 4 bytes")

    def _decode(self, first: int, body: memoryview) -> Packet:
        kind, flags = first >> 4, first & 0x0F
        if kind in _UNSUPPORTED:
            raise MalformedPacket(f"unsupported packet type {_UNSUPPORTED[kind]}")
        if kind != _PUBLISH and flags != _FIXED_FLAGS.get(kind, 0):
            raise MalformedPacket(f"bad fixed-header flags 0x{flags:X} for packet type {kind}")
        if self.protocol_level is None and kind != _CONNECT:
            raise MalformedPacket("the first packet must be CONNECT")
        buf = _Buf(body)
        packet = self._body(kind, flags, buf)
        if buf.left():
            raise MalformedPacket(f"{buf.left()} stray bytes after packet type {kind}")
        return packet

    def _body(self, kind: int, flags: int, buf: _Buf) -> Packet:
        if kind == _CONNECT:
            return self._connect(buf)
        v5 = self.protocol_level == MQTT_5
        if kind == _CONNACK:
            ack_flags = buf.byte()
            if ack_flags & 0xFE:
                raise MalformedPacket("reserved CONNACK flags set")
            rc = buf.byte()
            return ConnAck(rc, bool(ack_flags & 1), buf.properties() if v5 else Properties())
        if kind == _PUBLISH:
            qos = (flags >> 1) & 3
            if qos == 3:
                raise MalformedPacket("PUBLISH with QoS 3")
            if qos == 2:
                raise MalformedPacket("unsupported QoS 2")
            topic = buf.text()
            packet_id = buf.int2() if qos else None
            if packet_id == 0:
                raise MalformedPacket("packet identifier 0")
            props = buf.properties() if v5 else Properties()
            return Publish(topic, buf.take(buf.left()), qos, packet_id, bool(flags & 1), bool(flags & 8), props)
        if kind == _PUBACK:
            packet_id = buf.int2()
            rc, props = 0, Properties()
            if v5 and buf.left():
                rc = buf.byte()
                if buf.left():
                    props = buf.properties()
            return PubAck(packet_id, rc, props)
        if kind in (_SUBSCRIBE, _UNSUBSCRIBE):
            packet_id = buf.int2()
            props = buf.properties() if v5 else Properties()
            if not buf.left():
                raise MalformedPacket("SUBSCRIBE/UNSUBSCRIBE without a topic filter")
            if kind == _UNSUBSCRIBE:
                topics: list[str] = []
                while buf.left():
                    topics.append(buf.text())
                return Unsubscribe(packet_id, topics, props)
            filters: list[tuple[str, int]] = []
            while buf.left():
                topic = buf.text()
                options = buf.byte()
                if options & (0xC0 if v5 else 0xFC) or options & 3 == 3:
                    raise MalformedPacket("bad subscription options")
                filters.append((topic, options))
            return Subscribe(packet_id, filters, props)
        if kind in (_SUBACK, _UNSUBACK):
            packet_id = buf.int2()
            props = buf.properties() if v5 else Properties()
            codes = list(buf.take(buf.left()))
            if kind == _SUBACK:
                if not codes:
                    raise MalformedPacket("SUBACK without a return code")
                return SubAck(packet_id, codes, props)
            if codes and not v5:
                raise MalformedPacket("3.1.1 UNSUBACK has no payload")
            return UnsubAck(packet_id, codes, props)
        if kind == _PINGREQ:
            return PingReq()
        if kind == _PINGRESP:
            return PingResp()
        # DISCONNECT (every other type was handled or refused above)
        rc, props = 0, Properties()
        if v5 and buf.left():
            rc = buf.byte()
            if buf.left():
                props = buf.properties()
        return Disconnect(rc, props)

    def _connect(self, buf: _Buf) -> Connect:
        if self.protocol_level is not None:
            raise MalformedPacket("a second CONNECT")
        name = buf.text()
        level = buf.byte()
        if name != "MQTT" or level not in (MQTT_311, MQTT_5):
            # 3.1 ("MQIsdp", level 3) and unknown levels: the server answers CONNACK 1 / 0x84.
            raise UnsupportedProtocol(f"protocol {name!r} level {level}", level)
        v5 = level == MQTT_5
        flags = buf.byte()
        if flags & 1:
            raise MalformedPacket("reserved CONNECT flag set")
        keepalive = buf.int2()
        props = buf.properties() if v5 else Properties()
        client_id = buf.text()
        will = None
        if flags & 0x04:
            will_props = buf.properties() if v5 else Properties()
            will_topic = buf.text()
            will = Will(will_topic, buf.binary(), (flags >> 3) & 3, bool(flags & 0x20), will_props)
            if will.qos == 3:
                raise MalformedPacket("will QoS 3")
        elif flags & 0x38:
            raise MalformedPacket("will QoS or retain set without a will")
        username = buf.text() if flags & 0x80 else None
        password = buf.binary() if flags & 0x40 else None
        if password is not None and username is None and not v5:
            raise MalformedPacket("3.1.1 password without user name")
        self.protocol_level = level
        return Connect(client_id, level, username, password, keepalive, bool(flags & 2), will, props)


class UnsupportedProtocol(MalformedPacket):
    """A CONNECT for a protocol level this codec does not speak; ``level`` says which."""

    def __init__(self, message: str, level: int) -> None:
        super().__init__(message)
        self.level = level


# --------------------------------------------------------------------------------------------------
# encoding


def _varint(value: int) -> bytes:
    if not 0 <= value <= MAX_REMAINING:
        raise ValueError(f"variable byte integer out of range: {value}")
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | 0x80 if value else b)
        if not value:
            return bytes(out)


def _bin(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("binary field longer than 65535 bytes")
    return struct.pack("!H", len(data)) + data


def _str(text: str) -> bytes:
    return _bin(text.encode("utf-8"))


def _encode_props(props: Properties) -> bytes:
    out = bytearray()
    for ident, value in props.values.items():
        kind = _PROP_TYPES.get(ident)
        if kind is None:
            raise ValueError(f"unknown property 0x{ident:02X}")
        out += _varint(ident)
        if kind in _INT_LIMITS:
            if not isinstance(value, int) or not 0 <= value <= _INT_LIMITS[kind]:
                raise ValueError(f"property 0x{ident:02X} needs an integer in 0..{_INT_LIMITS[kind]}")
            out += (
                bytes([value]) if kind == "byte"
                else struct.pack("!H", value) if kind == "int2"
                else struct.pack("!I", value) if kind == "int4"
                else _varint(value)
            )
        elif kind == "str":
            if not isinstance(value, str):
                raise ValueError(f"property 0x{ident:02X} needs a string")
            out += _str(value)
        else:
            if not isinstance(value, bytes):
                raise ValueError(f"property 0x{ident:02X} needs bytes")
            out += _bin(value)
    for key, value in props.user:
        out += _varint(Prop.USER_PROPERTY) + _str(key) + _str(value)
    return _varint(len(out)) + bytes(out)


def _frame(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def encode(packet: Packet, protocol_level: int = MQTT_311) -> bytes:
    """The bytes of ``packet`` for a connection at ``protocol_level`` (3.1.1: 4, MQTT 5: 5).

    MQTT 5 properties are dropped on 3.1.1, which has none. Raises ``ValueError`` for values the wire
    cannot carry (a reason code > 255, a 70 kB string, ...).
    """
    if protocol_level not in (MQTT_311, MQTT_5):
        raise ValueError(f"unsupported protocol level {protocol_level!r}")
    v5 = protocol_level == MQTT_5
    if isinstance(packet, Publish):
        if packet.qos not in (0, 1):
            raise ValueError("only QoS 0 and 1 are supported")
        if packet.qos and not packet.packet_id:
            raise ValueError("a QoS 1 PUBLISH needs a packet id")
        first = (_PUBLISH << 4) | (8 if packet.dup else 0) | (packet.qos << 1) | (1 if packet.retain else 0)
        body = _str(packet.topic)
        if packet.qos:
            body += struct.pack("!H", packet.packet_id)
        if v5:
            body += _encode_props(packet.properties)
        return _frame(first, body + packet.payload)
    if isinstance(packet, PubAck):
        body = struct.pack("!H", packet.packet_id)
        if v5 and (packet.reason_code or packet.properties):
            body += bytes([packet.reason_code])
            if packet.properties:
                body += _encode_props(packet.properties)
        return _frame(_PUBACK << 4, body)
    if isinstance(packet, ConnAck):
        body = bytes([1 if packet.session_present else 0, packet.reason_code])
        if v5:
            body += _encode_props(packet.properties)
        return _frame(_CONNACK << 4, body)
    if isinstance(packet, Connect):
        return _encode_connect(packet)
    if isinstance(packet, Subscribe):
        body = struct.pack("!H", packet.packet_id) + (_encode_props(packet.properties) if v5 else b"")
        for topic, options in packet.filters:
            body += _str(topic) + bytes([options])
        return _frame((_SUBSCRIBE << 4) | 0b0010, body)
    if isinstance(packet, SubAck):
        body = struct.pack("!H", packet.packet_id) + (_encode_props(packet.properties) if v5 else b"")
        return _frame(_SUBACK << 4, body + bytes(packet.reason_codes))
    if isinstance(packet, Unsubscribe):
        body = struct.pack("!H", packet.packet_id) + (_encode_props(packet.properties) if v5 else b"")
        return _frame((_UNSUBSCRIBE << 4) | 0b0010, body + b"".join(_str(t) for t in packet.filters))
    if isinstance(packet, UnsubAck):
        body = struct.pack("!H", packet.packet_id)
        if v5:
            body += _encode_props(packet.properties) + bytes(packet.reason_codes)
        return _frame(_UNSUBACK << 4, body)
    if isinstance(packet, PingReq):
        return bytes([_PINGREQ << 4, 0])
    if isinstance(packet, PingResp):
        return bytes([_PINGRESP << 4, 0])
    if isinstance(packet, Disconnect):
        body = b""
        if v5 and (packet.reason_code or packet.properties):
            body = bytes([packet.reason_code]) + (_encode_props(packet.properties) if packet.properties else b"")
        return _frame(_DISCONNECT << 4, body)
    raise TypeError(f"not a packet: {type(packet).__name__}")


def _encode_connect(packet: Connect) -> bytes:
    v5 = packet.protocol_level == MQTT_5
    if packet.protocol_level not in (MQTT_311, MQTT_5):
        raise ValueError(f"unsupported protocol level {packet.protocol_level!r}")
    flags = 0x02 if packet.clean_start else 0
    will = packet.will
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if packet.username is not None:
        flags |= 0x80
    if packet.password is not None:
        flags |= 0x40
    body = _str("MQTT") + bytes([packet.protocol_level, flags]) + struct.pack("!H", packet.keepalive)
    if v5:
        body += _encode_props(packet.properties)
    body += _str(packet.client_id)
    if will is not None:
        body += (_encode_props(will.properties) if v5 else b"") + _str(will.topic) + _bin(will.payload)
    if packet.username is not None:
        body += _str(packet.username)
    if packet.password is not None:
        body += _bin(packet.password)
    return _frame(_CONNECT << 4, body)
