"""The local API (aiohttp). Routes are listed in ``openapi.json`` next to this file; a test keeps both equal.

The API's own errors are catalog errors too: the body is the error's ``to_dict()`` plus IoT Hub's
``errorCode`` key (and the ``iothub-errorcode`` header), so the package's own HTTP translator reads
them back exactly. That holds for every error the process sends: a bug in a route (500 500001),
malformed JSON at any depth (400 400004), a bad bearer header in any encoding (401 401002), and the
requests aiohttp refuses before routing (see :class:`_CodedErrorHandler`). Every JSON answer, event and
the metrics page pass through the redactor.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from importlib import resources
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp_sse import EventSourceResponse

from gateway.codes import CodeInfo, all_codes, by_name, code_of, family, lookup
from gateway.errors import IoTHubError, make_error
from gateway.outbox import IdTaken, NewMessage, OutboxFull, StorageError
from gateway.sidecar.metrics import CONTENT_TYPE
from gateway.sidecar.security import RateLimiter, token_matches
from gateway.sidecar.service import Sidecar, UnknownDevice
from gateway.sidecar.surface import ORIGIN, DeviceSurface, Subscription
from gateway.sidecar.upstream import rfc3339, storage_view

__all__ = ["API_KEY", "Api", "api_error", "classify", "make_app", "openapi_text", "status_page"]

log = logging.getLogger("gateway.sidecar.api")

_ARGUMENT = code_of("ArgumentInvalid")
_TOO_LARGE = code_of("MessageTooLarge")
_THROTTLED = code_of("ThrottlingException")
_NO_DEVICE = code_of("DeviceNotFound")
_UNAUTHORIZED = code_of("IotHubUnauthorizedAccess")
_SERVER = code_of("ServerError")
_UNAVAILABLE = code_of("ServiceUnavailable")
_MESSAGE_ID = re.compile(r"[\x21-\x7e]{1,128}")
_APP_PREFIX = "iothub-app-"
_MAX_PROPERTIES = 64
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
_SSE_HEARTBEAT = 15.0
_SSE_RETRY_MS = 2000
_PRINTABLE = re.compile(r"[\x20-\x7e]{1,256}")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")
_OUTCOMES = ("complete", "reject", "abandon")
_PAGE_MAX = 1000  #: devices per page of GET /v1/devices (and without ?limit)
#: The routes whose refusals are refused messages (metrics and stats count them; a GET 404 is no message).
#: A refused batch counts once: the guard counts per request.
_MESSAGE_ROUTES = frozenset({"/v1/devices/{device_id}/messages", "/v1/devices/{device_id}/messages/batch",
                             "/v1/dead-letters/{message_id}/replay"})
#: A message's system properties: its field in a batch, its header on the single POST, its stored key
#: (MQTT's name, see gateway/sidecar/upstream.py SYSTEM_KEYS).
_SYSTEM_FIELDS = (("content_type", "Content-Type", "$.ct"), ("content_encoding", "iothub-contentencoding", "$.ce"),
                  ("correlation_id", "iothub-correlationid", "$.cid"),
                  ("creation_time", "iothub-creation-time-utc", "$.ctime"))
_BATCH_KEYS = frozenset({"body", "body_base64", "properties", "message_id", *(f for f, _, _ in _SYSTEM_FIELDS)})
_CODE: web.ResponseKey[int] = web.ResponseKey("iothub_code", int)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


def api_error(code: int | CodeInfo, message: str, *, retry_after: float | None = None,
              redact: Callable[[str], str] = str) -> web.Response:
    """An answer in the catalog's conventions: status from the code, body ``to_dict()`` + ``errorCode``.

    The sidecar's own refusals say ``"transport": "api"``; their ``action`` is what the app should do
    with this request: ``fail`` (fix it, do not retry) unless the code is one to retry (429, 503, 5xx).
    """
    err = make_error(code, transport="http", message=message, retry_after=retry_after, native={"origin": ORIGIN})
    return _error_response(err, redact)


def _error_response(err: IoTHubError, redact: Callable[[str], str]) -> web.Response:
    body = err.to_dict()
    body["errorCode"] = err.code
    if err.native.get("origin") == ORIGIN:  # the sidecar's own answer: no upstream transport involved
        body["transport"] = "api"
        if not err.retryable:
            body["action"] = "fail"
    headers = {"iothub-errorcode": err.name}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    status = err.http_status or err.code // 1000
    response = web.Response(status=status, text=redact(json.dumps(body)), content_type="application/json",
                            headers=headers)
    response[_CODE] = err.code  # read by the guard, which counts refused messages
    return response


class Api:
    """Request handlers bound to one running :class:`Sidecar`."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.redact = sidecar.redactor
        api = sidecar.config.api
        self.limiter = RateLimiter(api.rate_limit, api.rate_burst)
        self.token = api.token.reveal() if api.token is not None else None
        self.max_body = api.max_body
        #: a batch larger than the outbox could never fit: refused as malformed, not 429 forever
        self.max_batch = min(api.max_batch, sidecar.config.outbox.max_messages)
        self.max_batch_body = api.max_batch_body

    # -- helpers ---------------------------------------------------------------------------------------

    def json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(status=status, text=self.redact(json.dumps(data, default=str)),
                            content_type="application/json", headers=headers)

    def error(self, code: int | CodeInfo, message: str, *, retry_after: float | None = None) -> web.Response:
        return api_error(code, message, retry_after=retry_after, redact=self.redact)

    def storage_error(self, exc: StorageError) -> web.Response:
        """The outbox cannot store now: 503 with the storage error's code; the app retries later."""
        return self.error(exc.code, f"the outbox cannot store messages now ({exc.kind}): {exc}", retry_after=1)

    async def body(self, request: web.Request, limit: int | None = None) -> bytes | web.Response:
        """The request's body; 413 past ``limit`` bytes (default ``[api] max_body``), refused by its
        Content-Length or as soon as that much has arrived, never after reading it all. Read from the
        stream, not with ``request.read()``: a batch may be larger than aiohttp's own (single POST) limit."""
        limit = self.max_body if limit is None else limit
        if request.content_length is not None and request.content_length > limit:
            return self.error(_TOO_LARGE, f"the body is {request.content_length} bytes; the limit is {limit}")
        data = bytearray()
        async for chunk in request.content.iter_any():
            data += chunk
            if len(data) > limit:
                return self.error(_TOO_LARGE, f"the body is larger than the limit of {limit} bytes")
        return bytes(data)

    async def json_body(self, request: web.Request) -> dict[str, Any] | web.Response:
        raw = await self.body(request)
        if isinstance(raw, web.Response):
            return raw
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return self.error(_ARGUMENT, f"the body is not valid JSON: {exc}")
        except RecursionError:
            return self.error(_ARGUMENT, "the body is not valid JSON: nested too deeply")
        if not isinstance(data, dict):
            return self.error(_ARGUMENT, "the body must be a JSON object")
        return data

    # -- middlewares -----------------------------------------------------------------------------------

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Rate limit, bearer token, catalog-shaped answers for aiohttp's own errors and for bugs; and the
        count of refused messages: a refusal counts only on a message route (never a GET 404 or a 405)."""
        response = await self._guarded(request, handler)
        if response.status >= 400 and request.method == "POST":
            resource = request.match_info.route.resource
            if resource is not None and resource.canonical in _MESSAGE_ROUTES:
                code = response.get(_CODE)
                self.sidecar.metrics.message("api", "rejected", code)
                self.sidecar.stats.add(request.match_info.get("device_id"), "rejected", code)
        return response

    async def _guarded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in _OPEN_PATHS:
            wait = self.limiter.take(request.remote or "?")
            if wait > 0:
                return self.error(_THROTTLED, "too many requests from this client", retry_after=wait)
            if self.token is not None and not self._authorized(request):
                    # (worded so that the redactor, which hides whatever follows "bearer", leaves it whole)
                    response = self.error(_UNAUTHORIZED, "missing or wrong API token: send it as the header "
                                                         "Authorization with scheme Bearer")
                    response.headers["WWW-Authenticate"] = 'Bearer realm="iothub-gateway"'
                    return response
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return self.error(_TOO_LARGE, f"the body is larger than the limit of {self.max_body} bytes")
        except StorageError as exc:
            return self.storage_error(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            answer = self.error(family(exc.status) if 300 <= exc.status <= 599 else _SERVER, exc.reason)
            if "Allow" in exc.headers:  # 405: say which methods the resource has (RFC 9110)
                answer.headers["Allow"] = exc.headers["Allow"]
            return answer
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return self.error(_SERVER, "internal error in the sidecar; see its log")

    def _authorized(self, request: web.Request) -> bool:
        """The bearer token matches. Any malformed header (non-UTF-8 bytes included) is simply not it."""
        assert self.token is not None
        try:
            header = request.headers.get("Authorization", "")
            scheme, _, presented = header.partition(" ")
            presented = presented.strip()
        except Exception:  # aiohttp decodes headers leniently; nothing here may answer 500
            scheme, presented = "", ""
        matches = token_matches(self.token, presented)  # always compared: no timing hint either way
        return scheme.lower() == "bearer" and matches

    # -- messages --------------------------------------------------------------------------------------

    async def post_message(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info["device_id"]
        refused = self._admission(device_id)
        if refused is not None:
            return refused
        raw = await self.body(request)
        if isinstance(raw, web.Response):
            return raw
        try:
            with _naming("the body"):
                _check_json_body(request.content_type, raw)
            message_id = request.headers.get("iothub-messageid")
            if message_id is not None:
                with _naming("iothub-messageid"):
                    _valid_message_id(message_id)
            with _naming("iothub-app-* headers"):
                properties = _valid_properties((name[len(_APP_PREFIX):], value)
                                               for name, value in request.headers.items()
                                               if name.lower().startswith(_APP_PREFIX))
            system = self._system_properties(request)
        except _Invalid as exc:
            return self.error(exc.code, exc.text())
        ttl = self._ttl(request)
        if isinstance(ttl, web.Response):
            return ttl
        accepted = await self._storing(device_id, self.sidecar.accept(
            device_id, raw, properties=properties, message_id=message_id, ttl=ttl, system=system))
        if isinstance(accepted, web.Response):
            return accepted
        return self.json(accepted, status=202, headers={"Location": f"/v1/messages/{accepted['id']}"})

    async def post_batch(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/devices/{id}/messages/batch``: ``{"messages": [...]}``, validated as a whole (the first
        message and field that breaks a rule is named: 400, or 413 for a body over ``max_body``), then
        stored in ONE outbox write: all or nothing. Each message is answered as the single POST answers it,
        in request order. A refused batch counts once as a refused message (the guard counts per request);
        each newly stored message counts as accepted."""
        device_id = request.match_info["device_id"]
        refused = self._admission(device_id)
        if refused is not None:
            return refused
        ttl = self._ttl(request)
        if isinstance(ttl, web.Response):
            return ttl
        raw = await self.body(request, self.max_batch_body)
        if isinstance(raw, web.Response):
            return raw
        try:
            data = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            return self.error(_ARGUMENT, f"the body is not valid JSON: {exc}")
        except RecursionError:
            return self.error(_ARGUMENT, "the body is not valid JSON: nested too deeply")
        try:
            messages = _batch_messages(data, max_batch=self.max_batch, max_body=self.max_body,
                                       now=rfc3339(self.sidecar.clock()) or "")
        except _Invalid as exc:
            return self.error(exc.code, exc.text())
        accepted = await self._storing(device_id, self.sidecar.accept_many(device_id, messages, ttl=ttl))
        if isinstance(accepted, web.Response):
            return accepted
        return self.json({"messages": accepted}, status=202)

    def _admission(self, device_id: str) -> web.Response | None:
        """Why a POST of messages is refused before its body is read (shutting down, unknown device), if so."""
        if not self.sidecar.accepting:
            return self.error(_UNAVAILABLE, "the sidecar is shutting down; not accepting messages", retry_after=5)
        if self.sidecar.pipeline(device_id) is None:
            return self.error(_NO_DEVICE, f"device {device_id!r} is not configured in this sidecar")
        return None

    def _ttl(self, request: web.Request) -> float | web.Response | None:
        """The query's ``ttl`` (seconds until a message is dead-lettered), None when absent."""
        if "ttl" not in request.query:
            return None
        try:
            ttl = float(request.query["ttl"])
        except ValueError:
            ttl = math.nan
        if not math.isfinite(ttl) or ttl <= 0:
            return self.error(_ARGUMENT, "ttl must be a positive number of seconds")
        return ttl

    async def _storing(self, device_id: str, storing: Awaitable[T]) -> T | web.Response:
        """What the outbox answered, or its refusal as the API's: storage 503, full 429 (Retry-After),
        unknown device 404, a message id taken or reused 400."""
        try:
            return await storing
        except StorageError as exc:
            return self.storage_error(exc)
        except OutboxFull as exc:
            return self.error(_THROTTLED, f"the outbox is full: {exc}", retry_after=1)
        except UnknownDevice:
            return self.error(_NO_DEVICE, f"device {device_id!r} is not configured in this sidecar")
        except IdTaken as exc:
            return self.error(_ARGUMENT, f"messages[{exc.index}].message_id: {exc}")
        except ValueError as exc:
            return self.error(_ARGUMENT, str(exc))

    def _system_properties(self, request: web.Request) -> dict[str, str]:
        """The POST's system properties, stored by their MQTT names: its ``Content-Type`` (as sent),
        ``iothub-contentencoding``, ``iothub-correlationid`` and ``iothub-creation-time-utc`` (RFC 3339;
        the time it is accepted when absent: a message may wait in the outbox for hours). Raises _Invalid."""
        system: dict[str, str] = {}
        for _, header, key in _SYSTEM_FIELDS:
            value = request.headers.get(header)
            if value is not None:
                with _naming(header):
                    system[key] = _system_value(key, value)
        system.setdefault("$.ctime", rfc3339(self.sidecar.clock()) or "")
        return system

    async def get_message(self, request: web.Request) -> web.StreamResponse:
        item = await self.sidecar.message(request.match_info["message_id"])
        if item is None:
            return self.error(family(404), "no message with this id")
        return self.json(item)

    async def dead_letters(self, request: web.Request) -> web.StreamResponse:
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            limit = -1
        if not 1 <= limit <= 1000:
            return self.error(_ARGUMENT, "limit must be a whole number in [1, 1000]")
        device = request.query.get("device")
        return self.json({"dead_letters": await self.sidecar.dead_letters(limit=limit, device_id=device)})

    async def dead_letter(self, request: web.Request) -> web.StreamResponse:
        item = await self.sidecar.dead_letter(request.match_info["message_id"])
        if item is None:
            return self.error(family(404), "no dead letter with this id")
        return self.json(item)

    async def replay(self, request: web.Request) -> web.StreamResponse:
        if not self.sidecar.accepting:
            return self.error(_UNAVAILABLE, "the sidecar is shutting down; not accepting messages", retry_after=5)
        try:
            item = await self.sidecar.replay(request.match_info["message_id"])
        except OutboxFull as exc:
            return self.error(_THROTTLED, f"the outbox is full: {exc}", retry_after=1)
        if item is None:
            return self.error(family(404), "no dead letter with this id")
        return self.json(item, status=202, headers={"Location": f"/v1/messages/{item['id']}"})

    # -- devices ---------------------------------------------------------------------------------------

    async def devices(self, request: web.Request) -> web.StreamResponse:
        """``?limit=N&after=<device id>``: a page of devices sorted by id, the next page's cursor and the
        total; read from memory (the outbox's counts, each handler's state), never a query per device."""
        raw = request.query.get("limit", str(_PAGE_MAX))
        limit = int(raw) if raw.isdigit() and len(raw) <= 5 else 0
        if not 1 <= limit <= _PAGE_MAX:
            return self.error(_ARGUMENT, f"limit must be a whole number in [1, {_PAGE_MAX}]")
        after = request.query.get("after")
        if after is not None and not after:
            return self.error(_ARGUMENT, "after must be a device id (the previous page's next)")
        pipelines, cursor = self.sidecar.page(limit=limit, after=after)
        return self.json({"devices": [p.status() for p in pipelines], "next": cursor,
                          "total": len(self.sidecar.device_ids)})

    async def device(self, request: web.Request) -> web.StreamResponse:
        device_id = request.match_info["device_id"]
        pipeline = self.sidecar.pipeline(device_id)
        if pipeline is None:
            return self.error(_NO_DEVICE, f"device {device_id!r} is not configured in this sidecar")
        return self.json(pipeline.status())

    # -- classify and codes ----------------------------------------------------------------------------

    async def classify(self, request: web.Request) -> web.StreamResponse:
        data = await self.json_body(request)
        if isinstance(data, web.Response):
            return data
        try:
            err = classify(data)
        except (ValueError, TypeError) as exc:
            return self.error(_ARGUMENT, str(exc)[:500])
        except RecursionError:  # re-serializing a deeply nested body or payload
            return self.error(_ARGUMENT, "the body is nested too deeply")
        return self.json(err.to_dict() if err is not None else {"error": None})

    async def codes(self, request: web.Request) -> web.StreamResponse:
        return self.json({"codes": [row.to_dict() for row in all_codes()]})

    async def code(self, request: web.Request) -> web.StreamResponse:
        text = request.match_info["code"]
        row = by_name(text)
        if row is None:
            try:
                row = lookup(text)
            except ValueError:
                return self.error(family(404), f"{text[:60]!r} is neither a six-digit code nor a code name")
        return self.json(row.to_dict())

    # -- events, metrics, health -----------------------------------------------------------------------

    async def events(self, request: web.Request) -> web.StreamResponse:
        after: int | None = None
        raw = request.headers.get("Last-Event-ID") or request.query.get("after")
        if raw is not None:
            try:
                after = max(0, int(raw))
            except ValueError:
                return self.error(_ARGUMENT, "Last-Event-ID / after must be a whole number")
        response = self._sse()
        await response.prepare(request)
        stream = self.sidecar.events.subscribe(after)
        try:
            first = True
            async for event_id, kind, data in stream:
                await response.send(self.redact(json.dumps(data, default=str)), id=str(event_id), event=kind,
                                    retry=_SSE_RETRY_MS if first else None)
                first = False
        except (ConnectionResetError, TimeoutError):  # the client went away or stalled: nothing to answer
            return response
        finally:
            response.stop_streaming()  # its keep-alive task ends with the stream
            await stream.aclose()
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    @staticmethod
    def _sse() -> EventSourceResponse:
        # aiohttp-sse frames the events and sends a comment as keep-alive every _SSE_HEARTBEAT seconds;
        # a reader that stalls past its send timeout is cut off instead of holding memory.
        return EventSourceResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                   ping_interval=_SSE_HEARTBEAT, send_timeout=30.0)

    # -- the device surface: C2D, methods, twin ----------------------------------------------------------

    def _surface(self, request: web.Request) -> DeviceSurface | web.Response:
        device_id = request.match_info["device_id"]
        pipeline = self.sidecar.pipeline(device_id)
        if pipeline is None:
            return self.error(_NO_DEVICE, f"device {device_id!r} is not configured in this sidecar")
        return pipeline.surface

    def upstream_error(self, err: IoTHubError) -> web.Response:
        """An upstream (or surface) refusal as the API's answer: its own code, transport and action."""
        return _error_response(err, self.redact)

    async def _stream(self, request: web.Request, kind: str) -> web.StreamResponse:
        surface = self._surface(request)
        if isinstance(surface, web.Response):
            return surface
        try:
            sub: Subscription = surface.subscribe(kind)
        except IoTHubError as err:
            return self.upstream_error(err)
        response = self._sse()
        try:
            await response.prepare(request)
            first = True
            async for event, data in sub:
                await response.send(self.redact(json.dumps(data, default=str)), event=event,
                                    retry=_SSE_RETRY_MS if first else None)
                first = False
        except (ConnectionResetError, TimeoutError):
            return response
        finally:
            if response.prepared:
                response.stop_streaming()
            surface.unsubscribe(kind, sub)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    async def c2d_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, "c2d")

    async def methods_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, "methods")

    async def desired_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, "desired")

    async def settle_c2d(self, request: web.Request) -> web.StreamResponse:
        surface = self._surface(request)
        if isinstance(surface, web.Response):
            return surface
        outcome = request.match_info["outcome"]
        if outcome not in _OUTCOMES:
            return self.error(family(404), f"no such settle outcome {outcome[:40]!r}: complete, reject or abandon")
        try:
            await surface.settle(request.match_info["lock"], outcome)  # type: ignore[arg-type]
        except IoTHubError as err:
            return self.upstream_error(err)
        return web.Response(status=204)

    async def method_response(self, request: web.Request) -> web.StreamResponse:
        surface = self._surface(request)
        if isinstance(surface, web.Response):
            return surface
        data = await self.json_body(request)
        if isinstance(data, web.Response):
            return data
        status = data.get("status")
        valid = isinstance(status, int) and not isinstance(status, bool) and 0 <= status <= 999
        if not valid or set(data) - {"status", "payload"}:
            return self.error(_ARGUMENT, 'the body must be {"status": <int 0-999>, "payload": <any JSON>}')
        try:
            await surface.respond(request.match_info["rid"], int(status), data.get("payload"))  # type: ignore[arg-type]
        except IoTHubError as err:
            return self.upstream_error(err)
        return web.Response(status=204)

    async def twin(self, request: web.Request) -> web.StreamResponse:
        surface = self._surface(request)
        if isinstance(surface, web.Response):
            return surface
        try:
            twin = await surface.twin()
        except IoTHubError as err:
            return self.upstream_error(err)
        return self.json(twin)

    async def patch_reported(self, request: web.Request) -> web.StreamResponse:
        surface = self._surface(request)
        if isinstance(surface, web.Response):
            return surface
        data = await self.json_body(request)
        if isinstance(data, web.Response):
            return data
        try:
            version = await surface.patch_reported(data)
        except IoTHubError as err:
            return self.upstream_error(err)
        return self.json({"version": version})

    async def stats(self, request: web.Request) -> web.StreamResponse:
        """The status page's charts: per-second series over the last window and totals since start, from
        counters kept as things happen (see gateway/sidecar/stats.py). ``limit``/``after`` page the device
        totals exactly as ``GET /v1/devices`` pages devices; ``device`` narrows the series to one device."""
        device = request.query.get("device")
        if device is not None and self.sidecar.pipeline(device) is None:
            return self.error(_NO_DEVICE, f"device {device[:100]!r} is not configured in this sidecar")
        try:
            limit = int(request.query.get("limit", "0"))
        except ValueError:
            limit = -1
        if not 0 <= limit <= 1000:
            return self.error(_ARGUMENT, "limit must be a whole number in [0, 1000]")
        data = self.sidecar.stats.view(device, limit=limit, after=request.query.get("after"))
        data["started"] = rfc3339(data["started"])
        data["now"] = rfc3339(data["now"])
        return self.json(data)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        text = self.redact(self.sidecar.metrics.render().decode())
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return self.json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        storage = storage_view(self.sidecar.storage_failure)
        if not self.sidecar.ready:
            return self.json({"status": "not ready", "accepting": self.sidecar.accepting, "storage": storage},
                             status=503)
        return self.json({"status": "ready", "accepting": True, "storage": None})

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=openapi_text(), content_type="application/json")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- one validator per message field, shared by the single POST (headers) and the batch (JSON fields) -----

