"""AMQP multiplexing: many IoT Hub device identities over a few shared connections, one proton thread.

IoT Hub lets one AMQP connection carry many devices, each with its own CBS token (put-token with the
device's audience on the connection's one ``$cbs`` link pair) and its own links. The Azure Java SDK
allows up to 1,000 devices per AMQPS connection (500 over WebSockets); C# multiplexes the same way
(its ``AmqpConnectionPoolSettings`` pools device clients over shared connections). :class:`AmqpMux`
is that pool: ONE proton ``Container`` on ONE thread serves every connection, so a gateway with 10,000
devices costs one thread, not 10,000.

Each device is a :class:`MuxDevice`, a :class:`gateway.transport.Transport` of its own for its own
``Handler``. Errors keep their scope:

- a link, a delivery, a session or a refused put-token belongs to ONE device (each device has its own
  session, as the Java and C# SDKs do): that device alone sees ``Disconnected`` (or its ``connect()``
  raises) and its handler decides; its neighbours keep sending;
- the connection, its transport or its CBS links belong to every device on it: each gets
  ``Disconnected`` with the translated code once, and its sends in flight fail as "outcome unknown"
  (resent by the handler, flagged as possible duplicates).

Reconnecting a shared connection is single-flight: devices whose handlers reconnect join ONE new
connection, opened once after ONE backoff for the pool (exponential with jitter on the loop clock);
if that attempt fails every device waiting for it gets the same error. Devices rejoin when their own
handlers ask, not all at once by decree.

Surface: telemetry (``send``), cloud-to-device messages (``Inbound("c2d")``, ``SettleC2D``). Twin and
direct-method links are not multiplexed yet: those requests raise ``UnsupportedRequest``.

Proton objects are only touched on the proton thread; results come back to the loop in batches
(``call_soon_threadsafe``), commands go in through one ``EventInjector``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl as _ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, Literal, cast

from adapters.amqp.translate import translate, translate_cbs
from adapters.amqp.transport import (
    _CA_BUNDLES,
    _DISPOSITIONS,
    DEFAULT_IDLE_TIMEOUT,
    AmqpRemoteError,
    _error_from_condition,
    _in_flight_error,
    _is_active,
    _is_ip_address,
    _mapped,
    _SettleSecond,
    _Target,
    _Timer,
    _to_error,
)
from gateway.codes import code_of
from gateway.errors import IoTHubError, make_error
from gateway.sas import parse_sas_token
from gateway.tls import default_port, resolve
from gateway.transport import (
    C2DMessage,
    Disconnected,
    Inbound,
    Message,
    Request,
    SettleC2D,
    SettleOutcome,
    TransportEvent,
    UnsupportedRequest,
    check_properties,
)

__all__ = ["DEVICES_PER_CONNECTION", "AmqpMux", "MuxDevice"]

log = logging.getLogger(__name__)

TRANSPORT: Final = "amqp"
#: IoT Hub's (and the Java SDK's) limit of device identities per AMQPS connection (500 over WebSockets).
DEVICES_PER_CONNECTION: Final = 1000
_NOT_CONNECTED: Final = code_of("NotConnected")
_TIMED_OUT: Final = code_of("OperationTimedOut")
_CLOSED: Final = code_of("DeviceConnectionClosedRemotely")
_PROTOCOL: Final = code_of("ProtocolViolation")
_LOCK_LOST: Final = "com.microsoft:message-lock-lost"
_CBS: Final = "$cbs"


def _not_connected(device_id: str, message: str) -> IoTHubError:
    return make_error(_NOT_CONNECTED, transport=TRANSPORT, device_id=device_id, message=message)


class _Conn:
    """One shared connection. Loop-side fields and proton-side fields are kept apart by name."""

    def __init__(self, index: int, loop: asyncio.AbstractEventLoop) -> None:
        self.index = index
        # loop side
        self.members: set[str] = set()  # device ids holding (or asking for) a slot
        self.opened: asyncio.Future[None] = loop.create_future()
        self.dead = False
        # proton side
        self.pconn: Any = None
        self.cbs_sender: Any = None
        self.cbs_receiver: Any = None
        self.cbs_pending: dict[str, _Member] = {}  # put-token message id -> the device waiting for it
        self.joined: dict[str, _Member] = {}  # device id -> its membership on this connection
        self.up = False
        self.stopped = False
        self.transport_open = False
        self.shared_session: Any = None  # with session_per_device=False
        self.tls_files: list[str] = []


class _Inbox:
    """A device's event queue for one reader, lighter than ``asyncio.Queue`` (three deques and an Event
    per device add up at 10,000 devices); bounded in practice by the link credit (``prefetch``)."""

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


class _Member:
    """One device's stay on one connection: its session, links and everything in flight on them."""

    def __init__(self, device: MuxDevice, conn: _Conn, loop: asyncio.AbstractEventLoop) -> None:
        self.device = device
        self.device_id = device.device_id
        self.conn = conn
        # loop side
        self.ready: asyncio.Future[None] = loop.create_future()
        self.events = _Inbox()
        self.ready_done = False
        self.dead = False
        self.error: IoTHubError | None = None
        self.token_expiry: float | None = None
        self.waiters: set[asyncio.Future[Any]] = set()
        # proton side
        self.stopped = False
        self.up = False
        self.session: Any = None
        self.sender: Any = None
        self.receiver: Any = None
        self.links_open: set[str] = set()
        self.pending: dict[Any, asyncio.Future[None]] = {}
        self.c2d: dict[str, Any] = {}
        self.settling: dict[Any, asyncio.Future[None]] = {}
        self.renew_task: Any = None
        self.pending_expiry: float | None = None
        self.renew_expiry: float | None = None
        self.outgoing: Any = None


