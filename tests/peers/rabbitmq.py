"""A private RabbitMQ node (AMQP 1.0 via its bundled ``rabbitmq_amqp1_0`` plugin) for the whole session.

Never the system service: its own HOME (so no real ``.erlang.cookie`` is touched), node name, ports,
config and enabled-plugins file, everything on 127.0.0.1. It takes 10-15 s to boot, so one node
serves the session; a test that kills it (``RabbitNode.kill``) gets it restarted for the next user.
Stopped by PID at the end, together with the epmd it daemonized. Tests using it are marked
``@pytest.mark.rabbitmq`` so they can be deselected locally (``-m "not rabbitmq"``).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.peers import missing_peer

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
BOOT_TIMEOUT = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _pids_with_env(key: str, value: str) -> list[int]:
    """PIDs of our own processes whose environment holds ``key=value`` (epmd daemonizes away from us)."""
    needle = f"{key}={value}".encode()
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


@dataclass
class RabbitNode:
    """One private broker. ``port`` speaks AMQP 1.0 (and 0-9-1); user ``guest``/``guest``."""

    root: pathlib.Path
    port: int
    dist_port: int
    epmd_port: int
    node_name: str
    user: str = "guest"
    password: str = "guest"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.root),
            RABBITMQ_NODENAME=self.node_name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_MNESIA_BASE=str(self.root / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.root / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.root / "rabbitmq"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def start(self) -> None:
        (self.root / "enabled_plugins").write_text("[rabbitmq_amqp1_0].\n")
        (self.root / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        log = (self.root / "server.out").open("ab")
        self.proc = subprocess.Popen([SERVER], env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited with {self.proc.returncode}; see {self.root}/server.out")
            if _accepts(self.port):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"rabbitmq-server did not listen on {self.port} within {BOOT_TIMEOUT:.0f}s")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the broker (its process group, which we created): a crash as clients see it."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()
        for pid in _pids_with_env("ERL_EPMD_PORT", str(self.epmd_port)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def rabbitmq_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    if not os.path.exists(SERVER) or (shutil.which("erl") is None and not os.path.exists("/usr/lib/erlang")):
        missing_peer(f"rabbitmq-server is not installed ({SERVER})")
    root = tmp_path_factory.mktemp("rabbitmq")
    node = RabbitNode(root, _free_port(), _free_port(), _free_port(), f"gwtest-{uuid.uuid4().hex[:8]}@localhost")
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def rabbitmq(rabbitmq_node: RabbitNode) -> RabbitNode:
    """The session's node, restarted first if an earlier test killed it."""
    if not rabbitmq_node.alive:
        rabbitmq_node.start()
    return rabbitmq_node
