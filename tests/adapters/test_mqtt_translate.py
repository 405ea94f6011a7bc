"""adapters.mqtt: reason codes, paho objects, IoT Hub's status property, response topics and render()."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt._packet import convert_connack_rc_to_reason_code
from paho.mqtt.client import convert_disconnect_error_code_to_reason_code
from paho.mqtt.enums import ConnackCode, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from adapters.mqtt import IOTHUB_STATUSES, PACKETS, WireForm, reason_name, render, translate, translate_topic
from gateway.codes import all_codes, lookup
from gateway.errors import (
    ConnectionLostError,
    IdentityConflictError,
    IoTHubError,
    QuotaExceededError,
    ThrottledError,
)

PACKET_TYPE = {
    "connack": PacketTypes.CONNACK,
    "puback": PacketTypes.PUBACK,
    "suback": PacketTypes.SUBACK,
    "disconnect": PacketTypes.DISCONNECT,
}

PROTOCOL_VIOLATION = 400901

# The decided MQTT 5 table, written out independently of the implementation: value -> (code, exact).
V5: dict[int, tuple[int, bool]] = {
    0x80: (500001, False),  # on DISCONNECT: 404104 (below)
    0x81: (400901, False),
    0x82: (400901, False),
    0x83: (500001, False),
    0x84: (400001, False),
    0x85: (401002, False),
    0x86: (401003, False),
    0x87: (401003, False),
    0x88: (503001, False),
    0x89: (503005, False),
    0x8A: (403000, False),
    0x8B: (503001, False),
    0x8C: (401002, False),
    0x8D: (404104, False),
    0x8E: (400027, True),
    0x8F: (400004, False),
    0x90: (400004, False),
    0x91: (400901, False),
    0x92: (400901, False),
    0x93: (400901, False),
    0x94: (400901, False),
    0x95: (413001, True),
    0x96: (429001, False),
    0x97: (429001, False),
    0x98: (503001, False),
    0x99: (400103, False),
    0x9A: (400003, False),
    0x9B: (400003, False),
    0x9C: (503906, False),
    0x9D: (503906, False),
    0x9E: (400003, False),
    0x9F: (429001, False),
    0xA0: (404104, False),
    0xA1: (400003, False),
    0xA2: (400003, False),
}

V3_CONNACK: dict[int, int] = {1: 400001, 2: 401002, 3: 503001, 4: 401003, 5: 401003}

STATUS: dict[str, int | None] = {
    "0001": None,
    "0100": 400004,
    "0101": 401003,
    "0102": 403010,
    "0103": 409000,
    "0104": 412001,
    "0501": 429001,
    "0502": 403002,
    "0503": 429001,
    "0504": 404000,
    "0601": 500001,
    "0602": 500008,
    "0603": 503005,
    "06A0": 404103,
    "06A1": 504101,
    "06A2": 502000,
}
# The statuses whose meaning, as the hub describes it, is exactly one catalog code (throttled, the daily
# quota, precondition failed, method target offline / timed out). The rest are our reading: inexact.
EXACT_STATUSES = {"0104", "0501", "0502", "06A0", "06A1"}


def expected_v5(value: int, packet: str) -> tuple[int, bool] | None:
    if value < 0x80:
        return None
    if value == 0x80 and packet == "disconnect":
        return 404104, False
    return V5.get(value, (PROTOCOL_VIOLATION, False))


def expected(value: int, version: int, packet: str) -> tuple[int, bool] | None:
    if version < 5 and packet == "connack" and value < 0x80:
        if value == 0:
            return None
        return (V3_CONNACK[value], False) if value in V3_CONNACK else (PROTOCOL_VIOLATION, False)
    if version < 5 and packet == "suback" and value <= 0x80:
        if value <= 2:
            return None
        return (400004, False) if value == 0x80 else (PROTOCOL_VIOLATION, False)
    return expected_v5(value, packet)


def outcome(err: IoTHubError | None) -> tuple[int, bool] | None:
    return None if err is None else (err.code, err.exact)


def assert_valid(err: IoTHubError | None) -> None:
    if err is None:
        return
    assert isinstance(err, IoTHubError)
    assert err.transport == "mqtt"
    assert lookup(err.code).code == err.code
    json.dumps(err.to_dict())


# -------------------------------------------------------------------------------------------------
# every reason code on every packet and version


@pytest.mark.parametrize("version", [3, 4, 5])
@pytest.mark.parametrize("packet", PACKETS)
def test_every_value_has_its_documented_outcome(version: int, packet: str) -> None:
    for value in range(256):
        err = translate(value, protocol_version=version, packet=packet)
        assert_valid(err)
        assert outcome(err) == expected(value, version, packet), (value, version, packet)
        if err is not None:
            assert err.native["reason_code"] == value
            assert err.native["packet"] == packet
            assert err.native["protocol_version"] == version


def test_the_listed_codes_by_name() -> None:
    v5 = {"protocol_version": 5}
    assert translate(0x8E, packet="disconnect", **v5).name == "ConnectionForcefullyClosedOnNewConnection"  # type: ignore[union-attr]
    assert isinstance(translate(142, packet="disconnect", **v5), IdentityConflictError)
    assert outcome(translate(142, packet="disconnect", **v5)) == (400027, True)
    assert outcome(translate(0x95, packet="disconnect", **v5)) == (413001, True)
    assert isinstance(translate(0x96, packet="disconnect", **v5), ThrottledError)
    assert isinstance(translate(0x9F, packet="connack", **v5), ThrottledError)
    assert translate(0x80, packet="disconnect", **v5).name == "DeviceConnectionClosedRemotely"  # type: ignore[union-attr]
    assert translate(0x80, packet="puback", **v5).name == "ServerError"  # type: ignore[union-attr]
    assert translate(5, protocol_version=4).name == "IotHubUnauthorized"  # type: ignore[union-attr]
    assert translate(2, protocol_version=4).retryable is False  # type: ignore[union-attr]
    assert translate(3, protocol_version=4).retryable is True  # type: ignore[union-attr]


@pytest.mark.parametrize("value", [0x10, 0x11, 0x18, 0x19, 0x00, 0x01, 0x02, 0x04, 0x7F])
def test_mqtt5_success_family_is_none(value: int) -> None:
    for packet in PACKETS:
        assert translate(value, protocol_version=5, packet=packet) is None


@pytest.mark.parametrize(("v3", "v5"), [(1, 132), (2, 133), (3, 136), (4, 134), (5, 135)])
def test_v3_connack_and_its_paho_conversion_agree(v3: int, v5: int) -> None:
    original = translate(v3, protocol_version=4, packet="connack")
    assert original is not None
    for version in (4, 5):
        converted = translate(v5, protocol_version=version, packet="connack")
        assert outcome(converted) == (original.code, False)


def test_messages_name_the_packet_and_the_code() -> None:
    err = translate(5, protocol_version=4)
    assert str(err) == (
        "401003 IotHubUnauthorized: MQTT 3.1.1 CONNACK return code 5 (Connection Refused, not authorized)"
    )
    err = translate(142, protocol_version=5, packet="disconnect")
    assert "DISCONNECT reason code 142 (Session taken over)" in str(err)
    assert err is not None and err.native["reason_name"] == "Session taken over"


# -------------------------------------------------------------------------------------------------
# paho objects


def paho_reason_codes() -> list[tuple[int, str]]:
    """Every (value, packet) paho can build a ReasonCode for, among the four packets."""
    out = []
    for value, names in ReasonCode.names.items():
        for packet, packet_type in PACKET_TYPE.items():
            if any(packet_type in types for types in names.values()):
                out.append((value, packet))
    return out


@pytest.mark.parametrize(("value", "packet"), paho_reason_codes())
def test_paho_reason_codes_read_like_their_value(value: int, packet: str) -> None:
    rc = ReasonCode(PACKET_TYPE[packet], identifier=value)
    for version in (4, 5):
        explicit = translate(rc, protocol_version=version, packet=packet)
        assert outcome(explicit) == outcome(translate(value, protocol_version=version, packet=packet))
        # without packet=, the ReasonCode's own packet type decides
        assert outcome(translate(rc, protocol_version=version)) == outcome(explicit)
        if explicit is not None:
            assert explicit.native["reason_name"] == rc.getName()


def test_paho_disconnect_reason_code_infers_the_packet() -> None:
    lost = convert_disconnect_error_code_to_reason_code(MQTTErrorCode.MQTT_ERR_CONN_LOST)
    assert lost == 128
    assert translate(lost, protocol_version=4).name == "DeviceConnectionClosedRemotely"  # type: ignore[union-attr]
    keepalive = convert_disconnect_error_code_to_reason_code(MQTTErrorCode.MQTT_ERR_KEEPALIVE)
    assert translate(keepalive, protocol_version=5).name == "DeviceConnectionClosedRemotely"  # type: ignore[union-attr]
    protocol = convert_disconnect_error_code_to_reason_code(MQTTErrorCode.MQTT_ERR_PROTOCOL)
    assert translate(protocol, protocol_version=5).code == PROTOCOL_VIOLATION  # type: ignore[union-attr]
    # an explicit packet wins over the ReasonCode's own
    assert translate(lost, protocol_version=5, packet="puback").name == "ServerError"  # type: ignore[union-attr]
    assert translate(ReasonCode(PacketTypes.DISCONNECT, "Normal disconnection"), protocol_version=5) is None


@pytest.mark.parametrize("member", list(ConnackCode))
def test_paho_v3_connack_conversion(member: ConnackCode) -> None:
    expected_code = None if member.value == 0 else (V3_CONNACK[member.value], False)
    converted = convert_connack_rc_to_reason_code(member)
    for version in (3, 4, 5):  # paho gives the converted ReasonCode whatever the protocol
        assert outcome(translate(converted, protocol_version=version)) == expected_code
    # a ConnackCode itself is always a 3.1.1 CONNACK, whatever version and packet say
    assert outcome(translate(member, protocol_version=5, packet="puback")) == expected_code


MQTT_ERRORS: dict[str, str | None] = {
    "MQTT_ERR_AGAIN": None,
    "MQTT_ERR_SUCCESS": None,
    "MQTT_ERR_NOMEM": "UnclassifiedTransportError",
    "MQTT_ERR_PROTOCOL": "ProtocolViolation",
    "MQTT_ERR_INVAL": "ArgumentInvalid",
    "MQTT_ERR_NO_CONN": "NotConnected",
    "MQTT_ERR_CONN_REFUSED": "ConnectionRefused",
    "MQTT_ERR_NOT_FOUND": "UnclassifiedTransportError",
    "MQTT_ERR_CONN_LOST": "DeviceConnectionClosedRemotely",
    "MQTT_ERR_TLS": "TlsHandshakeFailed",
    "MQTT_ERR_PAYLOAD_SIZE": "MessageTooLarge",
    "MQTT_ERR_NOT_SUPPORTED": "InvalidOperation",
    "MQTT_ERR_AUTH": "IotHubUnauthorized",
    "MQTT_ERR_ACL_DENIED": "GenericForbidden",
    "MQTT_ERR_UNKNOWN": "UnclassifiedTransportError",
    "MQTT_ERR_ERRNO": "UnclassifiedTransportError",
    "MQTT_ERR_QUEUE_SIZE": "GenericTooManyRequests",
    "MQTT_ERR_KEEPALIVE": "DeviceConnectionClosedRemotely",
}


def test_every_mqtt_error_code_member_is_listed() -> None:
    assert {m.name for m in MQTTErrorCode} == set(MQTT_ERRORS)


@pytest.mark.parametrize("member", list(MQTTErrorCode))
def test_mqtt_error_codes(member: MQTTErrorCode) -> None:
    # the same int as a reason code would mean something else: the enum class decides
    err = translate(member, protocol_version=5, packet="disconnect", properties={"status": "0502"})
    name = MQTT_ERRORS[member.name]
    if name is None:
        assert err is None
        return
    assert err is not None
    assert err.name == name
    assert err.exact is False
    assert err.native["mqtt_error"] == member.name
    assert err.native["mqtt_errno"] == member.value


def test_mqtt_error_codes_keep_their_meaning() -> None:
    assert isinstance(translate(MQTTErrorCode.MQTT_ERR_CONN_LOST), ConnectionLostError)
    assert translate(MQTTErrorCode.MQTT_ERR_AUTH).code == 401003  # type: ignore[union-attr]
    assert translate(4, protocol_version=5) is None  # the plain int 4 is a success reason code


# -------------------------------------------------------------------------------------------------
# IoT Hub's status user property


def make_properties(packet_type: int) -> Any:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def puback_properties(*pairs: tuple[str, str], reason_string: str | None = None) -> Any:
    props = make_properties(PacketTypes.PUBACK)
    for pair in pairs:
        props.UserProperty = pair
    if reason_string is not None:
        props.ReasonString = reason_string
    return props


def test_151_throttled_or_daily_quota_by_status() -> None:
    throttled = translate(151, protocol_version=5, packet="puback", properties={"status": "0501"})
    quota = translate(151, protocol_version=5, packet="puback", properties={"status": "0502"})
    bare = translate(151, protocol_version=5, packet="puback")
    assert outcome(throttled) == (429001, True)
    assert isinstance(throttled, ThrottledError)
    assert outcome(quota) == (403002, True)
    assert isinstance(quota, QuotaExceededError)
    assert outcome(bare) == (429001, False)


def test_paho_properties_object() -> None:
    props = puback_properties(("trace-id", "abc-123"), ("status", "0502"), ("reason", "daily quota used up"))
    err = translate(ReasonCode(PacketTypes.PUBACK, identifier=151), protocol_version=5, properties=props)
    assert outcome(err) == (403002, True)
    assert err is not None
    assert err.tracking_id == "abc-123"
    assert err.message.endswith(": daily quota used up")
    assert err.native["status"] == "0502"
    assert err.native["packet"] == "puback"


def test_paho_properties_reason_string_and_disconnect() -> None:
    props = make_properties(PacketTypes.DISCONNECT)
    props.UserProperty = ("status", "0101")
    props.ReasonString = "SAS token expired"
    err = translate(135, protocol_version=5, packet="disconnect", properties=props)
    assert outcome(err) == (401003, False)  # 0101 "Not Authorized": 401002 or 401003, the hub does not say
    assert err is not None and "SAS token expired" in err.message
    empty = make_properties(PacketTypes.PUBACK)  # what paho hands over on 3.1.1
    assert outcome(translate(135, protocol_version=4, properties=empty)) == (401003, False)


@pytest.mark.parametrize(("status", "code"), STATUS.items())
def test_status_table(status: str, code: int | None) -> None:
    for text in (status, status.lower(), f"0x{status}", f" {status} "):
        for props in ({"status": text}, {"user_properties": [("status", text)]}, puback_properties(("status", text))):
            err = translate(131, protocol_version=5, packet="puback", properties=props)
            if code is None:  # a success status never clears a failure reason code
                assert outcome(err) == (500001, False)
                assert translate(0, protocol_version=5, packet="puback", properties=props) is None
            else:
                assert outcome(err) == (code, status in EXACT_STATUSES), (text, props)
    assert {key: row[1] for key, row in IOTHUB_STATUSES.items()} == STATUS


def test_status_variants() -> None:
    def rc131(props: Any) -> tuple[int, bool] | None:
        return outcome(translate(0x83, protocol_version=5, packet="puback", properties=props))

    assert rc131({"status": 0x0502}) == (403002, True)  # the two-byte number
    assert rc131({"status": b"0501"}) == (429001, True)
    assert rc131({"status": "404103"}) == (404103, True)  # a six-digit code
    assert rc131({"status": 404103}) == (404103, True)
    assert rc131({"status": "429999"}) == (429000, False)  # unlisted in the catalog: its family, inexact
    assert rc131({"status": "0999"}) == (500001, False)  # unknown status: the reason code, inexact
    assert rc131({"status": "0102 "}) == (403010, False)  # our reading of "Not Allowed": inexact
    assert rc131({"status": "999999"}) == (500001, False)
    assert rc131({"status": ["0501"]}) == (500001, False)
    assert rc131({"Status": "0501"}) == (429001, True)
    # a direct key wins over the pairs; the first pair wins among pairs
    assert rc131({"status": "0502", "user_properties": [("status", "0501")]}) == (403002, True)
    assert rc131({"user_properties": [("status", "0502"), ("status", "0501")]}) == (403002, True)
    assert rc131({"UserProperty": [("status", "0501")]}) == (429001, True)
    # the retryable bit is part of the value: 0101 and 0501 differ in it only
    assert rc131({"status": "0101"}) == (401003, False)
    assert rc131({"status": "0501"}) == (429001, True)
    assert rc131({"status": "0500"}) == (500001, False)
    # a failure status wins over a success reason code
    assert outcome(translate(0, protocol_version=5, packet="puback", properties={"status": "0504"})) == (404000, False)
    unknown = translate(0x83, protocol_version=5, packet="puback", properties={"status": "0999"})
    assert unknown is not None and unknown.native["status"] == "0999" and "unknown status" in unknown.message


def test_trace_id_reason_and_tolerated_garbage() -> None:
    err = translate(0x97, protocol_version=5, packet="suback", properties={"trace-id": "t" * 10_000, "reason": 7})
    assert err is not None
    assert err.tracking_id == "t" * 256
    assert err.message.endswith(": 7")
    for junk in (42, "status", object(), [("status", "0502")], {"user_properties": 5}, {1: 2}, {"status": None}):
        assert outcome(translate(0x97, protocol_version=5, packet="puback", properties=junk)) == (429001, False)

    class Hostile(dict[str, str]):
        def items(self) -> Any:
            raise RuntimeError("boom")

    assert outcome(translate(0x97, protocol_version=5, properties=Hostile())) == (429001, False)


def test_142_is_400027_exact_even_with_properties() -> None:
    props = {"trace-id": "x", "reason": "new connection"}
    err = translate(142, protocol_version=5, packet="disconnect", properties=props)
    assert outcome(err) == (400027, True)
    assert err is not None and err.tracking_id == "x"
    assert pickle.loads(pickle.dumps(err)).code == 400027


# -------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("bad", ["135", 1.5, None, object(), True, b"\x87", [135], -1, 256, 10**30])
def test_non_codes_raise_value_error_naming_them(bad: object) -> None:
    with pytest.raises(ValueError, match="reason code") as info:
        translate(bad)
    assert repr(bad)[:20] in str(info.value)


@pytest.mark.parametrize("version", [0, 2, 6, "5", True, None, 5.0])
def test_bad_protocol_version(version: object) -> None:
    with pytest.raises(ValueError, match="protocol_version"):
        translate(0x87, protocol_version=version)  # type: ignore[arg-type]


@pytest.mark.parametrize("packet", ["connect", "publish", "", 4, "pubrec"])
def test_bad_packet(packet: object) -> None:
    with pytest.raises(ValueError, match="packet"):
        translate(0x87, packet=packet)  # type: ignore[arg-type]


def test_reason_code_shaped_objects() -> None:
    class Fake:
        packetType = 14

        def __init__(self, value: object) -> None:
            self.value = value

        def getName(self) -> str:
            raise KeyError(self.value)

    assert outcome(translate(Fake(0x80), protocol_version=5)) == (404104, False)
    with pytest.raises(ValueError):
        translate(Fake(300))
    with pytest.raises(ValueError):
        translate(Fake("135"))

    class Exploding:
        @property
        def value(self) -> int:
            raise RuntimeError("no")

    with pytest.raises(ValueError, match="Exploding"):
        translate(Exploding())


# -------------------------------------------------------------------------------------------------
# response topics


@pytest.mark.parametrize(
    ("topic", "payload", "code", "exact"),
    [
        ("$iothub/twin/res/200/?$rid=1", b"{}", None, None),
        ("$iothub/twin/res/204/?$rid=2&$version=7", None, None, None),
        ("$iothub/twin/res/100/?$rid=2", None, None, None),
        ("$iothub/twin/res/429/?$rid=3", None, 429000, False),
        ("$iothub/twin/res/429/?$rid=3", b'{"errorCode":429001,"trackingId":"tr"}', 429001, True),
        ("$iothub/twin/res/400/?$rid=3", '{"errorCode":"400004","message":"bad patch"}', 400004, True),
        ("$iothub/twin/res/400/?$rid=3", b'{"ErrorCode":400027}', 400027, True),
        ("$iothub/twin/res/400/?$rid=3", b'{"errorCode":4000041}', 400000, False),
        ("$iothub/twin/res/400/?$rid=3", b'{"errorCode":"abc"}', 400000, False),
        ("$iothub/twin/res/400/?$rid=3", b'{"errorCode":true}', 400000, False),
        ("$iothub/twin/res/400/?$rid=3", b'{"errorCode":400004.0}', 400000, False),
        ("$iothub/twin/res/400/?$rid=3", b'{"errorCode":200001}', 400000, False),
        ("$iothub/twin/res/404/?$rid=3", b'{"errorCode":404777}', 404000, False),  # unlisted: its family
        ("$iothub/twin/res/500/?$rid=3", b"\xff\xfe garbage", 500000, False),
        ("$iothub/twin/res/500/?$rid=3", b"[1,2]", 500000, False),
        ("$iothub/twin/res/503/?$rid=3", b"[" * 50_000, 503000, False),
        ("$iothub/twin/res/503/?$rid=3", b'{"errorCode":' + b"9" * 5000 + b"}", 503000, False),
        ("$iothub/twin/res/412", b'{"errorCode":412001}', 412001, True),
        ("$iothub/twin/res/412/", None, 412000, False),
        ("$iothub/twin/res/599/?", None, 599000, False),
        # a device's own method answer: its status family, the body is the device's
        ("$iothub/methods/res/404/?$rid=9", b'{"errorCode":404103}', 404000, False),
        ("$iothub/methods/res/200/?$rid=9", b"anything", None, None),
        ("$iothub/methods/res/500/?$rid=9", None, 500000, False),
    ],
)
def test_response_topics(topic: str, payload: object, code: int | None, exact: bool | None) -> None:
    err = translate_topic(topic, payload)
    assert_valid(err)
    assert outcome(err) == (None if code is None else (code, exact))


def test_response_topic_details() -> None:
    body = {"errorCode": 429001, "trackingId": "abc", "message": "slow down", "timestampUtc": "2024-01-01"}
    err = translate_topic(b"$iothub/twin/res/429/?$rid=42&$version=3", json.dumps(body).encode())
    assert err is not None
    assert err.tracking_id == "abc"
    assert err.native["rid"] == "42"
    assert err.native["version"] == "3"
    assert err.native["status"] == 429
    assert err.native["kind"] == "twin"
    assert "slow down" in err.message
    big = json.dumps({"errorCode": 429001, "pad": "x" * 70_000})  # over the 64 KiB cap: not parsed
    assert outcome(translate_topic("$iothub/twin/res/429/?$rid=1", big)) == (429000, False)
    view = memoryview(b'{"errorCode":429001}')
    assert outcome(translate_topic("$iothub/twin/res/429/?$rid=1", view)) == (429001, True)
    assert outcome(translate_topic("$iothub/twin/res/429/?$rid=1", 12345)) == (429000, False)


@pytest.mark.parametrize(
    "topic",
    [
        "$iothub/twin/PATCH/properties/desired/?$version=1",
        "$iothub/twin/GET/?$rid=1",
        "$iothub/methods/POST/reboot/?$rid=1",
        "$iothub/twin/res/abc/?$rid=1",
        "$iothub/twin/res//?$rid=1",
        "$iothub/twin/res/600/?$rid=1",
        "$iothub/twin/res/099/?$rid=1",
        "$iothub/twin/res/4290/?$rid=1",
        "$iothub/twin/res/-40/?$rid=1",
        "$iothub/twin/res/٤٢٩/?$rid=1",
        "$iothub/twin/res/200/extra",
        "devices/d1/messages/events/",
        "",
        b"$iothub/twin/res/\xff/",
        429,
        None,
    ],
)
def test_not_a_response_topic(topic: object) -> None:
    with pytest.raises(ValueError, match="response topic"):
        translate_topic(topic)


# -------------------------------------------------------------------------------------------------
# render: the inverse


def test_render_named_forms() -> None:
    assert render(400027, 5) == [WireForm("disconnect", 142, None, True)]
    assert render("ConnectionForcefullyClosedOnNewConnection", 5) == render(400027, 5)
    assert render(400027, 4) == []
    throttled = render("ThrottlingException", 5)
    assert throttled[0] == WireForm("puback", 151, "0501", True)
    assert WireForm("disconnect", 159, None, False) in throttled
    assert WireForm("puback", 151, "0502", True) in render(403002, 5)
    assert WireForm("disconnect", 0x95, None, True) in render(413001, 5)
    assert render(401003, 4) == [WireForm("connack", 4, None, False), WireForm("connack", 5, None, False)]
    assert render(401002, 4) == [WireForm("connack", 2, None, False)]
    assert render(400004, 4) == [WireForm("suback", 0x80, None, False)]
    assert render(404001, 5) == []
    assert render(404001, 5, extended=True) == [
        WireForm("puback", 131, "404001", True),
        WireForm("disconnect", 131, "404001", True),
    ]
    assert render(400027, 5, extended=True) == render(400027, 5)
    with pytest.raises(ValueError):
        render("NoSuchCode", 5)
    with pytest.raises(ValueError):
        render(123, 5)
    with pytest.raises(ValueError):
        render(429001, 6)


@pytest.mark.parametrize("version", [4, 5])
def test_every_rendered_form_round_trips_through_paho_objects(version: int) -> None:
    seen = 0
    for info in all_codes():
        for form in render(info.code, version, extended=True):
            seen += 1
            packet_type = PACKET_TYPE[form.packet]
            if version >= 5:
                rc: object = ReasonCode(packet_type, identifier=form.reason_code)  # paho can decode it
            elif form.packet == "connack":
                rc = convert_connack_rc_to_reason_code(ConnackCode(form.reason_code))
            else:
                rc = ReasonCode(packet_type, identifier=form.reason_code)
            props = make_properties(PacketTypes.PUBACK if form.packet == "puback" else PacketTypes.DISCONNECT)
            if form.status is not None:
                props.UserProperty = ("status", form.status)
            err = translate(rc, protocol_version=version, packet=form.packet, properties=props)
            assert err is not None, (info.code, form)
            assert err.code == info.code, (info.code, form)
            assert err.exact is (form.exact and info.known), (info.code, form)
    assert seen == 6 if version == 4 else seen > 100  # 3.1.1: CONNACK 1-5 and the SUBACK failure


def test_every_mqtt5_reason_code_and_status_is_rendered() -> None:
    forms = {(f.packet, f.reason_code, f.status) for info in all_codes() for f in render(info.code, 5)}
    assert {rc for _, rc, _ in forms} == set(V5) - {0x92}  # 0x92 lives on PUBREL/PUBCOMP only
    assert {s for _, _, s in forms if s} == {s for s, code in STATUS.items() if code is not None}


def test_reason_name() -> None:
    assert reason_name(0, "disconnect") == "Normal disconnection"
    assert reason_name(0, "suback") == "Granted QoS 0"
    assert reason_name(142, "disconnect") == "Session taken over"
    assert reason_name(5, "connack", 4) == "Connection Refused, not authorized"
    assert reason_name(0x42, "puback") == "undefined"
    for value, names in ReasonCode.names.items():
        for packet, packet_type in PACKET_TYPE.items():
            for name, types in names.items():
                if packet_type in types:
                    assert reason_name(value, packet) == name, (value, packet)  # as paho spells it
    with pytest.raises(ValueError):
        reason_name(256)


# -------------------------------------------------------------------------------------------------
# import cost


def test_import_does_not_pull_in_paho() -> None:
    code = (
        "import sys, adapters.mqtt; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('paho', 'aiohttp', 'proton')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


# -------------------------------------------------------------------------------------------------
# hostile input


texts = st.one_of(st.text(max_size=40), st.sampled_from(["0501", "0502", "06a0", "0x0101", "429001", "1", ""]))
values = st.one_of(texts, st.binary(max_size=20), st.integers(), st.none(), st.floats(), st.lists(texts, max_size=3))
keys = st.sampled_from(["status", "trace-id", "reason", "Status", "user_properties"]) | st.text(max_size=10)
pairs = st.lists(st.tuples(keys, values), max_size=5)
properties = st.one_of(
    st.none(),
    st.dictionaries(keys, values | pairs, max_size=6),
    st.builds(lambda p: {"user_properties": p}, pairs),
)


@settings(max_examples=400)
@given(
    value=st.integers(min_value=-(2**70), max_value=2**70) | st.integers(min_value=-2, max_value=300),
    version=st.sampled_from([3, 4, 5]),
    packet=st.sampled_from(PACKETS) | st.none(),
    props=properties,
)
def test_any_int_and_properties(value: int, version: int, packet: str | None, props: object) -> None:
    if not 0 <= value <= 255:
        with pytest.raises(ValueError):
            translate(value, protocol_version=version, packet=packet, properties=props)
        return
    err = translate(value, protocol_version=version, packet=packet, properties=props)
    assert_valid(err)
    if err is not None and props is None:
        assert err.exact is (err.code in (400027, 413001))


@settings(max_examples=300)
@given(value=st.sampled_from(sorted(V5)), status=st.text(max_size=12), trace=st.text(), reason=st.text())
def test_arbitrary_status_text(value: int, status: str, trace: str, reason: str) -> None:
    props = {"status": status, "trace-id": trace, "reason": reason}
    err = translate(value, protocol_version=5, packet="puback", properties=props)
    assert err is not None  # a failure reason code is never cleared
    assert_valid(err)
    assert err.tracking_id == (trace[:256] or None)


@settings(max_examples=300)
@given(anything=st.one_of(st.text(), st.binary(), st.floats(), st.none(), st.lists(st.integers()), st.booleans()))
def test_non_int_reason_codes(anything: object) -> None:
    with pytest.raises(ValueError):
        translate(anything)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
bodies = st.one_of(
    st.none(),
    st.binary(max_size=200),
    st.text(max_size=200),
    st.builds(lambda d: json.dumps(d).encode(), json_values),
    st.builds(
        lambda code, extra: json.dumps({"errorCode": code, "trackingId": extra, "message": extra}),
        st.integers() | st.text(max_size=8) | st.sampled_from([429001, "404001", 400027]),
        json_values,
    ),
)


@settings(max_examples=400)
@given(topic=st.text(max_size=80) | st.binary(max_size=80), payload=bodies)
def test_arbitrary_topics(topic: str | bytes, payload: object) -> None:
    try:
        err = translate_topic(topic, payload)
    except ValueError as exc:
        assert "response topic" in str(exc)
        return
    assert_valid(err)


@settings(max_examples=400)
@given(
    kind=st.sampled_from(["twin", "methods"]),
    status=st.text(st.characters(blacklist_characters="/?"), max_size=5) | st.integers(-10, 1000).map(str),
    tail=st.text(max_size=30),
    payload=bodies,
)
def test_response_like_topics(kind: str, status: str, tail: str, payload: object) -> None:
    topic = f"$iothub/{kind}/res/{status}/?{tail}"
    try:
        err = translate_topic(topic, payload)
    except ValueError as exc:
        assert "response topic" in str(exc)
        assert not (status.isascii() and status.isdigit() and len(status) == 3 and 100 <= int(status) <= 599)
        return
    assert_valid(err)
    code = int(status)
    if code < 300:
        assert err is None
    else:
        assert err is not None
        # the status's family, an exact code from the body, or an unlisted body code carried as its family
        assert err.code // 1000 == code or err.exact or lookup(err.code).code // 1000 == err.code // 1000
