"""The NBD server in-process over a real Unix socket, with instrumented backends: out-of-order
completion, backends that suspend, backend errors, buffer reuse, graceful shutdown, metrics.

The server runs on the test's event loop; the blocking raw client runs in a thread.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry
from remem_client.backend import BackendError
from remem_client.memory_backend import MemoryBackend
from remem_client.metrics import build_metrics
from remem_client.nbd import transmission, wire
from remem_client.server import NbdServer

from .nbd_raw import RawNbd

T = TypeVar("T")
SIZE = 64 << 20


class SlowBackend(MemoryBackend):
    """Not eager; reads of offset 0 and writes of `slow_writes` offsets wait on an event."""

    eager = False

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.release = asyncio.Event()
        self.slow_writes: set[int] = set()

    async def pread(self, offset: int, length: int) -> bytes:
        if offset == 0:
            await self.release.wait()
        return await super().pread(offset, length)

    async def pwrite(self, offset: int, data: memoryview, fua: bool) -> None:
        if offset in self.slow_writes:
            await self.release.wait()
        await super().pwrite(offset, data, fua)


class SuspendingBackend(MemoryBackend):
    """Eager, but every other call suspends first; after the first await it is in a Task."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.calls = 0
        self.tasks_seen = 0

    async def _maybe_suspend(self) -> None:
        self.calls += 1
        if self.calls % 2:
            await asyncio.sleep(0.001 * (self.calls % 3))
            # asyncio.timeout needs a current task: it is there after the first suspension
            async with asyncio.timeout(5):
                await asyncio.sleep(0)
            self.tasks_seen += asyncio.current_task() is not None

    async def pread(self, offset: int, length: int) -> bytes:
        await self._maybe_suspend()
        return await super().pread(offset, length)

    async def pwrite(self, offset: int, data: memoryview, fua: bool) -> None:
        await self._maybe_suspend()
        # copy only after suspending: the payload buffer must still hold this write's data
        await super().pwrite(offset, data, fua)


class TaskFreeBackend(MemoryBackend):
    """Eager and task_free (as the remote backend): suspends on futures and bare yields,
    fails some requests only after suspending, and records whether a Task ran it."""

    task_free = True

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.calls = 0
        self.in_task = 0
        self.fail_after_suspending: set[int] = set()
        self.cancelled_while_waiting: set[int] = set()

    async def _suspend(self, offset: int) -> None:
        self.calls += 1
        if self.calls % 3:
            await asyncio.sleep(0.001 * (self.calls % 2))  # a future, or a bare yield
            await asyncio.wait_for(asyncio.sleep(0), 5)  # needs no current task
        self.in_task += asyncio.current_task() is not None
        if offset in self.fail_after_suspending:
            raise BackendError(errno.EIO, "replica lost while waiting")
        if offset in self.cancelled_while_waiting:
            waited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(waited.cancel)
            await waited

    async def pread(self, offset: int, length: int) -> bytes:
        await self._suspend(offset)
        return await super().pread(offset, length)

    async def pwrite(self, offset: int, data: memoryview, fua: bool) -> None:
        await self._suspend(offset)
        await super().pwrite(offset, data, fua)


class HangingBackend(MemoryBackend):
    """Writes to `HANG_AT` wait on a future nobody completes; driven as `kind` says:
    "driven" (eager and task_free), "continued" (eager: a Task adopts it once it suspends)
    or "task" (not eager: a Task from the start)."""

    HANG_AT = 1 << 20

    def __init__(self, size: int, kind: str) -> None:
        super().__init__(size)
        self.eager = kind != "task"
        self.task_free = kind == "driven"
        self.stuck: asyncio.Future[None] | None = None
        self.cancelled = 0
        self.resumed = 0

    async def pwrite(self, offset: int, data: memoryview, fua: bool) -> None:
        if offset == self.HANG_AT:
            self.stuck = asyncio.get_running_loop().create_future()
            try:
                await self.stuck
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            self.resumed += 1
        await super().pwrite(offset, data, fua)


