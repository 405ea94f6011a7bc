"""The sidecar against its baselines, in one run (issue 12 section 4).

Every server is a child process on 127.0.0.1; the load generator and the raw adapters run in this process:

- the emulator on its own (``iothub-gateway emulator``): HTTP, MQTT and AMQP fronts, an admin API, one
  device per sidecar device and per raw adapter, so a sidecar and a raw adapter talk to the same
  emulator over the same transport;
- sidecars (``iothub-gateway run``) with ``[upstream] kind = "iothub"`` pointed at that emulator
  (plain TCP on loopback), ``rate_limit = 0``, their outbox in a temporary directory;
- a bare aiohttp server with one ``POST /v1/devices/{id}/messages`` handler doing the same JSON work as
  the sidecar's (parse the JSON body, check the message id, collect ``iothub-app-*`` headers, answer 202
  with the same JSON fields and ``Location``) but storing nothing.

Measured:

1. Accepted messages per second (202 answered, the message committed to the outbox first) against the
   bare handler, with ``synchronous = NORMAL`` and ``FULL``, in alternating rounds; the ratio is the
   median of per-round ratios (target >= 0.7 with NORMAL). These sidecars' upstream port has nothing
   listening, so nothing is delivered meanwhile: the figure is the API and the outbox alone.
2. End-to-end delivered per second (first POST until the hub acknowledged all N, as the sidecar counts
   them) against the raw adapter's own rate: ``Transport.send`` from ``--inflight`` concurrent senders
   (the sidecar's ``max_inflight`` per device) over the same transport to the same emulator (target
   >= 0.7), per transport.
3. Round trips per second through the local API: C2D (service side: the emulator's admin API queues it;
   app side: the SSE stream, then ``POST .../complete``) and direct methods (service side: ``InvokeMethod``
   over the emulator's HTTP service API; app side: the SSE stream, then ``POST .../response``), one at a
   time.
4. The sidecar's RSS idle and after the N messages of every transport were delivered (retention on:
   ``delivered_max = --retention-max``), and the outbox file (with its WAL) at its largest and after
   retention ran, against ``--file-limit`` MB.

The machine may be shared: every figure is noisy; prefer the ratios, which are measured in the same run.
Run: ``python bench/sidecar.py [--messages N] [--plot docs/img/bench-sidecar.png]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

# Run as a script, this file's directory comes first on sys.path (bench/http.py would shadow the
# standard library's ``http``): drop that entry and add the project root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import aiohttp

ROOT = _HERE.parent
TRANSPORTS = ("mqtt", "amqp", "http")
URL_LINE = re.compile(r"http://127\.0\.0\.1:(\d+)")
PAYLOAD = json.dumps({"temperature": 21.5, "humidity": 40, "pad": "x" * 150}).encode()
HEADERS = {"Content-Type": "application/json", "iothub-app-site": "bench"}


# -- child processes ------------------------------------------------------------------------------------

def bare_server() -> None:
    """Child process: the bare handler; prints its URL, serves until stdin closes."""
    import uuid

    from aiohttp import web

    message_id = re.compile(r"[\x21-\x7e]{1,128}")

    async def post(request: web.Request) -> web.Response:
        raw = await request.read()
        if request.content_type == "application/json":
            json.loads(raw)
        mid = request.headers.get("iothub-messageid")
        if mid is not None and not message_id.fullmatch(mid):
            return web.json_response({"errorCode": 400004}, status=400)
        props = {k[11:]: v for k, v in request.headers.items() if k.lower().startswith("iothub-app-")}
        ident = mid or uuid.uuid4().hex
        answer = {"id": ident, "device_id": request.match_info["device_id"], "status": "pending",
                  "duplicate": False, "deadline": None, "properties": len(props)}
        return web.json_response(answer, status=202, headers={"Location": f"/v1/messages/{ident}"})

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/devices/{device_id}/messages", post)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(f"bare: http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await runner.cleanup()

    asyncio.run(main())


@dataclass
class Child:
    proc: subprocess.Popen[str]
    url: str = ""
    lines: list[str] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (steadier than wall time on a shared machine)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return float("nan")
        match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        return int(match.group(1)) / 1024 if match else float("nan")


@contextlib.contextmanager
def child(args: list[str], env: dict[str, str] | None = None, *, until: Callable[[str], bool],
          from_stderr: bool = False) -> Iterator[Child]:
    """A child process, started and read until ``until(text so far)`` holds. The sidecar writes its start
    line to stderr (to a file here, so its logs never fill a pipe and stall it); the others to stdout."""
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL if from_stderr else log,
                            stderr=log if from_stderr else subprocess.DEVNULL, text=True,
                            env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline and proc.poll() is None:
            log.seek(0)
            text = log.read()
            if until(text):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{args[:3]}: did not start: {text[-2000:]!r}")
        found = URL_LINE.search(text)
        yield Child(proc, f"http://127.0.0.1:{found.group(1)}" if found else "", text.splitlines())
    finally:
        if proc.poll() is None:
            proc.terminate()  # the sidecar and the emulator shut down on SIGTERM; the bare server too
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def sidecar_child(config: Path, tmp: Path, env: dict[str, str], *, profile: str | None = None
                  ) -> contextlib.AbstractContextManager[Child]:
    """``iothub-gateway run --config``, its state directory in ``tmp``, read until it printed its URL."""
    prefix = ["-m", "cProfile", "-o", profile] if profile else []
    return child([*prefix, "-m", "gateway.cli", "run", "--config", str(config)],
                 {"XDG_STATE_HOME": str(tmp / "state"), **env},
                 until=lambda text: URL_LINE.search(text) is not None, from_stderr=True)


@dataclass
class Emulator:
    ports: dict[str, int]
    admin: str
    service: str
    devices: dict[str, str]


def emulator_info(lines: list[str]) -> Emulator:
    ports: dict[str, int] = {}
    devices: dict[str, str] = {}
    admin = service = ""
    for line in lines:
        key, _, value = line.partition(": ")
        if key in TRANSPORTS:
            ports[key] = int(value.rsplit(":", 1)[1])
        elif key == "admin":
            admin = value.strip()
        elif key == "service":
            service = value.strip()
        elif key.startswith("device "):
            devices[key[7:]] = value.strip()
    return Emulator(ports, admin, service, devices)


def free_port() -> int:
    """A port with nothing listening on it (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sidecar_config(path: Path, *, outbox: Path, ports: dict[str, int], devices: list[tuple[str, str]],
                   synchronous: str = "NORMAL", inflight: int = 8, retention_max: int = 10_000) -> Path:
    lines = [
        "[api]", "port = 0", "rate_limit = 0",
        "[outbox]", f'path = "{outbox}"', "max_messages = 2000000", f'synchronous = "{synchronous}"',
        f"delivered_max = {retention_max}",
        "[delivery]", f"max_inflight = {inflight}", "c2d_poll_interval = 0.1",
        "[logging]", 'level = "WARNING"',
        "[upstream]", 'kind = "iothub"', 'host = "127.0.0.1"', "tls = false",
        "[upstream.ports]", *(f"{t} = {p}" for t, p in ports.items()),
    ]
    for device_id, protocol in devices:
        lines += ["[[devices]]", f'id = "{device_id}"', f'protocol = "{protocol}"',
                  f'connection_string_env = "BENCH_CS_{device_id.replace("-", "_").upper()}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def cs_env(emu: Emulator) -> dict[str, str]:
    return {f"BENCH_CS_{d.replace('-', '_').upper()}": cs for d, cs in emu.devices.items()}


# -- load -------------------------------------------------------------------------------------------------

async def drive(n: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> float:
    """``n`` calls of ``one`` from ``concurrency`` workers; the elapsed seconds."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await one(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


@contextlib.asynccontextmanager
async def session(concurrency: int) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


async def post_messages(s: aiohttp.ClientSession, url: str, devices: list[str], n: int, concurrency: int) -> float:
    async def one(i: int) -> None:
        async with s.post(f"{url}/v1/devices/{devices[i % len(devices)]}/messages", data=PAYLOAD,
                          headers=HEADERS) as resp:
            await resp.read()
            if resp.status != 202:
                raise RuntimeError(f"POST answered {resp.status}: {await resp.text()}")

    return await drive(n, concurrency, one)


BATCH_MESSAGE = {"body": json.loads(PAYLOAD), "properties": {"site": "bench"}}


async def post_batches(s: aiohttp.ClientSession, url: str, device: str, n: int, size: int, concurrency: int) -> float:
    """``n`` messages as ``POST .../messages/batch`` requests of ``size`` (the same body and property as
    :func:`post_messages`, the body given as JSON so the sidecar sends it as application/json)."""
    body = json.dumps({"messages": [BATCH_MESSAGE] * size}).encode()
    tail = n % size
    last = json.dumps({"messages": [BATCH_MESSAGE] * tail}).encode() if tail else body
    count = -(-n // size)

    async def one(i: int) -> None:
        async with s.post(f"{url}/v1/devices/{device}/messages/batch", data=last if i == count - 1 else body,
                          headers={"Content-Type": "application/json"}) as resp:
            await resp.read()
            if resp.status != 202:
                raise RuntimeError(f"batch POST answered {resp.status}: {await resp.text()}")

    return await drive(count, concurrency, one)


async def get_json(s: aiohttp.ClientSession, url: str) -> Any:
    async with s.get(url) as resp:
        return await resp.json()


async def wait_connected(s: aiohttp.ClientSession, url: str, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            data = await get_json(s, f"{url}/v1/devices")
            if all(d["state"] == "connected" for d in data["devices"]):
                return
            await asyncio.sleep(0.1)


async def metric(s: aiohttp.ClientSession, url: str, name: str) -> float:
    async with s.get(f"{url}/metrics") as resp:
        text = await resp.text()
    found = re.search(rf"^{re.escape(name)} ([0-9.eE+-]+)$", text, re.M)
    return float(found.group(1)) if found else float("nan")


class Events:
    """A server-sent event stream read one event at a time."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self, timeout: float = 30.0) -> tuple[str, dict[str, Any]]:
        kind, data = "message", list[str]()
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.resp.content.readline()
                if not raw:
                    raise ConnectionError("the stream ended")
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if data:
                        return kind, json.loads("\n".join(data))
                    continue
                name, _, value = line.partition(":")
                if name == "event":
                    kind = value.strip()
                elif name == "data":
                    data.append(value.removeprefix(" "))


# -- the measurements ---------------------------------------------------------------------------------

async def accept_rounds(args: argparse.Namespace, emu: Emulator, tmp: Path) -> dict[str, Any]:
    """1. Accept into the outbox (NORMAL, FULL) against the bare handler; nothing delivered meanwhile."""
    dead = {t: free_port() for t in TRANSPORTS}
    devices = [(f"sc-{t}", t) for t in TRANSPORTS]
    ids = [d for d, _ in devices]
    started = lambda text: URL_LINE.search(text) is not None  # noqa: E731
    results: dict[str, list[float]] = {"bare": [], "NORMAL": [], "FULL": []}
    cpu: dict[str, list[float]] = {"bare": [], "NORMAL": [], "FULL": []}
    with contextlib.ExitStack() as stack:
        servers: dict[str, Child] = {}
        for sync in ("NORMAL", "FULL"):
            config = sidecar_config(tmp / f"accept-{sync}.toml", outbox=tmp / f"accept-{sync}.sqlite3", ports=dead,
                                    devices=devices, synchronous=sync)
            servers[sync] = stack.enter_context(sidecar_child(config, tmp, cs_env(emu)))
        servers["bare"] = stack.enter_context(child([str(Path(__file__).resolve()), "--bare-server"],
                                                    until=started))
        async with session(args.concurrency) as s:
            for server in servers.values():  # warm-up (imports, caches, the first SQLite pages)
                await post_messages(s, server.url, ids, 300, args.concurrency)
            order = list(servers)
            for r in range(args.rounds):
                for name in order if r % 2 == 0 else order[::-1]:
                    server = servers[name]
                    used = server.cpu_seconds()
                    took = await post_messages(s, server.url, ids, args.requests, args.concurrency)
                    results[name].append(args.requests / took)
                    cpu[name].append((server.cpu_seconds() - used) / args.requests * 1e6)
    return {
        "rate": {k: median(v) for k, v in results.items()},
        "cpu_us": {k: median(v) for k, v in cpu.items()},
        "ratio": {sync: median(a / b for a, b in zip(results[sync], results["bare"], strict=True))
                  for sync in ("NORMAL", "FULL")},
        "rounds": results,
    }


async def raw_rate(transport_name: str, cs: str, port: int, n: int, inflight: int) -> float:
    """The raw adapter's own rate: ``send`` from ``inflight`` senders over one connection."""
    from gateway.transport import Message

    transport: Any
    if transport_name == "mqtt":
        from adapters.mqtt.transport import MqttTransport

        transport = MqttTransport(cs, host="127.0.0.1", port=port, ssl=None)
    elif transport_name == "amqp":
        from adapters.amqp.transport import AmqpTransport

        transport = AmqpTransport.from_connection_string(cs, host="127.0.0.1", port=port, ssl=None)
    else:
        from adapters.http.transport import HttpTransport

        transport = HttpTransport(cs, host="127.0.0.1", port=port, ssl=None)
    device = cs.split("DeviceId=")[1].split(";", maxsplit=1)[0]
    await transport.connect()
    try:
        for i in range(50):  # warm-up
            await transport.send(Message(f"w-{i}", device, PAYLOAD, {"site": "bench"},
                                         content_type="application/json"))
        took = await drive(n, inflight, lambda i: transport.send(
            Message(f"m-{i}", device, PAYLOAD, {"site": "bench"}, content_type="application/json")))
    finally:
        await transport.close()
    return n / took


async def delivered_of(s: aiohttp.ClientSession, url: str, device: str) -> int:
    data = await get_json(s, f"{url}/v1/devices/{device}")
    return int(data["messages"]["delivered"])


async def e2e_rate(s: aiohttp.ClientSession, url: str, device: str, n: int, concurrency: int,
                   sample: Callable[[], None], batch: int = 0) -> tuple[float, float, float | None]:
    """POST ``n`` messages to one device (one per request, or ``batch`` per request): (accepted/s,
    delivered/s from the first POST to the last ack, delivered/s from the last POST's answer to the last
    ack: the pipeline alone, or None when less than a fifth of the messages were still to deliver then)."""
    before = await delivered_of(s, url, device)
    start = time.perf_counter()
    if batch:
        accept = await post_batches(s, url, device, n, batch, max(1, concurrency // 8))
    else:
        accept = await post_messages(s, url, [device], n, concurrency)
    backlog = n - (await delivered_of(s, url, device) - before)
    drain_start = time.perf_counter()
    async with asyncio.timeout(max(120.0, n / 20)):
        while await delivered_of(s, url, device) - before < n:
            sample()
            await asyncio.sleep(0.02)
    end = time.perf_counter()
    drain = backlog / (end - drain_start) if backlog >= n / 5 else None
    return n / accept, n / (end - start), drain


def prefill(path: Path, device: str, n: int) -> None:
    """``n`` pending messages for ``device`` written straight into an outbox file, as an app's POSTs would
    have left them (same properties), in one transaction."""
    from gateway.outbox import Outbox

    store = Outbox(str(path), max_messages=max(n, 1) * 2)
    now = time.time()
    props = {"site": "bench", "$.ct": "application/json", "$.ctime": "2026-01-01T00:00:00.000Z"}
    try:
        with store.transaction():
            for i in range(n):
                store.put(device, PAYLOAD, now=now, properties=props, message_id=f"p-{device}-{i}")
    finally:
        store.close()


async def drain_rate(args: argparse.Namespace, emu: Emulator, tmp: Path, t: str) -> float:
    """Outbox to hub alone: a sidecar started on an outbox already holding N messages for its one device;
    delivered per second from its first delivery until all N are acknowledged (no POST meanwhile)."""
    device = f"dr-{t}"  # its own identity: the end-to-end sidecar stays connected as sc-{t} meanwhile
    outbox = tmp / f"drain-{t}.sqlite3"
    for old in tmp.glob(f"drain-{t}.sqlite3*"):
        old.unlink()
    prefill(outbox, device, args.messages)
    config = sidecar_config(tmp / f"drain-{t}.toml", outbox=outbox, ports=emu.ports, devices=[(device, t)],
                            inflight=args.inflight, retention_max=args.retention_max)
    with sidecar_child(config, tmp, cs_env(emu)) as sidecar:
        async with session(4) as s:
            async with asyncio.timeout(max(120.0, args.messages / 20)):
                first = 0
                while first == 0:
                    first = await delivered_of(s, sidecar.url, device)
                    await asyncio.sleep(0.005)
                start, cpu = time.perf_counter(), sidecar.cpu_seconds()
                while (done := await delivered_of(s, sidecar.url, device)) < args.messages:
                    await asyncio.sleep(0.02)
                took = time.perf_counter() - start
                args.drain_cpu_us = (sidecar.cpu_seconds() - cpu) / (done - first) * 1e6
    return (done - first) / took


async def c2d_round_trips(s: aiohttp.ClientSession, url: str, admin: str, device: str, k: int) -> float:
    async with s.get(f"{url}/v1/devices/{device}/c2d", timeout=aiohttp.ClientTimeout(total=None)) as resp:
        stream = Events(resp)
        await asyncio.sleep(0.2)
        start = time.perf_counter()
        for i in range(k):
            async with s.post(f"{admin}/devices/{device}/c2d", json={"body": f"c-{i}"}) as sent:
                if sent.status != 201:
                    raise RuntimeError(f"admin c2d answered {sent.status}")
            kind, event = await stream.next()
            assert kind == "c2d", kind
            async with s.post(f"{url}/v1/devices/{device}/c2d/{event['lock']}/complete") as done:
                if done.status != 204:
                    raise RuntimeError(f"complete answered {done.status}: {await done.text()}")
        return k / (time.perf_counter() - start)


async def method_round_trips(s: aiohttp.ClientSession, url: str, service: str, port: int, device: str,
                             k: int) -> float:
    from adapters.http.transport import HttpTransport
    from gateway.transport import InvokeMethod

    caller = HttpTransport(service_connection_string=service, host="127.0.0.1", port=port, ssl=None)
    await caller.connect()
    try:
        async with s.get(f"{url}/v1/devices/{device}/methods", timeout=aiohttp.ClientTimeout(total=None)) as resp:
            stream = Events(resp)
            await asyncio.sleep(0.2)

            async def app() -> None:
                for _ in range(k):
                    _kind, event = await stream.next()
                    async with s.post(f"{url}/v1/devices/{device}/methods/{event['rid']}/response",
                                      json={"status": 200, "payload": {"echo": event["payload"]}}) as answered:
                        if answered.status != 204:
                            raise RuntimeError(f"method response answered {answered.status}")

            responder = asyncio.ensure_future(app())
            start = time.perf_counter()
            for i in range(k):
                result = await caller.request(InvokeMethod(device, "ping", {"i": i}, response_timeout=10),
                                              timeout=15)
                if result.status != 200:
                    raise RuntimeError(f"method answered {result.status}")
            took = time.perf_counter() - start
            await responder
            return k / took
    finally:
        await caller.close()


async def end_to_end(args: argparse.Namespace, emu: Emulator, tmp: Path) -> dict[str, Any]:
    """2-4. One sidecar on the live emulator: e2e vs raw per transport, round trips, RSS and file size."""
    devices = [(f"sc-{t}", t) for t in args.transports]
    config = sidecar_config(tmp / "e2e.toml", outbox=tmp / "e2e.sqlite3", ports=emu.ports, devices=devices,
                            inflight=args.inflight, retention_max=args.retention_max)
    out: dict[str, Any] = {"raw": {}, "single": {}, "batched": {}, "drain": {}, "accepted": {},
                           "accepted_batched": {}, "ratio": {}, "c2d": {}, "methods": {}}
    with sidecar_child(config, tmp, cs_env(emu), profile=args.profile) as sidecar:
        async with session(args.concurrency) as s:
            await wait_connected(s, sidecar.url)
            await asyncio.sleep(2.0)
            out["rss_idle"] = sidecar.rss_mb()
            peak = {"rss": out["rss_idle"], "file": 0.0}
            last = [0.0]

            def sample() -> None:
                peak["rss"] = max(peak["rss"], sidecar.rss_mb())
                now = time.monotonic()
                if now - last[0] > 0.5:  # the file size is sampled from disk, not asked of the sidecar
                    last[0] = now
                    size = sum(p.stat().st_size for p in tmp.glob("e2e.sqlite3*") if p.is_file())
                    peak["file"] = max(peak["file"], size / 2**20)

            for t in args.transports:
                for r in range(args.e2e_rounds):
                    order = ["raw", "single", "batched", "drain"]
                    for who in order if r % 2 == 0 else order[::-1]:
                        if who == "raw":
                            rate = await raw_rate(t, emu.devices[f"raw-{t}"], emu.ports[t], args.messages,
                                                  args.inflight)
                        elif who == "drain":
                            rate = await drain_rate(args, emu, tmp, t)
                        else:
                            accepted, rate, _ = await e2e_rate(s, sidecar.url, f"sc-{t}", args.messages,
                                                               args.concurrency, sample,
                                                               batch=args.batch if who == "batched" else 0)
                            out["accepted" if who == "single" else "accepted_batched"].setdefault(t, []).append(
                                accepted)
                        out[who].setdefault(t, []).append(rate)
                for who in ("single", "batched", "drain"):
                    out["ratio"].setdefault(who, {})[t] = median(
                        a / b for a, b in zip(out[who][t], out["raw"][t], strict=True))
            sample()
            out["rss_loaded"] = peak["rss"]
            out["file_peak_mb"] = peak["file"]
            await asyncio.sleep(3.0)  # the sweep runs every second: retention, then incremental vacuum
            out["rss_after"] = sidecar.rss_mb()
            out["file_after_mb"] = await metric(s, sidecar.url, "iothub_gateway_outbox_file_bytes") / 2**20
            out["delivered_total"] = sum([await delivered_of(s, sidecar.url, d) for d, _ in devices])
            for t in args.transports:
                out["c2d"][t] = await c2d_round_trips(s, sidecar.url, emu.admin, f"sc-{t}", args.roundtrips)
                if t != "http":  # IoT Hub's HTTP device API has no direct methods
                    out["methods"][t] = await method_round_trips(s, sidecar.url, emu.service, emu.ports["http"],
                                                                 f"sc-{t}", args.roundtrips)
            out["rss_end"] = sidecar.rss_mb()
    return out


async def soak(args: argparse.Namespace, emu: Emulator, tmp: Path) -> dict[str, Any]:
    """5. ``--soak`` messages through one MQTT device, POSTed in batches while at most ``window`` wait
    undelivered (a steady flow, as on an edge box, not one huge backlog), retention on
    (``delivered_max = --retention-max``); every second: delivered so far, RSS, the outbox file + WAL."""
    device, n, window = "soak-mqtt", args.soak, 20_000
    outbox = tmp / "soak.sqlite3"
    config = sidecar_config(tmp / "soak.toml", outbox=outbox, ports=emu.ports, devices=[(device, "mqtt")],
                            inflight=args.inflight, retention_max=args.retention_max)

    def file_mb() -> float:
        return sum(p.stat().st_size for p in tmp.glob("soak.sqlite3*") if p.is_file()) / 2**20

    with sidecar_child(config, tmp, cs_env(emu)) as sidecar:
        async with session(8) as s:
            await wait_connected(s, sidecar.url)
            await asyncio.sleep(2.0)
            out: dict[str, Any] = {"rss_idle": sidecar.rss_mb(), "samples": []}
            state = {"posted": 0, "delivered": 0}
            body = json.dumps({"messages": [BATCH_MESSAGE] * args.batch}).encode()

            async def producer() -> None:
                while state["posted"] < n:
                    if state["posted"] - state["delivered"] > window:
                        await asyncio.sleep(0.05)
                        continue
                    size = min(args.batch, n - state["posted"])
                    state["posted"] += size
                    data = body if size == args.batch else json.dumps({"messages": [BATCH_MESSAGE] * size}).encode()
                    async with s.post(f"{sidecar.url}/v1/devices/{device}/messages/batch", data=data,
                                      headers={"Content-Type": "application/json"}) as resp:
                        if resp.status != 202:
                            raise RuntimeError(f"batch POST answered {resp.status}: {await resp.text()}")

            start = time.perf_counter()
            producers = [asyncio.ensure_future(producer()) for _ in range(2)]
            try:
                async with asyncio.timeout(max(600.0, n / 200)):
                    while state["delivered"] < n:
                        await asyncio.sleep(1.0)
                        state["delivered"] = await delivered_of(s, sidecar.url, device)
                        out["samples"].append((time.perf_counter() - start, state["delivered"], sidecar.rss_mb(),
                                               file_mb()))
                        for task in producers:
                            if task.done() and task.exception() is not None:
                                raise task.exception()  # type: ignore[misc]
            finally:
                for task in producers:
                    task.cancel()
            out["seconds"] = time.perf_counter() - start
            await asyncio.sleep(3.0)  # the sweep runs every second: retention, then incremental vacuum
            out["rss_after"] = sidecar.rss_mb()
            out["file_after_mb"] = file_mb()
            out["delivered"] = await delivered_of(s, sidecar.url, device)
    return out


def print_soak(args: argparse.Namespace, result: dict[str, Any]) -> None:
    samples = result["samples"]
    limit = "under" if result["file_after_mb"] <= args.file_limit else "OVER"
    print(f"5. soak: {result['delivered']} delivered through one MQTT device in {result['seconds']:.0f} s "
          f"({result['delivered'] / result['seconds']:.0f}/s; {args.batch} per POST, at most 20,000 waiting)")
    print(f"   RSS: idle {result['rss_idle']:.1f} MB (target < 60 MB), largest {max(x[2] for x in samples):.1f} MB, "
          f"at the end {result['rss_after']:.1f} MB")
    print(f"   outbox file + WAL: largest {max(x[3] for x in samples):.1f} MB, "
          f"at the end {result['file_after_mb']:.2f} MB (delivered_max = {args.retention_max}): "
          f"{limit} the set size of {args.file_limit:g} MB")
    tenth = max(1, len(samples) // 10)
    print("   over time (s, delivered, RSS MB, file MB): " + "; ".join(
        f"{t:.0f} {d} {r:.1f} {f:.1f}" for t, d, r, f in samples[::tenth]))


def plot_soak(path: str, result: dict[str, Any], retention_max: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    delivered = [x[1] / 1000 for x in result["samples"]]
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=120)
    ax.plot(delivered, [x[2] for x in result["samples"]], color="#1d4ed8", label="sidecar RSS (MB)")
    ax.plot(delivered, [x[3] for x in result["samples"]], color="#0a7d38", label="outbox file + WAL (MB)")
    ax.axhline(60, color="#b42318", linestyle="--", linewidth=1)
    ax.text(delivered[-1], 61, "RSS target 60 MB", color="#b42318", ha="right", fontsize=8)
    ax.set_xlabel("messages delivered (thousands)")
    ax.set_ylabel("MB")
    ax.set_ylim(0, max(70.0, max(x[2] for x in result["samples"]) + 10))
    ax.legend(loc="center right", fontsize=8)
    ax.set_title(f"Soak: {result['delivered']:,} messages through one MQTT device, retention delivered_max = "
                 f"{retention_max:,}\n{os.cpu_count()} shared CPUs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def plot(path: str, accept: dict[str, Any], e2e: dict[str, Any], n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars: list[tuple[str, float, str, str]] = [
        ("accept\nNORMAL", accept["ratio"]["NORMAL"], "#1d4ed8", ""),
        ("accept\nFULL", accept["ratio"]["FULL"], "#60a5fa", ""),
    ]
    styles = {"single": ("end to end\n1/POST", "#0a7d38", ""), "batched": ("end to end\nbatched", "#16a34a", ""),
              "drain": ("outbox->hub", "#86efac", "//")}
    for who, (label, color, hatch) in styles.items():
        for t, ratio in e2e["ratio"].get(who, {}).items():
            bars.append((f"{t}\n{label}", ratio, color, hatch))
    fig, ax = plt.subplots(figsize=(11, 4), dpi=120)
    drawn = ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars],
                   edgecolor="#1d2330", linewidth=0.5)
    for bar, (_, value, _, hatch) in zip(drawn, bars, strict=True):
        bar.set_hatch(hatch)
        ax.text(bar.get_x() + bar.get_width() / 2, value + 0.02, f"{value:.2f}", ha="center", fontsize=9)
    ax.axhline(0.7, color="#b42318", linestyle="--", linewidth=1)
    ax.text(len(bars) - 0.5, 0.72, "target 0.7", color="#b42318", ha="right", fontsize=8)
    ax.set_ylim(0, max(1.1, max(b[1] for b in bars) + 0.15))
    ax.set_ylabel("sidecar / baseline")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(f"Sidecar vs baselines: accepted/s vs a bare aiohttp handler; delivered/s vs the raw adapter "
                 f"(N={n} per transport)\n{os.cpu_count()} shared CPUs: noisy; every ratio is from one run",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000,
                        help="N: messages per transport for end to end and the raw adapter (default 2000)")
    parser.add_argument("--requests", type=int, default=2000, help="POSTs per accept round and server")
    parser.add_argument("--rounds", type=int, default=5, help="alternating accept rounds (default 5)")
    parser.add_argument("--e2e-rounds", type=int, default=1, help="sidecar/raw rounds per transport (default 1)")
    parser.add_argument("--roundtrips", type=int, default=100, help="C2D and method round trips per device")
    parser.add_argument("--concurrency", type=int, default=32, help="HTTP requests in flight from the client")
    parser.add_argument("--inflight", type=int, default=8, help="sends in flight per device (both sides)")
    parser.add_argument("--batch", type=int, default=100, help="messages per POST .../batch (default 100)")
    parser.add_argument("--soak", type=int, default=0, metavar="N",
                        help="5. also deliver N messages (e.g. 1000000) through one MQTT device with retention on, "
                             "sampling RSS and the outbox file")
    parser.add_argument("--soak-plot", metavar="PNG", help="write the soak run's RSS and file size over time")
    parser.add_argument("--retention-max", type=int, default=1000, help="[outbox] delivered_max of the e2e sidecar")
    parser.add_argument("--file-limit", type=float, default=16.0, help="the outbox file's size bound to check, MB")
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help="comma-separated (default all three)")
    parser.add_argument("--plot", metavar="PNG", help="write a matplotlib figure of the ratios")
    parser.add_argument("--profile", metavar="FILE", help="run the end-to-end sidecar under cProfile, stats to FILE")
    parser.add_argument("--skip-accept", action="store_true", help="leave out the accept rounds (section 1)")
    args = parser.parse_args()
    args.transports = [t for t in args.transports.split(",") if t]

    tmp = Path(tempfile.mkdtemp(prefix="bench-sidecar-"))
    names = [f"{side}-{t}" for side in ("sc", "raw", "dr", "soak") for t in TRANSPORTS]
    print(f"bench/sidecar.py: {os.cpu_count()} CPU(s) (shared: figures are noisy), Python {sys.version.split()[0]}, "
          f"aiohttp {aiohttp.__version__}; N = {args.messages} per transport, concurrency {args.concurrency}, "
          f"{args.inflight} in flight per device", flush=True)
    with child(["-m", "gateway.cli", "emulator", "--admin-port", "0", *(a for d in names for a in ("--device", d))],
               until=lambda text: "faults:" in text) as emulator:
        emu = emulator_info(emulator.lines)
        accept = None if args.skip_accept else await accept_rounds(args, emu, tmp)
        if accept is not None:
            print_accept(accept)
        e2e = await end_to_end(args, emu, tmp)
        emulator_cpu = emulator.cpu_seconds()
        print_e2e(args, e2e, emulator_cpu)
        if args.plot and accept is not None:
            plot(args.plot, accept, e2e, args.messages)
            print(f"figure: {args.plot}")
        if args.soak:
            result = await soak(args, emu, tmp)
            print_soak(args, result)
            if args.soak_plot:
                plot_soak(args.soak_plot, result, args.retention_max)
                print(f"figure: {args.soak_plot}")


def print_accept(accept: dict[str, Any]) -> None:
    print("1. accepted messages per second (202 after the outbox commit; nothing delivered meanwhile):")
    print(f"   bare aiohttp handler (same JSON work, no storage) {accept['rate']['bare']:8.0f}"
          f"   ({accept['cpu_us']['bare']:.0f} µs server CPU per request)")
    for sync in ("NORMAL", "FULL"):
        print(f"   sidecar, synchronous = {sync:<6}                 {accept['rate'][sync]:8.0f}"
              f"   ({accept['cpu_us'][sync]:.0f} µs)   ratio {accept['ratio'][sync]:.2f}"
              f"{'   (target >= 0.7)' if sync == 'NORMAL' else ''}")
    print("   per round: " + "; ".join(f"{k} " + ", ".join(f"{x:.0f}" for x in v)
                                      for k, v in accept["rounds"].items()), flush=True)


def print_e2e(args: argparse.Namespace, e2e: dict[str, Any], emulator_cpu: float) -> None:
    print(f"2. delivered per second vs the raw adapter ({args.inflight} sends in flight, same emulator; "
          "target >= 0.7):")
    labels = {"single": "end to end, one message per POST",
              "batched": f"end to end, {args.batch} per POST .../batch",
              "drain": "outbox -> hub alone (prefilled outbox)"}
    for t in args.transports:
        print(f"   {t:<5} raw adapter {median(e2e['raw'][t]):7.0f}/s   ({args.messages} messages per figure)")
        for who, label in labels.items():
            extra = ""
            if who == "single":
                extra = f"   (accepted {median(e2e['accepted'][t]):.0f}/s)"
            elif who == "batched":
                extra = f"   (accepted {median(e2e['accepted_batched'][t]):.0f}/s)"
            print(f"         {label:<42} {median(e2e[who][t]):7.0f}/s   ratio {e2e['ratio'][who][t]:.2f}{extra}")
    print("   (one message per POST cannot pass the accept rate of section 1: the POSTs reach the same process)")
    print("3. round trips per second through the local API (one at a time):")
    for t in args.transports:
        methods = f"{e2e['methods'][t]:6.1f}" if t in e2e["methods"] else "   n/a (HTTP has no methods)"
        print(f"   {t:<5} C2D {e2e['c2d'][t]:6.1f}   direct method {methods}")
    limit = "under" if e2e["file_after_mb"] <= args.file_limit else "OVER"
    print(f"4. sidecar RSS: idle {e2e['rss_idle']:.1f} MB (target < 60 MB), largest while delivering "
          f"{e2e['rss_loaded']:.1f} MB, after {e2e['delivered_total']} delivered {e2e['rss_after']:.1f} MB, "
          f"at the end {e2e['rss_end']:.1f} MB")
    print(f"   outbox file + WAL: largest {e2e['file_peak_mb']:.1f} MB, after retention (delivered_max = "
          f"{args.retention_max}) {e2e['file_after_mb']:.2f} MB: {limit} the set size of {args.file_limit:g} MB")
    print(f"   (the emulator used {emulator_cpu:.0f} s of CPU in its own process)")


if __name__ == "__main__":
    if "--bare-server" in sys.argv:
        bare_server()
    else:
        asyncio.run(main())
