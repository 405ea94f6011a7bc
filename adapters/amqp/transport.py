"""An asyncio transport over python-qpid-proton, speaking IoT Hub's AMQP device surface.

Proton has no asyncio integration, so each connection gets one proton ``Container`` running in one
dedicated thread (at most one per adapter; it ends when the connection ends). Commands go in through
an ``EventInjector``; results come back with ``loop.call_soon_threadsafe``. Both directions are
batched: one wake-up carries every command or result queued meanwhile, which is what keeps the
thread hop cheap under load. Proton objects are only ever touched on the proton thread.

The device's link work (telemetry, C2D, twin, direct methods, and every outcome's error) is
:mod:`adapters.amqp.core`'s, shared with the multiplexed devices of :mod:`adapters.amqp.mux`; what
is here is the connection of one's own: SASL, CBS for one identity, the thread's life.

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
import logging
import ssl as _ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal

from adapters.amqp.core import (
    API_VERSION,
    CA_BUNDLES,
    CBS,
    CLOSED,
    DEFAULT_IDLE_TIMEOUT,
    TRANSPORT,
    AmqpRemoteError,
    DeviceLinks,
    DeviceSurface,
    Plumbing,
    Stay,
    Timer,
    cbs_answer_error,
    connect_options,
    error_from_condition,
    handler_class,
    mapped,
    not_connected,
    put_token_message,
    renewal_delay,
    subscriptions_of,
    to_error,
    twin_error,
)
from adapters.amqp.core import Target as _Target
from gateway.errors import IoTHubError, make_error
from gateway.sas import ConnectionString, parse_sas_token
from gateway.tls import default_port, resolve
from gateway.transport import C2DMessage, Disconnected, SettleOutcome

__all__ = ["API_VERSION", "DEFAULT_IDLE_TIMEOUT", "AmqpRemoteError", "AmqpTransport", "C2DMessage", "Outcome"]

log = logging.getLogger(__name__)

#: How a C2D settlement goes on the wire: complete -> accepted, reject -> rejected, abandon -> released.
Outcome = SettleOutcome
_twin_error: Final = twin_error  # the name the twin tests know


class AmqpTransport(DeviceSurface):
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
        self.subscriptions = subscriptions_of(subscribe)
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

    # -- Transport protocol (send, settle, request, events: DeviceSurface) ---------------------------

    def _stay(self) -> _Bridge | None:
        return self._bridge

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
            with mapped(self.device_id):
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

    # -- internals ----------------------------------------------------------------------------------

    def next_token(self) -> str:
        token = self._token
        if callable(token):
            return token()
        if token is None:
            raise ValueError("no token")
        return token

    async def _retire(self) -> None:
        """Close the current connection (if any) and join its thread."""
        bridge = self._bridge
        if bridge is None:
            return
        bridge.shutdown()
        await bridge.joined()
        if self._bridge is bridge:
            self._bridge = None


class _Bridge(Plumbing, Stay):
    """One connection of one device: the proton host (proton thread) and the device's stay (loop)."""

    def __init__(self, owner: AmqpTransport, loop: asyncio.AbstractEventLoop) -> None:
        Plumbing.__init__(self)
        Stay.__init__(self, owner.device_id, loop)
        self.owner = owner
        self.prefetch = owner.prefetch
        self.ended: asyncio.Future[None] = loop.create_future()  # resolved by the proton thread's last act
        self.thread: threading.Thread | None = None
        self.finished = threading.Event()
        self.tls_files: list[str] = []  # CA bundles this connection holds (CA_BUNDLES), released at its end
        self._stopped = False  # set on the proton thread once teardown began
        # proton side
        self.container: Any = None
        self.conn: Any = None
        self.cbs_sender: Any = None
        self.cbs_receiver: Any = None
        self.cbs_pending: str | None = None
        self.cbs_done = False
        self.renew_task: Any = None
        self.pending_expiry: float | None = None  # the token awaiting its CBS answer
        self.renew_expiry: float | None = None  # the token in force

    @property
    def twin_requests(self) -> dict[str, asyncio.Future[Any] | None]:
        """Twin requests waiting for their answer (proton side; read by tests once it is quiet)."""
        return self.links.twin_requests

    # -- thread lifecycle (loop thread) -------------------------------------------------------------

    def start(self) -> None:
        self.open_pipe(self.loop)
        self.links = DeviceLinks(self.owner, self, self.events)
        self.thread = threading.Thread(target=self._run, name=f"amqp-{self.device_id}", daemon=True)
        self.thread.start()

    def discard(self) -> None:
        """The thread never started: release the injector's pipe."""
        self.close_pipe()

    def _run(self) -> None:
        try:
            # Built here, not on the loop: a Container sets up OpenSSL contexts (tens of milliseconds).
            self.container = self.proton.reactor.Container(handler_class()(self))
            self.container.container_id = f"iothub-gateway-{self.device_id}-{uuid.uuid4().hex[:8]}"
            self.container.run()
        except BaseException as exc:  # a bug in a callback must not leave callers waiting
            log.exception("proton container failed")
            with contextlib.suppress(Exception):
                self.fail(to_error(exc, self.device_id))
        finally:
            if not self._stopped:
                self.fail(make_error(CLOSED, transport=TRANSPORT, device_id=self.device_id, exact=False,
                                     message="the AMQP connection ended"))
            self.call(self._on_thread_end)
            self.close_pipe()
            for path in self.tls_files:
                CA_BUNDLES.release(path)
            self.finished.set()
            # The last act: joined() waits for this on the loop, without holding an executor thread.
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                self.loop.call_soon_threadsafe(self._mark_ended)

    def _mark_ended(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def _on_thread_end(self) -> None:
        self.end(self.error)
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
        self.flush()  # the last batched results land now

    def command_failed(self, exc: Exception) -> None:
        self.fail(to_error(exc, self.device_id))

    # -- commands (proton thread) -------------------------------------------------------------------

    def do_close(self) -> None:
        if self._stopped:
            return
        # The thread must end by itself even if nobody awaits joined() any more (a caller's timeout cut
        # close() short): a peer that never answers our close gets its socket cut after close_timeout.
        self.container.schedule(self.owner.close_timeout, Timer(self.do_abort))
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
        kwargs = connect_options(host=owner.host, hub_host=owner.hub_host, tls_context=owner.ssl_context,
                                 idle_timeout=owner.idle_timeout, proton=self.proton, tls_files=self.tls_files,
                                 user=owner.user, password=owner.password)
        self.conn = container.connect(f"{'amqps' if tls else 'amqp'}://{owner.host}:{owner.port}", **kwargs)

    def on_connection_opened(self, connection: Any) -> None:
        if self.owner.cbs:
            self.cbs_sender = self.container.create_sender(self.conn, target=CBS, name=f"cbs-s-{uuid.uuid4()}")
            self.cbs_receiver = self.container.create_receiver(
                self.conn, source=CBS, name=f"cbs-r-{uuid.uuid4()}", options=_Target("cbs"))
            self.cbs_sender.gw_cbs = self.cbs_receiver.gw_cbs = True
            self.put_token()
        else:
            self.links.attach(self.container, self.conn)

    def put_token(self) -> None:
        try:
            token = self.owner.next_token()
        except Exception as exc:
            self.fail(to_error(exc, self.device_id))
            return
        msg, self.cbs_pending, self.pending_expiry = put_token_message(
            self.proton, token, f"{self.owner.hub_host}/devices/{self.device_id}")
        self.cbs_sender.send(msg)

    def on_cbs_answer(self, message: Any) -> None:
        if message.correlation_id != self.cbs_pending:
            return
        self.cbs_pending = None
        err = cbs_answer_error(message, self.device_id)
        if err is not None:
            self.fail(err)
            return
        self.renew_expiry = expiry = self.pending_expiry
        self.call(lambda: setattr(self, "token_expiry", expiry))
        if not self.cbs_done:
            self.cbs_done = True
            self.links.attach(self.container, self.conn)
        self.schedule_renewal()

    def schedule_renewal(self) -> None:
        expiry = self.renew_expiry
        if expiry is None or not callable(self.owner._token):
            return
        delay = renewal_delay(expiry, self.owner.renew_margin)
        self.renew_task = self.container.schedule(delay, Timer(self._renew))

    def _renew(self) -> None:
        if not self._stopped and self.cbs_pending is None:
            self.put_token()

    def on_link_opened(self, link: Any) -> None:
        if getattr(link, "gw_links", None) is self.links and self.links.on_link_opened(link):
            self.call(self._ready)

    def _ready(self) -> None:
        self.ready_done = True
        if not self.ready.done():
            self.ready.set_result(None)

    def on_message(self, delivery: Any, message: Any) -> None:
        if getattr(delivery.link, "gw_cbs", False):
            delivery.update(self.proton.Delivery.ACCEPTED)
            delivery.settle()
            self.on_cbs_answer(message)
            return
        self.links.on_message(delivery, message)

    def on_remote_open(self, endpoint: Any) -> None:
        pass

    # -- failures (proton thread) -------------------------------------------------------------------

    def endpoint_error(self, where: str, endpoint: Any, cond: Any) -> None:
        """On a connection of its own, every failure (even one link's) ends the connection."""
        self.fail(error_from_condition(where, cond, self.device_id))

    def fail(self, err: IoTHubError | None) -> None:
        """Tear the connection down: ``err`` None is our own clean close."""
        if self._stopped:
            return
        self._stopped = True
        if err is not None:
            err.device_id = err.device_id or self.device_id
        if self.renew_task is not None:
            with contextlib.suppress(Exception):
                self.renew_task.cancel()
        links = self.links
        was_up = links.up

        def mark_dead() -> None:
            self.dead = True
            self.error = err

        self.call(mark_dead)
        if err is not None and was_up and not self.owner._closing:
            links.emit(Disconnected(err))  # first, so the supervisor learns the cause before the senders
        if not was_up:
            self.resolve(self.ready, exc=err or not_connected(self.device_id, "closed before the connection was up"))
        links.stop(err)
        conn = self.conn
        if conn is not None and not conn.state & self.proton.Endpoint.LOCAL_CLOSED:
            conn.close()
        if conn is None or conn.transport is None:
            self.injector.close()
        # else: the injector stays open until the transport is gone (on_transport_closed), so that
        # joined() can still post do_abort when the peer never answers our close.

    def on_transport_closed(self, connection: Any, transport: Any) -> None:
        if not self._stopped:
            self.endpoint_error("transport", connection, transport.condition if transport is not None else None)
        self.injector.close()
        # This container serves one connection and it is over: end run() now rather than after the
        # reactor's next idle select (up to ~3 s when the peer keeps its socket open).
        self.container.stop()
