"""The MQTT adapter: IoT Hub's MQTT device surface over paho-mqtt 2.x, driven by the asyncio loop.

paho runs no thread here (the aiomqtt 2.x pattern): its socket is watched with ``add_reader`` /
``add_writer`` and a small task calls ``loop_misc()`` for keepalive, so every paho callback runs on the
event-loop thread and can settle futures directly. Only the blocking ``client.connect()`` (DNS, TCP,
TLS handshake) runs in an executor thread; the socket callbacks it fires are hopped onto the loop.

Each ``connect()`` builds a fresh paho client with ``reconnect_on_failure=False``: the shared handler
owns reconnects and resends, and a fresh client cannot resend stale in-flight messages behind its back.

Every failure is an :class:`~gateway.errors.IoTHubError` from the MQTT translator (CONNACK, PUBACK,
SUBACK, DISCONNECT reason codes with their properties, twin response topics) or from ``normalize``
(socket and TLS errors), with the raw answer (:class:`MqttAnswer`) or exception on ``__cause__``.
Nothing waits forever: a send or request has a deadline, and everything pending fails when the
connection drops, with the drop's code, never with NotConnected, because a message that was written
may have been delivered (the handler resends it as a possible duplicate).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import json
import logging
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, quote

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from adapters.mqtt.translate import translate, translate_topic
from gateway.codes import code_of
from gateway.errors import IoTHubError, make_error
from gateway.normalize import normalize
from gateway.sas import ConnectionString
from gateway.transport import Disconnected, Inbound, Message, TransportEvent

__all__ = ["API_VERSION", "MQTT_5", "MQTT_311", "REQUEST_KINDS", "MqttAnswer", "MqttTransport"]

log = logging.getLogger(__name__)

API_VERSION = "2021-04-12"
MQTT_311 = 4
MQTT_5 = 5

_NOT_CONNECTED = code_of("NotConnected")
_TIMED_OUT = code_of("OperationTimedOut")
_CLOSED = code_of("DeviceConnectionClosedRemotely")
_ARGUMENT = code_of("ArgumentInvalid")
_PROTOCOL = code_of("ProtocolViolation")

#: Request kinds :meth:`MqttTransport.request` understands.
REQUEST_KINDS = ("twin_get", "twin_patch", "method_response")


class MqttAnswer(Exception):
    """The raw MQTT answer behind a translated error, kept as its ``__cause__`` for logs and debugging."""

    def __init__(self, packet: str, reason_code: object, properties: object = None, topic: str | None = None) -> None:
        self.packet = packet
        self.reason_code = reason_code
        self.properties = properties
        self.topic = topic
        where = f" on {topic}" if topic else ""
        super().__init__(f"MQTT {packet}{where}: {reason_code!s} {properties!s}".strip())


def _rc_value(reason_code: object) -> int:
    value = getattr(reason_code, "value", reason_code)
    return value if isinstance(value, int) else -1


def _is_failure(reason_code: object) -> bool:
    return _rc_value(reason_code) >= 0x80


class _Link:
    """One paho client and one socket: the state of a single connection attempt and its life."""

    def __init__(self, owner: MqttTransport, client: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.client = client
        self.loop = loop
        self.connected: asyncio.Future[None] = loop.create_future()
        self.gone: asyncio.Future[None] = loop.create_future()  #: set when the socket is closed
        self.publishes: dict[int, asyncio.Future[None]] = {}
        self.subscribes: dict[int, asyncio.Future[tuple[list[Any], Any]]] = {}
        self.requests: dict[str, asyncio.Future[tuple[str, bytes]]] = {}
        self.events: asyncio.Queue[TransportEvent | None] = asyncio.Queue()
        self.inbound = 0
        self.ready = False  #: CONNACK and SUBACKs done: a later drop is reported as Disconnected
        self.closing = False  #: close() asked for it: no Disconnected event
        self.down = False
        self.error: IoTHubError | None = None
        self.sock: Any = None
        self.misc: asyncio.Task[None] | None = None
        self.deadlines: collections.deque[tuple[float, asyncio.Future[None], int, str]] = collections.deque()
        self.sweeper: asyncio.Task[None] | None = None
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message

    # -- socket plumbing (on_socket_open / register_write also fire in connect()'s executor thread) --
    def _in_loop(self, fn: Callable[..., object], *args: object) -> None:
        if threading.get_ident() == self.owner._loop_thread:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        self._in_loop(self._watch, sock)

    def _watch(self, sock: Any) -> None:
        if self.down or sock.fileno() < 0:  # torn down (or abandoned) before the loop got here
            with contextlib.suppress(Exception):
                sock.close()
            return
        self.sock = sock
        self.loop.add_reader(sock, self.client.loop_read)
        self.misc = self.loop.create_task(self._misc_loop(), name="mqtt-misc")

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        self._in_loop(self._unwatch, sock)

    def _unwatch(self, sock: Any) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(sock)
        with contextlib.suppress(Exception):
            self.loop.remove_writer(sock)
        if self.misc is not None and self.misc is not asyncio.current_task(self.loop):
            self.misc.cancel()
        if not self.gone.done():
            self.gone.set_result(None)

    def _on_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self._in_loop(self._want_write, sock)

    def _want_write(self, sock: Any) -> None:
        if not self.down and sock.fileno() >= 0:
            self.loop.add_writer(sock, self.client.loop_write)

    def _on_unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self._in_loop(self._no_write, sock)

    def _no_write(self, sock: Any) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_writer(sock)

    async def _misc_loop(self) -> None:
        """paho's periodic work: PINGREQ when idle, and noticing a missing PINGRESP (keepalive)."""
        while True:
            await asyncio.sleep(1.0)
            if self.client.loop_misc() != mqtt.MQTT_ERR_SUCCESS:
                return

    # -- send deadlines ---------------------------------------------------------------------------
    def expect(self, future: asyncio.Future[None], mid: int, message_id: str, deadline: float) -> None:
        """Fail ``future`` with OperationTimedOut if no PUBACK settled it by ``deadline`` (loop time)."""
        deadlines = self.deadlines
        while deadlines and deadlines[0][1].done():  # PUBACKs come in order: this stays short
            deadlines.popleft()
        deadlines.append((deadline, future, mid, message_id))
        if self.sweeper is None or self.sweeper.done():
            self.sweeper = self.loop.create_task(self._sweep(), name="mqtt-send-deadlines")

    async def _sweep(self) -> None:
        deadlines = self.deadlines
        while deadlines and not self.down:
            deadline, future, mid, message_id = deadlines[0]
            if future.done():
                deadlines.popleft()
                continue
            delay = deadline - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            deadlines.popleft()
            self.publishes.pop(mid, None)
            future.set_exception(self.owner._timed_out(
                f"no PUBACK for message {message_id!r} within {self.owner.send_timeout:g}s"))

    # -- protocol callbacks (loop thread) ------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        # paho can call on_connect more than once for one connection (aiomqtt guards it too); the
        # first CONNACK decides, a repeat must not touch a settled future ("InvalidStateError").
        if self.connected.done():
            return
        if _is_failure(reason_code):
            err = self._translate(reason_code, "connack", properties)
            self.error = err
            self.connected.set_exception(err)
        else:
            self.connected.set_result(None)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        # paho reports some ends twice: a refused MQTT 5 CONNACK gives on_connect(failure) and then
        # on_disconnect(130), and a keepalive timeout in loop_misc can be followed by the socket's own
        # close. Only the first report counts; the rest would fail futures a second time.
        if self.down:
            return
        from_server = bool(getattr(flags, "is_disconnect_packet_from_server", False))
        if self.closing:
            err = make_error(_TIMED_OUT, transport="mqtt",
                             message="the connection was closed locally while waiting for an answer; outcome unknown")
        elif self.error is not None:  # refused at CONNACK: that is the reason, not the close after it
            err = self.error
        else:
            found = self._translate(reason_code, "disconnect", properties if from_server else None, quiet=True)
            if found is None:  # a server's "normal disconnection" still ends the connection uninvited
                found = make_error(_CLOSED, transport="mqtt", message="the server closed the connection")
                found.__cause__ = MqttAnswer("disconnect", reason_code, properties)
            found.native["from_server"] = from_server
            err = found
        self._finish(err)

    def _finish(self, err: IoTHubError) -> None:
        """The connection is over: fail everything still waiting, tell events() why, once."""
        if self.down:
            return
        self.down = True
        if self.error is None:
            self.error = err
        if not self.connected.done():
            self.connected.set_exception(err)
            self.connected.exception()  # retrieved: connect() may already have given up on it
        _fail_all(self.publishes, err)
        self.deadlines.clear()
        if self.sweeper is not None and self.sweeper is not asyncio.current_task(self.loop):
            self.sweeper.cancel()
        _fail_all(self.subscribes, err)
        _fail_all(self.requests, err)
        if self.ready and not self.closing:
            self.events.put_nowait(Disconnected(err))
        self.events.put_nowait(None)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        future = self.publishes.pop(mid, None)
        if future is None or future.done():
            return  # a QoS 0 publish (on_publish fires when written) or one that timed out
        if getattr(reason_code, "value", None) == 0:  # the common case first: a plain success
            future.set_result(None)
        elif _is_failure(reason_code):
            future.set_exception(self._translate(reason_code, "puback", properties))
        else:
            future.set_result(None)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        future = self.subscribes.pop(mid, None)
        if future is not None and not future.done():
            future.set_result((list(reason_codes), properties))

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        topic: str = msg.topic
        payload = bytes(msg.payload)
        device = self.owner.device_id
        if topic.startswith(("$iothub/twin/res/", "$iothub/methods/res/")):
            rid = _query(topic).get("$rid", "")
            future = self.requests.pop(rid, None)
            if future is not None and not future.done():
                future.set_result((topic, payload))
            return
        event: Inbound
        if topic.startswith("$iothub/methods/POST/"):
            name = topic[len("$iothub/methods/POST/") :].partition("/")[0]
            event = Inbound("method", {"name": name, "rid": _query(topic).get("$rid", ""), "payload": _json(payload)},
                            device)
        elif topic.startswith("$iothub/twin/PATCH/properties/desired/"):
            version = _query(topic).get("$version")
            event = Inbound("twin_desired", {"patch": _json(payload), "version": version}, device)
        elif topic.startswith(f"devices/{device}/messages/devicebound/"):
            bag = topic[len(f"devices/{device}/messages/devicebound/") :]
            event = Inbound("c2d", {"body": payload, "properties": dict(parse_qsl(bag, keep_blank_values=True))},
                            device)
        else:
            event = Inbound("message", {"topic": topic, "payload": payload}, device)
        if self.inbound >= self.owner.max_events:
            log.warning("MQTT inbound queue full (%d); dropping a %s event", self.owner.max_events, event.kind)
            return
        self.inbound += 1
        self.events.put_nowait(event)

    def _translate(self, reason_code: Any, packet: str, properties: Any, *, quiet: bool = False) -> Any:
        """translate() with the raw answer as ``__cause__``; a failure code with no error is a protocol bug."""
        version = self.owner.protocol
        try:
            err = translate(_rc_value(reason_code) if version < MQTT_5 else reason_code,
                            protocol_version=version, packet=packet, properties=properties)
        except ValueError as exc:  # paho handed us something the translator cannot read
            err = make_error(_PROTOCOL, transport="mqtt", message=f"unreadable MQTT {packet} answer: {exc}",
                             exact=False)
        if err is None:
            if quiet:
                return None
            err = make_error(_PROTOCOL, transport="mqtt", message=f"MQTT {packet} failure without a code",
                             exact=False)
        err.__cause__ = MqttAnswer(packet, reason_code, properties)
        return err

    # -- teardown --------------------------------------------------------------------------------
    def teardown(self, err: IoTHubError) -> None:
        """Close the socket now (no DISCONNECT), and fail what is still pending with ``err``."""
        self._finish(err)
        sock = self.sock or self.client.socket()
        # paho still holds the socket and would call back from Client.__del__, maybe with no loop running.
        for name in ("on_socket_open", "on_socket_close", "on_socket_register_write", "on_socket_unregister_write"):
            setattr(self.client, name, None)
        if self.misc is not None and self.misc is not asyncio.current_task(self.loop):
            self.misc.cancel()
        if sock is not None:
            self._unwatch(sock)
            with contextlib.suppress(Exception):
                sock.close()
        if not self.gone.done():
            self.gone.set_result(None)


