"""QoS 1 telemetry to one local mosquitto: raw paho against our adapter, in the same run.

A private mosquitto (its own config and password file, a free 127.0.0.1 port) is started and stopped by
PID. Each bench connects its own client (MQTT 3.1.1 or 5, the same ``max_inflight``: paho's in-flight
window, default 20), publishes ``--messages`` QoS 1 messages of ``--payload`` bytes to
``devices/dev1/messages/events/$.mid=<n>`` (the same topic bytes on every side) and stops the clock when
the last PUBACK is in. Every message is delivered at QoS 1 with its PUBACK received on every side:

- paho-awaited (the baseline of the target): raw paho driven from the event loop exactly as the adapter
  drives it (add_reader / add_writer, a loop_misc task), plus the least an awaiting caller needs:
  ``--window`` sender coroutines (default 100), each publishing one message and awaiting a Future that
  ``on_publish`` settles from the PUBACK (failed on a failure reason code), then taking the next number;
- adapter: the same ``--window`` sender coroutines, each awaiting ``MqttTransport.send(Message(...))``
  (which also builds the topic from the Message, keeps a send deadline and translates failures);
- paho-bare (reference): the same raw paho, ``publish()`` for all messages in one loop (paho queues
  what exceeds its in-flight window) and ``on_publish`` counted: no per-message waiting at all;
- paho-thread (reference): raw paho with its own network thread (``loop_start``), as most paho code runs;
- adapter-gather (reference): ``asyncio.gather`` over ``send()`` for all messages at once, i.e. one Task
  per message, all alive together (the previous version of this bench).

Rounds run the benches one after the other, ``--rounds`` times; reported: the median msg/s, the median
CPU time per message of this process (steadier than wall time on a loaded machine: mosquitto's CPU is
not in it), and adapter / paho-awaited as the ratio of medians and the median of per-round ratios.
Target: adapter / paho-awaited >= 0.9.

Run: ``python bench/mqtt.py [--protocol 5]`` (about 40 s; needs the ``mosquitto`` binary).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The repository root, not bench/ (bench/http.py would shadow the standard library's http module).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from adapters.mqtt.transport import MqttTransport
from gateway.transport import Message

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


@dataclass(frozen=True)
class Result:
    rate: float  #: messages per second, wall clock
    cpu: float  #: CPU seconds per message of this process (all its threads), steadier than wall time


def _start() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _result(n: int, start: tuple[float, float]) -> Result:
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    return Result(n / wall, cpu / n)


def _client(protocol: int, inflight: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev1", protocol=MQTTProtocolVersion(protocol),
                         reconnect_on_failure=False)
    client.username_pw_set(USER, PASSWORD)
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)
    return client


def _topic(n: int) -> str:
    """The adapter's topic for ``Message(str(n), "dev1", ...)``, byte for byte."""
    return f"devices/dev1/messages/events/$.mid={n}"


