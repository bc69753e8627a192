"""Running a backend coroutine that was started outside any Task and then suspended.

An `eager` backend's coroutine is started right in the socket callback (see `backend.py`);
most complete there. One that suspends is carried on in one of two ways:

* `Driven` (a `task_free` backend): without a Task, each future it waits on resumes it
  straight from its done callback (a backend's hot path may skip the coroutine too:
  `wait_then`, a future and what to do once it is done). A Task per request costs, in
  CPython 3.11, a WeakSet registration, a context copy and a loop callback to start and
  one to report: about a tenth of a 4 KiB read's CPU in the remote backend.
* `continue_in_task` (any other eager backend): a Task adopts it where it stopped, so that
  from its first suspension on it has a current task (`asyncio.timeout` works). No
  production backend takes this path (the memory backend never suspends, the remote one is
  task_free), but it is what the `eager` contract promises any other backend.

Either can be cancelled (server shutdown): the coroutine gets CancelledError where it waits.
"""

from __future__ import annotations

import asyncio
from types import CoroutineType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Generator


def is_coroutine(obj: Any) -> bool:
    """`asyncio.iscoroutine`, quick for what a backend's coroutine nearly always is (a
    native coroutine) and for what it is not: asyncio's own test does an ABC check of
    every object that is not one of the types it saw be coroutines."""
    return type(obj) is CoroutineType or (
        not isinstance(obj, (bytes, bytearray, memoryview)) and asyncio.iscoroutine(obj)
    )


class Driven:
    """Drives a suspended coroutine without a Task: each future it awaits resumes it.

    A base class: the object that needs the coroutine's outcome (an NBD request) is the
    driver itself, so a suspended request costs one object, not two. `drive` starts it;
    `done(self, result, exc, cancelled)` is called once, when the coroutine ends.

    Semantics are a Task's for what a `task_free` backend does: an awaited future that fails
    raises in the coroutine (Future.__await__ does that), a bare `yield` (sleep(0)) resumes
    on the next loop turn, a cancelled future raises CancelledError there and, unless the
    coroutine handles it, it ends cancelled; `asyncio.current_task()` is None throughout.
    """

    __slots__ = ("_coro", "_done", "_finish", "_waiting")

    _coro: Coroutine[Any, Any, Any] | None  # None while `wait_then` waits
    _done: Callable[[Any, Any, BaseException | None, bool], None]
    _finish: Callable[[Any], Any]
    _waiting: asyncio.Future[Any] | asyncio.Handle | None

    def drive(
        self,
        coro: Coroutine[Any, Any, Any],
        yielded: Any,
        done: Callable[[Any, Any, BaseException | None, bool], None],
    ) -> None:
        """Carry on `coro`, which yielded `yielded` when first sent None."""
        self._coro = coro
        self._done = done
        self._wait(yielded)

    def wait_then(
        self,
        future: asyncio.Future[Any],
        finish: Callable[[Any], Any],
        done: Callable[[Any, Any, BaseException | None, bool], None],
    ) -> None:
        """Wait for `future` with no coroutine at all (a backend's hot path: one callback
        instead of a coroutine resumed); then `finish(future)` gives the outcome, or a
        coroutine that carries the work on (driven as `drive` does). `finish` raising
        ends the work with that exception (CancelledError: cancelled)."""
        self._coro = None
        self._finish = finish
        self._done = done
        future.add_done_callback(self._resume)
        self._waiting = future

    def _resume(self, future: Any) -> None:
        if future is not self._waiting:
            return  # cancel() gave up on this future after it had scheduled the call
        self._waiting = None
        try:
            outcome = self._finish(future)
        except asyncio.CancelledError:
            self._done(self, None, None, True)
            return
        except Exception as exc:
            self._done(self, None, exc, False)
            return
        if is_coroutine(outcome):
            self._coro = outcome
            self._step(None)
        else:
            self._done(self, outcome, None, False)

    def _wait(self, yielded: Any) -> None:
        """Resume the coroutine when what it yielded (a future, or None) says so."""
        if yielded is None:  # a bare yield: run again on the next turn of the loop
            self._waiting = asyncio.get_running_loop().call_soon(self._step, None)
        elif getattr(yielded, "_asyncio_future_blocking", None) is not None:
            yielded._asyncio_future_blocking = False
            yielded.add_done_callback(self._step)
            self._waiting = yielded
        else:
            self._waiting = None
            assert self._coro is not None
            self._coro.close()
            self._done(self, None, RuntimeError(f"coroutine yielded {yielded!r}"), False)

    def _step(self, future: Any) -> None:
        if future is not self._waiting and future is not None:
            return  # cancel() gave up on this future after it had scheduled the call
        self._waiting = None
        assert self._coro is not None
        try:
            yielded = self._coro.send(None)
        except StopIteration as stop:
            self._done(self, stop.value, None, False)
        except asyncio.CancelledError:  # a future it awaited was cancelled: as a Task would
            self._done(self, None, None, True)
        except Exception as exc:
            self._done(self, None, exc, False)
        else:
            self._wait(yielded)

    def cancel(self) -> bool:
        """Raise CancelledError in the coroutine where it waits, now (not on a later turn).

        Returns:
            False if it was not waiting (already finished); True otherwise.
        """
        waiting = self._waiting
        if waiting is None:
            return False
        self._waiting = None
        coro = self._coro
        if isinstance(waiting, asyncio.Handle):
            waiting.cancel()
        else:
            # Not waiting.cancel(): the future may be shared with other requests. If it is
            # done, _step (or _resume) is already scheduled and returns at once.
            waiting.remove_done_callback(self._step if coro is not None else self._resume)
        if coro is None:  # `wait_then` waiting: no coroutine to raise it in
            self._done(self, None, None, True)
            return True
        try:
            yielded = coro.throw(asyncio.CancelledError())
        except StopIteration as stop:  # it handled the cancellation and returned
            self._done(self, stop.value, None, False)
        except asyncio.CancelledError:
            self._done(self, None, None, True)
        except Exception as exc:
            self._done(self, None, exc, False)
        else:  # it handled the cancellation and waits for something else
            self._wait(yielded)
        return True


class _Continue:
    """Awaitable that drives a coroutine which already yielded `first` outside any Task.

    Used as `await _Continue(coro, first)` inside a new Task: it passes `first` (the Future
    the coroutine waits on, or None for a bare yield) to the Task as if the coroutine had
    yielded it there, then forwards every later send/throw, exactly like `yield from`.
    The Task's own machinery (cancellation, current_task, futures) works unchanged.
    """

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        value = self._first
        self._first = None
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # thrown in by the Task (cancellation): pass it on
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _continue(coro: Coroutine[Any, Any, Any], first: Any) -> Any:
    return await _Continue(coro, first)


def continue_in_task(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], first: Any
) -> asyncio.Task[Any]:
    """A Task that carries on `coro`, which already yielded `first` outside any Task."""
    return loop.create_task(_continue(coro, first))
