"""The proton core shared by :class:`~adapters.amqp.transport.AmqpTransport` and the mux's devices.

One device's link work is the same whether its connection is its own or shared with 999 others:
the telemetry sender, the C2D receiver, the twin and direct-method link pairs, what is in flight on
them and how each outcome, answer or loss maps to an ``IoTHubError``. :class:`DeviceLinks` is that
work (proton thread), :class:`Stay` a device's stay on one connection as the loop sees it, and
:class:`DeviceSurface` the ``Transport`` requests built on them. What differs stays with the owner
of the connection: one connection and one thread per device (``AmqpTransport``), or a pool of shared
connections on one thread (``AmqpMux``).

Also here, for both: the cross-thread :class:`Plumbing` (batched both ways), the proton handler that
forwards events to its host, the ``SSLDomain`` mapping, CBS put-token and its answer, and the one
exception-mapping point. Nothing here imports proton at import time.
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
from typing import Any, Final, Protocol, cast

from adapters.amqp.translate import translate, translate_cbs
from gateway.codes import Action, code_of
from gateway.errors import IoTHubError, make_error
from gateway.normalize import normalize
from gateway.sas import parse_sas_token
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

log = logging.getLogger("adapters.amqp")

TRANSPORT: Final = "amqp"
NOT_CONNECTED: Final = code_of("NotConnected")
TIMED_OUT: Final = code_of("OperationTimedOut")
CLOSED: Final = code_of("DeviceConnectionClosedRemotely")
PROTOCOL: Final = code_of("ProtocolViolation")
LOCK_LOST: Final = "com.microsoft:message-lock-lost"
CBS: Final = "$cbs"

#: How a C2D settlement goes on the wire: complete -> accepted, reject -> rejected, abandon -> released.
DISPOSITIONS: Final[dict[str, str]] = {"complete": "ACCEPTED", "reject": "REJECTED", "abandon": "RELEASED"}

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
LINK_PAIRS: Final[dict[str, tuple[str, str]]] = {"twin": ("twin-s", "twin-r"), "methods": ("methods-s", "methods-r")}
_TWIN_REPORTED: Final = "/properties/reported"
_TWIN_DESIRED: Final = "/notifications/twin/properties/desired"
_METHOD_NAME: Final = "IoThub-methodname"
_METHOD_STATUS: Final = "IoThub-status"
_CREATION_TIME: Final = "iothub-creation-time-utc"  #: a message annotation, as the C# SDK sends it
# The condition a twin answer's error is read under: no condition exists on the wire (the status and the
# body say it all), and an unknown one lets translate() fall back on the status family.
_TWIN_ANSWER: Final = "iothub:twin-response"
#: direct-method requests never answered are forgotten beyond this many (oldest first)
_METHOD_MEMORY: Final = 1024


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


# -- errors -------------------------------------------------------------------------------------------


def not_connected(device_id: str | None, message: str) -> IoTHubError:
    return make_error(NOT_CONNECTED, transport=TRANSPORT, device_id=device_id, message=message)


def error_from_condition(where: str, cond: Any, device_id: str | None = None) -> IoTHubError:
    """Translate a proton ``Condition`` (or None) and chain the raw facts as ``__cause__``."""
    name = getattr(cond, "name", None) if cond is not None else None
    desc = getattr(cond, "description", None) if cond is not None else None
    info = getattr(cond, "info", None) if cond is not None else None
    if where == "transport" and isinstance(desc, str) and _IDLE_EXPIRED in desc:
        # proton's own idle timer fired (a silent peer, a half-open link): the connection is lost,
        # whatever the condition name (resource-limit-exceeded) would say about a hub's refusal
        err = make_error(CLOSED, transport=TRANSPORT, exact=False, device_id=device_id,
                         message="no frame from the peer within the idle timeout: the link is half-open or dead")
    else:
        err = translate(name, desc, info if isinstance(info, Mapping) else None)
    if device_id is not None and err.device_id is None:
        err.device_id = device_id
    err.__cause__ = AmqpRemoteError(where, name, desc, info if isinstance(info, Mapping) else None)
    return err


def to_error(exc: BaseException, device_id: str | None) -> IoTHubError:
    """What proton, OpenSSL or the OS raised, as an ``IoTHubError`` (one classification: ``normalize``)."""
    if isinstance(exc, IoTHubError):
        return exc
    return normalize(exc, transport=TRANSPORT, device_id=device_id)


@contextlib.contextmanager
def mapped(device_id: str | None) -> Iterator[None]:
    """The adapter's one exception-mapping point on the loop side (httpx's ``map_exceptions``).

    ``TypeError`` / ``ValueError`` (``UnsupportedRequest`` among them) pass through untouched: they are
    mistakes in the calling code, which a retry cannot fix.
    """
    try:
        yield
    except (IoTHubError, TypeError, ValueError):
        raise
    except Exception as exc:
        raise to_error(exc, device_id) from exc


def in_flight_error(cause: IoTHubError) -> IoTHubError:
    """What a send still waiting for settlement gets when the connection goes: outcome unknown.

    A cause whose action is already "reconnect" says that by itself; any other (a throttle, a refused
    credential) is for the supervisor to act on, so the send gets a plain "closed remotely" with it chained.
    """
    if cause.action is Action.RECONNECT and cause.code != NOT_CONNECTED:
        return cause
    err = make_error(CLOSED, transport=TRANSPORT, exact=False, tracking_id=cause.tracking_id,
                     device_id=cause.device_id,
                     message=f"connection lost while the message was in flight (outcome unknown): {cause.message}")
    err.__cause__ = cause
    return err


def copy_for(err: IoTHubError, device_id: str) -> IoTHubError:
    """A connection's error as one device's: same code, facts and cause, its own ``device_id``."""
    copy = make_error(err.info, transport=TRANSPORT, exact=err.exact, device_id=device_id, message=err.message,
                      native=dict(err.native), retry_after=getattr(err, "retry_after", None),
                      retry_at=getattr(err, "retry_at", None), tracking_id=getattr(err, "tracking_id", None))
    copy.__cause__ = err.__cause__
    return copy


def body_bytes(body: Any) -> bytes:
    if body is None:
        return b""
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    return repr(body).encode()


def json_value(payload: bytes) -> Any:
    """A JSON body as its value; anything else as the raw bytes (a device may answer with no JSON)."""
    if not payload.strip():
        return None
    try:
        return json.loads(payload)
    except ValueError:
        return payload


def twin_error(status: object, body: bytes) -> IoTHubError | None:
    """A twin answer's ``status`` annotation and body -> None (2xx, or no status) or the error it carries.

    The body's ``errorCode`` is exact; without one, the status family (``translate`` falls back on it).
    """
    if status is None:
        return None
    if not isinstance(status, int) or isinstance(status, bool):
        try:
            status = int(str(status).strip())
        except ValueError:
            err = make_error(PROTOCOL, transport=TRANSPORT, exact=False,
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


# -- CBS ----------------------------------------------------------------------------------------------


def put_token_message(proton: Any, token: str, audience: str) -> tuple[Any, str, float | None]:
    """A CBS put-token request for ``audience`` -> (message, its id, the token's epoch expiry or None)."""
    msg_id = str(uuid.uuid4())
    msg = proton.Message(body=token, id=msg_id, reply_to="cbs")
    msg.properties = cast(Any, {"operation": "put-token", "type": "azure-devices.net:sastoken", "name": audience})
    try:
        expiry: float | None = float(parse_sas_token(token).expiry)
    except ValueError:
        expiry = None
    return msg, msg_id, expiry


def cbs_answer_error(message: Any, device_id: str) -> IoTHubError | None:
    """A put-token answer -> None (accepted) or the device's error, the raw answer chained."""
    props = message.properties or {}
    status = props.get("status-code")
    desc = props.get("status-description")
    try:
        err = translate_cbs(status if status is not None else "", desc, props)
    except ValueError as exc:
        err = make_error(PROTOCOL, transport=TRANSPORT, device_id=device_id, exact=False,
                         message=f"CBS answer without a usable status-code: {status!r}")
        err.__cause__ = exc
    if err is None:
        return None
    err.device_id = err.device_id or device_id
    err.__cause__ = AmqpRemoteError("cbs", str(status), desc if isinstance(desc, str) else None, props)
    return err


def renewal_delay(expiry: float, margin: float, now: float | None = None) -> float:
    """Seconds until a token expiring at ``expiry`` (epoch) is put again: when ``margin`` of its life is left.

    The one wall-clock read of the renewal: a token's expiry is a calendar time, turned here, once, into a
    delay that the proton timer then counts on its own clock. ``now`` defaults to the wall clock.
    """
    lifetime = expiry - (time.time() if now is None else now)
    return max(1.0, lifetime * (1.0 - margin)) if lifetime > 0 else 1.0


# -- TLS ----------------------------------------------------------------------------------------------


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


CA_BUNDLES: Final = _Bundles()


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def ssl_domain(proton: Any, context: _ssl.SSLContext, host: str, tls_files: list[str]) -> Any:
    """The ``SSLContext``'s verification settings as a proton ``SSLDomain`` (proton has its own OpenSSL).

    CERT_NONE -> no verification. Otherwise the context's trusted CAs (a private PEM file from
    ``CA_BUNDLES``, appended to ``tls_files`` for the caller to release; the system's default paths if
    the context lists none) verify the chain, and ``check_hostname`` adds proton's name check against
    ``host``. Proton matches DNS names only (never an IP address SAN), so for an IP address as ``host``
    the chain alone is verified, as ``check_hostname=False`` does: trust a private CA for such a peer.
    """
    domain_cls = proton.SSLDomain
    domain = domain_cls(domain_cls.MODE_CLIENT)
    if context.verify_mode == _ssl.CERT_NONE:
        domain.set_peer_authentication(domain_cls.ANONYMOUS_PEER)
        return domain
    ders = context.get_ca_certs(binary_form=True)
    ca: str | None
    if ders:
        ca = CA_BUNDLES.acquire(ders)
        tls_files.append(ca)
    else:
        paths = _ssl.get_default_verify_paths()
        ca = paths.cafile or paths.capath
    if ca is not None:
        domain.set_trusted_ca_db(ca)
    by_name = context.check_hostname and not is_ip_address(host)
    domain.set_peer_authentication(domain_cls.VERIFY_PEER_NAME if by_name else domain_cls.VERIFY_PEER, ca)
    return domain


def connect_options(*, host: str, hub_host: str, tls_context: _ssl.SSLContext | None, idle_timeout: float | None,
                    proton: Any, tls_files: list[str], user: str | None = None,
                    password: str | None = None) -> dict[str, Any]:
    """``Container.connect`` keyword arguments: no proton reconnect, SNI, SASL, TLS, idle time-out."""
    kwargs: dict[str, Any] = {
        "reconnect": False,
        "virtual_host": hub_host,
        # TLS names are checked against where the socket goes (the hub itself, or a local stand-in)
        "sni": host if tls_context is not None and not is_ip_address(host) else None,
        "allow_insecure_mechs": True,
    }
    if user is not None:
        kwargs.update(user=user, password=password or "", allowed_mechs="PLAIN")
    else:
        kwargs["allowed_mechs"] = "ANONYMOUS"
    if tls_context is not None:
        kwargs["ssl_domain"] = ssl_domain(proton, tls_context, host, tls_files)
    if idle_timeout:
        kwargs["heartbeat"] = idle_timeout  # proton: our idle-time-out, advertised and enforced
    return kwargs


# -- link options -------------------------------------------------------------------------------------


def is_active(link: Any, proton: Any) -> bool:
    state = link.state
    return bool(state & proton.Endpoint.LOCAL_ACTIVE) and not state & proton.Endpoint.REMOTE_CLOSED


class Timer:
    """A proton timer-task handler calling ``fn``."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def on_timer_task(self, event: Any) -> None:
        self.fn()


class Target:
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


# -- cross-thread plumbing ----------------------------------------------------------------------------


class Plumbing:
    """Both directions between the asyncio loop and one proton thread, each batched.

    Commands go in through one ``EventInjector`` (one wake-up per batch); results come back with one
    ``call_soon_threadsafe`` per batch: the thread hop stays cheap under load. Once the proton thread
    has ended, the injector's descriptors are closed (their numbers may already belong to another
    socket) and ``post`` drops its command and writes nothing.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self.proton: Any = None
        self.injector: Any = None
        self._cmd_lock = threading.Lock()
        self._cmds: deque[Callable[[], None]] = deque()
        self._cmd_signalled = False
        self._pipe_closed = False  # under _cmd_lock: the injector's descriptors are closed, never write
        self._out_lock = threading.Lock()
        self._out: list[Callable[[], None]] = []
        self._out_scheduled = False

    def open_pipe(self, loop: asyncio.AbstractEventLoop) -> None:
        import proton
        import proton.reactor

        self._loop = loop
        self.proton = proton
        self.injector = proton.reactor.EventInjector()

    def close_pipe(self) -> None:
        """Close the injector's descriptors, under the command lock so that no ``post`` writes after."""
        with self._cmd_lock:
            if self._pipe_closed or self.injector is None:
                self._pipe_closed = True
                return
            self._pipe_closed = True
            for fd in self.injector.pipe:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def post(self, fn: Callable[[], None]) -> bool:
        """Run ``fn`` on the proton thread (any thread); False (and dropped) once the thread has ended."""
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
                    self.command_failed(exc)

    def command_failed(self, exc: Exception) -> None:
        """A command raised (a bug): the owner decides what it tears down."""

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread (from the proton thread). One loop wake-up per batch."""
        with self._out_lock:
            self._out.append(fn)
            if self._out_scheduled:
                return
            self._out_scheduled = True
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
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

        self.call(apply)


# -- one device's links -------------------------------------------------------------------------------


class DeviceSpec(Protocol):
    """What :class:`DeviceLinks` reads from its device's transport."""

    @property
    def device_id(self) -> str: ...
    @property
    def events_address(self) -> str: ...
    @property
    def c2d_address(self) -> str: ...
    @property
    def twin_address(self) -> str: ...
    @property
    def methods_address(self) -> str: ...
    @property
    def receive_c2d(self) -> bool: ...
    @property
    def settle_mode(self) -> str: ...
    @property
    def subscriptions(self) -> frozenset[str]: ...
    @property
    def api_version(self) -> str: ...


