"""The mirror's writer thread: the ordered queue of requests, their execution, the replies.

The writer thread owns the store and executes the queue strictly in order. Reads, trims and
bitmap requests go through the same FIFO as writes, so each sees every write queued before
it, and a later write of a page lands after an earlier one. It never touches a ZeroMQ socket
(they are not thread-safe): its replies go back to the main thread through a `ReplyPipe`.

The writer takes greedily what is queued: consecutive writes (up to MAX_RUN_PAGES pages) form
one group, whose runs of adjacent pages go out together (`MirrorStore.write_pages`: one
io_submit, or one pwrite per run), with one fdatasync if any write asked for `sync`; replies
follow once the group is on disk. Anything else is one op.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from remem_common.framing import encode
from remem_common.protocol.client_mirror import (
    AttachMirrorReply,
    AttachMirrorRequest,
    DescribeMirrorReply,
    DescribeMirrorRequest,
    DetachMirrorReply,
    DetachMirrorRequest,
    ListUnreplicatedReply,
    ListUnreplicatedRequest,
    MarkReplicatedReply,
    MarkReplicatedRequest,
    MirrorRequest,
    ReadPagesReply,
    ReadPagesRequest,
    TrimPagesReply,
    TrimPagesRequest,
    WritePagesReply,
    WritePagesRequest,
)
from remem_common.protocol.envelope import (
    ErrorCode,
    ErrorReply,
)
from remem_common.protocol.pages import PAGE_SIZE

from remem_mirror.metrics import MirrorMetrics
from remem_mirror.store import MAX_RUN_PAGES, MirrorStore

log = logging.getLogger("mirror")


Frames = list[Any]

OP_OF = {
    "describe_mirror_request": "describe",
    "attach_mirror_request": "attach",
    "detach_mirror_request": "detach",
    "write_pages_request": "write",
    "write_extents_request": "write",
    "read_pages_request": "read",
    "trim_pages_request": "trim",
    "mark_replicated_request": "mark_replicated",
    "list_unreplicated_request": "list_unreplicated",
}
# Requests that change the mirror (and attach, which starts a session): a superseded
# connection's are refused (see MirrorWriter._fence).
SESSION_OPS = frozenset(
    {
        "attach_mirror_request",
        "detach_mirror_request",
        "write_pages_request",
        "write_extents_request",
        "trim_pages_request",
        "mark_replicated_request",
    }
)


@dataclass(slots=True)
class Op:
    """One queued request (or, with `request` None, an error reply that keeps its place)."""

    routing: Frames
    request: MirrorRequest | None
    data: Any = None
    reply: Frames | None = None
    pages: int = 0  # written pages this op holds in the queue (0 unless a write)
    # (first page, count) of each run `data` holds, back to back: one for write_pages, the
    # request's runs for write_extents.
    runs: list[tuple[int, int]] = field(default_factory=list)
    queued_at: float = field(default_factory=time.monotonic)


def error_frames(code: ErrorCode, detail: str, parent_id: int) -> Frames:
    return encode(ErrorReply(msg_id=0, parent_id=parent_id, error_code=code, detail=detail))


def io_error_frames(exc: OSError, parent_id: int) -> Frames:
    """`unavailable` with the errno, for a failed device I/O."""
    name = errno.errorcode.get(exc.errno or 0, "?")
    detail = f"device I/O failed: errno={exc.errno} {name} ({exc.strerror})"
    return error_frames(ErrorCode.UNAVAILABLE, detail, parent_id)


class OpQueue:
    """The FIFO between the main thread (puts) and the writer (takes), bounded in pages."""

    def __init__(self, limit_pages: int) -> None:
        self.limit_pages = limit_pages
        self.pending_pages = 0  # written pages queued or being written
        self.length = 0  # ops queued or being executed
        self._ops: deque[Op] = deque()
        self._write_times: deque[float] = deque()  # queued_at of each write not yet on disk
        self._cond = threading.Condition()
        self._closed = False

    def full(self) -> bool:
        """True while the main loop must not read more requests."""
        return self.pending_pages >= self.limit_pages or self.length >= self.limit_pages

    def put(self, op: Op) -> None:
        with self._cond:
            self._ops.append(op)
            self.length += 1
            if op.pages:
                self.pending_pages += op.pages
                self._write_times.append(op.queued_at)
            self._cond.notify()

    def take(self) -> list[Op]:
        """The next group for the writer: consecutive writes, or one other op.

        Blocks while the queue is empty; returns [] once closed and empty.
        """
        with self._cond:
            while not self._ops and not self._closed:
                self._cond.wait()
            if not self._ops:
                return []
            first = self._ops.popleft()
            group = [first]
            if first.pages:
                pages = first.pages
                while self._ops and self._ops[0].pages:
                    if pages + self._ops[0].pages > MAX_RUN_PAGES:
                        break
                    nxt = self._ops.popleft()
                    pages += nxt.pages
                    group.append(nxt)
            return group

    def done(self, ops: list[Op]) -> None:
        """The writer finished `ops`: release their room in the queue."""
        with self._cond:
            self.length -= len(ops)
            for op in ops:
                if op.pages:
                    self.pending_pages -= op.pages
                    self._write_times.popleft()

    def lag(self) -> float:
        """Seconds the oldest write not yet on disk has waited (0 when none)."""
        try:
            oldest = self._write_times[0]
        except IndexError:
            return 0.0
        return max(0.0, time.monotonic() - oldest)

    def abort(self) -> list[Op]:
        """Take every op the writer has not started (shutdown past its deadline)."""
        with self._cond:
            ops = list(self._ops)
            self._ops.clear()
        self.done(ops)
        return ops

    def close(self) -> None:
        """Let the writer exit once the queue is empty."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class ReplyPipe:
    """Replies from the writer to the main thread: a deque plus an eventfd to wake poll."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._replies: deque[Frames] = deque()

    def push(self, replies: list[Frames]) -> None:
        """Writer side: hand over routed reply frames and wake the main loop."""
        self._replies.extend(replies)
        os.eventfd_write(self.fd, 1)

    def pop_all(self) -> list[Frames]:
        """Main-thread side: every reply handed over so far."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)
        out: list[Frames] = []
        while True:
            try:
                out.append(self._replies.popleft())
            except IndexError:
                return out

    def __bool__(self) -> bool:
        return bool(self._replies)

    def close(self) -> None:
        os.close(self.fd)