class _Invalid(ValueError):
    """A field breaks its rule. The text states the rule; :func:`_naming` adds the field's name (the single
    POST's header, or a batch message's field), so both routes share one validator per field."""

    def __init__(self, rule: str, code: int = _ARGUMENT, field: str = "") -> None:
        super().__init__(rule)
        self.code = code
        self.field = field

    def text(self, prefix: str = "") -> str:
        path = ".".join(p for p in (prefix, self.field) if p)
        return f"{path}: {self}" if path else str(self)


@contextlib.contextmanager
def _naming(field: str) -> Iterator[None]:
    try:
        yield
    except _Invalid as exc:
        raise _Invalid(str(exc), exc.code, ".".join(p for p in (field, exc.field) if p)) from None


def _valid_message_id(value: object) -> str:
    if not isinstance(value, str) or not _MESSAGE_ID.fullmatch(value):
        raise _Invalid("must be 1-128 printable ASCII characters without spaces")
    return value


def _valid_properties(pairs: Iterable[tuple[object, object]]) -> dict[str, str]:
    """Application properties: string names and values that are UTF-8 (aiohttp hands undecodable header
    bytes over as surrogates: no transport can send them), no empty or ``$`` name (IoT Hub's own names, and
    the system properties are stored so), at most ``_MAX_PROPERTIES``."""
    properties: dict[str, str] = {}
    for name, value in pairs:
        if not isinstance(name, str) or not isinstance(value, str):
            raise _Invalid("names and values must be strings")
        if not (_is_utf8(name) and _is_utf8(value)):
            raise _Invalid("names and values must be UTF-8")
        if not name:
            raise _Invalid("names must not be empty")
        if name.startswith("$"):
            raise _Invalid("names must not start with '$'")
        properties[name] = value
        if len(properties) > _MAX_PROPERTIES:
            raise _Invalid(f"at most {_MAX_PROPERTIES} properties")
    return properties


