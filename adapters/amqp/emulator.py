"""The emulator's AMQP front: IoT Hub's AMQP device surface on a proton listener, for tests and demos.

It runs its own proton ``Container`` in one thread and plays the parts of IoT Hub a device sees:
SASL ANONYMOUS or PLAIN, claims-based security (put-token on ``$cbs``, answered with a
``status-code`` in the application properties), telemetry on ``/devices/{id}/messages/events`` and
cloud-to-device messages on ``/devices/{id}/messages/devicebound`` with a lock that expires. A second
attach for the same device and link kind detaches the first with ``amqp:link:stolen``.

Connections may be multiplexed, as IoT Hub allows: many devices on one connection, each with its own
put-token on the connection's ``$cbs`` and its own links (and session). A fault then targets one device
(``"delivery"``, ``"link"``, ``"cbs"``), that device's link's ``"session"`` (every device on it: one
when each device has its own session, as the Azure SDKs open them) or the whole ``"connection"``.

Failures come from the hub's shared :class:`~gateway.emulator.FaultPlan` and are put on the wire by
:func:`adapters.amqp.translate.render`, so what the adapter reads back is the catalog's own form.
``Fault.form`` picks where an ERROR lands: ``"delivery"`` (reject it; telemetry's default),
``"link"``, ``"session"``, ``"connection"`` (CONNECT's default) or ``"cbs"`` (the put-token answer;
CONNECT's default on a connection that already carries other devices, so one device's refusal leaves
its neighbours alone);
``"<where>:<n>"`` picks the n-th wire form ``render`` offers (``-1``: the generic one).

Proton is imported when the front starts, not when this module is imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final, cast
from urllib.parse import unquote

from adapters.amqp.translate import RenderedCondition, render
from gateway.codes import code_of, lookup
from gateway.emulator.faults import Fault, FaultKind, Operation
from gateway.emulator.front import FrontConfig
from gateway.emulator.hub import Hub, MethodInvoker, Received, Settlement

__all__ = ["AmqpFront"]

log = logging.getLogger(__name__)

_LINK_RE: Final = re.compile(r"/devices/([^/]+)/(messages/events|messages/devicebound|twin|methods/devicebound)/?$",
                             re.IGNORECASE)
# the link's path -> its kind; twin and method links come in pairs, "-out" being the front's sending end
_KINDS: Final = {"messages/events": "events", "messages/devicebound": "devicebound", "twin": "twin",
                 "methods/devicebound": "methods"}
_CHANNEL_ID: Final = "com.microsoft:channel-correlation-id"
_TWIN_REPORTED: Final = "/properties/reported"
_TWIN_DESIRED: Final = "/notifications/twin/properties/desired"
_METHOD_NAME: Final = "IoThub-methodname"
_METHOD_STATUS: Final = "IoThub-status"
_AUDIENCE_RE: Final = re.compile(r"devices/([^/?]+)")
_CBS: Final = "$cbs"
#: the service side: C2D messages go in on this link, feedback comes out on the other
_SERVICE_C2D: Final = "/messages/devicebound"
_FEEDBACK: Final = "/messages/servicebound/feedback"
_TO_RE: Final = re.compile(r"^/devices/([^/]+)/messages/devicebound/?$", re.IGNORECASE)
_FEEDBACK_TYPE: Final = "application/vnd.microsoft.iothub.feedback.json"
#: the built-in Event Hub-compatible endpoint: telemetry read the way back ends read it
_EH_RE: Final = re.compile(r"^(?:amqps?://[^/]+)?/?([^/]+)/ConsumerGroups/([^/]+)/Partitions/(\d+)/?$", re.IGNORECASE)
_EH_SELECTOR: Final = re.compile(
    r"amqp\.annotation\.x-opt-(offset|sequence-number|enqueued-time)\s*(>=|>)\s*'?([^']*)'?")
_MANAGEMENT: Final = "$management"
_MAX_PENDING_ANSWERS: Final = 16  #: CBS answers held for a reply link not yet attached (bounded)
_ANSWER_TURN: Final = 0.001  #: seconds between looks at whether a connection's output is written
_MAX_ANSWER_TURNS: Final = 100  #: looks before a connection's CBS answers go anyway (bounded: 0.1 s)
_URL_RE: Final = re.compile(r"^amqps?://[^/]*", re.IGNORECASE)  #: scheme and host, when a client names them
PARTITIONS: Final = 2  # the emulator's partition count (IoT Hub's default is 4; 2 keeps tests small)

_UNAUTHORIZED: Final = code_of("IotHubUnauthorized")
_REFUSED: Final = code_of("IotHubUnauthorizedAccess")
_DISABLED: Final = code_of("DeviceDisabled")
_NOT_FOUND: Final = code_of("DeviceNotFound")
_ADDRESS: Final = code_of("AmqpAddressNotFound")
_STOLEN: Final = code_of("LinkCreationConflict")
_NEW_CONNECTION: Final = code_of("ConnectionForcefullyClosedOnNewConnection")
_LOCK_LOST: Final = code_of("DeviceMessageLockLost")
_ARGUMENT: Final = code_of("ArgumentInvalid")
_QUEUE_FULL: Final = code_of("DeviceMaximumQueueDepthExceeded")
# Hub.authenticate's reason -> (put-token status, the code in its description).
_CBS_REFUSALS: Final[dict[str, tuple[int, int]]] = {
    "unknown": (404, _NOT_FOUND),
    "disabled": (401, _DISABLED),
    "malformed": (401, _REFUSED),
    "mismatch": (401, _REFUSED),
    "expired": (401, _UNAUTHORIZED),
}


_DEFAULT_CONFIG: Final = FrontConfig()
_MAX_HELD: Final = 1000  # stalled connections kept open at most


def _twin_status(code: int) -> int:
    """The status a twin answer carries for a code: its HTTP status, else its family's."""
    info = lookup(code)
    return info.http_status or info.family_status


def _method_body(body: Any) -> Any:
    raw = bytes(body) if isinstance(body, (bytes, bytearray, memoryview)) else \
        body.encode() if isinstance(body, str) else None
    if not raw or not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