class MirrorWriter:
    """Executes queued ops against the store, in order; every op gets exactly one reply."""

    def __init__(self, store: MirrorStore, metrics: MirrorMetrics) -> None:
        self.store = store
        self.metrics = metrics
        # A write, trim or mark failed since the client attached: the mirror misses it, so
        # a detach must not mark it clean.
        self.failed_since_attach = False
        # The routing id of the connection that attached last, and those that attached
        # before it: a client that timed the mirror out reconnects and attaches again, and
        # what its old connection still had queued here must not land after what the new
        # one sends (a rebuild's copy of the same pages), so it is refused.
        self.session: bytes | None = None
        self.superseded: set[bytes] = set()
        self._handlers: dict[str, Callable[[Any], Frames]] = {
            "describe_mirror_request": self._describe,
            "attach_mirror_request": self._attach,
            "detach_mirror_request": self._detach,
            "read_pages_request": self._read,
            "trim_pages_request": self._trim,
            "mark_replicated_request": self._mark_replicated,
            "list_unreplicated_request": self._list_unreplicated,
        }

    def execute(self, ops: list[Op]) -> list[Frames]:
        """Run `ops` in order; returns their replies (routing ids first), in the same order
        (refused changes of a superseded connection first)."""
        replies: list[Frames] = []
        # Only an attach changes the session, and only a superseded sender is refused.
        if self.superseded or any(
            op.request is not None and op.request.type == "attach_mirror_request" for op in ops
        ):
            ops = self._fence(ops, replies)
        index = 0
        while index < len(ops):
            stop = index
            while stop < len(ops) and ops[stop].pages:
                stop += 1
            if stop > index:
                replies.extend(self._writes(ops[index:stop]))
                index = stop
            else:
                replies.append([*ops[index].routing, *self._one(ops[index])])
                index += 1
        return replies

    def _fence(self, ops: list[Op], refused: list[Frames]) -> list[Op]:
        """Track attaches and refuse changes from superseded connections (answers go to
        `refused`); returns the ops to run."""
        kept: list[Op] = []
        for op in ops:
            msg = op.request
            sender = bytes(op.routing[0]) if op.routing else b""
            if msg is not None and msg.type in SESSION_OPS and sender not in self.superseded:
                if msg.type == "attach_mirror_request":
                    if self.session is not None and self.session != sender:
                        self.superseded.add(self.session)
                    self.session = sender
            elif msg is not None and msg.type in SESSION_OPS:
                self.metrics.error[OP_OF[msg.type]].inc()
                refused.append(
                    [
                        *op.routing,
                        *error_frames(
                            ErrorCode.UNAVAILABLE,
                            "this connection's client attached again on another one",
                            msg.msg_id,
                        ),
                    ]
                )
                continue
            kept.append(op)
        return kept

    def _one(self, op: Op) -> Frames:
        msg = op.request
        if msg is None:
            assert op.reply is not None
            return op.reply
        name = OP_OF[msg.type]
        try:
            reply = self._handlers[msg.type](msg)
        except OSError as exc:
            log.error("%s failed: %s", name, exc)
            self.metrics.error[name].inc()
            self.failed_since_attach = True
            return io_error_frames(exc, msg.msg_id)
        except Exception:
            # Never let one request stop the writer; the sender learns it failed.
            log.exception("internal error handling %s", name)
            self.metrics.error[name].inc()
            return error_frames(ErrorCode.INTERNAL, "internal error; see the log", msg.msg_id)
        self.metrics.ok[name].inc()
        return reply

    # -- writes ----------------------------------------------------------------------------

    def _writes(self, ops: list[Op]) -> list[Frames]:
        """Write a group of write ops: bitmap first, then one syscall per adjacent run."""
        failures: list[OSError | None] = [None] * len(ops)
        syncing = False
        try:
            # The unreplicated bits go to disk before the data they describe: a crash in
            # between leaves a bit set over older data (a harmless extra resync), never
            # mirror-only data without its bit.
            changed = 0
            for op in ops:
                req = op.request
                if isinstance(req, WritePagesRequest):
                    syncing |= req.sync
                    if not req.replicated:
                        changed += self.store.set_unreplicated(req.first_page, req.count)
            if changed:
                self.store.sync_bitmap()
        except OSError as exc:
            log.error("bitmap update failed: %s", exc)
            failures = [exc] * len(ops)
        else:
            self._write_runs(ops, failures)
            if syncing:
                try:
                    self.metrics.fsync_duration.observe(self.store.fdatasync())
                except OSError as exc:
                    log.error("fdatasync failed: %s", exc)
                    for index, op in enumerate(ops):
                        req = op.request
                        if isinstance(req, WritePagesRequest) and req.sync:
                            failures[index] = failures[index] or exc
        self.metrics.write_requests.inc(len(ops))
        replies: list[Frames] = []
        for op, failure in zip(ops, failures, strict=True):
            assert op.request is not None
            if failure is None:
                self.metrics.ok["write"].inc()
                reply = WritePagesReply(msg_id=0, parent_id=op.request.msg_id, written=op.pages)
                frames = encode(reply)
            else:
                self.metrics.error["write"].inc()
                self.failed_since_attach = True
                frames = io_error_frames(failure, op.request.msg_id)
            replies.append([*op.routing, *frames])
        return replies

    def _write_runs(self, ops: list[Op], failures: list[OSError | None]) -> None:
        started = time.perf_counter()
        try:
            issued, failed = self.store.write_pages(
                [op.data for op in ops], [run for op in ops for run in op.runs]
            )
        except OSError as error:
            issued, failed = 0, [(0, sum(op.pages for op in ops), error)]
        self.metrics.write_duration.observe(time.perf_counter() - started)
        lost = 0
        for at, pages, failure in failed:
            log.error("a write of %d pages failed: %s", pages, failure)
            lost += pages
            issued -= 1
            # The ops whose pages [at, at + pages) of the group's pages hold.
            op_at = 0
            for index, op in enumerate(ops):
                if op_at < at + pages and at < op_at + op.pages:
                    failures[index] = failures[index] or failure
                op_at += op.pages
        self.metrics.coalesced_writes.inc(max(issued, 0))
        self.metrics.written_bytes.inc((sum(op.pages for op in ops) - lost) * PAGE_SIZE)

    # -- everything else -------------------------------------------------------------------

    def _description(self) -> dict[str, Any]:
        """The MirrorDescription fields of describe and attach replies."""
        return {
            "page_count": self.store.page_count,
            "path": str(self.store.path),
            "direct_io": self.store.direct_io,
            "unreplicated_pages": self.store.unreplicated_pages,
        }

    def _describe(self, msg: DescribeMirrorRequest) -> Frames:
        return encode(DescribeMirrorReply(msg_id=0, parent_id=msg.msg_id, **self._description()))

    def _attach(self, msg: AttachMirrorRequest) -> Frames:
        complete = self.store.open_session()
        self.failed_since_attach = False
        if not complete:
            log.warning(
                "client attached; the last session did not end cleanly (or the mirror is new): "
                "it rebuilds the mirror from its replicas before trusting it"
            )
        return encode(
            AttachMirrorReply(
                msg_id=0, parent_id=msg.msg_id, complete=complete, **self._description()
            )
        )

    def _detach(self, msg: DetachMirrorRequest) -> Frames:
        if self.failed_since_attach:
            log.warning("client detached, but a write failed in its session: not marked clean")
            return error_frames(
                ErrorCode.UNAVAILABLE,
                "a write failed in this session: the mirror stays not clean",
                msg.msg_id,
            )
        self.store.close_session()
        log.info("client detached cleanly: the mirror holds every write")
        return encode(DetachMirrorReply(msg_id=0, parent_id=msg.msg_id))

    def _read(self, msg: ReadPagesRequest) -> Frames:
        data = self.store.read(msg.first_page, msg.count)
        self.metrics.read_bytes.inc(len(data))
        return encode(ReadPagesReply(msg_id=0, parent_id=msg.msg_id, count=msg.count), data)

    def _trim(self, msg: TrimPagesRequest) -> Frames:
        self.store.trim(msg.first_page, msg.count)
        return encode(TrimPagesReply(msg_id=0, parent_id=msg.msg_id))

    def _mark_replicated(self, msg: MarkReplicatedRequest) -> Frames:
        self.store.clear_unreplicated(msg.first_page, msg.count)
        return encode(
            MarkReplicatedReply(
                msg_id=0, parent_id=msg.msg_id, unreplicated_pages=self.store.unreplicated_pages
            )
        )

    def _list_unreplicated(self, msg: ListUnreplicatedRequest) -> Frames:
        return encode(
            ListUnreplicatedReply(
                msg_id=0,
                parent_id=msg.msg_id,
                page_count=self.store.page_count,
                unreplicated_pages=self.store.unreplicated_pages,
            ),
            self.store.bitmap_bytes(),
        )
