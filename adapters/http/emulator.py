"""The emulated hub's HTTP front: IoT Hub's device and service REST endpoints on an aiohttp server.

It plays the calls a gateway makes (telemetry, cloud-to-device receive and settle, twin read, the
service's desired-property update, direct method invocation), authenticates with SAS tokens through
:class:`~gateway.emulator.Hub`, and answers whatever the shared :class:`~gateway.emulator.FaultPlan`
scripts. Error answers are rendered from the catalog (:func:`render`) in every body form IoT Hub uses,
so a client meets the same variety it meets in production; ``tests/adapters/test_http_emulator.py``
proves each form translates back to its code.

aiohttp is imported here at module level: this module is the I/O side and is never imported by
``import adapters.http``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import WSMsgType, web

from gateway.codes import CodeInfo, code_of, lookup
from gateway.emulator.faults import Fault, FaultKind, Operation
from gateway.emulator.front import FrontConfig
from gateway.emulator.hub import C2DFeedback, Hub, QueuedC2D, Received, Settlement, twin_etag
from gateway.sas import parse_sas_token, verify_sas_token

__all__ = ["CHAOS_FORMS", "FORMS", "HttpFront", "Rendered", "render"]

log = logging.getLogger(__name__)

#: IoT Hub's own error body forms (as the C# SDK's HTTP error parsers and their tests read them): the
#: legacy ``ErrorCode:<Name>;`` message, the code object nested in ``Message``, the same object
#: double-escaped into a string, the object at the top level, and no body at all with the name in the
#: ``iothub-errorcode`` header.
FORMS: Final = ("legacy", "nested", "escaped", "top", "header")
#: Hostile bodies no healthy hub sends, for testing clients: JSON cut off mid-way with invalid UTF-8,
#: an HTML page (what a proxy answers), and an endless body that starts with the code.
CHAOS_FORMS: Final = ("malformed", "html", "huge")

_NOT_FOUND = code_of("DeviceNotFound")
_NOT_ONLINE = code_of("DeviceNotOnline")
_GATEWAY_TIMEOUT = code_of("GatewayTimeout")
_EXPIRED = code_of("IotHubUnauthorized")
_UNAUTHORIZED = code_of("IotHubUnauthorizedAccess")
_LOCK_LOST = code_of("DeviceMessageLockLost")
_PRECONDITION = code_of("PreconditionFailed")
_TOO_LARGE = code_of("MessageTooLarge")
_BAD_ARGUMENT = code_of("ArgumentInvalid")
_DEVICE_EXISTS = code_of("DeviceAlreadyExists")
_MAX_FEEDBACK_LOCKS: Final = 100  #: feedback batches held under a lock at once

_NO_BODY_STATUSES: Final = frozenset({204, 304})  # HTTP forbids a body: only the header form fits
_MAX_TELEMETRY: Final = 256 * 1024  # IoT Hub's device-to-cloud message limit
_HUGE_CHUNK: Final = b" " * 65536
_HUGE_CAP: Final = 1 << 30  # an endless body still ends somewhere if the client never hangs up
#: IoT Hub's system-property headers on device telemetry, and the MQTT names the hub records them under
_SYSTEM_HEADERS = (("iothub-contenttype", "$.ct"), ("iothub-contentencoding", "$.ce"),
                   ("iothub-correlationid", "$.cid"), ("iothub-creation-time-utc", "$.ctime"))
_APP_PREFIX: Final = "iothub-app-"
_WS_PROTOCOLS: Final = {"mqtt": "mqtt", "AMQPWSB10": "amqp"}  # WebSocket subprotocol -> front


@dataclass(frozen=True)
class Rendered:
    """An error response: status, headers, body (None for the header form and the endless body)."""

    status: int
    headers: dict[str, str]
    body: bytes | None
    endless: bool = False  #: stream ``body`` as a prefix and then filler until the client hangs up


def _tracking(now: float) -> str:
    stamp = time.strftime("%m/%d/%Y %H:%M:%S", time.gmtime(now))
    return f"{uuid.uuid4().hex}-G:0-TimeStamp:{stamp}"


def render(
    code: int,
    form: str = "legacy",
    *,
    message: str | None = None,
    tracking_id: str | None = None,
    retry_after: float | None = None,
    retry_style: str = "seconds",
    now: float | None = None,
) -> Rendered:
    """``code`` as IoT Hub would put it on the wire in ``form``; status and name come from the catalog.

    A code with no HTTP form of its own (``http_status`` None, e.g. DeviceMessageLockLost) is sent with
    its family status, as the hub does. ``retry_after`` becomes ``Retry-After`` (whole seconds, or an
    HTTP date when ``retry_style`` is ``"date"``) or ``x-ms-retry-after-ms`` for a fraction of a second
    or ``retry_style="ms"``. Raises ``ValueError`` for an unknown form or a non-code.
    """
    info: CodeInfo = lookup(code)
    if form not in FORMS and form not in CHAOS_FORMS:
        raise ValueError(f"unknown HTTP error form {form!r}; expected one of {FORMS + CHAOS_FORMS}")
    when = time.time() if now is None else now
    status = info.http_status or info.code // 1000
    text = message or info.description
    track = tracking_id or _tracking(when)
    # The legacy form names the code; a code the catalog does not list goes by its digits.
    name = info.name if info.known else str(info.code)
    headers: dict[str, str] = {}
    obj = {"errorCode": info.code, "trackingId": track, "message": text, "timestampUtc": _iso(when)}
    body: bytes | None
    endless = False
    if status in _NO_BODY_STATUSES or form == "header":
        headers["iothub-errorcode"] = name
        body = None
    elif form == "legacy":
        body = _json({"Message": f"ErrorCode:{name};{text}", "ExceptionMessage": f"Tracking ID:{track}"})
    elif form == "nested":
        body = _json({"Message": obj, "ExceptionMessage": ""})
    elif form == "escaped":
        body = _json({"Message": json.dumps(obj, separators=(",", ":")), "ExceptionMessage": ""})
    elif form == "top":
        body = _json(obj)
    elif form == "malformed":
        legacy = _json({"Message": f"ErrorCode:{name};{text}", "ExceptionMessage": f"Tracking ID:{track}"})
        body = legacy[: legacy.index(b";") + 6] + b"\xff\xfe\x00{{{"
    elif form == "html":
        body = f"<html><body><h1>{status}</h1><p>errorCode: {info.code}</p></body></html>".encode()
    else:  # huge
        body = b'{"errorCode":' + str(info.code).encode() + b',"message":"'
        endless = True
    if body is not None and form not in ("html", "malformed"):
        headers["Content-Type"] = "application/json; charset=utf-8"
    if retry_after is not None:
        headers.update(_retry_headers(retry_after, retry_style, when))
    return Rendered(status, headers, body, endless)


def _retry_headers(delay: float, style: str, now: float) -> dict[str, str]:
    if style == "date":
        return {"Retry-After": email.utils.formatdate(now + delay, usegmt=True)}
    if style == "ms" or not float(delay).is_integer():
        return {"x-ms-retry-after-ms": str(math.ceil(delay * 1000))}
    return {"Retry-After": str(int(delay))}


def _iso(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass
class _ServiceKey:
    policy: str
    key: str


@dataclass
class Stats:
    """What the front answered, for tests that assert on the far end's view."""

    requests: int = 0
    by_status: dict[int, int] = field(default_factory=dict)


