"""Gateway scale: N leaf devices through the handler against the emulator, three ways, in one run.

Modes (``--modes``, default all three):

- ``mux``: AMQP multiplexed, one ``AmqpMux`` (one proton thread, up to 1,000 devices per connection);
- ``per-connection``: one ``AmqpTransport`` per device (one connection and one proton thread each);
  it costs a thread per device, so it runs only up to ``--per-connection-max`` devices (default 1,000);
- ``mqtt``: one ``MqttTransport`` per device (one socket each, connects on a shared bounded pool).

The emulator (hub + the mode's front) runs in a child process so that its memory, threads and CPU are
not counted against the gateway. For each mode and N the gateway process runs one ``Handler`` per
device and reports:

- connect: time until every handler is connected (and the CPU seconds of both processes);
- RSS per idle device (the process's RSS growth from before the devices to all connected and idle);
- threads (the kernel's count) and open file descriptors;
- telemetry: aggregate messages per second, every device sending ``--messages`` messages at once;
- the hub restart: the front cuts every socket; time until all are back, the connections opened
  for it, and the peak rejoins per second against an even spread over that time (as bench/storm.py).

``--shared-session`` shares one session per mux connection (less memory per device).
``--json FILE`` keeps the raw numbers; ``--plot FILE`` draws them (matplotlib, the ``bench`` extra).
``--profile-hub FILE`` writes the emulator's cProfile statistics (every thread).

Run: ``python bench/scale.py 1000 5000 10000 --plot docs/img/bench-scale.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import random
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

# Run as a script, bench/ comes first on sys.path, where bench/http.py would shadow the stdlib's http.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from adapters.amqp.emulator import AmqpFront
from adapters.amqp.mux import AmqpMux
from adapters.amqp.transport import AmqpTransport
from adapters.mqtt.emulator import MqttFront
from adapters.mqtt.transport import MqttTransport
from gateway.emulator import Hub
from gateway.errors import IoTHubError
from gateway.handler import Handler, State
from gateway.policy import Policy
from gateway.sas import make_sas_token
from gateway.transport import Message, Transport

KEY = "c2NhbGUtYmVuY2gtZGV2aWNlLWtleS0wMTIzNDU2Nzg5YWI="  # one key for every bench device (local only)
HUB_HOST = "scale.azure-devices.net"


def _hub_process(n: int, pipe: Connection, profile: str | None = None, transport: str = "amqp") -> None:
    """The emulator: a hub with N devices and its AMQP front; answers 'count', 'drop' and 'stop'.

    ``profile``: a file to write the emulator's cProfile statistics to (``--profile-hub``)."""
    if profile:
        import cProfile
        import pstats

        profilers: list[cProfile.Profile] = []

        def per_thread(*_: Any) -> None:  # the first event of every thread (the front's proton thread)
            sys.setprofile(None)
            profiler = cProfile.Profile()
            profilers.append(profiler)
            profiler.enable()

        threading.setprofile(per_thread)
        main_profiler = cProfile.Profile()
        main_profiler.enable()
        try:
            _hub_process(n, pipe, None, transport)
        finally:
            main_profiler.disable()
            stats = pstats.Stats(main_profiler)
            for profiler in profilers:
                with contextlib.suppress(TypeError):  # a thread that recorded nothing
                    stats.add(profiler)
            stats.dump_stats(profile)
        return

    async def main() -> None:
        hub = Hub(host_name=HUB_HOST)
        for i in range(n):
            hub.add_device(f"leaf-{i}", key=KEY)
        front: AmqpFront | MqttFront = AmqpFront(hub, prefetch=10) if transport == "amqp" else MqttFront(hub)
        await front.start()
        pipe.send((front.port, hub.host_name))
        loop = asyncio.get_running_loop()
        while True:
            command = await loop.run_in_executor(None, pipe.recv)
            if command == "count":
                pipe.send(hub.received_total)
            elif command == "cpu":
                pipe.send(time.process_time())
            elif command == "drop":
                await front.drop_all()
                pipe.send(None)
            elif command == "stop":
                await front.stop()
                pipe.send(None)
                return

    asyncio.run(main())


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_kb() -> int:
    return _status("VmRSS")


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def run(n: int, messages: int, mode: str, hub_pipe: Connection, port: int,
              hub_host: str, shared_session: bool = False) -> dict[str, Any]:
    def token_for(device_id: str) -> Any:
        return lambda: make_sas_token(f"{hub_host}/devices/{device_id}", KEY, int(time.time() + 3600))

    gc.collect()
    rss0, threads0, fds0 = rss_kb(), _status("Threads"), fds()
    mux = AmqpMux(host="127.0.0.1", port=port, ssl=None, hub_host=hub_host,
                  session_per_device=not shared_session) if mode == "mux" else None
    transports: list[Transport] = []
    for i in range(n):
        device_id = f"leaf-{i}"
        if mux is not None:
            transports.append(mux.device(device_id, token=token_for(device_id), connect_timeout=120.0,
                                         send_timeout=60.0))
        elif mode == "per-connection":
            transports.append(AmqpTransport(host="127.0.0.1", port=port, ssl=None, hub_host=hub_host,
                                            device_id=device_id, token=token_for(device_id),
                                            connect_timeout=120.0, send_timeout=60.0))
        else:
            transports.append(MqttTransport(f"HostName={hub_host};DeviceId={device_id};SharedAccessKey={KEY}",
                                            host="127.0.0.1", port=port, ssl=None, subscribe=("c2d",),
                                            connect_timeout=120.0, send_timeout=60.0))
    back: list[float] = []
    dropped_at = [0.0]

    lost = [0]

    def on_change(change: Any) -> None:
        if dropped_at[0] and change.state is State.CONNECTED:
            back.append(time.monotonic())
        elif dropped_at[0] and change.state is not State.CLOSED:
            lost[0] += 1

    # one Policy (configuration only) and one Random for every handler: a Mersenne Twister is 2.5 KB each
    policy, rand = Policy(), random.Random()
    handlers = [Handler(t, identity=f"leaf-{i}", on_state_change=on_change, policy=policy, rand=rand)
                for i, t in enumerate(transports)]
    def hub_cpu() -> float:
        hub_pipe.send("cpu")
        return float(hub_pipe.recv())

    t0, cpu0, hub0 = time.monotonic(), time.process_time(), hub_cpu()
    for h in handlers:
        await h.start()
    await asyncio.gather(*(h.wait_connected(300.0) for h in handlers))
    connect_s = time.monotonic() - t0
    connect_cpu, connect_hub_cpu = time.process_time() - cpu0, hub_cpu() - hub0
    await asyncio.sleep(1.0)
    gc.collect()
    rss1, threads1, fds1, python_threads = rss_kb(), _status("Threads"), fds(), threading.active_count()
    connections = mux.connections() if mux is not None else [1] * n

    hub_pipe.send("count")
    before = hub_pipe.recv()
    t1, cpu1, hub1 = time.monotonic(), time.process_time(), hub_cpu()

    failed = [0]

    async def burst(h: Handler, i: int) -> None:
        for k in range(messages):
            try:
                await h.send(Message(f"leaf-{i}-{k}", f"leaf-{i}", b'{"t": 21.5}'), timeout=120.0)
            except IoTHubError:  # counted and reported: one device's failure must not end the run
                failed[0] += 1

    await asyncio.gather(*(burst(h, i) for i, h in enumerate(handlers)))
    send_s = time.monotonic() - t1
    send_cpu, send_hub_cpu = time.process_time() - cpu1, hub_cpu() - hub1
    hub_pipe.send("count")
    delivered = hub_pipe.recv() - before

    # the hub restart: every socket cut at once
    attempts0 = mux.connection_attempts if mux is not None else 0
    dropped_at[0] = time.monotonic()
    hub_pipe.send("drop")
    hub_pipe.recv()
    while lost[0] < n and time.monotonic() - dropped_at[0] < 300:  # every handler saw the loss
        await asyncio.sleep(0.05)
    await asyncio.gather(*(h.wait_connected(600.0) for h in handlers))
    reconnect_s = time.monotonic() - dropped_at[0]
    per_second: dict[int, int] = {}
    for at in back:
        second = int(at - dropped_at[0])
        per_second[second] = per_second.get(second, 0) + 1
    peak = max(per_second.values()) if per_second else 0
    opened = (mux.connection_attempts - attempts0) if mux is not None else n

    for h in handlers:
        await h.close()
    if mux is not None:
        await mux.close()
    return {
        "mode": "mux, shared session" if mode == "mux" and shared_session else mode,
        "n": n,
        "connect_s": connect_s,
        "connect_cpu": (connect_cpu, connect_hub_cpu),
        "send_cpu": (send_cpu, send_hub_cpu),
        "rss_per_device_kb": (rss1 - rss0) / n,
        "threads_before": threads0,
        "threads": threads1,
        "python_threads": python_threads,
        "fds": fds1 - fds0,
        "connections": connections,
        "msgs": delivered,
        "msgs_failed": failed[0],
        "msgs_per_s": delivered / send_s if send_s else 0.0,
        "reconnect_s": reconnect_s,
        "reconnect_connections": opened,
        "rejoin_peak_per_s": peak,
        "rejoin_even_per_s": n / max(1.0, reconnect_s),
    }


