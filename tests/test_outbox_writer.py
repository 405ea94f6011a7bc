"""The outbox's writer thread: grouped commits, the event loop never waits, and storage failures that are
real (a lock held by another connection, a corrupt file, a file-size limit) are reported and heal."""

from __future__ import annotations

import asyncio
import json
import pathlib
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from gateway.codes import code_of
from gateway.outbox import IdTaken, NewMessage, Outbox, OutboxFull, StorageError
from gateway.outbox_writer import AsyncOutbox

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _open(path: pathlib.Path, **kw: object) -> AsyncOutbox:
    return AsyncOutbox(lambda: Outbox(str(path), busy_timeout=0.2, **kw))  # type: ignore[arg-type]


async def test_concurrent_writes_share_commits_and_all_are_durable(tmp_path: pathlib.Path) -> None:
    box = _open(tmp_path / "o.db", synchronous="FULL")
    commits: list[str] = []
    box.store._writer.set_trace_callback(lambda s: commits.append(s) if s == "COMMIT" else None)
    ids = await asyncio.gather(*(box.put(f"d{i % 3}", b"x" * 100, now=i) for i in range(300)))
    assert len(set(ids)) == 300
    assert len(commits) < 100, f"{len(commits)} commits for 300 puts: not grouped"
    claimed = await asyncio.gather(*(box.claim(f"d{i}", limit=500) for i in range(3)))
    await asyncio.gather(*(box.delivered(item.id, now=1) for items in claimed for item in items))
    assert box.counts()["delivered"] == 300
    await box.close()
    again = Outbox(str(tmp_path / "o.db"))
    assert {i.id for i in again} == set(ids) and again.counts()["delivered"] == 300
    again.close()


async def test_one_operation_failing_leaves_the_rest_of_its_batch(tmp_path: pathlib.Path) -> None:
    box = _open(tmp_path / "o.db", max_messages=3)
    results = await asyncio.gather(
        box.put("d", b"a", now=0, message_id="same"), box.put("d", b"b", now=0, message_id="same"),
        box.put("d", b"c", now=0), box.put("d", b"d", now=0), box.put("d", b"e", now=0),
        return_exceptions=True)
    assert results[0] == "same" and isinstance(results[1], ValueError)
    assert sum(isinstance(r, OutboxFull) for r in results) == 1 and len(box) == 3
    assert box.failure is None
    await box.close()


async def test_a_batch_is_one_operation_and_one_commit_of_the_writer(tmp_path: pathlib.Path) -> None:
    box = _open(tmp_path / "o.db", synchronous="FULL")
    commits: list[str] = []
    box.store._writer.set_trace_callback(lambda s: commits.append(s) if s == "COMMIT" else None)
    batches, operations = box.batches, box.operations
    out = await box.put_many("d", [NewMessage(str(i).encode(), {"i": str(i)}) for i in range(300)], now=1)
    assert len(out) == 300 and all(held is None for _, held in out)
    assert (box.batches - batches, box.operations - operations, len(commits)) == (1, 1, 1)
    assert [i.body for i in await box.claim("d", limit=300)] == [str(i).encode() for i in range(300)]
    await box.close()


async def test_a_refused_batch_leaves_the_operations_batched_with_it(tmp_path: pathlib.Path) -> None:
    box = _open(tmp_path / "o.db", max_messages=4)
    await box.put("e", b"x", now=0, message_id="theirs")
    results = await asyncio.gather(
        box.put("d", b"a", now=0, message_id="a"),
        box.put_many("d", [NewMessage(b"1", None, "b"), NewMessage(b"2", None, "theirs")], now=0),
        box.put_many("d", [NewMessage(b"3"), NewMessage(b"4"), NewMessage(b"5")], now=0),  # 2 + 3 > 4
        box.put_many("d", [NewMessage(b"6", None, "c"), NewMessage(b"7", None, "a")], now=0),
        return_exceptions=True)
    assert results[0] == "a" and isinstance(results[1], IdTaken) and isinstance(results[2], OutboxFull)
    assert [mid for mid, _ in results[3]] == ["c", "a"]  # type: ignore[union-attr]
    assert sorted(i.id for i in box.store) == ["a", "c", "theirs"] and len(box) == 3 and box.failure is None
    await box.close()


