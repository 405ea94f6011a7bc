"""Gateway scale: N leaf devices through the handler over multiplexed AMQP, against the emulator.

The emulator (hub + AMQP front) runs in a child process so that its memory, threads and CPU are not
counted against the gateway. The gateway process runs one ``Handler`` per device on an ``AmqpMux``
(one proton thread, up to 1,000 devices per connection) and reports:

- connect: time until every handler is connected;
- RSS per idle device (the process's RSS growth from before the devices to all connected and idle);
- threads (Python's and the kernel's count) and open file descriptors;
- telemetry: aggregate messages per second, every device sending ``--messages`` messages at once;
- the hub restart: the front cuts every socket; time until all are back, the connections the pool
  opened for it, and the peak rejoins per second against an even spread over that time.

``--shared-session`` shares one session per connection (less memory per device).
``--per-connection`` runs the same with one ``AmqpTransport`` (one connection and one proton thread)
per device, for the ratio (keep N small: it costs a thread per device).

Run: ``python bench/scale.py 1000 5000`` (N values from argv; default 1000).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
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
from gateway.emulator import Hub
from gateway.handler import Handler, State
from gateway.policy import Policy
from gateway.sas import make_sas_token
from gateway.transport import Message, Transport

KEY = "c2NhbGUtYmVuY2gtZGV2aWNlLWtleS0wMTIzNDU2Nzg5YWI="  # one key for every bench device (local only)
HUB_HOST = "scale.azure-devices.net"


def _hub_process(n: int, pipe: Connection, profile: str | None = None) -> None:
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
            _hub_process(n, pipe)
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
        front = AmqpFront(hub, prefetch=10)
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
                pipe.send(front.connections())
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


async def run(n: int, messages: int, per_connection: bool, hub_pipe: Connection, port: int,
              hub_host: str, shared_session: bool = False) -> dict[str, Any]:
    def token_for(device_id: str) -> Any:
        return lambda: make_sas_token(f"{hub_host}/devices/{device_id}", KEY, int(time.time() + 3600))

    gc.collect()
    rss0, threads0, fds0 = rss_kb(), _status("Threads"), fds()
    mux = AmqpMux(host="127.0.0.1", port=port, ssl=None, hub_host=hub_host,
                  session_per_device=not shared_session) if not per_connection else None
    transports: list[Transport] = []
    for i in range(n):
        device_id = f"leaf-{i}"
        if mux is not None:
            transports.append(mux.device(device_id, token=token_for(device_id), connect_timeout=120.0,
                                         send_timeout=60.0))
        else:
            transports.append(AmqpTransport(host="127.0.0.1", port=port, ssl=None, hub_host=hub_host,
                                            device_id=device_id, token=token_for(device_id),
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

    async def burst(h: Handler, i: int) -> None:
        for k in range(messages):
            await h.send(Message(f"leaf-{i}-{k}", f"leaf-{i}", b'{"t": 21.5}'), timeout=120.0)

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
        "mode": "per-connection" if per_connection else "mux, shared session" if shared_session else "mux",
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
        "msgs_per_s": delivered / send_s if send_s else 0.0,
        "reconnect_s": reconnect_s,
        "reconnect_connections": opened,
        "rejoin_peak_per_s": peak,
        "rejoin_even_per_s": n / max(1.0, reconnect_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", nargs="*", type=int, default=[1000], help="device counts (default 1000)")
    parser.add_argument("--messages", type=int, default=5, help="telemetry messages per device")
    parser.add_argument("--per-connection", action="store_true", help="one AmqpTransport per device instead")
    parser.add_argument("--shared-session", action="store_true", help="mux with one session per connection")
    parser.add_argument("--profile-hub", metavar="FILE", help="write the emulator's cProfile statistics here")
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    for n in args.n:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_hub_process, args=(n, child, args.profile_hub), daemon=True)
        proc.start()
        port, hub_host = parent.recv()
        try:
            result = asyncio.run(run(n, args.messages, args.per_connection, parent, port, hub_host,
                                     args.shared_session))
        finally:
            parent.send("stop")
            parent.recv()
            proc.join(30)
        conns = result["connections"]
        ratio = result["rejoin_peak_per_s"] / max(1.0, result["rejoin_even_per_s"])
        print(f"[{result['mode']}] N={n:,}: connected in {result['connect_s']:.2f} s "
              f"({n / result['connect_s']:,.0f} devices/s) over {len(conns)} connection(s)")
        print(f"  CPU seconds (gateway / emulator): connect {result['connect_cpu'][0]:.1f} / "
              f"{result['connect_cpu'][1]:.1f}, telemetry {result['send_cpu'][0]:.1f} / {result['send_cpu'][1]:.1f}")
        print(f"  RSS {result['rss_per_device_kb']:.1f} KB per idle device; threads {result['threads_before']} -> "
              f"{result['threads']} (python {result['python_threads']}); +{result['fds']} fds "
              f"({result['fds'] / n:.3f} per device)")
        print(f"  telemetry: {result['msgs']:,} messages at {result['msgs_per_s']:,.0f} msg/s through the handlers")
        print(f"  hub restart: all back in {result['reconnect_s']:.2f} s over {result['reconnect_connections']} "
              f"new connection(s); rejoin peak {result['rejoin_peak_per_s']:,}/s vs even "
              f"{result['rejoin_even_per_s']:,.0f}/s (ratio {ratio:.2f})")


if __name__ == "__main__":
    main()
