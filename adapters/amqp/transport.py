"""An asyncio transport over python-qpid-proton, speaking IoT Hub's AMQP device surface.

Proton has no asyncio integration, so each connection gets one proton ``Container`` running in one
dedicated thread (at most one per adapter; it ends when the connection ends). Commands go in through
an ``EventInjector``; results come back with ``loop.call_soon_threadsafe``. Both directions are
batched: one wake-up carries every command or result queued meanwhile, which is what keeps the
thread hop cheap under load. Proton objects are only ever touched on the proton thread.

The adapter never retries and never reconnects (``reconnect=False``): every failure is raised or
reported as an ``IoTHubError`` built by :mod:`adapters.amqp.translate`, with the proton condition
chained as ``__cause__`` (:class:`AmqpRemoteError`). Nothing waits forever: connects, sends and
settlements all have deadlines, and a closed link fails its pending sends at once (proton itself
would leave them unsettled for ever). A peer that goes silent while keeping the socket (a half-open
link) is found by the AMQP idle timeout, on by default, and reported as a lost connection.

Once the proton thread has ended, its wake-up pipe is closed and ``post`` writes nothing any more: the
descriptor numbers may already belong to another socket of the process.

``import adapters.amqp.transport`` does not import proton; ``connect()`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import ssl as _ssl
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any, Final, Literal, cast

from adapters.amqp.translate import translate, translate_cbs
from gateway.codes import Action, code_of
from gateway.errors import IoTHubError, make_error
from gateway.normalize import normalize
from gateway.sas import ConnectionString, parse_sas_token
from gateway.tls import default_port, resolve
from gateway.transport import (
    C2DMessage,
    DesiredPatch,
    Disconnected,
    GetTwin,
    Inbound,
    Message,
    MethodCall,
    PatchReported,
    Request,
    RespondMethod,
    SettleC2D,
    SettleOutcome,
    TransportEvent,
    UnsupportedRequest,
    check_properties,
)

__all__ = ["API_VERSION", "DEFAULT_IDLE_TIMEOUT", "AmqpRemoteError", "AmqpTransport", "C2DMessage", "Outcome"]

log = logging.getLogger(__name__)

TRANSPORT: Final = "amqp"
_NOT_CONNECTED: Final = code_of("NotConnected")
_TIMED_OUT: Final = code_of("OperationTimedOut")
_CLOSED: Final = code_of("DeviceConnectionClosedRemotely")
_PROTOCOL: Final = code_of("ProtocolViolation")
_LOCK_LOST: Final = "com.microsoft:message-lock-lost"
_CBS: Final = "$cbs"

#: How a C2D settlement goes on the wire: complete -> accepted, reject -> rejected, abandon -> released.
Outcome = SettleOutcome
_DISPOSITIONS: Final[dict[str, str]] = {"complete": "ACCEPTED", "reject": "REJECTED", "abandon": "RELEASED"}

#: Seconds without a frame from the peer before the link counts as dead (AMQP idle-time-out; proton
#: advertises it and sends its own empty frames to keep the peer's timer happy). A half-open link is
#: otherwise found only when the kernel gives up (~15 min). The value is the Azure C# device SDK's:
#: ``IotHubClientAmqpSettings.IdleTimeout`` / the provisioning client's ``IdleTimeout`` default to
#: 2 minutes (the C SDK keeps a 240 s service-side keep-alive and pings at half of it).
DEFAULT_IDLE_TIMEOUT: Final = 120.0
# What proton says when its idle timer fires: a dead peer, not a resource limit.
_IDLE_EXPIRED: Final = "local-idle-timeout expired"

API_VERSION: Final = "2021-04-12"
# Twin and method links: IoT Hub pairs a link's two directions by the channel correlation id given at attach.
_CHANNEL_ID: Final = "com.microsoft:channel-correlation-id"
_API_VERSION_KEY: Final = "com.microsoft:api-version"
_LINK_PAIRS: Final[dict[str, tuple[str, str]]] = {"twin": ("twin-s", "twin-r"), "methods": ("methods-s", "methods-r")}
_TWIN_REPORTED: Final = "/properties/reported"
_TWIN_DESIRED: Final = "/notifications/twin/properties/desired"
_METHOD_NAME: Final = "IoThub-methodname"
_METHOD_STATUS: Final = "IoThub-status"
_CREATION_TIME: Final = "iothub-creation-time-utc"  #: a message annotation, as the C# SDK sends it
# The condition a twin answer's error is read under: no condition exists on the wire (the status and the
# body say it all), and an unknown one lets translate() fall back on the status family.
_TWIN_ANSWER: Final = "iothub:twin-response"


class AmqpRemoteError(Exception):
    """What the peer (or proton) said, kept as the ``__cause__`` of the ``IoTHubError``.

    ``where`` is the endpoint that carried it: connection, session, link, delivery, transport or cbs.
    """

    def __init__(self, where: str, condition: str | None, description: str | None = None,
                 info: Mapping[Any, Any] | None = None) -> None:
        super().__init__(f"{where}: {condition or 'no condition'}: {description or ''}".rstrip(": "))
        self.where = where
        self.condition = condition
        self.description = description
        self.info = dict(info) if info else {}


def _error_from_condition(where: str, cond: Any, device_id: str | None = None) -> IoTHubError:
    """Translate a proton ``Condition`` (or None) and chain the raw facts as ``__cause__``."""
    name = getattr(cond, "name", None) if cond is not None else None
    desc = getattr(cond, "description", None) if cond is not None else None
    info = getattr(cond, "info", None) if cond is not None else None
    if where == "transport" and isinstance(desc, str) and _IDLE_EXPIRED in desc:
        # proton's own idle timer fired (a silent peer, a half-open link): the connection is lost,
        # whatever the condition name (resource-limit-exceeded) would say about a hub's refusal
        err = make_error(_CLOSED, transport=TRANSPORT, exact=False, device_id=device_id,
                         message="no frame from the peer within the idle timeout: the link is half-open or dead")
    else:
        err = translate(name, desc, info if isinstance(info, Mapping) else None)
    if device_id is not None and err.device_id is None:
        err.device_id = device_id
    err.__cause__ = AmqpRemoteError(where, name, desc, info if isinstance(info, Mapping) else None)
    return err


def _to_error(exc: BaseException, device_id: str | None) -> IoTHubError:
    """What proton, OpenSSL or the OS raised, as an ``IoTHubError`` (one classification: ``normalize``)."""
    if isinstance(exc, IoTHubError):
        return exc
    return normalize(exc, transport=TRANSPORT, device_id=device_id)


@contextlib.contextmanager
def _mapped(device_id: str | None) -> Iterator[None]:
    """The adapter's one exception-mapping point on the loop side (httpx's ``map_exceptions``).

    ``TypeError`` / ``ValueError`` (``UnsupportedRequest`` among them) pass through untouched: they are
    mistakes in the calling code, which a retry cannot fix.
    """
    try:
        yield
    except (IoTHubError, TypeError, ValueError):
        raise
    except Exception as exc:
        raise _to_error(exc, device_id) from exc


def _in_flight_error(cause: IoTHubError) -> IoTHubError:
    """What a send still waiting for settlement gets when the connection goes: outcome unknown.

    A cause whose action is already "reconnect" says that by itself; any other (a throttle, a refused
    credential) is for the supervisor to act on, so the send gets a plain "closed remotely" with it chained.
    """
    if cause.action is Action.RECONNECT and cause.code != _NOT_CONNECTED:
        return cause
    err = make_error(_CLOSED, transport=TRANSPORT, exact=False, tracking_id=cause.tracking_id,
                     device_id=cause.device_id,
                     message=f"connection lost while the message was in flight (outcome unknown): {cause.message}")
    err.__cause__ = cause
    return err


def _body_bytes(body: Any) -> bytes:
    if body is None:
        return b""
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    return repr(body).encode()


def _json(payload: bytes) -> Any:
    """A JSON body as its value; anything else as the raw bytes (a device may answer with no JSON)."""
    if not payload.strip():
        return None
    try:
        return json.loads(payload)
    except ValueError:
        return payload


def _twin_error(status: object, body: bytes) -> IoTHubError | None:
    """A twin answer's ``status`` annotation and body -> None (2xx, or no status) or the error it carries.

    The body's ``errorCode`` is exact; without one, the status family (``translate`` falls back on it).
    """
    if status is None:
        return None
    if not isinstance(status, int) or isinstance(status, bool):
        try:
            status = int(str(status).strip())
        except ValueError:
            err = make_error(_PROTOCOL, transport=TRANSPORT, exact=False,
                             message=f"twin answer with a status that is not a number: {str(status)[:40]!r}")
            err.__cause__ = AmqpRemoteError("twin", None, "unreadable status")
            return err
    if 100 <= status < 300:
        return None
    parsed: Any = None
    with contextlib.suppress(ValueError, RecursionError):
        parsed = json.loads(body) if body.strip() else None
    fields = parsed if isinstance(parsed, dict) else {}
    info: dict[str, object] = {"status-code": status}
    if fields.get("errorCode") is not None:
        info["errorCode"] = fields["errorCode"]
    tracking = fields.get("trackingId")
    if isinstance(tracking, str):
        info["com.microsoft:tracking-id"] = tracking
    message = fields.get("message") or fields.get("Message")
    description = message if isinstance(message, str) else f"twin request answered with status {status}"
    err = translate(_TWIN_ANSWER, description, info)
    err.__cause__ = AmqpRemoteError("twin", None, description, info)
    return err


class AmqpTransport:
    """One device's AMQP connection to IoT Hub (or any AMQP 1.0 peer), for the shared ``Handler``.

    With ``cbs=True`` (IoT Hub) the SAS token is put on ``$cbs`` after SASL ANONYMOUS and, when
    ``token`` is a callable, renewed on the live connection before it expires (so ``credential_expiry``
    is None: the handler never has to reconnect for a new token). Set ``cbs=False`` with
    ``user``/``password`` (SASL PLAIN) and explicit addresses to talk to a plain broker.

    ``ssl``: an ``ssl.SSLContext``, True (system trust, the default) or None/False (plain TCP, loopback
    peers only); see :mod:`gateway.tls`. Proton does its own TLS, so the context is read, not used:
    its verify mode, ``check_hostname`` and trusted CAs are mapped onto a proton ``SSLDomain``.

    ``subscribe`` names what to listen to from connect on: ``"methods"`` (direct-method links) and
    ``"twin"`` (twin links plus desired-property notifications). The twin links are also attached on
    the first ``GetTwin`` / ``PatchReported`` when not subscribed.

    ``idle_timeout`` (seconds, None to turn it off) is the AMQP idle-time-out: with no frame from the
    peer for that long the connection is reported lost (``Disconnected``), which finds a half-open link.
    """

    name = TRANSPORT
    #: AMQP answers every refusal with a condition; it never refuses by silently closing the socket.
    ambiguous_drops = False

    def __init__(
        self,
        *,
        host: str,
        device_id: str,
        port: int | None = None,
        ssl: _ssl.SSLContext | bool | None = True,
        hub_host: str | None = None,
        token: str | Callable[[], str] | None = None,
        user: str | None = None,
        password: str | None = None,
        cbs: bool = True,
        events_address: str | None = None,
        c2d_address: str | None = None,
        receive_c2d: bool = True,
        send_timeout: float = 30.0,
        connect_timeout: float = 30.0,
        settle_timeout: float = 30.0,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        renew_margin: float = 0.2,
        prefetch: int = 10,
        close_timeout: float = 5.0,
        settle_mode: Literal["first", "second"] = "second",
        subscribe: Iterable[str] = (),
        api_version: str = API_VERSION,
    ) -> None:
        self.host = host
        self.ssl_context = resolve(ssl)
        self.port = port if port is not None else default_port(TRANSPORT, self.ssl_context)
        self.device_id = device_id
        self.hub_host = hub_host or host
        self._token = token
        self.user = user
        self.password = password
        self.cbs = cbs
        if cbs and token is None:
            raise ValueError("cbs=True needs a token (a SAS token string or a callable returning one)")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive (or None to turn the idle check off)")
        if not 0.0 < renew_margin < 1.0:
            raise ValueError("renew_margin is the fraction of the token's lifetime left at renewal: 0 < x < 1")
        self.events_address = events_address or f"amqps://{self.hub_host}/devices/{device_id}/messages/events"
        self.c2d_address = c2d_address or f"amqps://{self.hub_host}/devices/{device_id}/messages/devicebound"
        self.twin_address = f"amqps://{self.hub_host}/devices/{device_id}/twin"
        self.methods_address = f"amqps://{self.hub_host}/devices/{device_id}/methods/devicebound"
        self.subscriptions = frozenset(subscribe)
        unknown = self.subscriptions - set(_LINK_PAIRS)
        if unknown:
            raise ValueError(f"unknown subscription(s) {sorted(unknown)}: use 'twin' and/or 'methods'")
        self.api_version = api_version
        self.receive_c2d = receive_c2d
        self.send_timeout = send_timeout
        self.connect_timeout = connect_timeout
        self.settle_timeout = settle_timeout
        self.idle_timeout = idle_timeout
        self.renew_margin = renew_margin  #: renew the token when this fraction of its lifetime is left
        self.prefetch = prefetch
        self.close_timeout = close_timeout
        #: "second": the hub confirms each C2D settlement (IoT Hub); "first" for peers without it (RabbitMQ)
        self.settle_mode = settle_mode
        self._bridge: _Bridge | None = None
        self._closing = False

    @classmethod
    def from_connection_string(
        cls, connection_string: str | ConnectionString, *, host: str | None = None, port: int | None = None,
        ssl: _ssl.SSLContext | bool | None = True, token_ttl: float = 3600.0, **kwargs: Any,
    ) -> AmqpTransport:
        """An IoT Hub device from its connection string; ``host`` overrides where the socket goes.

        The token is minted per put-token, so CBS renews it on the live connection.
        """
        cs = connection_string if isinstance(connection_string, ConnectionString) else \
            ConnectionString.parse(connection_string)

        def token() -> str:
            return cs.token(int(time.time() + token_ttl))  # an epoch expiry: the wall clock is right here

        return cls(host=host or cs.host_name, port=port, ssl=ssl, device_id=cs.device_id, hub_host=cs.host_name,
                   token=token, **kwargs)

    # -- Transport protocol -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        bridge = self._bridge
        return bridge is not None and bridge.ready_done and not bridge.dead

    @property
    def credential_expiry(self) -> float | None:
        """Epoch seconds when the current connection's credential expires, if only a reconnect renews it.

        None when CBS renews the token on the live connection (a token callable), and for SASL PLAIN.
        """
        if not self.cbs or callable(self._token):
            return None
        bridge = self._bridge
        expiry = bridge.token_expiry if bridge is not None else None
        if expiry is None and isinstance(self._token, str):
            with contextlib.suppress(ValueError):
                expiry = float(parse_sas_token(self._token).expiry)
        return expiry

    @property
    def thread(self) -> threading.Thread | None:
        """The proton thread of the current connection (None when none has been started)."""
        return self._bridge.thread if self._bridge is not None else None

    async def connect(self) -> None:
        """Open the connection, put the token, attach the links. Raises ``IoTHubError``."""
        await self._retire()
        self._closing = False
        loop = asyncio.get_running_loop()
        bridge = _Bridge(self, loop)
        self._bridge = bridge
        try:
            with _mapped(self.device_id):
                bridge.start()
        except BaseException:
            self._bridge = None
            bridge.discard()
            raise
        try:
            await bridge.wait(bridge.ready, self.connect_timeout, "connect")
        except BaseException:
            await self._retire()
            raise
        bridge.attached.update(self.subscriptions)

    async def close(self) -> None:
        """Close the connection and end the proton thread. Idempotent."""
        self._closing = True
        await self._retire()

    async def send(self, message: Message) -> None:
        """Send one telemetry message and wait until the peer settles it (accepted)."""
        check_properties(message, TRANSPORT)
        bridge = self._live()
        fut = bridge.loop.create_future()
        bridge.post(lambda: bridge.do_send(message, fut))
        bridge.send_deadline(fut, self.send_timeout)
        await fut

    async def settle(self, lock_token: str, outcome: SettleOutcome = "complete", *,
                     timeout: float | None = None) -> None:
        """Complete (accepted), reject (rejected: dead-letter) or abandon (released: redeliver) a C2D message.

        Waits for the hub's own settlement: a late one comes back as ``DeviceMessageLockLost``. An
        unknown ``outcome`` raises ``ValueError`` at once (a programming error, never retried).
        """
        if outcome not in _DISPOSITIONS:
            raise ValueError(f"unknown settle outcome {outcome!r}: complete, reject or abandon")
        bridge = self._live()
        fut = bridge.loop.create_future()
        bridge.post(lambda: bridge.do_settle(lock_token, outcome, fut))
        await bridge.wait(fut, timeout if timeout is not None else self.settle_timeout, "settle")

    async def request(self, request: Request, *, timeout: float) -> Any:
        """``GetTwin()`` -> the twin (dict); ``PatchReported`` -> the new reported ``$version`` (int or None);
        ``RespondMethod`` -> None once the hub accepted it; ``SettleC2D`` -> None once the hub confirmed.

        Anything else (the service-side requests, ``ReceiveC2D``: AMQP pushes C2D as ``Inbound``, another
        device's twin) raises :class:`UnsupportedRequest` at once. A twin answer with an error status
        raises its body's ``errorCode`` (exact), else its status family.
        """
        if isinstance(request, SettleC2D):
            await self.settle(request.lock_token, request.outcome, timeout=timeout)
            return None
        if isinstance(request, GetTwin) and request.device_id in (None, self.device_id):
            return await self._twin(request, timeout)
        if isinstance(request, PatchReported):
            if not isinstance(request.patch, Mapping):
                raise TypeError(f"PatchReported.patch must be a mapping, not {type(request.patch).__name__}")
            return await self._twin(request, timeout)
        if isinstance(request, RespondMethod):
            await self._method_response(request, timeout)
            return None
        if isinstance(request, GetTwin):
            raise UnsupportedRequest(f"an AMQP device link reads only its own twin, not {request.device_id!r}")
        raise UnsupportedRequest(f"the AMQP device transport has no {type(request).__name__} request "
                                 "(it answers GetTwin, PatchReported, RespondMethod and SettleC2D)")

    async def _twin(self, request: GetTwin | PatchReported, timeout: float) -> Any:
        if isinstance(request, PatchReported):
            operation, resource, body = "PATCH", _TWIN_REPORTED, json.dumps(dict(request.patch)).encode()
        else:
            operation, resource, body = "GET", None, b" "  # an empty data section, as the C SDK sends
        bridge = self._live()
        loop = bridge.loop
        deadline = loop.time() + timeout
        if "twin" not in bridge.attached:
            attached: asyncio.Future[None] = loop.create_future()
            bridge.post(lambda: bridge.do_attach("twin", attached))
            await bridge.wait(attached, timeout, "twin link attach")
            bridge.attached.add("twin")
        corr = str(uuid.uuid4())
        fut: asyncio.Future[tuple[object, object, bytes]] = loop.create_future()
        bridge.post(lambda: bridge.do_twin(operation, resource, body, corr, fut))
        try:
            status, version, answer = await bridge.wait(fut, max(0.0, deadline - loop.time()), f"twin {operation}",
                                                        in_flight=operation == "PATCH")
        finally:
            if not fut.done() or fut.cancelled():
                bridge.post(lambda: bridge.forget_twin(corr))  # a no-op once the connection is gone
        err = _twin_error(status, answer)
        if err is not None:
            err.device_id = err.device_id or self.device_id
            raise err
        if operation == "PATCH":
            return version if isinstance(version, int) and not isinstance(version, bool) else None
        return _json(answer)

    async def _method_response(self, request: RespondMethod, timeout: float) -> None:
        if not isinstance(request.status, int) or isinstance(request.status, bool):
            raise TypeError(f"RespondMethod.status must be an int, not {type(request.status).__name__}")
        if not -(2**31) <= request.status < 2**31:  # IoThub-status is an AMQP int
            raise ValueError(f"RespondMethod.status {request.status} does not fit a 32-bit int")
        body = json.dumps(request.payload).encode()  # a payload JSON cannot carry is the caller's TypeError
        bridge = self._live()
        fut: asyncio.Future[None] = bridge.loop.create_future()
        rid, status = str(request.rid), request.status
        bridge.post(lambda: bridge.do_method_response(rid, status, body, fut))
        await bridge.wait(fut, timeout, "method response", in_flight=True)

    async def events(self) -> AsyncIterator[TransportEvent]:
        """``Inbound("c2d", C2DMessage)``, ``Inbound("method", MethodCall)`` and
        ``Inbound("twin_desired", DesiredPatch)``, then ``Disconnected``."""
        bridge = self._bridge
        if bridge is None:
            return
        while True:
            event = await bridge.events.get()
            if event is None:
                return
            yield event
            if isinstance(event, Disconnected):
                return

    # -- internals ----------------------------------------------------------------------------------

    def next_token(self) -> str:
        token = self._token
        if callable(token):
            return token()
        if token is None:
            raise ValueError("no token")
        return token

    def _live(self) -> _Bridge:
        bridge = self._bridge
        if bridge is None or bridge.dead or not bridge.ready_done:
            cause = bridge.error if bridge is not None else None
            err = make_error(_NOT_CONNECTED, transport=TRANSPORT, device_id=self.device_id,
                             message="not connected" + (f" ({cause.name}: {cause.message})" if cause else ""))
            err.__cause__ = cause
            raise err
        return bridge

    async def _retire(self) -> None:
        """Close the current connection (if any) and join its thread."""
        bridge = self._bridge
        if bridge is None:
            return
        bridge.shutdown()
        await bridge.joined()
        if self._bridge is bridge:
            self._bridge = None


class _Bridge:
    """One connection: the proton handler (proton thread) and its asyncio face (loop thread)."""

    def __init__(self, owner: AmqpTransport, loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.loop = loop
        self.device_id = owner.device_id
        # loop side
        self.ready: asyncio.Future[None] = loop.create_future()
        self.events: asyncio.Queue[TransportEvent | None] = asyncio.Queue()
        self.waiters: set[asyncio.Future[Any]] = set()
        self.ended: asyncio.Future[None] = loop.create_future()  # resolved by the proton thread's last act
        self.ready_done = False
        self.attached: set[str] = set()  # link pairs ("twin", "methods") known open, loop side
        self.dead = False  # set on the loop thread once the connection is gone
        self.error: IoTHubError | None = None
        self.thread: threading.Thread | None = None
        self.finished = threading.Event()
        self.token_expiry: float | None = None  # epoch expiry of the token last put on $cbs
        self.tls_files: list[str] = []  # CA bundles this connection holds (_CA_BUNDLES), released at its end
        # cross-thread queues
        self._cmd_lock = threading.Lock()
        self._cmds: deque[Callable[[], None]] = deque()
        self._cmd_signalled = False
        self._pipe_closed = False  # under _cmd_lock: the injector's descriptors are closed, never write
        self._out_lock = threading.Lock()
        self._out: list[Callable[[], None]] = []
        self._out_scheduled = False
        self._stopped = False  # set on the proton thread once teardown began
        # proton side
        self.injector: Any = None
        self.container: Any = None
        self.conn: Any = None
        self.sender: Any = None
        self.receiver: Any = None
        self.cbs_sender: Any = None
        self.cbs_receiver: Any = None
        self.cbs_pending: str | None = None
        self.cbs_done = False
        self.pending: dict[Any, asyncio.Future[None]] = {}
        self.c2d: dict[str, Any] = {}
        self.settling: dict[Any, tuple[asyncio.Future[None], str]] = {}
        self.links_open: set[str] = set()
        self.extra_links: dict[str, Any] = {}  # "twin-s", "twin-r", "methods-s", "methods-r" -> link
        self.twin_requests: dict[str, asyncio.Future[Any] | None] = {}  # correlation id -> answer
        self.request_sends: dict[Any, str] = {}  # twin request delivery -> its correlation id
        self.method_corr: dict[str, Any] = {}  # rid -> the request's correlation id, echoed as it came
        self.attach_waiters: list[tuple[str, asyncio.Future[None]]] = []
        self.listen = set(owner.subscriptions)
        self.desired_sent = False
        self.renew_task: Any = None
        self.pending_expiry: float | None = None  # proton side: the token awaiting its CBS answer
        self.renew_expiry: float | None = None  # proton side: the token in force
        self.proton: Any = None
        self._outgoing: Any = None

    # -- thread lifecycle (loop thread) -------------------------------------------------------------

    def start(self) -> None:
        import proton
        import proton.reactor

        self.proton = proton
        self.injector = proton.reactor.EventInjector()
        self.thread = threading.Thread(target=self._run, name=f"amqp-{self.device_id}", daemon=True)
        self.thread.start()

    def discard(self) -> None:
        """The thread never started: release the injector's pipe."""
        self._close_pipe()

    def _close_pipe(self) -> None:
        """Close the injector's descriptors, under the command lock so that no ``post`` writes after."""
        with self._cmd_lock:
            if self._pipe_closed or self.injector is None:
                self._pipe_closed = True
                return
            self._pipe_closed = True
            for fd in self.injector.pipe:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _run(self) -> None:
        try:
            # Built here, not on the loop: a Container sets up OpenSSL contexts (tens of milliseconds).
            self.container = self.proton.reactor.Container(_handler_class()(self))
            self.container.container_id = f"iothub-gateway-{self.device_id}-{uuid.uuid4().hex[:8]}"
            self.container.run()
        except BaseException as exc:  # a bug in a callback must not leave callers waiting
            log.exception("proton container failed")
            with contextlib.suppress(Exception):
                self.fail(_to_error(exc, self.device_id))
        finally:
            if not self._stopped:
                self.fail(make_error(_CLOSED, transport=TRANSPORT, device_id=self.device_id, exact=False,
                                     message="the AMQP connection ended"))
            self._call(self._on_thread_end)
            self._close_pipe()
            for path in self.tls_files:
                _CA_BUNDLES.release(path)
            self.finished.set()
            # The last act: joined() waits for this on the loop, without holding an executor thread.
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                self.loop.call_soon_threadsafe(self._mark_ended)

    def _mark_ended(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def _on_thread_end(self) -> None:
        self.dead = True
        for fut in list(self.waiters):
            if not fut.done():
                fut.set_exception(self._gone_error())
        self.events.put_nowait(None)

    def shutdown(self) -> None:
        """Ask the proton thread to close the connection and end (any thread; idempotent)."""
        if self.finished.is_set() or self.thread is None:
            return
        self.post(self.do_close)

    async def joined(self) -> None:
        """Wait for the proton thread's end on the loop (no executor thread is tied up meanwhile)."""
        thread = self.thread
        if thread is None:
            return
        # the thread ends once the close handshake is done or the socket is gone; cap the wait
        try:
            await asyncio.wait_for(asyncio.shield(self.ended), self.owner.close_timeout)
        except TimeoutError:  # the peer never answered our close: cut the socket
            self.post(self.do_abort)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.ended), 5.0)
        if self.ended.done():
            thread.join(1.0)  # its last statement ran: this returns at once
        self._flush()  # the last batched results land now

    # -- waiting (loop thread) ----------------------------------------------------------------------

    async def wait(self, fut: asyncio.Future[Any], timeout: float, what: str, *, in_flight: bool = False) -> Any:
        if self.dead and not fut.done():
            fut.set_exception(self._gone_error())
        self.waiters.add(fut)
        try:
            async with asyncio.timeout(timeout):
                return await fut  # on timeout fut is cancelled; a late result is then dropped
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                raise  # the answer itself was a timeout (OperationTimedOut is a TimeoutError too)
            err = make_error(_TIMED_OUT, transport=TRANSPORT, device_id=self.device_id,
                             message=f"AMQP {what} got no answer within {timeout:g}s"
                                     + (" (outcome unknown)" if in_flight else ""))
            raise err from None
        finally:
            self.waiters.discard(fut)

    def send_deadline(self, fut: asyncio.Future[None], timeout: float) -> None:
        """Fail ``fut`` with OperationTimedOut (outcome unknown) if unsettled after ``timeout`` (loop clock)."""

        def expire() -> None:
            if not fut.done():
                fut.set_exception(make_error(_TIMED_OUT, transport=TRANSPORT, device_id=self.device_id,
                                             message=f"AMQP send got no settlement within {timeout:g}s "
                                                     "(outcome unknown)"))

        timer = self.loop.call_at(self.loop.time() + timeout, expire)
        self.waiters.add(fut)  # failed at once if the thread ends first

        def settled(done: asyncio.Future[None]) -> None:
            timer.cancel()
            self.waiters.discard(done)

        fut.add_done_callback(settled)

    def _gone_error(self) -> IoTHubError:
        cause = self.error
        if cause is None:
            return make_error(_NOT_CONNECTED, transport=TRANSPORT, device_id=self.device_id,
                              message="the AMQP connection is closed")
        return _in_flight_error(cause)

    # -- cross-thread plumbing ----------------------------------------------------------------------

    def post(self, fn: Callable[[], None]) -> bool:
        """Run ``fn`` on the proton thread (any thread). One injector wake-up per batch.

        Once the thread has ended the injector's descriptors are closed (and their numbers may already
        belong to another socket): ``fn`` is then dropped, nothing is written, and False comes back.
        The wake-up is written under the lock that guards the close, so the two cannot interleave.
        """
        with self._cmd_lock:
            if self._pipe_closed:
                return False
            self._cmds.append(fn)
            if not self._cmd_signalled:
                self._cmd_signalled = True
                with contextlib.suppress(OSError):
                    self.injector.trigger(self.proton.reactor.ApplicationEvent("amqp_cmd"))
            return True

    def run_commands(self) -> None:
        while True:
            with self._cmd_lock:
                if not self._cmds:
                    self._cmd_signalled = False
                    return
                batch = list(self._cmds)
                self._cmds.clear()
            for fn in batch:
                try:
                    fn()
                except Exception as exc:
                    log.exception("AMQP command failed")
                    self.fail(_to_error(exc, self.device_id))

    def _call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread (from the proton thread). One loop wake-up per batch."""
        with self._out_lock:
            self._out.append(fn)
            if self._out_scheduled:
                return
            self._out_scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._out_lock:
            batch, self._out = self._out, []
            self._out_scheduled = False
        for fn in batch:
            try:
                fn()
            except Exception:
                log.exception("AMQP result delivery failed")

    def resolve(self, fut: asyncio.Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
        def apply() -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        self._call(apply)

    def emit(self, event: TransportEvent) -> None:
        self._call(lambda: self.events.put_nowait(event))

    # -- commands (proton thread) -------------------------------------------------------------------

    def do_send(self, message: Message, fut: asyncio.Future[None]) -> None:
        sender = self.sender
        if self._stopped or sender is None or not _is_active(sender, self.proton):
            self.resolve(fut, exc=make_error(_NOT_CONNECTED, transport=TRANSPORT, device_id=self.device_id,
                                             message="the telemetry link is not open; nothing was sent"))
            return
        # One proton Message, reused: send() encodes it at once, and every cffi call made here rather
        # than on the loop thread is a GIL hand-over the two threads do not fight over.
        pmsg = self._outgoing
        if pmsg is None:
            pmsg = self._outgoing = self.proton.Message(inferred=True)
        pmsg.id = message.id
        pmsg.body = bytes(message.body)
        pmsg.properties = cast(Any, dict(message.properties) if message.properties else None)
        # IoT Hub's system properties: the AMQP message's own fields, creation time as an annotation
        pmsg.content_type = message.content_type
        pmsg.content_encoding = message.content_encoding
        pmsg.correlation_id = message.correlation_id
        pmsg.annotations = cast(Any, {self.proton.symbol(_CREATION_TIME): message.creation_time}
                                if message.creation_time else None)
        self.pending[sender.send(pmsg)] = fut

    def do_settle(self, token: str, outcome: SettleOutcome, fut: asyncio.Future[None]) -> None:
        dlv = self.c2d.pop(token, None)
        if dlv is None or self._stopped:
            err = translate(_LOCK_LOST, f"lock token {token!r} is not held on this connection")
            err.device_id = self.device_id
            self.resolve(fut, exc=err)
            return
        dlv.update(getattr(self.proton.Delivery, _DISPOSITIONS[outcome]))
        if dlv.link.remote_rcv_settle_mode == self.proton.Link.RCV_SECOND:
            self.settling[dlv] = (fut, outcome)  # the hub settles; a late settlement is rejected
        else:
            dlv.settle()
            self.resolve(fut)

    def do_attach(self, kind: str, fut: asyncio.Future[None]) -> None:
        if self._stopped or self.sender is None:
            self.resolve(fut, exc=make_error(_NOT_CONNECTED, transport=TRANSPORT, device_id=self.device_id,
                                             message=f"cannot attach the {kind} links: not connected"))
            return
        self.create_pair(kind)
        self.attach_waiters.append((kind, fut))
        self.pairs_progress()

    def do_twin(self, operation: str, resource: str | None, body: bytes, corr: str,
                fut: asyncio.Future[Any] | None) -> None:
        """Send one twin request; ``fut`` (None: nobody waits) gets (status, version, body) of the answer."""
        sender = self.extra_links.get("twin-s")
        if self._stopped or sender is None or not _is_active(sender, self.proton):
            if fut is not None:
                self.resolve(fut, exc=make_error(_NOT_CONNECTED, transport=TRANSPORT, device_id=self.device_id,
                                                 message="the twin link is not open; nothing was sent"))
            return
        symbol = self.proton.symbol
        msg = self.proton.Message(correlation_id=corr, body=body, inferred=True)
        annotations: dict[Any, Any] = {symbol("operation"): operation}
        if resource is not None:
            annotations[symbol("resource")] = resource
        msg.annotations = cast(Any, annotations)
        self.twin_requests[corr] = fut
        self.request_sends[sender.send(msg)] = corr

    def forget_twin(self, corr: str) -> None:
        self.twin_requests.pop(corr, None)

    def do_method_response(self, rid: str, status: int, body: bytes, fut: asyncio.Future[None]) -> None:
        sender = self.extra_links.get("methods-s")
        if self._stopped or sender is None or not _is_active(sender, self.proton):
            self.resolve(fut, exc=make_error(_NOT_CONNECTED, transport=TRANSPORT, device_id=self.device_id,
                                             message="the methods link is not open; nothing was sent"))
            return
        msg = self.proton.Message(correlation_id=self.method_corr.pop(rid, rid), body=body, inferred=True)
        msg.properties = cast(Any, {_METHOD_STATUS: self.proton.int32(status)})
        self.pending[sender.send(msg)] = fut

    def do_close(self) -> None:
        if self._stopped:
            return
        # The thread must end by itself even if nobody awaits joined() any more (a caller's timeout cut
        # close() short): a peer that never answers our close gets its socket cut after close_timeout.
        self.container.schedule(self.owner.close_timeout, _Timer(self.do_abort))
        self.fail(None)

    def do_abort(self) -> None:
        transport = getattr(self.conn, "transport", None)
        if transport is None:
            self.injector.close()
            return
        transport.close_tail()
        transport.close_head()

    # -- connection setup (proton thread) -----------------------------------------------------------

    def on_start(self, container: Any) -> None:
        owner = self.owner
        container.selectable(self.injector)
        tls = owner.ssl_context is not None
        kwargs: dict[str, Any] = {
            "reconnect": False,
            "virtual_host": owner.hub_host,
            # TLS names are checked against where the socket goes (the hub itself, or a local stand-in)
            "sni": owner.host if tls and not _is_ip_address(owner.host) else None,
            "allow_insecure_mechs": True,
        }
        if owner.user is not None:
            kwargs.update(user=owner.user, password=owner.password or "", allowed_mechs="PLAIN")
        else:
            kwargs["allowed_mechs"] = "ANONYMOUS"
        if owner.ssl_context is not None:
            kwargs["ssl_domain"] = self.ssl_domain(owner.ssl_context)
        if owner.idle_timeout:
            kwargs["heartbeat"] = owner.idle_timeout  # proton: our idle-time-out, advertised and enforced
        self.conn = container.connect(f"{'amqps' if tls else 'amqp'}://{owner.host}:{owner.port}", **kwargs)

    def ssl_domain(self, context: _ssl.SSLContext) -> Any:
        """The ``SSLContext``'s verification settings as a proton ``SSLDomain`` (proton has its own OpenSSL).

        CERT_NONE -> no verification. Otherwise the context's trusted CAs (written to a private PEM file,
        removed when the thread ends; the system's default paths if the context lists none) verify the
        chain, and ``check_hostname`` adds proton's name check against ``host``. Proton matches DNS names
        only (never an IP address SAN), so for an IP address as ``host`` the chain alone is verified, as
        ``check_hostname=False`` does: trust a private CA for such a peer, not the system store.
        """
        domain_cls = self.proton.SSLDomain
        domain = domain_cls(domain_cls.MODE_CLIENT)
        if context.verify_mode == _ssl.CERT_NONE:
            domain.set_peer_authentication(domain_cls.ANONYMOUS_PEER)
            return domain
        ca = self.ca_bundle(context)
        if ca is not None:
            domain.set_trusted_ca_db(ca)
        by_name = context.check_hostname and not _is_ip_address(self.owner.host)
        mode = domain_cls.VERIFY_PEER_NAME if by_name else domain_cls.VERIFY_PEER
        domain.set_peer_authentication(mode, ca)
        return domain

    def ca_bundle(self, context: _ssl.SSLContext) -> str | None:
        ders = context.get_ca_certs(binary_form=True)
        if not ders:
            paths = _ssl.get_default_verify_paths()
            return paths.cafile or paths.capath
        path = _CA_BUNDLES.acquire(ders)
        self.tls_files.append(path)
        return path

    def on_connection_opened(self) -> None:
        if self.owner.cbs:
            self.cbs_sender = self.container.create_sender(self.conn, target=_CBS, name=f"cbs-s-{uuid.uuid4()}")
            self.cbs_receiver = self.container.create_receiver(
                self.conn, source=_CBS, name=f"cbs-r-{uuid.uuid4()}", options=_Target("cbs"))
            self.put_token()
        else:
            self.attach_device_links()

    def put_token(self) -> None:
        proton = self.proton
        try:
            token = self.owner.next_token()
        except Exception as exc:
            self.fail(_to_error(exc, self.device_id))
            return
        msg_id = str(uuid.uuid4())
        audience = f"{self.owner.hub_host}/devices/{self.device_id}"
        msg = proton.Message(body=token, id=msg_id, reply_to="cbs")
        msg.properties = cast(Any, {"operation": "put-token", "type": "azure-devices.net:sastoken", "name": audience})
        try:
            expiry = float(parse_sas_token(token).expiry)
        except ValueError:
            expiry = None
        self.cbs_pending = msg_id
        self.pending_expiry = expiry
        self.cbs_sender.send(msg)

    def on_cbs_answer(self, message: Any) -> None:
        if message.correlation_id != self.cbs_pending:
            return
        self.cbs_pending = None
        props = message.properties or {}
        status = props.get("status-code")
        desc = props.get("status-description")
        try:
            err = translate_cbs(status if status is not None else "", desc, props)
        except ValueError as exc:
            err = make_error(_PROTOCOL, transport=TRANSPORT, device_id=self.device_id, exact=False,
                             message=f"CBS answer without a usable status-code: {status!r}")
            err.__cause__ = exc
        if err is not None:
            err.device_id = err.device_id or self.device_id
            err.__cause__ = AmqpRemoteError("cbs", str(status), desc if isinstance(desc, str) else None, props)
            self.fail(err)
            return
        self.renew_expiry = expiry = self.pending_expiry
        self._call(lambda: setattr(self, "token_expiry", expiry))
        if not self.cbs_done:
            self.cbs_done = True
            self.attach_device_links()
        self.schedule_renewal()

    def schedule_renewal(self) -> None:
        expiry = self.renew_expiry
        if expiry is None or not callable(self.owner._token):
            return
        lifetime = expiry - time.time()
        delay = max(1.0, lifetime * (1.0 - self.owner.renew_margin)) if lifetime > 0 else 1.0
        self.renew_task = self.container.schedule(delay, _Timer(self._renew))

    def _renew(self) -> None:
        if not self._stopped and self.cbs_pending is None:
            self.put_token()

    def attach_device_links(self) -> None:
        owner = self.owner
        self.sender = self.container.create_sender(self.conn, target=owner.events_address,
                                                   name=f"events-{uuid.uuid4()}")
        if owner.receive_c2d:
            self.receiver = self.container.create_receiver(
                self.conn, source=owner.c2d_address, name=f"c2d-{uuid.uuid4()}",
                options=_SettleSecond(self.proton) if owner.settle_mode == "second" else None)
        for kind in sorted(owner.subscriptions):
            self.create_pair(kind)

    def create_pair(self, kind: str) -> None:
        """Attach a twin or methods link pair, both with one channel correlation id (the hub pairs them)."""
        send_name, receive_name = _LINK_PAIRS[kind]
        if send_name in self.extra_links:
            return
        owner = self.owner
        address = owner.twin_address if kind == "twin" else owner.methods_address
        symbol = self.proton.symbol
        props = {symbol(_CHANNEL_ID): f"{kind}:{uuid.uuid4()}", symbol(_API_VERSION_KEY): owner.api_version}
        self.extra_links[send_name] = self.container.create_sender(
            self.conn, target=address, name=f"{send_name}-{uuid.uuid4()}", options=_Attach(props, kind))
        self.extra_links[receive_name] = self.container.create_receiver(
            self.conn, source=address, name=f"{receive_name}-{uuid.uuid4()}", options=_Attach(props, kind))

    def pairs_progress(self) -> None:
        """Links opened: subscribe to desired properties once the twin pair is up, wake attach waiters."""
        if "twin" in self.listen and not self.desired_sent and set(_LINK_PAIRS["twin"]) <= self.links_open:
            self.desired_sent = True
            self.do_twin("PUT", _TWIN_DESIRED, b" ", str(uuid.uuid4()), None)
        for waiter in list(self.attach_waiters):
            if set(_LINK_PAIRS[waiter[0]]) <= self.links_open:
                self.attach_waiters.remove(waiter)
                self.resolve(waiter[1])

    def on_link_opened(self, link: Any) -> None:
        remote = link.remote_target if link.is_sender else link.remote_source
        if remote.address is None and not remote.dynamic:
            return  # a refused attach (null terminus): the detach with the reason follows
        if link == self.sender:
            self.links_open.add("events")
        elif link == self.receiver:
            self.links_open.add("c2d")
        else:
            name = next((n for n, known in self.extra_links.items() if known == link), None)
            if name is None:
                return
            self.links_open.add(name)
            self.pairs_progress()
        wanted = {"events", "c2d"} if self.owner.receive_c2d else {"events"}
        for kind in self.owner.subscriptions:
            wanted.update(_LINK_PAIRS[kind])
        if wanted <= self.links_open and not self.ready_done:
            self.ready_done = True
            self.resolve(self.ready)

    # -- inbound (proton thread) --------------------------------------------------------------------

    def on_message(self, delivery: Any, message: Any) -> None:
        link = delivery.link
        if link == self.cbs_receiver:
            delivery.update(self.proton.Delivery.ACCEPTED)
            delivery.settle()
            self.on_cbs_answer(message)
            return
        if link == self.extra_links.get("twin-r") or link == self.extra_links.get("methods-r"):
            delivery.update(self.proton.Delivery.ACCEPTED)
            delivery.settle()
            if link == self.extra_links.get("twin-r"):
                self.on_twin_message(message)
            else:
                self.on_method_request(message)
            return
        if link != self.receiver:
            delivery.update(self.proton.Delivery.RELEASED)
            delivery.settle()
            return
        token = str(uuid.uuid4())
        self.c2d[token] = delivery
        body = message.body
        if isinstance(body, memoryview):
            body = bytes(body)
        elif isinstance(body, str):
            body = body.encode()
        elif not isinstance(body, bytes):
            body = repr(body).encode()
        msg_id = message.id
        corr = message.correlation_id
        count = message.delivery_count
        # proton's content_type / content_encoding getters answer symbol('None') when unset: read the C fields
        raw = getattr(message, "_msg", None)
        ctype = self.proton._message.pn_message_get_content_type(raw) if raw is not None else None
        cenc = self.proton._message.pn_message_get_content_encoding(raw) if raw is not None else None
        c2d = C2DMessage(self.device_id, token, str(msg_id) if msg_id is not None else None, body,
                         {str(k): str(v) for k, v in (message.properties or {}).items()},
                         count if isinstance(count, int) else 0, str(corr) if corr is not None else None,
                         str(ctype) if ctype is not None else None, str(cenc) if cenc is not None else None)
        self.emit(Inbound("c2d", c2d, self.device_id))

    def on_twin_message(self, message: Any) -> None:
        """A twin answer (matched by correlation id), or a desired-properties notification."""
        corr = message.correlation_id
        annotations = message.annotations or {}
        status = annotations.get("status")
        version = annotations.get("version")
        if isinstance(version, int) and not isinstance(version, bool):
            version = int(version)
        if isinstance(status, int) and not isinstance(status, bool):
            status = int(status)
        body = _body_bytes(message.body)
        key = str(corr) if corr is not None else None
        if key is not None and key in self.twin_requests:
            fut = self.twin_requests.pop(key)
            if fut is not None:
                self.resolve(fut, (status, version, body))
            else:
                err = _twin_error(status, body)
                if err is not None:
                    log.warning("%s: desired-property subscription refused: %s", self.device_id, err)
            return
        if key is None and body.strip():
            patch = _json(body)
            if not isinstance(patch, dict):
                log.warning("%s: desired-properties notification that is not a JSON object, dropped", self.device_id)
                return
            version = version if isinstance(version, int) and not isinstance(version, bool) else None
            if version is None and isinstance(patch.get("$version"), int):
                version = patch["$version"]
            self.emit(Inbound("twin_desired", DesiredPatch(patch, version), self.device_id))

    def on_method_request(self, message: Any) -> None:
        name = (message.properties or {}).get(_METHOD_NAME)
        corr = message.correlation_id
        rid = str(corr) if corr is not None else ""
        self.method_corr[rid] = corr
        while len(self.method_corr) > 1024:  # requests never answered: forget the oldest
            del self.method_corr[next(iter(self.method_corr))]
        call = MethodCall(str(name) if name is not None else "", rid, _json(_body_bytes(message.body)))
        self.emit(Inbound("method", call, self.device_id))

    def on_outcome(self, delivery: Any) -> None:
        """A sent delivery got its outcome (sender side)."""
        corr = self.request_sends.pop(delivery, None)
        if corr is not None:  # a twin request: accepted, its answer follows on the receiving link
            if delivery.remote_state != self.proton.Delivery.ACCEPTED:
                waiter = self.twin_requests.pop(corr, None)
                if waiter is not None:
                    self.resolve(waiter, exc=self._outcome_error(delivery))
            return
        fut = self.pending.pop(delivery, None)
        if fut is None:
            return
        if delivery.remote_state == self.proton.Delivery.ACCEPTED:
            self.resolve(fut)
            return
        self.resolve(fut, exc=self._outcome_error(delivery))

    def _outcome_error(self, delivery: Any) -> IoTHubError:
        dstate = self.proton.Delivery
        remote = delivery.remote_state
        cond = delivery.remote.condition
        if remote == dstate.REJECTED:
            if cond is None:
                err = translate("amqp:rejected", "delivery rejected with no condition")
                err.__cause__ = AmqpRemoteError("delivery", None, "rejected with no condition")
            else:
                err = _error_from_condition("delivery", cond, self.device_id)
        elif cond is not None:
            err = _error_from_condition("delivery", cond, self.device_id)
        else:  # released / modified with no reason: not delivered, safe to send again
            err = make_error(code_of("ServerBusy"), transport=TRANSPORT, device_id=self.device_id, exact=False,
                             message=f"delivery released by the peer (state {remote})")
        err.device_id = err.device_id or self.device_id
        return err

    def on_receiver_settled(self, delivery: Any) -> None:
        entry = self.settling.pop(delivery, None)
        if entry is None:
            return
        fut, _ = entry
        if delivery.remote_state == self.proton.Delivery.REJECTED and delivery.remote.condition is not None:
            err = _error_from_condition("delivery", delivery.remote.condition, self.device_id)
            self.resolve(fut, exc=err)
        else:
            self.resolve(fut)
        delivery.settle()

    # -- failures (proton thread) -------------------------------------------------------------------

    def endpoint_error(self, where: str, cond: Any) -> None:
        self.fail(_error_from_condition(where, cond, self.device_id))

    def fail(self, err: IoTHubError | None) -> None:
        """Tear the connection down: ``err`` None is our own clean close."""
        if self._stopped:
            return
        self._stopped = True
        if err is not None:
            err.device_id = err.device_id or self.device_id
        self.error = err
        if self.renew_task is not None:
            with contextlib.suppress(Exception):
                self.renew_task.cancel()
        ready_done = self.ready_done

        def mark_dead() -> None:
            self.dead = True
            self.error = err

        self._call(mark_dead)
        if err is not None and ready_done and not self.owner._closing:
            self.emit(Disconnected(err))  # first, so the supervisor learns the cause before the senders
        if not ready_done:
            self.resolve(self.ready, exc=err or make_error(_NOT_CONNECTED, transport=TRANSPORT,
                                                           device_id=self.device_id,
                                                           message="closed before the connection was up"))
        if err is None:
            gone = make_error(_TIMED_OUT, transport=TRANSPORT, device_id=self.device_id,
                              message="connection closed locally while the message was in flight (outcome unknown)")
        else:
            gone = _in_flight_error(err)
        for fut in self.pending.values():
            self.resolve(fut, exc=gone)
        self.pending.clear()
        for answer in self.twin_requests.values():
            if answer is not None:
                self.resolve(answer, exc=gone)
        self.twin_requests.clear()
        self.request_sends.clear()
        self.method_corr.clear()
        for _, attach in self.attach_waiters:
            self.resolve(attach, exc=err or make_error(_NOT_CONNECTED, transport=TRANSPORT, device_id=self.device_id,
                                                       message="closed before the links were attached"))
        self.attach_waiters.clear()
        lost = translate(_LOCK_LOST, "the connection closed before the hub confirmed the settlement")
        for fut, _ in self.settling.values():
            self.resolve(fut, exc=lost)
        self.settling.clear()
        self.c2d.clear()
        conn = self.conn
        if conn is not None and not conn.state & self.proton.Endpoint.LOCAL_CLOSED:
            conn.close()
        if conn is None or conn.transport is None:
            self.injector.close()
        # else: the injector stays open until the transport is gone (on_transport_closed), so that
        # joined() can still post do_abort when the peer never answers our close.

    def on_transport_closed(self, transport: Any) -> None:
        if not self._stopped:
            self.endpoint_error("transport", transport.condition if transport is not None else None)
        self.injector.close()
        # This container serves one connection and it is over: end run() now rather than after the
        # reactor's next idle select (up to ~3 s when the peer keeps its socket open).
        self.container.stop()


class _Bundles:
    """PEM files of trusted CAs for proton, one per distinct CA set, shared and reference-counted.

    Proton reads trust only from files; a thousand devices with the same context share one private
    (mode 0600) file, removed when the last connection using it ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, tuple[str, int]] = {}  # digest of the DER list -> (path, users)

    def acquire(self, ders: list[bytes]) -> str:
        digest = hashlib.sha256(b"".join(ders)).hexdigest()
        with self._lock:
            path, users = self._files.get(digest, ("", 0))
            if not users:
                fd, path = tempfile.mkstemp(prefix="amqp-ca-", suffix=".pem")
                with os.fdopen(fd, "w") as fh:
                    fh.writelines(_ssl.DER_cert_to_PEM_cert(der) for der in ders)
            self._files[digest] = (path, users + 1)
            return path

    def release(self, path: str) -> None:
        with self._lock:
            for digest, (known, users) in self._files.items():
                if known == path:
                    if users > 1:
                        self._files[digest] = (known, users - 1)
                    else:
                        del self._files[digest]
                        with contextlib.suppress(OSError):
                            os.unlink(known)
                    return


