"""Buffers NBD requests are received into: receive buffers with their pins, the payload pool.

Requests and small WRITE payloads land in a preallocated receive buffer (`RxBuffer`,
256 KiB, many requests per recv); a WRITE whose backend call suspends keeps its payload
where it arrived, so it pins that buffer and the connection moves on to another one from
the export's `RxPool`. A WRITE payload of `DIRECT_PAYLOAD` or more that has not fully
arrived is received straight into its own buffer (`PartialWrite`) taken from the
`PayloadPool`, so a 1 MiB write is copied once, by the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RX_SIZE = 256 * 1024  # receive buffer; holds many small requests per recv
DIRECT_PAYLOAD = 64 * 1024  # WRITE payloads from this size are received into their own buffer
RX_FREE_LIST = 8  # spare receive buffers kept per export
PAYLOAD_IDLE_BYTES = 64 * 1024 * 1024  # idle payload buffers kept per export


class RxBuffer:
    """A receive buffer and the number of suspended writes whose payload lives in it."""

    __slots__ = ("data", "pins", "view")

    def __init__(self) -> None:
        self.data = bytearray(RX_SIZE)
        self.view = memoryview(self.data)
        self.pins = 0


class RxPool:
    """Spare receive buffers shared by the connections of one export.

    A connection takes a fresh buffer when its current one is pinned, and gives back one
    that is neither pinned nor in use; at most `max_free` wait here (each is 256 KiB).
    """

    __slots__ = ("_free", "_max_free")

    def __init__(self, max_free: int = RX_FREE_LIST) -> None:
        self._free: list[RxBuffer] = []
        self._max_free = max_free

    def take(self) -> RxBuffer:
        """A spare buffer, or a new one if none is left."""
        return self._free.pop() if self._free else RxBuffer()

    def give(self, rx: RxBuffer) -> None:
        """Keep `rx` (which nothing pins or uses any more) for reuse, unless enough wait."""
        if len(self._free) < self._max_free:
            self._free.append(rx)


class PayloadPool:
    """Reusable bytearrays for large WRITE payloads, in power-of-two size classes.

    Keeps at most `max_idle_bytes` idle; allocating a fresh 1 MiB bytearray costs a
    zero-fill, so reuse saves a pass over the memory per request.
    """

    __slots__ = ("_free", "_idle", "_max_idle")

    def __init__(self, max_idle_bytes: int = PAYLOAD_IDLE_BYTES) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._idle = 0
        self._max_idle = max_idle_bytes

    def get(self, length: int) -> bytearray:
        """A buffer of at least `length` bytes: the size class above it, at least 64 KiB."""
        size = max(DIRECT_PAYLOAD, 1 << (length - 1).bit_length())
        free = self._free.get(size)
        if free:
            self._idle -= size
            return free.pop()
        return bytearray(size)

    def put(self, buf: bytearray) -> None:
        """Return a buffer from `get`; it is dropped if the idle limit would be passed."""
        size = len(buf)
        if self._idle + size <= self._max_idle:
            self._free.setdefault(size, []).append(buf)
            self._idle += size


@dataclass(slots=True, eq=False)
class PartialWrite:
    """A large WRITE whose payload is being received into its own pooled buffer."""

    flags: int
    handle: int
    offset: int
    length: int
    buf: bytearray
    got: int  # payload bytes received so far
    view: memoryview = field(init=False)  # the payload's part of `buf`

    def __post_init__(self) -> None:
        self.view = memoryview(self.buf)[: self.length]