def _system_value(key: str, value: object) -> str:
    """A system property's value (``key`` its stored name): printable ASCII; ``$.ctime`` RFC 3339."""
    if not isinstance(value, str) or not _PRINTABLE.fullmatch(value):
        raise _Invalid("must be 1-256 printable ASCII characters")
    if key == "$.ctime" and not _RFC3339.fullmatch(value):
        raise _Invalid("must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z")
    return value


def _check_json_body(content_type: str | None, body: bytes) -> None:
    """A body whose content type is application/json must be JSON (IoT Hub's routing queries read it)."""
    if content_type is None or content_type.split(";", 1)[0].strip().lower() != "application/json":
        return
    try:
        json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Invalid(f"not valid JSON, yet the content type is application/json: {exc}") from None
    except RecursionError:
        raise _Invalid("nested too deeply to read as JSON (the content type is application/json)") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def _batch_messages(data: Any, *, max_batch: int, max_body: int, now: str) -> list[NewMessage]:
    """A batch's parsed body -> its messages as the outbox stores them; raises _Invalid naming the first
    message and field that breaks a rule (``messages[3].properties: ...``). ``now``: the default creation
    time (RFC 3339)."""
    if not isinstance(data, dict):
        raise _Invalid('the body must be a JSON object {"messages": [...]}')
    unknown = set(data) - {"messages"}
    if unknown:
        raise _Invalid(f'unknown key(s) {_names(unknown)}: the body is {{"messages": [...]}}')
    items = data.get("messages")
    if not isinstance(items, list) or not items:
        raise _Invalid("must be a non-empty list of message objects", field="messages")
    if len(items) > max_batch:
        raise _Invalid(f"{len(items)} messages; at most {max_batch} per batch ([api] max_batch, at most "
                       "[outbox] max_messages)", field="messages")
    messages: list[NewMessage] = []
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        try:
            message = _batch_message(item, max_body=max_body, now=now)
            if message.message_id is not None and first.setdefault(message.message_id, index) != index:
                raise _Invalid(f"{message.message_id!r} is also the id of messages[{first[message.message_id]}]",
                               field="message_id")
        except _Invalid as exc:
            raise _Invalid(exc.text(f"messages[{index}]"), exc.code) from None
        messages.append(message)
    return messages


