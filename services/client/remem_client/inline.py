"""Finishing work in the socket callback that caused it, instead of on later loop turns.

A 4 KiB read used to take five turns of the event loop: the NBD request arrived; the
page server message left (a `call_soon`); the reply arrived; the waiting request resumed
(futures call back through `call_soon`); its NBD reply was written (a `call_soon` again).
At queue depth 1 the process sleeps between requests, so each turn costs several times its
warm cost. Two pieces make it two turns, one per arrival:

- `CallbackEnd`: work put off to the end of the callback running (the NBD connection's
  request callback, a page server link's reply callback), so that what many requests cause
  in one callback still goes out once (one message per server, one write of NBD replies),
  but in that callback rather than a loop turn later. Outside such a callback it runs on
  the next loop turn, as `call_soon` did.
- `InlineFuture`: a future whose `resolve_inline` calls its plain callbacks (a request
  driven without a Task, `nbd.drive.Driven`) at once. Everything else about it is an
  asyncio future's: Tasks, `asyncio.wait`/`wait_for` and `set_result`/`set_exception`
  schedule their callbacks on the loop, so no Task is ever stepped from inside another
  and failure paths keep the timing they had.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Generator
from contextvars import Context
from typing import TYPE_CHECKING, Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
_PENDING, _DONE, _CANCELLED = 0, 1, 2


class CallbackEnd:
    """Work deferred to the end of the socket callback running (`enter`/`exit` bracket it;
    they nest). One per event loop (`callback_end`)."""

    __slots__ = ("__weakref__", "_depth", "_due", "_loop", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._depth = 0
        self._due: list[Callable[[], None]] = []
        self._scheduled = False

    def enter(self) -> None:
        self._depth += 1

    def exit(self) -> None:
        """Leave the callback; the outermost exit runs what was deferred meanwhile."""
        self._depth -= 1
        if not self._depth and self._due:
            self._run()

    def defer(self, work: Callable[[], None]) -> None:
        """Run `work` when the callback running ends; outside one, on the next loop turn.
        Callers keep their own flag so that each piece of work is deferred once."""
        self._due.append(work)
        if not self._depth and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._run_scheduled)

    def _run_scheduled(self) -> None:
        self._scheduled = False
        if not self._depth:
            self._run()

    def _run(self) -> None:
        # Held while running: work deferred by this work runs in this same pass.
        self._depth += 1
        try:
            while self._due:
                due, self._due = self._due, []
                for work in due:
                    try:
                        work()
                    except Exception:  # as the loop's handler would for a call_soon callback
                        log.exception("deferred %r failed", work)
        finally:
            self._depth -= 1


_ends: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CallbackEnd] = (
    weakref.WeakKeyDictionary()
)


def callback_end(loop: asyncio.AbstractEventLoop) -> CallbackEnd:
    """The `CallbackEnd` of `loop` (shared by every connection and link on it)."""
    end = _ends.get(loop)
    if end is None:
        end = _ends[loop] = CallbackEnd(loop)
    return end


if TYPE_CHECKING:
    # What it is to a type checker: an asyncio future (its methods are checked against it).
    _FutureBase = asyncio.Future
else:

    class _FutureBase(Generic[T]):
        __slots__ = ()


class InlineFuture(_FutureBase[T]):
    """An asyncio-compatible future that `resolve_inline` can resolve with its plain
    callbacks run at once (see the module docstring)."""

    __slots__ = (
        "_asyncio_future_blocking",
        "_error",
        "_event_loop",
        "_status",
        "_value",
        "_waiters",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._event_loop = loop
        self._status = _PENDING
        self._value: Any = None
        self._error: BaseException | None = None
        self._waiters: list[tuple[Callable[[Any], object], Context | None]] = []
        self._asyncio_future_blocking = False  # asyncio.isfuture() and Tasks read it

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._event_loop

    def done(self) -> bool:
        return self._status != _PENDING

    def cancelled(self) -> bool:
        return self._status == _CANCELLED

    def result(self) -> T:
        if self._status == _CANCELLED:
            raise asyncio.CancelledError
        if self._status == _PENDING:
            raise asyncio.InvalidStateError("result is not set")
        if self._error is not None:
            raise self._error
        result: T = self._value
        return result

    def exception(self) -> BaseException | None:
        if self._status == _CANCELLED:
            raise asyncio.CancelledError
        if self._status == _PENDING:
            raise asyncio.InvalidStateError("exception is not set")
        return self._error

    def add_done_callback(
        self, callback: Callable[[Any], object], *, context: Context | None = None
    ) -> None:
        if self._status != _PENDING:
            self._event_loop.call_soon(callback, self, context=context)
        else:
            self._waiters.append((callback, context))

    def remove_done_callback(self, callback: Callable[[Any], object]) -> int:
        kept = [entry for entry in self._waiters if entry[0] != callback]
        removed = len(self._waiters) - len(kept)
        self._waiters = kept
        return removed

    def set_result(self, result: T) -> None:
        self._finish(result, None, _DONE)
        self._schedule_callbacks()

    def set_exception(self, exception: type | BaseException) -> None:
        error = exception() if isinstance(exception, type) else exception
        assert isinstance(error, BaseException)
        self._finish(None, error, _DONE)
        self._schedule_callbacks()

    def cancel(self, msg: Any = None) -> bool:
        if self._status != _PENDING:
            return False
        self._status = _CANCELLED
        self._schedule_callbacks()
        return True

    def resolve_inline(self, result: T) -> None:
        """Set the result and run the callbacks added without a context now (a Task's,
        which come with one, are scheduled on the loop as usual)."""
        self._finish(result, None, _DONE)
        callbacks, self._waiters = self._waiters, []
        for callback, context in callbacks:
            if context is not None:
                self._event_loop.call_soon(callback, self, context=context)
                continue
            try:
                callback(self)
            except Exception:  # as the loop's handler would: the other callbacks still run
                log.exception("callback %r of a future failed", callback)

    def _finish(self, result: Any, exception: BaseException | None, state: int) -> None:
        if self._status != _PENDING:
            raise asyncio.InvalidStateError("future is already done")
        self._value = result
        self._error = exception
        self._status = state

    def _schedule_callbacks(self) -> None:
        callbacks, self._waiters = self._waiters, []
        call_soon = self._event_loop.call_soon
        for callback, context in callbacks:
            call_soon(callback, self, context=context)

    def __await__(self) -> Generator[Any, None, T]:
        if self._status == _PENDING:
            self._asyncio_future_blocking = True
            yield self
        if self._status == _PENDING:
            raise RuntimeError("await wasn't used with future")
        return self.result()

    __iter__ = __await__