_CA_BUNDLES: Final = _Bundles()


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _is_active(link: Any, proton: Any) -> bool:
    state = link.state
    return bool(state & proton.Endpoint.LOCAL_ACTIVE) and not state & proton.Endpoint.REMOTE_CLOSED


class _Timer:
    """A proton timer-task handler calling ``fn``."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def on_timer_task(self, event: Any) -> None:
        self.fn()


class _Target:
    """Link option: the local target address of a receiver (CBS answers are addressed to it)."""

    def __init__(self, address: str) -> None:
        self.address = address

    def apply(self, link: Any) -> None:
        link.target.address = self.address

    def test(self, link: Any) -> bool:
        return bool(link.is_receiver)


class _Attach:
    """Link option for twin and method links: the attach properties, and our end's address."""

    def __init__(self, properties: dict[Any, Any], address: str) -> None:
        self.properties = properties
        self.address = address

    def apply(self, link: Any) -> None:
        link.properties = self.properties
        if link.is_sender:
            link.source.address = self.address
        else:
            link.target.address = self.address

    def test(self, link: Any) -> bool:
        return True


class _SettleSecond:
    """Link option: ask for receiver-settle-mode second, so the hub confirms each settlement."""

    def __init__(self, proton: Any) -> None:
        self.proton = proton

    def apply(self, link: Any) -> None:
        link.rcv_settle_mode = self.proton.Link.RCV_SECOND

    def test(self, link: Any) -> bool:
        return bool(link.is_receiver)


