"""AMQP 1.0 error conditions and CBS put-token answers -> ``IoTHubError``: pure, no proton import.

An AMQP peer says why it closed a connection, session or link, or rejected a delivery, with a
*condition* (a symbol such as ``amqp:link:stolen``), a free-text *description* and an *info* map.
IoT Hub adds ``com.microsoft:*`` conditions and puts its tracking id (and sometimes a status) in the
info map. The condition alone is coarse, so finer facts win, most explicit first:

1. ``error-code`` / ``com.microsoft:error-code`` / ``errorCode`` in info (six digits or a name): exact;
2. a six-digit ``status-code`` in info: exact;
3. ``ErrorCode:<Name or digits>`` (or JSON ``"errorCode":429001``) in the description: exact. This is
   how our emulator puts a code on the wire (see :func:`render`), so every catalog code round-trips;
4. a 3-digit ``status-code`` whose family differs from the condition's code: that status's generic
   family code (``family(status)``), inexact; a status in the same family keeps the condition's code;
5. the condition table below; an unknown condition is ``UnclassifiedTransportError`` (or its
   status's family), inexact. ``exact`` is True only where one condition means one code.

A six-digit code the catalog does not list (``429999``), in info or the description, says no more
than its status family (``codes.lookup``): it refines the condition as a 3-digit ``status-code`` would
(step 4), inexact; the number itself stays in ``native``.

A few conditions are raised by proton itself, not by the peer, and their description tells them
apart: TLS failures arrive as ``amqp:connection:framing-error`` "SSL Failure: ...", and proton's own
keep-alive expiry as ``amqp:resource-limit-exceeded`` "local-idle-timeout expired" (which must not
park the device until the daily quota resets).

Hostile input never crashes these functions. The only errors raised are the documented
``ValueError`` s: a condition that is not a str, bytes, None or Condition-like object, and a CBS status
that is not an integer 100-599.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final, NamedTuple, Protocol

from gateway.codes import CodeInfo, by_name, code_of, family, lookup, parse_code
from gateway.errors import ErrorTemplate, IoTHubError, make_error

__all__ = [
    "CONDITIONS",
    "ConditionLike",
    "RenderedCondition",
    "render",
    "translate",
    "translate_cbs",
]

TRANSPORT: Final = "amqp"


class ConditionLike(Protocol):
    """What :func:`translate` reads from a ``proton.Condition`` (or any object shaped like one)."""

    @property
    def name(self) -> str | None: ...

    @property
    def description(self) -> str | None: ...

    @property
    def info(self) -> Any: ...


# (condition, code name, exact). Table order matters twice: the first row of a code is its preferred
# wire form in render(), and the first IoT Hub row of a status family is that family's generic form.
_ROWS: Final[tuple[tuple[str, str, bool], ...]] = (
    ("amqp:internal-error", "ServerError", False),
    ("amqp:not-found", "DeviceNotFound", False),
    # 401003 (refresh once, then stop): the policy decides when refreshing stops helping.
    ("amqp:unauthorized-access", "IotHubUnauthorized", False),
    ("amqp:decode-error", "IotHubFormatError", False),
    # C#'s own comment: 403002, not the 403004 its code returns. A status-code 429 makes it 429000.
    ("amqp:resource-limit-exceeded", "IotHubQuotaExceeded", False),
    ("amqp:not-allowed", "InvalidOperation", False),
    ("amqp:invalid-field", "ArgumentInvalid", False),
    ("amqp:not-implemented", "InvalidOperation", False),
    # Another link holds the entity for now (often our own stale one, re-attached too soon). Not an
    # identity conflict: C# reads it as a transient resource fault and Java as retryable (C#'s
    # AmqpIotErrorAdapter, Java's AmqpsExceptionTranslator), so it is the AMQP form of HTTP 423 Locked:
    # retry with backoff.
    ("amqp:resource-locked", "GenericLocked", False),
    ("amqp:resource-deleted", "DeviceNotFound", False),
    ("amqp:precondition-failed", "PreconditionFailed", False),
    ("amqp:illegal-state", "InvalidOperation", False),
    ("amqp:frame-size-too-small", "ProtocolViolation", False),
    ("amqp:connection:forced", "DeviceConnectionClosedRemotely", False),
    ("amqp:connection:framing-error", "ProtocolViolation", False),
    ("amqp:connection:redirect", "Redirected", False),
    ("amqp:session:window-violation", "ProtocolViolation", False),
    ("amqp:session:errant-link", "ProtocolViolation", False),
    ("amqp:session:handle-in-use", "ProtocolViolation", False),
    ("amqp:session:unattached-handle", "ProtocolViolation", False),
    ("amqp:link:detach-forced", "DeviceConnectionClosedRemotely", False),
    ("amqp:link:transfer-limit-exceeded", "ProtocolViolation", False),
    ("amqp:link:message-size-exceeded", "MessageTooLarge", True),
    ("amqp:link:redirect", "Redirected", False),
    ("amqp:link:stolen", "LinkCreationConflict", True),
    ("amqp:transaction:unknown-id", "ArgumentInvalid", False),
    ("amqp:transaction:rollback", "ServerError", False),
    ("amqp:transaction:timeout", "GenericTimeout", False),
    ("com.microsoft:device-container-throttled", "ThrottlingException", True),
    ("com.microsoft:message-lock-lost", "DeviceMessageLockLost", True),
    ("com.microsoft:link-creation-conflict", "LinkCreationConflict", True),
    ("com.microsoft:quota-exceeded", "IotHubQuotaExceeded", True),
    ("com.microsoft:timeout", "GenericTimeout", False),
    ("com.microsoft:argument-error", "ArgumentInvalid", True),
    ("com.microsoft:argument-out-of-range", "ArgumentInvalid", False),
    ("com.microsoft:iot-hub-suspended", "IotHubSuspended", True),
    ("com.microsoft:iot-hub-not-found-error", "IotHubNotFound", True),
    ("com.microsoft:device-already-exists", "DeviceAlreadyExists", True),
    ("com.microsoft:precondition-failed", "PreconditionFailed", True),
)

# What a condition means when the peer gave no description and the code's own text would mislead
# (423000's describes an HTTP proxy).
_CONDITION_TEXT: Final[Mapping[str, str]] = MappingProxyType({
    "amqp:resource-locked": "another link holds the entity for now (often our own stale one); retry with backoff",
})

_TABLE: Final[dict[str, tuple[CodeInfo, bool]]] = {
    cond: (lookup(code_of(name)), exact) for cond, name, exact in _ROWS
}
#: condition -> (six-digit code, exact): the table, read-only, for the CLI, docs and the emulator.
CONDITIONS: Final[Mapping[str, tuple[int, bool]]] = MappingProxyType(
    {cond: (row.code, exact) for cond, (row, exact) in _TABLE.items()}
)

# Conditions proton's Python I/O layer sets on the transport when the socket fails (never on the wire).
_PROTON_IO: Final = frozenset({"proton:io", "proton.pythonio"})

_CLOSED: Final = lookup(code_of("DeviceConnectionClosedRemotely"))
_REFUSED: Final = lookup(code_of("ConnectionRefused"))
_UNCLASSIFIED: Final = lookup(code_of("UnclassifiedTransportError"))
_TLS_VERIFY: Final = lookup(code_of("TlsVerificationFailed"))
_TLS: Final = lookup(code_of("TlsHandshakeFailed"))
_CBS_ROWS: Final[dict[int, CodeInfo]] = {
    401: lookup(code_of("IotHubUnauthorized")),
    # 403 on put-token: the token is valid but grants no right to this audience; refreshing won't help.
    403: lookup(code_of("IotHubUnauthorizedAccess")),
    404: lookup(code_of("DeviceNotFound")),
}

_FRAMING: Final = "amqp:connection:framing-error"
_RESOURCE_LIMIT: Final = "amqp:resource-limit-exceeded"
_LOCAL_FAULT_CONDITIONS: Final = frozenset({_FRAMING, _RESOURCE_LIMIT})

# info keys (lower-cased, stripped) -> the fact they carry.
_INFO_KEYS: Final[dict[str, str]] = {
    "com.microsoft:tracking-id": "tracking",
    "tracking-id": "tracking",
    "status-code": "status",
    "com.microsoft:status-code": "status",
    "error-code": "error",
    "com.microsoft:error-code": "error",
    "errorcode": "error",
    "retry-after": "retry_s",
    "com.microsoft:retry-after": "retry_s",
    "retry-after-ms": "retry_ms",
    "com.microsoft:retry-after-ms": "retry_ms",
}

_MAX_CONDITION = 256  # longer is not a condition anyone defines: unknown, and trimmed in native
_MAX_DESCRIPTION = 500  # kept in native and the message
_SCAN_DESCRIPTION = 2048  # the part of a description searched for an error code
_MAX_INFO_ITEMS = 64  # info entries looked at (a real peer sends a handful)
_MAX_NATIVE_ITEMS = 32
_MAX_TEXT_VALUE = 200
_MAX_TRACKING_ID = 256
_MAX_SCALAR = 1024  # characters (bytes) of an info value kept for reading its facts

# "ErrorCode:ThrottlingException;...", "ErrorCode:429001", '"errorCode":429001', 'errorCode\":"429001"'.
_ERROR_CODE_RE: Final = re.compile(
    r"""error[ _-]?code["'\\]{0,3}\s{0,3}[:=]\s{0,3}["'\\]{0,3}\s{0,3}"""
    r"""(?:(\d{6})(?!\d)|([A-Za-z][A-Za-z0-9]{0,80})(?![A-Za-z0-9]))""",
    re.IGNORECASE,
)

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _MAX_TEXT_VALUE
_REPR.maxother = _MAX_TEXT_VALUE
_REPR.maxlong = 40
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = 16


