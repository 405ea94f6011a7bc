"""HTTP response (status, headers, body) -> ``IoTHubError``: pure, bounded, and never raises on bad input.

IoT Hub says which error it means in several places, and the SDKs each read only some of them
(the C# SDK's HTTP error parsers, Microsoft's error-code pages). This reads all of them, most specific first:

1. the body's code, in any of the forms IoT Hub sends::

       {"Message":"ErrorCode:DeviceNotFound;text","ExceptionMessage":"Tracking ID:<id>-G:<n>-TimeStamp:<date>"}
       {"Message":"{\\"errorCode\\":404103,\\"trackingId\\":\\"...\\",\\"message\\":\\"...\\"}"}   (double-escaped)
       {"Message":{"errorCode":"404103","trackingId":"...","message":"..."}}                  (nested)
       {"errorCode":404103,"trackingId":"...","message":"..."}                                (top level)

   with key casing tolerated (``ErrorCode``/``errorCode``, ``Message``/``message``). A body that is not
   JSON (truncated, an HTML page from a proxy, plain ``ErrorCode:<Name>;...`` text) gets one bounded
   regex scan instead;
2. the ``iothub-errorcode`` header (a name such as ``DeviceNotFound``, or digits);
3. ``x-ms-substatus`` when ``status * 1000 + substatus`` is a code in the catalog;
4. the bare status, as its generic ``status * 1000`` family (``exact=False``).

A code the body or header gives that is not a six-digit error code is ignored, never raised: the next
source decides. So does a six-digit code the catalog does not list (``429999``): it says no more than
its family (``codes.lookup``), and the status the response carries says at least as much, so a later
source decides, the status last (inexact); the number itself stays in ``native``. Only the status
itself is validated (``ValueError`` outside 100-599).

Work is capped so a hostile response costs little: only the first :data:`BODY_LIMIT` bytes of a body are
read, at most :data:`HEADER_LIMIT` header fields are examined, and every scan is linear in what it reads
(bounded quantifiers after a literal, a capped number of matches).
"""

from __future__ import annotations

import json
import json.scanner
import math
import re
import reprlib
from collections.abc import Iterable, Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from itertools import islice
from typing import Any, Final, Protocol, TypeAlias

from gateway.codes import CATALOG, CodeInfo, by_name, family, lookup
from gateway.errors import IoTHubError, build_error

__all__ = ["BODY_LIMIT", "HEADER_LIMIT", "Body", "Headers", "SupportsItems", "translate"]


class SupportsItems(Protocol):
    """Anything with ``items()``: a dict, aiohttp's ``CIMultiDictProxy``, ``http.client.HTTPMessage``."""

    def items(self) -> Iterable[tuple[Any, Any]]: ...


Headers: TypeAlias = SupportsItems | Iterable[tuple[Any, Any]] | None
"""Response headers: a mapping (any casing) or ``(name, value)`` pairs; values ``str`` or ``bytes``."""
Body: TypeAlias = str | bytes | bytearray | memoryview | Mapping[Any, Any] | None
"""Response body: raw text or bytes, or the object a caller already parsed from JSON."""

BODY_LIMIT: Final = 64 * 1024  #: bytes (or characters, for a str body) of the body that are looked at
HEADER_LIMIT: Final = 1024  #: header fields examined; a real response has a few dozen at most

_EXCERPT: Final = 200  # characters of body kept in ``native``
_MESSAGE_LIMIT: Final = 500  # characters of the body's human text kept as the message
_ID_LIMIT: Final = 256  # characters of a tracking id
_VALUE_LIMIT: Final = 256  # characters of a header value read (and kept in ``native``)
_MAX_DEPTH: Final = 4  # ``Message`` nesting followed (JSON in a string in an object ...)
_MAX_KEYS: Final = 64  # keys of one body object examined when its casing is unusual
_MAX_SCAN_MATCHES: Final = 32  # candidate codes the fallback scan tries
_BIG: Final = 10**18  # ints beyond this are not ids or codes (and str() of a huge int can raise)

