"""Driving a backend coroutine that suspended outside a Task: task-free, or adopted by a Task."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
from remem_client.nbd.drive import Driven, continue_in_task

Outcome = tuple[str, Any, BaseException | None, bool]


class Job(Driven):
    """What the NBD layer's Request is to a Driven: the object the outcome is about."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class Recorder:
    """The `done` callback: every call it got, as (job name, result, exc, cancelled)."""

    def __init__(self) -> None:
        self.calls: list[Outcome] = []

    def __call__(self, job: Job, result: Any, exc: BaseException | None, cancelled: bool) -> None:
        self.calls.append((job.name, result, exc, cancelled))


def drive(coro: Coroutine[Any, Any, Any], done: Recorder) -> Job | None:
    """Start `coro` as the NBD layer does; a Job drives it on if it suspends."""
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        done(Job("req"), stop.value, None, False)
        return None
    job = Job("req")
    job.drive(coro, yielded, done)
    return job


async def test_futures_resume_it_without_any_task() -> None:
    loop = asyncio.get_running_loop()
    first: asyncio.Future[int] = loop.create_future()
    seen: list[object] = []

    async def work() -> int:
        value = await first
        await asyncio.sleep(0)  # a bare yield: resumed on the next loop turn
        await asyncio.sleep(0.001)  # a timer future
        seen.append(asyncio.current_task())
        return value + 1

    done = Recorder()
    assert drive(work(), done) is not None
    loop.call_soon(first.set_result, 41)
    while not done.calls:
        await asyncio.sleep(0.001)
    assert done.calls == [("req", 42, None, False)]
    assert seen == [None]


async def test_a_failed_future_raises_in_the_coroutine() -> None:
    loop = asyncio.get_running_loop()
    failing: asyncio.Future[None] = loop.create_future()
    caught: list[BaseException] = []

    async def work() -> None:
        try:
            await failing
        except OSError as exc:
            caught.append(exc)
            raise ValueError("backend gave up") from exc

    done = Recorder()
    drive(work(), done)
    failing.set_exception(OSError("link down"))
    await asyncio.sleep(0)
    assert len(caught) == 1
    [(_request, result, exc, cancelled)] = done.calls
    assert result is None and isinstance(exc, ValueError) and not cancelled


async def test_a_cancelled_future_ends_the_request_cancelled() -> None:
    waited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def work() -> None:
        await waited

    done = Recorder()
    drive(work(), done)
    waited.cancel()
    await asyncio.sleep(0)
    assert done.calls == [("req", None, None, True)]


async def test_cancel_raises_in_the_coroutine_at_once_and_leaves_the_future_alone() -> None:
    shared: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    events: list[str] = []

    async def work() -> None:
        try:
            await shared
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        events.append("resumed")

    done = Recorder()
    driven = drive(work(), done)
    assert driven is not None
    assert driven.cancel() is True
    assert events == ["cancelled"] and done.calls == [("req", None, None, True)]
    # another request may wait on the same future: it is not cancelled, and completing it
    # resumes nothing
    assert not shared.done()
    shared.set_result(None)
    await asyncio.sleep(0)
    assert events == ["cancelled"] and len(done.calls) == 1
    assert driven.cancel() is False  # finished


async def test_cancel_at_a_bare_yield() -> None:
    events: list[str] = []

    async def work() -> None:
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        events.append("resumed")

    done = Recorder()
    driven = drive(work(), done)
    assert driven is not None and driven.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert events == ["cancelled"] and done.calls == [("req", None, None, True)]


async def test_cancel_after_the_future_completed_but_before_it_resumed() -> None:
    waited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def work() -> int:
        return await waited

    done = Recorder()
    driven = drive(work(), done)
    assert driven is not None
    waited.set_result(5)  # the resume is now scheduled
    assert driven.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert done.calls == [("req", None, None, True)]  # once, and cancelled


async def test_a_coroutine_may_handle_the_cancellation() -> None:
    loop = asyncio.get_running_loop()
    cleanup: asyncio.Future[str] = loop.create_future()

    async def work() -> str:
        try:
            await loop.create_future()
        except asyncio.CancelledError:
            return await cleanup  # it goes on waiting, for something else
        return "not reached"

    done = Recorder()
    driven = drive(work(), done)
    assert driven is not None and driven.cancel()
    assert done.calls == []
    cleanup.set_result("cleaned up")
    await asyncio.sleep(0)
    assert done.calls == [("req", "cleaned up", None, False)]


async def test_yielding_something_else_than_a_future_is_an_error() -> None:
    class Odd:
        def __await__(self) -> Any:
            yield "not a future"

    async def work() -> None:
        await Odd()

    done = Recorder()
    drive(work(), done)
    [(_request, _result, exc, cancelled)] = done.calls
    assert isinstance(exc, RuntimeError) and not cancelled


async def test_continue_in_task_adopts_a_started_coroutine() -> None:
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[Any] | None] = []

    async def work() -> int:
        tasks.append(asyncio.current_task())
        await asyncio.sleep(0.001)
        tasks.append(asyncio.current_task())
        async with asyncio.timeout(5):  # needs a current task: it has one now
            await asyncio.sleep(0)
        return 7

    started: asyncio.Future[asyncio.Task[Any]] = loop.create_future()

    def socket_callback() -> None:  # where the NBD layer starts it: outside any Task
        coro = work()
        started.set_result(continue_in_task(loop, coro, coro.send(None)))

    loop.call_soon(socket_callback)
    task = await started
    assert await task == 7
    assert tasks == [None, task]


async def test_cancelling_the_adopting_task_cancels_the_coroutine() -> None:
    loop = asyncio.get_running_loop()
    events: list[str] = []

    async def work() -> None:
        try:
            await loop.create_future()
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    coro = work()
    task = continue_in_task(loop, coro, coro.send(None))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events == ["cancelled"]
