"""MQTT answers -> IoTHubError: reason codes, IoT Hub's ``status`` user property and response topics.

Pure and paho-free at import: paho's objects are recognised by shape (``ReasonCode`` has an int
``.value`` and ``.getName()``; ``MQTTErrorCode`` / ``ConnackCode`` by class name and ``paho.`` module),
so ``from adapters.mqtt import translate`` costs no paho import.

How a reason code is read (``exact`` is True only when the hub said the code, not when we infer it):

- MQTT 3.1.1 CONNACK 1-5 have no one-to-one IoT Hub code, so all are inexact. 6-127 are not defined
  (ProtocolViolation). paho 2.x hands 3.1.1 CONNACKs over as MQTT 5 ReasonCodes (1->132, 2->133,
  3->136, 4->134, 5->135), so values >= 128 on a 3.1.1 CONNACK go through the MQTT 5 table, which
  gives the same code as the 3.1.1 original.
- 3.1.1 SUBACK: 0-2 granted, 0x80 failure (ArgumentInvalid: IoT Hub refuses unknown topic filters),
  anything else ProtocolViolation. 3.1.1 PUBACK and DISCONNECT carry no code; paho synthesizes MQTT 5
  ones for its callbacks, so those go through the MQTT 5 table.
- MQTT 5: < 0x80 is success; >= 0x80 by ``_V5`` below. Only 0x80 depends on the packet (a DISCONNECT
  "Unspecified error" is a dropped connection, elsewhere a server fault). A code that MQTT 5 does not
  allow on the packet is still read by value: peers misbehave (mosquitto sends 149 on a PUBACK).
- IoT Hub's MQTT 5 ``status`` user property, when known, wins over the reason code (151 is
  throttling with ``0501`` and the daily quota with ``0502``). It is exact only where the hub's own
  meaning of the status is one catalog code (see ``_STATUSES``); a status that names a class
  ("Conflict", "Server Busy") maps to our reading of it, inexact. It is looked up as the full
  two-byte value, *not* with the retryable bit masked: ``0101`` (not authorized) and ``0501``
  (throttled) differ only in that bit. A success status never clears a failure reason code, so a
  contradictory packet still reports its failure. An unknown status falls back to the reason code.
  A six-digit code string (``"429001"``) is also accepted as ``status`` (an extension of ours): exact
  when the catalog lists it; an unlisted one reads as its family's code, inexact (``codes.lookup``).
- paho's ``MQTTErrorCode`` (``publish().rc`` and friends) are local library outcomes: always inexact.

The same tables drive :func:`render`, the inverse the emulator uses: a code -> the wire forms that
translate back to it. Nothing here writes a six-digit number; codes are named via ``code_of``.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Mapping
from itertools import islice
from types import MappingProxyType
from typing import Any, Final, NamedTuple

from gateway.codes import CodeInfo, by_name, code_of, family, lookup, parse_code
from gateway.errors import ErrorTemplate, IoTHubError, make_error

__all__ = [
    "IOTHUB_STATUSES",
    "MAX_BODY",
    "PACKETS",
    "WireForm",
    "reason_name",
    "render",
    "translate",
    "translate_topic",
]

PACKETS: Final[tuple[str, ...]] = ("connack", "disconnect", "puback", "suback")
_CONNACK, _DISCONNECT, _PUBACK, _SUBACK = PACKETS

# MQTT control packet type numbers (paho's PacketTypes) -> the packet whose table applies.
_PACKET_TYPES: Final = MappingProxyType(
    {2: _CONNACK, 4: _PUBACK, 5: _PUBACK, 6: _PUBACK, 7: _PUBACK, 9: _SUBACK, 11: _SUBACK, 14: _DISCONNECT}
)

_VERSION_NAMES: Final = MappingProxyType({3: "3.1", 4: "3.1.1", 5: "5"})
_MAX_TEXT = 500  # cap on human text carried into messages
_MAX_ID = 256  # cap on ids (trace-id, $rid) carried into the error
_MAX_PAIRS = 256  # user properties (or property entries) looked at per packet; the rest is ignored
_MAX_KEY = 64  # longer property names are none of IoT Hub's
_MAX_INT_BITS = 64  # ints longer than this are no code, status or id (and str() of a huge int raises)
_MAX_TOPIC = 65535  # MQTT's own limit on a topic name (bytes); longer is refused unread
MAX_BODY: Final = 64 * 1024  # response bodies larger than this are not parsed


class _Rc(NamedTuple):
    """One MQTT 5 reason code >= 0x80: its name, our code, exactness, and where MQTT 5 allows it."""

    name: str
    code: int
    exact: bool
    packets: frozenset[str]
    on_disconnect: int | None = None  # a different code when it arrives on DISCONNECT


_C, _D, _P, _S = (frozenset({p}) for p in PACKETS)
_CD = _C | _D
_ANY = _C | _D | _P | _S

_CLOSED = code_of("DeviceConnectionClosedRemotely")
_PROTOCOL = code_of("ProtocolViolation")
_SERVER = code_of("ServerError")
_UNAUTHORIZED = code_of("IotHubUnauthorized")
_ACCESS = code_of("IotHubUnauthorizedAccess")
_UNAVAILABLE = code_of("ServiceUnavailable")
_THROTTLED = code_of("ThrottlingException")
_ARGUMENT = code_of("ArgumentInvalid")
_INVALID_OP = code_of("InvalidOperation")
_VERSION = code_of("InvalidProtocolVersion")
_REDIRECTED = code_of("Redirected")
_TOO_LARGE = code_of("MessageTooLarge")

# MQTT 5 reason codes >= 0x80 (MQTT 5.0 section 2.4; names as paho spells them). Packets: where the
# standard allows the code among CONNACK, DISCONNECT, PUBACK and SUBACK (0x99 on CONNACK is left out:
# paho 2.2 cannot decode it).
_V5: Final[Mapping[int, _Rc]] = MappingProxyType({
    0x80: _Rc("Unspecified error", _SERVER, False, _ANY, on_disconnect=_CLOSED),
    0x81: _Rc("Malformed packet", _PROTOCOL, False, _CD),
    0x82: _Rc("Protocol error", _PROTOCOL, False, _CD),
    0x83: _Rc("Implementation specific error", _SERVER, False, _ANY),  # IoT Hub: "see the status"
    0x84: _Rc("Unsupported protocol version", _VERSION, False, _C),
    0x85: _Rc("Client identifier not valid", _ACCESS, False, _C),
    0x86: _Rc("Bad user name or password", _UNAUTHORIZED, False, _C),
    0x87: _Rc("Not authorized", _UNAUTHORIZED, False, _ANY),
    0x88: _Rc("Server unavailable", _UNAVAILABLE, False, _C),
    0x89: _Rc("Server busy", code_of("ServerBusy"), False, _CD),
    0x8A: _Rc("Banned", code_of("GenericForbidden"), False, _C),
    0x8B: _Rc("Server shutting down", _UNAVAILABLE, False, _D),
    0x8C: _Rc("Bad authentication method", _ACCESS, False, _CD),
    0x8D: _Rc("Keep alive timeout", _CLOSED, False, _D),
    # IoT Hub documents DISCONNECT 142 as "another connection with the same identity".
    0x8E: _Rc("Session taken over", code_of("ConnectionForcefullyClosedOnNewConnection"), True, _D),
    0x8F: _Rc("Topic filter invalid", _ARGUMENT, False, _S | _D),
    0x90: _Rc("Topic name invalid", _ARGUMENT, False, _C | _P | _D),
    0x91: _Rc("Packet identifier in use", _PROTOCOL, False, _P | _S),
    0x92: _Rc("Packet identifier not found", _PROTOCOL, False, frozenset()),  # PUBREL/PUBCOMP only
    0x93: _Rc("Receive maximum exceeded", _PROTOCOL, False, _D),
    0x94: _Rc("Topic alias invalid", _PROTOCOL, False, _D),
    0x95: _Rc("Packet too large", _TOO_LARGE, True, _CD),
    0x96: _Rc("Message rate too high", _THROTTLED, False, _D),
    # Throttling with status 0501, the daily quota with 0502: without a status, the likelier one.
    0x97: _Rc("Quota exceeded", _THROTTLED, False, _ANY),
    0x98: _Rc("Administrative action", _UNAVAILABLE, False, _D),
    0x99: _Rc("Payload format invalid", code_of("InvalidContentEncodingOrType"), False, _P | _D),
    0x9A: _Rc("Retain not supported", _INVALID_OP, False, _CD),
    0x9B: _Rc("QoS not supported", _INVALID_OP, False, _CD),
    0x9C: _Rc("Use another server", _REDIRECTED, False, _CD),
    0x9D: _Rc("Server moved", _REDIRECTED, False, _CD),
    0x9E: _Rc("Shared subscription not supported", _INVALID_OP, False, _S | _D),
    0x9F: _Rc("Connection rate exceeded", _THROTTLED, False, _CD),
    0xA0: _Rc("Maximum connect time", _CLOSED, False, _D),
    0xA1: _Rc("Subscription identifiers not supported", _INVALID_OP, False, _S | _D),
    0xA2: _Rc("Wildcard subscription not supported", _INVALID_OP, False, _S | _D),
})

# Names of the success-family codes, by packet where they differ.
_V5_SUCCESS_NAMES: Final = MappingProxyType({
    0x00: {_CONNACK: "Success", _PUBACK: "Success", _SUBACK: "Granted QoS 0", _DISCONNECT: "Normal disconnection"},
    0x01: {_SUBACK: "Granted QoS 1"},
    0x02: {_SUBACK: "Granted QoS 2"},
    0x04: {_DISCONNECT: "Disconnect with will message"},
    0x10: {_PUBACK: "No matching subscribers"},
    0x11: {"unsuback": "No subscription found"},
    0x18: {"auth": "Continue authentication"},
    0x19: {"auth": "Re-authenticate"},
})


class _V3(NamedTuple):
    name: str
    code: int | None


# MQTT 3.1.1 CONNACK return codes (section 3.2.2.3). None of them names one IoT Hub code: inexact.
_V3_CONNACK: Final[Mapping[int, _V3]] = MappingProxyType({
    0: _V3("Connection Accepted", None),
    1: _V3("Connection Refused, unacceptable protocol version", _VERSION),
    # IoT Hub: the client id must equal the device id; a permanent refusal.
    2: _V3("Connection Refused, identifier rejected", _ACCESS),
    # IoT Hub also answers 3 for a disabled or unknown device, hence inexact.
    3: _V3("Connection Refused, Server unavailable", _UNAVAILABLE),
    # 401003: renew the token once, then stop (the policy counts the attempts).
    4: _V3("Connection Refused, bad user name or password", _UNAUTHORIZED),
    5: _V3("Connection Refused, not authorized", _UNAUTHORIZED),
})
_V3_SUBACK: Final[Mapping[int, _V3]] = MappingProxyType({
    0: _V3("Success - Maximum QoS 0", None),
    1: _V3("Success - Maximum QoS 1", None),
    2: _V3("Success - Maximum QoS 2", None),
    0x80: _V3("Failure", _ARGUMENT),
})


class _Status(NamedTuple):
    """An IoT Hub MQTT 5 ``status`` value: its name, our code (None: success), the reason code it rides
    on, and whether the hub's own meaning of it is exactly that one code."""

    name: str
    code: int | None
    reason_code: int
    exact: bool = False