def _batch_message(item: Any, *, max_body: int, now: str) -> NewMessage:
    if not isinstance(item, dict):
        raise _Invalid("must be a message object, e.g. {\"body\": ...}")
    unknown = set(item) - _BATCH_KEYS
    if unknown:
        raise _Invalid(f"unknown key(s) {_names(unknown)}; a message has {', '.join(sorted(_BATCH_KEYS))}")
    if ("body" in item) == ("body_base64" in item):
        raise _Invalid("needs exactly one of body and body_base64")
    system: dict[str, str] = {}
    for name, _, key in _SYSTEM_FIELDS:
        if name in item:
            with _naming(name):
                system[key] = _system_value(key, item[name])
    field = "body" if "body" in item else "body_base64"
    with _naming(field):
        body, serialized = _batch_body(item[field], binary=field == "body_base64")
        if len(body) > max_body:
            raise _Invalid(f"{len(body)} bytes; the limit is {max_body} ([api] max_body)", _TOO_LARGE)
        if serialized:  # JSON made here: valid whatever the content type says
            system.setdefault("$.ct", "application/json")
        else:
            _check_json_body(system.get("$.ct"), body)
    system.setdefault("$.ctime", now)
    properties: dict[str, str] = {}
    if "properties" in item:
        with _naming("properties"):
            if not isinstance(item["properties"], dict):
                raise _Invalid("must be an object of names to string values")
            properties = _valid_properties(item["properties"].items())
    message_id = None
    if "message_id" in item:
        with _naming("message_id"):
            message_id = _valid_message_id(item["message_id"])
    return NewMessage(body, {**properties, **system}, message_id)


