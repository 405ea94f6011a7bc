"""The HTTP adapter: IoT Hub's device and service REST calls over aiohttp, every failure an IoTHubError.

What a gateway does over HTTPS: device telemetry, cloud-to-device receive and settle (the ETag lock),
twin read, the service's desired-property update, and the service-side direct method call whose
DeviceNotOnline / GatewayTimeout answers are the offline signals the handler holds work on. Like every
adapter it never retries or sleeps between attempts: a response becomes an error through
:func:`adapters.http.translate` (status, headers, body), anything below HTTP through one mapping point
(:func:`_map_exceptions`), and the handler decides what happens next.

HTTP has no connection to keep, so its failures are per request. ``connect()`` opens a
``ClientSession`` (a pool of keep-alive sockets) without contacting the hub; ``close()`` retires it:
new calls are refused at once, calls already running finish on it, and the last one out closes it. A
handler that "reconnects" after one request lost its socket therefore never aborts the others.

What went out decides the code of a failure: before the request was handed to a socket (connect
refused or timed out, TLS handshake, DNS, waiting for a pooled socket) nothing reached the hub, so the
failure is ``NotConnected`` (503904, the lower-level code kept in ``native["cause_code"]``) and a
resend is no duplicate; after it, a timeout is ``OperationTimedOut`` (504901) and a drop the
classified loss, both "outcome unknown". A certificate the client cannot verify stays
``TlsVerificationFailed`` (401901): reconnecting cannot help.

``events()`` yields only what the adapter is asked to watch: cloud-to-device messages when
``c2d_poll_interval`` is set, and :class:`~gateway.transport.DeviceOnline` for a device a direct method
found offline, learnt by polling its twin's ``connectionState`` every ``presence_interval`` (needs the
service credential). With nothing to watch it simply waits until ``close()``.

aiohttp is imported when this module is, never by ``import adapters.http``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl as _ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, Final, Literal
from urllib.parse import quote

import aiohttp
from yarl import URL

from adapters.http.translate import BODY_LIMIT, translate
from gateway.codes import Action, code_of
from gateway.errors import IoTHubError, make_error
from gateway.normalize import normalize
from gateway.sas import ConnectionString, ServiceCredential
from gateway.tls import default_port, resolve
from gateway.transport import (
    C2DMessage,
    DeviceOnline,
    Disconnected,
    GetTwin,
    Inbound,
    InvokeMethod,
    Message,
    MethodResult,
    PatchDesired,
    PatchReported,
    ReceiveC2D,
    Request,
    RespondMethod,
    SettleC2D,
    SettleOutcome,
    TransportEvent,
    UnsupportedRequest,
    check_properties,
)

__all__ = ["C2DMessage", "HttpTransport", "MethodResult", "ServiceCredential"]

log = logging.getLogger(__name__)

API_VERSION: Final = "2021-04-12"

_NOT_CONNECTED = code_of("NotConnected")
_TIMED_OUT = code_of("OperationTimedOut")
_ARGUMENT = code_of("ArgumentInvalid")
_INVALID_OPERATION = code_of("InvalidOperation")
_PROTOCOL = code_of("ProtocolViolation")
_CONNECTION_ACTIONS: Final = frozenset(
    {Action.RECONNECT, Action.REFRESH_CREDENTIALS, Action.STOP, Action.STOP_IDENTITY_CONFLICT}
)
_CHUNK: Final = 64 * 1024
_APP_PREFIX: Final = "iothub-app-"
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")  # an HTTP header name
_GOOD_NAMES: set[str] = {"iothub-messageid", "Content-Type"}  # header names already checked

Phase = Literal["connect", "sent", "answered"]


class _Attempt:
    """How far one request got: ``connect`` (nothing handed to a socket yet), ``sent``, ``answered``."""

    __slots__ = ("phase",)

    def __init__(self) -> None:
        self.phase: Phase = "connect"


# The attempt of the request running in this task; the connector marks it once it holds a socket.
_ATTEMPT: ContextVar[_Attempt | None] = ContextVar("iothub_http_attempt", default=None)


class _Connector(aiohttp.TCPConnector):
    """A TCPConnector that records when a request got its (connected, TLS-established) socket.

    aiohttp writes the request right after ``connect()`` returns, so until then nothing can have
    reached the hub: that boundary is what tells a connect failure from an answer that never came.
    """

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        conn = await super().connect(req, traces, timeout)
        attempt = _ATTEMPT.get()
        if attempt is not None:
            attempt.phase = "sent"
        return conn


class _Pool:
    """One ClientSession and the calls running on it; a retired pool closes when its last call ends."""

    __slots__ = ("active", "retired", "session")

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.active = 0
        self.retired = False


class _Token:
    """A SAS token cached until ``renew_before`` seconds before it expires.

    Both sides of the comparison are wall-clock epochs: the hub judges the token's expiry by its own
    clock, which ours approximates. So no duration is measured across time here and a clock step
    cannot stretch a wait: after a forward step (an edge board whose clock was set by NTP after boot)
    the token is renewed at once; after a backward step the token signed before it is still good
    for as long as the corrected clock says.
    """

    __slots__ = ("_expiry", "_make", "_renew_before", "_ttl", "_value")

    def __init__(self, make: Callable[[int], str], ttl: float, renew_before: float) -> None:
        self._make = make
        self._ttl = ttl
        self._renew_before = renew_before
        self._value = ""
        self._expiry = 0.0

    def invalidate(self) -> None:
        self._expiry = 0.0

    def get(self, now: float) -> str:
        if now >= self._expiry - self._renew_before:
            expiry = int(now + self._ttl)
            self._value = self._make(expiry)
            self._expiry = float(expiry)
        return self._value

    @property
    def expiry(self) -> float:
        return self._expiry


class HttpTransport:
    """One device's (and optionally the service's) REST surface of IoT Hub, for the shared handler.

    ``connection_string`` is the device's; ``service_connection_string`` a shared access policy, needed
    for direct methods and desired-property patches (and used for twin reads of other devices and
    presence polling). ``host`` / ``port`` say where the sockets go (the connection string's HostName
    and 443 by default); ``ssl`` is an ``SSLContext``, True (system trust) or None/False for plain HTTP
    to a loopback peer such as the emulator (see :mod:`gateway.tls`).

    ``timeout`` bounds every call (connect, headers and body together; a caller's shorter ``timeout=``
    wins); ``connect_timeout`` bounds opening a socket (TCP and the TLS handshake), so an unreachable
    hub fails fast with NotConnected instead of using up the call's deadline (a wait for a free pooled
    socket, up to ``connection_limit``, is bounded by the call's deadline alone: a busy pool is no
    reason to reconnect). Response bodies are read
    up to ``max_body`` bytes (errors: up to the translator's ``BODY_LIMIT``) and a larger one is cut
    off, never buffered. ``clock`` is the wall clock, used only for the tokens' expiry field and
    ``Retry-After`` dates.
    """

    name = "http"
    #: HTTP signs a fresh token per request as needed: the handler never reconnects to renew one.
    credential_expiry: float | None = None
    #: The hub answers every refusal with a status: a dropped socket is never its way of saying no.
    ambiguous_drops: bool = False

    def __init__(
        self,
        connection_string: str | ConnectionString | None = None,
        *,
        service_connection_string: str | ServiceCredential | None = None,
        host: str | None = None,
        port: int | None = None,
        ssl: _ssl.SSLContext | bool | None = True,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        token_ttl: float = 3600.0,
        renew_before: float = 300.0,
        max_body: int = 1024 * 1024,
        c2d_poll_interval: float | None = None,
        presence_interval: float = 30.0,
        connection_limit: int = 100,
        api_version: str = API_VERSION,
        clock: Callable[[], float] = time.time,
    ) -> None:
        device = ConnectionString.parse(connection_string) if isinstance(connection_string, str) else connection_string
        service = (ServiceCredential.parse(service_connection_string)
                   if isinstance(service_connection_string, str) else service_connection_string)
        if device is None and service is None:
            raise ValueError("give a device connection string, a service connection string, or both")
        if device is not None and device.shared_access_key is None:
            raise ValueError("the device connection string has no SharedAccessKey")
        if timeout <= 0 or connect_timeout <= 0 or token_ttl <= renew_before or max_body < 1:
            raise ValueError("timeouts must be positive, token_ttl above renew_before, max_body at least 1")
        self.device = device
        self.service = service
        context = resolve(ssl)
        self.host = host or (device.host_name if device is not None else service.host_name)  # type: ignore[union-attr]
        self.port = port if port is not None else default_port("http", context)
        scheme = "https" if context is not None else "http"
        default = 443 if context is not None else 80
        #: Where requests go: ``https://host[:port]``.
        self.url = str(URL.build(scheme=scheme, host=self.host, port=None if self.port == default else self.port))
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_body = max_body
        self.c2d_poll_interval = c2d_poll_interval
        self.presence_interval = presence_interval
        self._ssl: _ssl.SSLContext | bool = context if context is not None else False
        self._limit = connection_limit
        self._params = {"api-version": api_version}
        self._clock = clock
        self._device_token = _Token(device.token, token_ttl, renew_before) if device is not None else None
        self._service_token = _Token(service.token, token_ttl, renew_before) if service is not None else None
        self._pool: _Pool | None = None
        self._closed = asyncio.Event()
        self._wake = asyncio.Event()
        self._watch: set[str] = set()

    # -- Transport ---------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open a session (no request is made: HTTP connects per call). Idempotent."""
        if self._pool is not None:
            return
        connector = _Connector(limit=self._limit, ssl=self._ssl)
        # The call's deadline is asyncio.timeout around it (which also bounds the body read); aiohttp
        # only bounds opening a socket, so that an unreachable hub fails before the deadline.
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                        timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout))
        self._pool = _Pool(session)
        self._closed = asyncio.Event()
        self._wake = asyncio.Event()

    async def close(self) -> None:
        """Refuse new calls; the session closes now, or when the calls still running on it end."""
        pool, self._pool = self._pool, None
        self._closed.set()
        if pool is not None:
            pool.retired = True
            if pool.active == 0:
                await pool.session.close()

    async def send(self, message: Message) -> None:
        """POST the message as device telemetry; returns once the hub answered 2xx."""
        check_properties(message, "http")
        device_id = message.device_id or self._own_device()
        headers = {"iothub-messageid": message.id, "Content-Type": "application/octet-stream"}
        for key, value in message.properties.items():
            headers[_APP_PREFIX + key] = value
        # IoT Hub's system properties over HTTP (routing on the body needs content type and encoding)
        system = (("iothub-contenttype", message.content_type), ("iothub-contentencoding", message.content_encoding),
                  ("iothub-correlationid", message.correlation_id), ("iothub-creation-time-utc", message.creation_time))
        headers.update((header, value) for header, value in system if value is not None)
        _check_headers(headers, device_id)
        await self._call("POST", f"/devices/{_seg(device_id)}/messages/events", device_id=device_id,
                         body=message.body, headers=headers)

    async def request(self, request: Request, *, timeout: float) -> Any:
        """Answer a typed request (see :data:`gateway.transport.Request`).

        GetTwin -> the twin dict; PatchDesired (service) -> the updated twin dict; InvokeMethod
        (service) -> :class:`MethodResult`; ReceiveC2D -> :class:`C2DMessage` or None; SettleC2D ->
        None. PatchReported and RespondMethod raise :class:`UnsupportedRequest`: IoT Hub's device REST
        surface has no reported-properties patch and no method channel (those need MQTT or AMQP).
        """
        if isinstance(request, GetTwin):
            return await self.get_twin(request.device_id, timeout=timeout)
        if isinstance(request, SettleC2D):
            await self.settle_c2d(request.lock_token, request.outcome, timeout=timeout)
            return None
        if isinstance(request, ReceiveC2D):
            return await self.receive_c2d(timeout=timeout)
        if isinstance(request, InvokeMethod):
            return await self.invoke_method(request.device_id, request.method_name, request.payload,
                                            response_timeout=request.response_timeout, timeout=timeout)
        if isinstance(request, PatchDesired):
            return await self.update_twin(request.device_id, dict(request.desired), etag=request.etag,
                                          timeout=timeout)
        if isinstance(request, (PatchReported, RespondMethod)):
            raise UnsupportedRequest(f"{type(request).__name__} is not on IoT Hub's HTTP surface: use MQTT or AMQP")
        raise UnsupportedRequest(f"not a request the HTTP transport knows: {request!r}")

    async def events(self) -> AsyncIterator[TransportEvent]:
        """C2D messages (when polling) and DeviceOnline for watched devices, until ``close()``.

        A poll that fails with a connection-level code (refused, unauthorized, ...) ends the stream with
        ``Disconnected``; any other failure (a throttle) is logged and the poll tried next interval.
        """
        closed = self._closed
        next_c2d = 0.0
        next_presence = 0.0
        loop = asyncio.get_running_loop()
        while not closed.is_set():
            now = loop.time()
            waits = []
            if self.c2d_poll_interval is not None:
                waits.append(next_c2d - now)
            if self._watch and self._service_token is not None:
                waits.append(next_presence - now)
            if not waits or min(waits) > 0:
                self._wake.clear()
                wake = asyncio.ensure_future(self._wake.wait())
                done = asyncio.ensure_future(closed.wait())
                try:
                    await asyncio.wait({wake, done}, timeout=min(waits) if waits else None,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wake.cancel()
                    done.cancel()
                continue
            try:
                if self.c2d_poll_interval is not None and next_c2d <= now:
                    next_c2d = now + self.c2d_poll_interval
                    while not closed.is_set():
                        msg = await self.receive_c2d()
                        if msg is None:
                            break
                        yield Inbound("c2d", msg, msg.device_id)
                if self._watch and self._service_token is not None and next_presence <= now:
                    next_presence = now + self.presence_interval
                    for device_id in sorted(self._watch):
                        twin = await self.get_twin(device_id)
                        if twin.get("connectionState") == "Connected":
                            self._watch.discard(device_id)
                            yield DeviceOnline(device_id)
            except IoTHubError as err:
                if closed.is_set():
                    return
                if err.action in _CONNECTION_ACTIONS:
                    yield Disconnected(err)
                    return
                log.debug("HTTP poll failed: %s", err)

    # -- device calls ------------------------------------------------------------------------------

    async def receive_c2d(self, *, timeout: float | None = None) -> C2DMessage | None:
        """The next cloud-to-device message, locked (``lock_token`` is its ETag), or None (204)."""
        device_id = self._own_device()
        status, headers, body = await self._call(
            "GET", f"/devices/{_seg(device_id)}/messages/deviceBound", device_id=device_id, timeout=timeout)
        if status == 204:
            return None
        return _c2d_message(device_id, headers, body)

    async def settle_c2d(self, lock_token: str, outcome: SettleOutcome = "complete", *,
                         timeout: float | None = None) -> None:
        """Settle a received message by its lock: complete (DELETE), reject (DELETE ?reject: dead-letter)
        or abandon (POST .../abandon: redeliver). A lapsed lock answers DeviceMessageLockLost."""
        device_id = self._own_device()
        path = f"/devices/{_seg(device_id)}/messages/deviceBound/{_seg(lock_token)}"
        if outcome == "complete":
            await self._call("DELETE", path, device_id=device_id, timeout=timeout)
        elif outcome == "reject":
            await self._call("DELETE", path, device_id=device_id, timeout=timeout, extra_params={"reject": ""})
        elif outcome == "abandon":
            await self._call("POST", path + "/abandon", device_id=device_id, timeout=timeout)
        else:
            raise UnsupportedRequest(f"unknown settle outcome {outcome!r}: complete, reject or abandon")

    # -- twin and methods --------------------------------------------------------------------------

    async def get_twin(self, device_id: str | None = None, *, timeout: float | None = None) -> dict[str, Any]:
        """The device twin (``GET /twins/{id}``); this device's own token, or the service's for others."""
        target = device_id or self._own_device()
        service = self.device is None or target != self.device.device_id
        _, _, body = await self._call("GET", f"/twins/{_seg(target)}", device_id=target, timeout=timeout,
                                      service=service)
        return _json_object(body, target)

    async def update_twin(self, device_id: str, desired: dict[str, Any], *, etag: str | None = None,
                          timeout: float | None = None) -> dict[str, Any]:
        """Patch ``device_id``'s desired properties (service side, ``PATCH /twins/{id}``): the updated twin.

        A None value deletes the property. ``etag`` (the twin's, from ``get_twin``) makes the update
        conditional: a twin changed since answers PreconditionFailed.
        """
        try:
            body = json.dumps({"properties": {"desired": desired}}).encode()
        except (TypeError, ValueError) as exc:
            raise make_error(_ARGUMENT, transport="http", device_id=device_id,
                             message=f"the desired properties are not JSON: {exc}") from exc
        headers = {"Content-Type": "application/json"}
        if etag is not None:
            headers["If-Match"] = etag if etag == "*" or etag.startswith(('"', "W/")) else f'"{etag}"'
            _check_headers(headers, device_id)
        _, _, answer = await self._call("PATCH", f"/twins/{_seg(device_id)}", device_id=device_id, body=body,
                                        headers=headers, timeout=timeout, service=True)
        return _json_object(answer, device_id)

    async def invoke_method(self, device_id: str, method_name: str, payload: Any = None, *,
                            response_timeout: float = 30.0, timeout: float | None = None) -> MethodResult:
        """Call a direct method on ``device_id`` (service side); DeviceNotOnline/GatewayTimeout raise.

        A device found offline is watched: ``events()`` yields ``DeviceOnline`` once its twin says it
        is connected, which releases the work the handler holds for it.
        """
        try:
            body = json.dumps({"methodName": method_name, "responseTimeoutInSeconds": response_timeout,
                               "payload": payload}).encode()
        except (TypeError, ValueError) as exc:
            raise make_error(_ARGUMENT, transport="http", device_id=device_id,
                             message=f"the method payload is not JSON: {exc}") from exc
        call_timeout = timeout if timeout is not None else max(self.timeout, response_timeout + 5.0)
        try:
            _, _, answer = await self._call("POST", f"/twins/{_seg(device_id)}/methods", device_id=device_id,
                                            body=body, headers={"Content-Type": "application/json"},
                                            timeout=call_timeout, service=True, cap_timeout=False)
        except IoTHubError as err:
            if err.action is Action.WAIT_FOR_DEVICE and device_id not in self._watch:
                self._watch.add(device_id)
                self._wake.set()
            raise
        parsed = _json_object(answer, device_id)
        status = parsed.get("status")
        return MethodResult(status if isinstance(status, int) else 0, parsed.get("payload"))

    async def refresh_credentials(self) -> float | None:
        """Sign fresh SAS tokens now; the device token's expiry (epoch seconds), for the handler.

        Pass it as ``Handler(refresh_credentials=transport.refresh_credentials)``: the handler calls it
        when the hub answers IotHubUnauthorized (401003).
        """
        now = self._clock()
        expiry: float | None = None
        for token in (self._service_token, self._device_token):
            if token is not None:
                token.invalidate()
                token.get(now)
                expiry = token.expiry
        return expiry

    @property
    def watched(self) -> frozenset[str]:
        """Devices whose presence ``events()`` is polling."""
        return frozenset(self._watch)

    # -- plumbing ----------------------------------------------------------------------------------

    def _own_device(self) -> str:
        if self.device is None:
            raise make_error(_INVALID_OPERATION, transport="http",
                             message="this transport has no device connection string")
        return self.device.device_id

    def _authorization(self, service: bool) -> str:
        token = self._service_token if service else self._device_token
        if token is None:
            which = "service" if service else "device"
            raise make_error(_INVALID_OPERATION, transport="http", message=f"no {which} credential configured")
        return token.get(self._clock())

    async def _call(
        self,
        method: str,
        path: str,
        *,
        device_id: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        service: bool = False,
        extra_params: dict[str, str] | None = None,
        cap_timeout: bool = True,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One request: (status, headers, body) of a 1xx/2xx answer, else the translated IoTHubError."""
        pool = self._pool
        if pool is None:
            raise make_error(_NOT_CONNECTED, transport="http", device_id=device_id,
                             message="the HTTP transport is not connected (call connect())")
        limit = self.timeout if timeout is None else (min(self.timeout, timeout) if cap_timeout else timeout)
        all_headers = {"Authorization": self._authorization(service)}
        if headers:
            all_headers.update(headers)
        params = {**self._params, **extra_params} if extra_params else self._params
        attempt = _Attempt()
        marker = _ATTEMPT.set(attempt)
        pool.active += 1
        try:
            with _map_exceptions(attempt, device_id):
                async with asyncio.timeout(limit):
                    async with pool.session.request(method, self.url + path, params=params, data=body,
                                                    headers=all_headers, allow_redirects=False) as resp:
                        attempt.phase = "answered"
                        status = resp.status
                        data = await self._read(resp, BODY_LIMIT if status >= 300 else self.max_body)
                        resp_headers = resp.headers
        finally:
            _ATTEMPT.reset(marker)
            pool.active -= 1
            if pool.retired and pool.active == 0 and not pool.session.closed:
                await pool.session.close()
        if data is None:
            raise make_error(_PROTOCOL, transport="http", device_id=device_id, exact=False,
                             native={"status": status},
                             message=f"a {status} answer's body exceeds the {self.max_body}-byte limit")
        err = translate(status, resp_headers, data, now=self._clock())
        if err is not None:
            err.device_id = device_id
            raise err
        return status, resp_headers, data

    @staticmethod
    async def _read(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
        """The body, at most ``limit`` bytes. Beyond it: an error body is cut (the socket is dropped
        rather than drained), a success body is refused (None)."""
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = await resp.content.read(min(_CHUNK, limit + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                resp.close()
                if resp.status < 300:
                    return None
                return b"".join(chunks)[:limit]


@contextlib.contextmanager
def _map_exceptions(attempt: _Attempt, device_id: str) -> Iterator[None]:
    """The adapter's one place where library and socket exceptions become IoTHubErrors.

    The phase the request reached decides between "nothing went out" and "outcome unknown", the way
    httpx tells ConnectTimeout from ReadTimeout: see the module docstring.
    """
    try:
        yield
    except IoTHubError:
        raise
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise _classify(exc, attempt.phase, device_id) from exc


def _classify(exc: BaseException, phase: Phase, device_id: str) -> IoTHubError:
    err = normalize(exc, transport="http", device_id=device_id)
    timed_out = isinstance(exc, TimeoutError)  # asyncio's deadline and aiohttp's connect timeout alike
    err.native["phase"] = phase
    if timed_out:
        err.native["timeout"] = "connect" if phase == "connect" else "read"
    if phase != "connect" or (err.action is not Action.RECONNECT and err.code != _TIMED_OUT):
        return err
    # Nothing was handed to a socket: the hub cannot have seen this request.
    what = "timed out getting a connection" if timed_out else err.message
    return _rebuild(_NOT_CONNECTED, err, exc, f"nothing was sent: {what}")


def _rebuild(code: int, err: IoTHubError, exc: BaseException, message: str) -> IoTHubError:
    native = {**err.native, "cause_code": err.code}
    out = make_error(code, transport="http", device_id=err.device_id, exact=False, native=native, message=message)
    out.__cause__ = exc
    return out


def _c2d_message(device_id: str, headers: Mapping[str, str], body: bytes) -> C2DMessage:
    """A received message from the answer's headers (the hub's, so parsed defensively)."""
    etag = (headers.get("ETag") or "").strip().strip('"')
    if not etag:
        raise make_error(_PROTOCOL, transport="http", device_id=device_id, exact=False,
                         message="a cloud-to-device message came without an ETag lock")
    props = {k[len(_APP_PREFIX):]: v for k, v in headers.items() if k.lower().startswith(_APP_PREFIX)}
    count = headers.get("iothub-deliverycount", "0").strip()
    # isdigit() alone admits "²" and 5,000-digit numbers, on which int() raises: a count is a small number
    delivery_count = int(count) if count.isascii() and count.isdigit() and len(count) <= 9 else 0
    return C2DMessage(device_id, etag, headers.get("iothub-messageid"), body, props, delivery_count,
                      headers.get("iothub-correlationid"), headers.get("iothub-contenttype"),
                      headers.get("iothub-contentencoding"))


def _seg(value: str) -> str:
    return quote(value, safe="")


def _check_headers(headers: Mapping[str, str], device_id: str) -> None:
    """Refuse what would corrupt the request (CR/LF injection, a name that is not a token) up front."""
    for key, value in headers.items():
        if key in _GOOD_NAMES and isinstance(value, str) and value.isascii() and value.isprintable():
            continue  # the usual case, decided without a regex
        ok = isinstance(value, str) and not any(c in value for c in "\r\n\0") and _TOKEN.fullmatch(key) is not None
        if ok:
            try:
                value.encode("latin-1")
            except UnicodeEncodeError:
                ok = False
        if not ok:
            raise make_error(_ARGUMENT, transport="http", device_id=device_id,
                             message=f"property {key!r} cannot be sent as an HTTP header")
        if len(_GOOD_NAMES) < 4096:
            _GOOD_NAMES.add(key)


def _json_object(body: bytes, device_id: str) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except ValueError as exc:
        err = make_error(_PROTOCOL, transport="http", device_id=device_id, exact=False,
                         message=f"the hub's answer is not JSON: {exc}")
        err.__cause__ = exc
        raise err from exc
    if not isinstance(parsed, dict):
        raise make_error(_PROTOCOL, transport="http", device_id=device_id, exact=False,
                         message="the hub's answer is not a JSON object")
    return parsed
