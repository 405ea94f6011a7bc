"""The durable outbox: a message accepted by the gateway is delivered or dead-lettered, never lost.

SQLite (stdlib) in WAL mode. A write is durable once its transaction commits: WAL with
``synchronous=NORMAL`` survives a ``kill -9``; ``synchronous="FULL"`` survives power loss too, at the
cost of one fsync per commit. :meth:`Outbox.transaction` groups many writes into one commit, which is how
the sidecar's writer thread (:mod:`gateway.outbox_writer`) pays that fsync once per batch, not per message.

Delivery is at-least-once: an item is *claimed* (in flight) before it is sent and becomes *delivered* only
after the hub acknowledged it. Items in flight when the process died are pending again on the next
open, counted as possible duplicates; the stable message id travels upstream so consumers can drop them.

Bounded: at most ``max_messages`` undelivered; delivered messages and dead letters leave the store after
an age or beyond a count (:class:`Retention`, applied by :meth:`Outbox.purge`), and the freed pages go
back to the file system (incremental vacuum, a WAL size limit). Counts per device and status live in a
small table kept by triggers as rows change, mirrored in memory after each commit: reading them never
scans the messages.

Every SQLite failure that is not a bug (disk full, I/O error, database locked, a corrupt file) surfaces as
:class:`StorageError`, with IoT Hub's ``ServiceUnavailable`` code: the condition is transient from the
app's side (it clears when space is freed or the lock released) and the app's answer is the same as for a
hub that cannot take the message now: keep it and retry later.

Sans clock: every method that needs the time takes ``now`` (epoch seconds, stored in the file, so it must
mean the same after a restart).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from gateway.codes import code_of

__all__ = ["IdTaken", "NewMessage", "Outbox", "OutboxFull", "OutboxItem", "Purged", "Retention", "Status",
           "StorageError"]

Status = Literal["pending", "inflight", "delivered", "dead"]

_EXPIRED = code_of("OperationTimedOut")  # the deadline passed before the hub acknowledged it
_UNAVAILABLE = code_of("ServiceUnavailable")
_SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    device_id   TEXT NOT NULL,
    body        BLOB NOT NULL,
    properties  TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    deadline    REAL,
    status      TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    duplicate   INTEGER NOT NULL DEFAULT 0,
    done_at     REAL,
    code        INTEGER,
    reason      TEXT
);
CREATE INDEX IF NOT EXISTS pending_by_device ON messages (device_id, status, seq);
CREATE INDEX IF NOT EXISTS by_status ON messages (status, seq);
CREATE INDEX IF NOT EXISTS done_by_status ON messages (status, done_at) WHERE done_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS pending_deadline ON messages (deadline) WHERE status = 'pending' AND deadline IS NOT NULL;
-- Counts per device and status, kept by triggers as rows change. 'delivered' and 'possible_duplicates'
-- are running totals (retention removing a delivered row does not lower them); 'pending', 'inflight'
-- and 'dead' are what the store holds now.
CREATE TABLE IF NOT EXISTS counts (
    device_id TEXT NOT NULL,
    status    TEXT NOT NULL,
    n         INTEGER NOT NULL,
    PRIMARY KEY (device_id, status)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS count_insert AFTER INSERT ON messages BEGIN
    INSERT INTO counts VALUES (NEW.device_id, NEW.status, 1) ON CONFLICT DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS count_update AFTER UPDATE OF status ON messages WHEN OLD.status != NEW.status BEGIN
    UPDATE counts SET n = n - 1 WHERE device_id = OLD.device_id AND status = OLD.status
        AND OLD.status != 'delivered';
    INSERT INTO counts VALUES (NEW.device_id, NEW.status, 1) ON CONFLICT DO UPDATE SET n = n + 1;
    INSERT INTO counts SELECT NEW.device_id, 'possible_duplicates', 1
        WHERE NEW.status = 'delivered' AND NEW.duplicate = 1 ON CONFLICT DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS count_delete AFTER DELETE ON messages WHEN OLD.status != 'delivered' BEGIN
    UPDATE counts SET n = n - 1 WHERE device_id = OLD.device_id AND status = OLD.status;
END;
CREATE TABLE IF NOT EXISTS probe (x BLOB);
"""

