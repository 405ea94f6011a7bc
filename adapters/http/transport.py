"""The HTTP adapter: IoT Hub's device and service REST calls over aiohttp, every failure an IoTHubError.

What a gateway does over HTTPS: device telemetry, cloud-to-device receive and settle (the ETag lock),
twin read, the service's desired-property update, and the service-side direct method call whose
DeviceNotOnline / GatewayTimeout answers are the offline signals the handler holds work on. Like every
adapter it never retries or sleeps between attempts: a response becomes an error through
:func:`adapters.http.translate` (status, headers, body) and anything below HTTP through
:func:`gateway.normalize`, and the handler decides what happens next.

HTTP has no connection to keep: ``connect()`` opens the adapter's one ``ClientSession`` (its pool of
keep-alive sockets) without contacting the hub, and ``close()`` closes it. ``events()`` yields only what
the adapter is asked to watch: cloud-to-device messages when ``c2d_poll_interval`` is set, and
:class:`~gateway.transport.DeviceOnline` for a device a direct method found offline, learnt by polling
its twin's ``connectionState`` every ``presence_interval`` (needs the service credential). With nothing
to watch it simply waits until ``close()``.

aiohttp is imported when this module is, never by ``import adapters.http``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl as _ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

import aiohttp

from adapters.http.translate import BODY_LIMIT, translate
from gateway.codes import Action, code_of
from gateway.errors import IoTHubError, make_error
from gateway.normalize import normalize
from gateway.sas import ConnectionString, ServiceCredential
from gateway.transport import DeviceOnline, Disconnected, Inbound, Message, TransportEvent

__all__ = ["C2DMessage", "HttpTransport", "MethodResult", "ServiceCredential"]

log = logging.getLogger(__name__)

API_VERSION: Final = "2021-04-12"

_NOT_CONNECTED = code_of("NotConnected")
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


@dataclass(frozen=True, slots=True)
class C2DMessage:
    """A locked cloud-to-device message; settle it with its ``etag`` before the lock (1 min) expires."""

    device_id: str
    etag: str
    message_id: str | None
    body: bytes
    properties: Mapping[str, str] = field(default_factory=dict)
    delivery_count: int = 0


@dataclass(frozen=True, slots=True)
class MethodResult:
    """The device's answer to a direct method: its own status and payload (not a hub error)."""

    status: int
    payload: Any