# Header names (lower case) whose values matter; everything else is skipped unread.
_ERRORCODE = "iothub-errorcode"
_RETRY_AFTER = "retry-after"
_RETRY_AFTER_MS = "x-ms-retry-after-ms"
_RETRY_AFTER_MS_PLAIN = "retry-after-ms"  # the Azure SDKs honour both spellings
_SUBSTATUS = "x-ms-substatus"
_TRACKING = "iothub-trackingid"
_REQUEST_ID = "x-ms-request-id"
_DATE = "date"
_WANTED: Final = frozenset(
    {_ERRORCODE, _RETRY_AFTER, _RETRY_AFTER_MS, _RETRY_AFTER_MS_PLAIN, _SUBSTATUS, _TRACKING, _REQUEST_ID, _DATE}
)

# Catalog rows by number, alias numbers included, so the hot path is one dict lookup.
_ROWS: Final[dict[int, CodeInfo]] = {info.code: info for info in CATALOG.values()}
for _info in CATALOG.values():
    for _alias in _info.alias_codes:
        _ROWS.setdefault(_alias, _info)
_BY_NAME: Final[dict[str, CodeInfo]] = {name: info for info in CATALOG.values() for name in (info.name, *info.aliases)}
del _info, _alias
_FAMILIES: Final = {status: family(status) for status in range(300, 600)}
_NO_HEADERS: Final[dict[str, str]] = {}  # shared and never written to

_Facts: TypeAlias = tuple[CodeInfo | None, str | None, str | None]  # (code, message, tracking id)
_NOTHING: Final[_Facts] = (None, None, None)

# Body keys by case-folded name -> slot in the facts tuple.
_K_CODE, _K_MESSAGE, _K_TRACKING, _K_EXCEPTION = 0, 1, 2, 3
_KEY_SLOTS: Final = {
    "errorcode": _K_CODE,
    "error_code": _K_CODE,
    "message": _K_MESSAGE,
    "trackingid": _K_TRACKING,
    "tracking_id": _K_TRACKING,
    "exceptionmessage": _K_EXCEPTION,
}

_JSON_OPENERS: Final = frozenset('{["')
_NESTED_OPENERS: Final = frozenset('{"')
_LEGACY_MARK = "ErrorCode:"
_TRACKING_MARK = "Tracking ID:"

# Fallback only (the body did not parse as JSON): ``errorCode": 404103``, ``errorCode\":\"404103``,
# ``ErrorCode:DeviceNotFound``. Bounded quantifiers anchored on a literal keep it linear.
_SCAN: Final = re.compile(
    r'error_?code\\?"?\s{0,16}[:=]\s{0,16}\\?"?(?:(\d{6})(?!\d)|([A-Za-z]\w{0,63}))',
    re.IGNORECASE | re.ASCII,
)
_LEGACY_LOOSE: Final = re.compile(r"error_?code\s{0,4}:\s{0,4}", re.IGNORECASE | re.ASCII)
_NUMBER: Final = re.compile(r"\d{1,12}(?:\.\d{1,9})?", re.ASCII)
_TOKEN: Final = re.compile(r"\w{1,64}", re.ASCII)  # used with .match at a known offset, never to scan
_TRACKING_VALUE: Final = re.compile(r'[^\r\n;,"]{0,256}')  # likewise

# What json.loads runs underneath (the C scanner when available), minus its Python wrappers.
_SCAN_ONCE: Final = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]