async def test_a_locked_file_is_reported_without_blocking_the_loop_and_heals(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "o.db"
    health: list[object] = []
    box = AsyncOutbox(lambda: Outbox(str(path), busy_timeout=0.3), on_health=health.append)
    await box.put("d", b"before", now=0)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's writer holds the lock
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(ticker())
    with pytest.raises(StorageError) as caught:
        await box.put("d", b"while locked", now=1)
    assert ticks >= 5  # the loop kept running while the writer waited for the lock
    assert caught.value.kind == "locked" and caught.value.code == code_of("ServiceUnavailable")
    assert box.failure is not None and box.failure.error.kind == "locked" and len(health) == 1
    assert await box.check() is not None  # still locked: the probe fails too
    other.execute("ROLLBACK")
    other.close()
    assert await box.check() is None and health[-1] is None  # healed by the probe, nobody had to write
    await box.put("d", b"after", now=2)
    assert len(box) == 2
    task.cancel()
    await box.close()


async def test_a_corrupt_file_at_start_is_reported_and_replaced_once_moved_away(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not a database, it is a text file that someone wrote here " * 100)
    box = _open(path)
    assert box.failure is not None and box.failure.error.kind == "corrupt"
    with pytest.raises(StorageError):
        await box.put("d", b"x", now=0)
    assert box.counts()["pending"] == 0 and len(box) == 0
    assert await box.check() is not None
    path.rename(tmp_path / "o.db.corrupt")  # what the operator does
    assert await box.check() is None
    await box.put("d", b"x", now=0)
    assert len(box) == 1
    await box.close()


_DISK_FULL = textwrap.dedent("""
    import asyncio, json, os, resource, signal, sys
    from gateway.outbox import Outbox, StorageError
    from gateway.outbox_writer import AsyncOutbox

    async def main(path):
        box = AsyncOutbox(lambda: Outbox(path, max_messages=10**6))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # no file of ours may pass 1 MiB
        stored, error = [], None
        for i in range(400):
            try:
                stored.append(await box.put("d", os.urandom(8000), now=i))
            except StorageError as exc:
                error = exc
                break
        failed = box.failure.to_dict() if box.failure else None
        refused = await box.check() is not None
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # the disk has room again
        healed = await box.check() is None
        after = await box.put("d", b"after", now=999)
        await box.close()
        print(json.dumps({"stored": stored, "kind": error and error.kind, "code": error and error.code,
                          "failed": failed, "refused": refused, "healed": healed, "after": after}))

    asyncio.run(main(sys.argv[1]))
""")


def test_disk_full_for_real_is_reported_and_heals(tmp_path: pathlib.Path) -> None:
    """A file-size limit (RLIMIT_FSIZE) in a child process: SQLite's writes really fail, then really work."""
    path = tmp_path / "o.db"
    out = subprocess.run([sys.executable, "-c", _DISK_FULL, str(path)], cwd=ROOT, capture_output=True, text=True,
                         check=False, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert 10 < len(result["stored"]) < 400, result["stored"]  # some fitted, then the limit bit
    assert result["kind"] in {"full", "io"} and result["code"] == code_of("ServiceUnavailable")
    assert result["failed"]["code"] == code_of("ServiceUnavailable") and result["refused"] and result["healed"]
    box = Outbox(str(path))
    kept = {i.id for i in box}
    assert set(result["stored"]) | {result["after"]} == kept  # every acknowledged put survived, nothing else
    box.close()


async def test_an_operation_that_fails_after_writing_is_undone_alone(tmp_path: pathlib.Path) -> None:
    """A row another program damaged (properties that are not JSON) fails its claim, and the claim's
    UPDATE is undone, while the operations batched with it are kept."""
    path = tmp_path / "o.db"
    box = _open(path)
    await box.put("bad", b"x", now=0, message_id="damaged")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE messages SET properties = '{not json' WHERE id = 'damaged'")
    results = await asyncio.gather(box.claim("bad"), box.put("good", b"y", now=1, message_id="fine"),
                                   return_exceptions=True)
    assert isinstance(results[0], ValueError) and results[1] == "fine"
    assert box.failure is None
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT status, attempts FROM messages WHERE id = 'damaged'").fetchone() == ("pending", 0)
    assert box.counts("bad")["pending"] == 1 and box.counts("good")["pending"] == 1
    await box.close()


_DISK_FULL_BATCHES = textwrap.dedent("""
    import asyncio, json, os, resource, signal, sys
    from gateway.outbox import NewMessage, Outbox, StorageError
    from gateway.outbox_writer import AsyncOutbox

    async def main(path):
        box = AsyncOutbox(lambda: Outbox(path, max_messages=10**6))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # the limit bites in the middle of a batch
        stored, failed = [], []
        for b in range(100):
            batch = [NewMessage(os.urandom(3000), {"b": str(b)}, f"{b}-{i}") for i in range(20)]
            try:
                stored += [mid for mid, _ in await box.put_many("d", batch, now=b)]
            except StorageError:
                failed = [m.message_id for m in batch]
                break
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        healed = await box.check() is None
        await box.close()
        print(json.dumps({"stored": stored, "failed": failed, "healed": healed}))

    asyncio.run(main(sys.argv[1]))
""")


def test_disk_full_in_the_middle_of_a_batch_keeps_none_of_it(tmp_path: pathlib.Path) -> None:
    """A real file-size limit in a child process: the batch the limit bites in is not kept in part."""
    path = tmp_path / "o.db"
    out = subprocess.run([sys.executable, "-c", _DISK_FULL_BATCHES, str(path)], cwd=ROOT, capture_output=True,
                         text=True, check=False, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["failed"] and len(result["stored"]) >= 20 and result["healed"], result  # some fitted, one not
    box = Outbox(str(path))
    kept = [i.id for i in box]
    assert kept == result["stored"]  # every acknowledged batch whole and in order, nothing of the failed one
    box.close()
