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

Surface: the same as :class:`~adapters.amqp.transport.AmqpTransport`'s, from the same code
(:mod:`adapters.amqp.core`): telemetry (``send``), cloud-to-device messages (``Inbound("c2d")``,
``SettleC2D``), the twin (``GetTwin``, ``PatchReported``, ``Inbound("twin_desired")``) and direct
methods (``Inbound("method")``, ``RespondMethod``), each device on its own links.

Proton objects are only touched on the proton thread; results come back to the loop in batches
(``call_soon_threadsafe``), commands go in through one ``EventInjector``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl as _ssl
import threading
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal

from adapters.amqp.core import (
    API_VERSION,
    CA_BUNDLES,
    CBS,
    CLOSED,
    DEFAULT_IDLE_TIMEOUT,
    TIMED_OUT,
    TRANSPORT,
    DeviceLinks,
    DeviceSurface,
    Plumbing,
    Stay,
    Target,
    Timer,
    cbs_answer_error,
    connect_options,
    copy_for,
    error_from_condition,
    handler_class,
    mapped,
    not_connected,
    put_token_message,
    renewal_delay,
    subscriptions_of,
    to_error,
)
from gateway.errors import IoTHubError, make_error
from gateway.sas import parse_sas_token
from gateway.tls import default_port, resolve
from gateway.transport import Disconnected

__all__ = ["DEVICES_PER_CONNECTION", "AmqpMux", "MuxDevice"]

log = logging.getLogger(__name__)

#: IoT Hub's (and the Java SDK's) limit of device identities per AMQPS connection (500 over WebSockets).
DEVICES_PER_CONNECTION: Final = 1000


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


