"""Slab pushes: copy one slab of this page server's arena to a peer, ordered by placement.

A push streams the slab in chunks over a DEALER of its own, a few chunks in flight, and is
driven by the page server's loop (its socket polled beside the ROUTER), never blocking it:
the loop thread owns the arena, so a push and a client's overwrite of a page are ordered.
The push answers placement's `push_slab_request` when the copy is done or has failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
from remem_common.dealer import waiting_replies
from remem_common.framing import encode
from remem_common.protocol.envelope import (
    ErrorCode,
    ErrorReply,
    ProtocolError,
)
from remem_common.protocol.pages import (
    PAGE_SIZE,
    bad_checksums,
    make_keys,
)
from remem_common.protocol.pageserver_peer import PEER_REPLY_ADAPTER, ReceiveSlabPagesRequest
from remem_common.protocol.pageserver_placement import (
    PushSlabReply,
    PushSlabRequest,
)
from remem_common.security import (
    KeyFileError,
    Security,
)

from remem_pageserver.metrics import PageServerMetrics
from remem_pageserver.store import PageStore

log = logging.getLogger("pageserver")


# A slab push streams chunks of this many pages with this many chunks in flight: 1 MiB
# chunks amortize per-message cost, and a window of 4 keeps the link busy without letting one
# push take all of the loop's time from clients.
PUSH_CHUNK_PAGES = 256
PUSH_WINDOW = 4


Frames = list[Any]


@dataclass
class PushJob:
    """One slab being copied to a peer; driven by the loop, never blocking it."""

    routing: Frames
    request: PushSlabRequest
    source_server: str
    socket: zmq.Socket[bytes]
    pages: np.ndarray[Any, np.dtype[np.uint32]]
    started: float
    last_progress: float
    cursor: int = 0
    sent_pages: int = 0
    corrupt: int = 0
    inflight: dict[int, int] = field(default_factory=dict)


class SlabPusher:
    """The slab pushes in progress, each on a DEALER of its own that the page server's loop
    polls; a push's reply to placement goes out on the page server's ROUTER (`send_reply`:
    `[routing_id, *message]`, False if dropped)."""

    def __init__(
        self,
        store: PageStore,
        metrics: PageServerMetrics,
        context: zmq.Context[zmq.Socket[bytes]],
        send_reply: Callable[[Frames], bool],
        poller: zmq.Poller,
        security: Security,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.context = context
        self.send_reply = send_reply
        self.poller = poller
        self.security = security
        self.jobs: dict[zmq.Socket[bytes] | int, PushJob] = {}
        self._msg_id = 0

    def __bool__(self) -> bool:
        """True while any push is running."""
        return bool(self.jobs)

    def start(self, routing: Frames, msg: PushSlabRequest, *, source_server: str) -> None:
        """Begin copying a slab to `msg.target_endpoint`; answers `routing` when done.

        Args:
            routing: the requester's routing frames on the ROUTER.
            msg: placement's order.
            source_server: this page server's id, named in every chunk sent.

        Raises:
            ProtocolError: the target's key or endpoint is unusable (nothing was started).
        """
        sock: zmq.Socket[bytes] = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            self.security.client_socket(sock, msg.target_public_key)
        except KeyFileError:
            sock.close(linger=0)
            raise ProtocolError(
                ErrorCode.MALFORMED,
                "push_slab_request needs target_public_key: this page server runs Curve",
                reason="bad_fields",
                msg_id=msg.msg_id,
            ) from None
        try:
            sock.connect(msg.target_endpoint)
        except zmq.ZMQError as exc:
            # The protocol refuses endpoints libzmq cannot parse; this catches the rest. An
            # unclosed socket would make context.term() hang at shutdown.
            sock.close(linger=0)
            raise ProtocolError(
                ErrorCode.MALFORMED,
                f"target_endpoint {msg.target_endpoint!r}: {exc}",
                reason="bad_fields",
                msg_id=msg.msg_id,
            ) from None
        now = time.monotonic()
        job = PushJob(
            # Copied: the routing frames of a ZMTP router's message point into its receive
            # buffer, which the next read reuses.
            routing=[bytes(frame) for frame in routing],
            request=msg,
            source_server=source_server,
            socket=sock,
            pages=self.store.slab_pages(msg.tenant, msg.volume, msg.slab),
            started=now,
            last_progress=now,
        )
        self.jobs[sock] = job
        self.poller.register(sock, zmq.POLLIN)
        log.info(
            "pushing slab tenant=%s volume=%d slab=%d pages=%d to=%s",
            msg.tenant,
            msg.volume,
            msg.slab,
            job.pages.size,
            msg.target_endpoint,
        )
        self._push_more(job)

    def on_readable(self, sock: zmq.Socket[bytes] | int) -> None:
        """Take the replies waiting on `sock`, if it is a push's socket."""
        job = self.jobs.get(sock)
        if job is not None:
            self._on_push_reply(job)

    def expire(self, now: float) -> None:
        """Fail every push whose target has not answered within its timeout."""
        for job in list(self.jobs.values()):
            if now - job.last_progress > job.request.timeout:
                self._finish_push(
                    job,
                    ErrorCode.UNAVAILABLE,
                    f"target {job.request.target_endpoint} did not answer for "
                    f"{job.request.timeout}s",
                )

    def fail_all(self, code: ErrorCode, detail: str) -> None:
        """Fail every push still running, answering each requester."""
        for job in list(self.jobs.values()):
            self._finish_push(job, code, detail)

    def close(self) -> None:
        """Close every push's socket without answering (the ROUTER is going away)."""
        for job in list(self.jobs.values()):
            self.jobs.pop(job.socket, None)
            job.socket.close(linger=0)

    def _push_more(self, job: PushJob) -> None:
        req = job.request
        while len(job.inflight) < PUSH_WINDOW and job.cursor < job.pages.size:
            chunk = job.pages[job.cursor : job.cursor + PUSH_CHUNK_PAGES]
            job.cursor += chunk.size
            keys = make_keys(np.full(chunk.size, req.slab, dtype=np.uint32), chunk)
            result = self.store.get(req.tenant, req.volume, keys)
            # Pages trimmed since the push began are gone; pages whose checksum no longer
            # matches are not spread to another server. Nearly always the whole chunk is there
            # and intact: it is then checked and sent as read, without masked copies of it.
            if result.found.all():
                ok = _crc_ok(result.data, result.crcs)
            else:
                ok = result.found.copy()
                ok[ok] = _crc_ok(result.data[ok], result.crcs[ok])
            job.corrupt += int(np.count_nonzero(result.found & ~ok))
            count = int(np.count_nonzero(ok))
            if not count:
                continue
            self._msg_id += 1
            msg = ReceiveSlabPagesRequest(
                msg_id=self._msg_id,
                source_server=job.source_server,
                tenant=req.tenant,
                volume=req.volume,
                slab=req.slab,
                count=count,
            )
            # The seals travel with their pages: the client decrypts a pushed copy as it
            # would the original.
            if count == chunk.size:
                frames = encode(msg, chunk, result.crcs, result.data, result.seals)
            else:
                frames = encode(
                    msg,
                    np.ascontiguousarray(chunk[ok]),
                    result.crcs[ok],
                    result.data[ok],
                    result.seals[ok],
                )
            job.socket.send_multipart(frames, copy=False)
            job.inflight[self._msg_id] = count
            job.sent_pages += count
            self.metrics.push_sent_bytes.inc(count * PAGE_SIZE)
        if job.cursor >= job.pages.size and not job.inflight:
            self._finish_push(job, None, "")

    def _on_push_reply(self, job: PushJob) -> None:
        for reply in waiting_replies(job.socket, PEER_REPLY_ADAPTER):
            if isinstance(reply, ProtocolError):
                self.metrics.count_malformed(reply)
                self._finish_push(job, ErrorCode.UNAVAILABLE, f"target answered badly: {reply}")
                return
            if isinstance(reply, ErrorReply):
                self._finish_push(
                    job, reply.error_code, f"target refused: {reply.error_code} {reply.detail}"
                )
                return
            if job.inflight.pop(reply.parent_id, None) is None:
                continue
            job.last_progress = time.monotonic()
            self._push_more(job)
            if job.socket not in self.jobs:
                return  # the push is done and its socket closed

    def _finish_push(self, job: PushJob, code: ErrorCode | None, detail: str) -> None:
        self.jobs.pop(job.socket, None)
        self.poller.unregister(job.socket)
        job.socket.close(linger=0)
        req = job.request
        seconds = time.monotonic() - job.started
        reply: Frames
        if code is None:
            self.metrics.ok["push_slab"].inc()
            log.info(
                "pushed slab tenant=%s volume=%d slab=%d pages=%d corrupt=%d seconds=%.3f",
                req.tenant,
                req.volume,
                req.slab,
                job.sent_pages,
                job.corrupt,
                seconds,
            )
            reply = encode(
                PushSlabReply(
                    msg_id=0,
                    parent_id=req.msg_id,
                    pages=job.sent_pages,
                    bytes=job.sent_pages * PAGE_SIZE,
                    seconds=seconds,
                    corrupt=job.corrupt,
                )
            )
        else:
            self.metrics.error["push_slab"].inc()
            log.warning(
                "push failed tenant=%s volume=%d slab=%d: %s",
                req.tenant,
                req.volume,
                req.slab,
                detail,
            )
            reply = encode(
                ErrorReply(msg_id=0, parent_id=req.msg_id, error_code=code, detail=detail)
            )
        self.metrics.latency["push_slab"].observe(seconds)
        if not self.send_reply([*job.routing, *reply]):
            log.warning("dropped a push reply: the requester is not reading")


def _crc_ok(
    pages: np.ndarray[Any, np.dtype[np.uint8]], crcs: np.ndarray[Any, np.dtype[np.uint32]]
) -> np.ndarray[Any, np.dtype[np.bool_]]:
    mask = np.ones(pages.shape[0], dtype=np.bool_)
    mask[bad_checksums(pages, crcs)] = False
    return mask