def _hex(text: str) -> int:
    return int(text, 16)


# IoT Hub's MQTT 5 ``status`` user property (two bytes: flags, code), from the preview reference.
# ``exact`` only where the hub's description names exactly one catalog code: throttling (0501) and the
# daily quota (0502), which the hub tells apart on reason code 151 for this very reason, a failed
# precondition (412001 is IoT Hub's only one), and a method target that is not online (404103) or did
# not answer in time (504101). The rest are classes ("Bad Request", "Conflict", "Server Busy"): the code
# is our reading of the nearest catalog row, so it is inexact (the MQTT 5 preview API's documented status table).
_STATUSES: Final[Mapping[int, _Status]] = MappingProxyType({
    _hex("0001"): _Status("Not Modified", None, 0x00),
    _hex("0100"): _Status("Bad Request", _ARGUMENT, 0x83),
    _hex("0101"): _Status("Not Authorized", _UNAUTHORIZED, 0x87),  # 401002 or 401003: the hub does not say
    _hex("0102"): _Status("Not Allowed", code_of("OperationNotAvailableInCurrentTier"), 0x83),
    _hex("0103"): _Status("Conflict", code_of("GenericConflict"), 0x83),
    _hex("0104"): _Status("Precondition Failed", code_of("PreconditionFailed"), 0x83, exact=True),
    _hex("0501"): _Status("Throttled", _THROTTLED, 0x97, exact=True),
    _hex("0502"): _Status("Quota Exceeded", code_of("IotHubQuotaExceeded"), 0x97, exact=True),
    _hex("0503"): _Status("Resource Exhausted", _THROTTLED, 0x83),
    _hex("0504"): _Status("Not Found", code_of("GenericNotFound"), 0x83),
    _hex("0601"): _Status("Server Error", _SERVER, 0x83),
    _hex("0602"): _Status("Timeout", code_of("GenericTimeout"), 0x83),
    _hex("0603"): _Status("Server Busy", code_of("ServerBusy"), 0x83),
    _hex("06A0"): _Status("Target Unavailable", code_of("DeviceNotOnline"), 0x83, exact=True),
    _hex("06A1"): _Status("Target Timeout", code_of("GatewayTimeout"), 0x83, exact=True),
    _hex("06A2"): _Status("Target Failed", code_of("GenericBadGateway"), 0x83),
})

