"""QoS 1 telemetry to one local mosquitto: raw paho against our adapter, in the same run.

A private mosquitto (its own config and password file, a free 127.0.0.1 port) is started and stopped by
PID. Each round publishes ``--messages`` QoS 1 messages of ``--payload`` bytes to
``devices/dev1/messages/events/$.mid=<n>`` and stops the clock when the last PUBACK is in:

- paho-asyncio: raw paho driven from the event loop exactly as the adapter drives it (add_reader /
  add_writer, a loop_misc task), counting ``on_publish``: what the adapter would cost with zero overhead;
- paho-thread: raw paho with its own network thread (``loop_start``), the way most paho code runs;
- adapter: ``MqttTransport.send()`` for every message (each awaits its own PUBACK), all in flight at once.

Both paho clients and the adapter use the same ``max_inflight`` (default 20, paho's default). Rounds are
interleaved and the best of ``--rounds`` is reported, with the ratio adapter / raw (target >= 0.9).

Run: ``python bench/mqtt.py`` (a few seconds; needs the ``mosquitto`` binary).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The repository root, not bench/ (bench/http.py would shadow the standard library's http module).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: E402

from adapters.mqtt.transport import MqttTransport  # noqa: E402
from gateway.transport import Message  # noqa: E402

HUB = "bench-hub.azure-devices.net"
USER = f"{HUB}/dev1/?api-version=2021-04-12"
PASSWORD = "bench-password"


@contextmanager
def mosquitto() -> Iterator[int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(binary):
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        passwd = Path(tmp) / "passwd"
        passwd.write_text("")
        subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b", str(passwd), USER,
                        PASSWORD], check=True, capture_output=True)
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text("\n".join([
            f"listener {port} 127.0.0.1", "persistence false", "user root" if os.geteuid() == 0 else "",
            f"password_file {passwd}", "allow_anonymous false", "log_type error", "max_inflight_messages 0",
        ]) + "\n")
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(500):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.01)
            yield port
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)


def _client(protocol: int, inflight: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev1", protocol=MQTTProtocolVersion(protocol),
                         reconnect_on_failure=False)
    client.username_pw_set(USER, PASSWORD)
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)
    return client


def _topic(n: int) -> str:
    return f"devices/dev1/messages/events/%24.mid={n}"


async def raw_asyncio(port: int, n: int, payload: bytes, protocol: int, inflight: int) -> float:
    """paho on the event loop with the adapter's driving, and nothing else."""
    loop = asyncio.get_running_loop()
    client = _client(protocol, inflight)
    connected: asyncio.Future[None] = loop.create_future()
    done: asyncio.Future[None] = loop.create_future()
    acked = 0
    misc: list[asyncio.Task[None]] = []

    async def misc_loop() -> None:
        while client.loop_misc() == mqtt.MQTT_ERR_SUCCESS:
            await asyncio.sleep(1)

    loop_thread = threading.get_ident()

    def in_loop(fn: Callable[..., object], *args: Any) -> None:  # the adapter's hop: direct on the loop thread
        if threading.get_ident() == loop_thread:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    def on_open(c: Any, u: Any, sock: Any) -> None:
        in_loop(loop.add_reader, sock, c.loop_read)
        in_loop(lambda: misc.append(loop.create_task(misc_loop())))

    def on_close(c: Any, u: Any, sock: Any) -> None:
        loop.remove_reader(sock)
        for task in misc:
            task.cancel()

    def on_publish(c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        nonlocal acked
        acked += 1
        if acked == n and not done.done():
            done.set_result(None)

    client.on_socket_open = on_open
    client.on_socket_close = on_close
    client.on_socket_register_write = lambda c, u, s: in_loop(loop.add_writer, s, c.loop_write)
    def on_unregister_write(c: Any, u: Any, sock: Any) -> None:
        loop.remove_writer(sock)

    client.on_socket_unregister_write = on_unregister_write
    client.on_connect = lambda c, u, f, rc, p: connected.set_result(None)
    client.on_publish = on_publish
    await loop.run_in_executor(None, client.connect, "127.0.0.1", port, 60)
    await asyncio.wait_for(connected, 10)
    start = time.perf_counter()
    for i in range(n):
        client.publish(_topic(i), payload, qos=1)
    await asyncio.wait_for(done, 120)
    elapsed = time.perf_counter() - start
    client.disconnect()
    await asyncio.sleep(0.05)
    return n / elapsed


def raw_thread(port: int, n: int, payload: bytes, protocol: int, inflight: int) -> float:
    """paho with its own network thread (loop_start)."""
    client = _client(protocol, inflight)
    connected, done = threading.Event(), threading.Event()
    acked = 0

    def on_publish(c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        nonlocal acked
        acked += 1
        if acked == n:
            done.set()

    client.on_connect = lambda c, u, f, rc, p: connected.set()
    client.on_publish = on_publish
    client.connect("127.0.0.1", port, 60)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError("paho (thread) did not connect")
    start = time.perf_counter()
    for i in range(n):
        client.publish(_topic(i), payload, qos=1)
    if not done.wait(120):
        raise RuntimeError(f"paho (thread): only {acked} of {n} PUBACKs")
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    return n / elapsed


async def adapter(port: int, n: int, payload: bytes, protocol: int, inflight: int) -> float:
    transport = MqttTransport(f"HostName={HUB};DeviceId=dev1", host="127.0.0.1", port=port, tls=False,
                              protocol=protocol, sas_token=PASSWORD, subscribe=(), max_inflight=inflight,
                              send_timeout=120)
    await asyncio.wait_for(transport.connect(), 10)
    try:
        start = time.perf_counter()
        await asyncio.gather(*(transport.send(Message(str(i), "dev1", payload)) for i in range(n)))
        elapsed = time.perf_counter() - start
    finally:
        await transport.close()
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--payload", type=int, default=256, help="bytes per message")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--protocol", type=int, choices=(4, 5), default=4, help="4: MQTT 3.1.1, 5: MQTT 5")
    parser.add_argument("--inflight", type=int, default=20, help="QoS 1 messages in flight (paho's default 20)")
    args = parser.parse_args()
    payload = os.urandom(args.payload)
    runs: dict[str, list[float]] = {"paho-asyncio": [], "paho-thread": [], "adapter": []}
    with mosquitto() as port:
        benches: dict[str, Callable[[], float]] = {
            "paho-asyncio": lambda: asyncio.run(raw_asyncio(port, args.messages, payload, args.protocol,
                                                            args.inflight)),
            "paho-thread": lambda: raw_thread(port, args.messages, payload, args.protocol, args.inflight),
            "adapter": lambda: asyncio.run(adapter(port, args.messages, payload, args.protocol, args.inflight)),
        }
        for _ in range(args.rounds):
            for name, bench in benches.items():
                runs[name].append(bench())
    best = {name: max(values) for name, values in runs.items()}
    version = "3.1.1" if args.protocol == 4 else "5"
    print(f"QoS 1 telemetry, MQTT {version}, {args.messages} x {args.payload} B, max_inflight {args.inflight}, "
          f"local mosquitto, best of {args.rounds}")
    for name, rate in best.items():
        print(f"  {name:13s} {rate:10,.0f} msg/s   (runs: {', '.join(f'{v:,.0f}' for v in runs[name])})")
    ratio = best["adapter"] / best["paho-asyncio"]
    print(f"  adapter / paho-asyncio = {ratio:.2f}   adapter / paho-thread = "
          f"{best['adapter'] / best['paho-thread']:.2f}   (target >= 0.9)")


if __name__ == "__main__":
    main()