_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _batch_body(value: Any, *, binary: bool) -> tuple[bytes, bool]:
    """A batch message's body as bytes, and whether it is a JSON value serialized here."""
    if binary:
        if not isinstance(value, str):
            raise _Invalid("must be a base64 string")
        try:
            return base64.b64decode(value.encode("ascii"), validate=True), False
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise _Invalid("not strict base64 (RFC 4648 alphabet with padding, no whitespace)") from None
    try:
        if isinstance(value, str):
            return value.encode("utf-8"), False
        return _COMPACT.encode(value).encode("utf-8"), True
    except UnicodeEncodeError:
        raise _Invalid("holds a lone surrogate (\\ud800-\\udfff): not UTF-8") from None
    except RecursionError:
        raise _Invalid("nested too deeply") from None


def _names(keys: Iterable[str]) -> str:
    """Unknown keys for an error message: a few, each cut short (they are the client's text)."""
    shown = sorted(keys)
    text = ", ".join(repr(k[:40]) for k in shown[:5])
    return text + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")


def openapi_text() -> str:
    return resources.files("gateway.sidecar").joinpath("openapi.json").read_text(encoding="utf-8")


_CLASSIFY_KEYS = {
    "http": {"transport", "status", "headers", "body"},
    "mqtt": {"transport", "reason_code", "protocol_version", "packet", "properties"},
    "mqtt-topic": {"transport", "topic", "payload"},
    "amqp": {"transport", "condition", "description", "info"},
}


