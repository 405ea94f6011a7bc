"""cancel_and_wait swallows the cancellation it caused, never the caller's."""

from __future__ import annotations

import asyncio

import pytest

from gateway.aio import cancel_and_wait


async def test_the_cancelled_task_ends_and_its_cancellation_is_not_raised() -> None:
    task = asyncio.ensure_future(asyncio.sleep(3600))
    await cancel_and_wait(task)
    assert task.cancelled()


async def test_a_callers_timeout_propagates_while_waiting_for_a_slow_cleanup() -> None:
    release = asyncio.Event()

    async def slow_cleanup() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await release.wait()  # a cleanup that takes its time

    task = asyncio.ensure_future(slow_cleanup())
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await cancel_and_wait(task)
    release.set()
    await asyncio.wait([task])
    assert task.cancelled()


async def test_errors_of_the_tasks_are_not_raised_here() -> None:
    async def boom() -> None:
        raise RuntimeError("owner logs it")

    task = asyncio.ensure_future(boom())
    await asyncio.sleep(0)
    await cancel_and_wait([task, None])  # type: ignore[list-item]
    assert isinstance(task.exception(), RuntimeError)
