"""normalize(): non-protocol failures, including real exceptions from the real libraries."""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import subprocess
import sys

import pytest

from gateway import normalize
from gateway.errors import ConnectionLostError, FatalError, OperationTimeoutError, ServerError, make_error


@pytest.mark.parametrize(
    ("exc", "name", "retryable"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "ConnectionRefused", True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "DeviceConnectionClosedRemotely", True),
        (BrokenPipeError(errno.EPIPE, "pipe"), "DeviceConnectionClosedRemotely", True),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "NameResolutionFailed", True),
        (OSError(errno.ENETUNREACH, "unreachable"), "NetworkUnreachable", True),
        (TimeoutError(), "OperationTimedOut", True),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), "TlsVerificationFailed", False),
        (ssl.SSLError(1, "wrong version number"), "TlsHandshakeFailed", True),
        (EOFError(), "DeviceConnectionClosedRemotely", True),
        (RuntimeError("???"), "UnclassifiedTransportError", True),
    ],
)
def test_builtin_failures(exc: BaseException, name: str, retryable: bool) -> None:
    err = normalize(exc)
    assert err.name == name
    assert err.retryable is retryable
    assert err.__cause__ is exc
    assert err.transport == "network"
    assert err.exact is False


def test_tls_verification_wrapped_in_another_error_is_still_found() -> None:
    try:
        try:
            raise ssl.SSLCertVerificationError(1, "certificate verify failed")
        except ssl.SSLError as inner:
            raise ConnectionError("handshake") from inner
    except ConnectionError as outer:
        err = normalize(outer)
    assert isinstance(err, FatalError) and err.name == "TlsVerificationFailed"


def test_an_iothub_error_passes_through() -> None:
    err = make_error(429001, transport="http")
    assert normalize(err) is err


async def test_real_refused_socket_and_real_timeout() -> None:
    refused: OSError | None = None
    for _ in range(5):  # a port freed just now is refused, unless another process took it meanwhile
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            refused = exc
            break
        writer.close()
    assert refused is not None
    assert isinstance(normalize(refused), ConnectionLostError)
    assert normalize(refused).name == "ConnectionRefused"
    with pytest.raises(TimeoutError) as info:
        await asyncio.wait_for(asyncio.Event().wait(), 0.01)
    assert isinstance(normalize(info.value), OperationTimeoutError)


async def test_real_aiohttp_exceptions() -> None:
    import aiohttp
    from aiohttp import web

    async def drop(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    app = web.Application()
    app.router.add_get("/drop", drop)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ServerDisconnectedError) as info:
                await session.get(f"http://127.0.0.1:{port}/drop")
            err = normalize(info.value)
            assert err.name == "DeviceConnectionClosedRemotely" and err.retryable
    finally:
        await runner.cleanup()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorError) as refused:
            await session.get(f"http://127.0.0.1:{port}/gone")
    assert normalize(refused.value).name == "ConnectionRefused"


def test_unknown_library_error_is_a_bounded_retry() -> None:
    assert isinstance(normalize(ValueError("x")), ServerError)


def test_import_gateway_pulls_in_no_transport_library() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys, gateway; print(sorted(m for m in sys.modules if m.split('.')[0] "
         "in {'aiohttp', 'paho', 'proton'}))"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "[]"