def classify(data: dict[str, Any]) -> IoTHubError | None:
    """One raw transport failure (the four body shapes of ``POST /v1/classify``) -> its error or None."""
    transport = data.get("transport")
    if transport == "mqtt" and "topic" in data:
        shape = "mqtt-topic"
    elif transport in ("http", "mqtt", "amqp"):
        shape = str(transport)
    else:
        raise ValueError(f"transport must be 'http', 'mqtt' or 'amqp', got {str(transport)[:40]!r}")
    unknown = set(data) - _CLASSIFY_KEYS[shape]
    if unknown:
        raise ValueError(f"unknown field(s) for {shape}: {', '.join(sorted(unknown))[:200]}")
    if shape == "http":
        from adapters.http import translate as http_translate

        status = data.get("status")
        if isinstance(status, bool) or not isinstance(status, int):
            raise ValueError("status must be an HTTP status (an integer 100-599)")
        headers = data.get("headers")
        if headers is not None and not isinstance(headers, dict):
            raise ValueError("headers must be an object of header names to values")
        body = data.get("body")
        if body is not None and not isinstance(body, (str, dict)):
            body = json.dumps(body)
        return http_translate(status, headers, body)
    if shape == "mqtt-topic":
        from adapters.mqtt import translate_topic

        payload = data.get("payload")
        if payload is not None and not isinstance(payload, str):
            payload = json.dumps(payload)
        return translate_topic(data.get("topic"), payload)
    if shape == "mqtt":
        from adapters.mqtt import translate as mqtt_translate

        code = data.get("reason_code")
        if isinstance(code, bool) or not isinstance(code, int):
            raise ValueError("reason_code must be an integer 0-255")
        version = data.get("protocol_version", 4)
        packet = data.get("packet")
        props = data.get("properties")
        if props is not None and not isinstance(props, dict):
            raise ValueError("properties must be an object")
        return mqtt_translate(code, protocol_version=version, packet=packet, properties=props)
    from adapters.amqp import translate as amqp_translate

    condition = data.get("condition")
    description = data.get("description")
    info = data.get("info")
    if condition is not None and not isinstance(condition, str):
        raise ValueError("condition must be a string such as 'amqp:link:stolen'")
    if description is not None and not isinstance(description, str):
        raise ValueError("description must be a string")
    if info is not None and not isinstance(info, dict):
        raise ValueError("info must be an object")
    return amqp_translate(condition, description, info)