#: IoT Hub's ``status`` values as written on the wire ("0501") -> (name, six-digit code or None).
IOTHUB_STATUSES: Final[Mapping[str, tuple[str, int | None]]] = MappingProxyType(
    {f"{value:04X}": (row.name, row.code) for value, row in _STATUSES.items()}
)

# paho MQTTErrorCode member name -> code name (None: not a failure). Local outcomes, all inexact.
_MQTT_ERRORS: Final[Mapping[str, str | None]] = MappingProxyType({
    "MQTT_ERR_AGAIN": None,  # "would block": paho retries it itself
    "MQTT_ERR_SUCCESS": None,
    "MQTT_ERR_NOMEM": "UnclassifiedTransportError",
    "MQTT_ERR_PROTOCOL": "ProtocolViolation",
    "MQTT_ERR_INVAL": "ArgumentInvalid",  # bad topic, QoS or payload type: the call can never succeed
    "MQTT_ERR_NO_CONN": "NotConnected",
    "MQTT_ERR_CONN_REFUSED": "ConnectionRefused",
    "MQTT_ERR_NOT_FOUND": "UnclassifiedTransportError",  # paho: "message not found (internal error)"
    "MQTT_ERR_CONN_LOST": "DeviceConnectionClosedRemotely",
    "MQTT_ERR_TLS": "TlsHandshakeFailed",
    "MQTT_ERR_PAYLOAD_SIZE": "MessageTooLarge",
    "MQTT_ERR_NOT_SUPPORTED": "InvalidOperation",
    "MQTT_ERR_AUTH": "IotHubUnauthorized",
    "MQTT_ERR_ACL_DENIED": "GenericForbidden",
    "MQTT_ERR_UNKNOWN": "UnclassifiedTransportError",
    "MQTT_ERR_ERRNO": "UnclassifiedTransportError",  # some OS error; the errno is not passed on
    "MQTT_ERR_QUEUE_SIZE": "GenericTooManyRequests",  # paho's outgoing queue is full: back off
    "MQTT_ERR_KEEPALIVE": "DeviceConnectionClosedRemotely",
})
_MQTT_ERROR_CODES: Final = MappingProxyType(
    {name: (code_of(code_name) if code_name else None) for name, code_name in _MQTT_ERRORS.items()}
)
_UNCLASSIFIED = code_of("UnclassifiedTransportError")


