"""The status page's counters (gateway/sidecar/stats.py): a per-second ring and totals, bounded memory."""

from __future__ import annotations

from gateway.codes import code_of
from gateway.sidecar.stats import Stats


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_series_follow_the_clock_and_old_seconds_leave_the_window_but_not_the_totals() -> None:
    clock = Clock()
    stats = Stats(["a", "b"], window=10, clock=clock, wall=lambda: 0.0)
    dead = code_of("ArgumentInvalid")
    stats.add("a", "delivered")
    stats.add("a", "delivered")
    clock.now += 3
    stats.add("b", "dead_letter", dead)
    view = stats.view()
    assert view["series"]["delivered"][-4] == 2 and view["series"]["dead_letter"][-1] == 1
    assert view["codes"] == [{"code": dead, "name": "ArgumentInvalid", "series": [0] * 9 + [1]}]
    assert view["busiest"][0] == {"id": "a", "count": 2}
    clock.now += 8  # the first second is now older than the window; the slot is reused, not grown
    stats.add("a", "delivered")
    view = stats.view()
    assert sum(view["series"]["delivered"]) == 1 and sum(view["series"]["dead_letter"]) == 1
    assert {row["id"]: row["count"] for row in view["busiest"]} == {"a": 1, "b": 1}  # the window's, not since start
    assert view["totals"]["delivered"] == 3 and view["totals"]["errors"] == 1
    assert stats.view("a")["totals"]["delivered"] == 3 and stats.view("b")["totals"]["dead_letter"] == 1
    assert stats.view(limit=1, after="a")["devices"] == {"b": {**stats.view("b")["totals"]}}
    clock.now += 100  # a quiet window: all zeros, the totals remain
    assert stats.view()["series"]["delivered"] == [0] * 10 and stats.view()["totals"]["delivered"] == 3
    assert stats.view()["busiest"] == []


def test_memory_is_bounded_against_many_and_unknown_devices() -> None:
    clock = Clock()
    known = [f"d{i:03}" for i in range(50)]
    stats = Stats(known, window=5, max_devices=10, clock=clock)
    for device in known:
        stats.add(device, "delivered")
    for i in range(1000):  # ids the sidecar does not have (an app posting to wrong ids) never become keys
        stats.add(f"stranger-{i}", "rejected", code_of("DeviceNotFound"))
    view = stats.view()
    assert view["truncated"] is True and view["series"]["delivered"][-1] == 50  # sidecar-wide stays exact
    assert view["totals"]["rejected"] == 1000
    assert len(stats.device_totals) == 50 and all(not k.startswith("stranger") for k in stats.device_totals)
    assert sum(len(slot.devices) for slot in stats._slots) <= 10
