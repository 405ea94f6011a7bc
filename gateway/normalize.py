"""Failures that are not protocol answers (sockets, DNS, TLS, timeouts, library errors) -> IoTHubError.

Library exceptions are recognised by their class names along the MRO, so this module imports none of
aiohttp, paho or proton: ``import gateway`` stays light, and a library that is not installed costs
nothing. The order matters: the most specific cause wins (a TLS verification error is also an
``OSError``; aiohttp's connector error is also a ``ConnectionError``).
"""

from __future__ import annotations

import errno
import socket
import ssl
from typing import Any

from gateway.codes import code_of
from gateway.errors import IoTHubError, make_error

__all__ = ["normalize"]

_REFUSED = code_of("ConnectionRefused")
_DNS = code_of("NameResolutionFailed")
_UNREACHABLE = code_of("NetworkUnreachable")
_CLOSED = code_of("DeviceConnectionClosedRemotely")
_TIMEOUT = code_of("OperationTimedOut")
_TLS_VERIFY = code_of("TlsVerificationFailed")
_TLS = code_of("TlsHandshakeFailed")
_PROTOCOL = code_of("ProtocolViolation")
_UNCLASSIFIED = code_of("UnclassifiedTransportError")
_NOT_CONNECTED = code_of("NotConnected")

_UNREACHABLE_ERRNOS = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.EADDRNOTAVAIL}
)
_CLOSED_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ESHUTDOWN, errno.ENOTCONN})

# Library exception class names -> code, checked along the MRO (most derived first).
_BY_CLASS_NAME: dict[str, int] = {
    # aiohttp
    "ClientConnectorCertificateError": _TLS_VERIFY,
    "ClientConnectorSSLError": _TLS,
    "ClientSSLError": _TLS,
    "ClientConnectorDNSError": _DNS,
    "ServerDisconnectedError": _CLOSED,
    "ClientPayloadError": _CLOSED,
    "ServerTimeoutError": _TIMEOUT,
    "ConnectionTimeoutError": _TIMEOUT,
    "SocketTimeoutError": _TIMEOUT,
    "TooManyRedirects": _PROTOCOL,
    "ContentTypeError": _PROTOCOL,
    "ClientResponseError": _UNCLASSIFIED,  # a status without translate(): callers should translate it
    # paho / websockets
    "WebsocketConnectionError": _PROTOCOL,
    # proton
    "SSLUnavailable": _TLS,
    "SSLException": _TLS,
    "Timeout": _TIMEOUT,
    "ConnectionClosed": _CLOSED,
    "LinkDetached": _CLOSED,
    "TransportException": _CLOSED,
}


def normalize(exc: BaseException, *, transport: str = "network", device_id: str | None = None) -> IoTHubError:
    """Classify any exception that is not a protocol answer. An ``IoTHubError`` is returned as is.

    A dropped connection with no reason is retryable (reconnect); a TLS verification failure is not.
    The result carries the original on ``__cause__`` so the full chain stays inspectable.

    Anything that is not an exception raises ``TypeError`` (an unknown ``transport``, ``ValueError``).
    Otherwise it never raises, whatever the exception holds: an ``errno`` that is huge, unhashable or a
    property that raises, a ``__str__`` that raises or cannot print its argument. What cannot be read
    is left out and the class alone decides (``UnclassifiedTransportError`` when nothing matches).
    """
    if not issubclass(type(exc), BaseException):  # the real type: a hostile __class__ is never asked
        raise TypeError(f"normalize() needs an exception, not {type(exc).__name__[:80]}")
    if isinstance(exc, IoTHubError):
        return exc
    try:
        code, reason = _classify(exc)
    except Exception:  # a hostile exception (a property that raises, a __bool__ that raises ...)
        code, reason = _UNCLASSIFIED, f"unclassified {_type_name(exc)}"
    native: dict[str, Any] = {"exception": _qualified(exc), "reason": reason}
    err_no = _errno(exc)
    if err_no is not None:
        native["errno"] = err_no
    text = _text(exc) or _type_name(exc)
    err = make_error(code, transport=transport, message=f"{reason}: {text}"[:500], exact=False, native=native,
                     device_id=device_id)
    err.__cause__ = exc
    return err