# --------------------------------------------------------------------------------------------------
# translate


class _Success:
    """The memo entry of a success: stamps out no error."""

    def stamp(self, tracking_id: str | None = None) -> None:
        return None


# The fast path's memo: (int code, int version, packet or None, ``status`` or None) -> what to stamp.
# Filled by the general path only, so it cannot disagree with it.
_Key = tuple[int, int, str | None, str | None]
_SUCCESS: Final = _Success()
_MEMO: dict[_Key, ErrorTemplate | _Success] = {}
_MEMO_MAX: Final = 4096
_MEMO_PACKETS: Final = frozenset({None, *PACKETS})
_MEMO_STATUSES: Final = frozenset({None, *IOTHUB_STATUSES})


def translate(
    reason_code: object,
    *,
    protocol_version: int = 4,
    packet: str | None = None,
    properties: object = None,
) -> IoTHubError | None:
    """The IoT Hub error an MQTT answer stands for, or None when it is a success.

    ``reason_code``: an int 0-255, a paho ``ReasonCode``, ``MQTTErrorCode`` or ``ConnackCode`` (the
    last is always read as a 3.1.1 CONNACK). ``packet`` defaults to the ReasonCode's own packet type,
    else ``"connack"``. ``properties``: paho ``Properties`` or a mapping with ``status``,
    ``trace-id``, ``reason`` (or ``user_properties`` pairs); unreadable properties are ignored, and
    at most 256 entries (valid or not) are looked at, so an endless iterable costs what a short one does.
    Raises ``ValueError`` naming the input for a non-code, an int outside 0-255, an unknown
    ``protocol_version`` (3, 4, 5) or ``packet``.
    """
    # Fast path: a plain int code, version and packet, and no properties or a plain dict holding only
    # IoT Hub's ``status`` and ``trace-id`` as str. Exact types only: 5.0, True or a str subclass would
    # hash like a memo key without meaning the same. A miss, or any other input, takes the general path.
    key: _Key | None = None
    if type(reason_code) is int is type(protocol_version) and (packet is None or type(packet) is str):
        if properties is None:
            key = (reason_code, protocol_version, packet, None)
            entry = _MEMO.get(key)
            if entry is not None:
                return entry.stamp()
        elif type(properties) is dict and len(properties) <= 2:
            for name in properties:  # exact str keys only: no user code on lookups, no key merely equal to ours
                if type(name) is not str:
                    return _translate(reason_code, protocol_version, packet, properties)
            status = properties.get("status")
            trace = properties.get("trace-id")
            if (
                (status is None or type(status) is str)
                and (trace is None or type(trace) is str)
                and len(properties) == (status is not None) + (trace is not None)
            ):
                key = (reason_code, protocol_version, packet, status)
                entry = _MEMO.get(key)
                if entry is not None:
                    return entry.stamp((trace[:_MAX_ID] or None) if trace is not None else None)
    return _translate(reason_code, protocol_version, packet, properties, key)


def _translate(
    reason_code: object, protocol_version: object, packet: object, properties: object, key: _Key | None = None
) -> IoTHubError | None:
    """The general path: every input form, checked and bounded.

    ``key``: the fast path's memo key for these inputs, which it found no entry for. Once the inputs
    are known valid, the decision is stored under it, minus what varies per packet (the trace id).
    """
    version = _check_version(protocol_version)
    chosen = _check_packet(packet)
    kind, value, paho_name, rc_packet = _unwrap(reason_code)
    props = _read_properties(properties)
    if kind == "error":
        return _from_mqtt_error(value, paho_name, version, props)
    if kind == "connack3":
        version, chosen = 4, _CONNACK
    pkt = chosen or rc_packet or _CONNACK
    code, exact, message, native = _decide(value, paho_name, version, pkt, props.status, props.status_text)
    if key is not None and key[2] in _MEMO_PACKETS and key[3] in _MEMO_STATUSES and len(_MEMO) < _MEMO_MAX:
        # A bounded domain: 256 codes x 3 versions x 5 packets x 17 statuses at most, capped lower.
        _MEMO[key] = (
            ErrorTemplate(code, transport="mqtt", message=message, exact=exact, native=native)
            if code is not None
            else _SUCCESS
        )
    if code is None:
        return None
    reason = props.reason or props.reason_string
    if reason:
        message += f": {reason}"
    return make_error(code, transport="mqtt", message=message, exact=exact, tracking_id=props.trace_id, native=native)