def plot(results: list[dict[str, Any]], path: str) -> None:
    """Connect time, RSS per idle device, telemetry rate and threads against N, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    panels = [("connect_s", "connect all (s)"), ("rss_per_device_kb", "RSS per idle device (KB, log)"),
              ("msgs_per_s", "telemetry through the handlers (msg/s)"), ("threads", "threads (log)")]
    for mode in dict.fromkeys(r["mode"] for r in results):
        rows = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["n"])
        for ax, (key, _) in zip(axes, panels, strict=True):
            ax.plot([r["n"] for r in rows], [r[key] for r in rows], marker="o", label=mode)
    axes[0].axhline(30.0, color="grey", linestyle="--", linewidth=1, label="target: 30 s (AMQP, 10,000)")
    axes[1].axhline(10.0, color="grey", linestyle="--", linewidth=1, label="target: 10 KB (AMQP)")
    axes[1].axhline(30.0, color="grey", linestyle=":", linewidth=1, label="target: 30 KB (MQTT)")
    axes[1].set_yscale("log")
    axes[3].set_yscale("log")
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("devices")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("bench/scale.py against the local emulator (2 cores shared with other jobs: noisy; "
                 "raw numbers in the JSON)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(result: dict[str, Any]) -> None:
    n = result["n"]
    conns = result["connections"]
    ratio = result["rejoin_peak_per_s"] / max(1.0, result["rejoin_even_per_s"])
    print(f"[{result['mode']}] N={n:,}: connected in {result['connect_s']:.2f} s "
          f"({n / result['connect_s']:,.0f} devices/s) over {len(conns)} connection(s)")
    print(f"  CPU seconds (gateway / emulator): connect {result['connect_cpu'][0]:.1f} / "
          f"{result['connect_cpu'][1]:.1f}, telemetry {result['send_cpu'][0]:.1f} / {result['send_cpu'][1]:.1f}")
    print(f"  RSS {result['rss_per_device_kb']:.1f} KB per idle device; threads {result['threads_before']} -> "
          f"{result['threads']} (python {result['python_threads']}); +{result['fds']} fds "
          f"({result['fds'] / n:.3f} per device)")
    print(f"  telemetry: {result['msgs']:,} messages at {result['msgs_per_s']:,.0f} msg/s through the handlers"
          f" ({result.get('msgs_failed', 0):,} failed)")
    print(f"  hub restart: all back in {result['reconnect_s']:.2f} s over {result['reconnect_connections']} "
          f"new connection(s); rejoin peak {result['rejoin_peak_per_s']:,}/s vs even "
          f"{result['rejoin_even_per_s']:,.0f}/s (ratio {ratio:.2f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", nargs="*", type=int, default=[1000, 5000, 10000], help="device counts")
    parser.add_argument("--messages", type=int, default=2, help="telemetry messages per device")
    parser.add_argument("--modes", default="mux,per-connection,mqtt", help="comma-separated: mux, per-connection, mqtt")
    parser.add_argument("--per-connection-max", type=int, default=1000,
                        help="largest N for one AMQP connection (and proton thread) per device")
    parser.add_argument("--shared-session", action="store_true", help="mux with one session per connection")
    parser.add_argument("--profile-hub", metavar="FILE", help="write the emulator's cProfile statistics here")
    parser.add_argument("--json", metavar="FILE", help="write the raw results here")
    parser.add_argument("--plot", metavar="FILE", help="draw the results here (PNG; matplotlib)")
    parser.add_argument("--replot", metavar="JSON", help="only draw --plot from results written by --json")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), args.plot or "bench-scale.png")
        return
    ctx = multiprocessing.get_context("spawn")
    results: list[dict[str, Any]] = []
    for mode in args.modes.split(","):
        if mode not in ("mux", "per-connection", "mqtt"):
            parser.error(f"unknown mode {mode!r}")
        for n in args.n:
            if mode == "per-connection" and n > args.per_connection_max:
                print(f"[{mode}] N={n:,}: skipped (a proton thread per device; --per-connection-max "
                      f"{args.per_connection_max:,})", flush=True)
                continue
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_hub_process, args=(n, child, args.profile_hub,
                                                          "mqtt" if mode == "mqtt" else "amqp"), daemon=True)
            proc.start()
            port, hub_host = parent.recv()
            try:
                result = asyncio.run(run(n, args.messages, mode, parent, port, hub_host, args.shared_session))
            finally:
                parent.send("stop")
                parent.recv()
                proc.join(30)
            results.append(result)
            report(result)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
