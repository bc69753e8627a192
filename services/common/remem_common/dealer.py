"""The socket part shared by remem's blocking clients: one DEALER, its context, request ids."""

from __future__ import annotations

import itertools
from typing import Self

import zmq


class BlockingDealer:
    """One DEALER connected to `endpoint`; closed (with its own context) on exit."""

    def __init__(
        self,
        endpoint: str,
        *,
        context: zmq.Context[zmq.Socket[bytes]] | None,
        timeout: float,
    ) -> None:
        self._own_context = context is None
        self.context: zmq.Context[zmq.Socket[bytes]] = context or zmq.Context()
        self.socket: zmq.Socket[bytes] = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.endpoint = endpoint
        self.timeout = timeout
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        """A fresh msg_id for a request."""
        return next(self._ids)

    def close(self) -> None:
        self.socket.close(linger=0)
        if self._own_context:
            self.context.term()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
