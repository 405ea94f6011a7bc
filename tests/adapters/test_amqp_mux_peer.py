"""The AMQP mux against an independent proton peer written here (not the emulator): put-token answers,
a device's session closed by the peer, the whole connection closed by the peer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest

from adapters.amqp.mux import AmqpMux, MuxDevice
from adapters.amqp.translate import translate
from gateway.codes import code_of
from gateway.errors import IoTHubError
from gateway.transport import Disconnected, Message

STEP = 5.0
DEVICES = ["p0", "p1", "p2"]


class Peer:
    """A bare AMQP 1.0 listener: answers put-token (401 for ``refused`` devices), accepts telemetry."""

    def __init__(self) -> None:
        import proton.reactor
        from proton import Message as PMessage
        from proton.handlers import MessagingHandler

        peer = self
        self.refused: set[str] = set()
        self.received: list[tuple[str, str]] = []  # (events address, message id)
        self.sessions: dict[str, Any] = {}  # device -> the session its events link came on
        self.conns: list[Any] = []
        self.acceptor: Any = None
        self.port = 0
        self.started = threading.Event()
        self._cmds: list[Callable[[], None]] = []
        self._lock = threading.Lock()

        class Handler(MessagingHandler):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__(prefetch=100, auto_accept=False)

            def on_start(self, event: Any) -> None:
                event.container.selectable(peer.injector)
                peer.acceptor = event.container.acceptor("127.0.0.1", 0)
                peer.port = peer.acceptor._selectable._delegate.getsockname()[1]
                peer.started.set()

            def on_connection_bound(self, event: Any) -> None:
                sasl = event.transport.sasl()
                sasl.allow_insecure_mechs = True
                sasl.allowed_mechs("ANONYMOUS")

            def on_connection_opening(self, event: Any) -> None:
                peer.conns.append(event.connection)

            def on_link_opening(self, event: Any) -> None:
                link = event.link
                link.source.copy(link.remote_source)
                link.target.copy(link.remote_target)
                if link.is_sender and link.remote_source.address == "$cbs":
                    link.connection.cbs_reply = link
                address = link.remote_target.address if link.is_receiver else None
                if address and address.endswith("/messages/events"):
                    peer.sessions[address.split("/devices/")[1].split("/")[0]] = link.session

            def on_message(self, event: Any) -> None:
                link, dlv, msg = event.link, event.delivery, event.message
                dlv.update(dlv.ACCEPTED)
                dlv.settle()
                if link.remote_target.address == "$cbs":
                    audience = str((msg.properties or {}).get("name", ""))
                    device = audience.rsplit("/devices/", 1)[-1]
                    status = 401 if device in peer.refused else 200
                    answer = PMessage(correlation_id=msg.id, address=msg.reply_to)
                    props: Any = {"status-code": status, "status-description": "OK" if status == 200 else "refused"}
                    answer.properties = props
                    link.connection.cbs_reply.send(answer)
                else:
                    peer.received.append((str(link.remote_target.address), str(msg.id)))

            def on_peer_cmd(self, event: Any) -> None:
                with peer._lock:
                    batch, peer._cmds = peer._cmds, []
                for fn in batch:
                    fn()

        self.hold_begin = False  # answer no BEGIN until release_begins()
        self.held: list[Any] = []
        handler = Handler()
        for child in cast(list[Any], handler.handlers):  # the child answering BEGIN by itself: hold it
            if type(child).__name__ == "EndpointStateHandler":
                answer_begin = child.on_session_remote_open

                def on_session_remote_open(event: Any, answer_begin: Any = answer_begin) -> None:
                    if peer.hold_begin:
                        peer.held.append(event.session)
                    else:
                        answer_begin(event)

                child.on_session_remote_open = on_session_remote_open
                answer_end = child.on_session_remote_close

                def on_session_remote_close(event: Any, answer_end: Any = answer_end) -> None:
                    if event.session not in peer.held:  # a held one answers BEGIN first, late
                        answer_end(event)

                child.on_session_remote_close = on_session_remote_close
        self.injector = proton.reactor.EventInjector()
        self.container = proton.reactor.Container(handler)
        self.thread = threading.Thread(target=self.container.run, name="peer-proton", daemon=True)

    def post(self, fn: Callable[[], None]) -> None:
        import proton.reactor

        with self._lock:
            self._cmds.append(fn)
        self.injector.trigger(proton.reactor.ApplicationEvent("peer_cmd"))

    def release_begins(self) -> None:
        def release() -> None:
            self.hold_begin = False
            for session in self.held:
                session.open()  # the BEGIN reply, after the device's END
                if session.state & session.REMOTE_CLOSED:
                    session.close()
            self.held.clear()

        self.post(release)

    def close_session(self, device: str, condition: str) -> None:
        from proton import Condition

        def close() -> None:
            session = self.sessions[device]
            session.condition = Condition(condition, "closed by the peer")
            session.close()

        self.post(close)

    def close_connection(self, condition: str) -> None:
        from proton import Condition

        def close() -> None:
            for conn in self.conns:
                conn.condition = Condition(condition, "closed by the peer")
                conn.close()

        self.post(close)

    def stop(self) -> None:
        def stop() -> None:
            self.acceptor.close()
            for conn in self.conns:
                with contextlib.suppress(Exception):
                    conn.close()
            self.container.stop()

        self.post(stop)
        self.thread.join(STEP)
        for fd in self.injector.pipe:
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    p = Peer()
    p.thread.start()
    assert await asyncio.get_running_loop().run_in_executor(None, p.started.wait, STEP)
    yield p
    await asyncio.get_running_loop().run_in_executor(None, p.stop)


@pytest.fixture
async def mux(peer: Peer) -> AsyncIterator[AmqpMux]:
    m = AmqpMux(host="127.0.0.1", port=peer.port, ssl=None, hub_host="peer.azure-devices.net")
    yield m
    await asyncio.wait_for(m.close(), STEP * 3)


def devices(mux: AmqpMux) -> list[MuxDevice]:
    # the peer does not check tokens: any string passes
    return [mux.device(d, token="SharedAccessSignature sr=x&sig=y&se=9999999999", connect_timeout=STEP,
                       send_timeout=STEP) for d in DEVICES]


async def send_all(ds: list[MuxDevice], tag: str) -> None:
    await asyncio.wait_for(asyncio.gather(*(d.send(Message(f"{d.device_id}-{tag}", d.device_id, b"x"))
                                            for d in ds)), STEP)


async def first_event(d: MuxDevice) -> Any:
    async def first() -> Any:
        async for event in d.events():
            return event
        return None

    return await asyncio.wait_for(first(), STEP)


async def test_a_refused_put_token_fails_that_device_alone(peer: Peer, mux: AmqpMux) -> None:
    peer.refused.add("p0")
    ds = devices(mux)
    results = await asyncio.gather(*(d.connect() for d in ds), return_exceptions=True)
    assert isinstance(results[0], IoTHubError) and results[0].http_status == 401
    assert results[0].device_id == "p0" and results[1:] == [None, None]
    await send_all(ds[1:], "ok")
    assert sorted(mid for _, mid in peer.received) == ["p1-ok", "p2-ok"]
    assert len(peer.conns) == 1 and ds[0].credential_expiry == 9999999999


async def test_a_session_closed_by_the_peer_reaches_only_its_device(peer: Peer, mux: AmqpMux) -> None:
    ds = devices(mux)
    await asyncio.wait_for(asyncio.gather(*(d.connect() for d in ds)), STEP)
    peer.close_session("p1", "amqp:resource-limit-exceeded")
    event = await first_event(ds[1])
    assert isinstance(event, Disconnected)
    assert event.error.code == translate("amqp:resource-limit-exceeded", "").code and event.error.device_id == "p1"
    await send_all([ds[0], ds[2]], "after")
    assert ds[0].connected and ds[2].connected and not ds[1].connected
    await asyncio.wait_for(ds[1].connect(), STEP)  # a new session on the same connection
    await send_all(ds, "again")
    assert len(peer.conns) == 1 and mux.connection_attempts == 1


async def test_a_connection_closed_by_the_peer_reaches_every_device_once(peer: Peer, mux: AmqpMux) -> None:
    ds = devices(mux)
    await asyncio.wait_for(asyncio.gather(*(d.connect() for d in ds)), STEP)
    peer.close_connection("amqp:connection:forced")
    events = await asyncio.gather(*(first_event(d) for d in ds))
    assert all(isinstance(e, Disconnected) and e.error.code == code_of("DeviceConnectionClosedRemotely")
               for e in events)
    assert [e.error.device_id for e in events] == DEVICES
    for d in ds:
        assert [e async for e in d.events()] == []  # once: nothing more on its stream
    await asyncio.wait_for(asyncio.gather(*(d.connect() for d in ds)), STEP)
    await send_all(ds, "back")
    assert mux.connection_attempts == 2 and len(peer.conns) == 2


async def test_a_device_leaving_before_its_session_is_answered_leaves_the_connection_up(peer: Peer,
                                                                                       mux: AmqpMux) -> None:
    ds = devices(mux)
    await asyncio.wait_for(ds[0].connect(), STEP)
    peer.hold_begin = True
    ds[1].connect_timeout = 0.5
    with pytest.raises(IoTHubError) as caught:  # its BEGIN goes unanswered: its connect times out
        await ds[1].connect()
    assert caught.value.code == code_of("OperationTimedOut")
    assert len(peer.held) == 1
    peer.release_begins()  # the BEGIN reply arrives after the device has given up
    await asyncio.sleep(0.3)
    await send_all([ds[0]], "still-up")
    assert ds[0].connected and len(peer.conns) == 1 and mux.connection_attempts == 1
    await asyncio.wait_for(ds[1].connect(), STEP)  # and it can try again on the same connection
    await send_all(ds[:2], "both")