def _type_name(exc: BaseException) -> str:
    name = type(exc).__name__
    return name[:100] if type(name) is str else "exception"


def _qualified(exc: BaseException) -> str:
    module = getattr(type(exc), "__module__", None)
    qualname = getattr(type(exc), "__qualname__", None)
    if type(module) is not str or type(qualname) is not str:
        return _type_name(exc)
    return f"{module[:100]}.{qualname[:100]}"


def _errno(exc: BaseException) -> int | None:
    """``exc.errno`` when it is a plain, printable int; None when absent, unreadable or anything else."""
    try:
        value = getattr(exc, "errno", None)
    except Exception:  # a property that raises
        return None
    if type(value) is int and value.bit_length() <= 64:
        return value
    return None


def _text(exc: BaseException) -> str:
    """``str(exc)``, bounded; empty when it raises (an argument too long to print, a hostile __str__).

    An exception carrying a huge text argument is shown from its arguments' first characters, so the
    message costs the same whatever the size of what the peer put in it.
    """
    try:
        args = exc.args
        if type(args) is tuple and any(type(arg) is str and len(arg) > _MAX_TEXT for arg in args):
            return " ".join(arg[:_MAX_TEXT] if type(arg) is str else "..." for arg in args[:4])[:_MAX_TEXT]
        text = str(exc)
    except Exception:
        return ""
    return text[:_MAX_TEXT] if type(text) is str else ""


_MAX_TEXT = 500


def _classify(exc: BaseException) -> tuple[int, str]:
    # TLS first: ssl errors are OSErrors too, and aiohttp wraps them with the cause attached.
    for candidate in _chain(exc):
        if isinstance(candidate, (ssl.SSLCertVerificationError, ssl.CertificateError)):
            return _TLS_VERIFY, "TLS certificate verification failed"
    for cls in type(exc).__mro__:
        code = _BY_CLASS_NAME.get(cls.__name__)
        module = cls.__module__
        if code is not None and type(module) is str and module.split(".")[0] in {"aiohttp", "paho", "proton"}:
            return code, f"{module.split('.')[0]} {cls.__name__}"
    for candidate in _chain(exc):
        found = _classify_builtin(candidate)
        if found is not None:
            return found
    return _UNCLASSIFIED, f"unclassified {_type_name(exc)}"


def _classify_builtin(exc: BaseException) -> tuple[int, str] | None:
    if isinstance(exc, ssl.SSLError):
        return _TLS, "TLS handshake failed"
    if isinstance(exc, socket.gaierror):
        return _DNS, "host name could not be resolved"
    if isinstance(exc, ConnectionRefusedError):
        return _REFUSED, "connection refused"
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return _CLOSED, "connection closed by the peer"
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError and socket.timeout are this class
        return _TIMEOUT, "timed out"
    if isinstance(exc, EOFError):
        return _CLOSED, "connection closed by the peer"
    err_no = _errno(exc) if isinstance(exc, OSError) else None  # a plain int, or not looked at
    if err_no is not None:
        if err_no in _UNREACHABLE_ERRNOS:
            return _UNREACHABLE, "network unreachable"
        if err_no in _CLOSED_ERRNOS:
            return _CLOSED, "connection closed"
        if err_no == errno.ECONNREFUSED:
            return _REFUSED, "connection refused"
    if isinstance(exc, ConnectionError):
        return _CLOSED, "connection lost"
    if type(exc).__name__ in {"NotConnectedError", "NoConnectionError"}:
        return _NOT_CONNECTED, "not connected"
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes (at most 16, no cycles); a link that cannot be read ends the chain."""
    seen: list[BaseException] = []
    current: object = exc
    while issubclass(type(current), BaseException) and len(seen) < 16 and all(current is not s for s in seen):
        seen.append(current)  # type: ignore[arg-type]
        try:
            cause = current.__cause__  # type: ignore[attr-defined]
            current = cause if cause is not None else current.__context__  # type: ignore[attr-defined]
            if current is None:
                os_error = getattr(seen[-1], "os_error", None)  # aiohttp keeps the OSError here
                if issubclass(type(os_error), BaseException) and os_error is not seen[-1]:
                    current = os_error
        except Exception:  # a property that raises
            break
    return seen