class Inbox:
    """A device's event queue for its one reader, lighter than ``asyncio.Queue`` (three deques and an
    Event per device add up at 10,000 devices); bounded in practice by the link credit (``prefetch``)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[TransportEvent | None] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: TransportEvent | None) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> TransportEvent | None:
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter
        return self._items.popleft()


class DeviceLinks:
    """One device's links on one connection and everything in flight on them (proton thread only).

    The links carry ``gw_links`` (this object) and ``gw_name`` ("events", "c2d", "twin-s", ...), so
    whoever owns the connection routes a proton event to its device without a lookup table.
    Results reach the loop through ``plumbing``; inbound events land in ``inbox``.
    """

    __slots__ = (
        "attach_waiters",
        "c2d",
        "container",
        "desired_sent",
        "device_id",
        "extra",
        "inbox",
        "method_corr",
        "open",
        "outgoing",
        "owner",
        "pending",
        "plumbing",
        "proton",
        "receiver",
        "request_sends",
        "sender",
        "settling",
        "spec",
        "stopped",
        "twin_requests",
        "up",
    )

    def __init__(self, spec: DeviceSpec, plumbing: Plumbing, inbox: Inbox, owner: Any = None) -> None:
        self.spec = spec
        self.device_id = spec.device_id
        self.plumbing = plumbing
        self.inbox = inbox
        self.owner = owner  #: the connection owner's handle for this device (routing back from a link)
        self.sender: Any = None
        self.receiver: Any = None
        self.extra: dict[str, Any] | None = None  # "twin-s", "twin-r", "methods-s", "methods-r" -> link
        self.open: set[str] = set()
        self.pending: dict[Any, asyncio.Future[None]] = {}
        self.c2d: dict[str, Any] | None = None
        self.settling: dict[Any, asyncio.Future[None]] | None = None
        self.twin_requests: dict[str, asyncio.Future[Any] | None] = {}  # correlation id -> answer
        self.request_sends: dict[Any, str] | None = None  # twin request delivery -> its correlation id
        self.method_corr: dict[str, Any] | None = None  # rid -> the request's correlation id, echoed as it came
        self.attach_waiters: list[tuple[str, asyncio.Future[None]]] | None = None
        self.desired_sent = False
        self.outgoing: Any = None
        self.stopped = False
        self.up = False
        self.proton: Any = plumbing.proton
        self.container: Any = None

    # -- attach ---------------------------------------------------------------------------------------

    def _tag(self, link: Any, name: str) -> Any:
        link.gw_links = self
        link.gw_name = name
        return link

    def attach(self, container: Any, parent: Any) -> None:
        """Open the device's links on ``parent`` (a connection's default session, or the device's own)."""
        spec = self.spec
        self.container = container
        self.sender = self._tag(container.create_sender(parent, target=spec.events_address,
                                                        name=f"events-{uuid.uuid4()}"), "events")
        if spec.receive_c2d:
            self.receiver = self._tag(container.create_receiver(
                parent, source=spec.c2d_address, name=f"c2d-{uuid.uuid4()}",
                options=_SettleSecond(self.proton) if spec.settle_mode == "second" else None), "c2d")
        for kind in sorted(spec.subscriptions):
            self.create_pair(kind, parent)

    def create_pair(self, kind: str, parent: Any = None) -> None:
        """Attach a twin or methods link pair, both with one channel correlation id (the hub pairs them)."""
        send_name, receive_name = LINK_PAIRS[kind]
        extra = self.extra
        if extra is None:
            extra = self.extra = {}
        if send_name in extra:
            return
        if parent is None:
            parent = self.sender.session
        spec = self.spec
        address = spec.twin_address if kind == "twin" else spec.methods_address
        symbol = self.proton.symbol
        props = {symbol(_CHANNEL_ID): f"{kind}:{uuid.uuid4()}", symbol(_API_VERSION_KEY): spec.api_version}
        extra[send_name] = self._tag(self.container.create_sender(
            parent, target=address, name=f"{send_name}-{uuid.uuid4()}", options=_Attach(props, kind)), send_name)
        extra[receive_name] = self._tag(self.container.create_receiver(
            parent, source=address, name=f"{receive_name}-{uuid.uuid4()}", options=_Attach(props, kind)),
            receive_name)

    def endpoints(self) -> list[Any]:
        """Every link of the device (to close them on a session shared with other devices)."""
        links = [self.sender, self.receiver, *(self.extra or {}).values()]
        return [link for link in links if link is not None]

    def on_link_opened(self, link: Any) -> bool:
        """A link of ours attached; True once, when every link the device needs is up."""
        remote = link.remote_target if link.is_sender else link.remote_source
        if remote.address is None and not remote.dynamic:
            return False  # a refused attach (null terminus): the detach with the reason follows
        name = getattr(link, "gw_name", None)
        if name is None or self.stopped:
            return False
        self.open.add(name)
        if name not in ("events", "c2d"):
            self._pairs_progress()
        if self.up:
            return False
        spec = self.spec
        if "events" not in self.open or (spec.receive_c2d and "c2d" not in self.open):
            return False
        for kind in spec.subscriptions:
            if not set(LINK_PAIRS[kind]) <= self.open:
                return False
        self.up = True
        return True

    def _pairs_progress(self) -> None:
        """Links opened: subscribe to desired properties once the twin pair is up, wake attach waiters."""
        if "twin" in self.spec.subscriptions and not self.desired_sent and set(LINK_PAIRS["twin"]) <= self.open:
            self.desired_sent = True
            self.do_twin("PUT", _TWIN_DESIRED, b" ", str(uuid.uuid4()), None)
        waiters = self.attach_waiters
        for waiter in list(waiters or ()):
            if set(LINK_PAIRS[waiter[0]]) <= self.open:
                cast(list[Any], waiters).remove(waiter)
                self.plumbing.resolve(waiter[1])

    # -- commands -------------------------------------------------------------------------------------

    def _fail_now(self, fut: asyncio.Future[Any] | None, what: str) -> None:
        if fut is not None:
            self.plumbing.resolve(fut, exc=not_connected(self.device_id, f"{what}: not connected"))

    def do_send(self, message: Message, fut: asyncio.Future[None]) -> None:
        sender = self.sender
        if self.stopped or sender is None or not is_active(sender, self.proton):
            self.plumbing.resolve(fut, exc=not_connected(self.device_id,
                                                         "the telemetry link is not open; nothing was sent"))
            return
        # One proton Message, reused: send() encodes it at once, and every cffi call made here rather
        # than on the loop thread is a GIL hand-over the two threads do not fight over.
        pmsg = self.outgoing
        if pmsg is None:
            pmsg = self.outgoing = self.proton.Message(inferred=True)
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
        dlv = self.c2d.pop(token, None) if self.c2d is not None else None
        if dlv is None or self.stopped:
            err = translate(LOCK_LOST, f"lock token {token!r} is not held on this connection")
            err.device_id = self.device_id
            self.plumbing.resolve(fut, exc=err)
            return
        dlv.update(getattr(self.proton.Delivery, DISPOSITIONS[outcome]))
        if dlv.link.remote_rcv_settle_mode == self.proton.Link.RCV_SECOND:
            if self.settling is None:
                self.settling = {}
            self.settling[dlv] = fut  # the hub settles; a late settlement is rejected
        else:
            dlv.settle()
            self.plumbing.resolve(fut)

    def do_attach(self, kind: str, fut: asyncio.Future[None]) -> None:
        if self.stopped or self.sender is None:
            self._fail_now(fut, f"cannot attach the {kind} links")
            return
        self.create_pair(kind)
        if self.attach_waiters is None:
            self.attach_waiters = []
        self.attach_waiters.append((kind, fut))
        self._pairs_progress()

    def do_twin(self, operation: str, resource: str | None, body: bytes, corr: str,
                fut: asyncio.Future[Any] | None) -> None:
        """Send one twin request; ``fut`` (None: nobody waits) gets (status, version, body) of the answer."""
        sender = (self.extra or {}).get("twin-s")
        if self.stopped or sender is None or not is_active(sender, self.proton):
            if fut is not None:
                self.plumbing.resolve(fut, exc=not_connected(self.device_id,
                                                             "the twin link is not open; nothing was sent"))
            return
        symbol = self.proton.symbol
        msg = self.proton.Message(correlation_id=corr, body=body, inferred=True)
        annotations: dict[Any, Any] = {symbol("operation"): operation}
        if resource is not None:
            annotations[symbol("resource")] = resource
        msg.annotations = cast(Any, annotations)
        self.twin_requests[corr] = fut
        if self.request_sends is None:
            self.request_sends = {}
        self.request_sends[sender.send(msg)] = corr

    def forget_twin(self, corr: str) -> None:
        self.twin_requests.pop(corr, None)

    def do_method_response(self, rid: str, status: int, body: bytes, fut: asyncio.Future[None]) -> None:
        sender = (self.extra or {}).get("methods-s")
        if self.stopped or sender is None or not is_active(sender, self.proton):
            self.plumbing.resolve(fut, exc=not_connected(self.device_id,
                                                         "the methods link is not open; nothing was sent"))
            return
        corr = self.method_corr.pop(rid, rid) if self.method_corr is not None else rid
        msg = self.proton.Message(correlation_id=corr, body=body, inferred=True)
        msg.properties = cast(Any, {_METHOD_STATUS: self.proton.int32(status)})
        self.pending[sender.send(msg)] = fut

    # -- inbound --------------------------------------------------------------------------------------

    def emit(self, event: TransportEvent | None) -> None:
        inbox = self.inbox
        self.plumbing.call(lambda: inbox.put_nowait(event))

    def on_message(self, delivery: Any, message: Any) -> None:
        name = getattr(delivery.link, "gw_name", None)
        if name in ("twin-r", "methods-r") and not self.stopped:
            delivery.update(self.proton.Delivery.ACCEPTED)
            delivery.settle()
            if name == "twin-r":
                self._on_twin_message(message)
            else:
                self._on_method_request(message)
            return
        if name != "c2d" or self.stopped:
            delivery.update(self.proton.Delivery.RELEASED)
            delivery.settle()
            return
        token = str(uuid.uuid4())
        if self.c2d is None:
            self.c2d = {}
        self.c2d[token] = delivery
        msg_id, corr, count = message.id, message.correlation_id, message.delivery_count
        # proton's content_type / content_encoding getters answer symbol('None') when unset: read the C fields
        raw = getattr(message, "_msg", None)
        ctype = self.proton._message.pn_message_get_content_type(raw) if raw is not None else None
        cenc = self.proton._message.pn_message_get_content_encoding(raw) if raw is not None else None
        c2d = C2DMessage(self.device_id, token, str(msg_id) if msg_id is not None else None,
                         body_bytes(message.body), {str(k): str(v) for k, v in (message.properties or {}).items()},
                         count if isinstance(count, int) else 0, str(corr) if corr is not None else None,
                         str(ctype) if ctype is not None else None, str(cenc) if cenc is not None else None)
        self.emit(Inbound("c2d", c2d, self.device_id))

    def _on_twin_message(self, message: Any) -> None:
        """A twin answer (matched by correlation id), or a desired-properties notification."""
        corr = message.correlation_id
        annotations = message.annotations or {}
        status = annotations.get("status")
        version = annotations.get("version")
        if isinstance(version, int) and not isinstance(version, bool):
            version = int(version)
        if isinstance(status, int) and not isinstance(status, bool):
            status = int(status)
        body = body_bytes(message.body)
        key = str(corr) if corr is not None else None
        if key is not None and key in self.twin_requests:
            fut = self.twin_requests.pop(key)
            if fut is not None:
                self.plumbing.resolve(fut, (status, version, body))
            else:
                err = twin_error(status, body)
                if err is not None:
                    log.warning("%s: desired-property subscription refused: %s", self.device_id, err)
            return
        if key is None and body.strip():
            patch = json_value(body)
            if not isinstance(patch, dict):
                log.warning("%s: desired-properties notification that is not a JSON object, dropped", self.device_id)
                return
            version = version if isinstance(version, int) and not isinstance(version, bool) else None
            if version is None and isinstance(patch.get("$version"), int):
                version = patch["$version"]
            self.emit(Inbound("twin_desired", DesiredPatch(patch, version), self.device_id))

    def _on_method_request(self, message: Any) -> None:
        name = (message.properties or {}).get(_METHOD_NAME)
        corr = message.correlation_id
        rid = str(corr) if corr is not None else ""
        if self.method_corr is None:
            self.method_corr = {}
        self.method_corr[rid] = corr
        while len(self.method_corr) > _METHOD_MEMORY:  # requests never answered: forget the oldest
            del self.method_corr[next(iter(self.method_corr))]
        call = MethodCall(str(name) if name is not None else "", rid, json_value(body_bytes(message.body)))
        self.emit(Inbound("method", call, self.device_id))

    def on_outcome(self, delivery: Any) -> None:
        """A sent delivery got its outcome (sender side)."""
        corr = self.request_sends.pop(delivery, None) if self.request_sends else None
        if corr is not None:  # a twin request: accepted, its answer follows on the receiving link
            if delivery.remote_state != self.proton.Delivery.ACCEPTED:
                waiter = self.twin_requests.pop(corr, None)
                if waiter is not None:
                    self.plumbing.resolve(waiter, exc=self._outcome_error(delivery))
            return
        fut = self.pending.pop(delivery, None)
        if fut is None:
            return
        if delivery.remote_state == self.proton.Delivery.ACCEPTED:
            self.plumbing.resolve(fut)
            return
        self.plumbing.resolve(fut, exc=self._outcome_error(delivery))

    def _outcome_error(self, delivery: Any) -> IoTHubError:
        dstate = self.proton.Delivery
        remote = delivery.remote_state
        cond = delivery.remote.condition
        if remote == dstate.REJECTED and cond is None:
            err = translate("amqp:rejected", "delivery rejected with no condition")
            err.__cause__ = AmqpRemoteError("delivery", None, "rejected with no condition")
        elif cond is not None:
            err = error_from_condition("delivery", cond, self.device_id)
        else:  # released / modified with no reason: not delivered, safe to send again
            err = make_error(code_of("ServerBusy"), transport=TRANSPORT, device_id=self.device_id, exact=False,
                             message=f"delivery released by the peer (state {remote})")
        err.device_id = err.device_id or self.device_id
        return err

    def on_receiver_settled(self, delivery: Any) -> None:
        fut = self.settling.pop(delivery, None) if self.settling else None
        if fut is None:
            return
        if delivery.remote_state == self.proton.Delivery.REJECTED and delivery.remote.condition is not None:
            self.plumbing.resolve(fut, exc=error_from_condition("delivery", delivery.remote.condition,
                                                                self.device_id))
        else:
            self.plumbing.resolve(fut)
        delivery.settle()

    # -- the end ----------------------------------------------------------------------------------------

    def stop(self, err: IoTHubError | None) -> None:
        """The device's stay on this connection is over (``err`` None: a clean local close): everything
        in flight fails with what its caller must know (outcome unknown for sends, lock lost for settles)."""
        if self.stopped:
            return
        self.stopped = True
        resolve = self.plumbing.resolve
        if err is None:
            gone = make_error(TIMED_OUT, transport=TRANSPORT, device_id=self.device_id,
                              message="connection closed locally while the message was in flight (outcome unknown)")
        else:
            gone = in_flight_error(err)
        for fut in self.pending.values():
            resolve(fut, exc=gone)
        self.pending.clear()
        for answer in self.twin_requests.values():
            if answer is not None:
                resolve(answer, exc=gone)
        self.twin_requests.clear()
        self.request_sends = self.method_corr = None
        for _, attach in self.attach_waiters or ():
            resolve(attach, exc=err or not_connected(self.device_id, "closed before the links were attached"))
        self.attach_waiters = None
        if self.settling:
            lost = translate(LOCK_LOST, "the connection closed before the hub confirmed the settlement")
            lost.device_id = self.device_id
            for fut in self.settling.values():
                resolve(fut, exc=lost)
        self.settling = self.c2d = None