_HANDLER_CLASS: type[Any] | None = None


def _handler_class() -> type[Any]:
    """The proton handler class, built on first use so that importing this module does not import proton."""
    global _HANDLER_CLASS
    if _HANDLER_CLASS is not None:
        return _HANDLER_CLASS
    from proton.handlers import MessagingHandler

    class _Handler(MessagingHandler):  # type: ignore[misc]
        """Proton callbacks -> the bridge. Never lets MessagingHandler's defaults close or swallow."""

        def __init__(self, bridge: _Bridge) -> None:
            super().__init__(prefetch=bridge.owner.prefetch, auto_accept=False, auto_settle=True)
            self.bridge = bridge

        def on_start(self, event: Any) -> None:
            self.bridge.on_start(event.container)

        def on_amqp_cmd(self, event: Any) -> None:
            self.bridge.run_commands()

        def on_connection_opened(self, event: Any) -> None:
            self.bridge.on_connection_opened()

        def on_link_opened(self, event: Any) -> None:
            self.bridge.on_link_opened(event.link)

        def on_message(self, event: Any) -> None:
            self.bridge.on_message(event.delivery, event.message)

        def on_accepted(self, event: Any) -> None:
            self.bridge.on_outcome(event.delivery)

        def on_rejected(self, event: Any) -> None:
            self.bridge.on_outcome(event.delivery)

        def on_released(self, event: Any) -> None:
            self.bridge.on_outcome(event.delivery)

        def on_settled(self, event: Any) -> None:
            if event.delivery.link.is_receiver:
                self.bridge.on_receiver_settled(event.delivery)
            else:
                self.bridge.on_outcome(event.delivery)  # settled with no outcome we saw

        # Errors: every one tears the connection down with its translated cause.
        def on_connection_remote_close(self, event: Any) -> None:
            # MessagingHandler swallows amqp:connection:forced (for its own reconnect): not here.
            self.bridge.endpoint_error("connection", event.connection.remote_condition)

        def on_session_remote_close(self, event: Any) -> None:
            self.bridge.endpoint_error("session", event.session.remote_condition)

        def on_link_remote_close(self, event: Any) -> None:
            self.bridge.endpoint_error("link", event.link.remote_condition)

        def on_transport_error(self, event: Any) -> None:
            self.bridge.endpoint_error("transport", event.transport.condition)

        def on_transport_closed(self, event: Any) -> None:
            self.bridge.on_transport_closed(event.transport)

        # MessagingHandler's defaults log and close the connection; the bridge has handled it already.
        def on_connection_error(self, event: Any) -> None:
            pass

        def on_session_error(self, event: Any) -> None:
            pass

        def on_link_error(self, event: Any) -> None:
            pass

        def on_disconnected(self, event: Any) -> None:
            pass

    _HANDLER_CLASS = _Handler
    return _Handler