class HttpFront:
    """The HTTP face of an emulated :class:`~gateway.emulator.Hub`.

    ``default_form`` is the body form of errors whose fault names none (and of the front's own
    answers: auth failures, unknown devices, offline method targets); ``"escaped"`` (the numeric code
    as JSON inside ``Message``) is what IoT Hub answers today (azure-iot-cli-extension #54,
    azure-iot-sdk-java #640). ``retry_style`` is how a fault's ``retry_after`` is written. ``clock`` is
    the hub's wall clock (SAS expiry, C2D lock expiry), so a test can expire a lock without waiting a
    minute. ``service_key`` signs service calls (direct methods) under ``service_policy``; one is made
    up when not given (see :attr:`service_connection_string`).
    """

    transport = "http"

    def __init__(
        self,
        hub: Hub,
        config: FrontConfig = FrontConfig(),  # noqa: B008 - frozen dataclass, safe as a default
        *,
        default_form: str = "escaped",
        retry_style: str = "seconds",
        c2d_lock_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
        service_key: str | None = None,
        service_policy: str | None = None,
        websocket_ports: Mapping[str, int] | None = None,
    ) -> None:
        if default_form not in FORMS and default_form not in CHAOS_FORMS:
            raise ValueError(f"unknown HTTP error form {default_form!r}")
        self.hub = hub
        self.config = config
        self.default_form = default_form
        self.retry_style = retry_style
        self.c2d_lock_seconds = c2d_lock_seconds
        self.clock = clock
        # the hub's own iothubowner key (random unless the hub was given one), or an override
        self._service = _ServiceKey(service_policy or hub.service_policy, service_key or hub.service_key)
        self.stats = Stats()
        #: MQTT / AMQP over WebSockets on ``/$iothub/websocket``: the plain loopback port each frame is
        #: piped to, by protocol ("mqtt", "amqp"); filled by ``start_fronts`` once those fronts run
        self.websocket_ports: dict[str, int] = dict(websocket_ports or {})
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._stopping = asyncio.Event()
        #: feedback batches handed to a service receiver, by lock token, until completed or abandoned
        self._feedback_locks: dict[str, list[C2DFeedback]] = {}

    # -- Front -----------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """Where to point a client: ``http(s)://host:port``."""
        scheme = "https" if self.config.ssl_context is not None else "http"
        return f"{scheme}://{self.config.host}:{self._port}"

    @property
    def service_connection_string(self) -> str:
        """A service (policy) connection string the front accepts for direct method calls."""
        svc = self._service
        return f"HostName={self.hub.host_name};SharedAccessKeyName={svc.policy};SharedAccessKey={svc.key}"

    async def start(self) -> None:
        if self._runner is not None:
            return
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=4 * _MAX_TELEMETRY)
        app.router.add_post("/devices/{device}/messages/events", self._telemetry)
        app.router.add_get("/devices/{device}/messages/deviceBound", self._c2d_receive)
        app.router.add_delete("/devices/{device}/messages/deviceBound/{etag}", self._c2d_settle)
        app.router.add_post("/devices/{device}/messages/deviceBound/{etag}/abandon", self._c2d_abandon)
        app.router.add_get("/twins/{device}", self._twin_get)
        app.router.add_patch("/twins/{device}", self._twin_update)
        app.router.add_post("/twins/{device}/methods", self._method)
        app.router.add_get("/$iothub/websocket", self._websocket)
        app.router.add_get("/messages/serviceBound/feedback", self._feedback_receive)
        app.router.add_delete("/messages/serviceBound/feedback/{token}", self._feedback_settle)
        app.router.add_post("/messages/serviceBound/feedback/{token}/abandon", self._feedback_settle)
        app.router.add_get("/devices", self._registry_list)
        app.router.add_get("/devices/{device}", self._registry_get)
        app.router.add_put("/devices/{device}", self._registry_put)
        app.router.add_delete("/devices/{device}", self._registry_delete)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port, ssl_context=self.config.ssl_context)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        address = runner.addresses[0]
        self._port = int(address[1])

    async def stop(self) -> None:
        runner = self._runner
        if runner is None:
            return
        self._runner = None
        self._stopping.set()  # wake handlers held by DELAY / NO_ACK so shutdown does not wait on them
        await self.drop_all(runner)
        await runner.cleanup()

    async def drop_all(self, runner: web.AppRunner | None = None) -> None:
        runner = runner or self._runner
        server = runner.server if runner is not None else None
        if server is None:
            return
        for conn in list(server.connections):
            transport = conn.transport
            if transport is not None:
                transport.abort()

    # -- C2D (the hub side a service would drive) ------------------------------------------------

    def enqueue_c2d(self, device_id: str, body: bytes, message_id: str | None = None) -> str:
        """Queue a cloud-to-device message for ``device_id`` (``Hub.send_c2d``); returns its message id."""
        if self.hub.device(device_id) is None:
            raise KeyError(f"no device {device_id!r} in the hub")
        return self.hub.send_c2d(device_id, body, message_id=message_id)

    # -- helpers -----------------------------------------------------------------------------------

    def error(self, code: int, form: str | None = None, *, retry_after: float | None = None,
              message: str | None = None) -> web.StreamResponse:
        """An error answer for ``code`` in ``form`` (default: the front's)."""
        rendered = render(code, form or self.default_form, message=message, retry_after=retry_after,
                          retry_style=self.retry_style, now=self.clock())
        if rendered.endless:
            raise _Endless(rendered)
        return self._count(web.Response(status=rendered.status, headers=rendered.headers, body=rendered.body))

    def _count(self, resp: web.StreamResponse) -> web.StreamResponse:
        self.stats.requests += 1
        self.stats.by_status[resp.status] = self.stats.by_status.get(resp.status, 0) + 1
        return resp

    def _auth_device(self, request: web.Request, device_id: str) -> web.StreamResponse | None:
        token = request.headers.get("Authorization")
        why = self.hub.authenticate(device_id, token, self.clock())
        if why is None:
            return None
        if why == "unknown":
            return self.error(_NOT_FOUND, message=f"Device {device_id} not registered")
        if why == "expired":
            return self.error(_EXPIRED, message="SAS token expired")
        return self.error(_UNAUTHORIZED, message=f"Unauthorized ({why})")

    def _auth_service(self, request: web.Request) -> web.StreamResponse | None:
        token = request.headers.get("Authorization") or ""
        try:
            parsed = parse_sas_token(token)
        except ValueError:
            return self.error(_UNAUTHORIZED, message="Unauthorized (malformed)")
        if parsed.key_name != self._service.policy:
            return self.error(_UNAUTHORIZED, message="Unauthorized (unknown policy)")
        why = verify_sas_token(token, self.hub.host_name, self._service.key, self.clock())
        if why == "expired":
            return self.error(_EXPIRED, message="SAS token expired")
        if why is not None:
            return self.error(_UNAUTHORIZED, message=f"Unauthorized ({why})")
        return None

    async def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds``; False when the front is stopping first (the answer is then abandoned)."""
        if seconds <= 0:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
            return False
        return True

    async def _apply(self, request: web.Request, device_id: str, operation: Operation,
                     work: Callable[[], web.StreamResponse | None] | None = None,
                     answer: Callable[[], web.StreamResponse] | None = None, *,
                     properties: Mapping[str, str] | None = None, body: bytes | None = None) -> web.StreamResponse:
        """Run the fault plan around one operation: error, delay, drop or no-ack, else ``work``/``answer``.

        ``work`` is the operation's effect (recording telemetry, locking a message); a DROP or NO_ACK
        fault happens after it, as when the hub acted but its answer never arrived.
        """
        fault = self.hub.plan.take(device_id, operation, "http", properties=properties, body=body)
        try:
            return await self._faulted(request, fault, work, answer)
        except _Endless as endless:
            return await self._stream_endless(request, endless.rendered)

    async def _faulted(self, request: web.Request, fault: Fault | None,
                       work: Callable[[], web.StreamResponse | None] | None,
                       answer: Callable[[], web.StreamResponse] | None) -> web.StreamResponse:
        if fault is not None and fault.kind is FaultKind.ERROR:
            assert fault.code is not None
            return self.error(fault.code, fault.form, retry_after=fault.retry_after)
        if fault is not None and fault.kind is FaultKind.DELAY and not await self._pause(fault.delay):
            return await self._abandon(request)
        early = work() if work is not None else None
        if early is not None:
            return early
        if fault is not None and fault.kind is FaultKind.DROP:
            return await self._drop(request)
        if fault is not None and fault.kind in (FaultKind.NO_ACK, FaultKind.STALL):  # HTTP: a stall never answers
            await self._stopping.wait()
            return await self._abandon(request)
        return self._count(answer() if answer is not None else web.Response(status=204))

    async def _drop(self, request: web.Request) -> web.StreamResponse:
        """Start a 200 answer, send part of its body, and hang up: a reset mid-body as the client sees it."""
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.content_length = 4096
        await resp.prepare(request)
        await resp.write(b'{"partial":"')
        transport = request.transport
        if transport is not None:
            transport.close()
        self.stats.requests += 1
        return resp

    async def _abandon(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            transport.abort()
        return web.Response(status=503)  # never reaches the client: the socket is gone

    async def _stream_endless(self, request: web.Request, rendered: Rendered) -> web.StreamResponse:
        resp = web.StreamResponse(status=rendered.status, headers=rendered.headers)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent = 0
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write(rendered.body or b"")
            while sent < _HUGE_CAP and not self._stopping.is_set():
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                await resp.write(_HUGE_CHUNK)
                sent += len(_HUGE_CHUNK)
        self.stats.requests += 1
        return resp

    def _device(self, device_id: str) -> web.StreamResponse | None:
        if self.hub.device(device_id) is None:
            return self.error(_NOT_FOUND, message=f"Device {device_id} not registered")
        return None

    # -- endpoints ---------------------------------------------------------------------------------

    async def _telemetry(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info["device"]
        refused = self._auth_device(request, device_id)
        if refused is not None:
            return refused
        body = await request.read()
        if len(body) > _MAX_TELEMETRY:
            return self.error(_TOO_LARGE, message=f"Message size {len(body)} exceeds {_MAX_TELEMETRY} bytes")
        props = {k[len(_APP_PREFIX):]: v for k, v in request.headers.items() if k.lower().startswith(_APP_PREFIX)}
        message_id = request.headers.get("iothub-messageid")
        system = {name: request.headers[header] for header, name in _SYSTEM_HEADERS if header in request.headers}

        def work() -> None:
            self.hub.record(Received(device_id, message_id, body, "http", props, system=system))

        return await self._apply(request, device_id, Operation.TELEMETRY, work, properties=props, body=body)

    async def _c2d_receive(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info["device"]
        refused = self._auth_device(request, device_id)
        if refused is not None:
            return refused
        locked: list[QueuedC2D] = []

        def work() -> None:
            entry = self.hub.lock_c2d(device_id, self.c2d_lock_seconds, self.clock())
            if entry is not None:
                locked.append(entry)

        def answer() -> web.StreamResponse:
            if not locked:
                return web.Response(status=204)
            entry = locked[0]
            headers = {"ETag": f'"{entry.lock_token}"', "iothub-messageid": entry.message_id,
                       "iothub-deliverycount": str(entry.delivery_count - 1), "iothub-to": f"/devices/{device_id}",
                       "iothub-ack": entry.ack}
            if entry.correlation_id:
                headers["iothub-correlationid"] = entry.correlation_id
            headers.update({f"{_APP_PREFIX}{k}": v for k, v in entry.properties.items()})
            return web.Response(status=200, body=entry.body, headers=headers)

        return await self._apply(request, device_id, Operation.C2D_RECEIVE, work, answer)

    def _settle(self, device_id: str, etag: str, outcome: Settlement) -> web.StreamResponse | None:
        why = self.hub.settle_c2d(device_id, etag.strip('"'), outcome, self.clock())
        if why == "lost":
            return self.error(_LOCK_LOST, message="The message lock expired before it was settled")
        if why is not None:
            return self.error(_PRECONDITION, message=f"No locked message with etag {etag}")
        return None

    async def _c2d_settle(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info["device"]
        refused = self._auth_device(request, device_id)
        if refused is not None:
            return refused
        outcome: Settlement = "reject" if "reject" in request.query else "complete"  # reject dead-letters it

        def work() -> web.StreamResponse | None:
            return self._settle(device_id, request.match_info["etag"], outcome)

        return await self._apply(request, device_id, Operation.C2D_SETTLE, work)

    async def _c2d_abandon(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info["device"]
        refused = self._auth_device(request, device_id)
        if refused is not None:
            return refused

        def work() -> web.StreamResponse | None:
            return self._settle(device_id, request.match_info["etag"], "abandon")

        return await self._apply(request, device_id, Operation.C2D_SETTLE, work)

    async def _twin_get(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info["device"]
        # Either the device's own token or a service token may read the twin.
        refused = self._auth_device(request, device_id)
        if refused is not None and self._auth_service(request) is None:
            refused = self._device(device_id)
        if refused is not None:
            return refused

        return await self._apply(request, device_id, Operation.TWIN_GET, None, lambda: self._twin_answer(device_id))

    def _twin_answer(self, device_id: str) -> web.StreamResponse:
        return web.json_response(self.hub.service_twin(device_id))

    async def _twin_update(self, request: web.Request) -> web.StreamResponse:
        """The service's twin patch: desired properties merged, the connected device told (``Hub``)."""
        device_id = request.match_info["device"]
        refused = self._auth_service(request) or self._device(device_id)
        if refused is not None:
            return refused
        try:
            body = json.loads(await request.read())
            desired = body.get("properties", {}).get("desired", {}) if isinstance(body, dict) else None
            if not isinstance(desired, dict):
                raise ValueError("properties.desired is not an object")
        except (ValueError, TypeError, AttributeError):
            return self.error(_BAD_ARGUMENT, message="Invalid twin patch body")
        expected = (request.headers.get("If-Match") or "*").strip()
        expected = expected.removeprefix("W/").strip('"')

        def work() -> web.StreamResponse | None:
            device = self.hub.device(device_id)
            assert device is not None
            if expected != "*" and expected != twin_etag(device.twin_version):
                return self.error(_PRECONDITION, message=f"Twin etag {expected} does not match")
            self.hub.update_desired(device_id, desired)
            return None

        return await self._apply(request, device_id, Operation.TWIN_PATCH, work,
                                 lambda: self._twin_answer(device_id))

    async def _method(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info["device"]
        refused = self._auth_service(request) or self._device(device_id)
        if refused is not None:
            return refused
        try:
            call = json.loads(await request.read())
            if not isinstance(call, Mapping) or not isinstance(call.get("methodName"), str):
                raise ValueError("methodName missing")
            wait = float(call.get("responseTimeoutInSeconds", 30))
            if not 0 < wait <= 300:
                raise ValueError("responseTimeoutInSeconds out of range")
        except (ValueError, TypeError):
            return self.error(_BAD_ARGUMENT, message="Invalid method invocation body")
        fault = self.hub.plan.take(device_id, Operation.METHOD, "http")
        if fault is not None and fault.kind is not FaultKind.DELAY:
            try:
                return await self._faulted(request, fault, None, None)
            except _Endless as endless:
                return await self._stream_endless(request, endless.rendered)
        if fault is not None and not await self._pause(fault.delay):
            return await self._abandon(request)
        invoker = self.hub.method_invoker(device_id)
        if invoker is None:
            return self.error(_NOT_ONLINE, message=f"Device {device_id} is not online")
        try:
            async with asyncio.timeout(wait):
                status, payload = await invoker(call["methodName"], call.get("payload"), wait)
        except TimeoutError:
            return self.error(_GATEWAY_TIMEOUT, message=f"Timed out waiting for device {device_id} to respond")
        except ConnectionError:  # its method channel closed under the call: not online for methods
            return self.error(_NOT_ONLINE, message=f"Device {device_id} is not subscribed to methods")
        return self._count(web.json_response({"status": status, "payload": payload}))


    # -- MQTT and AMQP over WebSockets ------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        """IoT Hub's port-443 path for MQTT (subprotocol ``mqtt``) and AMQP (``AMQPWSB10``): binary
        frames piped to that front, which authenticates as on its own port."""
        ws = web.WebSocketResponse(protocols=tuple(_WS_PROTOCOLS), max_msg_size=4 * _MAX_TELEMETRY)
        await ws.prepare(request)
        port = self.websocket_ports.get(_WS_PROTOCOLS.get(ws.ws_protocol or "", ""), 0)
        if not port:
            await ws.close(code=1002, message=b"subprotocol mqtt or AMQPWSB10 expected")
            return ws
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await ws.close(code=1011, message=b"front unavailable")
            return ws

        async def upstream() -> None:
            try:
                async for msg in ws:
                    if msg.type is WSMsgType.BINARY:
                        writer.write(msg.data)
                        await writer.drain()
                    elif msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                        break
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def downstream() -> None:
            try:
                while data := await reader.read(65536):
                    await ws.send_bytes(data)
            except (ConnectionError, OSError, RuntimeError):
                pass
            finally:
                await ws.close()

        await asyncio.gather(upstream(), downstream())
        return ws

    # -- C2D feedback (service): what azure-iot-hub's IoTHubHttpRuntimeManager reads -----------------

    async def _feedback_receive(self, request: web.Request) -> web.StreamResponse:
        """One batch of feedback records, locked under the ``ETag`` token; 204 when there is none."""
        refused = self._auth_service(request)
        if refused is not None:
            return refused
        records = self.hub.take_feedback()
        if not records:
            return self._count(web.Response(status=204))
        while len(self._feedback_locks) >= _MAX_FEEDBACK_LOCKS:  # bounded: the oldest lock is given back
            self.hub.return_feedback(self._feedback_locks.pop(next(iter(self._feedback_locks))))
        token = str(uuid.uuid4())
        self._feedback_locks[token] = records
        body = [{"originalMessageId": r.message_id, "description": r.description, "deviceId": r.device_id,
                 "deviceGenerationId": "", "enqueuedTimeUtc": r.at, "statusCode": r.status} for r in records]
        return self._count(web.Response(status=200, body=json.dumps(body).encode(),
                                        content_type="application/vnd.microsoft.iothub.feedback.json",
                                        headers={"ETag": f'"{token}"', "iothub-messagelocktoken": token}))

    async def _feedback_settle(self, request: web.Request) -> web.StreamResponse:
        """DELETE completes a batch, POST ``.../abandon`` gives it back; an unknown lock is 412."""
        refused = self._auth_service(request)
        if refused is not None:
            return refused
        records = self._feedback_locks.pop(request.match_info["token"].strip('"'), None)
        if records is None:
            return self.error(_LOCK_LOST)
        if request.method == "POST":
            self.hub.return_feedback(records)
        return self._count(web.Response(status=204))

    # -- registry (service) -----------------------------------------------------------------------

    async def _registry_get(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info["device"]
        refused = self._auth_service(request) or self._device(device_id)
        if refused is not None:
            return refused
        return self._count(web.json_response(self.hub.registry_entry(device_id)))

    async def _registry_list(self, request: web.Request) -> web.StreamResponse:
        refused = self._auth_service(request)
        if refused is not None:
            return refused
        try:
            top = min(max(int(request.query.get("top", "1000")), 1), 1000)
        except ValueError:
            return self.error(_BAD_ARGUMENT, message="top must be a number")
        entries = [self.hub.registry_entry(d.device_id) for d in self.hub.devices()[:top]]
        return self._count(web.json_response(entries))

    async def _registry_put(self, request: web.Request) -> web.StreamResponse:
        """Create a device (or update its status/keys); an ``If-Match`` etag must match an existing one."""
        device_id = request.match_info["device"]
        refused = self._auth_service(request)
        if refused is not None:
            return refused
        try:
            body = json.loads(await request.read() or b"{}")
            if not isinstance(body, dict) or body.get("deviceId", device_id) != device_id:
                raise ValueError("deviceId does not match the path")
            keys = ((body.get("authentication") or {}).get("symmetricKey") or {})
            status = body.get("status", "enabled")
            if status not in ("enabled", "disabled"):
                raise ValueError("status must be enabled or disabled")
        except (ValueError, TypeError, AttributeError) as exc:
            return self.error(_BAD_ARGUMENT, message=f"Invalid device body: {exc}")
        existing = self.hub.device(device_id)
        if_match = (request.headers.get("If-Match") or "").strip().removeprefix("W/").strip('"')
        if existing is not None and not if_match:
            return self.error(_DEVICE_EXISTS, message=f"A device with ID '{device_id}' is already registered")
        if existing is not None and if_match not in ("*", existing.etag):
            return self.error(_PRECONDITION, message="Device etag does not match")
        device = existing or self.hub.add_device(device_id, keys.get("primaryKey") or None,
                                                 secondary_key=keys.get("secondaryKey") or None)
        if existing is not None:
            device.key = keys.get("primaryKey") or device.key
            device.secondary_key = keys.get("secondaryKey") or device.secondary_key
            device.etag = base64.b64encode(uuid.uuid4().bytes[:8]).decode()
        device.enabled = status == "enabled"
        return self._count(web.json_response(self.hub.registry_entry(device_id)))

    async def _registry_delete(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info["device"]
        refused = self._auth_service(request) or self._device(device_id)
        if refused is not None:
            return refused
        self.hub.remove_device(device_id)
        return self._count(web.Response(status=204))


class _Endless(Exception):
    """Raised by :meth:`HttpFront.error` for the endless form, which needs the request to stream."""

    def __init__(self, rendered: Rendered) -> None:
        super().__init__("endless body")
        self.rendered = rendered


async def serve(hub: Hub, config: FrontConfig = FrontConfig(), **kwargs: Any) -> HttpFront:  # noqa: B008
    """Start an :class:`HttpFront` and return it (stop it with ``await front.stop()``)."""
    front = HttpFront(hub, config, **kwargs)
    await front.start()
    return front