_STATUSES = ("pending", "inflight", "delivered", "dead", "possible_duplicates")
#: SQLite primary result codes (the low byte of the extended code) and what they mean here.
_KINDS = {5: "locked", 6: "locked", 8: "read-only", 10: "io", 11: "corrupt", 13: "full", 14: "cannot-open",
          26: "corrupt"}


class OutboxFull(Exception):
    """The outbox holds its maximum: the caller must apply backpressure (HTTP 429), not drop."""


class IdTaken(ValueError):
    """A message id another device's message holds, or one a batch uses twice: nothing of the batch is kept.
    ``index`` is the offending message's place in the batch."""

    def __init__(self, message: str, *, message_id: str, index: int) -> None:
        super().__init__(message)
        self.message_id = message_id
        self.index = index


class NewMessage(NamedTuple):
    """One message of :meth:`Outbox.put_many`: ``properties`` as stored (the app's and the system ones)."""

    body: bytes
    properties: Mapping[str, str] | None = None
    message_id: str | None = None  #: None: a fresh id is made


class StorageError(Exception):
    """The outbox file cannot be written or read now (disk full, I/O error, locked, corrupt).

    ``code`` is a catalog code (ServiceUnavailable: transient from the caller's side, retry later);
    ``kind`` is one of full, io, locked, read-only, corrupt, cannot-open, other.
    """

    code: int = _UNAVAILABLE

    def __init__(self, message: str, *, kind: str = "other") -> None:
        super().__init__(message)
        self.kind = kind

    @classmethod
    def from_sqlite(cls, exc: sqlite3.Error, path: str) -> StorageError:
        primary = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        kind = _KINDS.get(primary, "other")
        if kind == "other" and "not a database" in str(exc):
            kind = "corrupt"
        err = cls(f"outbox {path}: {exc}", kind=kind)
        err.__cause__ = exc
        return err


def _is_storage(exc: BaseException) -> bool:
    """A condition of the file or the disk, not a bug in a statement."""
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(
        exc, (sqlite3.ProgrammingError, sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.NotSupportedError)
    )


@dataclass(frozen=True, slots=True)
class Retention:
    """How long settled messages stay, so the file does not grow without bound (0 age: at the next purge)."""

    delivered_age: float = 3600.0  #: seconds a delivered message stays (readable with GET) after delivery
    delivered_max: int = 10_000  #: at most this many delivered messages are kept (the newest)
    dead_age: float = 7 * 86_400.0  #: seconds a dead letter stays
    dead_max: int = 10_000  #: at most this many dead letters are kept (the newest)


@dataclass(frozen=True, slots=True)
class Purged:
    delivered: int = 0
    dead: list[OutboxItem] | None = None  #: the dead letters removed (without body), for the log

    @property
    def total(self) -> int:
        return self.delivered + len(self.dead or ())


@dataclass(frozen=True, slots=True)
class OutboxItem:
    id: str
    device_id: str
    body: bytes
    properties: dict[str, str]
    accepted_at: float
    deadline: float | None
    status: Status
    attempts: int
    possible_duplicate: bool
    done_at: float | None = None
    code: int | None = None
    reason: str | None = None
    seq: int = 0

    def to_dict(self, *, with_body: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "device_id": self.device_id,
            "status": self.status,
            "accepted_at": self.accepted_at,
            "deadline": self.deadline,
            "attempts": self.attempts,
            "possible_duplicate": self.possible_duplicate,
            "done_at": self.done_at,
            "code": self.code,
            "reason": self.reason,
        }
        if with_body:
            data["body"] = self.body.decode("utf-8", "replace")
            data["properties"] = dict(self.properties)
        return data