def _decide(
    value: int, paho_name: str | None, version: int, pkt: str, status: object, status_text: str | None
) -> tuple[int | None, bool, str, dict[str, Any]]:
    """(code or None for success, exact, message, native facts) of a reason code and ``status``."""
    code, exact, name = _classify(value, version, pkt)
    native: dict[str, Any] = {
        "reason_code": value,
        "reason_name": paho_name or name,
        "packet": pkt,
        "protocol_version": version,
    }
    status_note = ""
    if status is not None:
        native["status"] = status_text
        known, status_code, status_exact, status_name = _read_status(status)
        if known:
            status_note = f", status {status_text} {status_name}"
            if status_code is not None:  # a success status never clears a failure reason code
                code, exact = status_code, status_exact
        else:
            status_note = f", unknown status {status_text}"
    label = "return code" if version < 5 and pkt == _CONNACK and value < 0x80 else "reason code"
    message = f"MQTT {_VERSION_NAMES[version]} {pkt.upper()} {label} {value} ({paho_name or name}){status_note}"
    return code, exact, message, native


def reason_name(value: int, packet: str = "connack", protocol_version: int = 5) -> str:
    """The standard's name of a reason (or 3.1.1 return) code on a packet; ``"undefined"`` if none."""
    version = _check_version(protocol_version)
    pkt = _check_packet(packet) or _CONNACK
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFF:
        raise ValueError(f"not an MQTT reason code (0-255): {value!r}")
    return _classify(value, version, pkt)[2]


def _classify(value: int, version: int, pkt: str) -> tuple[int | None, bool, str]:
    """(code or None for success, exact, name) of a bare reason code: the one place the tables are read."""
    if version < 5:
        if pkt == _CONNACK and value < 0x80:
            row = _V3_CONNACK.get(value)
            if row is None:
                return _PROTOCOL, False, "undefined"
            return row.code, False, row.name
        if pkt == _SUBACK and value <= 0x80:
            row = _V3_SUBACK.get(value)
            if row is None:
                return _PROTOCOL, False, "undefined"
            return row.code, False, row.name
    if value < 0x80:
        names = _V5_SUCCESS_NAMES.get(value, {})
        return None, False, names.get(pkt) or next(iter(names.values()), "undefined")
    rc = _V5.get(value)
    if rc is None:
        return _PROTOCOL, False, "undefined"
    if pkt == _DISCONNECT and rc.on_disconnect is not None:
        return rc.on_disconnect, rc.exact, rc.name
    return rc.code, rc.exact, rc.name


def _from_mqtt_error(value: int, name: str | None, version: int, props: _Props) -> IoTHubError | None:
    fallback = None if value == 0 else _UNCLASSIFIED  # a member newer than this table
    code = _MQTT_ERROR_CODES.get(name, fallback) if name is not None else fallback
    if code is None:
        return None
    native: dict[str, Any] = {"mqtt_error": name, "mqtt_errno": value, "protocol_version": version}
    message = f"paho {name} ({value})"
    if props.reason:
        message += f": {props.reason}"
    return make_error(code, transport="mqtt", message=message, exact=False, tracking_id=props.trace_id, native=native)


def _check_version(protocol_version: object) -> int:
    if _is_int(protocol_version):
        version = _plain_int(protocol_version)  # type: ignore[arg-type]
        if version in (3, 4, 5):
            return version
    raise ValueError(f"unknown MQTT protocol_version {_short(protocol_version)} (3, 4 or 5)")


def _check_packet(packet: object) -> str | None:
    if packet is None:
        return None
    if _is(packet, str):
        text = _plain(packet)  # type: ignore[arg-type]  # a str subclass's own methods are never called
        if len(text) <= 16 and text.lower() in PACKETS:
            return text.lower()
    raise ValueError(f"unknown MQTT packet {_short(packet)} (one of {', '.join(PACKETS)})")


def _plain(text: str) -> str:
    """A plain ``str`` copy of a str or str subclass, made without calling the subclass's methods."""
    return text if type(text) is str else str.__str__(text)


def _plain_int(value: object) -> int:
    """A plain ``int`` copy of an int or int subclass, made without calling the subclass's methods."""
    return value if type(value) is int else int.__int__(value)  # type: ignore[arg-type]