class FailingBackend(MemoryBackend):
    """Raises what `failure` maps an offset to (errno or exception instance)."""

    def __init__(self, size: int, failures: dict[int, BaseException]) -> None:
        super().__init__(size)
        self.failures = failures

    async def pread(self, offset: int, length: int) -> bytes:
        if offset in self.failures:
            raise self.failures[offset]
        return await super().pread(offset, length)

    async def pwrite(self, offset: int, data: memoryview, fua: bool) -> None:
        if offset in self.failures:
            raise self.failures[offset]
        await super().pwrite(offset, data, fua)


@asynccontextmanager
async def serving(
    backend: MemoryBackend, tmp_path: Path
) -> AsyncIterator[tuple[NbdServer, str, CollectorRegistry]]:
    registry = CollectorRegistry()
    server = NbdServer(backend, build_metrics(registry))
    path = tmp_path / "nbd.sock"
    await server.listen_unix(path)
    try:
        yield server, str(path), registry
    finally:
        await server.shutdown(5.0)


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


def pattern(seed: int, length: int) -> bytes:
    return bytes((seed * 7 + i) % 251 for i in range(length))


async def test_a_slow_read_does_not_hold_back_a_later_fast_one(tmp_path: Path) -> None:
    backend = SlowBackend(SIZE)
    async with serving(backend, tmp_path) as (_server, path, _registry):
        client = await in_thread(lambda: RawNbd.unix(path).connect())
        await in_thread(client.write, 4096, b"b" * 4096, 9)
        await in_thread(client.request, wire.Cmd.READ, 1, 0, 4096)
        await in_thread(client.request, wire.Cmd.READ, 2, 4096, 4096)
        first = await in_thread(client.reply)
        assert first.handle == 2 and first.data == b"b" * 4096
        backend.release.set()
        second = await in_thread(client.reply)
        assert second.handle == 1 and second.data == bytes(4096)
        client.close()


@pytest.mark.parametrize("structured", [True, False])
async def test_eager_backend_that_suspends_keeps_every_payload_intact(
    tmp_path: Path, structured: bool
) -> None:
    backend = SuspendingBackend(SIZE)
    async with serving(backend, tmp_path) as (_server, path, _registry):

        def run() -> None:
            with RawNbd.unix(path).connect(structured=structured) as client:
                # 64 small writes pipelined: their payloads share receive buffers, which must
                # stay untouched until each suspended write has copied its data
                for i in range(64):
                    client.request(wire.Cmd.WRITE, i, i * 5000, 3000, 0, pattern(i, 3000))
                # and big ones, received straight into pooled buffers
                for i in range(4):
                    big = pattern(100 + i, 300_000)
                    client.request(
                        wire.Cmd.WRITE, 100 + i, (8 << 20) + i * 300_000, 300_000, 0, big
                    )
                replies = [client.reply() for _ in range(68)]
                assert sorted(r.handle for r in replies) == [*range(64), *range(100, 104)]
                assert all(r.error == 0 for r in replies)
                for i in range(64):
                    assert client.read(i * 5000, 3000) == pattern(i, 3000), i
                for i in range(4):
                    got = client.read((8 << 20) + i * 300_000, 300_000)
                    assert got == pattern(100 + i, 300_000), i
                client.disconnect()

        await in_thread(run)
    assert backend.tasks_seen > 30


async def test_a_task_free_backend_is_driven_to_the_end_without_tasks(tmp_path: Path) -> None:
    backend = TaskFreeBackend(SIZE)
    backend.fail_after_suspending = {7 * 5000}
    backend.cancelled_while_waiting = {9 * 5000}  # answered as a cancelled Task would be
    async with serving(backend, tmp_path) as (_server, path, _registry):

        def run() -> None:
            with RawNbd.unix(path).connect(structured=True) as client:
                for i in range(64):
                    client.request(wire.Cmd.WRITE, i, i * 5000, 3000, 0, pattern(i, 3000))
                replies = {r.handle: r.error for r in (client.reply() for _ in range(64))}
                assert replies.pop(7) == errno.EIO
                assert replies.pop(9) == errno.ESHUTDOWN
                assert set(replies.values()) == {0}
                for i in range(64):
                    client.request(wire.Cmd.READ, i, i * 5000, 3000, 0)
                reads = {r.handle: r for r in (client.reply() for _ in range(64))}
                assert reads[7].error == errno.EIO
                assert reads[9].error == errno.ESHUTDOWN
                for i in set(range(64)) - {7, 9}:
                    assert reads[i].error == 0 and reads[i].data == pattern(i, 3000), i
                client.disconnect()

        await in_thread(run)
    assert backend.calls == 128 and backend.in_task == 0