API_KEY: web.AppKey[Api] = web.AppKey("api", Api)

#: The status page's files (gateway/sidecar/static/), served as they are: no build step.
_STATIC = {"index.html": "text/html", "status.js": "text/javascript", "status.css": "text/css"}
_PAGE_CSP = "default-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'"


async def status_page(request: web.Request) -> web.StreamResponse:
    """``GET /`` and ``GET /static/{name}``: the live status page (it reads the API like any client)."""
    name = request.match_info.get("name", "index.html")
    if name not in _STATIC:
        raise web.HTTPNotFound()
    data = resources.files("gateway.sidecar").joinpath("static").joinpath(name).read_bytes()
    return web.Response(body=data, content_type=_STATIC[name], charset="utf-8",
                        headers={"Cache-Control": "no-cache", "Content-Security-Policy": _PAGE_CSP,
                                 "X-Content-Type-Options": "nosniff"})


class _CodedErrorHandler(RequestHandler):
    """aiohttp's connection handler, except that the errors it answers itself carry the catalog's body.

    aiohttp answers a request its parser refuses (a URL or header line over 8190 bytes, a malformed
    request line, bad framing) and an error that escapes every middleware from here, as text/plain,
    without running the application. The answer says what failed, never what was sent: a refused
    request may carry a secret.
    """

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:  # the answer has started: aiohttp's own path raises
            return super().handle_error(request, status, exc, message)
        if status >= 500:
            self.log_exception("error handling a request from %s", request.remote, exc_info=exc)
            code: int | CodeInfo = _SERVER
            text = "internal error in the sidecar; see its log"
        else:
            log.debug("refused an unparsable request from %s: %s", request.remote, type(exc).__name__)
            code = family(status) if 300 <= status <= 599 else _ARGUMENT
            text = _PARSER_REFUSALS.get(status, "the request could not be parsed (refused before routing)")
        response = api_error(code, text)
        response.force_close()
        return response


