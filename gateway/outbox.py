"""The durable outbox: a message accepted by the gateway is delivered or dead-lettered, never lost.

SQLite (stdlib) in WAL mode. ``put`` commits before it returns, so a 202 answered after ``put`` survives
a ``kill -9`` of the process (WAL with ``synchronous=NORMAL`` is crash-safe for the application; set
``synchronous="FULL"`` to survive power loss too, at the cost of an fsync per message).

Delivery is at-least-once: an item is *claimed* (in flight) before it is sent and becomes *delivered* only
after the hub acknowledged it. Items in flight when the process died are pending again on the next
open, counted as possible duplicates; the stable message id travels upstream so consumers can drop them.

Sans clock: every method that needs the time takes ``now`` (epoch seconds).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gateway.codes import code_of

__all__ = ["Outbox", "OutboxFull", "OutboxItem", "Status"]

Status = Literal["pending", "inflight", "delivered", "dead"]

_EXPIRED = code_of("OperationTimedOut")  # the deadline passed before the hub acknowledged it

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
"""


class OutboxFull(Exception):
    """The outbox holds its maximum: the caller must apply backpressure (HTTP 429), not drop."""


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
        return data


_COLUMNS = "id, device_id, body, properties, accepted_at, deadline, status, attempts, duplicate, done_at, code, reason"


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
    )


class Outbox:
    """A bounded, durable queue of telemetry per device. Thread-safe; calls are short transactions."""

    def __init__(
        self,
        path: str,
        *,
        max_messages: int = 100_000,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    ) -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        self.path = path
        self.max_messages = max_messages
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.executescript(_SCHEMA)
        # Whatever was in flight when the last process ended may or may not have reached the hub.
        self.recovered = self._db.execute(
            "UPDATE messages SET status='pending', duplicate=1 WHERE status='inflight'"
        ).rowcount
        self._open = int(self._db.execute(
            "SELECT COUNT(*) FROM messages WHERE status IN ('pending','inflight')"
        ).fetchone()[0])

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
        """Persist one message and return its id (durable when this returns). Raises OutboxFull."""
        mid = message_id or uuid.uuid4().hex
        props = json.dumps(dict(properties or {}), separators=(",", ":"))
        with self._lock:
            if self._open >= self.max_messages:
                raise OutboxFull(f"outbox holds {self._open} undelivered messages (limit {self.max_messages})")
            try:
                self._db.execute(
                    "INSERT INTO messages (id, device_id, body, properties, accepted_at, deadline, status) "
                    "VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                    (mid, device_id, body, props, now, deadline),
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"message id {mid!r} already in the outbox") from None
            self._open += 1
        return mid

    # -- delivering -------------------------------------------------------------------------
    def claim(self, device_id: str, *, limit: int = 1) -> list[OutboxItem]:
        """Take the oldest pending messages of a device into flight (attempts + 1), in order."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE device_id=? AND status='pending' ORDER BY seq LIMIT ?",
                (device_id, limit),
            ).fetchall()
            if rows:
                self._db.executemany(
                    "UPDATE messages SET status='inflight', attempts=attempts+1 WHERE id=?", [(r[0],) for r in rows]
                )
        return [_item((*r[:6], "inflight", r[7] + 1, *r[8:])) for r in rows]

    def delivered(self, message_id: str, *, now: float, possible_duplicate: bool = False) -> None:
        self._finish(message_id, "delivered", now, None, None, possible_duplicate)

    def dead_letter(self, message_id: str, *, code: int, reason: str, now: float) -> None:
        """The hub refused it for good, or its deadline passed: keep it, with the code, listable."""
        self._finish(message_id, "dead", now, code, reason[:500], False)

    def release(self, message_id: str, *, possible_duplicate: bool = False) -> None:
        """Back to pending after a transient failure (its place in the order is kept)."""
        with self._lock:
            self._db.execute(
                "UPDATE messages SET status='pending', duplicate=MAX(duplicate, ?) WHERE id=? AND status='inflight'",
                (int(possible_duplicate), message_id),
            )

    def expire(self, *, now: float, code: int | None = None, reason: str | None = None) -> list[str]:
        """Dead-letter every pending message whose deadline has passed; returns their ids.

        ``code`` says why it could not go in time (the connection's last error, say); without one it is
        OperationTimedOut.
        """
        with self._lock:
            ids = [r[0] for r in self._db.execute(
                "SELECT id FROM messages WHERE status='pending' AND deadline IS NOT NULL AND deadline <= ?", (now,)
            )]
            why = (reason or "deadline passed before delivery")[:500]
            self._db.executemany(
                "UPDATE messages SET status='dead', done_at=?, code=?, reason=? WHERE id=?",
                [(now, code or _EXPIRED, why, i) for i in ids],
            )
            self._open -= len(ids)
        return ids

    def _finish(
        self, message_id: str, status: Status, now: float, code: int | None, reason: str | None, dup: bool
    ) -> None:
        with self._lock:
            changed = self._db.execute(
                "UPDATE messages SET status=?, done_at=?, code=?, reason=?, duplicate=MAX(duplicate, ?) "
                "WHERE id=? AND status IN ('pending','inflight')",
                (status, now, code, reason, int(dup), message_id),
            ).rowcount
            self._open -= changed

    # -- looking ----------------------------------------------------------------------------
    def get(self, message_id: str) -> OutboxItem | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM messages WHERE id=?", (message_id,)).fetchone()
        return _item(row) if row else None

    def devices_with_pending(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT device_id FROM messages WHERE status='pending'")]

    def dead_letters(self, *, limit: int = 100, device_id: str | None = None) -> list[OutboxItem]:
        query = f"SELECT {_COLUMNS} FROM messages WHERE status='dead'"
        args: tuple[Any, ...] = ()
        if device_id is not None:
            query += " AND device_id=?"
            args = (device_id,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        return [_item(r) for r in rows]

    def counts(self, device_id: str | None = None) -> dict[str, int]:
        """Messages per status (and possible duplicates delivered), overall or for one device."""
        where, args = ("WHERE device_id=?", (device_id,)) if device_id is not None else ("", ())
        with self._lock:
            rows = self._db.execute(f"SELECT status, COUNT(*) FROM messages {where} GROUP BY status", args).fetchall()
            joiner = "AND" if where else "WHERE"
            dups = self._db.execute(
                f"SELECT COUNT(*) FROM messages {where} {joiner} status='delivered' AND duplicate=1", args
            ).fetchone()[0]
        out = {"pending": 0, "inflight": 0, "delivered": 0, "dead": 0}
        out.update({status: n for status, n in rows})
        out["possible_duplicates"] = int(dups)
        return out

    def __len__(self) -> int:
        return self._open

    def __iter__(self) -> Iterator[OutboxItem]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM messages ORDER BY seq").fetchall()
        return iter([_item(r) for r in rows])

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.close()
