"""Work held for devices that are offline: bounded per-device FIFO queues (no waiting here)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass

__all__ = ["DeviceHolds"]


@dataclass(eq=False)
class _Held:
    device_id: str
    deadline: float
    waiter: asyncio.Future[bool]
    settled: asyncio.Future[None] | None = None


class DeviceHolds:
    """Bounded per-device FIFO queues of held operations. Not thread-safe; the handler's loop owns it."""

    def __init__(self, max_per_device: int) -> None:
        self.max_per_device = max_per_device
        self._queues: dict[str, deque[_Held]] = {}

    def add(self, item: _Held, *, front: bool = False) -> bool:
        """Queue ``item``; False when the device's queue is full (a re-held item always fits)."""
        queue = self._queues.setdefault(item.device_id, deque())
        if front:
            queue.appendleft(item)
            return True
        if len(queue) >= self.max_per_device:
            return False
        queue.append(item)
        return True

    def pop(self, device_id: str) -> _Held | None:
        """The oldest still-waiting item of the device, or None."""
        queue = self._queues.get(device_id)
        while queue:
            item = queue.popleft()
            if not item.waiter.done():
                return item
        self._queues.pop(device_id, None)
        return None

    def remove(self, item: _Held) -> None:
        queue = self._queues.get(item.device_id)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(item)
            if not queue:
                del self._queues[item.device_id]

    def count(self, device_id: str | None = None) -> int:
        if device_id is not None:
            return len(self._queues.get(device_id, ()))
        return sum(len(q) for q in self._queues.values())

    def devices(self) -> list[str]:
        return list(self._queues)

    def drain(self) -> list[_Held]:
        items = [item for queue in self._queues.values() for item in queue]
        self._queues.clear()
        return items