class _InfoEntry(NamedTuple):
    """A memoized decision for a condition with an info map: the error, and the constant native parts."""

    template: ErrorTemplate
    condition: str | None  # as kept in native
    description: str | None  # as kept in native
    status_text: str | None  # the status-code as the native info view shows it


# The fast path's memos, filled by the general path only, so they cannot disagree with it:
# (condition, description) -> template, for no info; (condition, description, status-code or None)
# -> _InfoEntry, for an info map of IoT Hub's usual two keys. Emptied when full (descriptions are free
# text, so the key space is open), which bounds them.
_BARE: dict[tuple[str, str | None], ErrorTemplate] = {}
_WITH_INFO: dict[tuple[str, str | None, int | None], _InfoEntry] = {}
_MEMO_MAX: Final = 1024
_MEMO_TEXT: Final = 500  # longer conditions or descriptions are not memoized
_STATUS_KEY: Final = "status-code"
_TRACKING_KEY: Final = "com.microsoft:tracking-id"


def translate(
    condition: str | bytes | ConditionLike | None,
    description: str | bytes | None = None,
    info: Mapping[Any, Any] | None = None,
) -> IoTHubError:
    """Classify an AMQP error condition (a close, detach or rejected delivery) as a six-digit code.

    ``condition`` is the symbol (a str, ``proton.symbol`` or bytes) or a Condition-like object whose
    ``description`` and ``info`` are used unless given here. ``None`` (or an empty symbol) means the
    peer closed with no condition: ``DeviceConnectionClosedRemotely``, inexact. Anything else raises
    ``ValueError``. Never returns None (the contract allows it): unlike a status, every AMQP condition
    reports a failure.
    """
    # Fast path: a plain str condition and description, and no info or a plain dict holding only
    # IoT Hub's usual ``status-code`` (an int) and ``com.microsoft:tracking-id`` (a trimmed str that
    # native keeps whole). Exact types only: a subclass could hash like a key without meaning the same.
    if type(condition) is str and (description is None or type(description) is str):
        if info is None:
            bare_key = (condition, description)
            template = _BARE.get(bare_key)
            if template is not None:
                return template.stamp()
            return _translate(condition, description, info, bare_key=bare_key)
        if type(info) is dict and len(info) <= 2:
            for name in info:  # exact str keys only: no user code on lookups, no key merely equal to ours
                if type(name) is not str:
                    return _translate(condition, description, info)
            status = info.get(_STATUS_KEY)
            tracking = info.get(_TRACKING_KEY)
            if (
                (status is None or (type(status) is int and 0 <= status <= 999_999))
                and (tracking is None or (type(tracking) is str and len(tracking) <= _MAX_TEXT_VALUE))
                and len(info) == (status is not None) + (tracking is not None)
                and (tracking is None or tracking.strip() == tracking)
            ):
                info_key = (condition, description, status)
                entry = _WITH_INFO.get(info_key)
                if entry is None:
                    return _translate(condition, description, info, info_key=info_key)
                view = dict(info)  # the native view: the same keys in the same order, values as text
                if status is not None:
                    view[_STATUS_KEY] = entry.status_text
                native = {"condition": entry.condition, "description": entry.description, "info": view}
                return entry.template.stamp(tracking or None, native)
    return _translate(condition, description, info)


