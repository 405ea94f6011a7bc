"""The AMQP adapter's life cycle under the real hub's conditions, over real loopback sockets.

A half-open link (the peer keeps the socket but says nothing) must be found by the idle timeout and
reported as a connection loss; a closed connection must never write into a descriptor number the
process has since reused; closing must not hold an executor thread; the token is renewed on the live
connection; the context given as ``ssl=`` decides what proton trusts; programming errors raise at once.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from adapters.amqp.emulator import AmqpFront
from adapters.amqp.transport import DEFAULT_IDLE_TIMEOUT, AmqpTransport
from gateway.emulator import Hub
from gateway.emulator.front import FrontConfig
from gateway.errors import ConnectionLostError, IoTHubError
from gateway.sas import make_sas_token
from gateway.tls import client_context
from gateway.transport import C2DMessage, DesiredPatch, Disconnected, Inbound, Message, SettleC2D
from tests.peers.proxy import TcpProxy

STEP = 5.0

pytestmark = pytest.mark.usefixtures("no_amqp_thread_left")


@pytest.fixture
def front(amqp_front: AmqpFront) -> AmqpFront:
    return amqp_front


def make(hub: Hub, port: int, device: str = "d1", **kw: Any) -> AmqpTransport:
    kw.setdefault("send_timeout", STEP)
    kw.setdefault("connect_timeout", STEP)
    kw.setdefault("close_timeout", 2.0)
    kw.setdefault("ssl", None)
    return AmqpTransport.from_connection_string(hub.connection_string(device), host="127.0.0.1", port=port, **kw)


async def next_event(t: AmqpTransport, within: float = STEP) -> Any:
    async def first() -> Any:
        async for event in t.events():
            return event
        return None

    return await asyncio.wait_for(first(), within)


# -- half-open links ----------------------------------------------------------------------------------


def test_the_idle_timeout_is_on_by_default(hub: Hub) -> None:
    t = AmqpTransport.from_connection_string(hub.connection_string("d1"))
    assert t.idle_timeout == DEFAULT_IDLE_TIMEOUT == 120.0
    with pytest.raises(ValueError):
        AmqpTransport.from_connection_string(hub.connection_string("d1"), idle_timeout=0)


async def test_a_half_open_link_is_a_connection_loss_within_two_idle_timeouts(hub: Hub, front: AmqpFront) -> None:
    idle = 1.5
    async with TcpProxy("127.0.0.1", front.port) as proxy:
        t = make(hub, proxy.port, idle_timeout=idle, send_timeout=60.0)  # only the idle timer may find it
        await asyncio.wait_for(t.connect(), STEP)
        try:
            await asyncio.wait_for(t.send(Message("before", "d1", b"x")), STEP)
            await asyncio.sleep(idle * 1.5)  # quiet but alive: the peer's empty frames keep the link up
            assert t.connected
            assert proxy.freeze() == 1
            in_flight = asyncio.ensure_future(t.send(Message("lost-in-the-void", "d1", b"x")))
            event = await next_event(t, within=2 * idle)
            assert isinstance(event, Disconnected)
            assert isinstance(event.error, ConnectionLostError) and event.error.name == "DeviceConnectionClosedRemotely"
            assert "idle" in event.error.message
            with pytest.raises(IoTHubError) as info:
                await asyncio.wait_for(in_flight, STEP)
            assert info.value.name != "NotConnected"  # it went out: outcome unknown, resent by the handler
            # a new connection through the same proxy is forwarded again: reconnect and deliver
            await asyncio.wait_for(t.connect(), STEP)
            await asyncio.wait_for(t.send(Message("lost-in-the-void", "d1", b"x")), STEP)
            assert hub.received_ids("d1")[-1] == "lost-in-the-void"
        finally:
            await t.close()


async def test_without_the_idle_timeout_a_half_open_link_goes_unnoticed(hub: Hub, front: AmqpFront) -> None:
    """The control: the same freeze, no idle timeout, nothing is reported in the same window."""
    async with TcpProxy("127.0.0.1", front.port) as proxy:
        t = make(hub, proxy.port, idle_timeout=None)
        await asyncio.wait_for(t.connect(), STEP)
        try:
            proxy.freeze()
            with pytest.raises(TimeoutError):
                await next_event(t, within=3.0)
            assert t.connected
        finally:
            await t.close()


# -- closed descriptors and the executor ----------------------------------------------------------------


async def test_post_after_the_thread_ended_writes_into_no_reused_descriptor(hub: Hub, front: AmqpFront) -> None:
    t = make(hub, front.port)
    await asyncio.wait_for(t.connect(), STEP)
    bridge = t._bridge
    assert bridge is not None
    _, write_fd = bridge.injector.pipe
    await t.close()
    assert bridge.finished.is_set()
    socks: list[socket.socket] = []
    try:
        peer = None
        for _ in range(200):  # take descriptor numbers until the injector's old write end is ours
            a, b = socket.socketpair()
            socks += [a, b]
            if write_fd in (a.fileno(), b.fileno()):
                peer = b if a.fileno() == write_fd else a
                break
        assert peer is not None, "the descriptor number was not reused"
        posted = [bridge.post(lambda: None), bridge.post(lambda: bridge.forget_twin("late"))]  # a twin's finally
        bridge.shutdown()
        peer.setblocking(False)
        with pytest.raises(BlockingIOError):
            peer.recv(16)  # nothing was written into the socket that now owns the number
        assert posted == [False, False]  # dropped, and the caller is told
    finally:
        for s in socks:
            s.close()


class CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


async def test_closing_ties_up_no_executor_thread(hub: Hub, front: AmqpFront) -> None:
    loop = asyncio.get_running_loop()
    executor = CountingExecutor()
    t = make(hub, front.port)
    await asyncio.wait_for(t.connect(), STEP)
    loop.set_default_executor(executor)
    try:
        thread = t.thread
        await asyncio.wait_for(t.close(), STEP)
        assert executor.submitted == 0
        assert thread is not None and not thread.is_alive()
    finally:
        pass  # the loop shuts its default executor down at the end


# -- token renewal on the live connection ---------------------------------------------------------------


async def test_cbs_renews_the_token_on_the_live_connection(hub: Hub, front: AmqpFront) -> None:
    import time

    minted: list[int] = []

    def token() -> str:
        expiry = int(time.time()) + 2
        minted.append(expiry)
        return hub.token("d1", expiry)

    t = AmqpTransport(host="127.0.0.1", port=front.port, ssl=None, device_id="d1", hub_host=hub.host_name,
                      token=token, connect_timeout=STEP, renew_margin=0.5)
    assert t.credential_expiry is None  # CBS renews: the handler never reconnects for a token
    await asyncio.wait_for(t.connect(), STEP)
    try:
        thread = t.thread
        async with asyncio.timeout(STEP * 2):
            while len(minted) < 3:  # two renewals, each accepted by the hub ($cbs answered 200)
                await asyncio.sleep(0.05)
        assert t.thread is thread and t.connected  # on the same connection, no reconnect
        await asyncio.wait_for(t.send(Message("after-renewals", "d1", b"x")), STEP)
        assert t.credential_expiry is None
    finally:
        await t.close()


async def test_a_refused_renewal_reports_the_cbs_code(hub: Hub, front: AmqpFront) -> None:
    import time

    calls = [0]

    def token() -> str:
        calls[0] += 1
        expiry = int(time.time()) + 2
        if calls[0] == 1:
            return hub.token("d1", expiry)
        return make_sas_token(f"{hub.host_name}/devices/d1", "d3Jvbmcta2V5", expiry)  # not d1's key

    t = AmqpTransport(host="127.0.0.1", port=front.port, ssl=None, device_id="d1", hub_host=hub.host_name,
                      token=token, connect_timeout=STEP, renew_margin=0.5)
    await asyncio.wait_for(t.connect(), STEP)
    try:
        event = await next_event(t, within=STEP)
        assert isinstance(event, Disconnected) and event.error.name == "IotHubUnauthorizedAccess"
        assert calls[0] == 2
    finally:
        await t.close()


async def test_a_fixed_token_reports_its_expiry_for_the_handler(hub: Hub, front: AmqpFront) -> None:
    t = AmqpTransport(host="127.0.0.1", port=front.port, ssl=None, device_id="d1", hub_host=hub.host_name,
                      token=hub.token("d1", 4_000_000_000), connect_timeout=STEP)
    assert t.credential_expiry == 4_000_000_000.0
    await asyncio.wait_for(t.connect(), STEP)
    try:
        assert t.credential_expiry == 4_000_000_000.0
    finally:
        await t.close()


# -- TLS through ssl= ------------------------------------------------------------------------------------


@pytest.fixture
async def tls_front(hub: Hub, tls_files: Any) -> Any:
    f = AmqpFront(hub, FrontConfig(ssl_context=tls_files.server_context()),
                  cert_file=str(tls_files.cert_pem), key_file=str(tls_files.key_pem))
    await asyncio.wait_for(f.start(), STEP)
    yield f
    await asyncio.wait_for(f.stop(), STEP * 3)


@pytest.mark.parametrize("check_hostname", [True, False])
async def test_a_ca_file_with_an_ip_address_as_host(hub: Hub, tls_front: AmqpFront, tls_files: Any,
                                                    check_hostname: bool) -> None:
    context = client_context(str(tls_files.ca_pem), check_hostname=check_hostname)
    t = make(hub, tls_front.port, ssl=context)
    assert t.port == tls_front.port
    await asyncio.wait_for(t.connect(), STEP)
    bridge = t._bridge
    assert bridge is not None and len(bridge.tls_files) == 1
    bundle = bridge.tls_files[0]
    assert stat.S_IMODE(os.stat(bundle).st_mode) == 0o600  # a private copy of the context's CAs
    try:
        await asyncio.wait_for(t.send(Message("tls-ip", "d1", b"x")), STEP)
        assert hub.received_ids("d1") == ["tls-ip"]
    finally:
        await t.close()
    assert not os.path.exists(bundle)


async def test_devices_with_one_context_share_one_ca_file(hub: Hub, tls_front: AmqpFront, tls_files: Any) -> None:
    context = client_context(str(tls_files.ca_pem))
    one, two = make(hub, tls_front.port, "d1", ssl=context), make(hub, tls_front.port, "d2", ssl=context)
    await asyncio.wait_for(one.connect(), STEP)
    await asyncio.wait_for(two.connect(), STEP)
    assert one._bridge is not None and two._bridge is not None
    bundle = one._bridge.tls_files[0]
    assert two._bridge.tls_files == [bundle]  # a thousand devices: one file, not a thousand copies
    await one.close()
    assert os.path.exists(bundle)  # still in use by the other connection
    await asyncio.wait_for(two.send(Message("shared", "d2", b"x")), STEP)
    await two.close()
    assert not os.path.exists(bundle)


async def test_the_chain_is_still_verified_for_an_ip_address(hub: Hub, tls_front: AmqpFront) -> None:
    t = make(hub, tls_front.port, ssl=client_context(check_hostname=False))  # system trust: not our CA
    with pytest.raises(IoTHubError) as info:
        await asyncio.wait_for(t.connect(), STEP)
    assert info.value.name == "TlsVerificationFailed"
    await t.close()


async def test_the_host_name_is_checked_when_the_context_asks(hub: Hub, tmp_path: Any) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("elsewhere.example")  # a good chain, but not for "localhost"
    ca_pem, cert_pem, key_pem = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_pem, key_pem)
    front = AmqpFront(hub, FrontConfig(ssl_context=server), cert_file=str(cert_pem), key_file=str(key_pem))
    await asyncio.wait_for(front.start(), STEP)
    try:
        def to_localhost(context: ssl.SSLContext) -> AmqpTransport:
            return AmqpTransport.from_connection_string(hub.connection_string("d1"), host="localhost",
                                                        port=front.port, ssl=context, connect_timeout=STEP,
                                                        close_timeout=2.0)

        wrong_name = to_localhost(client_context(str(ca_pem)))
        with pytest.raises(IoTHubError) as info:
            await asyncio.wait_for(wrong_name.connect(), STEP)
        assert info.value.name == "TlsVerificationFailed"
        await wrong_name.close()
        chain_only = to_localhost(client_context(str(ca_pem), check_hostname=False))
        await asyncio.wait_for(chain_only.connect(), STEP)
        await chain_only.close()
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        anything = to_localhost(unverified)
        await asyncio.wait_for(anything.connect(), STEP)
        await anything.close()
    finally:
        await asyncio.wait_for(front.stop(), STEP * 3)


def test_the_default_port_follows_ssl(hub: Hub) -> None:
    cs = hub.connection_string("d1")
    assert AmqpTransport.from_connection_string(cs).port == 5671
    assert AmqpTransport.from_connection_string(cs, ssl=None).port == 5672
    assert AmqpTransport.from_connection_string(cs, ssl=None, port=1234).port == 1234
    with pytest.raises(TypeError):
        AmqpTransport.from_connection_string(cs, ssl="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        AmqpTransport.from_connection_string(cs, tls=False)  # the old names are gone


# -- typed inbound payloads, settle outcomes, reserved properties -----------------------------------------


async def test_c2d_arrives_typed_and_settles_with_the_shared_outcomes(hub: Hub, front: AmqpFront) -> None:
    t = make(hub, front.port)
    await asyncio.wait_for(t.connect(), STEP)
    try:
        hub.device("d1").c2d.append(("c-1", b"cloud"))  # type: ignore[union-attr]
        event = await next_event(t)
        assert isinstance(event, Inbound) and event.kind == "c2d" and event.device_id == "d1"
        msg = event.payload
        assert isinstance(msg, C2DMessage)
        assert (msg.device_id, msg.message_id, msg.body, msg.delivery_count) == ("d1", "c-1", b"cloud", 0)
        with pytest.raises(ValueError):  # the old AMQP word: a programming error, raised before any I/O
            await t.settle(msg.lock_token, "accept")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            SettleC2D(msg.lock_token, "accept")  # type: ignore[arg-type]
        await asyncio.wait_for(t.request(SettleC2D.of(msg, "abandon"), timeout=STEP), STEP)
        again = await next_event(t)
        assert again.payload.message_id == "c-1"  # released: the hub delivers it again
        await asyncio.wait_for(t.request(SettleC2D.of(again.payload, "reject"), timeout=STEP), STEP)
        hub.device("d1").c2d.append(("c-2", b"next"))  # type: ignore[union-attr]
        third = await next_event(t)
        assert third.payload.message_id == "c-2"  # the rejected one is gone (dead-lettered)
        await asyncio.wait_for(t.request(SettleC2D.of(third.payload), timeout=STEP), STEP)
    finally:
        await t.close()


async def test_desired_patches_arrive_typed(hub: Hub, front: AmqpFront) -> None:
    t = make(hub, front.port, subscribe=("twin",))
    await asyncio.wait_for(t.connect(), STEP)
    try:
        async with asyncio.timeout(STEP):
            while not hub.watches_desired("d1"):
                await asyncio.sleep(0.01)
        version = hub.update_desired("d1", {"fan": "on"})
        event = await next_event(t)
        assert isinstance(event, Inbound) and event.kind == "twin_desired"
        assert isinstance(event.payload, DesiredPatch)
        assert event.payload.version == version and event.payload.patch["fan"] == "on"
    finally:
        await t.close()


@pytest.mark.parametrize("name", ["$.mid", "$.ct", ""])
async def test_reserved_property_names_are_refused_before_sending(hub: Hub, front: AmqpFront, name: str) -> None:
    t = make(hub, front.port)
    await asyncio.wait_for(t.connect(), STEP)
    try:
        with pytest.raises(IoTHubError) as info:
            await asyncio.wait_for(t.send(Message("m", "d1", b"x", {name: "override"})), STEP)
        assert info.value.name == "ArgumentInvalid"
        await asyncio.wait_for(t.send(Message("ok", "d1", b"x", {"mid": "fine"})), STEP)
        assert hub.received_ids("d1") == ["ok"]
    finally:
        await t.close()


async def test_the_handler_rides_out_a_half_open_link(hub: Hub, front: AmqpFront) -> None:
    """Through the shared handler: the frozen link is dropped, a new one made, the held send delivered."""
    from gateway.handler import Handler
    from gateway.policy import Backoff, Policy, PolicyConfig

    quick = Backoff(initial=0.02, multiplier=2.0, cap=0.1, jitter=0.0, max_attempts=0, max_elapsed=0.0)
    policy = Policy(PolicyConfig(retry=quick, reconnect=quick))
    async with TcpProxy("127.0.0.1", front.port) as proxy:
        t = make(hub, proxy.port, idle_timeout=1.5, send_timeout=60.0)  # only the idle timer may find it
        async with Handler(t, policy=policy, identity="d1") as handler:
            await handler.wait_connected(STEP)
            await asyncio.wait_for(handler.send(Message("before", "d1", b"x"), timeout=STEP), STEP)
            proxy.freeze()
            receipt = await asyncio.wait_for(handler.send(Message("across", "d1", b"x"), timeout=STEP * 3), STEP * 3)
            assert receipt.id == "across"
        assert proxy.accepted == 2  # one reconnect, through the same proxy
    assert hub.received_ids("d1")[-1] == "across"
