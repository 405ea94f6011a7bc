"""The emulator's MQTT codec: exact bytes from the standard, round trips, and hostile input."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.mqtt.codec import (
    MQTT_5,
    MQTT_311,
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    MalformedPacket,
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
    Will,
    encode,
)

# -- exact bytes ---------------------------------------------------------------------------------------


def test_connack_311_refusal_bytes() -> None:
    assert encode(ConnAck(5), MQTT_311) == bytes([0x20, 2, 0, 5])


def test_connack_5_carries_properties() -> None:
    props = Properties({Prop.MAXIMUM_QOS: 1}, [("status", "0501")])
    data = encode(ConnAck(0x97, False, props), MQTT_5)
    assert data[:4] == bytes([0x20, len(data) - 2, 0, 0x97])
    assert Decoder(MQTT_5).feed(data) == [ConnAck(0x97, False, props)]


def test_disconnect_5_session_taken_over_bytes() -> None:
    # The short form: a reason code and no property length (allowed when the remaining length is 1).
    assert encode(Disconnect(0x8E), MQTT_5) == bytes([0xE0, 1, 0x8E])
    # ... and the long form other peers write decodes to the same packet.
    assert Decoder(MQTT_5).feed(bytes([0xE0, 2, 0x8E, 0])) == [Disconnect(0x8E)]
    assert encode(Disconnect(0x8E), MQTT_311) == bytes([0xE0, 0])  # 3.1.1 cannot say why


def test_puback_short_and_long_forms() -> None:
    assert encode(PubAck(7), MQTT_5) == bytes([0x40, 2, 0, 7])
    assert Decoder(MQTT_5).feed(bytes([0x40, 3, 0, 7, 0x97])) == [PubAck(7, 0x97)]
    assert encode(PubAck(7, 0x97, Properties(user=[("status", "0501")])), MQTT_311) == bytes([0x40, 2, 0, 7])


def test_publish_311_bytes() -> None:
    data = encode(Publish("a/b", b"hi", 1, 10), MQTT_311)
    assert data == bytes([0x32, 9, 0, 3]) + b"a/b" + bytes([0, 10]) + b"hi"


@pytest.mark.parametrize(
    ("level", "raw"),
    [  # captured from paho 2.2: client id "d1", user "u", password "p", keepalive 60, clean session
        (MQTT_311, "101400044d51545404c2003c00026431000175000170"),
        (MQTT_5, "101500044d51545405c2003c0000026431000175000170"),
    ],
)
def test_connect_as_paho_writes_it(level: int, raw: str) -> None:
    decoder = Decoder()
    assert decoder.feed(bytes.fromhex(raw)) == [Connect("d1", level, "u", b"p", 60, True)]
    assert decoder.protocol_level == level
    assert encode(Connect("d1", level, "u", b"p", 60, True), level).hex() == raw


def test_remaining_length_varint_boundaries() -> None:
    for size in (0, 127, 128, 16_383, 16_384, 70_000):
        packet = Publish("t", b"x" * size)
        data = encode(packet, MQTT_311)
        assert Decoder(MQTT_311).feed(data) == [packet]


# -- refusals ----------------------------------------------------------------------------------------


def test_server_decoder_requires_connect_first() -> None:
    with pytest.raises(MalformedPacket, match="CONNECT"):
        Decoder().feed(bytes([0xC0, 0]))


def test_second_connect_is_malformed() -> None:
    data = encode(Connect("a"), MQTT_311)
    with pytest.raises(MalformedPacket, match="second CONNECT"):
        Decoder().feed(data + data)


def test_mqtt31_connect_is_unsupported_with_its_level() -> None:
    body = bytes([0, 6]) + b"MQIsdp" + bytes([3, 2, 0, 60, 0, 1]) + b"c"
    with pytest.raises(UnsupportedProtocol) as info:
        Decoder().feed(bytes([0x10, len(body)]) + body)
    assert info.value.level == 3


@pytest.mark.parametrize(
    "data",
    [
        bytes([0x34, 5, 0, 1]) + b"t" + bytes([0, 1]),  # QoS 2
        bytes([0x36, 5, 0, 1]) + b"t" + bytes([0, 1]),  # QoS 3
        bytes([0x50, 2, 0, 1]),  # PUBREC
        bytes([0x80, 6, 0, 1, 0, 1]) + b"t" + bytes([1]),  # SUBSCRIBE with flags 0
        bytes([0xC0, 1, 0]),  # PINGREQ with a body
        bytes([0xE0, 0xFF, 0xFF, 0xFF, 0xFF]),  # 5-byte remaining length
        bytes([0x30, 3, 0, 1]) + b"\x00",  # topic with U+0000
        bytes([0x30, 4, 0, 2]) + b"\xff\xfe",  # topic not UTF-8
        bytes([0x32, 5, 0, 1]) + b"t" + bytes([0, 0]),  # packet id 0
    ],
)
def test_bad_packets(data: bytes) -> None:
    with pytest.raises(MalformedPacket):
        Decoder(MQTT_311).feed(data)


def test_unknown_property_and_repeated_property() -> None:
    with pytest.raises(MalformedPacket, match="unknown property"):
        Decoder(MQTT_5).feed(bytes([0x40, 5, 0, 1, 0x83, 1, 0x7F]))
    with pytest.raises(MalformedPacket, match="repeated"):
        Decoder(MQTT_5).feed(bytes([0x20, 7, 0, 0, 4, 0x24, 1, 0x24, 1]))


def test_packet_too_large_is_refused_from_the_header() -> None:
    decoder = Decoder(MQTT_311, max_packet_size=100)
    header = bytes([0x30, 0xE8, 0x07])  # announces 1000 bytes; the body never has to arrive
    with pytest.raises(PacketTooLarge):
        decoder.feed(header)


def test_encode_refuses_what_the_wire_cannot_carry() -> None:
    with pytest.raises(ValueError):
        encode(Publish("t" * 70_000), MQTT_311)
    with pytest.raises(ValueError):
        encode(PubAck(1, 300), MQTT_5)
    with pytest.raises(ValueError):
        encode(Publish("t", b"", 2, 1), MQTT_311)
    with pytest.raises(ValueError):
        encode(ConnAck(0, False, Properties({Prop.MAXIMUM_QOS: "one"})), MQTT_5)
    with pytest.raises(ValueError):
        encode(PingReq(), 3)


# -- round trips (hypothesis) ------------------------------------------------------------------------

texts = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)
ids = st.integers(1, 0xFFFF)
props = st.builds(
    Properties,
    st.fixed_dictionaries({}, optional={
        Prop.REASON_STRING: texts,
        Prop.MAXIMUM_PACKET_SIZE: st.integers(0, 0xFFFF_FFFF),
        Prop.RECEIVE_MAXIMUM: st.integers(0, 0xFFFF),
        Prop.CORRELATION_DATA: st.binary(max_size=8),
        Prop.SUBSCRIPTION_IDENTIFIER: st.integers(0, 268_435_455),
        Prop.MAXIMUM_QOS: st.integers(0, 1),
    }).map(lambda d: {int(k): v for k, v in d.items()}),
    st.lists(st.tuples(texts, texts), max_size=3),
)


def _publish(qos: int, packet_id: int, **kw: Any) -> Publish:
    return Publish(qos=qos, packet_id=packet_id if qos else None, **kw)


packets = st.one_of(
    st.builds(Connect, texts, st.sampled_from([MQTT_311, MQTT_5]), texts, st.binary(max_size=20),
              st.integers(0, 0xFFFF), st.booleans(),
              st.none() | st.builds(Will, texts, st.binary(max_size=8), st.integers(0, 1), st.booleans(), props),
              props),
    st.builds(ConnAck, st.integers(0, 255), st.booleans(), props),
    st.builds(_publish, st.integers(0, 1), ids, topic=texts, payload=st.binary(max_size=64), retain=st.booleans(),
              dup=st.booleans(), properties=props),
    st.builds(PubAck, ids, st.integers(0, 255), props),
    st.builds(Subscribe, ids, st.lists(st.tuples(texts, st.integers(0, 1)), min_size=1, max_size=3), props),
    st.builds(SubAck, ids, st.lists(st.integers(0, 255), min_size=1, max_size=4), props),
    st.builds(Unsubscribe, ids, st.lists(texts, min_size=1, max_size=3), props),
    st.builds(UnsubAck, ids, st.lists(st.integers(0, 255), max_size=3), props),
    st.just(PingReq()),
    st.just(PingResp()),
    st.builds(Disconnect, st.integers(0, 255), props),
)


def _as_seen(packet: Any, level: int) -> Any:
    """What a peer at ``level`` decodes from ``packet``: 3.1.1 drops properties and MQTT 5-only codes."""
    if level == MQTT_5:
        return packet
    if isinstance(packet, PingReq | PingResp):
        return packet
    changes: dict[str, Any] = {}
    if hasattr(packet, "properties"):
        changes["properties"] = Properties()
    if isinstance(packet, PubAck | Disconnect):
        changes["reason_code"] = 0
    if isinstance(packet, UnsubAck):
        changes["reason_codes"] = []
    if isinstance(packet, Connect) and packet.will is not None:
        changes["will"] = dataclasses.replace(packet.will, properties=Properties())
    return dataclasses.replace(packet, **changes)


@settings(max_examples=300, deadline=None)
@given(packets, st.sampled_from([MQTT_311, MQTT_5]), st.integers(1, 7))
def test_round_trip(packet: Any, level: int, chunk: int) -> None:
    if isinstance(packet, Connect):
        level = packet.protocol_level
        if level == MQTT_311 and packet.username is None:
            packet = dataclasses.replace(packet, password=None)
        decoder = Decoder()
    else:
        decoder = Decoder(level)
    data = encode(packet, level)
    got: list[Any] = []
    for i in range(0, len(data), chunk):  # bytes arrive in arbitrary pieces
        got += decoder.feed(data[i : i + chunk])
    assert got == [_as_seen(packet, level)]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([None, MQTT_311, MQTT_5]))
def test_hostile_bytes_raise_only_malformed(data: bytes, level: int | None) -> None:
    decoder = Decoder(level, max_packet_size=256)
    try:
        for packet in decoder.feed(data):
            assert dataclasses.is_dataclass(packet)
    except MalformedPacket:
        pass


@settings(max_examples=200, deadline=None)
@given(packets, st.binary(min_size=1, max_size=8), st.sampled_from([MQTT_311, MQTT_5]))
def test_mutated_packets_raise_only_malformed(packet: Any, junk: bytes, level: int) -> None:
    if isinstance(packet, Connect):
        return
    data = bytearray(encode(packet, level))
    data[len(data) // 2 : len(data) // 2 + len(junk)] = junk
    with contextlib.suppress(MalformedPacket):
        Decoder(level).feed(bytes(data))
