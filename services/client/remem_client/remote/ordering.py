"""Write ordering: the changes in flight, and who must wait for whom.

Three kinds of waiting keep a device page from going back to older data:

- A partial write reads back its edge pages, patches them and writes them whole: it waits
  for every earlier change touching an edge, and a whole-page write or trim waits for the
  earlier partial writes whose edges it covers (`InFlight`).
- A resync copies a slab's mirror-only pages from the mirror to the replicas: writes to
  that slab wait meanwhile (`hold`), or the older data copied would overwrite them.
- A mirror rebuild copies runs of pages from the replicas to the mirror: it waits for the
  changes in flight over a run (`busy`) and reads the run again if one started meanwhile
  (`watch`).

Per slab it also counts the changes started and in flight, which read repair checks
(`slab_write_mark`).
"""

from __future__ import annotations

import asyncio
import itertools

from remem_common.protocol.pages import SLAB_PAGES


class InFlight:
    """A write, trim or zeroing of pages [first, last], registered in arrival order. As an
    async context manager it is entered once the earlier changes it could undo are done,
    and leaves the register on exit."""

    __slots__ = ("_ordering", "arrival", "done", "edges", "first", "last")

    def __init__(
        self, ordering: WriteOrdering, arrival: int, first: int, last: int, edges: tuple[int, ...]
    ) -> None:
        self._ordering = ordering
        self.arrival = arrival
        self.first = first
        self.last = last
        self.edges = edges  # the pages a partial write reads back
        self.done: asyncio.Future[None] | None = None  # made when someone waits for it

    async def __aenter__(self) -> None:
        ordering = self._ordering
        # Whole-page writes with no partial write in flight (the kernel's swap traffic)
        # skip the scan.
        if self.edges or ordering.partial_writes:
            try:
                await ordering.wait_earlier(self)
            except BaseException:
                ordering.end(self)
                raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._ordering.end(self)


class Watch:
    """Pages [first, end) a reader copies elsewhere: `changed` turns True when a change of
    one of them starts."""

    __slots__ = ("changed", "end", "first")

    def __init__(self, first: int, end: int) -> None:
        self.first = first
        self.end = end
        self.changed = False


class WriteOrdering:
    """The changes in flight of one device, by arrival."""

    def __init__(self, slab_count: int) -> None:
        self._in_flight: dict[int, InFlight] = {}
        self._arrivals = itertools.count()
        self.partial_writes = 0
        # Per slab: writes and trims ever started, and those in flight.
        self._slab_writes = [0] * slab_count
        self._slab_writing = [0] * slab_count
        # The run a mirror rebuild is copying (see watch).
        self.watching: Watch | None = None
        # Slabs a resync is copying right now: writes to them wait (see hold).
        self.held: set[int] = set()
        self._released = asyncio.Event()

    # -- changes of pages ------------------------------------------------------------------

    def write(self, first: int, last: int, edges: tuple[int, ...] = ()) -> InFlight:
        """Register a change of pages [first, last]; `async with` it to run it in order.

        Waits only ever point at earlier arrivals, so they cannot deadlock."""
        entry = InFlight(self, next(self._arrivals), first, last, edges)
        self._in_flight[entry.arrival] = entry
        run = self.watching
        if run is not None and first < run.end and run.first <= last:
            run.changed = True
        self.partial_writes += bool(edges)
        return entry

    async def wait_earlier(self, entry: InFlight) -> None:
        """Wait for the earlier changes `entry` could undo or be undone by."""
        edges, first, last = entry.edges, entry.first, entry.last
        for earlier, other in list(self._in_flight.items()):
            if earlier >= entry.arrival:
                break  # a dict keeps insertion order: the rest came later
            if earlier not in self._in_flight:
                continue  # finished while this one waited for another
            if edges:
                hit = any(other.first <= page <= other.last for page in edges)
            else:
                hit = any(first <= page <= last for page in other.edges)
            if hit:
                await self.finished(other)

    def end(self, entry: InFlight) -> None:
        del self._in_flight[entry.arrival]
        self.partial_writes -= bool(entry.edges)
        if entry.done is not None and not entry.done.done():
            entry.done.set_result(None)

    async def finished(self, entry: InFlight) -> None:
        """Wait until `entry` has left the register."""
        if entry.done is None:
            entry.done = asyncio.get_running_loop().create_future()
        await entry.done

    def busy(self, first: int, end: int) -> InFlight | None:
        """A change in flight of a page in [first, end), if any."""
        return next(
            (w for w in self._in_flight.values() if w.first < end and first <= w.last), None
        )

    def watch(self, first: int, end: int) -> Watch:
        """Start watching [first, end) for changes (one watch at a time; `unwatch` ends it)."""
        self.watching = Watch(first, end)
        return self.watching

    def unwatch(self) -> None:
        self.watching = None

    # -- per slab --------------------------------------------------------------------------

    def slab_write_began(self, slab: int) -> None:
        self._slab_writes[slab] += 1
        self._slab_writing[slab] += 1

    def slab_write_ended(self, slab: int) -> None:
        self._slab_writing[slab] -= 1

    def slab_write_mark(self, slab: int) -> int | None:
        """The slab's count of changes started if none is in flight, else None: equal marks
        before and after a read mean no change of the slab overlapped it."""
        return None if self._slab_writing[slab] else self._slab_writes[slab]

    # -- resync ----------------------------------------------------------------------------

    def hold(self, slab: int) -> None:
        """Writes to `slab` wait (`wait_unheld`) until `release`."""
        self.held.add(slab)

    def release(self, slab: int) -> None:
        self.held.discard(slab)
        self._released.set()

    async def wait_unheld(self, first: int, count: int) -> None:
        """Wait while a slab of pages [first, first + count) is held."""
        slabs = set(range(first // SLAB_PAGES, (first + count - 1) // SLAB_PAGES + 1))
        while self.held & slabs:
            self._released.clear()
            await self._released.wait()