# -- the loop side --------------------------------------------------------------------------------------


class Stay:
    """A device's stay on one connection, as the loop sees it; ``post`` reaches its proton thread."""

    def __init__(self, device_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.device_id = device_id
        self.loop = loop
        self.ready: asyncio.Future[None] = loop.create_future()
        self.events = Inbox()
        self.waiters: set[asyncio.Future[Any]] = set()
        self.ready_done = False
        self.attached: set[str] = set()  # link pairs ("twin", "methods") known open, loop side
        self.dead = False  # set on the loop thread once the stay is over
        self.error: IoTHubError | None = None
        self.token_expiry: float | None = None  # epoch expiry of the token last put on $cbs
        self.links: DeviceLinks

    def post(self, fn: Callable[[], None]) -> bool:
        raise NotImplementedError

    def gone_error(self) -> IoTHubError:
        cause = self.error
        if cause is None:
            return not_connected(self.device_id, "the AMQP connection is closed")
        return in_flight_error(cause)

    def end(self, err: IoTHubError | None) -> None:
        """Loop side: the stay is over; whoever still waits learns it."""
        self.dead = True
        self.error = err
        for fut in list(self.waiters):
            if not fut.done():
                fut.set_exception(self.gone_error())

    async def wait(self, fut: asyncio.Future[Any], timeout: float, what: str, *, in_flight: bool = False) -> Any:
        if self.dead and not fut.done():
            fut.set_exception(self.gone_error())
        self.waiters.add(fut)
        try:
            async with asyncio.timeout(timeout):
                return await fut  # on timeout fut is cancelled; a late result is then dropped
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                raise  # the answer itself was a timeout (OperationTimedOut is a TimeoutError too)
            raise make_error(TIMED_OUT, transport=TRANSPORT, device_id=self.device_id,
                             message=f"AMQP {what} got no answer within {timeout:g}s"
                                     + (" (outcome unknown)" if in_flight else "")) from None
        finally:
            self.waiters.discard(fut)

    def send_deadline(self, fut: asyncio.Future[None], timeout: float) -> None:
        """Fail ``fut`` with OperationTimedOut (outcome unknown) if unsettled after ``timeout`` (loop clock).

        A loop timer rather than ``asyncio.timeout``: no cancellation machinery per message."""
        device_id = self.device_id

        def expire() -> None:
            if not fut.done():
                fut.set_exception(make_error(TIMED_OUT, transport=TRANSPORT, device_id=device_id,
                                             message=f"AMQP send got no settlement within {timeout:g}s "
                                                     "(outcome unknown)"))

        timer = self.loop.call_at(self.loop.time() + timeout, expire)
        self.waiters.add(fut)  # failed at once if the stay ends first
        waiters = self.waiters

        def settled(done: asyncio.Future[None]) -> None:
            timer.cancel()
            waiters.discard(done)

        fut.add_done_callback(settled)


class DeviceSurface:
    """The device ``Transport`` requests, the same over a connection of its own or a shared one.

    Subclasses provide ``device_id``, ``subscriptions``, ``send_timeout``, ``settle_timeout`` and
    ``_stay()`` (the current :class:`Stay` or None).
    """

    device_id: str
    subscriptions: frozenset[str]
    send_timeout: float
    settle_timeout: float

    def _stay(self) -> Stay | None:
        raise NotImplementedError

    @property
    def connected(self) -> bool:
        stay = self._stay()
        return stay is not None and stay.ready_done and not stay.dead

    def _live(self) -> Stay:
        stay = self._stay()
        if stay is None or stay.dead or not stay.ready_done:
            cause = stay.error if stay is not None else None
            err = not_connected(self.device_id, "not connected" + (f" ({cause.name}: {cause.message})"
                                                                   if cause else ""))
            err.__cause__ = cause
            raise err
        return stay

    async def send(self, message: Message) -> None:
        """Send one telemetry message and wait until the peer settles it (accepted)."""
        check_properties(message, TRANSPORT)
        stay = self._live()
        fut: asyncio.Future[None] = stay.loop.create_future()
        links = stay.links
        stay.post(lambda: links.do_send(message, fut))
        stay.send_deadline(fut, self.send_timeout)
        await fut

    async def settle(self, lock_token: str, outcome: SettleOutcome = "complete", *,
                     timeout: float | None = None) -> None:
        """Complete (accepted), reject (rejected: dead-letter) or abandon (released: redeliver) a C2D message.

        Waits for the hub's own settlement: a late one comes back as ``DeviceMessageLockLost``. An
        unknown ``outcome`` raises ``ValueError`` at once (a programming error, never retried).
        """
        if outcome not in DISPOSITIONS:
            raise ValueError(f"unknown settle outcome {outcome!r}: complete, reject or abandon")
        stay = self._live()
        fut: asyncio.Future[None] = stay.loop.create_future()
        links = stay.links
        stay.post(lambda: links.do_settle(lock_token, outcome, fut))
        await stay.wait(fut, timeout if timeout is not None else self.settle_timeout, "settle")

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
        stay = self._live()
        links = stay.links
        loop = stay.loop
        deadline = loop.time() + timeout
        if "twin" not in stay.attached:
            attached: asyncio.Future[None] = loop.create_future()
            stay.post(lambda: links.do_attach("twin", attached))
            await stay.wait(attached, timeout, "twin link attach")
            stay.attached.add("twin")
        corr = str(uuid.uuid4())
        fut: asyncio.Future[tuple[object, object, bytes]] = loop.create_future()
        stay.post(lambda: links.do_twin(operation, resource, body, corr, fut))
        try:
            status, version, answer = await stay.wait(fut, max(0.0, deadline - loop.time()), f"twin {operation}",
                                                      in_flight=operation == "PATCH")
        finally:
            if not fut.done() or fut.cancelled():
                stay.post(lambda: links.forget_twin(corr))  # a no-op once the connection is gone
        err = twin_error(status, answer)
        if err is not None:
            err.device_id = err.device_id or self.device_id
            raise err
        if operation == "PATCH":
            return version if isinstance(version, int) and not isinstance(version, bool) else None
        return json_value(answer)

    async def _method_response(self, request: RespondMethod, timeout: float) -> None:
        if not isinstance(request.status, int) or isinstance(request.status, bool):
            raise TypeError(f"RespondMethod.status must be an int, not {type(request.status).__name__}")
        if not -(2**31) <= request.status < 2**31:  # IoThub-status is an AMQP int
            raise ValueError(f"RespondMethod.status {request.status} does not fit a 32-bit int")
        body = json.dumps(request.payload).encode()  # a payload JSON cannot carry is the caller's TypeError
        stay = self._live()
        links = stay.links
        fut: asyncio.Future[None] = stay.loop.create_future()
        rid, status = str(request.rid), request.status
        stay.post(lambda: links.do_method_response(rid, status, body, fut))
        await stay.wait(fut, timeout, "method response", in_flight=True)

    async def events(self) -> AsyncIterator[TransportEvent]:
        """``Inbound("c2d", C2DMessage)``, ``Inbound("method", MethodCall)`` and
        ``Inbound("twin_desired", DesiredPatch)``, then ``Disconnected``."""
        stay = self._stay()
        if stay is None:
            return
        while True:
            event = await stay.events.get()
            if event is None:
                return
            yield event
            if isinstance(event, Disconnected):
                return


def subscriptions_of(subscribe: Iterable[str]) -> frozenset[str]:
    subscriptions = frozenset(subscribe)
    unknown = subscriptions - set(LINK_PAIRS)
    if unknown:
        raise ValueError(f"unknown subscription(s) {sorted(unknown)}: use 'twin' and/or 'methods'")
    return subscriptions


# -- the proton handler -------------------------------------------------------------------------------


class Host(Protocol):
    """What the proton handler forwards events to: the owner of one or more connections."""

    prefetch: int

    def on_start(self, container: Any) -> None: ...
    def run_commands(self) -> None: ...
    def on_connection_opened(self, connection: Any) -> None: ...
    def on_link_opened(self, link: Any) -> None: ...
    def on_message(self, delivery: Any, message: Any) -> None: ...
    def on_remote_open(self, endpoint: Any) -> None: ...
    def endpoint_error(self, where: str, endpoint: Any, cond: Any) -> None: ...
    def on_transport_closed(self, connection: Any, transport: Any) -> None: ...


def on_outcome(delivery: Any) -> None:
    links: DeviceLinks | None = getattr(delivery.link, "gw_links", None)
    if links is not None:
        links.on_outcome(delivery)


_HANDLER_CLASS: type[Any] | None = None


def handler_class() -> type[Any]:
    """The proton handler class, built on first use so that importing this module does not import proton."""
    global _HANDLER_CLASS
    if _HANDLER_CLASS is not None:
        return _HANDLER_CLASS
    from proton.handlers import MessagingHandler

    class _Handler(MessagingHandler):  # type: ignore[misc]
        """Proton callbacks -> the host. Never lets MessagingHandler's defaults close or swallow."""

        def __init__(self, host: Host) -> None:
            super().__init__(prefetch=host.prefetch, auto_accept=False, auto_settle=True)
            self.host = host

        def on_start(self, event: Any) -> None:
            self.host.on_start(event.container)

        def on_amqp_cmd(self, event: Any) -> None:
            self.host.run_commands()

        def on_connection_opened(self, event: Any) -> None:
            self.host.on_connection_opened(event.connection)

        def on_link_opened(self, event: Any) -> None:
            self.host.on_link_opened(event.link)

        def on_message(self, event: Any) -> None:
            self.host.on_message(event.delivery, event.message)

        def on_accepted(self, event: Any) -> None:
            on_outcome(event.delivery)

        def on_rejected(self, event: Any) -> None:
            on_outcome(event.delivery)

        def on_released(self, event: Any) -> None:
            on_outcome(event.delivery)

        def on_settled(self, event: Any) -> None:
            delivery = event.delivery
            links: DeviceLinks | None = getattr(delivery.link, "gw_links", None)
            if links is None:
                return
            if delivery.link.is_receiver:
                links.on_receiver_settled(delivery)
            else:
                links.on_outcome(delivery)  # settled with no outcome we saw

        # (MessagingHandler's child handlers get these events too: proton dispatches to both)
        def on_session_remote_open(self, event: Any) -> None:
            self.host.on_remote_open(event.session)

        def on_link_remote_open(self, event: Any) -> None:
            self.host.on_remote_open(event.link)

        # Errors: the host decides whom each one reaches.
        def on_connection_remote_close(self, event: Any) -> None:
            # MessagingHandler swallows amqp:connection:forced (for its own reconnect): not here.
            self.host.endpoint_error("connection", event.connection, event.connection.remote_condition)

        def on_session_remote_close(self, event: Any) -> None:
            self.host.endpoint_error("session", event.session, event.session.remote_condition)

        def on_link_remote_close(self, event: Any) -> None:
            self.host.endpoint_error("link", event.link, event.link.remote_condition)

        def on_transport_error(self, event: Any) -> None:
            self.host.endpoint_error("transport", event.connection, event.transport.condition)

        def on_transport_closed(self, event: Any) -> None:
            self.host.on_transport_closed(event.connection, event.transport)

        # MessagingHandler's defaults log and close the connection; the host has handled it already.
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
