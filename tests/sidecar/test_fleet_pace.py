"""The start's pacing: a busy upstream (slow first connects) halves the connects under way, once per
target period however many slow ones end together; fast ones raise it back, within bounds."""

from __future__ import annotations

from gateway.sidecar.service import START_CONCURRENCY, StartPace


def _run(pace: StartPace, n: int) -> None:
    for _ in range(n):
        assert pace.room()
        pace.begin()


def test_slow_first_connects_halve_the_limit_once_per_period_and_fast_ones_raise_it() -> None:
    pace = StartPace(target=5.0)
    assert pace.limit == START_CONCURRENCY
    _run(pace, START_CONCURRENCY)
    assert not pace.room()
    for _ in range(40):  # a whole batch ends slowly at once: one halving, not forty
        pace.done(12.0, now=100.0)
    assert pace.limit == START_CONCURRENCY // 2 and pace.running == START_CONCURRENCY - 40
    _run(pace, 8)  # 24 still under way, limit 32: room for 8 more
    assert not pace.room()
    pace.done(12.0, now=104.9)  # still within the quiet period
    assert pace.limit == START_CONCURRENCY // 2
    pace.done(12.0, now=105.0)  # the next period: halved again
    assert pace.limit == START_CONCURRENCY // 4
    for t in range(200):
        pace.done(30.0, now=200.0 + 5 * t)
        pace.begin()
    assert pace.limit == 4  # never below the floor
    for _ in range(1000):
        pace.done(0.1, now=2000.0)
        pace.begin()
    assert pace.limit == START_CONCURRENCY  # nor above where it started
    pace.done(0.1, now=2500.0)
    assert pace.limit == START_CONCURRENCY
    pace.done(30.0, now=3000.0)
    pace.done(2.0, now=3001.0)  # between a quarter of the target and the target: unchanged
    assert pace.limit == START_CONCURRENCY // 2