class _Member(Stay):
    """One device's stay on one connection: its session, and its links (``DeviceLinks``) on it."""

    def __init__(self, device: MuxDevice, conn: _Conn, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(device.device_id, loop)
        self.device = device
        self.conn = conn
        self.mux = device.mux
        self.links = DeviceLinks(device, device.mux, self.events, self)
        # proton side
        self.session: Any = None
        self.renew_task: Any = None
        self.pending_expiry: float | None = None
        self.renew_expiry: float | None = None

    def post(self, fn: Callable[[], None]) -> bool:
        return self.mux.post(fn)


class AmqpMux(Plumbing):
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
        super().__init__()
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
        self._conns: list[_Conn] = []  # loop side: the connections not known dead, in opening order
        self._index = 0
        self._failures = 0  # connection failures in a row (the pool's one backoff)
        self._next_open = 0.0  # loop clock: no connection opens before this
        self._opens = 0  # connection attempts made (for tests and the bench)
        self._closed = False
        # the proton thread
        self._thread: threading.Thread | None = None
        self._container: Any = None
        self._finished: asyncio.Future[None] | None = None
        self._all: list[_Conn] = []  # proton side: every connection opened, until its transport closed
        self._transports = 0  # proton side: sockets not closed yet

    # -- public ----------------------------------------------------------------------------------------

    def device(self, device_id: str, *, token: str | Callable[[], str], receive_c2d: bool = True,
               send_timeout: float = 30.0, connect_timeout: float = 30.0, settle_timeout: float = 30.0,
               settle_mode: Literal["first", "second"] = "second", subscribe: Iterable[str] = (),
               api_version: str = API_VERSION) -> MuxDevice:
        """The transport of one device on this pool (connects on its ``connect()``).

        ``subscribe``: "methods" and/or "twin" links attached at connect (as ``AmqpTransport``'s)."""
        return MuxDevice(self, device_id, token=token, receive_c2d=receive_c2d, send_timeout=send_timeout,
                         connect_timeout=connect_timeout, settle_timeout=settle_timeout, settle_mode=settle_mode,
                         subscribe=subscribe, api_version=api_version)

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
                self._conn_failed(conn, not_connected(None, "the AMQP mux is closed"))
        if self._thread is None or self._finished is None:
            return
        self.post(self._do_shutdown)
        try:
            await asyncio.wait_for(asyncio.shield(self._finished), 10.0)
        except TimeoutError:
            log.warning("the AMQP mux thread did not end within 10 s")
        self._thread.join(1.0)
        self.flush()

    # -- the pool (loop side) --------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        loop = asyncio.get_running_loop()
        self.open_pipe(loop)
        self._finished = loop.create_future()
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
            loop.call_at(self._next_open, lambda: self.post(lambda: self._do_open(conn)))
        else:
            self.post(lambda: self._do_open(conn))
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
        self.post(lambda: self._fail_conn(conn, None))

    def _conn_failed(self, conn: _Conn, err: IoTHubError | None) -> None:
        """Loop side: a connection is gone. The pool's one backoff starts (a clean close by us: none)."""
        news = not conn.dead  # False: closed by _close_if_empty, no backoff for that
        conn.dead = True
        if conn in self._conns:
            self._conns.remove(conn)
        if not conn.opened.done():
            conn.opened.set_exception(err or not_connected(None, "the AMQP connection closed before it opened"))
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

    # -- the proton thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._container = self.proton.reactor.Container(handler_class()(self))
            self._container.container_id = f"iothub-gateway-mux-{uuid.uuid4().hex[:8]}"
            self._container.run()
        except BaseException:
            log.exception("the AMQP mux container failed")
        finally:
            gone = make_error(CLOSED, transport=TRANSPORT, exact=False, message="the AMQP mux thread ended")
            for conn in list(self._live_conns()):
                self._fail_conn(conn, gone)
            self.close_pipe()
            self.call(self._mark_finished)

    def _mark_finished(self) -> None:
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    def _live_conns(self) -> list[_Conn]:
        return [c for c in self._all if not c.stopped]

    def on_start(self, container: Any) -> None:
        container.selectable(self.injector)

    def _do_open(self, conn: _Conn) -> None:
        if self._closed:
            self._fail_conn(conn, not_connected(None, "the AMQP mux is closed"))
            return
        tls = self.ssl_context is not None
        try:
            with mapped(None):
                kwargs = connect_options(host=self.host, hub_host=self.hub_host, tls_context=self.ssl_context,
                                         idle_timeout=self.idle_timeout, proton=self.proton,
                                         tls_files=conn.tls_files)
                conn.pconn = self._container.connect(f"{'amqps' if tls else 'amqp'}://{self.host}:{self.port}",
                                                     **kwargs)
        except IoTHubError as err:
            self._fail_conn(conn, err)
            return
        conn.pconn.gw_conn = conn
        self._all.append(conn)
        conn.transport_open = True
        self._transports += 1

    def on_connection_opened(self, pconn: Any) -> None:
        conn: _Conn | None = getattr(pconn, "gw_conn", None)
        if conn is None or conn.stopped or conn.cbs_sender is not None:
            return
        conn.cbs_sender = self._container.create_sender(pconn, target=CBS, name=f"cbs-s-{uuid.uuid4()}")
        conn.cbs_receiver = self._container.create_receiver(pconn, source=CBS, name=f"cbs-r-{uuid.uuid4()}",
                                                            options=Target("cbs"))
        conn.cbs_sender.gw_cbs = conn
        conn.cbs_receiver.gw_cbs = conn

    def on_link_opened(self, link: Any) -> None:
        conn: _Conn | None = getattr(link, "gw_cbs", None)
        if conn is not None:
            remote = link.remote_target if link.is_sender else link.remote_source
            if remote.address is None and not remote.dynamic:
                return  # a refused attach: the detach with the reason follows
            active = self.proton.Endpoint.REMOTE_ACTIVE
            if not conn.up and all(is_up.state & active for is_up in (conn.cbs_sender, conn.cbs_receiver)):
                conn.up = True
                self.call(lambda: self._conn_opened(conn))
                for joined in list(conn.joined.values()):
                    self._put_token(joined)
            return
        links: DeviceLinks | None = getattr(link, "gw_links", None)
        if links is not None and links.on_link_opened(link):
            member: _Member = links.owner
            self.call(lambda: _member_ready(member))

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
        if member.links.stopped:
            return
        try:
            token = member.device.next_token()
        except Exception as exc:
            self._fail_member(member, to_error(exc, member.device_id))
            return
        msg, msg_id, member.pending_expiry = put_token_message(
            self.proton, token, f"{self.hub_host}/devices/{member.device_id}")
        conn = member.conn
        conn.cbs_pending[msg_id] = member
        conn.cbs_sender.send(msg)

    def _on_cbs_answer(self, conn: _Conn, message: Any) -> None:
        member = conn.cbs_pending.pop(str(message.correlation_id), None)
        if member is None or member.links.stopped:
            return
        err = cbs_answer_error(message, member.device_id)
        if err is not None:  # this device's token refused: its neighbours are not concerned
            self._fail_member(member, err)
            return
        member.renew_expiry = expiry = member.pending_expiry
        self.call(lambda: setattr(member, "token_expiry", expiry))
        if member.session is None:
            self._attach(member)
        self._schedule_renewal(member)

    def _schedule_renewal(self, member: _Member) -> None:
        expiry = member.renew_expiry
        if expiry is None or not callable(member.device._token):
            return

        def renew() -> None:
            if not member.links.stopped and not member.conn.stopped:
                self._put_token(member)

        delay = renewal_delay(expiry, self.renew_margin)
        member.renew_task = self._container.schedule(delay, Timer(renew))

    def _attach(self, member: _Member) -> None:
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
        member.links.attach(self._container, session)

    def _do_leave(self, member: _Member, done: asyncio.Future[None]) -> None:
        self._fail_member(member, None)
        self.resolve(done)

    def _fail_member(self, member: _Member, err: IoTHubError | None) -> None:
        """One device leaves its connection (``err`` None: its own clean close); the others stay."""
        links = member.links
        if links.stopped:
            return
        conn = member.conn
        if conn.joined.get(member.device_id) is member:
            del conn.joined[member.device_id]
        for key, waiting in list(conn.cbs_pending.items()):
            if waiting is member:
                del conn.cbs_pending[key]
        if member.renew_task is not None:
            with contextlib.suppress(Exception):
                member.renew_task.cancel()
        own = [member.session] if self.session_per_device else links.endpoints()
        for endpoint in own:  # its own session, or its own links on the shared one
            if endpoint is not None and not conn.stopped:
                self._close_when_open(endpoint)
        if err is not None:
            err.device_id = err.device_id or member.device_id
        was_up = links.up

        def on_loop() -> None:
            if err is not None and was_up and not member.device._closing:
                member.events.put_nowait(Disconnected(err))  # first: the supervisor learns the cause
            member.dead, member.error = True, err
            self._leave(conn, member.device_id)
            if not member.ready.done():
                member.ready.set_exception(err or not_connected(member.device_id, "closed before it was up"))
                member.ready.exception()  # retrieved: nobody may be waiting any more (a timed-out connect)

        self.call(on_loop)
        links.stop(err)  # after on_loop: the senders hear of it after the supervisor, each with its own error
        self.call(lambda: member.end(err))  # then whoever still waits (nothing in flight: not connected)
        links.emit(None)

    def _close_when_open(self, endpoint: Any) -> None:
        """Close a session or link, but not before the peer's begin/attach reply has come.

        Proton forgets a session's channel as soon as its END goes out; a BEGIN reply still on the way
        then fails the whole connection ("begin reply to unknown channel"), every device on it with it.
        A device leaving early (its connect timed out) would tear down its neighbours.
        """
        state = endpoint.state
        if state & self.proton.Endpoint.LOCAL_CLOSED:
            return
        if state & self.proton.Endpoint.REMOTE_UNINIT:
            endpoint.gw_close_pending = True  # closed by on_remote_open
            return
        with contextlib.suppress(Exception):
            endpoint.close()

    def on_remote_open(self, endpoint: Any) -> None:
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
        self.call(lambda: self._conn_failed(conn, err))
        for member in list(conn.joined.values()):
            self._fail_member(member, None if err is None else copy_for(err, member.device_id))
        conn.joined.clear()
        conn.cbs_pending.clear()
        pconn = conn.pconn
        if pconn is not None and not pconn.state & self.proton.Endpoint.LOCAL_CLOSED:
            with contextlib.suppress(Exception):
                pconn.close()
        for path in conn.tls_files:
            CA_BUNDLES.release(path)
        conn.tls_files.clear()

    def endpoint_error(self, where: str, endpoint: Any, cond: Any) -> None:
        if where in ("connection", "transport"):
            conn = getattr(endpoint, "gw_conn", None)
            if conn is not None:
                self._fail_conn(conn, error_from_condition(where, cond))
            return
        cbs_conn = getattr(endpoint, "gw_cbs", None)
        if cbs_conn is not None:  # the connection's CBS links carry every device's token
            self._fail_conn(cbs_conn, error_from_condition(where, cond))
            return
        shared = getattr(endpoint, "gw_shared", None) if where == "session" else None
        if shared is not None:  # the shared session: every device on it, once; the connection stays
            if shared.shared_session == endpoint:
                shared.shared_session = None
            if not endpoint.state & self.proton.Endpoint.LOCAL_CLOSED:
                endpoint.close()
            for member in [m for m in shared.joined.values() if m.session == endpoint]:
                self._fail_member(member, error_from_condition(where, cond, member.device_id))
            return
        owner: _Member | None = getattr(endpoint, "gw_member", None)  # the device's own session
        if owner is None:
            links: DeviceLinks | None = getattr(endpoint, "gw_links", None)  # one of the device's links
            owner = links.owner if links is not None else None
        if owner is not None:
            self._fail_member(owner, error_from_condition(where, cond, owner.device_id))

    def _do_shutdown(self) -> None:
        for conn in self._live_conns():
            self._fail_conn(conn, None)
        if self._transports == 0:
            self._container.stop()
        else:  # wait for the close handshakes, but not for ever
            self._container.schedule(5.0, Timer(self._abort_all))

    def _abort_all(self) -> None:
        for conn in self._all:
            transport = getattr(conn.pconn, "transport", None)
            if transport is not None:
                transport.close_tail()
                transport.close_head()
        self._container.stop()

    def on_transport_closed(self, connection: Any, transport: Any) -> None:
        conn: _Conn | None = getattr(connection, "gw_conn", None) if connection is not None else None
        if conn is None:
            return
        if not conn.stopped:
            self._fail_conn(conn, error_from_condition("transport", getattr(transport, "condition", None)))
        if conn.transport_open:
            conn.transport_open = False
            self._transports -= 1
            if conn in self._all:
                self._all.remove(conn)
        if self._closed and self._transports == 0:
            self._container.stop()

    # -- inbound (proton thread) -----------------------------------------------------------------------

    def on_message(self, delivery: Any, message: Any) -> None:
        link = delivery.link
        cbs_conn = getattr(link, "gw_cbs", None)
        if cbs_conn is not None:
            delivery.update(self.proton.Delivery.ACCEPTED)
            delivery.settle()
            self._on_cbs_answer(cbs_conn, message)
            return
        links: DeviceLinks | None = getattr(link, "gw_links", None)
        if links is None:
            delivery.update(self.proton.Delivery.RELEASED)
            delivery.settle()
            return
        links.on_message(delivery, message)


def _member_ready(member: _Member) -> None:
    member.ready_done = True
    if not member.ready.done():
        member.ready.set_result(None)


def _conn_error(conn: _Conn, device_id: str) -> IoTHubError:
    return not_connected(device_id, f"shared AMQP connection #{conn.index} is closed")


class MuxDevice(DeviceSurface):
    """One device on an :class:`AmqpMux`: the :class:`~gateway.transport.Transport` its handler drives.

    ``connect()`` takes a slot on a shared connection (opening one if none has room: single-flight,
    after the pool's backoff), puts the device's token on the connection's ``$cbs`` and attaches the
    device's own session and links. ``credential_expiry`` is None with a token callable (CBS renews on
    the live connection); with a fixed token string, the token's expiry. Requests and events are
    ``AmqpTransport``'s (:class:`~adapters.amqp.core.DeviceSurface`).
    """

    name = TRANSPORT
    ambiguous_drops = False

    def __init__(self, mux: AmqpMux, device_id: str, *, token: str | Callable[[], str], receive_c2d: bool,
                 send_timeout: float, connect_timeout: float, settle_timeout: float,
                 settle_mode: Literal["first", "second"], subscribe: Iterable[str] = (),
                 api_version: str = API_VERSION) -> None:
        self.mux = mux
        self.device_id = device_id
        self._token = token
        self.receive_c2d = receive_c2d
        self.send_timeout = send_timeout
        self.connect_timeout = connect_timeout
        self.settle_timeout = settle_timeout
        self.settle_mode = settle_mode
        self.subscriptions = subscriptions_of(subscribe)
        self.api_version = api_version
        self._member: _Member | None = None
        self._closing = False

    # the link addresses, derived (a string each would cost ~150 bytes per device at 10,000 devices)
    @property
    def events_address(self) -> str:
        return f"amqps://{self.mux.hub_host}/devices/{self.device_id}/messages/events"

    @property
    def c2d_address(self) -> str:
        return f"amqps://{self.mux.hub_host}/devices/{self.device_id}/messages/devicebound"

    @property
    def twin_address(self) -> str:
        return f"amqps://{self.mux.hub_host}/devices/{self.device_id}/twin"

    @property
    def methods_address(self) -> str:
        return f"amqps://{self.mux.hub_host}/devices/{self.device_id}/methods/devicebound"

    def _stay(self) -> _Member | None:
        return self._member

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
            raise not_connected(self.device_id, "the AMQP mux is closed")
        with mapped(self.device_id):
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
                    raise copy_for(err, self.device_id) from err.__cause__
                mux.post(lambda: mux._do_join(member))
                await member.ready
        except TimeoutError:
            await self._leave()
            raise make_error(TIMED_OUT, transport=TRANSPORT, device_id=self.device_id,
                             message=f"AMQP connect got no answer within {self.connect_timeout:g}s") from None
        except BaseException:
            await self._leave()
            raise
        member.attached.update(self.subscriptions)

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
        if mux.post(lambda: mux._do_leave(member, done)):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done, 5.0)
        mux._leave(member.conn, self.device_id)
        if self._closing:
            mux._close_if_empty(member.conn)
