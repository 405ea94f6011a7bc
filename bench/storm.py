"""Reconnect storm: 10,000 connections lose the hub for 60 s at the same instant.

A discrete-event simulation in virtual time (no sleeping): every connection asks the real
``gateway.policy.Policy`` what to do after the drop and after each refused attempt, exactly as the
handler's supervisor does, and the hub accepts every attempt from t = 60 s on. Three policies run in the
same process on the same scenario:

- ours: the shipped defaults (reconnect curve 1 s doubling to a 60 s cap, full jitter);
- fixed: a fixed 10 s interval, no jitter (the Python SDK's default);
- exponential: 1 s doubling to 60 s, without jitter.

Reported per policy: the peak number of reconnect attempts in any 1 s window after recovery, that peak
against the even spread of all connections over the backoff window (cap seconds), the time from recovery
until every connection is back, the attempts the down hub had to refuse, and the policy's decision cost.

``--runtime`` also runs the storm through real ``Handler`` objects on a ``FakeClock`` (fewer connections,
default 1,000) to check that the supervisor adds nothing to the policy's spread.

Run: ``python bench/storm.py`` (about ten seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import heapq
import random
import sys
import time
from pathlib import Path
from typing import Any

# Run as a script, bench/ comes first on sys.path, where bench/http.py would shadow the stdlib's http.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from gateway.clock import FakeClock
from gateway.codes import code_of
from gateway.errors import make_error
from gateway.handler import Handler, State
from gateway.policy import Backoff, History, Policy, PolicyConfig, ReconnectAfter
from gateway.testing import MemoryTransport

DROP = code_of("DeviceConnectionClosedRemotely")
REFUSED = code_of("ConnectionRefused")
START = FakeClock.DEFAULT_START


@dataclasses.dataclass
class Result:
    name: str
    n: int
    outage: float
    window: float
    attempts_after: list[float]
    refused: int
    decisions: int
    decision_ns: int
    wall: float

    @property
    def peak(self) -> int:
        return peak_in_window(self.attempts_after, 1.0)

    @property
    def even(self) -> float:
        return self.n / self.window

    @property
    def all_back(self) -> float:
        return max(self.attempts_after) - self.outage

    @property
    def decision_us(self) -> float:
        return self.decision_ns / max(1, self.decisions) / 1000


def peak_in_window(times: list[float], width: float) -> int:
    """The most events in any half-open window [x, x + width)."""
    ts = sorted(times)
    best = lo = 0
    for hi, t in enumerate(ts):
        while ts[lo] <= t - width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def policies(jitter: float | None = None) -> list[tuple[str, Policy]]:
    ours = Policy()
    name = "ours (full jitter, 1 s -> 60 s)"
    if jitter is not None:
        cfg = ours.config
        ours = Policy(dataclasses.replace(cfg, reconnect=dataclasses.replace(cfg.reconnect, jitter=jitter)))
        name = f"ours (jitter {jitter:g}, 1 s -> 60 s)"
    fixed = Policy(PolicyConfig(reconnect=Backoff(initial=10.0, multiplier=1.0, cap=10.0, jitter=0.0,
                                                  max_attempts=0, max_elapsed=0.0)))
    expo = Policy(PolicyConfig(reconnect=Backoff(initial=1.0, multiplier=2.0, cap=60.0, jitter=0.0,
                                                 max_attempts=0, max_elapsed=0.0)))
    return [(name, ours), ("fixed 10 s", fixed), ("exponential, no jitter", expo)]


def simulate(name: str, policy: Policy, n: int, outage: float, seed: int) -> Result:
    """Every connection drops at t=0; attempts before ``outage`` are refused, later ones succeed."""
    rand = random.Random(seed)
    drop = make_error(DROP, transport="mqtt")
    refused = make_error(REFUSED, transport="mqtt")
    histories = [History(identity=f"dev{i}").on_connected(START - 3600.0) for i in range(n)]
    events: list[tuple[float, int]] = []
    decisions = 0
    spent = 0
    wall = time.perf_counter()

    def decide(i: int, err: Any, now: float) -> None:
        nonlocal decisions, spent
        t0 = time.perf_counter_ns()
        decision, histories[i] = policy.step(err, histories[i], now=START + now, rand=rand)
        spent += time.perf_counter_ns() - t0
        decisions += 1
        assert isinstance(decision, ReconnectAfter), decision
        heapq.heappush(events, (now + decision.delay, i))

    for i in range(n):
        decide(i, drop, 0.0)
    after: list[float] = []
    refusals = 0
    while events:
        t, i = heapq.heappop(events)
        if t < outage:
            refusals += 1
            decide(i, refused, t)
        else:
            after.append(t)
            histories[i] = histories[i].on_connected(START + t)
    window = policy.config.reconnect.cap
    return Result(name, n, outage, window, after, refusals, decisions, spent, time.perf_counter() - wall)


# -- the same storm through real handlers ---------------------------------------------------------------


class _StormHub:
    def __init__(self, clock: FakeClock, outage_end: float) -> None:
        self.clock = clock
        self.outage_end = outage_end
        self.attempts: list[float] = []


class _StormTransport(MemoryTransport):
    def __init__(self, hub: _StormHub) -> None:
        super().__init__("mqtt")
        self.hub = hub

    async def connect(self) -> None:
        now = self.hub.clock.now()
        if now > START:
            self.hub.attempts.append(now - START)
        if START < now < self.hub.outage_end:
            raise make_error(REFUSED, transport="mqtt")
        await super().connect()


async def runtime_storm(n: int, outage: float, seed: int) -> tuple[list[float], float]:
    clock = FakeClock(START - 10.0, settle_rounds=50)
    hub = _StormHub(clock, START + outage)
    rand = random.Random(seed)
    transports = [_StormTransport(hub) for _ in range(n)]
    handlers = [Handler(t, clock=clock, rand=rand, identity=f"dev{i}") for i, t in enumerate(transports)]
    for h in handlers:
        await h.start()
    await clock.advance(10.0)  # everyone connected; now t = START: the hub goes away
    assert all(h.state is State.CONNECTED for h in handlers)
    for t in transports:
        t.drop(make_error(DROP, transport="mqtt"))
    await clock.run_until(lambda: all(h.state is State.CONNECTED for h in handlers)
                          and clock.now() > START + outage, limit=outage + 200)
    done_at = clock.now() - START - outage
    for h in handlers:
        await h.close()
    return [t for t in hub.attempts if t >= outage], done_at


def plot(results: list[Result], path: str, seed: int) -> None:
    """Reconnect attempts reaching the recovered hub, per second, one line per policy (log scale: the
    baselines land every connection in one second). matplotlib is imported here only, so the benchmark
    itself needs nothing beyond the package."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outage = results[0].outage
    span = int(max(r.window for r in results)) + 10
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for r, style in zip(results, ("-", "--", ":"), strict=False):
        counts = [0] * span
        for t in r.attempts_after:
            k = int(t - outage)
            if 0 <= k < span:
                counts[k] += 1
        ax.step(range(span), [max(c, 0.8) for c in counts], where="post", linestyle=style, linewidth=1.6,
                label=f"{r.name}: peak {r.peak}/s ({r.peak / r.even:.2f}x even)")
    ours = results[0]
    ax.axhline(ours.even, color="grey", linewidth=0.8)
    ax.axhline(2 * ours.even, color="grey", linewidth=0.8, linestyle="--")
    ax.text(span - 1, ours.even * 1.08, "even spread", ha="right", fontsize=8, color="grey")
    ax.text(span - 1, 2 * ours.even * 1.08, "2x even (target)", ha="right", fontsize=8, color="grey")
    ax.set_yscale("log")
    ax.set_ylim(0.8, ours.n * 2)
    ax.set_xlabel(f"seconds after the hub recovers (it was down {outage:g} s)")
    ax.set_ylabel("reconnect attempts per second")
    ax.set_title(f"Reconnect storm: {ours.n:,} connections, virtual time, seed {seed}")
    ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 0.9))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000, help="connections (default 10000)")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds the hub is down (default 60)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jitter", type=float, default=None, help="override our reconnect jitter (0-1)")
    parser.add_argument("--runtime", action="store_true", help="also run the storm through real Handlers")
    parser.add_argument("--runtime-n", type=int, default=1000)
    parser.add_argument("--plot", metavar="PNG", help="also draw attempts per second after recovery (needs matplotlib: "
                        "pip install -e '.[bench]')")
    args = parser.parse_args(argv)

    print(f"storm: {args.n} connections, hub down for {args.outage:g} s from t=0, virtual time, seed {args.seed}")
    header = (f"{'policy':<32} {'peak/1s':>8} {'even/1s':>8} {'peak/even':>9} {'all back':>9} "
              f"{'refused':>8} {'decisions':>9} {'us/decision':>11}")
    print(header)
    print("-" * len(header))
    results = [simulate(name, policy, args.n, args.outage, args.seed) for name, policy in policies(args.jitter)]
    for r in results:
        print(f"{r.name:<32} {r.peak:>8} {r.even:>8.0f} {r.peak / r.even:>9.2f} {r.all_back:>8.1f}s "
              f"{r.refused:>8} {r.decisions:>9} {r.decision_us:>11.1f}")
    ours = results[0]
    print()
    print(f"ours: peak {ours.peak}/s is {ours.peak / ours.even:.2f}x the even spread of {ours.n} connections over "
          f"the {ours.window:g} s backoff window ({ours.even:.0f}/s); target <= 2x: "
          f"{'met' if ours.peak <= 2 * ours.even else 'NOT met'}")
    if args.plot:
        plot(results, args.plot, args.seed)
        print(f"plot: {args.plot}")
    if args.runtime:
        wall = time.perf_counter()
        attempts, done_at = asyncio.run(runtime_storm(args.runtime_n, args.outage, args.seed))
        peak = peak_in_window(attempts, 1.0)
        even = args.runtime_n / Policy().config.reconnect.cap
        print(f"runtime check: {args.runtime_n} real Handlers on a FakeClock: peak {peak}/s "
              f"({peak / even:.2f}x even), all back {done_at:.1f} s after recovery "
              f"({time.perf_counter() - wall:.1f} s wall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
