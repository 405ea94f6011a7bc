"""The per-state device counts kept as state changes happen agree with a recount, whatever the order of
changes; the per-device series pick devices needing attention first; ``supports`` is read defensively."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from gateway.sidecar.metrics import DeviceStates

_STATES = ["idle", "connecting", "connected", "disconnected-retrying", "throttled", "parked", "stopped", "closed"]
_changes = st.lists(st.tuples(st.integers(0, 30), st.sampled_from(["mqtt", "amqp"]), st.sampled_from(_STATES)),
                    max_size=200)


@given(_changes, st.integers(0, 40))
def test_counts_kept_on_events_match_a_recount(changes: list[tuple[int, str, str]], limit: int) -> None:
    states = DeviceStates()
    last: dict[str, tuple[str, str]] = {}
    for n, first_transport, state in changes:
        device = f"d{n:02}"
        transport = last.get(device, (first_transport, ""))[0]  # a device keeps its transport
        states.set(device, transport, state)
        last[device] = (transport, state)
    assert states.per_state == dict(Counter(last.values()))
    assert len(states) == len(last)
    unhealthy = sorted(d for d, (_, s) in last.items() if s not in ("connected", "throttled"))
    picked = states.pick(sorted(last), limit)
    assert len(picked) == min(limit, len(last)) and len(set(picked)) == len(picked)
    assert picked[:len(unhealthy)] == unhealthy[:limit]  # attention first, by id
    rest = picked[len(unhealthy):]
    assert rest == sorted(rest) and not set(rest) & set(unhealthy)
