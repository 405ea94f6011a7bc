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
    """
    if isinstance(exc, IoTHubError):
        return exc
    code, reason = _classify(exc)
    native: dict[str, Any] = {"exception": f"{type(exc).__module__}.{type(exc).__qualname__}", "reason": reason}
    err_no = getattr(exc, "errno", None)
    if isinstance(err_no, int):
        native["errno"] = err_no
    text = str(exc) or type(exc).__name__
    err = make_error(code, transport=transport, message=f"{reason}: {text}"[:500], exact=False, native=native,
                     device_id=device_id)
    err.__cause__ = exc
    return err


def _classify(exc: BaseException) -> tuple[int, str]:
    # TLS first: ssl errors are OSErrors too, and aiohttp wraps them with the cause attached.
    for candidate in _chain(exc):
        if isinstance(candidate, (ssl.SSLCertVerificationError, ssl.CertificateError)):
            return _TLS_VERIFY, "TLS certificate verification failed"
    for cls in type(exc).__mro__:
        code = _BY_CLASS_NAME.get(cls.__name__)
        if code is not None and cls.__module__.split(".")[0] in {"aiohttp", "paho", "proton"}:
            return code, f"{cls.__module__.split('.')[0]} {cls.__name__}"
    for candidate in _chain(exc):
        found = _classify_builtin(candidate)
        if found is not None:
            return found
    return _UNCLASSIFIED, f"unclassified {type(exc).__name__}"


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
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno in _UNREACHABLE_ERRNOS:
            return _UNREACHABLE, "network unreachable"
        if exc.errno in _CLOSED_ERRNOS:
            return _CLOSED, "connection closed"
        if exc.errno == errno.ECONNREFUSED:
            return _REFUSED, "connection refused"
    if isinstance(exc, ConnectionError):
        return _CLOSED, "connection lost"
    if type(exc).__name__ in {"NotConnectedError", "NoConnectionError"}:
        return _NOT_CONNECTED, "not connected"
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < 16 and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
        os_error = getattr(seen[-1], "os_error", None)  # aiohttp keeps the OSError here
        if current is None and isinstance(os_error, BaseException) and os_error is not seen[-1]:
            current = os_error
    return seen