_COLUMNS = ("id, device_id, body, properties, accepted_at, deadline, status, attempts, duplicate, done_at, code, "
            "reason, seq")
_NO_BODY = _COLUMNS.replace("body", "x''")  # listings that do not need the bodies do not read them
_INSERT = ("INSERT INTO messages (id, device_id, body, properties, accepted_at, deadline, status) "
           "VALUES (?, ?, ?, ?, ?, ?, 'pending') ON CONFLICT (id) DO NOTHING")


def _item(row: tuple[Any, ...]) -> OutboxItem:
    return OutboxItem(
        id=row[0],
        device_id=row[1],
        body=bytes(row[2]),
        properties=json.loads(row[3]),
        accepted_at=row[4],
        deadline=row[5],
        status=row[6],
        attempts=row[7],
        possible_duplicate=bool(row[8]),
        done_at=row[9],
        code=row[10],
        reason=row[11],
        seq=row[12],
    )


class Outbox:
    """A bounded, durable queue of telemetry per device.

    Thread-safe. Writes go through one connection (one writer: SQLite allows no more); each write is its
    own transaction unless made inside :meth:`transaction`. Reads use a second connection, so a reader
    never waits for a writer's fsync (WAL lets both proceed).
    """

    def __init__(
        self,
        path: str,
        *,
        max_messages: int = 100_000,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        retention: Retention | None = None,
        busy_timeout: float = 1.0,
    ) -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        self.path = path
        self.max_messages = max_messages
        self.retention = retention or Retention()
        self._wlock = threading.RLock()
        self._rlock = threading.Lock()
        self._depth = 0
        self._counts: dict[str, dict[str, int]] = {}  #: published after each commit, never changed in place
        self._open = 0  #: undelivered (pending + inflight), as of the last commit
        self._open_delta = 0  #: what the open transaction has added to that so far (for the bound)
        #: devices whose counts the open transaction changed: only they are read again after its commit
        self._touched: set[str] = set()
        self._db: sqlite3.Connection | None = None
        self._rdb: sqlite3.Connection | None = None
        try:
            self._db = self._connect(busy_timeout)
            self._setup(synchronous)
            self._rdb = self._connect(busy_timeout)
            self._rdb.execute("PRAGMA cache_size=-512")  # lookups by id and short listings: 512 KiB is plenty
        except sqlite3.Error as exc:
            self._close_connections()
            if _is_storage(exc):
                raise StorageError.from_sqlite(exc, path) from exc
            raise
        self._refresh_counts()

    def _connect(self, busy_timeout: float) -> sqlite3.Connection:
        return sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=busy_timeout)

    def _setup(self, synchronous: str) -> None:
        db = self._writer
        fresh = not db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone()
        if fresh:
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes effect before the first table
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("PRAGMA journal_size_limit=4194304")  # the WAL shrinks back to 4 MiB after a checkpoint
        version = db.execute("PRAGMA user_version").fetchone()[0]
        db.executescript(_SCHEMA)
        if version < _SCHEMA_VERSION:
            # A file from before the counts table: count once now, then the triggers keep it.
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM counts")
            db.execute("INSERT INTO counts SELECT device_id, status, COUNT(*) FROM messages GROUP BY 1, 2")
            db.execute("INSERT INTO counts SELECT device_id, 'possible_duplicates', COUNT(*) FROM messages "
                       "WHERE status = 'delivered' AND duplicate = 1 GROUP BY 1")
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            db.execute("COMMIT")
        if db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            db.execute("VACUUM")  # once, for a file made without it
        # Whatever was in flight when the last process ended may or may not have reached the hub.
        self.recovered: int = db.execute(
            "UPDATE messages SET status='pending', duplicate=1 WHERE status='inflight'"
        ).rowcount

    @property
    def _writer(self) -> sqlite3.Connection:
        if self._db is None:
            raise StorageError(f"outbox {self.path}: closed", kind="other")
        return self._db

    # -- transactions -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes into one commit (one fsync with synchronous=FULL). Raises StorageError; on any
        exception nothing of the group is kept."""
        with self._wlock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            db = self._writer
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._storage(exc) from exc
            self._depth = 1
            self._open_delta = 0
            self._touched = set()
            try:
                yield
                db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                with contextlib.suppress(sqlite3.Error):
                    self._refresh_counts()
                if isinstance(exc, sqlite3.Error):
                    raise self._storage(exc) from exc
                raise
            finally:
                self._depth = 0
                self._open_delta = 0
            with contextlib.suppress(sqlite3.Error):
                self._refresh_counts(self._touched)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One operation inside :meth:`transaction`: when it raises, what it wrote is undone and the rest of
        the transaction stands (a SAVEPOINT)."""
        db = self._writer
        delta = self._open_delta
        db.execute("SAVEPOINT step")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK TO step")
            db.execute("RELEASE step")
            self._open_delta = delta
            raise
        db.execute("RELEASE step")

    def _storage(self, exc: sqlite3.Error) -> Exception:
        return StorageError.from_sqlite(exc, self.path) if _is_storage(exc) else exc

    @property
    def closed(self) -> bool:
        return self._db is None

    @property
    def changes(self) -> int:
        """Rows written through this outbox since it opened (tells a write batch from an idle one)."""
        return self._writer.total_changes

    def _refresh_counts(self, devices: set[str] | None = None) -> None:
        """Mirror the counts table in memory: every device (at open, after a rollback), or only ``devices``,
        those a committed transaction touched (a commit must not read 10,000 devices' rows to publish one
        device's change). A new dict is published; the old one is never changed in place."""
        if devices is not None and not devices:
            return
        ids = list(devices or ())
        rows: list[tuple[str, str, int]] = []
        if devices is None:
            rows = self._writer.execute("SELECT device_id, status, n FROM counts").fetchall()
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            rows += self._writer.execute(
                f"SELECT device_id, status, n FROM counts WHERE device_id IN ({','.join('?' * len(part))})", part
            ).fetchall()
        fresh: dict[str, dict[str, int]] = {}
        for device, status, n in rows:
            fresh.setdefault(device, {})[status] = n
        counts = fresh if devices is None else {**self._counts, **fresh}
        for device in ids:
            if device not in fresh:  # no row left for it
                counts.pop(device, None)
        self._counts = counts
        # O(devices) in C; far cheaper than the query it replaces, and no running total to get wrong
        self._open = sum(c.get("pending", 0) + c.get("inflight", 0) for c in counts.values())

    # -- accepting --------------------------------------------------------------------------
    def put(
        self,
        device_id: str,
        body: bytes,
        *,
        now: float,
        properties: Mapping[str, str] | None = None,
        deadline: float | None = None,
        message_id: str | None = None,
    ) -> str:
        """Persist one message and return its id (durable once the transaction commits). Raises OutboxFull,
        ValueError (the id is taken), StorageError."""
        mid = message_id or uuid.uuid4().hex
        props = json.dumps(dict(properties or {}), separators=(",", ":"))
        with self.transaction():
            if self._open_now() >= self.max_messages:
                raise OutboxFull(f"outbox holds {self._open_now()} undelivered messages (limit {self.max_messages})")
            added = self._writer.execute(_INSERT, (mid, device_id, body, props, now, deadline)).rowcount
            if not added:
                raise ValueError(f"message id {mid!r} already in the outbox")
            self._open_delta += 1
            self._touched.add(device_id)
        return mid

    def put_many(self, device_id: str, messages: Sequence[NewMessage], *, now: float,
                 deadline: float | None = None) -> list[tuple[str, OutboxItem | None]]:
        """Persist a batch of one device's messages in one transaction (one commit): all or nothing.

        Per message, in order: its id, and None when it was stored now, or the message this device
        already stored under that id (a duplicate, left as it is; the item comes without its body). One
        bound check for the whole batch, on the messages it adds. Raises IdTaken (an id used twice in the
        batch, or held by another device's message), OutboxFull (the new messages do not fit),
        StorageError; then nothing of the batch is kept.
        """
        rows = [(m.message_id or uuid.uuid4().hex, device_id, m.body,
                 json.dumps(dict(m.properties or {}), separators=(",", ":")), now, deadline) for m in messages]
        seen: set[str] = set()
        for index, row in enumerate(rows):
            if row[0] in seen:
                raise IdTaken(f"message id {row[0]!r} is used twice in the batch", message_id=row[0], index=index)
            seen.add(row[0])
        out: list[tuple[str, OutboxItem | None]] = []
        with self.transaction(), self.step():  # the savepoint undoes the batch alone inside a wider transaction
            db = self._writer
            added = 0
            for index, row in enumerate(rows):
                if db.execute(_INSERT, row).rowcount:
                    added += 1
                    out.append((row[0], None))
                    continue
                held = db.execute(f"SELECT {_NO_BODY} FROM messages WHERE id=?", (row[0],)).fetchone()
                if held is None or held[1] != device_id:
                    raise IdTaken(f"message id {row[0]!r} is already used by another device's message",
                                  message_id=row[0], index=index)
                out.append((row[0], _item(held)))
            if self._open_now() + added > self.max_messages:
                raise OutboxFull(f"outbox holds {self._open_now()} undelivered messages (limit {self.max_messages}); "
                                 f"the batch adds {added}")
            self._open_delta += added
            self._touched.add(device_id)
        return out

    def _open_now(self) -> int:
        """Undelivered messages including the open transaction's (the writer's view, for the bound)."""
        return self._open + self._open_delta

    # -- delivering -------------------------------------------------------------------------
    def claim(self, device_id: str, *, limit: int = 1) -> list[OutboxItem]:
        """Take the oldest pending messages of a device into flight (attempts + 1), in order: one statement."""
        with self.transaction():
            rows = self._writer.execute(
                f"UPDATE messages SET status='inflight', attempts=attempts+1 WHERE seq IN ("
                f"SELECT seq FROM messages WHERE device_id=? AND status='pending' ORDER BY seq LIMIT ?) "
                f"RETURNING {_COLUMNS}",
                (device_id, limit),
            ).fetchall()
            self._touched.add(device_id)
        return sorted((_item(r) for r in rows), key=lambda i: i.seq)

    def delivered(self, message_id: str, *, now: float, possible_duplicate: bool = False) -> bool:
        """The hub acknowledged it. False when it was no longer open (a late ack after a dead letter)."""
        return self._finish(message_id, "delivered", now, None, None, possible_duplicate)

    def delivered_many(self, acks: Sequence[tuple[str, float, bool]]) -> list[bool]:
        """Several acknowledgements ``(message_id, now, possible_duplicate)`` in one transaction, one
        statement per flag (and per 500 ids): under load a commit writes each touched index page once for a
        whole group instead of once per message. Each group takes its latest ``now`` (the acknowledgements
        of one group arrive within one write's time). Says, per ack, whether it was still open."""
        done: set[str] = set()
        with self.transaction():
            for dup in (False, True):
                group = [(mid, now) for mid, now, flag in acks if bool(flag) is dup]
                for start in range(0, len(group), 500):
                    part = group[start:start + 500]
                    marks = ",".join("?" * len(part))
                    # "+status": with a list of ids SQLite would otherwise walk the status index (every
                    # pending row, measured ~1.5 ms per ack at 30,000 pending) instead of the id index.
                    rows = self._writer.execute(
                        f"UPDATE messages SET status='delivered', done_at=?, code=NULL, reason=NULL, "
                        f"duplicate=MAX(duplicate, ?) WHERE id IN ({marks}) AND +status IN ('pending','inflight') "
                        f"RETURNING id, device_id",
                        (max(now for _, now in part), int(dup), *(mid for mid, _ in part)),
                    ).fetchall()
                    done.update(row[0] for row in rows)
                    self._touched.update(row[1] for row in rows)
            self._open_delta -= len(done)
        return [mid in done for mid, _, _ in acks]

    def dead_letter(self, message_id: str, *, code: int, reason: str, now: float) -> bool:
        """The hub refused it for good, or its deadline passed: keep it, with the code, listable."""
        return self._finish(message_id, "dead", now, code, reason[:500], False)

    def release(self, message_id: str, *, possible_duplicate: bool = False) -> None:
        """Back to pending after a transient failure (its place in the order is kept)."""
        with self.transaction():
            row = self._writer.execute(
                "UPDATE messages SET status='pending', duplicate=MAX(duplicate, ?) WHERE id=? AND status='inflight' "
                "RETURNING device_id",
                (int(possible_duplicate), message_id),
            ).fetchone()
            if row is not None:
                self._touched.add(row[0])

    def expire(self, *, now: float, code: int | None = None, reason: str | None = None) -> list[OutboxItem]:
        """Dead-letter every pending message whose deadline has passed (one statement); returns them
        (without their bodies).

        ``code`` says why it could not go in time (the connection's last error, say); without one it is
        OperationTimedOut.
        """
        why = (reason or "deadline passed before delivery")[:500]
        with self.transaction():
            rows = self._writer.execute(
                f"UPDATE messages SET status='dead', done_at=?, code=?, reason=? "
                f"WHERE status='pending' AND deadline IS NOT NULL AND deadline <= ? "
                f"RETURNING {_NO_BODY}",
                (now, code or _EXPIRED, why, now),
            ).fetchall()
            self._open_delta -= len(rows)
            items = [_item(r) for r in rows]
            self._touched.update(item.device_id for item in items)
        return sorted(items, key=lambda i: i.seq)

    def replay(self, message_id: str, *, now: float, deadline: float | None = None) -> OutboxItem:
        """A dead letter back to pending, same id (its next claim is a new attempt). KeyError when there is
        no dead letter with this id; OutboxFull when the outbox holds its maximum."""
        with self.transaction():
            if self._open_now() >= self.max_messages:
                raise OutboxFull(f"outbox holds {self._open_now()} undelivered messages (limit {self.max_messages})")
            row = self._writer.execute(
                f"UPDATE messages SET status='pending', deadline=?, done_at=NULL, code=NULL, reason=NULL "
                f"WHERE id=? AND status='dead' RETURNING {_COLUMNS}",
                (deadline, message_id),
            ).fetchone()
            if row is None:
                raise KeyError(message_id)
            self._open_delta += 1
            item = _item(row)
            self._touched.add(item.device_id)
        return item

    def _finish(
        self, message_id: str, status: Status, now: float, code: int | None, reason: str | None, dup: bool
    ) -> bool:
        with self.transaction():
            row = self._writer.execute(
                "UPDATE messages SET status=?, done_at=?, code=?, reason=?, duplicate=MAX(duplicate, ?) "
                "WHERE id=? AND status IN ('pending','inflight') RETURNING device_id",
                (status, now, code, reason, int(dup), message_id),
            ).fetchone()
            if row is not None:
                self._open_delta -= 1
                self._touched.add(row[0])
        return row is not None

    # -- retention --------------------------------------------------------------------------
    def purge(self, *, now: float, limit: int = 5000) -> Purged:
        """Remove delivered messages and dead letters past their age or beyond their count (at most
        ``limit`` rows of each per call, so one call never holds the writer long)."""
        r = self.retention
        with self.transaction():
            db = self._writer
            delivered = db.execute(
                "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE status='delivered' "
                "AND done_at <= ? LIMIT ?)", (now - r.delivered_age, limit)).rowcount
            delivered += db.execute(
                "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE status='delivered' AND seq <= "
                "(SELECT seq FROM messages WHERE status='delivered' ORDER BY seq DESC LIMIT 1 OFFSET ?) "
                "ORDER BY seq LIMIT ?)", (r.delivered_max, limit)).rowcount
            columns = _NO_BODY
            dead = db.execute(
                f"DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE status='dead' "
                f"AND done_at <= ? LIMIT ?) RETURNING {columns}", (now - r.dead_age, limit)).fetchall()
            dead += db.execute(
                f"DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE status='dead' AND seq <= "
                f"(SELECT seq FROM messages WHERE status='dead' ORDER BY seq DESC LIMIT 1 OFFSET ?) "
                f"ORDER BY seq LIMIT ?) RETURNING {columns}", (r.dead_max, limit)).fetchall()
            removed = [_item(row) for row in dead]
            self._touched.update(item.device_id for item in removed)  # a removed delivered row counts on
        return Purged(delivered, removed)

    def vacuum(self, *, min_free_pages: int = 256) -> int:
        """Give free pages back to the file system once enough have piled up; returns pages freed."""
        with self._wlock:
            db = self._writer
            try:
                free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
                if free < min_free_pages:
                    return 0
                # executescript steps the pragma to its end (execute() would free a single page)
                db.executescript("PRAGMA incremental_vacuum;")
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                raise self._storage(exc) from exc
            return free

    def probe(self, size: int = 65536) -> None:
        """A write that grows the file by about ``size`` bytes and takes it back: does storage work again?"""
        with self.transaction():
            self._writer.execute("INSERT INTO probe VALUES (zeroblob(?))", (size,))
        with self.transaction():
            self._writer.execute("DELETE FROM probe")

    # -- looking ----------------------------------------------------------------------------
    def _read(self, query: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._rlock:
            if self._rdb is None:
                raise StorageError(f"outbox {self.path}: closed")
            try:
                return self._rdb.execute(query, args).fetchall()
            except sqlite3.Error as exc:
                raise self._storage(exc) from exc

    def get(self, message_id: str) -> OutboxItem | None:
        rows = self._read(f"SELECT {_COLUMNS} FROM messages WHERE id=?", (message_id,))
        return _item(rows[0]) if rows else None

    def devices_with_pending(self) -> list[str]:
        return sorted(d for d, c in self._counts.items() if c.get("pending", 0) + c.get("inflight", 0) > 0)

    def dead_letters(self, *, limit: int = 100, device_id: str | None = None) -> list[OutboxItem]:
        query = f"SELECT {_COLUMNS} FROM messages WHERE status='dead'"
        args: tuple[Any, ...] = ()
        if device_id is not None:
            query += " AND device_id=?"
            args = (device_id,)
        return [_item(r) for r in self._read(query + " ORDER BY seq DESC LIMIT ?", (*args, limit))]

    @staticmethod
    def empty_counts() -> dict[str, int]:
        return dict.fromkeys(_STATUSES, 0)

    def counts(self, device_id: str | None = None) -> dict[str, int]:
        """Messages per status, overall or for one device, from memory (no query). ``delivered`` and
        ``possible_duplicates`` are totals since the file was made; the others what the store holds."""
        out = self.empty_counts()
        if device_id is not None:  # O(1): a page of 1,000 devices out of 10,000 must not walk them all
            out.update(self._counts.get(device_id, ()))
            return out
        for per in self._counts.values():
            for status, n in per.items():
                out[status] = out.get(status, 0) + n
        return out

    def file_bytes(self) -> int:
        """The file and its WAL, as they take space on disk now."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += os.path.getsize(self.path + suffix)
        return total

    def __len__(self) -> int:
        return self._open

    def __iter__(self) -> Iterator[OutboxItem]:
        return iter([_item(r) for r in self._read(f"SELECT {_COLUMNS} FROM messages ORDER BY seq")])

    def _close_connections(self) -> None:
        for db in (self._db, self._rdb):
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
        self._db = self._rdb = None

    def close(self) -> None:
        with self._wlock, self._rlock:
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._close_connections()
