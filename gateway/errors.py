"""The error type: one exception per failure, grouped by what the caller does about it.

The class of an ``IoTHubError`` follows the catalog's default action for its code, so an ``except``
clause reads as a decision::

    IoTHubError                       every normalized failure; .code is the six-digit code
    ├── RetryableError                the same operation can succeed later
    │   ├── ServerError               retry with backoff (500xxx, 503xxx, 504000, ...)
    │   ├── ThrottledError            back off on the throttle curve, honour .retry_after (429xxx, 503008)
    │   ├── QuotaExceededError        park until the daily reset at 00:00 UTC (403002)
    │   ├── ConnectionLostError       reconnect (dropped socket, refused, 404104, ...)
    │   │   └── OperationTimeoutError no answer before the deadline; also a builtin TimeoutError
    │   ├── CredentialsExpiredError   renew the token, then reconnect (401003); also an UnauthorizedError
    │   └── DeviceOfflineError        hold work until the target device is online (404103, 504101)
    ├── IdentityConflictError         another client holds this identity (400027, 409002)
    ├── FatalError                    a permanent refusal of the connection: do not reconnect
    │   └── UnauthorizedError         ... because of the credential (401xxx)
    └── RequestError                  this operation can never succeed as sent: dead-letter it

Raw transport facts stay on the error (``.native``) and the original exception on ``__cause__``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from gateway.codes import _TABLE as _ROWS
from gateway.codes import Action, CodeInfo, all_codes, lookup

__all__ = [
    "ConnectionLostError",
    "CredentialsExpiredError",
    "DeviceOfflineError",
    "ErrorTemplate",
    "FatalError",
    "IdentityConflictError",
    "IoTHubError",
    "OperationTimeoutError",
    "QuotaExceededError",
    "RequestError",
    "RetryableError",
    "ServerError",
    "ThrottledError",
    "UnauthorizedError",
    "build_error",
    "error_class",
    "make_error",
]

TRANSPORT_NAMES = frozenset({"http", "mqtt", "amqp", "network"})


class IoTHubError(Exception):
    """A transport failure normalized to IoT Hub's six-digit code.

    Build one with :func:`make_error` (which picks the right subclass) rather than directly. The
    catalog facts (code, name, status, action) are read from the row, not copied: translators build
    errors on hot paths, so construction stores only what differs per failure.
    """

    # Optional facts are class-level defaults, stored on the instance only when set.
    retry_after: float | None = None  #: seconds the peer asked us to wait, when it said
    retry_at: float | None = None  #: the same as an absolute epoch time, when the peer gave a date
    tracking_id: str | None = None
    device_id: str | None = None

    def __init__(
        self,
        info: CodeInfo,
        *,
        transport: str,
        message: str = "",
        exact: bool = True,
        retry_after: float | None = None,
        retry_at: float | None = None,
        tracking_id: str | None = None,
        device_id: str | None = None,
        native: dict[str, Any] | None = None,
    ) -> None:
        if transport not in TRANSPORT_NAMES:
            raise ValueError(f"unknown transport {transport!r}")
        self._info = info
        self.transport = transport
        self.exact = exact and info.known
        self._message = message
        self.native = native if native is not None else {}
        if retry_after is not None:
            self.retry_after = _clean_delay(retry_after)
        if retry_at is not None:
            self.retry_at = retry_at
        if tracking_id is not None:
            self.tracking_id = tracking_id
        if device_id is not None:
            self.device_id = device_id

    @property
    def code(self) -> int:
        return self._info.code

    @property
    def name(self) -> str:
        return self._info.name

    @property
    def http_status(self) -> int | None:
        return self._info.http_status

    @property
    def action(self) -> Action:
        return self._info.action

    @property
    def retryable(self) -> bool:
        return self._info.action.transient

    @property
    def message(self) -> str:
        return self._message or self._info.description

    @property
    def info(self) -> CodeInfo:
        """The catalog row (or family) of this error's code."""
        return self._info

    if not TYPE_CHECKING:  # hidden from mypy, which would otherwise accept any attribute name

        def __getattr__(self, name: str) -> Any:
            # Called only for a missing attribute. ``native`` is missing on purpose in errors stamped
            # from an ErrorTemplate: its shared template is copied on first use, off the hot path.
            if name == "native":
                fields = self.__dict__
                template = fields.get("_native_template")
                native = fields["native"] = dict(template) if template is not None else {}
                return native
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}", name=name, obj=self)

    def __str__(self) -> str:
        text = f"{self.code} {self.name}: {self.message}"
        if self.retry_after is not None:
            text += f" (retry after {_seconds(self.retry_after)})"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code}, {self.name!r}, transport={self.transport!r}, exact={self.exact})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.to_dict(),))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of the error (the native facts included, stringified where needed)."""
        return {
            "code": self.code,
            "name": self.name,
            "http_status": self.http_status,
            "transport": self.transport,
            "retryable": self.retryable,
            "retry_after": self.retry_after,
            "retry_at": self.retry_at,
            "exact": self.exact,
            "tracking_id": self.tracking_id,
            "action": self.action.value,
            "message": self.message,
            "device_id": self.device_id,
            "native": _jsonable(self.native),
        }


class RetryableError(IoTHubError):
    """The same operation can succeed later; the action says how long to wait."""


class ServerError(RetryableError):
    """A transient fault on the service side: retry with capped, jittered backoff."""


class ThrottledError(RetryableError):
    """The hub throttled the operation: back off, honouring ``retry_after`` when the peer gave one."""


class QuotaExceededError(RetryableError):
    """The daily message quota is used up: stop sending until it resets at 00:00 UTC."""


class ConnectionLostError(RetryableError):
    """The connection is gone or could not be made: reconnect with backoff."""


class OperationTimeoutError(ConnectionLostError, TimeoutError):
    """No answer before the deadline. The outcome is unknown: a resend may duplicate."""


class UnauthorizedError(IoTHubError):
    """The credential was refused."""


class CredentialsExpiredError(RetryableError, UnauthorizedError):
    """The token expired or did not match: renew it, then reconnect (once)."""


class DeviceOfflineError(RetryableError):
    """The target device is not online: hold work for it until it is."""


class IdentityConflictError(IoTHubError):
    """Another client connected with the same identity: two instances must not fight over it."""


class FatalError(IoTHubError):
    """A permanent refusal of the connection: reconnecting cannot help."""


class FatalUnauthorizedError(FatalError, UnauthorizedError):
    """The credential has no right to connect (401xxx other than an expired token)."""


class RequestError(IoTHubError):
    """This operation can never succeed as sent: fail it and dead-letter its message."""


_BY_ACTION: dict[Action, type[IoTHubError]] = {
    Action.RETRY: ServerError,
    Action.THROTTLE: ThrottledError,
    Action.WAIT_FOR_QUOTA_RESET: QuotaExceededError,
    Action.RECONNECT: ConnectionLostError,
    Action.REFRESH_CREDENTIALS: CredentialsExpiredError,
    Action.WAIT_FOR_DEVICE: DeviceOfflineError,
    Action.STOP_IDENTITY_CONFLICT: IdentityConflictError,
    Action.STOP: FatalError,
    Action.FAIL: RequestError,
}


def error_class(info: CodeInfo) -> type[IoTHubError]:
    """The subclass for a catalog row: by its action, with the two refinements drawn above."""
    if info.action is Action.STOP and info.code // 1000 == 401:
        return FatalUnauthorizedError
    if info.action is Action.RETRY and info.name == "OperationTimedOut":
        return OperationTimeoutError
    return _BY_ACTION[info.action]


def make_error(
    code: int | CodeInfo,
    *,
    transport: str,
    message: str = "",
    exact: bool = True,
    native: dict[str, Any] | None = None,
    retry_after: float | None = None,
    retry_at: float | None = None,
    tracking_id: str | None = None,
    device_id: str | None = None,
) -> IoTHubError:
    """Build the right ``IoTHubError`` subclass for a code (a number, an alias or a family)."""
    if type(code) is CodeInfo:
        info = code
    elif type(code) is int:
        info = _ROWS.get(code) or lookup(code)  # type: ignore[arg-type]
    elif isinstance(code, CodeInfo):
        info = code
    else:
        info = lookup(code)
    err = build_error(info, transport, message, exact, native, retry_after, retry_at, tracking_id)
    if device_id is not None:
        err.device_id = device_id
    return err


def build_error(
    info: CodeInfo,
    transport: str,
    message: str = "",
    exact: bool = True,
    native: dict[str, Any] | None = None,
    retry_after: float | None = None,
    retry_at: float | None = None,
    tracking_id: str | None = None,
    /,
) -> IoTHubError:
    """``make_error`` for a catalog row already in hand, with positional arguments: the translators' hot path.

    It fills the instance dict in one assignment instead of going through ``__init__`` (whose keyword
    plumbing costs as much again as the rest of a translation).
    """
    if transport not in TRANSPORT_NAMES:
        raise ValueError(f"unknown transport {transport!r}")
    known = info.known
    cls = _CLASS_BY_CODE.get(info.code) if known else None
    if cls is None:
        cls = error_class(info)
    fields: dict[str, Any] = {
        "_info": info,
        "transport": transport,
        "exact": exact and known,
        "_message": message,
        "native": native if native is not None else {},
    }
    if retry_after is not None:
        # The usual delay is a sane float already; anything else is cleaned.
        ok = type(retry_after) is float and 0.0 <= retry_after <= _MAX_DELAY
        fields["retry_after"] = retry_after if ok else _clean_delay(retry_after)
    if retry_at is not None:
        fields["retry_at"] = retry_at
    if tracking_id is not None:
        fields["tracking_id"] = tracking_id
    err = cls.__new__(cls)
    err.__dict__ = fields
    return err


class ErrorTemplate:
    """The fixed part of an error (class, code, transport, message, exactness, native facts), checked once.

    Translators memoize one per decision they have made before and :meth:`stamp` a fresh error from it
    per call: one allocation and one dict copy, with no argument parsing or catalog lookups. The error
    equals what ``make_error`` builds from the same arguments; its ``native`` dict is copied from the
    template on first access, so callers may still mutate it freely.
    """

    __slots__ = ("_cls", "_fields", "_new")

    def __init__(
        self,
        code: int | CodeInfo,
        *,
        transport: str,
        message: str = "",
        exact: bool = True,
        native: Mapping[str, Any] | None = None,
    ) -> None:
        proto = make_error(code, transport=transport, message=message, exact=exact)
        fields = dict(proto.__dict__)
        del fields["native"]
        if native:
            fields["_native_template"] = dict(native)
        self._cls = type(proto)
        self._new = self._cls.__new__  # BaseException's, or OSError's for OperationTimeoutError
        self._fields = fields

    def stamp(self, tracking_id: str | None = None, native: dict[str, Any] | None = None) -> IoTHubError:
        """A new error from this template, with ``tracking_id`` and ``native`` (instead of the
        template's native facts) when given."""
        err = self._new(self._cls)
        fields = self._fields.copy()
        if tracking_id is not None:
            fields["tracking_id"] = tracking_id
        if native is not None:
            fields["native"] = native
        err.__dict__ = fields
        return err


_CLASS_BY_CODE: dict[int, type[IoTHubError]] = {row.code: error_class(row) for row in all_codes()}


def _rebuild(data: dict[str, Any]) -> IoTHubError:
    return make_error(
        data["code"],
        transport=data["transport"],
        message=data["message"],
        exact=data["exact"],
        retry_after=data["retry_after"],
        retry_at=data["retry_at"],
        tracking_id=data["tracking_id"],
        device_id=data["device_id"],
        native=dict(data["native"]),
    )


def _clean_delay(value: float | None) -> float | None:
    if value is None:
        return None
    try:
        delay = float(value)
    except (TypeError, ValueError):
        return None
    if math.isnan(delay) or delay < 0:
        return None
    return min(delay, _MAX_DELAY)


_MAX_DELAY: Final = 366 * 86400.0  # a peer asking for more than a year is capped to a year


def _seconds(value: float) -> str:
    return f"{value:g}s" if value < 1e6 else f"{value:.0f}s"


def _jsonable(value: Any, depth: int = 0) -> Any:
    if depth > 8:
        return repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, depth + 1) for v in value]
    return str(value)
