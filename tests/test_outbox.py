"""The durable outbox: order, bounds, dead letters, and survival of a killed process."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.outbox import Outbox, OutboxFull


@pytest.fixture
def box(tmp_path: pathlib.Path) -> Outbox:
    b = Outbox(str(tmp_path / "o.db"), max_messages=5)
    yield b  # type: ignore[misc]
    b.close()


def test_fifo_per_device_claim_deliver_and_counts(box: Outbox) -> None:
    ids = [box.put("d", f"m{i}".encode(), now=i) for i in range(3)]
    other = box.put("e", b"x", now=0)
    first = box.claim("d", limit=2)
    assert [i.id for i in first] == ids[:2] and all(i.status == "inflight" and i.attempts == 1 for i in first)
    box.release(ids[0])
    assert [i.id for i in box.claim("d", limit=5)] == [ids[0], ids[2]]  # released one keeps its place
    for mid in ids:
        box.delivered(mid, now=10)
    assert box.counts("d") == {"pending": 0, "inflight": 0, "delivered": 3, "dead": 0, "possible_duplicates": 0}
    assert box.get(other).status == "pending"  # type: ignore[union-attr]
    assert len(box) == 1


def test_bounded_with_backpressure_not_drop(box: Outbox) -> None:
    for i in range(5):
        box.put("d", b"x", now=i)
    with pytest.raises(OutboxFull):
        box.put("d", b"y", now=9)
    box.delivered(box.claim("d")[0].id, now=10)
    box.put("d", b"z", now=11)  # room again once one is done


def test_dead_letters_keep_the_code_and_deadlines_expire(box: Outbox) -> None:
    a = box.put("d", b"a", now=0)
    b = box.put("d", b"b", now=0, deadline=5)
    box.claim("d")
    box.dead_letter(a, code=413001, reason="MessageTooLarge", now=1)
    assert box.expire(now=4) == []
    assert [i.id for i in box.expire(now=6, code=404103)] == [b]
    dead = {i.id: i for i in box.dead_letters()}
    assert dead[a].code == 413001 and dead[b].code == 404103
    assert box.get(b).to_dict()["status"] == "dead"  # type: ignore[union-attr]
    box.delivered(a, now=9)  # a late ack does not resurrect a dead letter
    assert box.get(a).status == "dead"  # type: ignore[union-attr]


def test_duplicate_ids_are_rejected(box: Outbox) -> None:
    box.put("d", b"a", now=0, message_id="same")
    with pytest.raises(ValueError, match="same"):
        box.put("d", b"b", now=0, message_id="same")


def test_inflight_at_restart_comes_back_as_possible_duplicate(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "o.db")
    box = Outbox(path)
    mid = box.put("d", b"a", now=0)
    box.claim("d")
    box.close()
    again = Outbox(path)
    assert again.recovered == 1
    item = again.claim("d")[0]
    assert item.id == mid and item.possible_duplicate and item.attempts == 2
    again.close()


def test_kill_9_loses_nothing_that_put_returned(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "o.db"
    script = textwrap.dedent(f"""
        import sys
        from gateway.outbox import Outbox
        box = Outbox({str(path)!r}, max_messages=10**6)
        for i in range(100000):
            mid = box.put("d", b"payload-%d" % i, now=i, message_id="m%06d" % i)
            print(mid, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=pathlib.Path(__file__).resolve().parents[1])
    assert proc.stdout is not None
    acked = []
    for line in proc.stdout:
        acked.append(line.strip())
        if len(acked) == 2000:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=30)
    box = Outbox(str(path), max_messages=10**6)
    stored = {i.id for i in box}
    assert set(acked) <= stored  # every id the writer was told about survived the kill
    box.close()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "claim", "ok", "fail", "release", "expire"]),
                          st.integers(0, 3)), max_size=40))
def test_no_message_is_ever_lost(tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]) -> None:
    box = Outbox(str(tmp_path_factory.mktemp("o") / "o.db"), max_messages=1000)
    accepted: list[str] = []
    inflight: list[str] = []
    for t, (op, n) in enumerate(ops):
        if op == "put":
            accepted.append(box.put(f"d{n % 2}", b"x", now=t, deadline=t + n * 3 if n else None))
        elif op == "claim":
            inflight += [i.id for i in box.claim(f"d{n % 2}", limit=n + 1)]
        elif op in {"ok", "fail", "release"} and inflight:
            mid = inflight.pop(0)
            if op == "ok":
                box.delivered(mid, now=t)
            elif op == "fail":
                box.dead_letter(mid, code=400004, reason="bad", now=t)
            else:
                box.release(mid)
        elif op == "expire":
            box.expire(now=t)
    statuses = {i.id: i.status for i in box}
    assert set(statuses) == set(accepted)
    for item in box:
        if item.status == "dead":
            assert item.code is not None
    counts = box.counts()
    assert counts["pending"] + counts["inflight"] + counts["delivered"] + counts["dead"] == len(accepted)
    assert len(box) == counts["pending"] + counts["inflight"]
    box.close()
