"""What the parts of the remote backend share: the page map, the slab map, the page server
links, write ordering and the counters.

Every part (repair, reads, writes, fallback, rebuild, resync) is a `Part` built over one
`Core`, plus whatever else that part alone needs (the sealer, the mirror, another part).
"""

from __future__ import annotations

from dataclasses import dataclass

from remem_client.remote.linkpool import Links
from remem_client.remote.ordering import WriteOrdering
from remem_client.remote.pagemap import PageMap
from remem_client.remote.slabmap import SlabMap
from remem_client.remote.stats import RemoteStats


@dataclass(frozen=True, slots=True)
class Core:
    """The state of one device every part reads and updates."""

    pages: PageMap
    slabs: SlabMap
    links: Links
    ordering: WriteOrdering
    stats: RemoteStats


class Part:
    """A part of the backend: the core's members as its own attributes (one attribute
    lookup each on the hot path, not two)."""

    def __init__(self, core: Core) -> None:
        self._pages = core.pages
        self._slabs = core.slabs
        self._links = core.links
        self._ordering = core.ordering
        self._stats = core.stats
