"""The durable outbox: order, bounds, dead letters, and survival of a killed process."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.outbox import IdTaken, NewMessage, Outbox, OutboxFull, Retention


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


def _rows(box: Outbox) -> list[tuple[str, str, bytes, dict[str, str]]]:
    return [(i.id, i.device_id, i.body, i.properties) for i in box]


def test_put_many_stores_a_batch_in_order_in_one_commit(box: Outbox) -> None:
    commits: list[str] = []
    assert box._db is not None
    box._db.set_trace_callback(lambda s: commits.append(s) if s == "COMMIT" else None)
    before = box.changes
    out = box.put_many("d", [NewMessage(b"a", {"k": "v", "$.ct": "text/plain"}, "m-1"), NewMessage(b"b"),
                             NewMessage(b"c", None, "m-3")], now=7, deadline=99)
    assert commits == ["COMMIT"] and box.changes > before
    assert [existing for _, existing in out] == [None, None, None]
    ids = [mid for mid, _ in out]
    assert ids[0] == "m-1" and ids[2] == "m-3" and len(ids[1]) == 32
    assert _rows(box) == [("m-1", "d", b"a", {"k": "v", "$.ct": "text/plain"}), (ids[1], "d", b"b", {}),
                          ("m-3", "d", b"c", {})]
    assert [i.id for i in box.claim("d", limit=5)] == ids  # FIFO in the batch's order
    assert all(i.accepted_at == 7 and i.deadline == 99 for i in box)


def test_put_many_answers_this_devices_stored_ids_as_duplicates(box: Outbox) -> None:
    box.put("d", b"old", now=0, message_id="m-1")
    box.delivered(box.claim("d")[0].id, now=1)
    out = box.put_many("d", [NewMessage(b"new", None, "m-1"), NewMessage(b"x", None, "m-2")], now=2)
    (first, held), (second, fresh) = out
    assert first == "m-1" and held is not None and held.status == "delivered" and held.device_id == "d"
    assert second == "m-2" and fresh is None
    assert box.get("m-1").body == b"old"  # type: ignore[union-attr]  # the stored one is left as it is
    assert box.counts("d")["pending"] == 1 and len(box) == 1  # only the new one counts against the bound


@pytest.mark.parametrize("ids", [["a", "b", "a"], ["x", "theirs", "y"]])
def test_put_many_refuses_a_reused_id_and_keeps_nothing(box: Outbox, ids: list[str]) -> None:
    box.put("e", b"other device", now=0, message_id="theirs")
    rows = _rows(box)
    with pytest.raises(IdTaken) as caught:
        box.put_many("d", [NewMessage(b"1", None, i) for i in ids], now=1)
    assert caught.value.index == 2 if ids[0] == "a" else caught.value.index == 1
    assert caught.value.message_id == ids[caught.value.index]
    assert _rows(box) == rows and box.counts("d") == Outbox.empty_counts()
    assert box.put_many("d", [NewMessage(b"1", None, "a")], now=2)[0] == ("a", None)  # and the box still works


def test_put_many_checks_the_bound_once_for_the_whole_batch(box: Outbox) -> None:
    box.put_many("d", [NewMessage(b"x", None, f"m-{i}") for i in range(3)], now=0)
    with pytest.raises(OutboxFull, match="adds 3"):
        box.put_many("d", [NewMessage(b"y") for _ in range(3)], now=1)
    assert len(box) == 3 and len(list(box)) == 3
    # duplicates add nothing: a batch of 4 where 2 are stored already fits the 2 places left
    out = box.put_many("d", [NewMessage(b"x", None, "m-0"), NewMessage(b"z"), NewMessage(b"x", None, "m-1"),
                             NewMessage(b"z")], now=2)
    assert [held is not None for _, held in out] == [True, False, True, False] and len(box) == 5


def test_put_many_inside_a_wider_transaction_is_undone_alone(box: Outbox) -> None:
    with box.transaction():
        box.put("d", b"kept", now=0, message_id="kept")
        with pytest.raises(IdTaken):
            box.put_many("d", [NewMessage(b"1", None, "n-1"), NewMessage(b"2", None, "kept"),
                               NewMessage(b"3", None, "n-1")], now=1)
        box.put("d", b"also kept", now=0, message_id="also")
    assert [i.id for i in box] == ["kept", "also"] and len(box) == 2


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


def _scanned(path: str) -> dict[str, dict[str, int]]:
    """The counts as a full scan sees them (what the counts table must always agree with)."""
    with sqlite3.connect(path) as db:
        out: dict[str, dict[str, int]] = {}
        for device, status, n in db.execute("SELECT device_id, status, COUNT(*) FROM messages GROUP BY 1, 2"):
            out.setdefault(device, {})[status] = n
    return out


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "claim", "ok", "dup", "fail", "release", "expire", "replay"]),
                          st.integers(0, 3)), max_size=40))
def test_counts_kept_as_rows_change_agree_with_a_scan(tmp_path_factory: pytest.TempPathFactory,
                                                       ops: list[tuple[str, int]]) -> None:
    path = str(tmp_path_factory.mktemp("o") / "o.db")
    box = Outbox(path, max_messages=1000)
    inflight: list[str] = []
    dead: list[str] = []
    delivered = duplicates = 0
    for t, (op, n) in enumerate(ops):
        device = f"d{n % 2}"
        if op == "put":
            box.put(device, b"x", now=t, deadline=t + n if n else None)
        elif op == "claim":
            inflight += [i.id for i in box.claim(device, limit=n + 1)]
        elif op in {"ok", "dup"} and inflight:
            if box.delivered(inflight.pop(0), now=t, possible_duplicate=op == "dup"):
                delivered += 1
                duplicates += op == "dup"
        elif op == "fail" and inflight:
            mid = inflight.pop(0)
            if box.dead_letter(mid, code=400004, reason="bad", now=t):
                dead.append(mid)
        elif op == "release" and inflight:
            box.release(inflight.pop(0))
        elif op == "expire":
            dead += [i.id for i in box.expire(now=t)]
        elif op == "replay" and dead:
            box.replay(dead.pop(0), now=t)
    scan = _scanned(path)
    for device in ("d0", "d1"):
        mine = box.counts(device)
        for status in ("pending", "inflight", "dead", "delivered"):
            assert mine[status] == scan.get(device, {}).get(status, 0), (device, status)
    assert box.counts()["delivered"] == delivered and box.counts()["possible_duplicates"] == duplicates
    assert len(box) == box.counts()["pending"] + box.counts()["inflight"]
    box.close()
    again = Outbox(path, max_messages=1000)  # and the same after a reopen (the table, not only memory)
    assert again.counts()["delivered"] == delivered
    assert again.counts()["pending"] == sum(c.get("pending", 0) + c.get("inflight", 0) for c in scan.values())
    again.close()


def test_retention_removes_delivered_and_dead_by_age_and_count(tmp_path: pathlib.Path) -> None:
    box = Outbox(str(tmp_path / "o.db"), retention=Retention(delivered_age=100, delivered_max=3, dead_age=1000,
                                                                dead_max=2))
    delivered = [box.put("d", b"x", now=0) for _ in range(5)]
    for mid in delivered:
        box.claim("d")
        box.delivered(mid, now=10)
    dead = [box.put("d", b"y", now=0) for _ in range(4)]
    for i, mid in enumerate(dead):
        box.claim("d")
        box.dead_letter(mid, code=400004, reason="bad", now=10 + i)
    kept = box.put("d", b"z", now=0)
    purged = box.purge(now=50)  # nothing old enough yet: only the counts bound applies
    assert purged.delivered == 2 and sorted(i.id for i in purged.dead or ()) == sorted(dead[:2])
    assert [box.get(m) is not None for m in delivered] == [False, False, True, True, True]
    assert {i.id for i in box.dead_letters()} == set(dead[2:])
    assert box.counts()["delivered"] == 5  # a running total: retention does not lower it
    assert box.counts()["dead"] == 2 and box.counts()["pending"] == 1
    purged = box.purge(now=200)  # past delivered_age: every delivered message goes; dead ones stay (1000 s)
    assert purged.delivered == 3 and not purged.dead
    assert box.purge(now=5000).dead and box.dead_letters() == []
    assert box.get(kept) is not None and box.get(kept).status == "pending"  # type: ignore[union-attr]
    box.close()


def test_the_file_gives_space_back_after_retention(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "o.db")
    box = Outbox(path, max_messages=10**6, retention=Retention(delivered_age=0, delivered_max=0))
    body = os.urandom(2000)
    for _ in range(10):
        with box.transaction():
            ids = [box.put("d", body, now=0) for _ in range(200)]
        box.claim("d", limit=200)
        with box.transaction():
            for mid in ids:
                box.delivered(mid, now=1)
    full = os.path.getsize(path)
    assert full > 2000 * 2000  # the bodies did take room
    while box.purge(now=2).total:
        pass
    assert box.vacuum() > 0
    box.close()
    assert os.path.getsize(path) < full / 5
    assert Outbox(path).counts()["delivered"] == 2000


def test_replay_puts_a_dead_letter_back_with_its_id(tmp_path: pathlib.Path) -> None:
    box = Outbox(str(tmp_path / "o.db"), max_messages=2)
    mid = box.put("d", b"a", now=0, properties={"k": "v"})
    box.claim("d")
    box.dead_letter(mid, code=400004, reason="bad", now=1)
    with pytest.raises(KeyError):
        box.replay("no-such-id", now=2)
    item = box.replay(mid, now=2, deadline=100)
    assert item.id == mid and item.status == "pending" and item.code is None and item.deadline == 100
    again = box.claim("d")[0]
    assert again.id == mid and again.attempts == 2 and again.properties == {"k": "v"}  # a new attempt
    with pytest.raises(KeyError):
        box.replay(mid, now=3)  # not dead any more
    box.dead_letter(mid, code=400004, reason="bad", now=3)
    box.put("d", b"b", now=3)
    box.put("d", b"c", now=3)
    with pytest.raises(OutboxFull):
        box.replay(mid, now=4)  # bounded like any other way in
    box.close()


def test_a_file_from_before_the_counts_table_is_migrated(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "o.db")
    with sqlite3.connect(path) as db:  # the first schema, as PR 1 wrote it: no counts, no auto_vacuum
        db.executescript("""
            CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
                device_id TEXT NOT NULL, body BLOB NOT NULL, properties TEXT NOT NULL, accepted_at REAL NOT NULL,
                deadline REAL, status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                duplicate INTEGER NOT NULL DEFAULT 0, done_at REAL, code INTEGER, reason TEXT);
            INSERT INTO messages (id, device_id, body, properties, accepted_at, status, duplicate)
                VALUES ('a', 'd', x'00', '{}', 0, 'delivered', 1), ('b', 'd', x'00', '{}', 0, 'inflight', 0),
                       ('c', 'e', x'00', '{}', 0, 'dead', 0);
        """)
    box = Outbox(path)
    assert box.recovered == 1
    assert box.counts("d") == {"pending": 1, "inflight": 0, "delivered": 1, "dead": 0, "possible_duplicates": 1}
    assert box.counts("e")["dead"] == 1
    assert box._db is not None and box._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    box.close()


def test_delivered_many_settles_a_group_in_one_statement_per_flag(tmp_path: pathlib.Path) -> None:
    box = Outbox(str(tmp_path / "o.db"), max_messages=10_000)
    with box.transaction():
        for i in range(3000):  # enough rows that a plan by status would visit thousands of them per id
            box.put("d", b"x", now=0, message_id=f"m{i}")
    claimed = box.claim("d", limit=1200)
    box.dead_letter(claimed[5].id, code=400000, reason="refused", now=1)
    statements: list[str] = []
    box._writer.set_trace_callback(statements.append)
    acks = [(item.id, 2.0 + n, n % 3 == 0) for n, item in enumerate(claimed)] + [("nope", 9.0, False)]
    done = box.delivered_many(acks)
    box._writer.set_trace_callback(None)
    assert done == [item.id != claimed[5].id for item in claimed] + [False]  # a dead letter stays dead
    assert box.counts("d")["delivered"] == 1199 and box.counts("d")["possible_duplicates"] == 400
    assert box.counts("d")["pending"] == 1800 and box.counts("d")["inflight"] == 0
    flagged = box.get(claimed[3].id)
    assert flagged is not None and flagged.possible_duplicate and flagged.status == "delivered"
    updates = {s for s in statements if s.startswith("UPDATE messages SET status='delivered'")}  # (traced per row)
    assert len(updates) == 3  # 801 unflagged ("nope" included) in two statements of <= 500 ids, 400 flagged in one
    for update in updates:  # found through the id index, never by scanning a status
        plan = " ".join(row[3] for row in box._writer.execute("EXPLAIN QUERY PLAN " + update))
        assert "sqlite_autoindex_messages_1 (id=?)" in plan, plan
    box.close()


_EVERY_WRITE = [("put", 1), ("put", 4), ("put_many", 0), ("put_many", 3), ("claim", 5), ("claim", 2), ("ok", 0),
                ("many", 1), ("dead", 0), ("release", 0), ("expire", 0), ("put", 2), ("claim", 0), ("dead", 0),
                ("replay", 0), ("purge", 0), ("expire", 3), ("claim", 4), ("release", 1), ("many", 5), ("purge", 1)]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "put_many", "claim", "ok", "many", "dead", "release", "expire",
                                           "replay", "purge"]),
                          st.integers(0, 5)), max_size=50))
@example(_EVERY_WRITE)
def test_counts_kept_per_touched_device_match_a_full_read(tmp_path_factory: pytest.TempPathFactory,
                                                          ops: list[tuple[str, int]]) -> None:
    """After each commit only the devices it touched are read again: the mirror must still equal the
    whole counts table, whatever the mix of writes."""
    from gateway.outbox import NewMessage

    box = Outbox(str(tmp_path_factory.mktemp("o") / "o.db"), max_messages=1000,
                 retention=Retention(delivered_max=2, dead_max=1))
    inflight: list[str] = []
    dead: list[str] = []
    for t, (op, n) in enumerate(ops):
        device = f"d{n % 3}"
        if op == "put":
            box.put(device, b"x", now=t, deadline=t + n if n else None)
        elif op == "put_many":
            box.put_many(device, [NewMessage(b"y"), NewMessage(b"z")], now=t)
        elif op == "claim":
            inflight += [i.id for i in box.claim(device, limit=n + 1)]
        elif op == "ok" and inflight:
            box.delivered(inflight.pop(0), now=t)
        elif op == "many" and inflight:
            box.delivered_many([(mid, t, n % 2 == 0) for mid in inflight[: n + 1]])
            del inflight[: n + 1]
        elif op == "dead" and inflight:
            mid = inflight.pop()
            box.dead_letter(mid, code=400000, reason="no", now=t)
            dead.append(mid)
        elif op == "release" and inflight:
            box.release(inflight.pop(), possible_duplicate=True)
        elif op == "expire":
            dead += [i.id for i in box.expire(now=t)]
        elif op == "replay" and dead:
            with contextlib.suppress(KeyError):  # purged meanwhile
                box.replay(dead.pop(), now=t)
        elif op == "purge":
            box.purge(now=t)
        mirrored, mirrored_open = box._counts, box._open
        box._refresh_counts()  # the whole table
        assert mirrored == box._counts and mirrored_open == box._open, (op, n)
    box.close()