class AmqpFront:
    """IoT Hub's AMQP face of ``hub``. TLS needs ``cert_file``/``key_file`` (proton reads files).

    ``lock_timeout`` is how long a device may hold a cloud-to-device message before its settlement
    is refused with ``com.microsoft:message-lock-lost``; ``clock`` tells the time (inject one in tests).
    """

    transport = "amqp"

    def __init__(
        self,
        hub: Hub,
        config: FrontConfig = _DEFAULT_CONFIG,
        *,
        cert_file: str | None = None,
        key_file: str | None = None,
        lock_timeout: float = 60.0,
        clock: Callable[[], float] = time.time,
        c2d_poll: float = 0.02,
        prefetch: int = 100,
        offer_mssbcbs: bool = False,
    ) -> None:
        if config.ssl_context is not None and not offer_mssbcbs and (cert_file is None or key_file is None):
            raise ValueError("proton cannot use an ssl.SSLContext: pass cert_file= and key_file= for TLS "
                             "(or offer_mssbcbs=True, whose SASL layer terminates TLS itself)")
        self.hub = hub
        self.config = config
        self.cert_file = cert_file
        self.key_file = key_file
        self.lock_timeout = lock_timeout
        self.clock = clock
        self.c2d_poll = c2d_poll
        self.prefetch = prefetch
        #: put :class:`~gateway.emulator.sasl.SaslShim` in front (TLS + SASL with MSSBCBS, for uamqp clients);
        #: proton then listens on loopback only
        self.offer_mssbcbs = offer_mssbcbs
        #: the built-in Event Hub-compatible endpoint's entity name: the hub's name, as on IoT Hub
        self.event_hub_name = hub.host_name.split(".")[0]
        self._shim: Any = None
        self._plain_shim: Any = None  # the same SASL layer without TLS, for the WebSocket bridge
        self._port = 0
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        #: stalled (half-open) connections: device -> the socket proton let go of, kept open and unread
        self._held: dict[str, socket.socket] = {}
        self._held_lock = threading.Lock()

    @property
    def port(self) -> int:
        return self._port

    @property
    def tls(self) -> bool:
        return self.cert_file is not None or (self.offer_mssbcbs and self.config.ssl_context is not None)

    def stalled(self) -> list[str]:
        """The devices whose connection is held half-open by a STALL fault."""
        with self._held_lock:
            return list(self._held)

    def _hold(self, device: str, sock: socket.socket) -> None:
        with self._held_lock:
            old = self._held.pop(device, None)
            self._held[device] = sock
            while len(self._held) > _MAX_HELD:  # bounded: the oldest dead link is finally closed
                self._held.pop(next(iter(self._held))).close()
        if old is not None:
            old.close()

    def _release(self, device: str | None = None) -> None:
        """Close held sockets (one device's, e.g. on its reconnect, or all)."""
        with self._held_lock:
            gone = [self._held.pop(d) for d in list(self._held) if device in (None, d)]
        for sock in gone:
            with contextlib.suppress(OSError):
                sock.close()

    async def start(self) -> None:
        if self._thread is not None:
            return
        import proton.reactor

        self._server = _server_class()(self)
        self._server.injector = proton.reactor.EventInjector()
        self._server.container = proton.reactor.Container(self._server)
        self._thread = threading.Thread(target=self._run, name="amqp-front", daemon=True)
        self._thread.start()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._started.wait, 10.0)
        if self._start_error is not None:
            raise self._start_error
        if not self._started.is_set():
            raise TimeoutError("the AMQP front did not start")
        if self.offer_mssbcbs:
            from gateway.emulator.sasl import SaslShim

            context = self.config.ssl_context
            if context is None and self.cert_file is not None:
                import ssl

                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(self.cert_file, self.key_file)
            shim = SaslShim(self._port, self.config.host, self.config.port, context)
            plain = SaslShim(self._port) if context is not None else None
            try:
                await shim.start()
                if plain is not None:
                    await plain.start()
            except BaseException:
                await shim.stop()
                await self.stop()
                raise
            self._shim, self._plain_shim = shim, plain
            self._port = shim.port

    def _run(self) -> None:
        try:
            self._server.container.run()
        except BaseException as exc:
            log.exception("AMQP front failed")
            self._start_error = exc
        finally:
            self._started.set()
            for fd in self._server.injector.pipe:
                with contextlib.suppress(OSError):
                    import os

                    os.close(fd)

    @property
    def plain_port(self) -> int:
        """A loopback port without TLS for the HTTP front's WebSocket bridge (0: none, i.e. proton's own
        TLS is on and no SASL layer runs)."""
        if self._plain_shim is not None:
            return int(self._plain_shim.port)
        return self._port if not self.tls else 0

    async def stop(self) -> None:
        shim, self._shim = self._shim, None
        plain, self._plain_shim = self._plain_shim, None
        for layer in (shim, plain):
            if layer is not None:
                await layer.stop()
        thread = self._thread
        if thread is None:
            return
        if thread.is_alive():
            self._server.post(self._server.shutdown)
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 10.0)
        self._thread = None
        self._release()

    async def drop_all(self) -> None:
        """Cut every client socket (no AMQP close): an outage as clients see it."""
        if self._thread is None or not self._thread.is_alive():
            return
        done = threading.Event()

        def drop() -> None:
            self._server.drop_all()
            self._release()
            done.set()

        self._server.post(drop)
        await asyncio.get_running_loop().run_in_executor(None, done.wait, 5.0)
        for layer in (self._shim, self._plain_shim):
            if layer is not None:
                layer.abort_all()

    async def close_all(self, condition: str, description: str = "", info: Mapping[str, object] | None = None) -> None:
        """Close every client connection with this condition (e.g. ``amqp:connection:forced``)."""
        if self._thread is None or not self._thread.is_alive():
            return
        done = threading.Event()

        def close() -> None:
            self._server.close_all(RenderedCondition(condition, description, dict(info or {})))
            done.set()

        self._server.post(close)
        await asyncio.get_running_loop().run_in_executor(None, done.wait, 5.0)

    def connections(self) -> int:
        """How many client connections are open (for tests)."""
        return len(self._server.conns) if self._server is not None else 0


def _condition(proton: Any, form: RenderedCondition) -> Any:
    info = {proton.symbol(k): v for k, v in form.info.items()}
    return proton.Condition(form.condition, form.description, info)


def _pick(code: int, fault: Fault | None, default_where: str) -> tuple[str, RenderedCondition]:
    """Where the fault lands and which of the code's wire forms it uses."""
    forms = render(code, tracking_id=f"emu-{uuid.uuid4()}", retry_after=fault.retry_after if fault else None)
    where, index = default_where, None
    if fault is not None and fault.form:
        head, _, tail = fault.form.partition(":")
        where = head or default_where
        if tail:
            with contextlib.suppress(ValueError):
                index = int(tail)
    if index is None:  # a CBS answer has only a status and a description: the generic form says it all
        index = -1 if where == "cbs" else 0
    try:
        return where, forms[index]
    except IndexError:
        return where, forms[-1]


_SERVER_CLASS: type[Any] | None = None


def _event_hubs_signed(parsed: Any, key: str) -> bool:
    """Whether a token is signed the Event Hubs way: HMAC keyed with the key's text itself, not the bytes
    it encodes (azure-eventhub _pyamqp/utils.py ``generate_sas_token``); the hub's Event Hub-compatible
    endpoint is an Event Hubs entity, so azure-eventhub's tokens for it are signed so."""
    import base64
    import hashlib
    import hmac
    from urllib.parse import quote_plus

    message = f"{quote_plus(parsed.resource_uri)}\n{parsed.expiry}".encode()
    expected = base64.b64encode(hmac.new(key.encode(), message, hashlib.sha256).digest()).decode()
    return hmac.compare_digest(str(parsed.signature), expected)