def _translate(
    condition: object,
    description: object,
    info: object,
    *,
    bare_key: tuple[str, str | None] | None = None,
    info_key: tuple[str, str | None, int | None] | None = None,
) -> IoTHubError:
    """The general path: every input form, checked and bounded.

    ``bare_key`` / ``info_key``: the fast path vouches for the shape of these inputs and found no entry
    under that key; the decision is stored there, minus what varies per call (the tracking id).
    """
    raw_name, raw_description, raw_info = _unpack(condition, description, info)
    # An over-long name is no condition anyone defines: it goes the unknown way, never the empty one.
    key = raw_name.strip().lower() if len(raw_name) <= _MAX_CONDITION else "\x00too-long"
    desc = _text(raw_description)

    unknown = False
    if not key:
        row, exact = _CLOSED, False
    else:
        found = _TABLE.get(key)
        if found is not None:
            row, exact = found
            if key in _LOCAL_FAULT_CONDITIONS:
                row, exact = _local_fault(key, desc, row, exact)
        elif key in _PROTON_IO:
            row = _REFUSED if desc is not None and "refused" in desc[:_MAX_DESCRIPTION].lower() else _CLOSED
            exact = False
        else:
            row, exact, unknown = _UNCLASSIFIED, False, True

    tracking_id, retry_after, explicit, status_code, native_info = _read_info(raw_info)
    if explicit is None and status_code is not None and status_code >= 100_000:
        explicit = _as_code(status_code)
    if explicit is None and desc is not None:
        explicit = _scan_description(desc)
    if explicit is not None and not explicit.known:
        # An unlisted code says no more than its status family would: it refines like a status-code.
        status_code, explicit = explicit.code // 1000, None
    if explicit is not None:
        row, exact = explicit, True
    elif status_code is not None and 300 <= status_code <= 599 and (unknown or row.code // 1000 != status_code):
        row, exact = family(status_code), False

    shown = raw_name[:_MAX_CONDITION] if key else "closed with no condition"
    short = desc[:_MAX_DESCRIPTION] if desc is not None else None
    message = f"{shown}: {short or _CONDITION_TEXT.get(key) or row.description}"
    native_condition = raw_name[:_MAX_CONDITION] if key else None
    native = {"condition": native_condition, "description": short, "info": native_info}
    if (bare_key or info_key) and len(raw_name) <= _MEMO_TEXT and (desc is None or len(desc) <= _MEMO_TEXT):
        if bare_key is not None:
            if len(_BARE) >= _MEMO_MAX:
                _BARE.clear()
            _BARE[bare_key] = ErrorTemplate(row, transport=TRANSPORT, message=message, exact=exact, native=native)
        elif info_key is not None and isinstance(native_info, dict):
            if len(_WITH_INFO) >= _MEMO_MAX:
                _WITH_INFO.clear()
            template = ErrorTemplate(row, transport=TRANSPORT, message=message, exact=exact)
            status_text = native_info.get(_STATUS_KEY) if info_key[2] is not None else None
            _WITH_INFO[info_key] = _InfoEntry(template, native_condition, short, status_text)
    return make_error(
        row,
        transport=TRANSPORT,
        message=message,
        exact=exact,
        retry_after=retry_after,
        tracking_id=tracking_id,
        native=native,
    )


def translate_cbs(
    status_code: int | str,
    description: str | bytes | None = None,
    info: Mapping[Any, Any] | None = None,
) -> IoTHubError | None:
    """Classify a CBS put-token answer: its ``status-code`` (and ``status-description``, properties).

    1xx/2xx mean the token was accepted: None. 401 -> ``IotHubUnauthorized`` (refresh), 403 ->
    ``IotHubUnauthorizedAccess`` (the token grants no right: stop), 404 -> ``DeviceNotFound``, any
    other 3xx-5xx -> ``family(status)``; all inexact unless an error code in ``info`` or the
    description names the exact one. A status that is not an integer 100-599 raises ``ValueError``.
    """
    status = _cbs_status(status_code)
    if status < 300:
        return None
    row = _CBS_ROWS.get(status) or family(status)
    exact = False
    desc = _text(description)
    tracking_id, retry_after, explicit, _, native_info = _read_info(info)
    if explicit is None and desc is not None:
        explicit = _scan_description(desc)
    if explicit is not None and not explicit.known:  # unlisted: no more than its family says
        if explicit.code // 1000 != row.code // 1000:
            row = explicit
        explicit = None
    if explicit is not None:
        row, exact = explicit, True
    short = desc[:_MAX_DESCRIPTION] if desc is not None else None
    return make_error(
        row,
        transport=TRANSPORT,
        message=f"CBS put-token answered {status}: {short or row.description}",
        exact=exact,
        retry_after=retry_after,
        tracking_id=tracking_id,
        native={"cbs_status": status, "description": short, "info": native_info},
    )


class RenderedCondition(NamedTuple):
    """One wire form of a code: ``translate(*form)`` reads the same code back, exactly.

    ``info`` keys are plain str; an emulator sending them through proton should wrap each key in
    ``proton.symbol``, as IoT Hub sends symbols.
    """

    condition: str
    description: str
    info: dict[str, object]


def render(
    code: int | CodeInfo, *, tracking_id: str | None = None, retry_after: float | None = None
) -> list[RenderedCondition]:
    """How an emulator puts ``code`` on the wire, preferred form first.

    First every condition that means exactly this code (from the table), then the generic form: a
    condition of the code's status family with ``status-code`` = that status and the code in the
    description as ``ErrorCode:<Name>;<text>`` (IoT Hub has no standard place for the six-digit code).
    Raises ``ValueError`` for a value that is not a six-digit code.
    """
    row = code if isinstance(code, CodeInfo) else lookup(code)
    status = row.code // 1000
    info: dict[str, object] = {"status-code": status}
    if tracking_id is not None:
        info["com.microsoft:tracking-id"] = tracking_id
    if retry_after is not None:
        info["retry-after"] = retry_after
    forms = [RenderedCondition(cond, row.description, dict(info)) for cond in _EXACT_FORMS.get(row.code, ())]
    # An unlisted code (a family member) has no name the reader could look up: send its digits.
    named = row.name if row.known else str(row.code)
    generic = _GENERIC_BY_STATUS.get(status) or ("amqp:internal-error" if status >= 500 else "amqp:not-allowed")
    forms.append(RenderedCondition(generic, f"ErrorCode:{named};{row.description}", info))
    return forms


def _build_render_tables() -> tuple[dict[int, tuple[str, ...]], dict[int, str]]:
    exact_forms: dict[int, tuple[str, ...]] = {}
    generic: dict[int, str] = {}
    for cond, (row, exact) in _TABLE.items():
        if exact:
            exact_forms[row.code] = (*exact_forms.get(row.code, ()), cond)
        if row.origin == "iothub":  # never a gateway row: a redirect or refusal must not stand for a status
            generic.setdefault(row.code // 1000, cond)
    return exact_forms, generic


_EXACT_FORMS, _GENERIC_BY_STATUS = _build_render_tables()


def _unpack(condition: object, description: object, info: object) -> tuple[str, object, object]:
    """(condition text, description, info) from whatever form the condition came in.

    str and bytes subclasses (``proton.symbol`` is one) are copied out as plain values by their real
    type, so a subclass's own methods (which may raise) are never called.
    """
    if _is(condition, str):
        return _plain(condition)[: _MAX_CONDITION + 1], description, info  # type: ignore[arg-type]
    if condition is None:
        return "", description, info
    if _is(condition, (bytes, bytearray)):  # uamqp / pyamqp spell symbols as bytes
        return _decoded(condition, _MAX_CONDITION + 1), description, info
    try:
        name = condition.name  # type: ignore[attr-defined]
    except Exception as exc:  # AttributeError, or a hostile property
        raise ValueError(f"not an AMQP condition (str, symbol or Condition): {_show(condition)}") from exc
    if _is(name, (bytes, bytearray)):
        name = _decoded(name, _MAX_CONDITION + 1)
    elif name is None:
        name = ""
    elif _is(name, str):
        name = _plain(name)[: _MAX_CONDITION + 1]
    else:
        raise ValueError(f"AMQP condition name is not a str: {_show(name)} in {_show(condition)}")
    if description is None:
        description = _attribute(condition, "description")
    if info is None:
        info = _attribute(condition, "info")
    return name, description, info


def _attribute(obj: object, name: str) -> object:
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


def _local_fault(key: str, desc: str | None, row: CodeInfo, exact: bool) -> tuple[CodeInfo, bool]:
    """Conditions proton raises itself for local faults, told apart by their description."""
    if desc is None:
        return row, exact
    lowered = desc[:_MAX_DESCRIPTION].lower()
    if key == _FRAMING and "ssl failure" in lowered:
        return (_TLS_VERIFY if "verify failed" in lowered else _TLS), False
    if key == _FRAMING and "connection aborted" in lowered:
        return _CLOSED, False  # proton's word for a peer that vanished without an AMQP close
    if key == _RESOURCE_LIMIT and "idle-timeout" in lowered:
        return _CLOSED, False  # the peer went silent past the keep-alive: a dead connection, not quota
    return row, exact


def _read_info(
    info: object,
) -> tuple[str | None, float | None, CodeInfo | None, int | None, dict[str, str] | str | None]:
    """(tracking id, retry-after seconds, explicit code, status-code, native view) of an info map.

    One pass over at most ``_MAX_INFO_ITEMS`` entries; the native view keeps keys and values as
    bounded text, so ``to_dict()`` stays JSON-safe whatever the peer sent.
    """
    if info is None:
        return None, None, None, None, None
    if not _is(info, (dict, Mapping)):
        return None, None, None, None, _show(info)
    facts: dict[str, object] = {}
    native: dict[str, str] = {}
    try:
        for count, (k, v) in enumerate(info.items()):  # type: ignore[attr-defined]
            if count >= _MAX_INFO_ITEMS:
                break
            if _is(k, str):
                key = _plain(k)[:_MAX_TEXT_VALUE]
            elif _is(k, (bytes, bytearray)):
                key = _decoded(k, _MAX_TEXT_VALUE)
            else:
                key = _show(k)
            if count < _MAX_NATIVE_ITEMS:
                native[key[:100]] = _value_text(v)
            if len(key) <= 64:
                fact = _INFO_KEYS.get(key.strip().lower())
                if fact is not None and fact not in facts:
                    facts[fact] = _scalar(v)
    except Exception:  # a hostile mapping: keep what was read
        pass
    if not facts:
        return None, None, None, None, native

    tracking_id = None
    tracking = facts.get("tracking")
    if isinstance(tracking, bytes):
        tracking = tracking.decode("utf-8", "replace")
    if isinstance(tracking, str) and tracking.strip():
        tracking_id = tracking.strip()[:_MAX_TRACKING_ID]

    millis = _number(facts.get("retry_ms"))
    retry_after = millis / 1000.0 if millis is not None else _number(facts.get("retry_s"))

    error = facts.get("error")
    explicit = _as_code(error) if error is not None else None

    status = None
    value = _integer(facts.get("status"))
    if value is not None and (100 <= value <= 599 or 100_000 <= value <= 999_999):
        status = value
    return tracking_id, retry_after, explicit, status, native


def _value_text(value: object) -> str:
    if _is(value, str):
        return _plain(value)[:_MAX_TEXT_VALUE]  # type: ignore[arg-type]
    if type(value) is int and value.bit_length() <= 128:  # longer ints may be too long to print
        return str(value)
    return _show(value)


def _scalar(value: object) -> object:
    """An info value as a plain, bounded str / bytes / int / float / bool, or None for anything else.

    Done once where the value is read, so no later step calls a hostile subclass's methods.
    """
    kind = type(value)
    if kind in (str, bytes, int, float, bool):
        return value[:_MAX_SCALAR] if kind in (str, bytes) else value  # type: ignore[index]
    if issubclass(kind, str):
        return _plain(value)[:_MAX_SCALAR]  # type: ignore[arg-type]
    if issubclass(kind, (bytes, bytearray)):
        return memoryview(value)[:_MAX_SCALAR].tobytes()  # type: ignore[arg-type]
    if issubclass(kind, bool):
        return bool.__bool__(value)  # type: ignore[arg-type]
    if issubclass(kind, int):
        return int.__int__(value)  # type: ignore[arg-type]
    if issubclass(kind, float):
        return float.__float__(value)  # type: ignore[arg-type]
    return None


def _as_code(value: object) -> CodeInfo | None:
    """A catalog row for a six-digit code (int or digit string) or a code name; None if it is neither."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit():
            return by_name(text) if 0 < len(text) <= 100 else None
        value = text
    elif not isinstance(value, int) or isinstance(value, bool):
        return None
    try:
        return lookup(parse_code(value))
    except ValueError:
        return None


def _scan_description(desc: str) -> CodeInfo | None:
    """The first ``ErrorCode:<Name|digits>`` in the description that names a code."""
    for count, match in enumerate(_ERROR_CODE_RE.finditer(desc, 0, _SCAN_DESCRIPTION)):
        if count >= 4:
            break
        digits, name = match.groups()
        row = _as_code(digits) if digits is not None else by_name(name)
        if row is not None:
            return row
    return None


def _integer(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        text = value.strip()
        if 0 < len(text) <= 6 and text.isascii() and text.isdigit():
            return int(text)
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _number(value: object) -> float | None:
    """A non-negative, finite-or-capped number from an int, float or numeric string; else None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        if len(value) > 32:
            return None
        try:
            return float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def _cbs_status(value: object) -> int:
    status = _integer(_scalar(value)) if not _is(value, float) else None
    if status is None or not 100 <= status <= 599:
        raise ValueError(f"not a CBS status code (an integer 100-599): {_show(value)}")
    return status


def _text(value: object) -> str | None:
    """A description as text: str as is (a subclass copied out), bytes decoded, else a bounded repr."""
    if value is None:
        return None
    if _is(value, str):
        return _plain(value)  # type: ignore[arg-type]
    if _is(value, (bytes, bytearray)):
        return _decoded(value, _SCAN_DESCRIPTION)
    return _show(value)


def _is(value: object, types: type | tuple[type, ...]) -> bool:
    """``isinstance`` by the real type only: never asks a hostile object for its ``__class__``."""
    return issubclass(type(value), types)


def _plain(text: str) -> str:
    """A plain ``str`` copy of a str or str subclass, made without calling the subclass's methods."""
    return text if type(text) is str else str.__str__(text)


def _decoded(data: object, limit: int) -> str:
    """The first ``limit`` bytes of a bytes-like value as text (read through the buffer, no methods)."""
    return memoryview(data)[:limit].tobytes().decode("utf-8", "replace")  # type: ignore[arg-type]


def _show(value: object) -> str:
    """A bounded repr that never raises (hostile __repr__, ints too long to print)."""
    try:
        return _REPR.repr(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"
