"""Per-second counters for the status page's charts, kept as things happen (never a scan on a request).

Every count goes in two places at once: a ring of the last ``window`` seconds (one slot per second of
the monotonic clock, reused as the clock moves on) and running totals since the sidecar started. The
page's device counts and code counts come from the same records, so they always cover the same span:
totals since start, charts over the window.

What is counted, by ``(outcome, code)``:

- messages: ``accepted`` (202 from the API), ``delivered``, ``dead_letter`` (with its code),
  ``retry_later`` (a failed attempt released back to pending, with its code), ``rejected`` (the API
  refused a ``POST`` of a message, with its code: only message routes count, never a ``GET`` 404 or a
  405 on some other resource);
- handler state changes that carry a code (``throttled``, ``disconnected-retrying``, ``parked``,
  ``stopped`` ...), one per change.

Memory is bounded: the ring has ``window`` slots; each slot keeps per-device counters for at most
``max_devices`` devices (the rest go to the sidecar-wide counters only, flagged ``truncated``); the totals
hold one entry per configured device. Counts for ids that are not configured devices (an app posting to
a wrong id) go to the sidecar-wide counters only, so hostile ids cannot grow memory.
"""

from __future__ import annotations

import heapq
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.codes import lookup

__all__ = ["MESSAGE_OUTCOMES", "Stats"]

Key = tuple[str, int | None]

#: Outcomes that are messages (the rest are handler state changes).
MESSAGE_OUTCOMES = frozenset({"accepted", "delivered", "dead_letter", "retry_later", "rejected"})


@dataclass(slots=True)
class _Slot:
    second: int = -1
    counts: Counter[Key] = field(default_factory=Counter)
    devices: dict[str, Counter[Key]] = field(default_factory=dict)
    truncated: bool = False

    def reset(self, second: int) -> None:
        self.second = second
        self.counts = Counter()
        self.devices = {}
        self.truncated = False


def _name(code: int) -> str:
    try:
        return lookup(code).name
    except ValueError:
        return ""


class Stats:
    """The ring and the totals. ``clock`` is monotonic (slots); ``wall`` only labels times for display."""

    def __init__(self, devices: Iterable[str] = (), *, window: int = 300, max_devices: int = 256,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        if window < 2:
            raise ValueError("window must be at least 2 seconds")
        self.window = window
        self.max_devices = max_devices
        self._clock = clock
        self._wall = wall
        self._slots = [_Slot() for _ in range(window)]
        self._ids: list[str] = sorted(set(devices))
        self._known = frozenset(self._ids)
        self.started = wall()
        self.totals: Counter[Key] = Counter()
        self.device_totals: dict[str, Counter[Key]] = {}
        #: records per device over the window, kept as slots fill and are reused (for "busiest")
        self._busy: Counter[str] = Counter()

    # -- recording -------------------------------------------------------------------------------------

    def add(self, device: str | None, outcome: str, code: int | None = None, n: int = 1) -> None:
        """Count ``n`` of ``outcome`` (with ``code``) for ``device`` now."""
        second = int(self._clock())
        slot = self._slots[second % self.window]
        if slot.second != second:
            self._forget(slot)
            slot.reset(second)
        key = (outcome, code)
        slot.counts[key] += n
        self.totals[key] += n
        if device is None or device not in self._known:
            return
        per = slot.devices.get(device)
        if per is None:
            if len(slot.devices) >= self.max_devices:
                slot.truncated = True
            else:
                per = slot.devices[device] = Counter()
        if per is not None:
            per[key] += n
            self._busy[device] += n
        total = self.device_totals.get(device)
        if total is None:
            total = self.device_totals[device] = Counter()
        total[key] += n

    def _forget(self, slot: _Slot) -> None:
        """A second leaves the window: its records leave the per-device window counts (each slot once)."""
        for dev, per in slot.devices.items():
            left = self._busy[dev] - sum(per.values())
            if left > 0:
                self._busy[dev] = left
            else:
                del self._busy[dev]
        slot.devices = {}

    # -- reading ---------------------------------------------------------------------------------------

    def _recent(self) -> tuple[int, list[_Slot | None]]:
        """The window's slots, oldest first (None for a second nothing happened in)."""
        now = int(self._clock())
        out: list[_Slot | None] = []
        for second in range(now - self.window + 1, now + 1):
            slot = self._slots[second % self.window]
            out.append(slot if slot.second == second else None)
        return now, out

    @staticmethod
    def _summary(counts: Counter[Key]) -> dict[str, int]:
        out = {"accepted": 0, "delivered": 0, "dead_letter": 0, "retry_later": 0, "rejected": 0, "errors": 0}
        for (outcome, code), n in counts.items():
            if outcome in out:
                out[outcome] += n
            if code is not None:
                out["errors"] += n
        return out

    def view(self, device: str | None = None, *, limit: int = 0, after: str | None = None,
             top: int = 10) -> dict[str, Any]:
        """The charts' data: per-second series over the window (the whole sidecar, or ``device``), the
        totals since start by outcome and by code, the busiest devices in the window, and the totals of
        one page of devices (``limit`` ids after ``after``, sorted as ``GET /v1/devices`` pages them)."""
        now, slots = self._recent()
        series = {name: [0] * len(slots) for name in ("accepted", "delivered", "dead_letter", "errors")}
        by_code: dict[int, list[int]] = {}
        truncated = False
        for i, slot in enumerate(slots):
            counts: Counter[Key] | None = None
            if slot is not None:
                counts = slot.counts if device is None else slot.devices.get(device)
                truncated = truncated or slot.truncated
            if not counts:
                continue
            for (outcome, code), n in counts.items():
                if outcome in series:
                    series[outcome][i] += n
                if code is not None:
                    series["errors"][i] += n
                    by_code.setdefault(code, [0] * len(slots))[i] += n
        totals = self.totals if device is None else self.device_totals.get(device, Counter())
        codes: dict[int, dict[str, int]] = {}
        for (outcome, code), n in totals.items():
            if code is not None:
                codes.setdefault(code, {})[outcome] = codes.get(code, {}).get(outcome, 0) + n
        data: dict[str, Any] = {
            "device": device,
            "window": self.window,
            "resolution": 1,
            "started": self.started,
            "now": self._wall(),
            "truncated": truncated,
            "series": series,
            "codes": [{"code": code, "name": _name(code), "series": values}
                      for code, values in sorted(by_code.items())],
            "totals": self._summary(totals),
            "code_totals": [{"code": code, "name": _name(code), "count": sum(outcomes.values()),
                             "outcomes": outcomes}
                            for code, outcomes in sorted(codes.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))],
        }
        if device is None:
            for slot in self._slots:  # seconds older than the window that no record has reused yet
                if slot.devices and slot.second <= now - self.window:
                    self._forget(slot)
            data["busiest"] = [{"id": dev, "count": n}
                               for dev, n in heapq.nlargest(top, self._busy.items(), key=lambda kv: (kv[1], kv[0]))]
        if limit > 0:
            start = bisect_right(self._ids, after) if after is not None else 0
            data["devices"] = {dev: self._summary(self.device_totals.get(dev, Counter()))
                               for dev in self._ids[start:start + limit]}
        return data

    def known(self, device: str) -> bool:
        return device in self._known