class _Shown:
    """Wraps a value for a bounded repr that never raises (a hostile ``__repr__``, a huge int)."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __repr__(self) -> str:
        try:
            text = _REPR.repr(self.value)
        except Exception:
            return f"<unprintable {type(self.value).__name__[:40]}>"
        return text if type(text) is str else "<unprintable>"


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 3, 8, 8, 80, 40


def translate(
    status: int,
    headers: Headers = None,
    body: Body = None,
    *,
    now: float | None = None,
) -> IoTHubError | None:
    """The error an HTTP response stands for, or None for 1xx/2xx.

    ``headers`` is a mapping (any casing, str or bytes values; aiohttp's ``CIMultiDictProxy`` and
    ``http.client.HTTPMessage`` work) or an iterable of ``(name, value)`` pairs; the first value of a
    repeated header wins. ``body`` is None, ``str``, ``bytes`` (UTF-8, undecodable bytes replaced) or an
    already-parsed mapping. ``now`` (epoch seconds) turns an HTTP-date ``Retry-After`` into a delay;
    without it the response's ``Date`` header is the reference (NaN or infinite ``now`` counts as absent).
    Only ``status`` and the type of ``now`` are validated: anything wrong with the headers or body
    degrades to what the status alone says.
    """
    if type(status) is not int:
        kind = type(status)  # the real type: a hostile object is never asked for its __class__
        if issubclass(kind, bool) or not issubclass(kind, int):
            raise ValueError(f"not an HTTP status (an int 100-599): {_Shown(status)!r}")
        status = int.__int__(status)  # a subclass's own __int__ is never called
    if status < 300 or status > 599:
        if 100 <= status < 300:
            return None
        raise ValueError(f"not an HTTP status (100-599): {_Shown(status)!r}")
    if now is not None:
        now_type: type = type(now)
        if issubclass(now_type, bool) or not issubclass(now_type, (int, float)):
            raise TypeError(f"now must be epoch seconds (int or float), not {_Shown(now)!r}")
        now = _finite(int.__int__(now) if issubclass(now_type, int) else float.__float__(now))  # type: ignore[arg-type]

    native: dict[str, Any] = {"status": status}
    found = _headers(headers) if headers is not None else _NO_HEADERS
    if found:
        native["headers"] = found
    info: CodeInfo | None = None
    message: str | None = None
    tracking: str | None = None
    if body is not None:
        info, message, tracking = _body(body, native)
    if info is not None and not info.known:
        # An unlisted code says no more than its family, and the status, which the hub did state, says
        # at least as much: the next source decides (the number stays in native's body_error_code).
        info = None
    if info is None and found:
        if _ERRORCODE in found:
            info = _resolve(found[_ERRORCODE])
        if info is None and _SUBSTATUS in found:
            sub = found[_SUBSTATUS].strip()
            if sub.isascii() and sub.isdigit() and len(sub) <= 3 and 1 <= int(sub) <= 999:
                info = _ROWS.get(status * 1000 + int(sub))
    if info is None:
        info = _FAMILIES[status]
        exact = False
    else:
        exact = info.known

    retry_after: float | None = None
    retry_at: float | None = None
    if found:
        if tracking is None:
            tracking = (found.get(_TRACKING) or found.get(_REQUEST_ID) or "").strip()[:_ID_LIMIT] or None
        plain = found.get(_RETRY_AFTER)
        if _RETRY_AFTER_MS in found or _RETRY_AFTER_MS_PLAIN in found:
            retry_after, retry_at = _retry(found, now)
        elif plain is not None:
            if len(plain) <= 12 and plain.isdigit() and plain.isascii():  # the usual ``Retry-After: 7``
                retry_after = float(plain)
                retry_at = None if now is None else now + retry_after
            else:
                retry_after, retry_at = _retry(found, now)

    return build_error(info, "http", message or "", exact, native, retry_after, retry_at, tracking)


# --- headers -------------------------------------------------------------------------------------------


def _headers(headers: object) -> dict[str, str]:
    """The wanted headers, names lower-cased, values as text; garbage entries are skipped."""
    found: dict[str, str] = {}
    try:
        if type(headers) is dict and len(headers) <= HEADER_LIMIT:
            # The common case: which positions hold wanted names depends only on the names, and a
            # client sees the same few name lists over and over, so that plan is memoized.
            names = tuple(headers)
            plan = _PLANS.get(names)
            if plan is None:
                plan = _plan(names)
            if plan is not None:
                if plan:
                    values = tuple(headers.values())
                    for index, key in plan:
                        if type(names[index]) is not str:  # equal to a plan's name, but not a str
                            return _headers(list(headers.items()))
                        value = values[index]
                        text = value if type(value) is str and len(value) <= _VALUE_LIMIT else _header_text(value)
                        if text is not None:
                            found[key] = text
                return found
        items_of = getattr(headers, "items", None)
        pairs: Any = items_of() if callable(items_of) else headers
        if isinstance(pairs, (str, bytes, bytearray)):
            return found
        for pair in islice(pairs, HEADER_LIMIT):
            try:
                name, value = pair
            except (TypeError, ValueError):
                continue
            if isinstance(name, str):
                key = str(name).lower()
            elif isinstance(name, (bytes, bytearray)):
                key = bytes(name).decode("latin-1").lower()
            else:
                continue
            if key in _WANTED and key not in found:
                text = _header_text(value)
                if text is not None:
                    found[key] = text
    except Exception:  # a hostile headers object keeps what was read before it failed
        pass
    return found


def _plan(names: tuple[object, ...]) -> tuple[tuple[int, str], ...] | None:
    """(position, lower-cased name) of each wanted header, first of a repeat; None unless all are str."""
    if not all(type(name) is str for name in names):
        return None
    plan: list[tuple[int, str]] = []
    seen: set[str] = set()
    for index, name in enumerate(names):
        key = str(name).lower()
        if key in _WANTED and key not in seen:
            seen.add(key)
            plan.append((index, key))
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    result = _PLANS[names] = tuple(plan)
    return result


_PLANS: dict[tuple[object, ...], tuple[tuple[int, str], ...]] = {}
_MAX_PLANS: Final = 256  # emptied when full: header name lists are the peer's to vary


def _header_text(value: object) -> str | None:
    if type(value) is str:
        return value if len(value) <= _VALUE_LIMIT else value[:_VALUE_LIMIT]
    if isinstance(value, str):  # a subclass: copy it out as a plain str
        return str.__str__(value)[:_VALUE_LIMIT]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value[:_VALUE_LIMIT]).decode("latin-1")
    if isinstance(value, int) and not isinstance(value, bool) and -_BIG < value < _BIG:
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return None


def _number(text: str) -> float | None:
    """A non-negative decimal (``7``, ``2.5``); anything else, including ``-1`` and ``1e3``, is None."""
    if len(text) <= 12 and text.isdigit() and text.isascii():
        return float(text)
    text = text.strip()
    if _NUMBER.fullmatch(text) is None:
        return None
    return float(text)


def _retry(found: dict[str, str], now: float | None) -> tuple[float | None, float | None]:
    """(delay seconds, epoch seconds) from Retry-After / x-ms-retry-after-ms; the larger delay wins.

    The larger wins because retrying early against a throttle only earns another 429; waiting slightly
    long costs nothing. A date in the past means "now" (delay 0).
    """
    delays: list[float] = []
    date_at: float | None = None
    raw = found.get(_RETRY_AFTER)
    if raw is not None:
        seconds = _number(raw)
        if seconds is not None:
            delays.append(seconds)
        else:
            date_at = _http_date(raw)
            if date_at is not None:
                reference = now
                if reference is None and _DATE in found:
                    reference = _http_date(found[_DATE])
                if reference is not None:
                    delays.append(max(0.0, date_at - reference))
    for name in (_RETRY_AFTER_MS, _RETRY_AFTER_MS_PLAIN):
        raw = found.get(name)
        if raw is not None:
            millis = _number(raw)
            if millis is not None:
                delays.append(millis / 1000.0)
    delay = max(delays) if delays else None
    if delay is not None and now is not None:
        return delay, now + delay
    return delay, date_at


def _finite(value: float) -> float | None:
    """A usable clock reading, or None for NaN, infinities and ints too large for a float."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _http_date(text: str) -> float | None:
    text = text.strip()
    if not text or len(text) > 64:  # an IMF-fixdate is 29 characters
        return None
    try:
        when = parsedate_to_datetime(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        stamp = when.timestamp()
    except Exception:  # email.utils raises several types on malformed dates
        return None
    return stamp if math.isfinite(stamp) else None


# --- body ----------------------------------------------------------------------------------------------


def _body(body: object, native: dict[str, Any]) -> _Facts:
    """(code, message, tracking id) from the body; None for each it does not say."""
    if type(body) is str:
        text = body[:BODY_LIMIT] if len(body) > BODY_LIMIT else body
    else:
        try:
            if isinstance(body, str):  # a subclass: copy it out as a plain str, its methods unused
                text = str.__str__(body)[:BODY_LIMIT]
            elif isinstance(body, (bytes, bytearray, memoryview)):
                chunk = body[:BODY_LIMIT]
                text = (chunk if type(chunk) is bytes else bytes(chunk)).decode("utf-8", "replace")
            elif isinstance(body, Mapping):
                # Parsed by the caller, so its values can be any object: a failure means "no body".
                native["body_excerpt"] = _REPR.repr(body)[:_EXCERPT]
                return _from_object(body, native, 0)
            else:
                return _NOTHING
        except Exception:  # an exotic buffer or a hostile mapping is treated as no body
            return _NOTHING
    if not text:
        return _NOTHING
    native["body_excerpt"] = text[:_EXCERPT]
    if text[0] == "\ufeff":
        text = text[1:]
    return _from_text(text, native, 0)


def _from_text(text: str, native: dict[str, Any], depth: int) -> _Facts:
    """A body or a ``Message`` string: JSON if it parses, else the legacy ``ErrorCode:`` form or a scan."""
    if text[:1].isspace():
        text = text.lstrip()  # copies, but only for text that starts with white space
    if not text:
        return _NOTHING
    if text[0] in _JSON_OPENERS:
        try:
            # The decoder's scanner, not json.loads: one C call instead of four Python frames and two
            # regex matches. Text after the first value (``{...} junk``) is tolerated, not rejected.
            parsed = _SCAN_ONCE(text, 0)[0]
        except (StopIteration, ValueError, RecursionError):
            return _scan(text, native), None, None
        if type(parsed) is dict:
            return _from_object(parsed, native, depth + 1)
        if type(parsed) is str and depth < _MAX_DEPTH:
            return _from_text(parsed, native, depth + 1)
        return _NOTHING
    if depth == 0:
        # A plain-text body: a proxy's page or a bare ``ErrorCode:<Name>;...`` line. Only its code counts.
        return _scan(text, native), None, None
    info, message = _legacy(text, native)
    return info, message, _tracking_in(text)


def _from_object(obj: Mapping[Any, Any], native: dict[str, Any], depth: int) -> _Facts:
    """A parsed body object: its own ``errorCode`` first, then whatever its ``Message`` holds."""
    code = obj.get("errorCode")
    if code is None:
        code = obj.get("ErrorCode")
    msg = obj.get("message")
    if msg is None:
        msg = obj.get("Message")
    tracking = obj.get("trackingId")
    exc_msg = obj.get("ExceptionMessage")
    if code is None or msg is None or tracking is None:
        seen = (code is not None) + (msg is not None) + (tracking is not None) + (exc_msg is not None)
        if seen < len(obj):
            # Unusual casing (``ERRORCODE``, ``Trackingid``...): one case-folded pass over the keys.
            slots: list[Any] = [code, msg, tracking, exc_msg]
            for key, value in islice(obj.items(), _MAX_KEYS):
                if isinstance(key, str):
                    slot = _KEY_SLOTS.get(key.lower())
                    if slot is not None and slots[slot] is None:
                        slots[slot] = value
            code, msg, tracking, exc_msg = slots

    info = None
    if code is not None:
        info = _resolve(code)
        if "body_error_code" not in native:
            native["body_error_code"] = code if type(code) is int and -_BIG < code < _BIG else _short(code)
    message: str | None = None
    inner_tracking: str | None = None
    if isinstance(msg, str):
        first = msg[:1]
        if first.isspace():
            first = msg.lstrip()[:1]
        if first in _NESTED_OPENERS and depth < _MAX_DEPTH:
            inner, message, inner_tracking = _from_text(msg, native, depth + 1)
        elif info is None:
            inner, message = _legacy(msg, native)
        else:
            inner, message = None, _trim(msg)
        info = info or inner
        if inner_tracking is None and _TRACKING_MARK in msg:
            inner_tracking = _tracking_in(msg)
    elif isinstance(msg, Mapping) and depth < _MAX_DEPTH:
        inner, message, inner_tracking = _from_object(msg, native, depth + 1)
        info = info or inner

    if tracking is None:
        tracking_id = None
    elif type(tracking) is str:
        tracking_id = tracking.strip()[:_ID_LIMIT] or None
    else:
        tracking_id = _text(tracking)
    if tracking_id is None and isinstance(exc_msg, str):
        tracking_id = _tracking_in(exc_msg)
    return info, message, tracking_id or inner_tracking


def _legacy(msg: str, native: dict[str, Any]) -> tuple[CodeInfo | None, str | None]:
    """``ErrorCode:<Name|digits>;<text>`` anywhere in a message -> (code, the text around it)."""
    start = msg.find(_LEGACY_MARK)
    if start >= 0:
        begin = start + len(_LEGACY_MARK)
    else:
        loose = _LEGACY_LOOSE.search(msg)  # ``errorcode :`` and other casings; rare, off the hot path
        if loose is None:
            return None, _trim(msg)
        start, begin = loose.span()
    end = msg.find(";", begin, begin + 65)
    token = msg[begin:end] if end > begin else ""
    if not (token.isascii() and token.isalnum()):  # no ``;`` right after a plain name: match the name
        token_match = _TOKEN.match(msg, begin)
        if token_match is None:
            return None, _trim(msg)
        end = token_match.end()
        token = token_match.group()
    native.setdefault("body_error_code", token)
    text = msg[end:].lstrip(" ;")
    if start:
        text = msg[:start].rstrip(" ;") + " " + text
    return _resolve(token), _trim(text)


def _scan(text: str, native: dict[str, Any]) -> CodeInfo | None:
    """Last resort for text that is not JSON: the first resolvable code the bounded regex finds."""
    for match in islice(_SCAN.finditer(text), _MAX_SCAN_MATCHES):
        token = match.group(1) or match.group(2)
        info = _resolve(token)
        if info is not None:
            native.setdefault("body_error_code", token)
            return info
    return None


def _resolve(value: object) -> CodeInfo | None:
    """A body or header code (number, digit string or name) -> its row; None when it is not a code."""
    if type(value) is str:
        info = _BY_NAME.get(value)  # the usual case: a name spelled as the catalog spells it
        if info is not None:
            return info
        text = value.strip()
        if len(text) == 6 and text.isascii() and text.isdigit():
            number = int(text)
        else:
            return by_name(text) if 0 < len(text) <= 64 else None
    elif isinstance(value, int) and not isinstance(value, bool):
        number = int(value)
    elif isinstance(value, str):
        return _resolve(str.__str__(value))
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    else:
        return None
    if not 300_000 <= number <= 599_999:
        return None
    info = _ROWS.get(number)
    return info if info is not None else lookup(number)


def _tracking_in(text: str) -> str | None:
    """The id after ``Tracking ID:`` (``<hex>-G:<n>-TimeStamp:<date>``), up to the end of its field."""
    start = text.find(_TRACKING_MARK)
    if start < 0:
        return None
    match = _TRACKING_VALUE.match(text, start + len(_TRACKING_MARK))
    return match.group().strip() or None if match is not None else None


def _text(value: object) -> str | None:
    if isinstance(value, str):
        return value.strip()[:_ID_LIMIT] or None
    if isinstance(value, int) and not isinstance(value, bool) and -_BIG < value < _BIG:
        return str(value)
    return None


def _trim(text: str) -> str | None:
    cut = text.find(_TRACKING_MARK)
    if cut >= 0:
        text = text[:cut].rstrip(" ;,\r\n")
    text = text.strip()
    return text[:_MESSAGE_LIMIT] or None


def _short(value: object) -> object:
    if isinstance(value, str):
        return value[:64]
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -_BIG < value < _BIG else "<huge int>"
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    return type(value).__name__
