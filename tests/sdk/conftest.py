"""Azure's own SDKs against ``iothub-gateway emulator``: the SDK venv, the emulator, and a runner.

The SDKs take no port: they dial IoT Hub's own (8883 MQTT, 443 HTTPS and WebSockets, 5671 AMQP) at
the connection string's host. So the emulator listens on those ports on an address of its own in
127/8 (nothing else on the machine uses it) with a test-CA certificate for that address, which is
also the connection strings' ``HostName``.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme

from tests.peers import missing_peer

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
VENV = pathlib.Path(os.environ.get("IOTHUB_SDK_VENV", HERE / ".venv"))
HOST = "127.77.11.1"  #: the emulated hub's address and host name
PORTS = {"http": 443, "mqtt": 8883, "amqp": 5671}
DEVICES = ("sdk-mqtt", "sdk-ws", "sdk-auth", "sdk-throttle", "sdk-svc", "sdk-eh")
RUN_TIMEOUT = 120.0  #: bound on one SDK scenario (they finish in seconds; a hang must not stall CI)


@dataclass
class EmulatedHub:
    ca: pathlib.Path
    admin: str
    service: str
    devices: dict[str, str] = field(default_factory=dict)  #: device id -> connection string

    @property
    def event_hub(self) -> str:
        """The built-in Event Hub-compatible endpoint's connection string, as the portal shows it."""
        key = self.service.split("SharedAccessKey=", 1)[1]
        return (f"Endpoint=sb://{HOST}/;SharedAccessKeyName=iothubowner;SharedAccessKey={key};"
                f"EntityPath={HOST.split('.', maxsplit=1)[0]}")

    def admin_call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.admin + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:  # loopback admin API
            text = response.read()
        return json.loads(text) if text else None


@pytest.fixture(scope="session")
def sdk_python() -> pathlib.Path:
    """The SDK venv's interpreter, built by scripts/sdk-venv (scripts/test runs it before pytest)."""
    python = VENV / "bin" / "python"
    if not python.exists() and "IOTHUB_SDK_VENV" not in os.environ:
        try:
            subprocess.run([str(ROOT / "scripts" / "sdk-venv"), str(VENV)], check=True, timeout=600,
                           capture_output=True)
        except (OSError, subprocess.SubprocessError) as exc:
            missing_peer(f"the Azure SDK venv could not be built (scripts/sdk-venv): {exc}")
    if not python.exists():
        missing_peer(f"no Azure SDK venv at {VENV} (scripts/sdk-venv builds it)")
    probe = subprocess.run([str(python), "-c", "import azure.iot.device, azure.iot.hub, azure.eventhub"],
                           check=False, capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        missing_peer(f"the Azure SDKs do not import in {VENV}: {probe.stderr.strip()[-300:]}")
    return python


def _bindable() -> str | None:
    for port in PORTS.values():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the fronts bind: TIME_WAIT is no obstacle
            try:
                s.bind((HOST, port))
            except PermissionError:
                return f"cannot listen on {HOST}:{port}: IoT Hub's ports (443) need root or CAP_NET_BIND_SERVICE"
            except OSError as exc:
                return f"cannot listen on {HOST}:{port} ({exc.strerror})"
    return None


@pytest.fixture(scope="session")
def emulated_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedHub]:
    """``iothub-gateway emulator`` as a user runs it: TLS on IoT Hub's ports, devices, the admin API."""
    reason = _bindable()
    if reason is not None:
        missing_peer(reason)
    d = tmp_path_factory.mktemp("sdk-hub")
    ca = trustme.CA()
    cert = ca.issue_cert(HOST)
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    (d / "cert.pem").write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    args = [sys.executable, "-m", "gateway.cli", "emulator", "--host", HOST, "--hub-name", HOST,
            "--http-port", str(PORTS["http"]), "--mqtt-port", str(PORTS["mqtt"]), "--amqp-port", str(PORTS["amqp"]),
            "--tls-cert", str(d / "cert.pem"), "--tls-key", str(d / "key.pem")]
    for device in DEVICES:
        args += ["--device", device]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or ()], daemon=True).start()
    hub = EmulatedHub(d / "ca.pem", "", "")
    try:
        while True:
            try:
                line = lines.get(timeout=30).strip()
            except queue.Empty:
                pytest.fail("the emulator printed no 'faults:' line in 30 s")
            if line.startswith("admin: "):
                hub.admin = line.split(" ", 1)[1]
            elif line.startswith("service: "):
                hub.service = line.split(" ", 1)[1]
            elif line.startswith("device "):
                name, cs = line[len("device "):].split(": ", 1)
                hub.devices[name] = cs
            elif line.startswith("faults:"):
                break
            elif proc.poll() is not None:
                pytest.fail(f"the emulator exited: {line}")
        yield hub
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Scenario:
    """One scenario of tests/sdk/scenarios.py in a subprocess of the SDK venv, read line by line."""

    def __init__(self, python: pathlib.Path, name: str, args: dict[str, Any]) -> None:
        self.proc = subprocess.Popen([str(python), str(HERE / "scenarios.py"), name, json.dumps(args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr or ()), daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout or ():
            if line.startswith("{"):
                self.events.put(json.loads(line))
        self.events.put({"eof": True})

    def next(self, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            pytest.fail(f"the SDK scenario said nothing in {timeout} s; stderr: {''.join(self.stderr)[-2000:]}")
        if "eof" in event:
            self.proc.wait(10)
            pytest.fail(f"the SDK scenario ended early (exit {self.proc.returncode}); "
                        f"stderr: {''.join(self.stderr)[-2000:]}")
        return event

    def until(self, key: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
        while True:
            event = self.next(timeout)
            if key in event:
                return event

    def result(self, timeout: float = RUN_TIMEOUT) -> Any:
        return self.until("result", timeout)["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def run_sdk(sdk_python: pathlib.Path) -> Iterator[Any]:
    """``run_sdk(name, args)`` starts a scenario; all are ended when the test ends."""
    started: list[Scenario] = []

    def start(name: str, args: dict[str, Any]) -> Scenario:
        scenario = Scenario(sdk_python, name, args)
        started.append(scenario)
        return scenario

    yield start
    for scenario in started:
        scenario.close()