def _server_class() -> type[Any]:
    global _SERVER_CLASS
    if _SERVER_CLASS is not None:
        return _SERVER_CLASS
    import proton
    from proton import Delivery, Endpoint, Link, Message
    from proton import _message as _pm  # the raw getters (see _record)
    from proton.handlers import MessagingHandler
    from proton.reactor import ApplicationEvent

    class _Server(MessagingHandler):  # type: ignore[misc]
        def __init__(self, front: AmqpFront) -> None:
            super().__init__(prefetch=front.prefetch, auto_accept=False, auto_settle=True)
            self.front = front
            self.hub = front.hub
            self.injector: Any = None
            self.container: Any = None
            self.acceptor: Any = None
            self.conns: dict[Any, Any] = {}  # connection -> handle object given to Hub.attach
            # (device, "events"|"devicebound"|"twin-in"|"twin-out"|"methods-in"|"methods-out") -> link
            self.links: dict[tuple[str, str], Any] = {}
            #: device -> its devicebound link: what the C2D tick walks (not every link of every device)
            self.c2d_links: dict[str, Any] = {}
            # correlation id -> (future, its loop, connection) of a method call waiting for the device
            self.pending_methods: dict[Any, tuple[asyncio.Future[tuple[int, Any]], asyncio.AbstractEventLoop, Any]] = {}
            # (device, connection) -> the handle given to Hub.watch_desired: desired-property subscribers
            self.desired_subs: dict[tuple[str, Any], object] = {}
            self.feedback_links: list[Any] = []  # the service's feedback receivers
            self.eh_links: list[Any] = []  # Event Hub-compatible partition receivers
            self.stopping = False
            self.tick: Any = None  #: the pending C2D / feedback tick (proton Task)
            self._cmds: deque[Callable[[], None]] = deque()
            self._lock = threading.Lock()
            self._ids = itertools.count()

        # -- plumbing ---------------------------------------------------------------------------
        def post(self, fn: Callable[[], None]) -> None:
            with self._lock:
                self._cmds.append(fn)
            with contextlib.suppress(OSError):
                self.injector.trigger(ApplicationEvent("front_cmd"))

        def on_front_cmd(self, event: Any) -> None:
            while True:
                with self._lock:
                    if not self._cmds:
                        return
                    fn = self._cmds.popleft()
                fn()

        def on_start(self, event: Any) -> None:
            front = self.front
            container = event.container
            container.selectable(self.injector)
            if front.offer_mssbcbs:  # the SASL shim faces clients (and does TLS); proton stays on loopback
                self.acceptor = container.acceptor("127.0.0.1", 0)
            else:
                self.acceptor = container.acceptor(front.config.host, front.config.port)
            if front.cert_file is not None and not front.offer_mssbcbs:
                domain = proton.SSLDomain(proton.SSLDomain.MODE_SERVER)
                domain.set_credentials(front.cert_file, front.key_file or "", None)
                domain.set_peer_authentication(proton.SSLDomain.ANONYMOUS_PEER)
                self.acceptor.set_ssl_domain(domain)
            front._port = self.acceptor._selectable._delegate.getsockname()[1]
            self.tick = container.schedule(front.c2d_poll, self)
            front._started.set()

        def shutdown(self) -> None:
            self.stopping = True
            if self.tick is not None:
                self.tick.cancel()  # a pending tick would keep the reactor (and its thread) alive until it fires
            if self.acceptor is not None:
                self.acceptor.close()
            for conn in list(self.conns):
                with contextlib.suppress(Exception):
                    conn.close()
                self._cut(conn)
            self.injector.close()

        def _taken_over(self, conn: Any) -> None:
            """Another transport connected as this device: close this connection as IoT Hub does."""
            if conn in self.conns and conn.state & Endpoint.LOCAL_ACTIVE:
                self._close(conn, "connection", _pick(_NEW_CONNECTION, None, "connection")[1])

        def close_all(self, form: RenderedCondition) -> None:
            for conn in list(self.conns):
                self._close(conn, "connection", form)

        def drop_all(self) -> None:
            for conn in list(self.conns):
                self._cut(conn)

        def _cut(self, conn: Any) -> None:
            transport = conn.transport
            selectable = getattr(transport, "_selectable", None) if transport is not None else None
            sock = getattr(selectable, "_delegate", None)
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            elif transport is not None:
                transport.close_tail()
                transport.close_head()
            self._forget(conn)

        def _stall(self, conn: Any, device: str) -> None:
            """Half-open: proton lets go of the socket without a frame (no close, no FIN: the front
            keeps it open and never reads it again), so the client hears nothing at all."""
            transport = conn.transport
            selectable: Any = getattr(transport, "_selectable", None) if transport is not None else None
            sock = getattr(selectable, "_delegate", None)
            if isinstance(sock, socket.socket):
                selectable.release()  # proton's close() of the selectable leaves the descriptor alone
                self.front._hold(device, sock)
            if transport is not None:
                transport.close_tail()
                transport.close_head()
            self._forget(conn)

        def _forget(self, conn: Any) -> None:
            for corr, (_, _, owner) in list(self.pending_methods.items()):
                if owner == conn:
                    self._method_done(corr, exc=ConnectionError("the device disconnected before answering"))
            handle = self.conns.pop(conn, None)
            self.feedback_links = [lk for lk in self.feedback_links if lk.connection != conn]
            self.eh_links = [lk for lk in self.eh_links if lk.connection != conn]
            for device, owner in list(self.desired_subs):
                if owner == conn:
                    self.hub.detach(device, self.desired_subs.pop((device, owner)))
            for key, link in list(self.links.items()):
                if link.connection == conn:
                    del self.links[key]
                    if self.c2d_links.get(key[0]) == link:
                        del self.c2d_links[key[0]]
                    if handle is not None:
                        self.hub.detach(key[0], handle)

        # -- connections --------------------------------------------------------------------------
        def on_connection_bound(self, event: Any) -> None:
            sasl = event.transport.sasl()
            sasl.allow_insecure_mechs = True
            sasl.allowed_mechs("ANONYMOUS PLAIN")

        def on_connection_opening(self, event: Any) -> None:
            conn = event.connection
            # Open's last field (properties) set, so every field is on the wire, as the hub's Open has them:
            # azure-eventhub's pyamqp indexes Open's fields up to properties without checking they are
            # there (azure/eventhub/_pyamqp/_connection.py _incoming_open: frame[4], frame[9])
            conn.properties = {proton.symbol("product"): "iothub-gateway emulator"}
            self.conns[conn] = object()
            conn.gw_auth = {}

        def on_connection_closed(self, event: Any) -> None:
            self._forget(event.connection)

        def on_transport_closed(self, event: Any) -> None:
            if event.connection is not None:
                self._forget(event.connection)

        def on_connection_remote_close(self, event: Any) -> None:
            self._forget(event.connection)

        def on_transport_error(self, event: Any) -> None:
            pass

        def on_connection_error(self, event: Any) -> None:
            pass

        def on_session_error(self, event: Any) -> None:
            pass

        def on_link_error(self, event: Any) -> None:
            pass

        # -- links ------------------------------------------------------------------------------
        def on_link_opening(self, event: Any) -> None:
            link = event.link
            refusal = self._classify(link)
            if refusal is not None:
                # AMQP's refusal: answer the attach with a null terminus, then detach with the reason
                link.gw_refuse = refusal
                return
            link.source.copy(link.remote_source)
            link.target.copy(link.remote_target)
            if link.is_sender:
                link.rcv_settle_mode = link.remote_rcv_settle_mode
                link.snd_settle_mode = Link.SND_UNSETTLED

        def _classify(self, link: Any) -> tuple[str, RenderedCondition] | None:
            """Tag the link with its kind and device; the refusal to send instead, if any."""
            address = (link.remote_target.address if link.is_receiver else link.remote_source.address) or ""
            if address == _CBS:
                link.gw_kind = "cbs"
                return None
            if address == _MANAGEMENT:
                link.gw_kind = "management"
                return None
            eh = _EH_RE.match(address) if link.is_sender else None
            if eh is not None:
                link.gw_kind = "eventhub"
                if eh.group(1).lower() != self.front.event_hub_name.lower() or int(eh.group(3)) >= PARTITIONS:
                    return _pick(_ADDRESS, None, "link")
                expiry = getattr(link.connection, "gw_service", None)
                if expiry is None or expiry <= self.front.clock():
                    return _pick(_UNAUTHORIZED, None, "link")
                link.gw_eh = [int(eh.group(3)), _eh_start(self.hub, link.remote_source)]
                return None
            # uamqp (azure-iot-hub's C2D sender and feedback receiver) names the whole URL,
            # amqps://{host}/messages/devicebound (azure/iot/hub/iothub_amqp_client.py): its path counts
            path = _URL_RE.sub("", address).rstrip("/").lower()
            service_kind = {(_SERVICE_C2D, True): "service-c2d", (_FEEDBACK, False): "feedback"}.get(
                (path if path.startswith("/") else "/" + path, bool(link.is_receiver)))
            if service_kind is not None:
                link.gw_kind = service_kind
                expiry = getattr(link.connection, "gw_service", None)
                if expiry is None or expiry <= self.front.clock():
                    return _pick(_UNAUTHORIZED, None, "link")
                return None
            match = _LINK_RE.search(address)
            kind = _KINDS[match.group(2).lower()] if match is not None else "refused"
            if match is None or (kind == "events" and not link.is_receiver) or (kind == "devicebound"
                                                                                and link.is_receiver):
                link.gw_kind = "refused"
                return _pick(_ADDRESS, None, "link")
            link.gw_device = unquote(match.group(1))
            if kind in ("twin", "methods"):
                kind = f"{kind}-{'out' if link.is_sender else 'in'}"
                link.gw_kind = kind
                if not (link.remote_properties or {}).get(_CHANNEL_ID):  # the hub pairs the two links by it
                    return _pick(_ARGUMENT, None, "link")
            link.gw_kind = kind
            expiry = link.connection.gw_auth.get(link.gw_device)
            if expiry is None or expiry <= self.front.clock():
                return _pick(_UNAUTHORIZED, None, "link")
            return None

        def on_link_opened(self, event: Any) -> None:
            link = event.link
            if getattr(link, "gw_handled", False):
                return
            link.gw_handled = True
            refusal = getattr(link, "gw_refuse", None)
            if refusal is not None:
                self._close(link, *refusal)
                return
            kind = getattr(link, "gw_kind", None)
            if kind == "cbs":
                if link.is_sender:
                    link.connection.gw_cbs_reply = link
                    for answer in getattr(link.connection, "gw_cbs_pending", []):
                        link.send(answer)
                    link.connection.gw_cbs_pending = []
                return
            if kind == "management":
                if link.is_sender:
                    link.connection.gw_mgmt_reply = link
                return
            if kind == "eventhub":
                self.eh_links.append(link)
                return
            if kind in ("service-c2d", "feedback"):
                if kind == "feedback":
                    self.feedback_links.append(link)
                return
            device: str = link.gw_device
            conn = link.connection
            key = (device, str(kind))
            old = self.links.get(key)
            if old is not None and old != link and old.state & Endpoint.LOCAL_ACTIVE:
                self._close(old, *_pick(_STOLEN, None, "link"))
            self.links[key] = link
            if kind == "devicebound":
                self.c2d_links[device] = link
            handle = self.conns.setdefault(conn, object())
            self.hub.attach(device, "amqp", handle, kick=lambda: self.post(lambda: self._taken_over(conn)))
            if kind == "devicebound":  # told of each queued message: IoT Hub delivers C2D at once, not per tick
                self.hub.watch_c2d(device, handle, lambda: self.post(lambda: self._c2d_queued(device)))
            if str(kind).startswith("methods-") and all(
                (out := self.links.get((device, side))) is not None and out.connection == conn
                for side in ("methods-in", "methods-out")
            ):  # IoT Hub takes a device as able to receive methods once both links are up
                self.hub.serve_methods(device, handle, self._invoker(conn, device))

        def on_link_closed(self, event: Any) -> None:
            self._unregister(event.link)

        def on_link_remote_close(self, event: Any) -> None:
            self._unregister(event.link)

        def _unregister(self, link: Any) -> None:
            if link in self.feedback_links:
                self.feedback_links.remove(link)
            if link in self.eh_links:
                self.eh_links.remove(link)
            key = (str(getattr(link, "gw_device", "")), str(getattr(link, "gw_kind", "")))
            if self.links.get(key) == link:
                del self.links[key]
            if self.c2d_links.get(key[0]) == link:
                del self.c2d_links[key[0]]

        def _close(self, endpoint: Any, where: str, form: RenderedCondition, delivery: Any = None) -> None:
            """Put ``form`` on the endpoint ``where`` names (relative to ``endpoint``)."""
            cond = _condition(proton, form)
            if where == "delivery" and delivery is not None:
                delivery.local.condition = cond
                delivery.update(Delivery.REJECTED)
                delivery.settle()
                return
            link = endpoint if isinstance(endpoint, Link) else None
            if where == "connection" or (link is None and where != "session"):
                conn = endpoint.connection if link is not None else endpoint
                conn.condition = cond
                conn.close()
                return
            if where == "session" and link is not None:
                link.session.condition = cond
                link.session.close()
                return
            if link is not None:
                link.condition = cond
                link.close()

        # -- messages ---------------------------------------------------------------------------
        def on_message(self, event: Any) -> None:
            link, dlv, msg = event.link, event.delivery, event.message
            kind = getattr(link, "gw_kind", None)
            if kind == "cbs":
                self._put_token(link, dlv, msg)
            elif kind == "events":
                self._telemetry(link, dlv, msg)
            elif kind == "service-c2d":
                self._service_c2d(link, dlv, msg)
            elif kind == "management":
                dlv.update(Delivery.ACCEPTED)
                dlv.settle()
                self._management(link.connection, msg)
            elif kind == "twin-in":
                self._twin(link, dlv, msg)
            elif kind == "methods-in":
                dlv.update(Delivery.ACCEPTED)
                dlv.settle()
                self._method_answer(msg)
            else:
                dlv.update(Delivery.RELEASED)
                dlv.settle()

        def _put_token(self, link: Any, dlv: Any, msg: Any) -> None:
            props = msg.properties or {}
            conn = link.connection
            dlv.update(Delivery.ACCEPTED)
            dlv.settle()
            if props.get("operation") != "put-token":
                self._answer(conn, msg, 400, "ErrorCode:ArgumentInvalid;unknown CBS operation")
                return
            match = _AUDIENCE_RE.search(str(props.get("name") or ""))
            device = unquote(match.group(1)) if match else ""
            token = msg.body if isinstance(msg.body, str) else None
            if match is None:  # the hub itself: a service (policy) token, e.g. for C2D and feedback
                self._verify_service(conn, msg, token)
                return
            fault = self.hub.plan.take(device, Operation.CONNECT, "amqp")
            if fault is not None:
                if fault.kind is FaultKind.STALL:
                    self._stall(conn, device)
                    return
                if fault.kind is FaultKind.DROP:
                    self._cut(conn)
                    return
                if fault.kind is FaultKind.NO_ACK:
                    return
                if fault.kind is FaultKind.DELAY:
                    self._later(fault.delay, lambda: self._verify(conn, msg, device, token))
                    return
                assert fault.code is not None
                # A connection carrying other devices (multiplexed) answers one device's refusal on $cbs,
                # as IoT Hub does, rather than closing the neighbours' connection with it.
                shared = any(other != device for other in conn.gw_auth)
                where, form = _pick(fault.code, fault, "cbs" if shared else "connection")
                if where == "cbs":
                    status = int(form.info.get("status-code", fault.code // 1000))  # type: ignore[call-overload]
                    self._answer(conn, msg, status, form.description, form.info)
                else:
                    self._close(link, where, form)
                return
            self._verify(conn, msg, device, token)

        def _verify(self, conn: Any, msg: Any, device: str, token: str | None) -> None:
            now = self.front.clock()
            reason = self.hub.authenticate(device, token, now)
            if reason is None:
                self.front._release(device)  # its new connection ends the half-open old one, as a takeover
                try:
                    from gateway.sas import parse_sas_token

                    expiry = float(parse_sas_token(token or "").expiry)
                except ValueError:
                    expiry = now + 3600.0
                conn.gw_auth[device] = expiry
                self._answer(conn, msg, 200, "OK")
                return
            status, code = _CBS_REFUSALS.get(reason, (401, _REFUSED))
            form = render(code, tracking_id=f"emu-{uuid.uuid4()}")[-1]
            self._answer(conn, msg, status, f"{form.description} ({reason})")

        def _verify_service(self, conn: Any, msg: Any, token: str | None) -> None:
            from gateway.sas import parse_sas_token, verify_sas_token

            now = self.front.clock()
            try:
                parsed = parse_sas_token(token or "")
            except ValueError:
                self._answer(conn, msg, 401, "ErrorCode:IotHubUnauthorizedAccess;malformed token")
                return
            # any resource the service key signs: the hub itself, or its Event Hub-compatible entity
            why = verify_sas_token(token or "", parsed.resource_uri, self.hub.service_key, now)
            if why == "mismatch" and _event_hubs_signed(parsed, self.hub.service_key):
                why = "expired" if parsed.expiry <= now else None
            if parsed.key_name != self.hub.service_policy or why is not None:
                status, code = (401, _UNAUTHORIZED) if why == "expired" else (401, _REFUSED)
                form = render(code, tracking_id=f"emu-{uuid.uuid4()}")[-1]
                self._answer(conn, msg, status, f"{form.description} ({why or 'unknown policy'})")
                return
            conn.gw_service = float(parsed.expiry)
            self._answer(conn, msg, 200, "OK")

        def _service_c2d(self, link: Any, dlv: Any, msg: Any) -> None:
            """A service's cloud-to-device message: queued for the device ``to`` names (IoT Hub's rules)."""
            match = _TO_RE.match(str(msg.address or ""))
            props = {str(k): str(v) for k, v in (msg.properties or {}).items()}
            ack = props.pop("iothub-ack", "none")
            try:
                if match is None:
                    raise ValueError(f"'to' must be /devices/{{id}}/messages/devicebound, not {msg.address!r}")
                self.hub.send_c2d(unquote(match.group(1)), _body_bytes(msg.body),
                                  message_id=str(msg.id) if msg.id is not None else None, properties=props,
                                  correlation_id=str(msg.correlation_id) if msg.correlation_id is not None else None,
                                  ack=ack)
            except KeyError:
                self._close(link, "delivery", _pick(_NOT_FOUND, None, "delivery")[1], dlv)
                return
            except OverflowError:
                self._close(link, "delivery", _pick(_QUEUE_FULL, None, "delivery")[1], dlv)
                return
            except ValueError:
                self._close(link, "delivery", _pick(_ARGUMENT, None, "delivery")[1], dlv)
                return
            dlv.update(Delivery.ACCEPTED)
            dlv.settle()

        def _send_feedback(self) -> None:
            """Hand pending feedback records to a service feedback receiver, one batch per message."""
            self.feedback_links = [lk for lk in self.feedback_links if lk.state & Endpoint.LOCAL_ACTIVE]
            for link in self.feedback_links:
                if link.credit <= 0:
                    continue
                records = self.hub.take_feedback()
                if not records:
                    return
                body = [{"originalMessageId": r.message_id, "description": r.description, "deviceId": r.device_id,
                         "deviceGenerationId": "", "enqueuedTimeUtc": r.at, "statusCode": r.status}
                        for r in records]
                link.send(Message(body=json.dumps(body).encode(), content_type=_FEEDBACK_TYPE,
                                  id=str(uuid.uuid4()), inferred=True))
                return

        def _send_events(self) -> None:
            """Stream telemetry to each partition receiver from its cursor, as the Event Hub-compatible
            endpoint does: the body and application properties as sent, IoT Hub's annotations added."""
            self.eh_links = [lk for lk in self.eh_links if lk.state & Endpoint.LOCAL_ACTIVE]
            for link in self.eh_links:
                partition, cursor = link.gw_eh
                if link.credit <= 0:
                    continue
                for index, received in self.hub.telemetry_from(cursor):
                    cursor = index + 1
                    if _partition(received.device_id) != partition:
                        continue
                    link.send(_event(index, received))
                    if link.credit <= 0:
                        break
                link.gw_eh[1] = cursor

        def _management(self, conn: Any, msg: Any) -> None:
            """``$management`` READ of the entity or a partition (what Event Hubs clients ask first)."""
            reply = getattr(conn, "gw_mgmt_reply", None)
            if reply is None or not reply.state & Endpoint.LOCAL_ACTIVE:
                return
            props = msg.properties or {}
            name = str(props.get("name") or "")
            kind = str(props.get("type") or "")
            status, body = 200, None
            if getattr(conn, "gw_service", 0) <= self.front.clock():
                status = 401
            elif props.get("operation") != "READ" or name.lower() != self.front.event_hub_name.lower():
                status = 404
            elif kind == "com.microsoft:eventhub":
                body = {"name": name, "type": kind, "created_at": proton.timestamp(0),
                        "partition_count": PARTITIONS, "partition_ids": [str(p) for p in range(PARTITIONS)]}
            elif kind == "com.microsoft:partition" and str(props.get("partition", "")).isdigit() \
                    and int(props["partition"]) < PARTITIONS:
                body = _partition_info(self.hub, name, int(props["partition"]))
            else:
                status = 404
            answer = Message(correlation_id=msg.id if msg.id is not None else msg.correlation_id,
                             address=msg.reply_to, body=body)
            answer.properties = cast(Any, {"status-code": proton.int32(status),
                                           "status-description": "OK" if status == 200 else "Not found"
                                           if status == 404 else "Unauthorized"})
            reply.send(answer)

        def _answer(self, conn: Any, request: Any, status: int, description: str,
                    info: dict[str, object] | None = None) -> None:
            answer = Message(correlation_id=request.id, address=request.reply_to)
            # an AMQP int: uamqp's CBS client reads status-code with amqpvalue_get_int and calls any other
            # type a failed put-token (azure-uamqp-c src/amqp_management.c, on_message_received)
            props: dict[str, object] = {"status-code": proton.int32(status), "status-description": description}
            tracking = (info or {}).get("com.microsoft:tracking-id")
            if tracking is not None:
                props["com.microsoft:tracking-id"] = tracking
            answer.properties = cast(Any, props)
            # Not sent in this turn: proton may write the answer's transfer ahead of the put-token's
            # disposition when both leave in one batch, and uamqp then fails the put-token although it
            # reads 200 ("Did not receive send confirmation for pending operation", azure-uamqp-c
            # amqp_management.c on_message_received), on every retry on that connection.
            outbox: list[Any] | None = getattr(conn, "gw_cbs_outbox", None)
            if outbox:  # a flush is already on its way for this connection: ride along
                outbox.append(answer)
                return
            conn.gw_cbs_outbox = [answer]
            self._later(0.0, lambda: self._flush_answers(conn))

        def _flush_answers(self, conn: Any, turns: int = 0) -> None:
            """Send a connection's CBS answers once its earlier frames (the put-tokens' dispositions) are out.

            One look per connection and turn, whatever the number of answers waiting: with a thousand
            devices putting tokens on one connection, a look per answer (each one rescheduled until the
            socket drained, which a busy shared connection rarely is) cost the emulator quadratic time.
            """
            transport = conn.transport
            if transport is not None and transport.pending() > 0 and turns < _MAX_ANSWER_TURNS:
                self._later(_ANSWER_TURN, lambda: self._flush_answers(conn, turns + 1))
                return
            outbox, conn.gw_cbs_outbox = getattr(conn, "gw_cbs_outbox", None) or [], []
            for answer in outbox:
                self._send_answer(conn, answer)

        def _send_answer(self, conn: Any, answer: Any) -> None:
            reply = getattr(conn, "gw_cbs_reply", None)
            if reply is None:
                # the put-token came before the reply link's attach was seen (uamqp sends it as soon as its
                # own links are up): answer once it is, as the hub does, instead of leaving it unanswered
                pending = getattr(conn, "gw_cbs_pending", [])
                conn.gw_cbs_pending = [*pending, answer][-_MAX_PENDING_ANSWERS:]
                return
            if reply.state & Endpoint.LOCAL_ACTIVE:
                reply.send(answer)

        def _telemetry(self, link: Any, dlv: Any, msg: Any) -> None:
            device = link.gw_device
            props = {str(k): str(v) for k, v in (msg.properties or {}).items()}
            body = _body_bytes(msg.body)
            fault = self.hub.plan.take(device, Operation.TELEMETRY, "amqp", properties=props, body=body)
            if fault is None:
                self._record(device, msg)
                dlv.update(Delivery.ACCEPTED)
                dlv.settle()
                return
            if fault.kind is FaultKind.STALL:
                self._stall(link.connection, device)
            elif fault.kind is FaultKind.DROP:
                self._cut(link.connection)
            elif fault.kind is FaultKind.NO_ACK:
                self._record(device, msg)  # the hub took it; the acknowledgement is what gets lost
            elif fault.kind is FaultKind.DELAY:
                def later() -> None:
                    if link.state & Endpoint.LOCAL_ACTIVE and not link.state & Endpoint.REMOTE_CLOSED:
                        self._record(device, msg)
                        dlv.update(Delivery.ACCEPTED)
                        dlv.settle()

                self._later(fault.delay, later)
            else:
                assert fault.code is not None
                where, form = _pick(fault.code, fault, "delivery")
                self._close(link, where, form, dlv)

        def _record(self, device: str, msg: Any) -> None:
            body = _body_bytes(msg.body)
            props = {str(k): str(v) for k, v in (msg.properties or {}).items()}
            mid = msg.id
            annotations = msg.annotations or {}
            # proton's content_type / content_encoding getters answer symbol('None') when unset: read the C fields
            raw = msg._msg
            system = {name: str(value) for name, value in (
                ("$.ct", _pm.pn_message_get_content_type(raw)),  # type: ignore[attr-defined]
                ("$.ce", _pm.pn_message_get_content_encoding(raw)),  # type: ignore[attr-defined]
                ("$.cid", msg.correlation_id), ("$.ctime", annotations.get("iothub-creation-time-utc")))
                if value is not None}
            self.hub.record(Received(device, str(mid) if mid is not None else None, body, "amqp", props,
                                     system=system))

        # -- twin -----------------------------------------------------------------------------------
        def _twin(self, link: Any, dlv: Any, msg: Any) -> None:
            device_id: str = link.gw_device
            annotations = msg.annotations or {}
            operation = str(annotations.get("operation") or "").upper()
            resource = annotations.get("resource")
            corr = msg.correlation_id
            dlv.update(Delivery.ACCEPTED)
            dlv.settle()
            device = self.hub.device(device_id)
            if device is None:
                return
            if operation in ("PUT", "DELETE") and resource == _TWIN_DESIRED:
                self._desired_subscription(link, operation == "PUT")
                self._twin_answer(link, corr, 200 if operation == "PUT" else 204)
                return
            if operation == "GET":
                op = Operation.TWIN_GET
            elif operation == "PATCH" and resource == _TWIN_REPORTED:
                op = Operation.TWIN_PATCH
            else:
                self._twin_error(link, corr, _ARGUMENT, f"unknown twin operation {operation!r} on {resource!r}")
                return
            fault = self.hub.plan.take(device_id, op, "amqp")
            if fault is not None:
                if fault.kind is FaultKind.STALL:
                    self._stall(link.connection, device_id)
                    return
                if fault.kind is FaultKind.DROP:
                    self._cut(link.connection)
                    return
                if fault.kind is FaultKind.NO_ACK:
                    return
                if fault.kind is FaultKind.ERROR and fault.code is not None:
                    where, form = _pick(fault.code, fault, "answer")
                    if where in ("link", "session", "connection"):
                        self._close(link, where, form)
                    else:
                        self._twin_error(link, corr, fault.code, f"{lookup(fault.code).name} (emulated)")
                    return
            if op is Operation.TWIN_GET:
                twin = self.hub.twin_properties(device.device_id)
                answer: tuple[int, int | None, bytes | None] = (200, None, json.dumps(twin).encode())
            else:
                patch = _method_body(msg.body)
                if not isinstance(patch, dict):
                    self._twin_error(link, corr, _ARGUMENT, "the reported-properties patch is not a JSON object")
                    return
                answer = (204, self.hub.update_reported(device.device_id, patch), None)
            if fault is not None and fault.kind is FaultKind.DELAY:
                self._later(fault.delay, lambda: self._twin_answer(link, corr, *answer))
            else:
                self._twin_answer(link, corr, *answer)

        def _desired_subscription(self, link: Any, on: bool) -> None:
            """PUT/DELETE on the desired-notification resource: (un)register with the hub for patches."""
            device: str = link.gw_device
            conn = link.connection
            if not on:
                self.desired_subs.pop((device, conn), None)
                return
            handle = self.conns.setdefault(conn, object())
            self.desired_subs[(device, conn)] = handle

            def listener(patch: dict[str, Any], version: int) -> None:  # any thread: hop to proton's
                self.post(lambda: self._notify_desired(conn, device, patch, version))

            self.hub.watch_desired(device, handle, listener)

        def _notify_desired(self, conn: Any, device: str, patch: dict[str, Any], version: int) -> None:
            """Send the patch on the twin receiver link, as IoT Hub does: no correlation id, the version
            in the annotations and (as on MQTT) in the body."""
            if (device, conn) not in self.desired_subs:
                return  # unsubscribed or disconnected since
            out = self.links.get((device, "twin-out"))
            if out is None or out.connection != conn or not out.state & Endpoint.LOCAL_ACTIVE:
                return
            notice = Message(body=json.dumps({**patch, "$version": version}).encode(), inferred=True)
            notice.annotations = cast(Any, {proton.symbol("version"): int(version)})
            out.send(notice)

        def _twin_error(self, link: Any, corr: Any, code: int, message: str) -> None:
            body = {"errorCode": code, "trackingId": f"emu-{uuid.uuid4()}", "message": message,
                    "timestampUtc": ""}
            self._twin_answer(link, corr, _twin_status(code), None, json.dumps(body).encode())

        def _twin_answer(self, link: Any, corr: Any, status: int, version: int | None = None,
                         body: bytes | None = None) -> None:
            """Answer on the device's receiving twin link of the same connection (none: nobody hears it)."""
            out = self.links.get((link.gw_device, "twin-out"))
            if out is None or out.connection != link.connection or not out.state & Endpoint.LOCAL_ACTIVE:
                return
            answer = Message(correlation_id=corr, body=body, inferred=True)
            annotations: dict[Any, Any] = {proton.symbol("status"): proton.int32(status)}
            if version is not None:
                annotations[proton.symbol("version")] = int(version)  # a Python int goes out as an AMQP long
            answer.annotations = cast(Any, annotations)
            out.send(answer)

        # -- direct methods -------------------------------------------------------------------------
        def _invoker(self, conn: Any, device: str) -> MethodInvoker:
            """Hub.MethodInvoker for this connection: called on the hub's loop, hops to proton and back."""

            async def invoke(name: str, payload: Any, timeout: float) -> tuple[int, Any]:
                loop = asyncio.get_running_loop()
                future: asyncio.Future[tuple[int, Any]] = loop.create_future()
                corr = uuid.uuid4()
                self.post(lambda: self._call_method(conn, device, name, payload, corr, future, loop))
                try:
                    async with asyncio.timeout(timeout):
                        return await future
                finally:
                    self.post(lambda: self._method_done(corr))

            return invoke

        def _call_method(self, conn: Any, device: str, name: str, payload: Any, corr: Any,
                         future: asyncio.Future[tuple[int, Any]], loop: asyncio.AbstractEventLoop) -> None:
            self.pending_methods[corr] = (future, loop, conn)
            link = self.links.get((device, "methods-out"))
            if link is None or link.connection != conn or not link.state & Endpoint.LOCAL_ACTIVE:
                self._method_done(corr, exc=ConnectionError("the device's method link is closed"))
                return
            fault = self.hub.plan.take(device, Operation.METHOD, "amqp")
            request = Message(correlation_id=corr, body=json.dumps(payload).encode(), inferred=True)
            request.properties = cast(Any, {_METHOD_NAME: name})
            if fault is None:
                link.send(request)
            elif fault.kind is FaultKind.STALL:
                self.pending_methods.pop(corr, None)  # nobody answers: the caller times out, as on a dead link
                self._stall(conn, device)
            elif fault.kind is FaultKind.DROP:
                self._cut(conn)
            elif fault.kind is FaultKind.NO_ACK:
                pass  # the request never reaches the device: the caller times out
            elif fault.kind is FaultKind.DELAY:
                def later() -> None:
                    if corr in self.pending_methods and link.state & Endpoint.LOCAL_ACTIVE:
                        link.send(request)

                self._later(fault.delay, later)
            elif fault.code is not None:
                self._close(link, *_pick(fault.code, fault, "link"))
                self._method_done(corr, exc=ConnectionError(f"method link closed with {fault.code}"))

        def _method_answer(self, msg: Any) -> None:
            status = (msg.properties or {}).get(_METHOD_STATUS)
            if not isinstance(status, int) or isinstance(status, bool):
                return  # no usable status: not an answer the hub can pass on
            self._method_done(msg.correlation_id, result=(int(status), _method_body(msg.body)))

        def _method_done(self, corr: Any, result: tuple[int, Any] | None = None,
                         exc: BaseException | None = None) -> None:
            try:
                entry = self.pending_methods.pop(corr, None)
            except TypeError:  # an unhashable correlation id: nobody waits for it
                return
            if entry is None:
                return
            future, loop, _ = entry

            def settle() -> None:
                if future.done() or (exc is None and result is None):
                    return
                if exc is not None:
                    future.set_exception(exc)
                else:
                    future.set_result(cast(tuple[int, Any], result))

            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(settle)

        # -- cloud-to-device ----------------------------------------------------------------------
        def on_timer_task(self, event: Any) -> None:
            if self.stopping:
                return
            if self.feedback_links:
                self._send_feedback()
            if self.eh_links:
                self._send_events()
            for device, link in list(self.c2d_links.items()):
                self._push_c2d(device, link)
            self.tick = event.container.schedule(self.front.c2d_poll, self)

        def _push_c2d(self, device: str, link: Any) -> None:
            """Send the device what is queued for it, as far as the link's credit goes. Called when the hub
            says a message was queued (IoT Hub delivers at once) and on every tick (expired locks, credit)."""
            if not link.state & Endpoint.LOCAL_ACTIVE or link.credit <= 0:
                return
            known = self.hub.device(device)
            if known is None or not (known.c2d or known.locked):
                return  # nothing queued or locked (a lock-free peek: the next tick catches a race);
                # with thousands of multiplexed devices a full lock_c2d per device per tick is the cost
            while link.credit > 0:
                entry = self.hub.lock_c2d(device, self.front.lock_timeout, self.front.clock())
                if entry is None or entry.lock_token is None:
                    break
                msg = Message(id=entry.message_id, body=entry.body, inferred=True,
                              address=f"/devices/{device}/messages/deviceBound",
                              correlation_id=entry.correlation_id, delivery_count=entry.delivery_count - 1)
                if entry.properties:
                    msg.properties = cast(Any, dict(entry.properties))
                dlv = link.send(msg)
                dlv.gw_c2d = (device, entry.lock_token)

        def _c2d_queued(self, device: str) -> None:
            link = self.c2d_links.get(device)
            if link is not None:
                self._push_c2d(device, link)

        def on_accepted(self, event: Any) -> None:
            self._settled_by_device(event.delivery)

        def on_rejected(self, event: Any) -> None:
            self._settled_by_device(event.delivery)

        def on_released(self, event: Any) -> None:
            self._settled_by_device(event.delivery)

        def _settled_by_device(self, dlv: Any) -> None:
            sent = getattr(dlv, "gw_c2d", None)
            if sent is None or getattr(dlv, "gw_done", False):
                return
            dlv.gw_done = True
            device, token = sent
            now = self.front.clock()
            if not self.hub.lock_valid(device, token, now):  # expired: the hub delivers it again
                self.hub.settle_c2d(device, token, "abandon", now)  # puts it back if not yet done
                if not dlv.settled:
                    self._close(dlv.link, "delivery", _pick(_LOCK_LOST, None, "delivery")[1], dlv)
                return
            fault = self.hub.plan.take(device, Operation.C2D_SETTLE, "amqp")
            if fault is not None and fault.kind is FaultKind.ERROR and fault.code is not None and not dlv.settled:
                where, form = _pick(fault.code, fault, "delivery")
                self._close(dlv.link, where, form, dlv)
                return
            if fault is not None and fault.kind is FaultKind.NO_ACK:
                return
            outcome: Settlement = "complete" if dlv.remote_state == Delivery.ACCEPTED else \
                "reject" if dlv.remote_state == Delivery.REJECTED else "abandon"
            self.hub.settle_c2d(device, token, outcome, now)
            if not dlv.settled:
                dlv.update(dlv.remote_state)
                dlv.settle()

        # -- helpers ----------------------------------------------------------------------------
        def _later(self, delay: float, fn: Callable[[], None]) -> None:
            self.container.schedule(delay, _Once(fn))

    _SERVER_CLASS = _Server
    return _Server


def _partition(device_id: str) -> int:
    """The partition a device's telemetry lands in: stable per device, as IoT Hub hashes it."""
    import zlib

    return zlib.crc32(device_id.encode()) % PARTITIONS


def _eh_start(hub: Hub, source: Any) -> int:
    """Where a partition receiver starts: its selector filter (offset or sequence number; ``@latest``
    is the end), else the beginning."""
    described: Any = None
    if source is not None and source.filter is not None:
        data = source.filter
        data.rewind()
        if data.next() is not None:
            described = data.get_object()
    text = ""
    for value in dict(described or {}).values():
        text = str(getattr(value, "value", value))
    match = _EH_SELECTOR.search(text)
    if match is None:
        return 0
    what, op, value = match.groups()
    if value == "@latest":
        return hub.received_total
    if what == "enqueued-time":
        with contextlib.suppress(ValueError):
            after = float(value) / 1000.0
            return next((i for i, r in hub.telemetry_from(0) if r.enqueued > after), hub.received_total)
        return 0
    try:
        number = int(value)
    except ValueError:
        return 0
    return max(0, number + (1 if op == ">" else 0))


def _event(index: int, received: Received) -> Any:
    import proton

    message = proton.Message(body=received.body, id=received.message_id, inferred=True)
    message.properties = cast(Any, dict(received.properties))
    message.annotations = cast(Any, {
        proton.symbol("x-opt-sequence-number"): int(index),
        proton.symbol("x-opt-offset"): str(index),
        proton.symbol("x-opt-enqueued-time"): proton.timestamp(int(received.enqueued * 1000)),
        proton.symbol("iothub-connection-device-id"): received.device_id,
        proton.symbol("iothub-message-source"): "Telemetry",
    })
    return message


def _partition_info(hub: Hub, name: str, partition: int) -> dict[str, Any]:
    import proton

    mine = [(i, r) for i, r in hub.telemetry_from(0) if _partition(r.device_id) == partition]
    last = mine[-1] if mine else None
    return {"name": name, "type": "com.microsoft:partition", "partition": str(partition),
            "begin_sequence_number": mine[0][0] if mine else 0,
            "last_enqueued_sequence_number": last[0] if last else -1,
            "last_enqueued_offset": str(last[0]) if last else "-1",
            "last_enqueued_time_utc": proton.timestamp(int(last[1].enqueued * 1000) if last else 0),
            "is_partition_empty": last is None}


def _body_bytes(body: Any) -> bytes:
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    return repr(body).encode()


class _Once:
    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def on_timer_task(self, event: Any) -> None:
        self.fn()