class _LoopDriven:
    """A raw paho client on the event loop, driven exactly as the adapter drives its own (add_reader /
    add_writer, a loop_misc task, the same hop onto the loop thread), with nothing else added."""

    def __init__(self, protocol: int, inflight: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = client = _client(protocol, inflight)
        self.connected: asyncio.Future[None] = self.loop.create_future()
        self.misc: list[asyncio.Task[None]] = []
        self.loop_thread = threading.get_ident()
        client.on_socket_open = self._on_open
        client.on_socket_close = self._on_close
        client.on_socket_register_write = lambda c, u, s: self._in_loop(self.loop.add_writer, s, c.loop_write)
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = lambda c, u, f, rc, p: self.connected.set_result(None)

    def _in_loop(self, fn: Callable[..., object], *args: Any) -> None:  # the adapter's hop
        if threading.get_ident() == self.loop_thread:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    async def _misc_loop(self) -> None:
        while self.client.loop_misc() == mqtt.MQTT_ERR_SUCCESS:
            await asyncio.sleep(1)

    def _on_open(self, c: Any, u: Any, sock: Any) -> None:
        self._in_loop(self.loop.add_reader, sock, c.loop_read)
        self._in_loop(lambda: self.misc.append(self.loop.create_task(self._misc_loop())))

    def _on_close(self, c: Any, u: Any, sock: Any) -> None:
        self.loop.remove_reader(sock)
        for task in self.misc:
            task.cancel()

    def _on_unregister_write(self, c: Any, u: Any, sock: Any) -> None:
        self.loop.remove_writer(sock)

    async def connect(self, port: int) -> None:
        await self.loop.run_in_executor(None, self.client.connect, "127.0.0.1", port, 60)
        await asyncio.wait_for(self.connected, 10)

    async def disconnect(self) -> None:
        self.client.disconnect()
        await asyncio.sleep(0.05)


async def raw_bare(port: int, n: int, payload: bytes, protocol: int, inflight: int, window: int) -> Result:
    """paho's bare capacity: publish all ``n`` in one loop (paho queues what exceeds ``inflight``) and
    count ``on_publish``; nobody waits for any one message. ``window`` is not used."""
    raw = _LoopDriven(protocol, inflight)
    done: asyncio.Future[None] = raw.loop.create_future()
    acked = 0

    def on_publish(c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        nonlocal acked
        acked += 1
        if acked == n and not done.done():
            done.set_result(None)

    raw.client.on_publish = on_publish
    await raw.connect(port)
    start = _start()
    for i in range(n):
        raw.client.publish(_topic(i), payload, qos=1)
    await asyncio.wait_for(done, 120)
    result = _result(n, start)
    await raw.disconnect()
    return result


async def raw_awaited(port: int, n: int, payload: bytes, protocol: int, inflight: int, window: int) -> Result:
    """paho with the least an awaiting caller needs: ``window`` sender coroutines, each publishing one
    message, parking on a Future keyed by its mid and resuming when ``on_publish`` (the PUBACK) settles
    it, failed if the PUBACK carries a failure reason code. The same senders drive the adapter."""
    raw = _LoopDriven(protocol, inflight)
    client, loop = raw.client, raw.loop
    pending: dict[int, asyncio.Future[None]] = {}

    def on_publish(c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        future = pending.pop(mid, None)
        if future is not None and not future.done():
            if rc.is_failure:
                future.set_exception(RuntimeError(f"PUBACK {rc}"))
            else:
                future.set_result(None)

    async def publish(i: int) -> None:
        info = client.publish(_topic(i), payload, qos=1)
        if info.rc:
            raise RuntimeError(f"publish: {info.rc}")
        future = loop.create_future()
        pending[info.mid] = future
        await future

    client.on_publish = on_publish
    await raw.connect(port)
    result = await _senders(n, window, publish)
    await raw.disconnect()
    return result


async def _senders(n: int, window: int, send: Callable[[int], Awaitable[None]]) -> Result:
    """``window`` long-lived sender coroutines share messages 0..n-1, each awaiting one send at a time;
    timed until the last send returned (every PUBACK in)."""
    numbers = iter(range(n))
    sent = 0

    async def sender() -> None:
        nonlocal sent
        for i in numbers:
            await send(i)
            sent += 1

    start = _start()
    await asyncio.wait_for(asyncio.gather(*(sender() for _ in range(window))), 120)
    result = _result(n, start)
    if sent != n:
        raise RuntimeError(f"only {sent} of {n} sends returned")
    return result


def raw_thread(port: int, n: int, payload: bytes, protocol: int, inflight: int) -> Result:
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
    start = _start()
    for i in range(n):
        client.publish(_topic(i), payload, qos=1)
    if not done.wait(120):
        raise RuntimeError(f"paho (thread): only {acked} of {n} PUBACKs")
    result = _result(n, start)
    client.disconnect()
    client.loop_stop()
    return result


async def _transport(port: int, protocol: int, inflight: int) -> MqttTransport:
    transport = MqttTransport(f"HostName={HUB};DeviceId=dev1", host="127.0.0.1", port=port, ssl=None,
                              protocol=protocol, sas_token=PASSWORD, subscribe=(), max_inflight=inflight,
                              send_timeout=120)
    await asyncio.wait_for(transport.connect(), 10)
    return transport


async def adapter(port: int, n: int, payload: bytes, protocol: int, inflight: int, window: int) -> Result:
    """``MqttTransport.send(Message(...))`` from the same ``window`` sender coroutines as paho-awaited."""
    transport = await _transport(port, protocol, inflight)
    try:
        result = await _senders(n, window, lambda i: transport.send(Message(str(i), "dev1", payload)))
    finally:
        await transport.close()
    return result


async def adapter_gather(port: int, n: int, payload: bytes, protocol: int, inflight: int, window: int) -> Result:
    """``MqttTransport.send()`` for all ``n`` messages at once under ``asyncio.gather`` (``n`` Tasks)."""
    transport = await _transport(port, protocol, inflight)
    try:
        start = _start()
        await asyncio.gather(*(transport.send(Message(str(i), "dev1", payload)) for i in range(n)))
        result = _result(n, start)
    finally:
        await transport.close()
    return result


BENCHES: dict[str, Callable[[int, int, bytes, int, int, int], Any]] = {
    "paho-bare": raw_bare,
    "paho-thread": lambda *a: raw_thread(*a[:5]),
    "paho-awaited": raw_awaited,
    "adapter": adapter,
    "adapter-gather": adapter_gather,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--payload", type=int, default=256, help="bytes per message")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--protocol", type=int, choices=(4, 5), default=4, help="4: MQTT 3.1.1, 5: MQTT 5")
    parser.add_argument("--inflight", type=int, default=20, help="QoS 1 messages in flight (paho's default 20)")
    parser.add_argument("--window", type=int, default=100, help="concurrent senders (paho-awaited, adapter)")
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of: " + ", ".join(BENCHES))
    args = parser.parse_args()
    names = [name for name in args.only.split(",") if name]
    unknown = set(names) - set(BENCHES)
    if unknown:
        parser.error(f"unknown bench(es): {', '.join(sorted(unknown))}")
    payload = os.urandom(args.payload)
    runs: dict[str, list[Result]] = {name: [] for name in names}
    with mosquitto() as port:
        for _ in range(args.rounds):
            for name in names:
                result = BENCHES[name](port, args.messages, payload, args.protocol, args.inflight, args.window)
                runs[name].append(asyncio.run(result) if asyncio.iscoroutine(result) else result)
    rate = {name: statistics.median(r.rate for r in results) for name, results in runs.items()}
    cpu = {name: statistics.median(r.cpu for r in results) for name, results in runs.items()}
    version = "3.1.1" if args.protocol == 4 else "5"
    print(f"QoS 1 telemetry, MQTT {version}, {args.messages} x {args.payload} B, max_inflight {args.inflight}, "
          f"window {args.window}, local mosquitto, median of {args.rounds} interleaved rounds")
    for name, results in runs.items():
        print(f"  {name:14s} {rate[name]:8,.0f} msg/s  {cpu[name] * 1e6:5.1f} us CPU/msg   "
              f"(runs: {', '.join(f'{r.rate:,.0f}' for r in results)})")
    for adapter_name, raw_name in (("adapter", "paho-awaited"), ("adapter", "paho-bare"),
                                   ("adapter-gather", "paho-bare")):
        if adapter_name in runs and raw_name in runs:
            paired = statistics.median(a.rate / r.rate for a, r in zip(runs[adapter_name], runs[raw_name],
                                                                        strict=True))
            print(f"  {adapter_name} / {raw_name}: msg/s {rate[adapter_name] / rate[raw_name]:.2f} "
                  f"(per-round pairs {paired:.2f}), CPU/msg {cpu[raw_name] / cpu[adapter_name]:.2f}")
    print("  target: adapter / paho-awaited >= 0.9")


if __name__ == "__main__":
    main()