class AmqpMux:
    """A pool of shared AMQP connections to one hub, served by one proton thread.

    ``devices_per_connection`` caps the identities on one connection (IoT Hub's 1,000 by default).
    ``session_per_device`` False shares one session per connection (less memory; a session error then
    reaches every device on the connection, which stays up). ``backoff`` (first, cap) seconds: the
    pool's one delay before opening a connection again after a connection failed or was lost, doubled
    per failure in a row, with jitter from ``rng``.
    The other settings are :class:`~adapters.amqp.transport.AmqpTransport`'s, per connection.
    """

    name = TRANSPORT

    def __init__(
        self,
        *,
        host: str,
        port: int | None = None,
        ssl: _ssl.SSLContext | bool | None = True,
        hub_host: str | None = None,
        devices_per_connection: int = DEVICES_PER_CONNECTION,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        prefetch: int = 10,
        renew_margin: float = 0.2,
        backoff: tuple[float, float] = (0.5, 30.0),
        rng: random.Random | None = None,
        session_per_device: bool = True,
    ) -> None:
        if devices_per_connection < 1:
            raise ValueError("devices_per_connection must be at least 1")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive (or None to turn the idle check off)")
        if not 0.0 < renew_margin < 1.0:
            raise ValueError("renew_margin is the fraction of the token's lifetime left at renewal: 0 < x < 1")
        self.host = host
        self.ssl_context = resolve(ssl)
        self.port = port if port is not None else default_port(TRANSPORT, self.ssl_context)
        self.hub_host = hub_host or host
        self.devices_per_connection = devices_per_connection
        self.idle_timeout = idle_timeout
        self.prefetch = prefetch
        self.renew_margin = renew_margin
        self.backoff = backoff
        #: True (the Azure SDKs' way): a session error reaches one device. False: one session per
        #: connection (less memory per device), whose error reaches every device on it
        self.session_per_device = session_per_device
        self._rng = rng or random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: list[_Conn] = []  # loop side: the connections not known dead, in opening order
        self._index = 0
        self._failures = 0  # connection failures in a row (the pool's one backoff)
        self._next_open = 0.0  # loop clock: no connection opens before this
        self._opens = 0  # connection attempts made (for tests and the bench)
        self._closed = False
        # the proton thread
        self._thread: threading.Thread | None = None
        self._proton: Any = None
        self._container: Any = None
        self._injector: Any = None
        self._finished: asyncio.Future[None] | None = None
        self._cmd_lock = threading.Lock()
        self._cmds: deque[Callable[[], None]] = deque()
        self._cmd_signalled = False
        self._pipe_closed = False
        self._out_lock = threading.Lock()
        self._out: list[Callable[[], None]] = []
        self._out_scheduled = False
        self._all: list[_Conn] = []  # proton side: every connection opened, until its transport closed
        self._transports = 0  # proton side: sockets not closed yet

    # -- public ----------------------------------------------------------------------------------------

    def device(self, device_id: str, *, token: str | Callable[[], str], receive_c2d: bool = True,
               send_timeout: float = 30.0, connect_timeout: float = 30.0, settle_timeout: float = 30.0,
               settle_mode: Literal["first", "second"] = "second") -> MuxDevice:
        """The transport of one device on this pool (connects on its ``connect()``)."""
        return MuxDevice(self, device_id, token=token, receive_c2d=receive_c2d, send_timeout=send_timeout,
                         connect_timeout=connect_timeout, settle_timeout=settle_timeout, settle_mode=settle_mode)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def connection_attempts(self) -> int:
        """How many connections the pool has tried to open so far."""
        return self._opens

    def connections(self) -> list[int]:
        """The devices on each live connection (loop side)."""
        return [len(c.members) for c in self._conns if not c.dead]

    async def close(self) -> None:
        """Close every connection and end the proton thread. Idempotent."""
        self._closed = True
        for conn in list(self._conns):  # one still waiting for the pool's backoff never opens now
            if not conn.opened.done():
                self._conn_failed(conn, make_error(_NOT_CONNECTED, transport=TRANSPORT,
                                                   message="the AMQP mux is closed"))
        if self._thread is None or self._finished is None:
            return
        self._post(self._do_shutdown)
        try:
            await asyncio.wait_for(asyncio.shield(self._finished), 10.0)
        except TimeoutError:
            log.warning("the AMQP mux thread did not end within 10 s")
        self._thread.join(1.0)
        self._flush()

    # -- the pool (loop side) --------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        import proton
        import proton.reactor

        self._loop = asyncio.get_running_loop()
        self._finished = self._loop.create_future()
        self._proton = proton
        self._injector = proton.reactor.EventInjector()
        self._thread = threading.Thread(target=self._run, name="amqp-mux", daemon=True)
        self._thread.start()

    def _slot(self, device: MuxDevice) -> _Conn:
        """A connection with room for ``device``: an open or opening one, else a new one (single-flight)."""
        loop = asyncio.get_running_loop()
        for conn in self._conns:
            if not conn.dead and not conn.stopped and len(conn.members) < self.devices_per_connection:
                conn.members.add(device.device_id)
                return conn
        self._index += 1
        conn = _Conn(self._index, loop)
        conn.members.add(device.device_id)
        self._conns.append(conn)
        delay = max(0.0, self._next_open - loop.time())
        self._opens += 1
        if delay > 0:
            loop.call_at(self._next_open, lambda: self._post(lambda: self._do_open(conn)))
        else:
            self._post(lambda: self._do_open(conn))
        return conn

    def _leave(self, conn: _Conn, device_id: str) -> None:
        conn.members.discard(device_id)

    def _close_if_empty(self, conn: _Conn) -> None:
        """The last device closed: close its connection (no new device is given it from now on)."""
        if conn.members or conn.dead:
            return
        conn.dead = True
        if conn in self._conns:
            self._conns.remove(conn)
        self._post(lambda: self._fail_conn(conn, None))

    def _conn_failed(self, conn: _Conn, err: IoTHubError | None) -> None:
        """Loop side: a connection is gone. The pool's one backoff starts (a clean close by us: none)."""
        news = not conn.dead  # False: closed by _close_if_empty, no backoff for that
        conn.dead = True
        if conn in self._conns:
            self._conns.remove(conn)
        if not conn.opened.done():
            conn.opened.set_exception(err or make_error(_NOT_CONNECTED, transport=TRANSPORT,
                                                         message="the AMQP connection closed before it opened"))
            conn.opened.exception()  # retrieved: the joiners read it from their own memberships
        if err is None or self._closed or not news:
            return
        self._failures += 1
        first, cap = self.backoff
        ceiling = min(cap, first * 2 ** (self._failures - 1))
        loop = asyncio.get_running_loop()
        self._next_open = max(self._next_open, loop.time() + self._rng.uniform(ceiling / 2, ceiling))

    def _conn_opened(self, conn: _Conn) -> None:
        self._failures = 0
        if not conn.opened.done():
            conn.opened.set_result(None)

    # -- cross-thread plumbing ----------------------------------------------------------------------

    def _post(self, fn: Callable[[], None]) -> bool:
        """Run ``fn`` on the proton thread; one injector wake-up per batch; dropped once the thread ended."""
        with self._cmd_lock:
            if self._pipe_closed:
                return False
            self._cmds.append(fn)
            if not self._cmd_signalled:
                self._cmd_signalled = True
                with contextlib.suppress(OSError):
                    self._injector.trigger(self._proton.reactor.ApplicationEvent("amqp_cmd"))
            return True

    def _run_commands(self) -> None:
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
                except Exception:
                    log.exception("AMQP mux command failed")

    def _call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop (from the proton thread); one loop wake-up per batch."""
        with self._out_lock:
            self._out.append(fn)
            if self._out_scheduled:
                return
            self._out_scheduled = True
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._out_lock:
            batch, self._out = self._out, []
            self._out_scheduled = False
        for fn in batch:
            try:
                fn()
            except Exception:
                log.exception("AMQP mux result delivery failed")

    def _resolve(self, fut: asyncio.Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
        def apply() -> None:
            if not fut.done():
                if exc is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)

        self._call(apply)

    # -- the proton thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._container = self._proton.reactor.Container(_mux_handler_class()(self))
            self._container.container_id = f"iothub-gateway-mux-{uuid.uuid4().hex[:8]}"
            self._container.run()
        except BaseException:
            log.exception("the AMQP mux container failed")
        finally:
            gone = make_error(_CLOSED, transport=TRANSPORT, exact=False, message="the AMQP mux thread ended")
            for conn in list(self._live_conns()):
                self._fail_conn(conn, gone)
            with self._cmd_lock:
                self._pipe_closed = True
                for fd in self._injector.pipe:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._call(self._mark_finished)

    def _mark_finished(self) -> None:
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    def _live_conns(self) -> list[_Conn]:
        return [c for c in self._all if not c.stopped]

    def _on_start(self, container: Any) -> None:
        container.selectable(self._injector)

    def _do_open(self, conn: _Conn) -> None:
        if self._closed:
            self._fail_conn(conn, make_error(_NOT_CONNECTED, transport=TRANSPORT, message="the AMQP mux is closed"))
            return
        tls = self.ssl_context is not None
        kwargs: dict[str, Any] = {
            "reconnect": False,
            "virtual_host": self.hub_host,
            "sni": self.host if tls and not _is_ip_address(self.host) else None,
            "allow_insecure_mechs": True,
            "allowed_mechs": "ANONYMOUS",
        }
        if self.ssl_context is not None:
            kwargs["ssl_domain"] = self._ssl_domain(self.ssl_context, conn)
        if self.idle_timeout:
            kwargs["heartbeat"] = self.idle_timeout
        try:
            with _mapped(None):
                conn.pconn = self._container.connect(f"{'amqps' if tls else 'amqp'}://{self.host}:{self.port}",
                                                     **kwargs)
        except IoTHubError as err:
            self._fail_conn(conn, err)
            return
        conn.pconn.gw_conn = conn
        self._all.append(conn)
        conn.transport_open = True
        self._transports += 1

    def _ssl_domain(self, context: _ssl.SSLContext, conn: _Conn) -> Any:
        """The context's verification settings as a proton ``SSLDomain`` (as ``AmqpTransport`` maps them)."""
        domain_cls = self._proton.SSLDomain
        domain = domain_cls(domain_cls.MODE_CLIENT)
        if context.verify_mode == _ssl.CERT_NONE:
            domain.set_peer_authentication(domain_cls.ANONYMOUS_PEER)
            return domain
        ders = context.get_ca_certs(binary_form=True)
        if ders:
            ca: str | None = _CA_BUNDLES.acquire(ders)
            conn.tls_files.append(cast(str, ca))
        else:
            paths = _ssl.get_default_verify_paths()
            ca = paths.cafile or paths.capath
        if ca is not None:
            domain.set_trusted_ca_db(ca)
        by_name = context.check_hostname and not _is_ip_address(self.host)
        domain.set_peer_authentication(domain_cls.VERIFY_PEER_NAME if by_name else domain_cls.VERIFY_PEER, ca)
        return domain

    def _on_connection_opened(self, pconn: Any) -> None:
        conn: _Conn | None = getattr(pconn, "gw_conn", None)
        if conn is None or conn.stopped or conn.cbs_sender is not None:
            return
        conn.cbs_sender = self._container.create_sender(pconn, target=_CBS, name=f"cbs-s-{uuid.uuid4()}")
        conn.cbs_receiver = self._container.create_receiver(pconn, source=_CBS, name=f"cbs-r-{uuid.uuid4()}",
                                                            options=_Target("cbs"))
        conn.cbs_sender.gw_cbs = conn
        conn.cbs_receiver.gw_cbs = conn

    def _on_link_opened(self, link: Any) -> None:
        remote = link.remote_target if link.is_sender else link.remote_source
        if remote.address is None and not remote.dynamic:
            return  # a refused attach: the detach with the reason follows
        conn: _Conn | None = getattr(link, "gw_cbs", None)
        if conn is not None:
            if not conn.up and _is_active(conn.cbs_sender, self._proton) and \
                    _is_active(conn.cbs_receiver, self._proton) and \
                    conn.cbs_sender.state & self._proton.Endpoint.REMOTE_ACTIVE and \
                    conn.cbs_receiver.state & self._proton.Endpoint.REMOTE_ACTIVE:
                conn.up = True
                self._call(lambda: self._conn_opened(conn))
                for joined in list(conn.joined.values()):
                    self._put_token(joined)
            return
        member: _Member | None = getattr(link, "gw_member", None)
        if member is None or member.stopped:
            return
        member.links_open.add("events" if link == member.sender else "c2d")
        wanted = {"events", "c2d"} if member.device.receive_c2d else {"events"}
        if wanted <= member.links_open and not member.up:
            member.up = True
            self._call(lambda: self._member_ready(member))

    def _member_ready(self, member: _Member) -> None:
        member.ready_done = True
        if not member.ready.done():
            member.ready.set_result(None)

    # -- devices (proton thread) -----------------------------------------------------------------------

    def _do_join(self, member: _Member) -> None:
        conn = member.conn
        if conn.stopped:
            self._fail_member(member, _conn_error(conn, member.device_id))
            return
        conn.joined[member.device_id] = member
        if conn.up:
            self._put_token(member)
        # else: put when the connection's CBS links are up

    def _put_token(self, member: _Member) -> None:
        if member.stopped:
            return
        conn = member.conn
        try:
            token = member.device.next_token()
        except Exception as exc:
            self._fail_member(member, _to_error(exc, member.device_id))
            return
        msg_id = str(uuid.uuid4())
        msg = self._proton.Message(body=token, id=msg_id, reply_to="cbs")
        msg.properties = cast(Any, {"operation": "put-token", "type": "azure-devices.net:sastoken",
                                    "name": f"{self.hub_host}/devices/{member.device_id}"})
        try:
            member.pending_expiry = float(parse_sas_token(token).expiry)
        except ValueError:
            member.pending_expiry = None
        conn.cbs_pending[msg_id] = member
        conn.cbs_sender.send(msg)

    def _on_cbs_answer(self, conn: _Conn, message: Any) -> None:
        member = conn.cbs_pending.pop(str(message.correlation_id), None)
        if member is None or member.stopped:
            return
        props = message.properties or {}
        status = props.get("status-code")
        desc = props.get("status-description")
        try:
            err = translate_cbs(status if status is not None else "", desc, props)
        except ValueError as exc:
            err = make_error(_PROTOCOL, transport=TRANSPORT, device_id=member.device_id, exact=False,
                             message=f"CBS answer without a usable status-code: {status!r}")
            err.__cause__ = exc
        if err is not None:  # this device's token refused: its neighbours are not concerned
            err.device_id = err.device_id or member.device_id
            err.__cause__ = AmqpRemoteError("cbs", str(status), desc if isinstance(desc, str) else None, props)
            self._fail_member(member, err)
            return
        member.renew_expiry = expiry = member.pending_expiry
        self._call(lambda: setattr(member, "token_expiry", expiry))
        if member.session is None:
            self._attach(member)
        self._schedule_renewal(member)

    def _schedule_renewal(self, member: _Member) -> None:
        expiry = member.renew_expiry
        if expiry is None or not callable(member.device._token):
            return
        lifetime = expiry - time.time()  # a token's expiry is wall-clock epoch seconds
        delay = max(1.0, lifetime * (1.0 - self.renew_margin)) if lifetime > 0 else 1.0

        def renew() -> None:
            if not member.stopped and not member.conn.stopped:
                self._put_token(member)

        member.renew_task = self._container.schedule(delay, _Timer(renew))

    def _attach(self, member: _Member) -> None:
        device = member.device
        conn = member.conn
        if self.session_per_device:
            session = conn.pconn.session()
            session.gw_member = member
            session.open()
        else:  # one session for every device on the connection: its error reaches them all
            session = conn.shared_session
            if session is None:
                session = conn.shared_session = conn.pconn.session()
                session.gw_shared = conn
                session.open()
        member.session = session
        member.sender = self._container.create_sender(session, target=device.events_address,
                                                      name=f"events-{uuid.uuid4()}")
        member.sender.gw_member = member
        if device.receive_c2d:
            member.receiver = self._container.create_receiver(
                session, source=device.c2d_address, name=f"c2d-{uuid.uuid4()}",
                options=_SettleSecond(self._proton) if device.settle_mode == "second" else None)
            member.receiver.gw_member = member

    def _do_leave(self, member: _Member, done: asyncio.Future[None]) -> None:
        self._fail_member(member, None)
        self._resolve(done)

    def _fail_member(self, member: _Member, err: IoTHubError | None) -> None:
        """One device leaves its connection (``err`` None: its own clean close); the others stay."""
        if member.stopped:
            return
        member.stopped = True
        conn = member.conn
        if conn.joined.get(member.device_id) is member:
            del conn.joined[member.device_id]
        for key, waiting in list(conn.cbs_pending.items()):
            if waiting is member:
                del conn.cbs_pending[key]
        if member.renew_task is not None:
            with contextlib.suppress(Exception):
                member.renew_task.cancel()
        session = member.session
        own = [session] if self.session_per_device else [member.sender, member.receiver]
        for endpoint in own:  # its own session, or its own links on the shared one
            if endpoint is not None and not conn.stopped:
                self._close_when_open(endpoint)
        if err is not None:
            err.device_id = err.device_id or member.device_id
        was_up = member.up
        if err is None:
            gone = make_error(_TIMED_OUT, transport=TRANSPORT, device_id=member.device_id,
                              message="connection closed locally while the message was in flight (outcome unknown)")
        else:
            gone = _in_flight_error(err)
        pending = list(member.pending.values())
        member.pending.clear()
        lost = translate(_LOCK_LOST, "the connection closed before the hub confirmed the settlement")
        lost.device_id = member.device_id
        settling = list(member.settling.values())
        member.settling.clear()
        member.c2d.clear()

        def on_loop() -> None:
            member.dead = True
            member.error = err
            self._leave(conn, member.device_id)
            if err is not None and was_up and not member.device._closing:
                member.events.put_nowait(Disconnected(err))  # first: the supervisor learns the cause
            if not member.ready.done():
                member.ready.set_exception(err or _not_connected(member.device_id, "closed before it was up"))
                member.ready.exception()  # retrieved: nobody may be waiting any more (a timed-out connect)
            for fut in pending:
                if not fut.done():
                    fut.set_exception(gone)
            for fut in settling:
                if not fut.done():
                    fut.set_exception(lost)
            for fut in list(member.waiters):
                if not fut.done():
                    fut.set_exception(gone)
            member.events.put_nowait(None)

        self._call(on_loop)

    def _close_when_open(self, endpoint: Any) -> None:
        """Close a session or link, but not before the peer's begin/attach reply has come.

        Proton forgets a session's channel as soon as its END goes out; a BEGIN reply still on the way
        then fails the whole connection ("begin reply to unknown channel"), every device on it with it.
        A device leaving early (its connect timed out) would tear down its neighbours.
        """
        state = endpoint.state
        if state & self._proton.Endpoint.LOCAL_CLOSED:
            return
        if state & self._proton.Endpoint.REMOTE_UNINIT:
            endpoint.gw_close_pending = True  # closed by _on_remote_open
            return
        with contextlib.suppress(Exception):
            endpoint.close()

    def _on_remote_open(self, endpoint: Any) -> None:
        if getattr(endpoint, "gw_close_pending", False):
            endpoint.gw_close_pending = False
            self._close_when_open(endpoint)

    def _fail_conn(self, conn: _Conn, err: IoTHubError | None) -> None:
        """The connection is gone: every device on it hears it once, with the code."""
        if conn.stopped:
            return
        conn.stopped = True
        # first: the pool forgets the connection before any device hears of the loss (a device whose
        # handler reconnects at once must not be given the dead connection again)
        self._call(lambda: self._conn_failed(conn, err))
        for member in list(conn.joined.values()):
            self._fail_member(member, None if err is None else _copy_for(err, member.device_id))
        conn.joined.clear()
        conn.cbs_pending.clear()
        pconn = conn.pconn
        if pconn is not None and not pconn.state & self._proton.Endpoint.LOCAL_CLOSED:
            with contextlib.suppress(Exception):
                pconn.close()
        for path in conn.tls_files:
            _CA_BUNDLES.release(path)
        conn.tls_files.clear()

    def _endpoint_error(self, where: str, endpoint: Any, cond: Any) -> None:
        if where in ("connection", "transport"):
            conn = getattr(endpoint, "gw_conn", None)
            if conn is not None:
                self._fail_conn(conn, _error_from_condition(where, cond))
            return
        cbs_conn = getattr(endpoint, "gw_cbs", None)
        if cbs_conn is not None:  # the connection's CBS links carry every device's token
            self._fail_conn(cbs_conn, _error_from_condition(where, cond))
            return
        shared = getattr(endpoint, "gw_shared", None) if where == "session" else None
        if shared is not None:  # the shared session: every device on it, once; the connection stays
            if shared.shared_session == endpoint:
                shared.shared_session = None
            if not endpoint.state & self._proton.Endpoint.LOCAL_CLOSED:
                endpoint.close()
            for member in [m for m in shared.joined.values() if m.session == endpoint]:
                self._fail_member(member, _error_from_condition(where, cond, member.device_id))
            return
        member = getattr(endpoint, "gw_member", None)
        if member is not None:
            self._fail_member(member, _error_from_condition(where, cond, member.device_id))

    def _do_shutdown(self) -> None:
        for conn in self._live_conns():
            self._fail_conn(conn, None)
        if self._transports == 0:
            self._container.stop()
        else:  # wait for the close handshakes, but not for ever
            self._container.schedule(5.0, _Timer(self._abort_all))

    def _abort_all(self) -> None:
        for conn in self._all:
            transport = getattr(conn.pconn, "transport", None)
            if transport is not None:
                transport.close_tail()
                transport.close_head()
        self._container.stop()

    def _on_transport_closed(self, connection: Any, transport: Any) -> None:
        conn: _Conn | None = getattr(connection, "gw_conn", None) if connection is not None else None
        if conn is None:
            return
        if not conn.stopped:
            self._fail_conn(conn, _error_from_condition("transport", getattr(transport, "condition", None)))
        if conn.transport_open:
            conn.transport_open = False
            self._transports -= 1
            if conn in self._all:
                self._all.remove(conn)
        if self._closed and self._transports == 0:
            self._container.stop()

    # -- telemetry and C2D (proton thread) --------------------------------------------------------------

    def _do_send(self, member: _Member, message: Message, fut: asyncio.Future[None]) -> None:
        sender = member.sender
        if member.stopped or sender is None or not _is_active(sender, self._proton):
            self._resolve(fut, exc=_not_connected(member.device_id, "the telemetry link is not open; nothing was sent"))
            return
        pmsg = member.outgoing
        if pmsg is None:
            pmsg = member.outgoing = self._proton.Message(inferred=True)
        pmsg.id = message.id
        pmsg.body = bytes(message.body)
        pmsg.properties = cast(Any, dict(message.properties) if message.properties else None)
        member.pending[sender.send(pmsg)] = fut

    def _do_settle(self, member: _Member, token: str, outcome: SettleOutcome, fut: asyncio.Future[None]) -> None:
        dlv = member.c2d.pop(token, None)
        if dlv is None or member.stopped:
            err = translate(_LOCK_LOST, f"lock token {token!r} is not held on this connection")
            err.device_id = member.device_id
            self._resolve(fut, exc=err)
            return
        dlv.update(getattr(self._proton.Delivery, _DISPOSITIONS[outcome]))
        if dlv.link.remote_rcv_settle_mode == self._proton.Link.RCV_SECOND:
            member.settling[dlv] = fut
        else:
            dlv.settle()
            self._resolve(fut)

    def _on_message(self, delivery: Any, message: Any) -> None:
        link = delivery.link
        cbs_conn = getattr(link, "gw_cbs", None)
        member: _Member | None = getattr(link, "gw_member", None)
        if cbs_conn is not None:
            delivery.update(self._proton.Delivery.ACCEPTED)
            delivery.settle()
            self._on_cbs_answer(cbs_conn, message)
            return
        if member is None or member.stopped or link != member.receiver:
            delivery.update(self._proton.Delivery.RELEASED)
            delivery.settle()
            return
        token = str(uuid.uuid4())
        member.c2d[token] = delivery
        body = message.body
        body = bytes(body) if isinstance(body, (bytes, memoryview, bytearray)) else \
            body.encode() if isinstance(body, str) else b"" if body is None else repr(body).encode()
        msg_id, corr, count = message.id, message.correlation_id, message.delivery_count
        c2d = C2DMessage(member.device_id, token, str(msg_id) if msg_id is not None else None, body,
                         {str(k): str(v) for k, v in (message.properties or {}).items()},
                         count if isinstance(count, int) else 0, str(corr) if corr is not None else None)
        event = Inbound("c2d", c2d, member.device_id)
        self._call(lambda: member.events.put_nowait(event))

    def _on_outcome(self, delivery: Any) -> None:
        member: _Member | None = getattr(delivery.link, "gw_member", None)
        if member is None:
            return
        fut = member.pending.pop(delivery, None)
        if fut is None:
            return
        dstate = self._proton.Delivery
        remote = delivery.remote_state
        if remote == dstate.ACCEPTED:
            self._resolve(fut)
            return
        cond = delivery.remote.condition
        if cond is not None:
            err = _error_from_condition("delivery", cond, member.device_id)
        elif remote == dstate.REJECTED:
            err = translate("amqp:rejected", "delivery rejected with no condition")
            err.__cause__ = AmqpRemoteError("delivery", None, "rejected with no condition")
        else:
            err = make_error(code_of("ServerBusy"), transport=TRANSPORT, device_id=member.device_id, exact=False,
                             message=f"delivery released by the peer (state {remote})")
        err.device_id = err.device_id or member.device_id
        self._resolve(fut, exc=err)

    def _on_receiver_settled(self, delivery: Any) -> None:
        member: _Member | None = getattr(delivery.link, "gw_member", None)
        if member is None:
            return
        fut = member.settling.pop(delivery, None)
        if fut is None:
            return
        if delivery.remote_state == self._proton.Delivery.REJECTED and delivery.remote.condition is not None:
            self._resolve(fut, exc=_error_from_condition("delivery", delivery.remote.condition, member.device_id))
        else:
            self._resolve(fut)
        delivery.settle()