async def test_backend_errors_become_nbd_errors(tmp_path: Path) -> None:
    failures: dict[int, BaseException] = {
        0: BackendError(errno.EIO, "replica lost"),
        4096: BackendError(errno.EDQUOT, "quota"),
        8192: RuntimeError("bug in backend"),
        12288: BackendError(errno.ENOTSUP, "no"),
        16384: BackendError(errno.ETIMEDOUT, "page server timeout"),
    }
    backend = FailingBackend(SIZE, failures)
    async with serving(backend, tmp_path) as (_server, path, registry):

        def run(structured: bool) -> None:
            with RawNbd.unix(path).connect(structured=structured) as client:
                expected = {
                    0: wire.NBD_EIO,
                    4096: wire.NBD_ENOSPC,
                    8192: wire.NBD_EIO,
                    12288: wire.NBD_EINVAL,
                    16384: wire.NBD_EIO,
                }
                for offset, error in expected.items():
                    client.request(wire.Cmd.READ, 1, offset, 512)
                    reply = client.reply()
                    assert reply.error == error, (offset, reply)
                    assert reply.data == b""
                    if structured:
                        assert reply.chunks == [wire.REPLY_TYPE_ERROR]
                    client.request(wire.Cmd.WRITE, 2, offset, 512, 0, b"x" * 512)
                    assert client.reply().error == error
                # the connection is still good
                client.write(65536, b"ok" * 100)
                assert client.read(65536, 200) == b"ok" * 100

        await in_thread(run, True)
        await in_thread(run, False)
        assert (
            registry.get_sample_value(
                "client_nbd_requests_total", {"cmd": "read", "result": "error"}
            )
            == 10
        )
        assert (
            registry.get_sample_value("client_nbd_requests_total", {"cmd": "write", "result": "ok"})
            == 2
        )


async def test_shutdown_finishes_requests_in_flight_then_closes(tmp_path: Path) -> None:
    backend = SlowBackend(SIZE)
    backend.slow_writes.add(1 << 20)
    registry = CollectorRegistry()
    server = NbdServer(backend, build_metrics(registry))
    path = tmp_path / "nbd.sock"
    await server.listen_unix(path)
    client = await in_thread(lambda: RawNbd.unix(str(path)).connect())
    await in_thread(client.request, wire.Cmd.WRITE, 7, 1 << 20, 4096, 0, b"z" * 4096)
    while not registry.get_sample_value("client_nbd_inflight_requests"):
        await asyncio.sleep(0.01)
    shutdown = asyncio.create_task(server.shutdown(10.0))
    # a request arriving while draining is refused with ESHUTDOWN
    await in_thread(client.request, wire.Cmd.READ, 8, 0, 4096)
    reply = await in_thread(client.reply)
    assert (reply.handle, reply.error) == (8, wire.NBD_ESHUTDOWN)
    # That refusal proves the drain began a whole round trip ago, time enough to finish
    # were it not waiting for the write in flight.
    assert not shutdown.done()
    backend.release.set()
    reply = await in_thread(client.reply)
    assert (reply.handle, reply.error) == (7, 0)
    assert await shutdown is True
    assert await in_thread(client.closed_by_server)
    assert not path.exists()
    with pytest.raises(OSError):
        RawNbd.unix(str(path))
    client.close()