class _Token:
    """A SAS token cached until ``renew_before`` seconds before it expires."""

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
    for direct methods (and used for twin reads of other devices and presence polling). ``endpoint`` is
    where the sockets go (``https://<HostName>`` by default; the emulator's ``http://127.0.0.1:port``
    in tests), ``ssl`` the client TLS context or False. ``timeout`` bounds every call (connect, headers
    and body together); a caller's shorter ``timeout=`` wins. Response bodies are read up to
    ``max_body`` bytes (errors: up to the translator's ``BODY_LIMIT``) and a larger one is cut off,
    never buffered. ``clock`` is the wall clock for token expiry and ``Retry-After`` dates.
    """

    name = "http"

    def __init__(
        self,
        connection_string: str | ConnectionString | None = None,
        *,
        service_connection_string: str | ServiceCredential | None = None,
        endpoint: str | None = None,
        ssl: _ssl.SSLContext | bool = True,
        timeout: float = 30.0,
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
        if timeout <= 0 or token_ttl <= renew_before or max_body < 1:
            raise ValueError("timeout must be positive, token_ttl above renew_before, max_body at least 1")
        self.device = device
        self.service = service
        host = device.host_name if device is not None else service.host_name  # type: ignore[union-attr]
        self.endpoint = (endpoint or f"https://{host}").rstrip("/")
        self.timeout = timeout
        self.max_body = max_body
        self.c2d_poll_interval = c2d_poll_interval
        self.presence_interval = presence_interval
        self._ssl = ssl
        self._limit = connection_limit
        self._params = {"api-version": api_version}
        self._clock = clock
        self._device_token = _Token(device.token, token_ttl, renew_before) if device is not None else None
        self._service_token = _Token(service.token, token_ttl, renew_before) if service is not None else None
        self._session: aiohttp.ClientSession | None = None
        self._closed = asyncio.Event()
        self._wake = asyncio.Event()
        self._watch: set[str] = set()

    # -- Transport ---------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the session (no request is made: HTTP connects per call). Idempotent."""
        if self._session is not None and not self._session.closed:
            return
        connector = aiohttp.TCPConnector(limit=self._limit, ssl=self._ssl)
        # No aiohttp timer: every call runs inside asyncio.timeout (which also bounds the body read).
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              timeout=aiohttp.ClientTimeout(total=None))
        self._closed = asyncio.Event()
        self._wake = asyncio.Event()

    async def close(self) -> None:
        session, self._session = self._session, None
        self._closed.set()
        if session is not None and not session.closed:
            await session.close()

    async def send(self, message: Message) -> None:
        """POST the message as device telemetry; returns once the hub answered 2xx."""
        device_id = message.device_id or self._own_device()
        headers = {"iothub-messageid": message.id, "Content-Type": "application/octet-stream"}
        for key, value in message.properties.items():
            headers[_APP_PREFIX + key] = value
        _check_headers(headers, device_id)
        await self._call("POST", f"/devices/{_seg(device_id)}/messages/events", device_id=device_id,
                         body=message.body, headers=headers)

    async def request(self, kind: str, payload: Any, *, timeout: float) -> Any:
        """``twin_get``, ``twin_update``, ``method``, ``c2d_receive``, ``c2d_complete``, ``c2d_reject``,
        ``c2d_abandon``.

        ``twin_get``: payload a device id or None (this device) -> the twin dict. ``twin_update``
        (service side): a mapping with ``device_id``, ``desired`` and optional ``etag`` -> the updated
        twin dict. ``method``: a mapping
        with ``device_id``, ``method_name``, optional ``payload`` and ``response_timeout`` ->
        :class:`MethodResult`. ``c2d_receive`` -> :class:`C2DMessage` or None; the settle kinds take a
        :class:`C2DMessage` or its etag and return None.
        """
        if kind == "twin_get":
            return await self.get_twin(payload if isinstance(payload, str) else None, timeout=timeout)
        if kind == "twin_update":
            if (not isinstance(payload, Mapping) or not isinstance(payload.get("device_id"), str)
                    or not isinstance(payload.get("desired"), Mapping)
                    or not isinstance(payload.get("etag"), (str, type(None)))):
                raise make_error(_ARGUMENT, transport="http",
                                 message="a twin update needs device_id and a desired mapping (etag optional)")
            return await self.update_twin(payload["device_id"], dict(payload["desired"]), etag=payload.get("etag"),
                                          timeout=timeout)
        if kind == "method":
            if not isinstance(payload, Mapping):
                raise make_error(_ARGUMENT, transport="http", message="a method request needs a mapping payload")
            name = payload.get("method_name", payload.get("methodName"))
            if not isinstance(name, str) or not isinstance(payload.get("device_id"), str):
                raise make_error(_ARGUMENT, transport="http",
                                 message="a method request needs device_id and method_name")
            return await self.invoke_method(
                payload["device_id"], name, payload.get("payload"),
                response_timeout=float(payload.get("response_timeout", payload.get("responseTimeoutInSeconds", 30))),
                timeout=timeout,
            )
        if kind == "c2d_receive":
            return await self.receive_c2d(timeout=timeout)
        settle = {"c2d_complete": self.complete_c2d, "c2d_reject": self.reject_c2d, "c2d_abandon": self.abandon_c2d}
        if kind in settle:
            etag = payload.etag if isinstance(payload, C2DMessage) else payload
            if not isinstance(etag, str):
                raise make_error(_ARGUMENT, transport="http", message=f"{kind} needs an etag or a C2DMessage")
            await settle[kind](etag, timeout=timeout)
            return None
        raise make_error(_INVALID_OPERATION, transport="http", message=f"unknown HTTP request kind {kind!r}")

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
        """The next cloud-to-device message, locked, or None when the queue is empty (204)."""
        device_id = self._own_device()
        status, headers, body = await self._call(
            "GET", f"/devices/{_seg(device_id)}/messages/deviceBound", device_id=device_id, timeout=timeout)
        if status == 204:
            return None
        etag = (headers.get("ETag") or "").strip().strip('"')
        if not etag:
            raise make_error(_PROTOCOL, transport="http", device_id=device_id, exact=False,
                             message="a cloud-to-device message came without an ETag lock")
        props = {k[len(_APP_PREFIX):]: v for k, v in headers.items() if k.lower().startswith(_APP_PREFIX)}
        count = headers.get("iothub-deliverycount", "0")
        return C2DMessage(device_id, etag, headers.get("iothub-messageid"), body, props,
                          int(count) if count.isdigit() else 0)

    async def complete_c2d(self, etag: str, *, timeout: float | None = None) -> None:
        """Complete a received message. A lapsed lock answers DeviceMessageLockLost (or PreconditionFailed)."""
        device_id = self._own_device()
        await self._call("DELETE", f"/devices/{_seg(device_id)}/messages/deviceBound/{_seg(etag)}",
                         device_id=device_id, timeout=timeout)

    async def reject_c2d(self, etag: str, *, timeout: float | None = None) -> None:
        """Reject (dead-letter) a received message."""
        device_id = self._own_device()
        await self._call("DELETE", f"/devices/{_seg(device_id)}/messages/deviceBound/{_seg(etag)}",
                         device_id=device_id, timeout=timeout, extra_params={"reject": ""})

    async def abandon_c2d(self, etag: str, *, timeout: float | None = None) -> None:
        """Give a received message back to the queue for redelivery."""
        device_id = self._own_device()
        await self._call("POST", f"/devices/{_seg(device_id)}/messages/deviceBound/{_seg(etag)}/abandon",
                         device_id=device_id, timeout=timeout)

    # -- twin and methods --------------------------------------------------------------------------

    async def get_twin(self, device_id: str | None = None, *, timeout: float | None = None) -> dict[str, Any]:
        """The device twin (``GET /twins/{id}``); this device's own token, or the service's for others."""
        target = device_id or self._own_device()
        service = self.device is None or target != self.device.device_id
        _, _, body = await self._call("GET", f"/twins/{_seg(target)}", device_id=target, timeout=timeout,
                                      service=service)
        parsed = _json_object(body, target)
        return parsed

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
        body = json.dumps({"methodName": method_name, "responseTimeoutInSeconds": response_timeout,
                           "payload": payload}).encode()
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
        when the hub answers IotHubUnauthorized (401003), and ahead of the returned expiry.
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
        session = self._session
        if session is None or session.closed:
            raise make_error(_NOT_CONNECTED, transport="http", device_id=device_id,
                             message="the HTTP transport is not connected (call connect())")
        limit = self.timeout if timeout is None else (min(self.timeout, timeout) if cap_timeout else timeout)
        all_headers = {"Authorization": self._authorization(service)}
        if headers:
            all_headers.update(headers)
        params = {**self._params, **extra_params} if extra_params else self._params
        try:
            async with asyncio.timeout(limit):
                async with session.request(method, self.endpoint + path, params=params, data=body,
                                           headers=all_headers, allow_redirects=False) as resp:
                    status = resp.status
                    data = await self._read(resp, BODY_LIMIT if status >= 300 else self.max_body)
                    resp_headers = resp.headers
        except IoTHubError:
            raise
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise normalize(exc, transport="http", device_id=device_id) from exc
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