def _unwrap(reason_code: object) -> tuple[str, int, str | None, str | None]:
    """(kind, value, paho's name, packet of a ReasonCode). Kinds: "reason", "error", "connack3"."""
    cls = type(reason_code)
    module = getattr(cls, "__module__", None)
    from_paho = _is(module, str) and str.__str__(module).startswith("paho.")  # type: ignore[arg-type]
    if from_paho and cls.__name__ in ("MQTTErrorCode", "ConnackCode") and _is(reason_code, int):
        name = getattr(reason_code, "name", None)
        kind = "error" if cls.__name__ == "MQTTErrorCode" else "connack3"
        return kind, _byte(_plain_int(reason_code), reason_code, allow_negative=kind == "error"), _text(name), None
    if _is_int(reason_code):
        return "reason", _byte(_plain_int(reason_code), reason_code), None, None  # type: ignore[arg-type]
    # A paho ReasonCode, by shape: .value (int) and .getName().
    try:
        value = getattr(reason_code, "value", None)
        get_name = getattr(reason_code, "getName", None)
        packet_type = getattr(reason_code, "packetType", None)
    except Exception as exc:
        raise ValueError(f"not an MQTT reason code: {_short(reason_code)}") from exc
    if not (_is_int(value) and callable(get_name)):
        raise ValueError(f"not an MQTT reason code: {_short(reason_code)}")
    number = _byte(_plain_int(value), reason_code)
    try:
        name = _text(get_name())
    except Exception:  # paho raises for a value its table does not know on that packet
        name = None
    packet = _PACKET_TYPES.get(_plain_int(packet_type)) if _is_int(packet_type) else None  # type: ignore[arg-type]
    return "reason", number, name, packet


def _byte(value: int, original: object, *, allow_negative: bool = False) -> int:
    if 0 <= value <= 0xFF or (allow_negative and value == -1):
        return value
    raise ValueError(f"MQTT reason code out of range 0-255: {_short(original)}")


def _short(value: object) -> str:
    """A bounded repr that never raises (a hostile ``__repr__``, an int too long to print)."""
    try:
        text = repr(value)
        if type(text) is not str:
            raise TypeError("__repr__ returned a non-str")
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 200 else text[:200] + "..."


# --------------------------------------------------------------------------------------------------
# properties


class _Props(NamedTuple):
    status: object = None
    status_text: str | None = None
    trace_id: str | None = None
    reason: str | None = None
    reason_string: str | None = None


_EMPTY = _Props()


def _read_properties(properties: object) -> _Props:
    """The IoT Hub facts of a packet's properties; anything unreadable is ignored, never raised."""
    if properties is None:
        return _EMPTY
    found: dict[str, object] = {}
    reason_string: object = None
    try:
        if isinstance(properties, Mapping):
            direct: list[tuple[object, object]] = []
            nested: list[tuple[object, object]] = []
            for key, value in islice(properties.items(), _MAX_PAIRS):
                if not _is(key, str) or len(name := _plain(key)) > _MAX_KEY:
                    continue
                low = name.lower()
                if low in ("user_properties", "userproperty", "user_property"):
                    nested.extend(_pairs(value))
                elif low in ("reasonstring", "reason_string"):
                    reason_string = value
                else:
                    direct.append((name, value))
            _collect(found, direct + nested)  # a direct key wins over the same key among the pairs
        else:
            _collect(found, _pairs(getattr(properties, "UserProperty", None)))
            reason_string = getattr(properties, "ReasonString", None)
        status = found.get("status")
        if _is(status, (str, bytes, bytearray)) or _is_int(status):
            status = _copy(status)  # type: ignore[arg-type]
            if type(status) is int and status.bit_length() > _MAX_INT_BITS:
                status = None  # a number no status or code can be: unreadable, so ignored
        else:
            status = None  # no IoT Hub status is anything else; an exotic object is never looked at again
        return _Props(
            status=status,
            status_text=_text(status, _MAX_ID) if status is not None else None,
            trace_id=_text(found.get("trace-id"), _MAX_ID) or None,
            reason=_text(found.get("reason"), _MAX_TEXT) or None,
            reason_string=_text(reason_string, _MAX_TEXT) or None,
        )
    except Exception:  # a hostile mapping, attribute or value: the reason code alone still decides
        return _EMPTY


def _is(value: object, types: type | tuple[type, ...]) -> bool:
    """``isinstance`` by the real type only: never asks a hostile object for its ``__class__``."""
    return issubclass(type(value), types)


def _is_int(value: object) -> bool:
    return issubclass(type(value), int) and not issubclass(type(value), bool)


def _pairs(value: object) -> list[tuple[object, object]]:
    """At most ``_MAX_PAIRS`` items are *looked at*, valid or not: an endless or huge iterable costs
    the same as a short one."""
    if _is(value, (str, bytes, bytearray)) or not _is(value, Iterable):
        return []
    out: list[tuple[object, object]] = []
    for item in islice(value, _MAX_PAIRS):  # type: ignore[call-overload]
        # Read through the base type's own methods: a subclass's __len__ / __getitem__ never run.
        base: Any = tuple if _is(item, tuple) else list if _is(item, list) else None
        if base is not None and base.__len__(item) == 2:
            out.append((base.__getitem__(item, 0), base.__getitem__(item, 1)))
    return out