def _copy_for(err: IoTHubError, device_id: str) -> IoTHubError:
    """The connection's error as one device's: same code, facts and cause, its own ``device_id``."""
    copy = make_error(err.info, transport=TRANSPORT, exact=err.exact, device_id=device_id, message=err.message,
                      native=dict(err.native), retry_after=getattr(err, "retry_after", None),
                      retry_at=getattr(err, "retry_at", None), tracking_id=getattr(err, "tracking_id", None))
    copy.__cause__ = err.__cause__
    return copy


def _conn_error(conn: _Conn, device_id: str) -> IoTHubError:
    return _not_connected(device_id, f"shared AMQP connection #{conn.index} is closed")


class MuxDevice:
    """One device on an :class:`AmqpMux`: the :class:`~gateway.transport.Transport` its handler drives.

    ``connect()`` takes a slot on a shared connection (opening one if none has room: single-flight,
    after the pool's backoff), puts the device's token on the connection's ``$cbs`` and attaches the
    device's own session and links. ``credential_expiry`` is None with a token callable (CBS renews on
    the live connection); with a fixed token string, the token's expiry.
    """

    name = TRANSPORT
    ambiguous_drops = False

    def __init__(self, mux: AmqpMux, device_id: str, *, token: str | Callable[[], str], receive_c2d: bool,
                 send_timeout: float, connect_timeout: float, settle_timeout: float,
                 settle_mode: Literal["first", "second"]) -> None:
        self.mux = mux
        self.device_id = device_id
        self._token = token
        self.receive_c2d = receive_c2d
        self.send_timeout = send_timeout
        self.connect_timeout = connect_timeout
        self.settle_timeout = settle_timeout
        self.settle_mode = settle_mode
        self.events_address = f"amqps://{mux.hub_host}/devices/{device_id}/messages/events"
        self.c2d_address = f"amqps://{mux.hub_host}/devices/{device_id}/messages/devicebound"
        self._member: _Member | None = None
        self._closing = False

    @property
    def connected(self) -> bool:
        m = self._member
        return m is not None and m.ready_done and not m.dead

    @property
    def connection_index(self) -> int | None:
        """Which shared connection carries the device now (for tests and the bench)."""
        m = self._member
        return m.conn.index if m is not None and not m.dead else None

    @property
    def credential_expiry(self) -> float | None:
        if callable(self._token):
            return None
        m = self._member
        expiry = m.token_expiry if m is not None else None
        if expiry is None:
            with contextlib.suppress(ValueError):
                expiry = float(parse_sas_token(self._token).expiry)
        return expiry

    def next_token(self) -> str:
        token = self._token
        return token() if callable(token) else token

    async def connect(self) -> None:
        """Join a shared connection and attach this device's links. Raises ``IoTHubError``."""
        await self._leave()
        self._closing = False
        mux = self.mux
        if mux._closed:
            raise _not_connected(self.device_id, "the AMQP mux is closed")
        with _mapped(self.device_id):
            mux._ensure_thread()
        loop = asyncio.get_running_loop()
        conn = mux._slot(self)
        member = _Member(self, conn, loop)
        self._member = member
        try:
            async with asyncio.timeout(self.connect_timeout):
                try:
                    await asyncio.shield(conn.opened)
                except IoTHubError as err:
                    raise _copy_for(err, self.device_id) from err.__cause__
                mux._post(lambda: mux._do_join(member))
                await member.ready
        except TimeoutError:
            await self._leave()
            raise make_error(_TIMED_OUT, transport=TRANSPORT, device_id=self.device_id,
                             message=f"AMQP connect got no answer within {self.connect_timeout:g}s") from None
        except BaseException:
            await self._leave()
            raise

    async def close(self) -> None:
        """Leave the shared connection (it stays up for the other devices). Idempotent."""
        self._closing = True
        await self._leave()

    async def _leave(self) -> None:
        member = self._member
        if member is None:
            return
        self._member = None
        if member.dead:
            return
        mux = self.mux
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if mux._post(lambda: mux._do_leave(member, done)):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done, 5.0)
        mux._leave(member.conn, self.device_id)
        if self._closing:
            mux._close_if_empty(member.conn)

    def _live(self) -> _Member:
        m = self._member
        if m is None or m.dead or not m.ready_done:
            cause = m.error if m is not None else None
            err = _not_connected(self.device_id, "not connected" + (f" ({cause.name}: {cause.message})"
                                                                    if cause else ""))
            err.__cause__ = cause
            raise err
        return m

    async def send(self, message: Message) -> None:
        """Send one telemetry message and wait until the hub settles it (accepted)."""
        check_properties(message, TRANSPORT)
        member = self._live()
        mux = self.mux
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        mux._post(lambda: mux._do_send(member, message, fut))
        member.waiters.add(fut)
        try:
            async with asyncio.timeout(self.send_timeout):
                await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                raise
            raise make_error(_TIMED_OUT, transport=TRANSPORT, device_id=self.device_id,
                             message=f"AMQP send got no settlement within {self.send_timeout:g}s "
                                     "(outcome unknown)") from None
        finally:
            member.waiters.discard(fut)

    async def request(self, request: Request, *, timeout: float) -> Any:
        """``SettleC2D`` -> None once the hub confirmed; anything else raises ``UnsupportedRequest``."""
        if not isinstance(request, SettleC2D):
            raise UnsupportedRequest(f"a multiplexed AMQP device has no {type(request).__name__} request yet "
                                     "(it answers SettleC2D; use AmqpTransport for twin and methods)")
        member = self._live()
        mux = self.mux
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        token, outcome = request.lock_token, request.outcome
        mux._post(lambda: mux._do_settle(member, token, outcome, fut))
        member.waiters.add(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                raise
            raise make_error(_TIMED_OUT, transport=TRANSPORT, device_id=self.device_id,
                             message=f"AMQP settle got no answer within {timeout:g}s") from None
        finally:
            member.waiters.discard(fut)

    async def events(self) -> AsyncIterator[TransportEvent]:
        """``Inbound("c2d", C2DMessage)``, then ``Disconnected`` when this device's stay ends."""
        member = self._member
        if member is None:
            return
        while True:
            event = await member.events.get()
            if event is None:
                return
            yield event
            if isinstance(event, Disconnected):
                return


_MUX_HANDLER: type[Any] | None = None


def _mux_handler_class() -> type[Any]:
    """The proton handler, built on first use so that importing this module does not import proton."""
    global _MUX_HANDLER
    if _MUX_HANDLER is not None:
        return _MUX_HANDLER
    from proton.handlers import MessagingHandler

    class _MuxHandler(MessagingHandler):  # type: ignore[misc]
        def __init__(self, mux: AmqpMux) -> None:
            super().__init__(prefetch=mux.prefetch, auto_accept=False, auto_settle=True)
            self.mux = mux

        def on_start(self, event: Any) -> None:
            self.mux._on_start(event.container)

        def on_amqp_cmd(self, event: Any) -> None:
            self.mux._run_commands()

        def on_connection_opened(self, event: Any) -> None:
            self.mux._on_connection_opened(event.connection)

        def on_link_opened(self, event: Any) -> None:
            self.mux._on_link_opened(event.link)

        def on_message(self, event: Any) -> None:
            self.mux._on_message(event.delivery, event.message)

        def on_accepted(self, event: Any) -> None:
            self.mux._on_outcome(event.delivery)

        def on_rejected(self, event: Any) -> None:
            self.mux._on_outcome(event.delivery)

        def on_released(self, event: Any) -> None:
            self.mux._on_outcome(event.delivery)

        def on_settled(self, event: Any) -> None:
            if event.delivery.link.is_receiver:
                self.mux._on_receiver_settled(event.delivery)
            else:
                self.mux._on_outcome(event.delivery)

        # (MessagingHandler's child handlers get these events too: proton dispatches to both)
        def on_session_remote_open(self, event: Any) -> None:
            self.mux._on_remote_open(event.session)

        def on_link_remote_open(self, event: Any) -> None:
            self.mux._on_remote_open(event.link)

        def on_connection_remote_close(self, event: Any) -> None:
            self.mux._endpoint_error("connection", event.connection, event.connection.remote_condition)

        def on_session_remote_close(self, event: Any) -> None:
            self.mux._endpoint_error("session", event.session, event.session.remote_condition)

        def on_link_remote_close(self, event: Any) -> None:
            self.mux._endpoint_error("link", event.link, event.link.remote_condition)

        def on_transport_error(self, event: Any) -> None:
            self.mux._endpoint_error("transport", event.connection, event.transport.condition)

        def on_transport_closed(self, event: Any) -> None:
            self.mux._on_transport_closed(event.connection, event.transport)

        def on_connection_error(self, event: Any) -> None:
            pass

        def on_session_error(self, event: Any) -> None:
            pass

        def on_link_error(self, event: Any) -> None:
            pass

        def on_disconnected(self, event: Any) -> None:
            pass

    _MUX_HANDLER = _MuxHandler
    return _MuxHandler
