"""The MQTT adapter: IoT Hub's MQTT device surface over paho-mqtt 2.x, driven by the asyncio loop.

paho runs no thread here (the aiomqtt 2.x pattern): its socket is watched with ``add_reader`` /
``add_writer`` and a small task calls ``loop_misc()`` for keep-alive, so every paho callback runs on the
event-loop thread and can settle futures directly. Only the blocking ``client.connect()`` (DNS, TCP,
TLS handshake) runs in a thread, from one small pool shared by every transport in the process (no
thread per device); the socket callbacks it fires are hopped onto the loop.

Over TLS a readable socket is not the whole story: one TLS record can carry several MQTT packets, and
what OpenSSL already decrypted (``SSLSocket.pending()``) never wakes ``add_reader`` again. The reader
drains it before returning, as paho's own loop does; otherwise a burst of answers stalls until the
next record arrives.

Each ``connect()`` builds a fresh paho client with ``reconnect_on_failure=False``: the shared handler
owns reconnects and resends, and a fresh client cannot resend stale in-flight messages behind its back.
Each connect also uses a fresh credential (a new SAS token from the key, or the one last given to
:meth:`MqttTransport.set_sas_token`): MQTT cannot renew a token on a live connection, so the handler
reconnects before :attr:`MqttTransport.credential_expiry`.

Inbound traffic is held in one bounded queue. Cloud-to-device messages are acknowledged (PUBACK) only
when the application settles them (:class:`~gateway.transport.SettleC2D` ``complete``); one that finds
the queue full is not acknowledged, so the hub still owns it and redelivers it. Method calls and
desired-property patches come at QoS 0 (nothing to withhold): a method call that finds the queue full
is answered at once with status 503 (the service learns now instead of at its timeout), and desired
patches that find it full are merged (JSON merge-patch) into one pending patch delivered when room
frees: the memory stays bounded and no desired change is dropped (:func:`_merge_patch` names the one
shape of change a merged patch cannot express).

Every failure is an :class:`~gateway.errors.IoTHubError` from the MQTT translator (CONNACK, PUBACK,
SUBACK, DISCONNECT reason codes with their properties, twin response topics) or, at the one mapping
point :func:`_map_error`, from ``normalize`` (socket and TLS errors), with the raw answer
(:class:`MqttAnswer`) or exception on ``__cause__``. Nothing waits forever: a send or request has a
deadline on the loop's clock, and everything pending fails when the connection drops, with the drop's
code, never with NotConnected, because a message that was written may have been delivered (the handler
resends it as a possible duplicate).
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
import ssl as _ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from adapters.mqtt.translate import translate, translate_topic
from gateway.codes import code_of
from gateway.errors import IoTHubError, make_error
from gateway.normalize import normalize
from gateway.sas import ConnectionString, parse_sas_token
from gateway.tls import TlsSetting, default_port, resolve
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
    TransportEvent,
    UnsupportedRequest,
    check_properties,
)

__all__ = ["API_VERSION", "CONNECT_THREADS", "MAX_MESSAGE", "MQTT_5", "MQTT_311", "MqttAnswer", "MqttTransport"]

log = logging.getLogger(__name__)

API_VERSION = "2021-04-12"
MQTT_311 = 4
MQTT_5 = 5

#: Device-to-cloud size limit of IoT Hub (body, properties and topic): refused here, before the hub
#: would drop a 3.1.1 connection over it.
MAX_MESSAGE = 256 * 1024

#: Threads running blocking connects, shared by every MqttTransport in the process.
CONNECT_THREADS = 8

#: Status a method call is answered with when the inbound queue is full (the device is busy).
METHOD_BUSY_STATUS = 503

_NOT_CONNECTED = code_of("NotConnected")
_TIMED_OUT = code_of("OperationTimedOut")
_CLOSED = code_of("DeviceConnectionClosedRemotely")
_ARGUMENT = code_of("ArgumentInvalid")
_PROTOCOL = code_of("ProtocolViolation")
_TOO_LARGE = code_of("MessageTooLarge")
_LOCK_LOST = code_of("DeviceMessageLockLost")

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _connect_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The process-wide pool for paho's blocking connect, made on first use (bounded: a thousand devices
    reconnecting at once queue here instead of starting a thousand threads)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(CONNECT_THREADS, thread_name_prefix="mqtt-connect")
        return _pool


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


def _map_error(exc: Exception, what: str, device_id: str | None) -> IoTHubError:
    """The adapter's one exception-mapping point (httpx's ``map_exceptions``): whatever escapes paho,
    the socket or a deadline becomes an IoTHubError; callers raise it ``from`` the original.

    paho refuses a publish it cannot encode (a wildcard in the topic, an oversized payload) with
    ValueError before anything is written: that is ArgumentInvalid. Cancellation and programming errors
    (UnsupportedRequest, a TypeError) never come here.
    """
    if isinstance(exc, IoTHubError):
        return exc
    if isinstance(exc, TimeoutError):
        return make_error(_TIMED_OUT, transport="mqtt", device_id=device_id, exact=False,
                          message=f"{what} did not finish in time; outcome unknown")
    if isinstance(exc, OSError):  # sockets, DNS, TLS (ssl.SSLError is an OSError)
        return normalize(exc, transport="mqtt", device_id=device_id)
    return make_error(_ARGUMENT, transport="mqtt", device_id=device_id,
                      message=f"{what}: paho refused it before sending: {exc}")


@contextlib.contextmanager
def _map_exceptions(what: str, device_id: str | None) -> Iterator[None]:
    """:func:`_map_error` around a block (send()'s hot path calls it from a plain ``except``)."""
    try:
        yield
    except IoTHubError:
        raise
    except (TimeoutError, OSError, ValueError) as exc:
        raise _map_error(exc, what, device_id) from exc


class _Link:
    """One paho client and one socket: the state of a single connection attempt and its life."""

    def __init__(self, owner: MqttTransport, client: Any, loop: asyncio.AbstractEventLoop, generation: int,
                 expiry: float | None) -> None:
        self.owner = owner
        self.client = client
        self.loop = loop
        self.generation = generation  #: which connection a C2D lock token belongs to
        self.expiry = expiry  #: epoch expiry of the credential this connection authenticated with
        self.connected: asyncio.Future[None] = loop.create_future()
        self.gone: asyncio.Future[None] = loop.create_future()  #: set when the socket is closed
        self.publishes: dict[int, asyncio.Future[None]] = {}
        self.subscribes: dict[int, asyncio.Future[tuple[list[Any], Any]]] = {}
        self.requests: dict[str, asyncio.Future[tuple[str, bytes]]] = {}
        self.events: asyncio.Queue[TransportEvent | None] = asyncio.Queue()
        self.inbound = 0  #: Inbound events queued and not yet taken by events(): the bound applies to it
        self.unsettled: set[int] = set()  #: packet ids of C2D messages handed out and not yet settled
        self.desired: dict[str, Any] | None = None  #: desired patches merged while the queue was full
        self.refused = 0  #: inbound items refused because the queue was full (C2D left to redeliver)
        self.ready = False  #: CONNACK and SUBACKs done: a later drop is reported as Disconnected
        self.closing = False  #: close() asked for it: no Disconnected event
        self.down = False
        self.error: IoTHubError | None = None
        self.sock: Any = None
        self.misc: asyncio.Task[None] | None = None
        self.send_deadlines: collections.deque[tuple[float, asyncio.Future[None], int, str]] = collections.deque()
        self.send_timer: asyncio.TimerHandle | None = None
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message

    # -- socket plumbing (on_socket_open / register_write also fire in connect()'s pool thread) --
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
        reader = self._read_tls if isinstance(sock, _ssl.SSLSocket) else self.client.loop_read
        self.loop.add_reader(sock, reader)
        self.misc = self.loop.create_task(self._misc_loop(), name="mqtt-misc")

    def _read_tls(self) -> None:
        """loop_read, then whatever TLS already decrypted: select/epoll cannot see those bytes, so
        without the drain the second of two packets sharing a record waits for the next record."""
        client, sock = self.client, self.sock
        rc = client.loop_read()
        while rc == mqtt.MQTT_ERR_SUCCESS and client.socket() is sock and sock.pending() > 0:
            rc = client.loop_read()

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
        """paho's periodic work: PINGREQ when idle, and a missing PINGRESP ends the connection (a
        half-open link is noticed within about two keep-alive periods)."""
        keepalive = self.owner.keepalive
        tick = min(1.0, keepalive / 4) if keepalive > 0 else 1.0
        while True:
            await asyncio.sleep(tick)
            if self.client.loop_misc() != mqtt.MQTT_ERR_SUCCESS:
                return

    # -- deadlines on the loop clock, no sweeper task ---------------------------------------------
    def deadline(self, future: asyncio.Future[Any], delay: float, table: dict[Any, Any], key: object,
                 message: str) -> asyncio.TimerHandle:
        """A request's own deadline: one ``loop.call_at`` timer, cancelled by the caller when it settles."""
        return self.loop.call_at(self.loop.time() + delay, self._expire, future, table, key, message)

    def _expire(self, future: asyncio.Future[Any], table: dict[Any, Any], key: object, message: str) -> None:
        if future.done():
            return
        if table.get(key) is future:
            del table[key]
        future.set_exception(self.owner._timed_out(message))

    def send_deadline(self, future: asyncio.Future[None], mid: int, message_id: str) -> None:
        """Telemetry deadlines: every send shares ``send_timeout``, so they fall due in order and ONE
        ``call_at`` timer for the earliest does for all (a timer per send cost ~3 µs of the ~55 µs a send
        takes; see bench/mqtt.py)."""
        queue = self.send_deadlines
        while queue and queue[0][1].done():  # PUBACKs come in order: this stays short
            queue.popleft()
        deadline = self.loop.time() + self.owner.send_timeout
        queue.append((deadline, future, mid, message_id))
        if self.send_timer is None:
            self.send_timer = self.loop.call_at(deadline, self._sends_due)

    def _sends_due(self) -> None:
        self.send_timer = None
        queue, now = self.send_deadlines, self.loop.time()
        while queue:
            deadline, future, mid, message_id = queue[0]
            if not future.done() and deadline > now:
                self.send_timer = self.loop.call_at(deadline, self._sends_due)
                return
            queue.popleft()
            if not future.done():
                self._expire(future, self.publishes, mid,
                             f"no PUBACK for message {message_id!r} within {self.owner.send_timeout:g}s")

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
        self.send_deadlines.clear()
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None
        _fail_all(self.subscribes, err)
        _fail_all(self.requests, err)
        self.unsettled.clear()  # their locks died with the connection: the hub redelivers them
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
        try:
            topic: str = msg.topic
        except UnicodeDecodeError:  # a broken peer: unreadable, so dropped (acknowledged, not to block it)
            log.warning("MQTT message with an invalid UTF-8 topic dropped")
            if msg.qos:
                self.client.ack(msg.mid, 1)
            return
        payload = bytes(msg.payload)
        device = self.owner.device_id
        if topic.startswith(f"devices/{device}/messages/devicebound/"):
            self._c2d(topic[len(f"devices/{device}/messages/devicebound/") :], payload, msg.mid, msg.qos)
            return
        if msg.qos:  # only C2D waits for the application; anything else at QoS 1 is acknowledged now
            self.client.ack(msg.mid, 1)
        if topic.startswith(("$iothub/twin/res/", "$iothub/methods/res/")):
            rid = _query(topic).get("$rid", "")
            future = self.requests.pop(rid, None)
            if future is not None and not future.done():
                future.set_result((topic, payload))
        elif topic.startswith("$iothub/methods/POST/"):
            name = topic[len("$iothub/methods/POST/") :].partition("/")[0]
            self._method(MethodCall(name, _query(topic).get("$rid", ""), _json(payload)))
        elif topic.startswith("$iothub/twin/PATCH/properties/desired/"):
            self._desired(topic, payload)
        else:
            log.debug("MQTT message on an unexpected topic ignored: %.200s", topic)

    def _room(self) -> bool:
        return self.inbound < self.owner.max_events

    def _put(self, event: Inbound) -> None:
        self.inbound += 1
        self.events.put_nowait(event)

    def _c2d(self, bag: str, payload: bytes, mid: int, qos: int) -> None:
        if not self._room():
            # Not acknowledged: the hub still owns the message and redelivers it.
            self.refused += 1
            log.warning("MQTT inbound queue full (%d); C2D message left unacknowledged for redelivery",
                        self.owner.max_events)
            return
        props = dict(parse_qsl(bag, keep_blank_values=True))
        message_id = props.pop("$.mid", None)
        correlation_id = props.pop("$.cid", None)
        content_type, content_encoding = props.pop("$.ct", None), props.pop("$.ce", None)
        # IoT Hub's system properties ($.to, $.ct, $.exp, ...) start with "$", which no application property
        # may: what is left are the sender's own properties, as AMQP and HTTP deliver them.
        props = {k: v for k, v in props.items() if not k.startswith("$")}
        if qos > 0:
            self.unsettled.add(mid)
        token = f"{self.generation}:{mid}:{qos}"
        self._put(Inbound("c2d", C2DMessage(self.owner.device_id, token, message_id, payload, props, 0,
                                            correlation_id, content_type, content_encoding), self.owner.device_id))

    def _method(self, call: MethodCall) -> None:
        if self._room():
            self._put(Inbound("method", call, self.owner.device_id))
            return
        self.refused += 1
        log.warning("MQTT inbound queue full (%d); method %r answered %d", self.owner.max_events, call.name,
                    METHOD_BUSY_STATUS)
        body = json.dumps({"message": "the device's inbound queue is full; try again later"}).encode()
        with contextlib.suppress(ValueError):
            self.client.publish(_method_topic(METHOD_BUSY_STATUS, call.rid), body, qos=0)

    def _desired(self, topic: str, payload: bytes) -> None:
        patch = _json(payload)
        if not isinstance(patch, dict):
            log.warning("MQTT desired-properties patch that is not a JSON object ignored")
            return
        if self.desired is not None or not self._room():
            # Merged, in order, into one pending patch; delivered once the queue has room.
            if self.desired is None:
                log.warning("MQTT inbound queue full (%d); merging desired patches until it has room",
                            self.owner.max_events)
            self.desired = _merge_patch(self.desired or {}, patch)
            return
        self._put(Inbound("twin_desired", DesiredPatch(patch, _version(topic, patch)), self.owner.device_id))

    def flush_desired(self) -> None:
        """Queue the merged desired patch, if any, now that the queue has room."""
        patch, self.desired = self.desired, None
        if patch is not None:
            self._put(Inbound("twin_desired", DesiredPatch(patch, _version("", patch)), self.owner.device_id))

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
def _events_prefix(device: str, properties: tuple[tuple[str, str], ...],
                   system: tuple[tuple[str, str], ...] = ()) -> str:
    """The telemetry topic up to the message id, made once per device and property set: telemetry
    mostly repeats both, and quoting them again for every message was most of send()'s own cost.
    Names and values are quoted whole (``&``, ``=``, ``/`` included); IoT Hub's system properties
    (``$.ct``, ``$.ce``, ``$.cid``, ``$.ctime``) follow with their names as the hub spells them, and
    ``$.mid`` comes last, from us."""
    bag = "".join(f"{quote(k, safe='.')}={quote(v, safe='')}&" for k, v in properties)
    bag += "".join(f"{k}={quote(v, safe='')}&" for k, v in system)
    return f"devices/{device}/messages/events/{bag}$.mid="


def _system(message: Message) -> tuple[tuple[str, str], ...]:
    """The message's system properties under IoT Hub's MQTT names (empty for plain telemetry)."""
    if (message.content_type or message.content_encoding or message.correlation_id or message.creation_time) is None:
        return ()
    pairs = (("$.ct", message.content_type), ("$.ce", message.content_encoding), ("$.cid", message.correlation_id),
             ("$.ctime", message.creation_time))
    return tuple((k, v) for k, v in pairs if v is not None)


def _method_topic(status: int, rid: str) -> str:
    return f"$iothub/methods/res/{status}/?$rid={quote(rid, safe='')}"


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
    except (ValueError, RecursionError):
        return payload


def _version(topic: str, patch: Mapping[str, Any]) -> int | None:
    """The desired ``$version``: the topic's, else the body's (IoT Hub sends both)."""
    text = _query(topic).get("$version") if topic else None
    if text is not None and text.isdigit():
        return int(text)
    value = patch.get("$version")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _merge_patch(base: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Two JSON merge patches (RFC 7386) as one: applying the result equals applying both in order.
    A null stays a null (it deletes on the device's side); nested objects merge key by key.

    One case merge patch cannot say: a key set to a non-object (or null) and then to an object again
    reads, merged, as "merge into whatever object the device holds", not "replace it"; stale sub-keys
    the device held before may survive. Only the full-queue path merges, and it logs when it does."""
    merged = dict(base)
    for key, value in patch.items():
        old = merged.get(key)
        merged[key] = _merge_patch(old, value) if isinstance(value, dict) and isinstance(old, dict) else value
    return merged


class MqttTransport:
    """One device's MQTT connection to IoT Hub; implements :class:`gateway.transport.Transport`.

    ``connection_string``: the device's (``HostName=...;DeviceId=...;SharedAccessKey=...``); a fresh
    SAS token valid for ``token_ttl`` seconds is made at each connect, unless ``sas_token`` is given
    (then :meth:`set_sas_token` replaces it, e.g. from the handler's refresh hook). ``host`` / ``port``
    override where the socket goes (the emulator, a local broker). ``ssl``: True (system trust, the
    default), an ``ssl.SSLContext`` (see :func:`gateway.tls.client_context`), or None/False for plain TCP
    on loopback. ``protocol``: 4 (MQTT 3.1.1, IoT Hub's classic surface) or 5. ``keepalive``: seconds
    between PINGREQs when idle (0 turns it off; a half-open link then goes unnoticed). ``subscribe``
    names what to listen to at connect: ``"c2d"``, ``"twin"``, ``"methods"``. ``max_events`` bounds the
    inbound queue. ``clock`` is the wall clock (epoch seconds), used only for token expiry.

    Requests (:meth:`request`): :class:`~gateway.transport.GetTwin` (this device's twin),
    :class:`~gateway.transport.PatchReported`, :class:`~gateway.transport.RespondMethod`,
    :class:`~gateway.transport.SettleC2D` (``complete`` only); the rest raise ``UnsupportedRequest``.
    """

    name = "mqtt"

    def __init__(
        self,
        connection_string: str | ConnectionString,
        *,
        host: str | None = None,
        port: int | None = None,
        ssl: TlsSetting = True,
        protocol: int = MQTT_311,
        sas_token: str | None = None,
        token_ttl: float = 3600.0,
        keepalive: int = 60,
        connect_timeout: float = 30.0,
        send_timeout: float = 60.0,
        subscribe: Iterable[str] = ("c2d", "twin", "methods"),
        api_version: str = API_VERSION,
        max_inflight: int = 20,
        max_events: int = 1000,
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
        if keepalive < 0 or max_events < 1:
            raise ValueError("keepalive must be >= 0 and max_events >= 1")
        self.connection = cs
        self.device_id = cs.device_id
        self.host = host or cs.gateway_host_name or cs.host_name
        self.ssl = resolve(ssl)
        self.port = port if port is not None else default_port("mqtt", self.ssl)
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
        self._generations = itertools.count(1)
        self._loop_thread = threading.get_ident()

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

    def _credential(self) -> tuple[str, float | None]:
        """The password for the next connect and its epoch expiry: a token made now from the key, or
        the given one (its ``se=``; None if it does not say)."""
        if self._sas_token is not None:
            try:
                return self._sas_token, float(parse_sas_token(self._sas_token).expiry)
            except ValueError:
                return self._sas_token, None
        expiry = int(self._clock() + self.token_ttl)
        return self.connection.token(expiry), float(expiry)

    @property
    def credential_expiry(self) -> float | None:
        """Epoch seconds when the token of the current connection expires; the hub then drops it, so
        the handler reconnects (with a fresh token) before. None when not connected or not known."""
        link = self._link
        return link.expiry if link is not None and not link.down else None

    @property
    def ambiguous_drops(self) -> bool:
        """MQTT 3.1.1 has no failing PUBACK or DISCONNECT: IoT Hub refuses by closing the socket."""
        return self.protocol == MQTT_311

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
                                 reconnect_on_failure=False, manual_ack=True)
            password, expiry = self._credential()
            client.username_pw_set(self.username, password)
            if self.ssl is not None:
                client.tls_set_context(self.ssl)
            client.max_inflight_messages_set(self.max_inflight)
            client.max_queued_messages_set(0)
            client.connect_timeout = self.connect_timeout
            link = _Link(self, client, loop, next(self._generations), expiry)
            self._link = link
            what = f"MQTT connect to {self.host}:{self.port}"
            try:
                with _map_exceptions(what, self.device_id):
                    async with asyncio.timeout(self.connect_timeout):
                        await self._open_socket(link)
                        await link.connected
                        await self._subscribe(link)
            except IoTHubError as exc:
                link.teardown(exc)
                self._link = None
                raise
            except asyncio.CancelledError:
                link.teardown(make_error(_NOT_CONNECTED, transport="mqtt", message="connect was cancelled"))
                self._link = None
                raise
            link.ready = True

    async def _open_socket(self, link: _Link) -> None:
        """paho's blocking connect (DNS, TCP, TLS) on the shared pool."""
        kwargs: dict[str, Any] = {"clean_start": True} if self.protocol == MQTT_5 else {}
        future = _connect_pool().submit(link.client.connect, self.host, self.port, self.keepalive, **kwargs)
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The thread cannot be stopped; when it finishes, close whatever socket it opened.
            future.add_done_callback(lambda _: link.loop.call_soon_threadsafe(
                link.teardown, make_error(_NOT_CONNECTED, transport="mqtt", message="connect abandoned")))
            raise

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
            if link.desired is not None and link.events.empty():
                link.flush_desired()
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
        if message.properties:
            check_properties(message, "mqtt")
        message_id = message.id
        mid_part = message_id if message_id.isascii() and message_id.isalnum() else quote(message_id, safe="")
        topic = _events_prefix(message.device_id or self.device_id, tuple(message.properties.items()),
                               _system(message)) + mid_part
        if len(message.body) + len(topic) > MAX_MESSAGE:
            raise make_error(_TOO_LARGE, transport="mqtt", device_id=message.device_id, exact=False,
                             message=f"message {message_id!r} is larger than IoT Hub's {MAX_MESSAGE} bytes; "
                                     "not sent")
        try:
            info = link.client.publish(topic, message.body, qos=1)
        except (OSError, ValueError) as exc:
            raise _map_error(exc, f"publishing message {message_id!r}", message.device_id) from exc
        if info.rc:
            self._check_rc(info.rc)
        mid = info.mid
        future: asyncio.Future[None] = link.loop.create_future()
        publishes = link.publishes
        publishes[mid] = future
        link.send_deadline(future, mid, message_id)
        try:
            await future
        finally:
            # Cancelled by the caller (e.g. the handler's deadline): the await cancelled the future too.
            # Every other way out (PUBACK, failure, drop, deadline) has already removed the entry.
            if publishes.get(mid) is future:
                del publishes[mid]

    async def request(self, request: Request, *, timeout: float) -> Any:
        """GetTwin -> the twin (dict); PatchReported -> the new reported ``$version`` (int or None);
        RespondMethod -> None once the hub acknowledged it; SettleC2D(complete) -> None once the PUBACK
        is queued. Anything else: :class:`UnsupportedRequest`."""
        if isinstance(request, SettleC2D):
            return self._settle(request)
        if isinstance(request, RespondMethod):
            return await self._respond(request, timeout)
        if isinstance(request, GetTwin):
            if request.device_id not in (None, self.device_id):
                raise UnsupportedRequest(f"a device's MQTT link reads only its own twin, not {request.device_id!r}")
            return await self._twin("$iothub/twin/GET/?$rid=", b"", timeout, request)
        if isinstance(request, PatchReported):
            body = json.dumps(dict(request.patch)).encode()
            return await self._twin("$iothub/twin/PATCH/properties/reported/?$rid=", body, timeout, request)
        raise UnsupportedRequest(f"IoT Hub's MQTT device surface has no {type(request).__name__} request")

    def _settle(self, request: SettleC2D) -> None:
        if request.outcome != "complete":
            raise UnsupportedRequest(
                f"IoT Hub's MQTT surface cannot {request.outcome} a C2D message (MQTT has no negative "
                "acknowledgement): leave it unsettled and the hub redelivers it after the next connect, "
                "or use AMQP or HTTP to reject or abandon")
        link = self._link
        generation, _, rest = request.lock_token.partition(":")
        mid_text, _, qos_text = rest.partition(":")
        if not (generation.isdigit() and mid_text.isdigit() and qos_text.isdigit()):
            raise make_error(_ARGUMENT, transport="mqtt", device_id=self.device_id,
                             message=f"{request.lock_token!r} is not an MQTT C2D lock token")
        mid = int(mid_text)
        if int(qos_text) == 0:
            return None  # delivered at most once: nothing to acknowledge
        if link is None or link.down or int(generation) != link.generation or mid not in link.unsettled:
            # Its connection is gone (a lock dies with it) or it was settled: retrying cannot help.
            raise make_error(_LOCK_LOST, transport="mqtt", device_id=self.device_id, exact=False,
                             message="the C2D message came on an earlier connection (or was settled already); "
                                     "the hub redelivers it if it was not acknowledged")
        link.unsettled.discard(mid)
        self._check_rc(link.client.ack(mid, 1))
        return None

    async def _respond(self, request: RespondMethod, timeout: float) -> None:
        link = self._live()
        body = json.dumps(request.payload).encode()
        with _map_exceptions("the method response", self.device_id):
            info = link.client.publish(_method_topic(int(request.status), request.rid), body, qos=1)
        self._check_rc(info.rc)
        future: asyncio.Future[None] = link.loop.create_future()
        link.publishes[info.mid] = future
        timer = link.deadline(future, timeout, link.publishes, info.mid,
                              f"no PUBACK for the method response within {timeout:g}s")
        try:
            await future
        finally:
            timer.cancel()
            link.publishes.pop(info.mid, None)

    async def _twin(self, topic: str, body: bytes, timeout: float, request: GetTwin | PatchReported) -> Any:
        link = self._live()
        rid = f"{next(self._rids)}"
        answer: asyncio.Future[tuple[str, bytes]] = link.loop.create_future()
        link.requests[rid] = answer
        timer = link.deadline(answer, timeout, link.requests, rid, f"no twin response for $rid={rid} within "
                                                                   f"{timeout:g}s")
        try:
            with _map_exceptions("the twin request", self.device_id):
                self._check_rc(link.client.publish(topic + rid, body, qos=0).rc)
            res_topic, res_body = await answer
        finally:
            timer.cancel()
            link.requests.pop(rid, None)
        err = translate_topic(res_topic, res_body)
        if err is not None:
            err.device_id = self.device_id
            err.__cause__ = MqttAnswer("twin response", res_topic.split("/")[3], None, res_topic)
            raise err
        if isinstance(request, PatchReported):
            version = _query(res_topic).get("$version")
            return int(version) if version and version.isdigit() else None
        twin = _json(res_body)
        if not isinstance(twin, dict):
            err = make_error(_PROTOCOL, transport="mqtt", device_id=self.device_id, exact=False,
                             message="the twin response is not a JSON object")
            err.__cause__ = MqttAnswer("twin response", res_topic.split("/")[3], None, res_topic)
            raise err
        return twin

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
            err.device_id = self.device_id
            err.__cause__ = MqttAnswer("local", rc)
            raise err

    def _timed_out(self, message: str) -> IoTHubError:
        return make_error(_TIMED_OUT, transport="mqtt", device_id=self.device_id, exact=False,
                          message=message + "; outcome unknown")