def _collect(found: dict[str, object], pairs: Iterable[tuple[object, object]]) -> None:
    """First occurrence wins for each of the keys IoT Hub sends."""
    for key, value in pairs:
        if _is(key, str):
            low = _plain(key)[: _MAX_KEY + 1].strip().lower()  # type: ignore[arg-type]
            if low in ("status", "trace-id", "reason") and low not in found:
                found[low] = value


def _copy(value: str | bytes | bytearray | int) -> str | bytes | int:
    """A plain, bounded copy of a property value (str / bytes / int subclasses' methods are never called)."""
    if _is(value, str):
        return str.__str__(value)[:_MAX_TEXT]  # type: ignore[arg-type]
    if _is(value, (bytes, bytearray)):
        return memoryview(value)[:_MAX_TEXT].tobytes()  # type: ignore[arg-type]
    return _plain_int(value)  # type: ignore[arg-type]


def _text(value: object, limit: int = _MAX_TEXT) -> str | None:
    """Bounded text of a property value; None for anything that is not text, bytes or a printable int."""
    if value is None:
        return None
    if _is(value, (bytes, bytearray)):
        return memoryview(value)[: limit * 4].tobytes().decode("utf-8", "replace")[:limit]  # type: ignore[arg-type]
    if _is_int(value):
        number = _plain_int(value)  # type: ignore[arg-type]
        return str(number)[:limit] if number.bit_length() <= _MAX_INT_BITS else None
    if not _is(value, str):
        return None
    return str.__str__(value)[:limit]  # type: ignore[arg-type]


_HEX4 = re.compile(r"(?:0[xX])?([0-9A-Fa-f]{4})")
_DIGITS6 = re.compile(r"[0-9]{6}")


def _read_status(status: object) -> tuple[bool, int | None, bool, str]:
    """(known, code or None for success, exact, name) of a ``status`` property value."""
    if isinstance(status, (bytes, bytearray)):
        status = memoryview(status)[:16].tobytes().decode("ascii", "replace")
    if isinstance(status, int) and not isinstance(status, bool):
        status = _plain_int(status)
        if 0 <= status <= 0xFFFF:
            row = _STATUSES.get(status)
            return (True, row.code, row.exact, row.name) if row else (False, None, False, "")
        return _six_digit(status) if status.bit_length() <= _MAX_INT_BITS else (False, None, False, "")
    if not isinstance(status, str) or len(status) > 64:
        return False, None, False, ""
    text = _plain(status).strip()
    if _DIGITS6.fullmatch(text):
        return _six_digit(text)
    match = _HEX4.fullmatch(text)
    if match:
        row = _STATUSES.get(int(match.group(1), 16))
        if row is not None:
            return True, row.code, row.exact, row.name
    return False, None, False, ""


def _six_digit(value: object) -> tuple[bool, int | None, bool, str]:
    """A six-digit code as ``status`` (our extension): it names the code, so it is exact when listed."""
    try:
        info = lookup(parse_code(value))
    except ValueError:
        return False, None, False, ""
    return True, info.code, info.known, info.name


# --------------------------------------------------------------------------------------------------
# response topics

_RESPONSE_TOPIC = re.compile(r"\$iothub/(twin|methods)/res/([^/?]*)/?(?:\?(.*))?", re.DOTALL)
_STATUS3 = re.compile(r"[0-9]{3}")


def translate_topic(topic: object, payload: object = None) -> IoTHubError | None:
    """The error an IoT Hub MQTT 3.1.1 response topic reports, or None for a 1xx/2xx status.

    ``$iothub/twin/res/{status}/?$rid=..``: the body's six-digit ``errorCode`` when present and valid,
    else the status family (inexact). ``$iothub/methods/res/{status}/?$rid=..`` is a device's own
    answer: its status family, the body (the device's payload) is not read. Raises ``ValueError``
    naming the topic when it is not one of these or its status is not three digits in 100-599, and
    for a topic over MQTT's own limit of 65535 (refused before any scan). A body over :data:`MAX_BODY`
    is not parsed.
    """
    if _is(topic, (bytes, bytearray, memoryview)):
        raw = memoryview(topic)  # type: ignore[arg-type]
        if raw.nbytes > _MAX_TOPIC:
            raise ValueError(f"not an IoT Hub response topic (over {_MAX_TOPIC} bytes)")
        try:
            topic = raw.tobytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"not an IoT Hub response topic (not UTF-8): {_short(topic)}") from exc
    if not _is(topic, str):
        raise ValueError(f"not an IoT Hub response topic: {_short(topic)}")
    topic = _plain(topic)  # type: ignore[arg-type]
    if len(topic) > _MAX_TOPIC:  # MQTT cannot carry it: refused before any scan
        raise ValueError(f"not an IoT Hub response topic (over {_MAX_TOPIC} characters)")
    match = _RESPONSE_TOPIC.fullmatch(topic)
    if match is None:
        raise ValueError(f"not an IoT Hub response topic: {_short(topic)}")
    kind, status_text, query = match.group(1), match.group(2), match.group(3) or ""
    if not _STATUS3.fullmatch(status_text) or not 100 <= int(status_text) <= 599:
        raise ValueError(f"IoT Hub response topic without a status 100-599: {_short(topic)}")
    status = int(status_text)
    if status < 300:
        return None
    native: dict[str, Any] = {"topic": topic[:_MAX_ID], "status": status, "kind": kind}
    native.update(_query(query))
    info: CodeInfo = family(status)
    exact = False
    tracking_id: str | None = None
    message = f"{kind} response status {status}"
    if kind == "twin":
        body = _body(payload)
        if body is not None:
            code_value = _field(body, "errorcode")
            if code_value is not None and not isinstance(code_value, bool) and isinstance(code_value, (int, str)):
                native["error_code"] = _text(code_value, 32)
                with contextlib.suppress(ValueError):  # not a six-digit code: the status decides
                    listed = lookup(parse_code(code_value))
                    if listed.known:  # an unlisted code says no more than the topic's own status
                        info, exact = listed, True
            tracking_id = _text(_field(body, "trackingid"), _MAX_ID) or None
            text = _text(_field(body, "message"), _MAX_TEXT)
            if text:
                message += f": {text}"
    else:
        message = f"device answered the method call with status {status}"
    return make_error(info, transport="mqtt", message=message, exact=exact, tracking_id=tracking_id, native=native)


