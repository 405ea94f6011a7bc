"""The device surface an app reaches through the local API: C2D, direct methods and the twin.

One :class:`DeviceSurface` per configured device, beside its delivery pipeline and over the same
:class:`~gateway.handler.Handler` (so throttling, offline holds and reconnects apply as to telemetry).

C2D: the sidecar never accepts from the hub what no app took. Nothing is settled upstream until the app
settles it through REST. Over HTTP the hub is polled only while an app listens (and only while fewer
than ``max_outstanding`` messages wait for the app's verdict), so an absent app leaves messages queued
at the hub. MQTT and AMQP push C2D from connect on; what arrives while no app listens is held here,
unsettled (bounded by ``max_held``: past that a message is simply left unsettled, never abandoned, and
the hub redelivers it after the next connect), and streamed to the next app that listens. A connection loss voids
MQTT and AMQP locks: what was held or outstanding from it is forgotten (the hub redelivers it) and a
late settle answers DeviceMessageLockLost. An app whose stream ends leaves its unsettled messages to the
next listener.

Direct methods: a call goes to every app streaming the device's methods; the first REST answer is sent
upstream. With no app subscribed the sidecar answers at once with status 501 and a JSON message, as the
Azure device SDKs answer a method no handler was registered for (the service learns now instead of
waiting out its timeout). A call the app never answers is left to the hub, which answers the service
504 GatewayTimeout at the call's ``responseTimeoutInSeconds``, as for a device runtime whose handler
never returns. The device cannot know that timeout, so an answer is forwarded while the call is at most
``method_window`` seconds old (the hub's largest timeout, 300 s); the hub drops a late one as it drops a
real device's. Older answers are refused here (404).

Twin: get and patch reported through REST; desired-property patches stream to every listening app.
IoT Hub's HTTP device API has no push, so for an HTTP device the sidecar reads the twin (GetTwin through
the handler, so its throttling and offline rules apply) every ``twin_poll_interval`` seconds while an app
streams desired properties, and sends an event when ``desired.$version`` has grown: its patch is the
whole desired section (``"whole": true``; ``$metadata`` left out), since the hub does not say what changed.
The first read only sets the version to compare with (``GET /twin`` gives the current state); the version
is remembered while the sidecar runs, so a change made while no app listened reaches the next one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.aio import cancel_and_wait
from gateway.codes import code_of
from gateway.errors import IoTHubError, make_error
from gateway.handler import Handler, State, StateChange
from gateway.transport import (
    C2DMessage,
    DesiredPatch,
    GetTwin,
    Inbound,
    MethodCall,
    PatchReported,
    ReceiveC2D,
    RespondMethod,
    SettleC2D,
    SettleOutcome,
    UnsupportedRequest,
)

__all__ = ["NO_SUBSCRIBER_STATUS", "ORIGIN", "DeviceSurface", "Subscription", "c2d_view"]

log = logging.getLogger("gateway.sidecar")

_LOCK_LOST = code_of("DeviceMessageLockLost")
_NOT_FOUND = code_of("GenericNotFound")
_NOT_IMPLEMENTED = code_of("GenericNotImplemented")
_LOST = frozenset({State.RETRYING, State.STOPPED, State.CLOSED})

#: The status answered to a method call no app subscribed to (the Azure device SDKs' "not implemented").
NO_SUBSCRIBER_STATUS = 501
#: The hub's largest ``responseTimeoutInSeconds``: an app's answer is forwarded while the call is this young.
METHOD_WINDOW = 300.0


#: ``native["origin"]`` of an error the sidecar answers itself (the API shows it as transport ``api``).
ORIGIN = "sidecar"


def _local(code: int, message: str, device_id: str) -> IoTHubError:
    """An error the sidecar itself answers, not the hub."""
    return make_error(code, transport="http", message=message, device_id=device_id, native={"origin": ORIGIN})


def _unsupported(exc: UnsupportedRequest, protocol: str, device_id: str) -> IoTHubError:
    return make_error(_NOT_IMPLEMENTED, transport=protocol, device_id=device_id,
                      message=f"{exc} (device {device_id!r} is configured with protocol {protocol!r})")


def c2d_view(message: C2DMessage, received_at: str) -> dict[str, Any]:
    """A C2D message as the API shows it: the body as text when it is UTF-8, always as base64."""
    props = dict(message.properties)
    system = {k: props.pop(k) for k in list(props) if k.startswith("$")}
    try:
        text: str | None = message.body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {
        "lock": message.lock_token,  # not "lock_token": the redactor blanks any "...token" field
        "message_id": message.message_id,
        "correlation_id": message.correlation_id,
        "content_type": message.content_type or system.pop("$.ct", None),
        "content_encoding": message.content_encoding or system.pop("$.ce", None),
        "delivery_count": message.delivery_count,
        "properties": props,
        "system_properties": system,
        "body": text,
        "body_base64": base64.b64encode(message.body).decode(),
        "received_at": received_at,
    }


@dataclass(eq=False)
class Subscription:
    """One app's stream: a bounded queue of ``(kind, data)`` events; None ends it."""

    queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = field(default_factory=lambda: asyncio.Queue(1000))
    id: int = 0

    def put(self, kind: str, data: dict[str, Any]) -> bool:
        try:
            self.queue.put_nowait((kind, data))
        except asyncio.QueueFull:
            return False
        return True

    def end(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            yield item


class DeviceSurface:
    """C2D, methods and twin of one device for the local API's apps."""

    def __init__(
        self,
        device_id: str,
        protocol: str,
        handler: Callable[[], Handler],
        *,
        now: Callable[[], str],
        timeout: Callable[[], float],
        poll_interval: float = 1.0,
        max_held: int = 100,
        max_outstanding: int = 16,
        method_window: float = METHOD_WINDOW,
        twin_poll_interval: float = 30.0,
    ) -> None:
        self.device_id = device_id
        self.protocol = protocol
        self._handler = handler
        self._now = now
        self._timeout = timeout
        self.poll_interval = poll_interval
        self.max_held = max_held
        self.max_outstanding = max_outstanding
        self.method_window = method_window
        self.twin_poll_interval = twin_poll_interval
        #: HTTP: the desired ``$version`` last read (None until the first read), to tell a change
        self.desired_version: int | None = None
        self._twin_poller: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._held: deque[tuple[C2DMessage, str]] = deque()
        self._outstanding: dict[str, tuple[C2DMessage, str, Subscription]] = {}
        self._c2d_subs: list[Subscription] = []
        self._method_subs: list[Subscription] = []
        self._desired_subs: list[Subscription] = []
        self._calls: OrderedDict[str, float] = OrderedDict()  #: rid -> when it came (loop clock)
        self._poller: asyncio.Task[None] | None = None
        self._room = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False

    # -- streams ---------------------------------------------------------------------------------------

    def _check_stream(self, kind: str) -> None:
        if self.protocol == "http" and kind == "methods":
            raise make_error(_NOT_IMPLEMENTED, transport="http", device_id=self.device_id,
                             message=f"IoT Hub's HTTP device surface has no direct methods: configure device "
                                     f"{self.device_id!r} with protocol mqtt or amqp")

    def subscribe(self, kind: str) -> Subscription:
        """A new stream of ``kind`` (``c2d``, ``methods`` or ``desired``). Raises IoTHubError (501) for a
        stream the device's protocol cannot give."""
        self._check_stream(kind)
        sub = Subscription(id=next(self._ids))
        if kind == "c2d":
            self._c2d_subs.append(sub)
            self._dispatch()
            if self.protocol == "http" and (self._poller is None or self._poller.done()):
                self._poller = asyncio.get_running_loop().create_task(self._poll(), name=f"c2d-poll-{self.device_id}")
        elif kind == "methods":
            self._method_subs.append(sub)
        else:
            self._desired_subs.append(sub)
            if self.protocol == "http" and (self._twin_poller is None or self._twin_poller.done()):
                self._twin_poller = asyncio.get_running_loop().create_task(
                    self._poll_twin(), name=f"twin-poll-{self.device_id}")
        return sub

    def unsubscribe(self, kind: str, sub: Subscription) -> None:
        subs = {"c2d": self._c2d_subs, "methods": self._method_subs, "desired": self._desired_subs}[kind]
        with contextlib.suppress(ValueError):
            subs.remove(sub)
        if kind == "c2d":
            # Its unsettled messages are still locked for us: the next listener gets them.
            back = [(m, at) for m, at, s in self._outstanding.values() if s is sub]
            for message, _ in back:
                del self._outstanding[message.lock_token]
            self._held.extendleft(reversed(back))
            self._dispatch()
            if not self._c2d_subs and self.protocol == "http":
                # HTTP locks lapse at the hub anyway: give them back now rather than hold them unseen.
                while self._held:
                    self._spawn(self._settle_upstream(self._held.popleft()[0].lock_token, "abandon"))
            self._room.set()

    def listeners(self) -> dict[str, int]:
        return {"c2d": len(self._c2d_subs), "methods": len(self._method_subs), "desired": len(self._desired_subs)}

    # -- inbound (the handler's on_inbound hook: synchronous, on the loop) ------------------------------

    def on_inbound(self, event: Inbound) -> None:
        payload = event.payload
        if isinstance(payload, C2DMessage):
            self._c2d(payload)
        elif isinstance(payload, MethodCall):
            self._method(payload)
        elif isinstance(payload, DesiredPatch):
            data = {"device": self.device_id, "patch": dict(payload.patch), "version": payload.version,
                    "at": self._now()}
            for sub in list(self._desired_subs):
                sub.put("desired", data)

    def on_state(self, change: StateChange) -> None:
        """A lost MQTT or AMQP connection takes its locks with it: the hub redelivers those messages.
        (A reconnect the handler makes without passing through these states, a token renewal, is caught
        at settle: the transport answers DeviceMessageLockLost and the entry is dropped.)"""
        if change.state not in _LOST or self.protocol == "http":
            return
        if self._held or self._outstanding:
            log.info("%s: connection lost; %d unsettled C2D message(s) go back to the hub", self.device_id,
                     len(self._held) + len(self._outstanding))
        self._held.clear()
        self._outstanding.clear()

    def _c2d(self, message: C2DMessage) -> None:
        if len(self._held) >= self.max_held:
            # Bounded: left unsettled, so the hub keeps it and redelivers it after the next connect (or when
            # its lock lapses). Not abandoned: the hub would send it straight back, counting deliveries until
            # it dead-letters the message.
            log.warning("%s: %d C2D messages wait for an app; one more is left with the hub", self.device_id,
                        len(self._held))
            return
        self._held.append((message, self._now()))
        self._dispatch()

    def _dispatch(self) -> None:
        """Give held messages to the listening apps, round robin."""
        while self._held and self._c2d_subs:
            message, at = self._held.popleft()
            sub = self._c2d_subs[0]
            self._c2d_subs.append(self._c2d_subs.pop(0))
            if not sub.put("c2d", c2d_view(message, at)):
                self._held.appendleft((message, at))
                return
            self._outstanding[message.lock_token] = (message, at, sub)

    def _method(self, call: MethodCall) -> None:
        if not self._method_subs:
            log.info("%s: method %r called with no app subscribed; answered %d", self.device_id, call.name,
                     NO_SUBSCRIBER_STATUS)
            payload = {"message": f"no application is subscribed to direct methods of {self.device_id}"}
            self._spawn(self._respond_upstream(call.rid, NO_SUBSCRIBER_STATUS, payload))
            return
        loop = asyncio.get_running_loop()
        self._calls[call.rid] = loop.time()
        while len(self._calls) > 1024:
            self._calls.popitem(last=False)
        data = {"device": self.device_id, "name": call.name, "rid": call.rid, "payload": call.payload,
                "at": self._now()}
        for sub in list(self._method_subs):
            sub.put("method", data)

    # -- what the API calls ----------------------------------------------------------------------------

    async def settle(self, lock_token: str, outcome: SettleOutcome) -> None:
        """Settle a message the app was given; raises IoTHubError (412 DeviceMessageLockLost when this
        lock is not held for an app: settled already, or its connection is gone)."""
        entry = self._outstanding.get(lock_token)
        if entry is None:
            raise _local(_LOCK_LOST, "no C2D message with this lock token waits for a verdict (settled already, "
                                     "or its connection was lost and the hub redelivers it)", self.device_id)
        if self.protocol == "mqtt" and outcome != "complete":
            raise make_error(_NOT_IMPLEMENTED, transport="mqtt", device_id=self.device_id,
                             message=f"IoT Hub's MQTT surface cannot {outcome} a C2D message (MQTT has no negative "
                                     "acknowledgement); complete it, or use protocol amqp or http")
        try:
            await self._settle_upstream(lock_token, outcome, raise_errors=True)
        except IoTHubError as err:
            if err.code == _LOCK_LOST:  # gone for good (the hub redelivers the message): forget it
                self._outstanding.pop(lock_token, None)
                self._room.set()
            raise
        self._outstanding.pop(lock_token, None)
        self._room.set()

    async def respond(self, rid: str, status: int, payload: Any) -> None:
        """Answer a method call; raises IoTHubError (404 when no call with this rid waits)."""
        came = self._calls.pop(rid, None)
        if came is None or asyncio.get_running_loop().time() - came > self.method_window:
            raise _local(_NOT_FOUND, f"no method call with rid {rid!r} waits for an answer (answered already, "
                                     f"or older than {self.method_window:g}s)", self.device_id)
        await self._respond_upstream(rid, status, payload, raise_errors=True)

    async def twin(self) -> Any:
        return await self._request(GetTwin())

    async def patch_reported(self, patch: Mapping[str, Any]) -> int | None:
        version: int | None = await self._request(PatchReported(patch))
        return version

    async def close(self) -> None:
        self._closed = True
        for sub in (*self._c2d_subs, *self._method_subs, *self._desired_subs):
            sub.end()
        await cancel_and_wait(self._poller)
        await cancel_and_wait(self._twin_poller)
        await cancel_and_wait(set(self._background))

    # -- upstream --------------------------------------------------------------------------------------

    async def _request(self, request: Any) -> Any:
        try:
            return await self._handler().request(request, timeout=self._timeout())
        except UnsupportedRequest as exc:
            raise _unsupported(exc, self.protocol, self.device_id) from exc

    async def _settle_upstream(self, lock_token: str, outcome: SettleOutcome, *, raise_errors: bool = False) -> None:
        try:
            await self._request(SettleC2D(lock_token, outcome))
        except IoTHubError as err:
            if raise_errors:
                raise
            log.warning("%s: could not %s a C2D message: %s", self.device_id, outcome, err)

    async def _respond_upstream(self, rid: str, status: int, payload: Any, *, raise_errors: bool = False) -> None:
        try:
            await self._request(RespondMethod(rid, status, payload))
        except IoTHubError as err:
            if raise_errors:
                raise
            log.warning("%s: could not answer method call %s: %s", self.device_id, rid, err)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _poll(self) -> None:
        """HTTP: receive while an app listens and has room; the hub keeps the rest."""
        trouble = 0
        while self._c2d_subs and not self._closed:
            if len(self._outstanding) + len(self._held) >= self.max_outstanding:
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), self.poll_interval)
                continue
            try:
                message = await self._request(ReceiveC2D())
                trouble = 0
            except IoTHubError as err:
                trouble += 1
                log.info("%s: C2D poll failed: %s", self.device_id, err)
                await asyncio.sleep(min(30.0, self.poll_interval * 2 ** min(trouble, 5)))
                continue
            if message is None:
                await asyncio.sleep(self.poll_interval)
                continue
            if not self._c2d_subs:  # the app left while we polled: give it straight back
                await self._settle_upstream(message.lock_token, "abandon")
                return
            self._held.append((message, self._now()))
            self._dispatch()

    async def _poll_twin(self) -> None:
        """HTTP: read the twin while an app streams desired properties; a grown ``desired.$version`` becomes
        one event carrying the whole desired section. A failed read waits longer each time (up to 10
        intervals); the handler's own throttle and offline rules apply to every read."""
        trouble = 0
        while self._desired_subs and not self._closed:
            try:
                twin = await self._request(GetTwin())
                trouble = 0
            except IoTHubError as err:
                trouble += 1
                log.info("%s: twin read for desired properties failed: %s", self.device_id, err)
                await asyncio.sleep(self.twin_poll_interval * min(10, 2 ** min(trouble, 4)))
                continue
            self._desired_seen(twin)
            await asyncio.sleep(self.twin_poll_interval)

    def _desired_seen(self, twin: Any) -> None:
        props = twin.get("properties", twin) if isinstance(twin, Mapping) else None
        desired = props.get("desired") if isinstance(props, Mapping) else None
        version = desired.get("$version") if isinstance(desired, Mapping) else None
        if not isinstance(version, int) or isinstance(version, bool):
            log.info("%s: the twin read has no desired.$version; nothing to compare", self.device_id)
            return
        assert isinstance(desired, Mapping)
        before, self.desired_version = self.desired_version, version
        if before is None or version <= before:
            return
        data = {"device": self.device_id, "patch": {k: v for k, v in desired.items() if k != "$metadata"},
                "version": version, "whole": True, "at": self._now()}
        for sub in list(self._desired_subs):
            sub.put("desired", data)
