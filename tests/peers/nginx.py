"""A private nginx reverse proxy on a free loopback port, in front of an upstream the test names.

Never the system service: each proxy is one foreground process (``daemon off; master_process off;``)
with its own config, prefix, pid file, logs and temp directories under the test's tmp dir, stopped by
its PID at teardown. Deliberately small limits make nginx's own answers easy to provoke:
``client_max_body_size`` (413 from the proxy) and ``proxy_read_timeout`` (504 from the proxy).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.peers import missing_peer

NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")

_CONFIG = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size {max_body};
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout 2s;
            proxy_read_timeout {read_timeout};
            proxy_send_timeout 5s;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return next((p for p in NGINX_CANDIDATES if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class NginxProxy:
    port: int
    upstream: int
    directory: pathlib.Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # by PID: only this process
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_nginx(directory: pathlib.Path, upstream: int, *, max_body: str = "1k", read_timeout: str = "1s",
                ready_timeout: float = 10.0) -> NginxProxy:
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed (apt-get install nginx-light)")
    directory.mkdir(parents=True, exist_ok=True)
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / sub).mkdir(exist_ok=True)
    last_error = ""
    for _ in range(5):  # a port picked free can be taken before nginx binds it: pick again
        port = free_port()
        conf = directory / "nginx.conf"
        conf.write_text(_CONFIG.format(dir=directory, port=port, upstream=upstream, max_body=max_body,
                                       read_timeout=read_timeout))
        stderr_path = directory / "stderr.log"
        with stderr_path.open("wb") as stderr:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [binary, "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")],
                stdout=subprocess.DEVNULL, stderr=stderr,
            )
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            with socket.socket() as sock:
                sock.settimeout(0.2)
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return NginxProxy(port, upstream, directory, proc)
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
        logs = [stderr_path, directory / "error.log"]
        last_error = "".join(p.read_text(errors="replace") for p in logs if p.exists())
    raise RuntimeError(f"nginx did not start: {last_error}")


@pytest.fixture
def nginx_proxy(tmp_path: pathlib.Path) -> Iterator[Callable[..., NginxProxy]]:
    """A factory: ``nginx_proxy(upstream_port, max_body="1k", read_timeout="1s") -> NginxProxy``.

    Skips when nginx is missing, except under CI (``CI=true``), where a missing peer is a failure.
    """
    if nginx_binary() is None:
        missing_peer("nginx is not installed (apt-get install nginx-light)")
    started: list[NginxProxy] = []

    def factory(upstream: int, **kwargs: str) -> NginxProxy:
        proxy = start_nginx(tmp_path / f"nginx{len(started)}", upstream, **kwargs)  # type: ignore[arg-type]
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:
        proxy.stop()
