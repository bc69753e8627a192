"""What placement knows and orders: page servers, slabs, pushes, drops, and the policy's knobs.

Plain records, no behaviour beyond a few derived properties: the rules that change them are
in `remem_placement.policy`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from remem_common.protocol.admin_placement import ServerState

SlabKey = tuple[str, int, int]  # (tenant, volume, slab)
VolumeKey = tuple[str, int]
Liveness = Literal["live", "suspect", "dead"]
PushReason = Literal["repair", "drain", "pressure"]


@dataclass(frozen=True)
class PolicySettings:
    """The knobs of the policy (from placement's config)."""

    suspect_after: float = 0.75
    dead_after: float = 1.5
    restart_grace: float = 3.0
    alloc_reserve: int = 64 << 20
    min_free: int = 64 << 20
    default_replicas: int = 2
    max_pushes: int = 4
    retry_after: float = 1.0
    # A gap this long between two ticks is placement's own stall, not the servers' silence.
    stall_after: float = 0.375
    # Longest a push waits for the volume's clients to poll a map listing its target.
    map_settle: float = 3.0


class NoEligibleServer(Exception):
    """No page server can take a new replica; the message says why, server by server."""


class Rebuilding(Exception):
    """Placement restarted recently and is still learning the map from page servers."""


@dataclass
class Server:
    """One registered page server as placement sees it."""

    server_id: str
    endpoint: str
    metrics_url: str
    zone: str
    capacity_bytes: int
    used_bytes: int
    sample_at: float  # wall time of the used_bytes sample
    started_at: float
    last_seen: float  # monotonic
    from_metrics: bool = False
    liveness: Liveness = "live"
    under_pressure: bool = False
    draining: bool = False
    probe_deadline: float | None = None
    reservations: list[float] = field(default_factory=list)  # wall times of placements

    def free_estimate(self, reserve: int) -> int:
        return self.capacity_bytes - self.used_bytes - reserve * len(self.reservations)

    @property
    def leaving(self) -> bool:
        """Its replicas should move elsewhere (still readable until they have)."""
        return self.draining or self.under_pressure

    @property
    def state(self) -> ServerState:
        if self.liveness != "live":
            return self.liveness
        if self.draining:
            return "draining"
        if self.under_pressure:
            return "pressure"
        return "live"


@dataclass
class Slab:
    """Where one slab lives. `replicas` sorted by server id, so a rebuilt map is identical."""

    target: int
    replicas: list[str] = field(default_factory=list)
    filling: list[str] = field(default_factory=list)
    retry_at: float = 0.0


@dataclass(frozen=True)
class Push:
    """An order to `source`: copy slab `key` to `target` directly."""

    push_id: int
    key: SlabKey
    source: str
    target: str
    reason: PushReason
    started: float
    epoch: int  # the map epoch that first lists `target` as filling (0 while clearing)


@dataclass(frozen=True)
class Drop:
    """An order to `server_id`: forget slab `key` (moved away, or a stale/partial copy).

    With a `push_id`, the target of that push clears any old copy of the slab it may still
    hold before it is listed as filling (the push waits for the answer, see `cleared`)."""

    server_id: str
    key: SlabKey
    push_id: int = 0


@dataclass(frozen=True)
class Allocation:
    replicas: list[str]
    filling: list[str]
    degraded: bool
    epoch: int
