"""The page server's registration with placement, then its heartbeats, from a thread of its own.

The link has its own DEALER socket and one request in flight; it only reads the store's
counters (through the request factories it is given), so it needs no lock with the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import zmq
from remem_common.dealer import waiting_replies
from remem_common.framing import encode
from remem_common.protocol.envelope import ProtocolError
from remem_common.protocol.pageserver_placement import (
    CONTROL_REPLY_ADAPTER,
    HeartbeatReply,
    HeartbeatRequest,
    RegisterServerReply,
    RegisterServerRequest,
)
from remem_common.security import (
    Security,
)

from remem_pageserver.metrics import PageServerMetrics

log = logging.getLogger("pageserver")

# How long the link's thread waits for a reply before it checks its timers again.
POLL_MS = 100


class RegistrationLink:
    """Registration and heartbeats to placement over one DEALER; one request in flight."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        make_register: Callable[[int], RegisterServerRequest],
        make_heartbeat: Callable[[int], HeartbeatRequest],
        metrics: PageServerMetrics,
        *,
        security: Security,
        placement_key: str | None,
    ) -> None:
        self.socket: zmq.Socket[bytes] = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        security.client_socket(self.socket, placement_key)
        # Queue nothing for a placement that is down: a stale heartbeat delivered later lies.
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        self.socket.connect(endpoint)
        self.endpoint = endpoint
        self._make_register = make_register
        self._make_heartbeat = make_heartbeat
        self._metrics = metrics
        self.registered = False
        self.interval = 0.5
        self._pending: tuple[int, float] | None = None
        self._next_due = 0.0
        self._msg_id = 0

    def due_in(self, now: float) -> float:
        if self._pending is not None:
            return max(0.0, self._pending[1] + 2 * self.interval - now)
        return max(0.0, self._next_due - now)

    def tick(self, now: float) -> None:
        if self._pending is not None:
            if now - self._pending[1] < 2 * self.interval:
                return
            self._metrics.heartbeat_failures.inc()
            if self.registered:
                log.warning("placement did not answer a heartbeat endpoint=%s", self.endpoint)
            self._pending = None
        if now < self._next_due:
            return
        self._msg_id += 1
        msg = (
            self._make_heartbeat(self._msg_id)
            if self.registered
            else self._make_register(self._msg_id)
        )
        try:
            self.socket.send_multipart(encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            self._next_due = now + self.interval
            return
        self._pending = (self._msg_id, now)
        self._next_due = now + self.interval

    def on_readable(self) -> None:
        for reply in waiting_replies(self.socket, CONTROL_REPLY_ADAPTER):
            if isinstance(reply, ProtocolError):
                log.warning("placement sent a malformed reply: %s", reply.detail)
                self._metrics.count_malformed(reply)
                continue
            if self._pending is None or reply.parent_id != self._pending[0]:
                continue
            self._pending = None
            if isinstance(reply, RegisterServerReply):
                if not self.registered:
                    log.info("registered with placement endpoint=%s", self.endpoint)
                self.registered = True
                self.interval = reply.heartbeat_interval
            elif isinstance(reply, HeartbeatReply):
                if not reply.registered:
                    self.registered = False
                    self._next_due = 0.0
            else:
                log.warning("placement refused: %s %s", reply.error_code, reply.detail)

    def run(self, stop: threading.Event) -> None:
        """Register and heartbeat until `stop` is set (the body of the link's thread)."""
        try:
            while not stop.is_set():
                self.tick(time.monotonic())
                wait = min(self.due_in(time.monotonic()), POLL_MS / 1000)
                if self.socket.poll(max(1, int(wait * 1000))):
                    self.on_readable()
        finally:
            self.socket.close(linger=0)
