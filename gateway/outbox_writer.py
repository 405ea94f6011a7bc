"""The outbox off the event loop: one writer thread, grouped commits, and the storage's health.

Every write (accept, claim, settle, expire, replay, retention) is queued to one thread, which takes
everything queued so far and runs it in ONE transaction: under load a commit, and with
``synchronous=FULL`` its fsync, is paid once per batch rather than once per message, and the event loop
never waits on SQLite. Reads by id and listings run in the default executor on the outbox's read
connection (WAL lets them proceed while the writer commits); the counts come from memory.

Why a thread of our own and not an async SQLite library: aiosqlite also runs one thread per connection
but commits per call, so grouping commits would be ours to write anyway; the stdlib driver plus a queue is
less code to trust.

Health: a batch that fails with :class:`~gateway.outbox.StorageError` (disk full, I/O error, locked,
corrupt) fails every operation in it (none is kept) and marks the storage as failed; the next batch that
writes successfully marks it healthy again. While failed, :meth:`AsyncOutbox.check` writes a probe, so
health comes back by itself when the cause clears even if nothing else writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.outbox import NewMessage, Outbox, OutboxFull, OutboxItem, Purged, StorageError

__all__ = ["AsyncOutbox", "StorageFailure"]

log = logging.getLogger("gateway.outbox")

T = TypeVar("T")

#: What one operation may raise without spoiling the others in its batch (nothing was written for it).
_OWN_ERRORS = (OutboxFull, ValueError, KeyError)


@dataclass(frozen=True, slots=True)
class StorageFailure:
    """The storage's last failure, as the API shows it."""

    error: StorageError
    since: float  #: epoch seconds of the first failure in this episode

    def to_dict(self) -> dict[str, Any]:
        from gateway.codes import lookup

        return {"code": self.error.code, "name": lookup(self.error.code).name, "kind": self.error.kind,
                "message": str(self.error), "since": self.since}


