"""Asyncio helpers shared by the handler, the adapters and the sidecar.

The one rule they keep: swallow only the cancellation you caused. ``await task`` after ``task.cancel()``
raises ``CancelledError`` whether the task ended because we cancelled it or because *our caller* is being
cancelled (``asyncio.timeout`` around ``close()``, a shutdown). ``contextlib.suppress(CancelledError)``
hides both, so a caller's timeout silently returns and cuts the cleanup halfway. These helpers re-raise
when the current task itself is being cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(tasks: asyncio.Future[Any] | Iterable[asyncio.Future[Any]] | None) -> None:
    """Cancel ``tasks`` and wait until each has ended; their own errors are not raised here.

    A cancellation of the *calling* task propagates (after the cancel requests went out), so a caller's
    timeout is honoured.
    """
    if tasks is None:
        return
    items = [tasks] if isinstance(tasks, asyncio.Future) else [t for t in tasks if t is not None]
    for task in items:
        task.cancel()
    if not items:
        return
    await asyncio.wait(items)  # raises CancelledError only when the caller is cancelled
    for task in items:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" noise; logged by the owner
