"""HTTP failures over real loopback sockets: what went out decides the code, and failures stay per request.

A failure before the request reached a socket (refused, a black-hole port, a listener that never answers
the TLS handshake) is NotConnected: nothing went out, a resend is no duplicate. A request that went out
and got no answer is OperationTimedOut: the outcome is unknown. One request losing its socket never
aborts the others, not even when the handler "reconnects" the transport because of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import pytest

from adapters.http.emulator import HttpFront
from adapters.http.transport import HttpTransport
from gateway.emulator import Hub
from gateway.emulator.front import FrontConfig
from gateway.errors import ConnectionLostError, IoTHubError, OperationTimeoutError
from gateway.handler import Handler
from gateway.policy import Backoff, Policy, PolicyConfig, ThrottleBackoff
from gateway.transport import GetTwin, Message
from tests.peers.tls import TlsFiles

T = TypeVar("T")
DEVICE = "HostName=hub.test;DeviceId=d1;SharedAccessKey=a2V5a2V5a2V5a2V5"


async def bounded(aw: Awaitable[T], seconds: float = 10.0) -> T:
    async with asyncio.timeout(seconds):
        return await aw


async def failure(aw: Awaitable[Any], seconds: float = 10.0) -> IoTHubError:
    with pytest.raises(IoTHubError) as info:
        await bounded(aw, seconds)
    return info.value


class Silent:
    """A TCP listener that accepts and reads but never writes a byte (neither TLS nor HTTP)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                self.received += chunk

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> Silent:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()


