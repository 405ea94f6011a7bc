"""Closing under a deadline: a caller's timeout around ``close()`` is honoured, and nothing is left.

The peer has gone silent (a frozen link), so the AMQP close handshake cannot complete: ``close()`` would
wait for it up to the transport's close timeout. A caller that gives it 0.1 s must get ``TimeoutError``
(its cancellation is not swallowed), the handler must end closed, and the proton thread, every task and
every descriptor the connection held must be gone soon after.
"""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from gateway.handler import Handler, State
from tests.peers import missing_peer
from tests.peers.proxy import TcpProxy
from tests.scenarios.conftest import Stage, fast_policy
from tests.scenarios.kit import transport_for, until


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _amqp_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("amqp-") and t.is_alive()]


async def test_a_timeout_around_close_raises_and_leaves_no_task_thread_or_descriptor(stage: Stage) -> None:
    if not os.path.isdir("/proc/self/fd"):
        missing_peer("descriptors are counted through /proc")  # CI (Linux) has it: a skip there would hide a leak
    threads_before = set(_amqp_threads())
    tasks_before = set(asyncio.all_tasks())
    async with TcpProxy("127.0.0.1", stage.port("amqp")) as proxy:
        fds_before = _fds()
        handler = Handler(transport_for(stage, "amqp", port=proxy.port, idle_timeout=None, close_timeout=5.0),
                          policy=fast_policy(0.01), identity="d1")
        await handler.start()
        await handler.wait_connected(timeout=10)
        proxy.freeze()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await handler.close()
        assert handler.state is State.CLOSED
        # the interrupted cleanup finishes by itself: the thread ends once its close timeout runs out
        assert await until(lambda: not (set(_amqp_threads()) - threads_before), timeout=20), _amqp_threads()
        assert await until(lambda: not (set(asyncio.all_tasks()) - tasks_before - {asyncio.current_task()}),
                           timeout=10), set(asyncio.all_tasks()) - tasks_before
        proxy.cut()
        assert await until(lambda: _fds() <= fds_before, timeout=10), (_fds(), fds_before)