@pytest.mark.parametrize("kind", ["driven", "continued", "task"])
async def test_shutdown_that_times_out_cancels_suspended_requests(
    tmp_path: Path, kind: str
) -> None:
    backend = HangingBackend(SIZE, kind)
    registry = CollectorRegistry()
    server = NbdServer(backend, build_metrics(registry))
    path = tmp_path / "nbd.sock"
    await server.listen_unix(path)
    client = await in_thread(lambda: RawNbd.unix(str(path)).connect())
    try:
        payload = b"z" * 4096
        await in_thread(client.request, wire.Cmd.WRITE, 7, HangingBackend.HANG_AT, 4096, 0, payload)
        await in_thread(client.request, wire.Cmd.WRITE, 8, 0, 4096, 0, payload)
        reply = await in_thread(client.reply)  # the other write is not held up
        assert (reply.handle, reply.error) == (8, 0)
        assert registry.get_sample_value("client_nbd_inflight_requests") == 1
        assert backend.stuck is not None and not backend.stuck.done()

        assert await server.shutdown(0.2) is False  # the drain timed out: aborted

        # the request got CancelledError where it waited, and nothing of it is left
        assert backend.cancelled == 1
        assert registry.get_sample_value("client_nbd_inflight_requests") == 0
        assert not server.ctx.connections
        assert asyncio.all_tasks() == {asyncio.current_task()}
        if kind == "driven":
            # a future it waited on may be shared: left alone, and completing it resumes nobody
            assert not backend.stuck.done()
            backend.stuck.set_result(None)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert backend.resumed == 0
            # cancelled at once, so its ESHUTDOWN reply went out before the socket closed
            reply = await in_thread(client.reply)
            assert (reply.handle, reply.error) == (7, wire.NBD_ESHUTDOWN)
        assert await in_thread(client.closed_by_server)
        assert (
            registry.get_sample_value(
                "client_nbd_requests_total", {"cmd": "write", "result": "error"}
            )
            == 1
        )
    finally:
        client.close()


async def test_pipelined_requests_over_many_buffers_and_backpressure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a tiny in-flight limit makes the connection pause and resume reading constantly
    monkeypatch.setattr(transmission, "MAX_INFLIGHT", 4)
    backend = SuspendingBackend(SIZE)
    async with serving(backend, tmp_path) as (_server, path, registry):

        def run() -> None:
            with RawNbd.unix(path).connect() as client:
                blob = os.urandom(1 << 20)
                count = 600
                for i in range(count):
                    offset = (i * 4099) % (SIZE - 8192)
                    client.request(wire.Cmd.WRITE, i, offset, 1000, 0, blob[i : i + 1000])
                    if i % 50 == 49:  # keep the socket buffers from filling both ways
                        for _ in range(50):
                            assert client.reply().error == 0
                for i in range(count):
                    offset = (i * 4099) % (SIZE - 8192)
                    assert client.read(offset, 1000) == blob[i : i + 1000], i

        await in_thread(run)
        assert registry.get_sample_value("client_nbd_inflight_requests") == 0
        written = registry.get_sample_value("client_nbd_bytes_written_total")
        assert written == 600 * 1000


async def test_metrics_count_requests_bytes_connections_and_malformed(tmp_path: Path) -> None:
    async with serving(MemoryBackend(SIZE), tmp_path) as (_server, path, registry):

        def run() -> None:
            with RawNbd.unix(path).connect() as client:
                client.write(0, b"a" * 8192)
                assert client.read(0, 4096) == b"a" * 4096
                client.request(wire.Cmd.READ, 5, SIZE, 1)
                assert client.reply().error == wire.NBD_EINVAL
                client.request(wire.Cmd.FLUSH, 6)
                assert client.reply().error == 0
                client.request(wire.Cmd.READ, 9, 0, 10, magic=0xDEADBEEF)
                assert client.closed_by_server()

        await in_thread(run)
        sample = registry.get_sample_value
        assert sample("client_nbd_requests_total", {"cmd": "write", "result": "ok"}) == 1
        assert sample("client_nbd_requests_total", {"cmd": "read", "result": "ok"}) == 1
        assert sample("client_nbd_requests_total", {"cmd": "read", "result": "invalid"}) == 1
        assert sample("client_nbd_requests_total", {"cmd": "flush", "result": "ok"}) == 1
        assert sample("client_nbd_bytes_written_total") == 8192
        assert sample("client_nbd_bytes_read_total") == 4096
        assert sample("client_nbd_request_duration_seconds_count", {"cmd": "read"}) == 2
        assert (
            sample("client_nbd_request_duration_seconds_bucket", {"cmd": "read", "le": "+Inf"}) == 2
        )
        assert sample("client_nbd_malformed_requests_total", {"reason": "bad_request_magic"}) == 1
        assert sample("client_nbd_malformed_requests_total", {"reason": "truncated"}) == 0
        for _ in range(100):
            if sample("client_nbd_connections") == 0:
                break
            await asyncio.sleep(0.01)
        assert sample("client_nbd_connections") == 0