@functools.lru_cache(maxsize=1024)
def _events_prefix(device: str, properties: tuple[tuple[str, str], ...]) -> str:
    """The telemetry topic up to the message id, made once per device and property set: telemetry
    mostly repeats both, and quoting them again for every message was most of send()'s own cost."""
    bag = "".join(f"{quote(k, safe='$.')}={quote(v, safe='')}&" for k, v in properties)
    return f"devices/{device}/messages/events/{bag}$.mid="


def _fail_all(table: dict[Any, asyncio.Future[Any]], err: IoTHubError) -> None:
    for future in table.values():
        if not future.done():
            future.set_exception(err)
            future.exception()  # retrieved: its waiter may have timed out already
    table.clear()


def _query(topic: str) -> dict[str, str]:
    return dict(parse_qsl(topic.partition("?")[2], keep_blank_values=True))


def _json(payload: bytes) -> Any:
    if not payload:
        return None
    try:
        return json.loads(payload)
    except ValueError:
        return payload


class MqttTransport:
    """One device's MQTT connection to IoT Hub; implements :class:`gateway.transport.Transport`.

    ``connection_string``: the device's (``HostName=...;DeviceId=...;SharedAccessKey=...``); a fresh
    SAS token valid for ``token_ttl`` seconds is made at each connect, unless ``sas_token`` is given
    (then :meth:`set_sas_token` replaces it, e.g. from the handler's refresh hook). ``host`` / ``port``
    override where the socket goes (the emulator, a local broker); ``tls``: True (system trust), an
    ``ssl.SSLContext``, or False for plain TCP on loopback. ``protocol``: 4 (MQTT 3.1.1, IoT Hub's
    classic surface) or 5. ``subscribe`` names what to listen to at connect: ``"c2d"``, ``"twin"``,
    ``"methods"``.
    """

    name = "mqtt"

    def __init__(
        self,
        connection_string: str | ConnectionString,
        *,
        host: str | None = None,
        port: int | None = None,
        tls: ssl.SSLContext | bool = True,
        protocol: int = MQTT_311,
        sas_token: str | None = None,
        token_ttl: float = 3600.0,
        keepalive: int = 60,
        connect_timeout: float = 30.0,
        send_timeout: float = 60.0,
        subscribe: Iterable[str] = ("c2d", "twin", "methods"),
        api_version: str = API_VERSION,
        max_inflight: int = 20,
        max_events: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        cs = connection_string if isinstance(connection_string, ConnectionString) else ConnectionString.parse(
            connection_string)
        if protocol not in (MQTT_311, MQTT_5):
            raise ValueError(f"protocol must be 4 (MQTT 3.1.1) or 5, not {protocol!r}")
        unknown = set(subscribe) - {"c2d", "twin", "methods"}
        if unknown:
            raise ValueError(f"unknown subscription(s): {', '.join(sorted(unknown))}")
        if cs.shared_access_key is None and sas_token is None:
            raise ValueError("need a SharedAccessKey in the connection string or a sas_token")
        self.connection = cs
        self.device_id = cs.device_id
        self.host = host or cs.gateway_host_name or cs.host_name
        self.tls: ssl.SSLContext | None = (
            tls if isinstance(tls, ssl.SSLContext) else ssl.create_default_context() if tls else None
        )
        self.port = port if port is not None else (8883 if self.tls is not None else 1883)
        self.protocol = protocol
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.subscriptions = tuple(subscribe)
        self.api_version = api_version
        self.max_inflight = max_inflight
        self.max_events = max_events
        self.token_ttl = token_ttl
        self._clock = clock
        self._sas_token = sas_token
        self._link: _Link | None = None
        self._lock = asyncio.Lock()
        self._rids = itertools.count(1)
        self._loop_thread = threading.get_ident()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    # -- credentials -----------------------------------------------------------------------------
    @property
    def client_id(self) -> str:
        module = self.connection.module_id
        return f"{self.device_id}/{module}" if module else self.device_id

    @property
    def username(self) -> str:
        return f"{self.connection.host_name}/{self.client_id}/?api-version={self.api_version}"

    def set_sas_token(self, token: str | None) -> None:
        """Use ``token`` from the next connect on (None: make tokens from the key again)."""
        self._sas_token = token

    def _password(self) -> str:
        if self._sas_token is not None:
            return self._sas_token
        return self.connection.token(int(self._clock() + self.token_ttl))

    # -- Transport ----------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        link = self._link
        return link is not None and link.ready and not link.down

    async def connect(self) -> None:
        async with self._lock:
            if self.connected:
                return
            await self._drop_link()
            loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 protocol=MQTTProtocolVersion(self.protocol),
                                 reconnect_on_failure=False)
            client.username_pw_set(self.username, self._password())
            if self.tls is not None:
                client.tls_set_context(self.tls)
            client.max_inflight_messages_set(self.max_inflight)
            client.max_queued_messages_set(0)
            client.connect_timeout = self.connect_timeout
            link = _Link(self, client, loop)
            self._link = link
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await self._open_socket(link)
                    await link.connected
                    await self._subscribe(link)
            except IoTHubError as exc:
                link.teardown(exc)
                self._link = None
                raise
            except TimeoutError as exc:
                err = make_error(_TIMED_OUT, transport="mqtt", exact=False,
                                 message=f"MQTT connect to {self.host}:{self.port} did not finish within "
                                         f"{self.connect_timeout:g}s")
                err.__cause__ = exc
                link.teardown(err)
                self._link = None
                raise err from exc
            except asyncio.CancelledError:
                link.teardown(make_error(_NOT_CONNECTED, transport="mqtt", message="connect was cancelled"))
                self._link = None
                raise
            link.ready = True

    async def _open_socket(self, link: _Link) -> None:
        """paho's blocking connect (DNS, TCP, TLS) in a thread; errors through normalize()."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mqtt-connect")
        kwargs: dict[str, Any] = {"clean_start": True} if self.protocol == MQTT_5 else {}
        future = self._executor.submit(link.client.connect, self.host, self.port, self.keepalive, **kwargs)
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The thread cannot be stopped; when it finishes, close whatever socket it opened.
            future.add_done_callback(lambda _: link.loop.call_soon_threadsafe(
                link.teardown, make_error(_NOT_CONNECTED, transport="mqtt", message="connect abandoned")))
            raise
        except Exception as exc:
            raise normalize(exc, transport="mqtt") from exc

    async def _subscribe(self, link: _Link) -> None:
        topics: list[tuple[str, int]] = []
        if "c2d" in self.subscriptions:
            topics.append((f"devices/{self.device_id}/messages/devicebound/#", 1))
        if "twin" in self.subscriptions:
            topics += [("$iothub/twin/res/#", 0), ("$iothub/twin/PATCH/properties/desired/#", 0)]
        if "methods" in self.subscriptions:
            topics.append(("$iothub/methods/POST/#", 0))
        if not topics:
            return
        rc, mid = link.client.subscribe(topics)
        self._check_rc(rc)
        future: asyncio.Future[tuple[list[Any], Any]] = link.loop.create_future()
        link.subscribes[mid] = future
        codes, properties = await future
        for (topic, _), code in zip(topics, codes, strict=False):
            if _is_failure(code):
                err = link._translate(code, "suback", properties)
                err.native["topic"] = topic
                raise err

    async def close(self) -> None:
        async with self._lock:
            await self._drop_link()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def _drop_link(self) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        link.closing = True
        if not link.down and link.sock is not None:
            link.client.disconnect()  # queues DISCONNECT; paho closes the socket once it is written
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(link.gone), 1.0)
        link.teardown(make_error(_TIMED_OUT, transport="mqtt",
                                 message="the connection was closed locally while waiting for an answer; "
                                         "outcome unknown"))

    async def events(self) -> AsyncIterator[TransportEvent]:
        link = self._link
        if link is None:
            return
        while True:
            event = await link.events.get()
            if event is None:
                return
            if isinstance(event, Inbound):
                link.inbound -= 1
            yield event
            if isinstance(event, Disconnected):
                return

    async def send(self, message: Message) -> None:
        """Publish telemetry at QoS 1 and return on its PUBACK (or fail at ``send_timeout``)."""
        link = self._link
        if link is None or not link.ready or link.down:
            self._live()  # raises NotConnected
            return
        message_id = message.id
        mid_part = message_id if message_id.isascii() and message_id.isalnum() else quote(message_id, safe="")
        topic = _events_prefix(message.device_id or self.device_id, tuple(message.properties.items())) + mid_part
        info = link.client.publish(topic, message.body, qos=1)
        if info.rc:
            self._check_rc(info.rc)
        mid = info.mid
        future: asyncio.Future[None] = link.loop.create_future()
        link.publishes[mid] = future
        # One deadline queue per connection instead of a timer per send: sends share send_timeout, so
        # deadlines arrive in order and a single sweeper task expires them (asyncio.timeout per send
        # costs more than the rest of send() together; see bench/mqtt.py).
        link.expect(future, mid, message_id, link.loop.time() + self.send_timeout)
        try:
            await future
        except BaseException:
            # Cancelled by the caller (e.g. the handler's deadline): the await cancelled the future too.
            # Every other way out (PUBACK, failure, drop, deadline) has already removed the entry.
            if link.publishes.get(mid) is future:
                future.cancel()
                del link.publishes[mid]
            raise

    async def request(self, kind: str, payload: Any, *, timeout: float) -> Any:
        """``twin_get`` -> the twin; ``twin_patch`` (reported properties) -> ``{"version": n}``;
        ``method_response`` (``{"rid", "status", "payload"}``) -> None once the hub acknowledged it."""
        link = self._live()
        if kind == "method_response":
            if not isinstance(payload, dict) or "rid" not in payload:
                raise make_error(_ARGUMENT, transport="mqtt", message="method_response needs {'rid', 'status'}")
            status = int(payload.get("status", 200))
            body = json.dumps(payload.get("payload")).encode()
            info = link.client.publish(f"$iothub/methods/res/{status}/?$rid={payload['rid']}", body, qos=1)
            self._check_rc(info.rc)
            future: asyncio.Future[None] = link.loop.create_future()
            link.publishes[info.mid] = future
            try:
                async with asyncio.timeout(timeout):
                    await future
            except IoTHubError:
                raise
            except TimeoutError as exc:
                raise self._timed_out(f"no PUBACK for the method response within {timeout:g}s") from exc
            finally:
                link.publishes.pop(info.mid, None)
            return None
        rid = f"{next(self._rids)}"
        if kind == "twin_get":
            topic, body = f"$iothub/twin/GET/?$rid={rid}", b""
        elif kind == "twin_patch":
            topic, body = f"$iothub/twin/PATCH/properties/reported/?$rid={rid}", json.dumps(payload).encode()
        else:
            raise make_error(_ARGUMENT, transport="mqtt",
                             message=f"unknown MQTT request kind {kind!r} (one of {', '.join(REQUEST_KINDS)})")
        answer: asyncio.Future[tuple[str, bytes]] = link.loop.create_future()
        link.requests[rid] = answer
        try:
            self._check_rc(link.client.publish(topic, body, qos=0).rc)
            async with asyncio.timeout(timeout):
                res_topic, res_body = await answer
        except IoTHubError:
            raise
        except TimeoutError as exc:
            raise self._timed_out(f"no twin response for $rid={rid} within {timeout:g}s") from exc
        finally:
            link.requests.pop(rid, None)
        err = translate_topic(res_topic, res_body)
        if err is not None:
            err.device_id = self.device_id
            err.__cause__ = MqttAnswer("twin response", res_topic.split("/")[3], None, res_topic)
            raise err
        if kind == "twin_patch":
            version = _query(res_topic).get("$version")
            return {"version": int(version) if version and version.isdigit() else None}
        return _json(res_body)

    # -- helpers -------------------------------------------------------------------------------------
    def _live(self) -> _Link:
        link = self._link
        if link is None or not link.ready or link.down:
            raise make_error(_NOT_CONNECTED, transport="mqtt", device_id=self.device_id,
                             message="MQTT transport is not connected; nothing was sent")
        return link

    def _check_rc(self, rc: Any) -> None:
        """A paho call's local result: nothing went out when it failed (NO_CONN -> NotConnected)."""
        if rc == mqtt.MQTT_ERR_SUCCESS:
            return
        err = translate(rc)
        if err is not None:
            err.__cause__ = MqttAnswer("local", rc)
            raise err

    def _timed_out(self, message: str) -> IoTHubError:
        return make_error(_TIMED_OUT, transport="mqtt", device_id=self.device_id, exact=False,
                          message=message + "; outcome unknown")