_PARSER_REFUSALS = {
    400: "the request could not be parsed: malformed, or a line (URL or header) over 8190 bytes",
    413: "the request is larger than the limit",
    414: "the URL is longer than 8190 bytes",
    431: "the request's header fields are too large",
}


class _CodedServer(web.Server):
    """Makes :class:`_CodedErrorHandler` connection handlers (no other change)."""

    def __call__(self) -> RequestHandler:
        return _CodedErrorHandler(self, loop=self._loop, **self._kwargs)


def _with_coded_errors(app: web.Application) -> None:
    """Have ``app``'s server (made by whichever runner starts it) answer its own errors with codes.

    aiohttp has no public hook for the errors it answers before routing, so the server the app makes
    is given the subclass above; nothing else about it changes.
    """
    make_handler = app._make_handler

    def make(**kwargs: Any) -> web.Server:
        server = make_handler(**kwargs)
        server.__class__ = _CodedServer
        return server

    app._make_handler = make  # type: ignore[method-assign]


def make_app(sidecar: Sidecar) -> web.Application:
    """The aiohttp application for ``sidecar`` (not yet listening)."""
    api = Api(sidecar)
    # aiohttp checks the size itself too (it raises 413 while reading); a little above ours so our check,
    # with its clearer message, usually answers first.
    app = web.Application(middlewares=[api.guard], client_max_size=api.max_body + 1)
    _with_coded_errors(app)
    app[API_KEY] = api
    r = app.router
    r.add_post("/v1/devices/{device_id}/messages", api.post_message)
    r.add_post("/v1/devices/{device_id}/messages/batch", api.post_batch)
    r.add_get("/v1/messages/{message_id}", api.get_message, allow_head=False)
    r.add_get("/v1/devices", api.devices, allow_head=False)
    r.add_get("/v1/devices/{device_id}", api.device, allow_head=False)
    r.add_get("/v1/devices/{device_id}/c2d", api.c2d_stream, allow_head=False)
    r.add_post("/v1/devices/{device_id}/c2d/{lock}/{outcome}", api.settle_c2d)
    r.add_get("/v1/devices/{device_id}/methods", api.methods_stream, allow_head=False)
    r.add_post("/v1/devices/{device_id}/methods/{rid}/response", api.method_response)
    r.add_get("/v1/devices/{device_id}/twin", api.twin, allow_head=False)
    r.add_patch("/v1/devices/{device_id}/twin/reported", api.patch_reported)
    r.add_get("/v1/devices/{device_id}/twin/desired", api.desired_stream, allow_head=False)
    r.add_post("/v1/classify", api.classify)
    r.add_get("/v1/codes", api.codes, allow_head=False)
    r.add_get("/v1/codes/{code}", api.code, allow_head=False)
    r.add_get("/v1/events", api.events, allow_head=False)
    r.add_get("/v1/dead-letters", api.dead_letters, allow_head=False)
    r.add_get("/v1/dead-letters/{message_id}", api.dead_letter, allow_head=False)
    r.add_post("/v1/dead-letters/{message_id}/replay", api.replay)
    r.add_get("/v1/openapi.json", api.openapi, allow_head=False)
    r.add_get("/v1/stats", api.stats, allow_head=False)
    r.add_get("/metrics", api.metrics, allow_head=False)
    r.add_get("/healthz", api.healthz)  # HEAD too: load balancers probe with it
    r.add_get("/readyz", api.readyz)
    r.add_get("/", status_page, allow_head=False)
    r.add_get("/static/{name}", status_page, allow_head=False)
    return app