def _query(query: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in query.split("&", 32)[:32]:
        key, _, value = part.partition("=")
        if key in ("$rid", "$version") and key[1:] not in out:
            out[key[1:]] = value[:_MAX_ID]
    return out


def _body(payload: object) -> Mapping[str, Any] | None:
    if _is(payload, (bytes, bytearray, memoryview)):
        raw = memoryview(payload)  # type: ignore[arg-type]
        if raw.nbytes > MAX_BODY:
            return None
        payload = raw.tobytes()
    elif _is(payload, str):
        payload = _plain(payload)  # type: ignore[arg-type]
        if len(payload) > MAX_BODY:
            return None
    else:
        return None
    if not payload:
        return None
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):  # broken JSON, bad encoding, a 5000-digit number, deep nesting
        return None
    return data if type(data) is dict else None


def _field(body: Mapping[str, Any], low_key: str) -> object:
    for key, value in body.items():
        if isinstance(key, str) and key.lower() == low_key:
            return value
    return None


# --------------------------------------------------------------------------------------------------
# render: the inverse, for the emulator


class WireForm(NamedTuple):
    """One way to put a code on the wire: the packet, its reason code, and the ``status`` property."""

    packet: str
    reason_code: int
    status: str | None  #: IoT Hub's ``status`` user property to send with it, or None
    exact: bool  #: True when :func:`translate` reads it back as exactly this code


def render(code: int | str, protocol_version: int = 5, *, extended: bool = False) -> list[WireForm]:
    """The wire forms that :func:`translate` reads back as ``code`` (a number or a name), best first.

    Derived from the translation tables, so a form listed here round-trips by construction. MQTT 5:
    ``status``-carrying PUBACK / DISCONNECT forms (exact) first, then bare reason codes on each packet
    MQTT 5 allows them on. MQTT 3.1.1: the CONNACK return codes and the SUBACK failure. With
    ``extended``, a code with no exact MQTT 5 form also gets reason code 131 with the six-digit code as
    ``status`` (our extension, not something IoT Hub sends). An empty list: this version cannot say it.
    """
    target = _resolve(code)
    version = _check_version(protocol_version)
    forms: list[WireForm] = []
    if version < 5:
        for value in _V3_CONNACK:
            if _classify(value, version, _CONNACK)[0] == target:
                forms.append(WireForm(_CONNACK, value, None, False))
        for value in _V3_SUBACK:
            if _classify(value, version, _SUBACK)[0] == target:
                forms.append(WireForm(_SUBACK, value, None, False))
        return forms
    for status_value, row in _STATUSES.items():
        if row.code != target:
            continue
        for pkt in (_PUBACK, _DISCONNECT):
            if pkt in _V5[row.reason_code].packets:
                forms.append(WireForm(pkt, row.reason_code, f"{status_value:04X}", row.exact))
    for value, rc in _V5.items():
        for pkt in PACKETS:
            if pkt in rc.packets:
                found, exact, _ = _classify(value, version, pkt)
                if found == target:
                    forms.append(WireForm(pkt, value, None, exact))
    if extended and not any(form.exact for form in forms):
        forms += [WireForm(pkt, 0x83, f"{target:06d}", True) for pkt in (_PUBACK, _DISCONNECT)]
    forms.sort(key=lambda form: not form.exact)  # stable: table order within each group
    return forms


def _resolve(code: int | str) -> int:
    if isinstance(code, str) and not code.strip().isdigit():
        info = by_name(code)
        if info is None:
            raise ValueError(f"no code named {code!r} in the catalog")
        return info.code
    return lookup(code).code
