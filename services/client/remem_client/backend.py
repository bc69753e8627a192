"""The Backend interface the NBD front end serves: a byte-addressed device of fixed size.

The NBD layer validates every request (command, flags, offset + length within `size()`)
before a backend sees it, so a backend only ever gets in-range calls; any byte offset and
length can arrive (a page-based backend does its own read-modify-write). Capabilities
(`can_*`) become the handshake's transmission flags. Implementations: the in-memory
backend (`memory_backend.MemoryBackend`, tests and benchmarks) and the remote backend
(placement + page servers).

Buffer ownership, both directions:

* `pwrite(offset, data, fua)`: `data` belongs to the caller and may be reused as soon as
  the coroutine returns; copy whatever you keep.
* `pread(offset, length)` returns exactly `length` bytes that the backend must not change
  afterwards: the NBD layer may hold the object until the reply is on the socket, while
  later writes to the same range run. Return `bytes` or a buffer nobody else writes to.

Errors: raise `BackendError(errno.EIO, "detail")`; the errno becomes the NBD error of that
request only (see `nbd.wire.nbd_error`). Any other exception is a backend bug: the request
fails with EIO and the traceback is logged.

Optional attributes, read with `getattr(backend, name, False)`:

* `can_fast_zero`: `zero()` is faster than writing zeroes. Without it, a WRITE_ZEROES
  carrying NBD_CMD_FLAG_FAST_ZERO is failed at once with ENOTSUP, as the spec requires.
* `eager`: the backend's coroutines may be started outside any asyncio Task, directly in
  the socket callback, and are only wrapped in a Task if they suspend. This saves a Task
  per request (about 4 us, a third of the per-request budget at 70k IOPS) for backends
  that mostly complete without awaiting. Until their first suspension
  `asyncio.current_task()` is None there, so such a backend must not enter
  `asyncio.timeout()` before its first `await`.
* `task_free` (with `eager`): the coroutines are driven to the end without any Task, each
  awaited future resuming them from its done callback; for backends that nearly always
  suspend (a Task costs about a tenth of a remote 4 KiB read). `asyncio.current_task()` is
  None throughout, so such a backend must never use `asyncio.timeout()` or anything else
  that needs a current task, `asyncio.wait_for` included (Python 3.12 builds it on
  `asyncio.timeout()`): time out with `loop.call_later`. `asyncio.wait` is fine.
* `start_read(offset, length)` (with `task_free`): a READ begun without a coroutine. It
  gives the bytes; a coroutine that completes the read; None, having done nothing (the NBD
  layer then runs `pread`); or an object whose `future` the read waits on and whose
  `finish(future)` then gives the bytes or a coroutine that completes the read. A remote
  4 KiB read then costs a callback, not a coroutine resumed (`RemoteBackend.start_read`).
"""

from __future__ import annotations

from typing import Protocol


class BackendError(Exception):
    """A failed backend operation; `errno` becomes the NBD error of the request."""

    def __init__(self, errno_value: int, detail: str) -> None:
        super().__init__(errno_value, detail)
        self.errno = errno_value
        self.detail = detail

    def __str__(self) -> str:
        return f"[errno {self.errno}] {self.detail}"


class Backend(Protocol):
    """A block device of `size()` bytes; every call is in range and already validated."""

    can_trim: bool
    can_fua: bool
    can_flush: bool
    can_write_zeroes: bool
    can_multi_conn: bool

    def size(self) -> int:
        """Size of the device in bytes (constant for the backend's lifetime)."""
        ...

    async def pread(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Return exactly `length` bytes at `offset` (not modified afterwards, see module doc)."""
        ...

    async def pwrite(self, offset: int, data: memoryview, fua: bool) -> None:
        """Store `data` at `offset`; with `fua`, durable (replicated) before returning."""
        ...

    async def flush(self) -> None:
        """Make every write that completed before this call durable."""
        ...

    async def trim(self, offset: int, length: int) -> None:
        """Hint that the range is unused; later reads may return anything."""
        ...

    async def zero(self, offset: int, length: int, may_trim: bool) -> None:
        """Make the range read back as zeroes; `may_trim` allows deallocating it."""
        ...

    async def close(self) -> None:
        """Release resources; no call follows."""
        ...
