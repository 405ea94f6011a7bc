"""A private mosquitto broker per test: its own config, password file and free loopback port.

Never the system service. ``start_mosquitto(users=..., extra=...)`` returns a :class:`Mosquitto` that
can be killed (SIGKILL) and restarted on the same port mid-test; every broker a test started is stopped
by PID when the test ends. Without the ``mosquitto`` binary the test is skipped, unless ``CI=true``:
then it fails, so CI can never pass by skipping.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from adapters.mqtt.codec import ConnAck, Connect, Decoder, SubAck, Subscribe, encode
from tests.peers import missing_peer

#: The hub name the IoT Hub user names carry when talking to mosquitto.
HUB = "mosquitto-hub.azure-devices.net"
API = "2021-04-12"


def iothub_username(device_id: str, hub: str = HUB) -> str:
    return f"{hub}/{device_id}/?api-version={API}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require(binary: str) -> str:
    """The binary's path; skip the test if missing, fail it when running in CI."""
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None)
    if path is None:
        missing_peer(f"{binary} is not installed (apt-get install mosquitto)")
    return path


@dataclass
class Mosquitto:
    """One private broker. ``port`` stays the same across :meth:`restart`."""

    directory: Path
    port: int
    users: dict[str, str]
    extra: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def conf(self) -> Path:
        return self.directory / "mosquitto.conf"

    def write_config(self) -> None:
        passwd = self.directory / "passwd"
        passwd.write_text("")
        for user, password in self.users.items():
            subprocess.run([require("mosquitto_passwd"), "-b", str(passwd), user, password], check=True,
                           capture_output=True, timeout=10)
        lines = [
            f"listener {self.port} {self.host}",
            "persistence false",
            "user root" if os.geteuid() == 0 else "",
            f"log_dest file {self.directory / 'mosquitto.log'}",
            "log_type all",
            f"password_file {passwd}",
            "allow_anonymous false",
            *self.extra,
        ]
        self.conf.write_text("\n".join(line for line in lines if line) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = subprocess.Popen([require("mosquitto"), "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err}\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without a goodbye, as in a crash."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def restart(self) -> None:
        self.kill()
        self.start()

    def _signal(self, sig: int) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        path = self.directory / "mosquitto.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


StartMosquitto = Callable[..., Mosquitto]


@pytest.fixture
def start_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartMosquitto]:
    """Factory: ``start_mosquitto(users={"name": "password"}, extra=["max_packet_size 200"])``."""
    started: list[Mosquitto] = []

    def start(users: dict[str, str] | None = None, extra: list[str] | None = None) -> Mosquitto:
        require("mosquitto")
        broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"), _free_port(), dict(users or {}), list(extra or []))
        broker.write_config()
        started.append(broker)
        broker.start()
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def mosquitto(start_mosquitto: StartMosquitto) -> Mosquitto:
    """A broker that knows devices ``dev1`` and ``dev2`` by their IoT Hub user names (password ``pw-<id>``)."""
    return start_mosquitto(users={iothub_username(d): f"pw-{d}" for d in ("dev1", "dev2")})


class RawClient:
    """A bare MQTT client on :mod:`adapters.mqtt.codec` over asyncio streams: watches a broker or pokes
    the emulator's front with exact packets. Every wait is bounded."""

    def __init__(self, level: int = 4) -> None:
        self.level = level
        self.decoder = Decoder(level)
        self.reader: Any = None
        self.writer: Any = None
        self.packets: list[Any] = []
        self._ids = 0

    async def open(self, host: str, port: int, ssl: Any = None) -> None:
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ssl), 5)

    def send(self, packet: Any) -> None:
        self.writer.write(encode(packet, self.level))

    async def connect(self, host: str, port: int, client_id: str, username: str | None, password: str | None,
                      ssl: Any = None) -> Any:
        await self.open(host, port, ssl)
        self.send(Connect(client_id, self.level, username, password.encode() if password is not None else None))
        return await self.expect(ConnAck)

    async def subscribe(self, topic: str, qos: int = 1) -> Any:
        self.send(Subscribe(self.next_id(), [(topic, qos)]))
        return await self.expect(SubAck)

    def next_id(self) -> int:
        self._ids = self._ids % 0xFFFF + 1
        return self._ids

    async def expect(self, kind: type, timeout: float = 5.0) -> Any:
        """The next packet of ``kind`` (others are kept in ``packets``); None if the socket closed."""
        async with asyncio.timeout(timeout):
            while True:
                for i, packet in enumerate(self.packets):
                    if isinstance(packet, kind):
                        return self.packets.pop(i)
                data = await self.reader.read(65536)
                if not data:
                    return None
                self.packets.extend(self.decoder.feed(data))

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the peer closed the socket (packets before that are kept)."""
        async with asyncio.timeout(timeout):
            while True:
                data = await self.reader.read(65536)
                if not data:
                    return True
                self.packets.extend(self.decoder.feed(data))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