#: (work, its future, the loop that waits, solo: runs alone, outside any transaction: vacuum, checkpoint)
_Op = tuple[Callable[[Outbox], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop, bool]


class AsyncOutbox:
    """An :class:`Outbox` served by one writer thread. Create and use it on one event loop."""

    def __init__(self, opener: Callable[[], Outbox], *, max_batch: int = 2048,
                 on_health: Callable[[StorageFailure | None], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``opener`` makes the :class:`Outbox`; when it fails with StorageError (a corrupt or locked file,
        say) this starts in the failed state and :meth:`check` calls it again until it works."""
        self.max_batch = max_batch
        self.failure: StorageFailure | None = None
        self._opener = opener
        self._on_health = on_health
        self._clock = clock
        self._store: Outbox | None = None
        self.recovered = 0  #: messages that were in flight when the file was last closed
        try:
            self._adopt(opener())
        except StorageError as exc:
            self.failure = StorageFailure(exc, clock())
            log.error("outbox storage failed (%s): %s", exc.kind, exc)
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="outbox-writer", daemon=True)
        self._thread.start()
        self._closed = False
        self.batches = 0  #: commits made (for the benchmark and tests: batches <= operations)
        self.operations = 0

    def _adopt(self, store: Outbox) -> None:
        self._store = store
        self.recovered = store.recovered

    @property
    def store(self) -> Outbox:
        """The open outbox; raises StorageError while it could not be opened."""
        if self._store is None:
            raise self.failure.error if self.failure is not None else StorageError("outbox not open")
        return self._store

    # -- the writer thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            ops = [first]
            stop = False
            while len(ops) < self.max_batch and not ops[-1][3]:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                ops.append(nxt)
            solo = ops.pop() if ops[-1][3] else None
            if ops:
                self._batch(ops)
            if solo is not None:
                self._batch([solo], transaction=False)
            if stop:
                return

    def _batch(self, ops: list[_Op], *, transaction: bool = True) -> None:
        results: list[tuple[bool, Any]] = []
        failure: StorageError | None = None
        store = self._store
        before = store.changes if store is not None and not store.closed else 0
        try:
            if store is None:
                store = self._opener()  # opened for the first time, or again after a failure
                self._adopt(store)
                before = -1
            with store.transaction() if transaction else contextlib.nullcontext():
                for fn, _, _, _ in ops:
                    try:
                        with store.step() if transaction else contextlib.nullcontext():
                            results.append((True, fn(store)))
                    except _OWN_ERRORS as exc:  # undone alone; the others in the batch stand
                        results.append((False, exc))
        except StorageError as exc:
            failure = exc
        except Exception as exc:  # a bug in one statement: that batch fails, the thread goes on
            log.exception("outbox batch failed")
            results = [(False, exc)] * len(ops)
        if failure is not None:
            results = [(False, failure)] * len(ops)
        wrote = failure is None and store is not None and not store.closed and store.changes > before
        self.batches += 1
        self.operations += len(ops)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for (_, fut, loop, _), (ok, value) in zip(ops, results, strict=True):
            by_loop.setdefault(loop, []).append((fut, ok, value))
        for loop, settled in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for these any more
                loop.call_soon_threadsafe(self._settle, settled, failure, wrote)

    def _settle(self, settled: list[tuple[asyncio.Future[Any], bool, Any]], failure: StorageError | None,
                wrote: bool) -> None:
        """On the loop: health first (so a caller that sees the error also sees the state), then results."""
        if failure is not None:
            if self.failure is None:
                self.failure = StorageFailure(failure, self._clock())
                log.error("outbox storage failed (%s): %s", failure.kind, failure)
                if self._on_health is not None:
                    self._on_health(self.failure)
            else:
                self.failure = StorageFailure(failure, self.failure.since)
        elif wrote and self.failure is not None:
            log.warning("outbox storage works again after %.1fs", max(0.0, self._clock() - self.failure.since))
            self.failure = None
            if self._on_health is not None:
                self._on_health(None)
        for fut, ok, value in settled:
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    async def _submit(self, fn: Callable[[Outbox], T], *, solo: bool = False) -> T:
        if self._closed:
            raise StorageError(f"outbox {self.store.path}: closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, fut, loop, solo))
        return await fut

    # -- writes -------------------------------------------------------------------------------------

    async def put(self, device_id: str, body: bytes, *, now: float, properties: Mapping[str, str] | None = None,
                  deadline: float | None = None, message_id: str | None = None) -> str:
        """Durable when this returns. Raises OutboxFull, ValueError (id taken), StorageError."""
        return await self._submit(lambda s: s.put(device_id, body, now=now, properties=properties,
                                                  deadline=deadline, message_id=message_id))

    async def put_many(self, device_id: str, messages: Sequence[NewMessage], *, now: float,
                       deadline: float | None = None) -> list[tuple[str, OutboxItem | None]]:
        """A batch as ONE operation of the writer (one commit, all or nothing): see :meth:`Outbox.put_many`.
        Durable when this returns. Raises IdTaken, OutboxFull, StorageError."""
        return await self._submit(lambda s: s.put_many(device_id, messages, now=now, deadline=deadline))

    async def claim(self, device_id: str, *, limit: int = 1) -> list[OutboxItem]:
        return await self._submit(lambda s: s.claim(device_id, limit=limit))

    async def delivered(self, message_id: str, *, now: float, possible_duplicate: bool = False) -> bool:
        return await self._submit(lambda s: s.delivered(message_id, now=now, possible_duplicate=possible_duplicate))

    async def delivered_many(self, acks: Sequence[tuple[str, float, bool]]) -> list[bool]:
        """Several acknowledgements ``(message_id, now, possible_duplicate)`` as one operation: one wake-up
        of the writer thread, not one per message."""
        return await self._submit(lambda s: s.delivered_many(acks))

    async def dead_letter(self, message_id: str, *, code: int, reason: str, now: float) -> bool:
        return await self._submit(lambda s: s.dead_letter(message_id, code=code, reason=reason, now=now))

    async def release(self, message_id: str, *, possible_duplicate: bool = False) -> None:
        await self._submit(lambda s: s.release(message_id, possible_duplicate=possible_duplicate))

    async def expire(self, *, now: float, code: int | None = None, reason: str | None = None) -> list[OutboxItem]:
        return await self._submit(lambda s: s.expire(now=now, code=code, reason=reason))

    async def replay(self, message_id: str, *, now: float, deadline: float | None = None) -> OutboxItem:
        return await self._submit(lambda s: s.replay(message_id, now=now, deadline=deadline))

    async def purge(self, *, now: float) -> Purged:
        purged = await self._submit(lambda s: s.purge(now=now))
        if purged.total:
            await self._submit(lambda s: s.vacuum(), solo=True)
        return purged

    async def check(self) -> StorageFailure | None:
        """While failed, try a real write (a probe that grows the file; opening the file first if it never
        opened); returns the failure, if any is left."""
        if self.failure is not None:
            with contextlib.suppress(StorageError):
                await self._submit(lambda s: s.probe(), solo=True)
        return self.failure

    # -- reads --------------------------------------------------------------------------------------

    def get(self, message_id: str) -> OutboxItem | None:
        """A synchronous read by id (indexed; for tests and tools). The API uses :meth:`aget`."""
        return self.store.get(message_id)

    async def aget(self, message_id: str) -> OutboxItem | None:
        store = self.store
        return await asyncio.get_running_loop().run_in_executor(None, store.get, message_id)

    async def dead_letters(self, *, limit: int = 100, device_id: str | None = None) -> list[OutboxItem]:
        store = self.store
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: store.dead_letters(limit=limit, device_id=device_id))

    def counts(self, device_id: str | None = None) -> dict[str, int]:
        """From memory; all zero while the file could not be opened."""
        if self._store is None:
            return Outbox.empty_counts()
        return self._store.counts(device_id)

    def devices_with_pending(self) -> list[str]:
        return self._store.devices_with_pending() if self._store is not None else []

    def file_bytes(self) -> int:
        return self._store.file_bytes() if self._store is not None else 0

    def __len__(self) -> int:
        return len(self._store) if self._store is not None else 0

    # -- closing ------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Finish what is queued, stop the thread, close the file."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        if self._store is not None:
            self._store.close()
