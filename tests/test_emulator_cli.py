"""`iothub-gateway emulator` as a standalone process: TLS on every front, SAS auth, scripted faults."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import socket
import ssl
import subprocess
import sys

import pytest

from adapters.http.transport import HttpTransport
from gateway.errors import ThrottledError
from gateway.transport import Message
from tests.peers.tls import TlsFiles

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _start(tmp_path: pathlib.Path, tls: TlsFiles) -> tuple[subprocess.Popen[str], dict[str, str]]:
    faults = tmp_path / "faults.toml"
    faults.write_text('[[faults]]\noperation = "telemetry"\ncode = 429001\ndevice = "d1"\ntimes = 2\n'
                      'retry_after = 3\ntransport = "http"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "emulator", "--device", "d1", "--faults", str(faults),
         "--tls-cert", str(tls.cert_pem), "--tls-key", str(tls.key_pem)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    assert proc.stdout is not None
    lines: dict[str, str] = {}
    for line in proc.stdout:
        key, _, value = line.strip().partition(": ")
        lines[key] = value
        if key == "faults":
            break
    return proc, lines


def _tls_handshake(url: str, ca: pathlib.Path) -> str:
    host, port = url.split("://")[1].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=host) as s:
        return s.version() or ""


async def test_standalone_emulator_serves_tls_and_scripted_faults(tmp_path: pathlib.Path, tls_files: TlsFiles) -> None:
    proc, lines = _start(tmp_path, tls_files)
    try:
        assert lines["http"].startswith("https://127.0.0.1:")
        assert lines["mqtt"].startswith("mqtts://") and lines["amqp"].startswith("amqps://")
        for proto in ("mqtt", "amqp"):  # a real TLS handshake, verified against the test CA
            assert (await asyncio.to_thread(_tls_handshake, lines[proto], tls_files.ca_pem)).startswith("TLS")
        transport = HttpTransport(lines["device d1"], host="127.0.0.1", port=int(lines["http"].rsplit(":", 1)[1]),
                                  ssl=tls_files.client_context(),
                                  timeout=10)
        await transport.connect()
        try:
            for _ in range(2):
                with pytest.raises(ThrottledError) as info:
                    await transport.send(Message("m1", "d1", b"{}"))
                assert info.value.code == 429001 and info.value.retry_after == 3
            await transport.send(Message("m1", "d1", b"{}"))  # the plan said: twice, then succeed
        finally:
            await transport.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_bad_fault_file_is_one_clear_line(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[faults]]\noperation = "telemetry"\ncode = 12\n')
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "emulator", "--faults", str(bad)],
                         check=False, capture_output=True, text=True, cwd=ROOT, timeout=30, env={**os.environ})
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "fault 1" in out.stderr