@contextlib.contextmanager
def black_hole() -> Any:
    """A port whose accept queue is full: the kernel drops further SYNs, so a connect hangs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler = socket.create_connection(("127.0.0.1", port), timeout=2)  # takes the one queue slot
        try:
            yield port
        finally:
            filler.close()


@contextlib.asynccontextmanager
async def transport(port: int, **kwargs: Any) -> AsyncIterator[HttpTransport]:
    kwargs.setdefault("ssl", None)
    t = HttpTransport(DEVICE, host="127.0.0.1", port=port, **kwargs)
    await bounded(t.connect())
    try:
        yield t
    finally:
        await bounded(t.close())


# --- connect timeout vs read timeout -------------------------------------------------------------------


def assert_nothing_sent(err: IoTHubError, cause_code: int) -> None:
    assert err.code == 503904 and isinstance(err, ConnectionLostError) and not err.exact
    assert not isinstance(err, OperationTimeoutError)  # not an "outcome unknown" timeout
    assert (err.native["phase"], err.native["cause_code"]) == ("connect", cause_code)


async def test_a_black_hole_port_is_a_connect_timeout_not_a_possible_duplicate() -> None:
    with black_hole() as port:
        async with transport(port, connect_timeout=0.3, timeout=5) as t:
            err = await failure(t.send(Message("m1", "d1", b"x")))
    assert_nothing_sent(err, 504901)
    assert err.native["timeout"] == "connect"
    assert isinstance(err.__cause__, TimeoutError)


async def test_the_call_deadline_running_out_while_connecting_is_still_nothing_sent() -> None:
    with black_hole() as port:
        async with transport(port, connect_timeout=30, timeout=0.3) as t:
            err = await failure(t.request(GetTwin(), timeout=5))
    assert_nothing_sent(err, 504901)


async def test_a_listener_that_never_answers_tls_is_a_connect_timeout(tls_files: TlsFiles) -> None:
    async with Silent() as silent, transport(silent.port, ssl=tls_files.client_context(),
                                             connect_timeout=0.3) as t:
        err = await failure(t.send(Message("m1", "d1", b"secret")))
        assert silent.received[:1] == b"\x16"  # a TLS ClientHello went out, nothing of the request
        assert b"secret" not in silent.received
    assert_nothing_sent(err, 504901)


async def test_a_listener_that_never_answers_http_is_a_read_timeout() -> None:
    async with Silent() as silent, transport(silent.port, timeout=0.3) as t:
        err = await failure(t.send(Message("m1", "d1", b"payload")))
        assert silent.received.startswith(b"POST /devices/d1/messages/events")  # it went out
    assert isinstance(err, OperationTimeoutError) and err.code == 504901  # outcome unknown
    assert (err.native["timeout"], err.native["phase"]) == ("read", "sent")


async def test_a_call_waiting_for_a_pooled_socket_never_went_out() -> None:
    async with Silent() as silent, transport(silent.port, connection_limit=1, timeout=5) as t:
        first = asyncio.ensure_future(t.send(Message("m1", "d1", b"x")))  # holds the only socket
        async with asyncio.timeout(5):
            while not silent.received:
                await asyncio.sleep(0.01)
        err = await failure(t.request(GetTwin(), timeout=0.3))  # queued behind it until its deadline
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        assert b"/twins/" not in silent.received
    assert_nothing_sent(err, 504901)


async def test_connection_refused_is_nothing_sent() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening
        async with transport(sock.getsockname()[1]) as t:
            err = await failure(t.send(Message("m1", "d1", b"x")))
    assert_nothing_sent(err, 503901)


async def test_a_tls_handshake_refused_by_the_peer_is_nothing_sent(tls_files: TlsFiles) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the ClientHello arrives; answer with garbage and close
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    try:
        async with transport(server.sockets[0].getsockname()[1], ssl=tls_files.client_context()) as t:
            err = await failure(t.send(Message("m1", "d1", b"x")))
    finally:
        server.close()
        await server.wait_closed()
    assert err.code == 503904 and err.native["phase"] == "connect"
    assert err.native["cause_code"] in {503905, 404104}  # a TLS failure or the peer's close mid-handshake


# --- failures are per request ---------------------------------------------------------------------------


@pytest.fixture
async def front() -> AsyncIterator[HttpFront]:
    hub = Hub()
    hub.add_device("d1")
    f = HttpFront(hub)
    await bounded(f.start())
    yield f
    await bounded(f.stop())


def front_transport(front: HttpFront, **kwargs: Any) -> HttpTransport:
    return HttpTransport(front.hub.connection_string("d1"), host="127.0.0.1", port=front.port, ssl=None,
                         timeout=5.0, **kwargs)


async def test_one_dropped_request_does_not_disturb_concurrent_ones(front: HttpFront) -> None:
    t = front_transport(front)
    await bounded(t.connect())
    try:
        front.hub.plan.add("telemetry", kind="delay", delay=0.3, times=5)
        slow = [asyncio.ensure_future(t.send(Message(f"s{i}", "d1", b"x"))) for i in range(5)]
        async with asyncio.timeout(5):
            while front.hub.plan.pending():
                await asyncio.sleep(0.01)  # all five are in the hub's hands
        front.hub.plan.add("telemetry", kind="drop")
        err = await failure(t.send(Message("dropped", "d1", b"x")))
        assert err.code == 404104
        await bounded(asyncio.gather(*slow))  # untouched by the other request's loss
    finally:
        await bounded(t.close())
    assert sorted(map(str, front.hub.received_ids())) == ["dropped", "s0", "s1", "s2", "s3", "s4"]


async def test_close_retires_the_session_without_aborting_calls_in_flight(front: HttpFront) -> None:
    t = front_transport(front)
    await bounded(t.connect())
    front.hub.plan.add("telemetry", kind="delay", delay=0.3, times=3)
    running = [asyncio.ensure_future(t.send(Message(f"s{i}", "d1", b"x"))) for i in range(3)]
    async with asyncio.timeout(5):
        while front.hub.plan.pending():
            await asyncio.sleep(0.01)
    old = t._pool
    assert old is not None
    await bounded(t.close())  # what a handler does on a connection loss, before connect() again
    assert (await failure(t.send(Message("late", "d1", b"x")))).code == 503904  # new calls: refused at once
    await bounded(t.connect())
    await bounded(t.send(Message("new", "d1", b"x")))  # on a fresh session
    assert not old.session.closed  # the old one still serves the three calls in flight
    await bounded(asyncio.gather(*running))
    assert old.session.closed  # the last one out closed it
    await bounded(t.close())
    assert sorted(map(str, front.hub.received_ids())) == ["new", "s0", "s1", "s2"]


def quick_policy() -> Policy:
    fast = Backoff(initial=0.01, multiplier=2.0, cap=0.05, jitter=1.0, max_attempts=50, max_elapsed=30.0)
    return Policy(PolicyConfig(
        retry=fast,
        reconnect=Backoff(initial=0.01, multiplier=2.0, cap=0.05, jitter=1.0, max_attempts=0, max_elapsed=0.0),
        throttle=ThrottleBackoff(initial=0.05, cap=0.2),
    ))


async def test_through_the_handler_a_drop_costs_only_its_own_request(front: HttpFront) -> None:
    front.hub.plan.add("telemetry", kind="delay", delay=0.5, times=5)
    handler = Handler(front_transport(front), policy=quick_policy())
    await bounded(handler.start())
    try:
        await bounded(handler.wait_connected(5))
        slow = [asyncio.ensure_future(handler.send(Message(f"s{i}", "d1", b"x"), timeout=20)) for i in range(5)]
        async with asyncio.timeout(5):
            while front.hub.plan.pending():
                await asyncio.sleep(0.01)
        front.hub.plan.add("telemetry", kind="drop")
        dropped = await bounded(handler.send(Message("dropped", "d1", b"x"), timeout=20))
        receipts = await bounded(asyncio.gather(*slow))
    finally:
        await bounded(handler.close())
    # the handler reconnected because of the drop; the five in flight finished on the retired session
    assert [(r.attempts, r.possible_duplicate) for r in receipts] == [(1, False)] * 5
    assert dropped.attempts == 2 and dropped.possible_duplicate  # the hub had taken it before the drop
    assert sorted(map(str, front.hub.received_ids())) == ["dropped", "dropped", "s0", "s1", "s2", "s3", "s4"]


async def test_through_the_handler_a_refused_send_is_resent_as_no_duplicate() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # reserve a port nothing listens on yet
        port = sock.getsockname()[1]
        hub = Hub()
        hub.add_device("d1")
        t = HttpTransport(hub.connection_string("d1"), host="127.0.0.1", port=port, ssl=None, timeout=5.0)
        handler = Handler(t, policy=quick_policy())
        await bounded(handler.start())
        await bounded(handler.wait_connected(5))  # HTTP "connects" without a socket
        sending = asyncio.ensure_future(handler.send(Message("m1", "d1", b"x"), timeout=20))
        await asyncio.sleep(0.2)  # a few refused attempts
        assert not sending.done()
    front = HttpFront(hub, FrontConfig(port=port))  # the hub comes up on that port
    await bounded(front.start())
    try:
        receipt = await bounded(sending)
    finally:
        await bounded(handler.close())
        await bounded(front.stop())
    assert receipt.attempts >= 2 and not receipt.possible_duplicate  # no attempt reached the hub before
    assert hub.received_ids() == ["m1"]
