"""Placement's core: page servers, the slab map, choosing servers and deciding repairs.

No transport here (no zmq, no HTTP): `server.py` and `orders.py` feed in registrations,
heartbeats, metric samples, inventories and push results, and carry out the orders this module
returns (slab pushes, slab drops). Every method takes the time it should act at, so tests drive it
with a fake clock. Two clocks: `now` is monotonic (liveness, timers), `wall` is the wall
clock (metric samples carry wall-clock timestamps, so allocations are stamped the same way).

Rules, in one place:

- A server is eligible for a new replica when it is live (not suspect, not dead), not
  draining, not under memory pressure, and its estimated free memory is at least `min_free`.
- Estimated used bytes = the newest metric sample + `alloc_reserve` for every replica
  placed on it after that sample was taken. Metrics are a scrape interval old; without the
  reserve a burst of allocations would all land on the server that looked emptiest.
- Choosing k servers: by estimated free bytes (most first; ties: fewer slabs, then id), one
  per zone while unused zones remain, and only then a second server in a zone already used.
- A slab's `replicas` hold its data and may be read; `filling` are push targets being filled
  (clients write to them too, but do not read). A slab with fewer replicas than its target
  is degraded; a replica on a draining or pressured server is "leaving" and is replaced the
  same way, then dropped once enough staying replicas exist.
- A push target first clears any copy of the slab it may still hold (an order to drop it),
  and is listed as filling only once it answered: the push never overwrites a page the
  target has (that page may be a newer client write), so an old page kept there would be
  served stale once the target became a replica.
- At most `max_pushes` pushes copy at once, spread over the page servers (of the pushes
  ready, the one whose servers copy least starts first). More are prepared meanwhile (target
  cleared, listed as filling, waiting for clients to see it; `PLANNED_PER_SLOT`), so that
  when a copy ends the next starts at once, not after another round of clients' map polls.
- A dead server leaves every slab at once (a new epoch). A push that fails, or whose source
  or target dies, is abandoned and its target told to drop the partial copy, so that copy
  can never be mistaken for a replica later.
- Soft state: after a (re)start, during `restart_grace`, inventories of registering servers
  are adopted as replicas, nothing is repaired and no new slab is placed, so servers have time
  to come back before anything looks degraded. After the grace period, a server that shows up
  with a copy of a slab the map does not list it for (it was declared dead, writes went on
  without it) is told to drop that stale copy, unless no other replica exists.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace

from remem_placement.records import (
    Allocation,
    Drop,
    Liveness,
    NoEligibleServer,
    PolicySettings,
    Push,
    PushReason,
    Rebuilding,
    Server,
    Slab,
    SlabKey,
    VolumeKey,
)

# Pushes planned per copying slot: all but one a slot are prepared while others copy. Clients
# confirm a map only at their next poll (a second or two), longer than copying a slab takes,
# so with fewer prepared the copies of a large repair still waited for clients between waves.
PLANNED_PER_SLOT = 4
# What a running push costs its target and its source, relative to each other (`_release`).
TARGET_LOAD = 2
SOURCE_LOAD = 1


class Cluster:
    """All of placement's state; one thread owns it (no locks)."""

    def __init__(self, settings: PolicySettings, *, started: float, epoch_start: int) -> None:
        self.settings = settings
        self.started = started
        self.epoch = epoch_start
        self.servers: dict[str, Server] = {}
        self.slabs: dict[SlabKey, Slab] = {}
        self.volume_epoch: dict[VolumeKey, int] = {}
        self.changed: set[VolumeKey] = set()  # volumes whose map changed; server publishes
        self.pushes: dict[int, Push] = {}
        self.waiting: set[int] = set()  # planned, not yet ordered: clients must see the map
        # Clients see the target: each waits for one of the `max_pushes` copying slots.
        self.ready: list[int] = []
        self.copying: set[int] = set()  # ordered to their sources
        # Planned pushes whose target has not yet confirmed it holds no old copy of the slab.
        self.clearing: set[int] = set()
        self.applied: dict[VolumeKey, int] = {}  # newest epoch a client of it said it applied
        self.pushing: dict[SlabKey, int] = {}
        self.pushes_done = 0
        self.pushes_failed = 0
        self.rereplicated_bytes = 0
        self._held: dict[str, set[SlabKey]] = {}
        self._by_volume: dict[VolumeKey, dict[int, Slab]] = {}
        self._push_ids = itertools.count(1)
        self._last_tick = started

    # -- bookkeeping -----------------------------------------------------------------------

    def in_grace(self, now: float) -> bool:
        return now < self.started + self.settings.restart_grace

    def _touch(self, key: SlabKey) -> None:
        self.epoch += 1
        volume = (key[0], key[1])
        self.volume_epoch[volume] = self.epoch
        self.changed.add(volume)

    def _new_slab(self, key: SlabKey, target: int) -> Slab:
        slab = self.slabs[key] = Slab(target=target)
        self._by_volume.setdefault((key[0], key[1]), {})[key[2]] = slab
        return slab

    def _hold(self, server_id: str, key: SlabKey) -> None:
        self._held.setdefault(server_id, set()).add(key)

    def _unhold(self, server_id: str, key: SlabKey) -> None:
        held = self._held.get(server_id)
        if held is not None:
            held.discard(key)

    def held_by(self, server_id: str) -> set[SlabKey]:
        """Slabs the map lists on the server (replica or filling)."""
        return set(self._held.get(server_id, ()))

    def _add_replica(self, key: SlabKey, slab: Slab, server_id: str) -> None:
        if server_id not in slab.replicas:
            slab.replicas.append(server_id)
            slab.replicas.sort()
        self._hold(server_id, key)

    def _live(self, server_id: str) -> bool:
        server = self.servers.get(server_id)
        return server is not None and server.liveness == "live"

    # -- page servers ----------------------------------------------------------------------

    def register(
        self,
        server_id: str,
        *,
        endpoint: str,
        metrics_url: str,
        zone: str,
        capacity_bytes: int,
        used_bytes: int,
        started_at: float,
        now: float,
        wall: float,
    ) -> None:
        """A page server (re)announced itself. Placement then asks for its inventory."""
        old = self.servers.get(server_id)
        server = Server(
            server_id=server_id,
            endpoint=endpoint,
            metrics_url=metrics_url,
            zone=zone,
            capacity_bytes=capacity_bytes,
            used_bytes=used_bytes,
            sample_at=wall,
            started_at=started_at,
            last_seen=now,
        )
        if old is not None and old.liveness != "dead":
            # The same server again (its process restarted quickly, or a register was
            # retried): its arena outlived the process, so its replicas stay where they are.
            server.draining = old.draining
            server.reservations = old.reservations
            if old.from_metrics:
                server.used_bytes, server.sample_at = old.used_bytes, old.sample_at
                server.from_metrics = True
            if old.endpoint != endpoint:
                self._touch_all(self.held_by(server_id))
        self.servers[server_id] = server

    def _touch_all(self, keys: Iterable[SlabKey]) -> None:
        for key in keys:
            self._touch(key)

    def heartbeat(
        self,
        server_id: str,
        *,
        used_bytes: int,
        capacity_bytes: int,
        under_pressure: bool,
        now: float,
    ) -> bool:
        """Record a heartbeat; False means "unknown or declared dead: register again"."""
        server = self.servers.get(server_id)
        if server is None or server.liveness == "dead":
            return False
        server.last_seen = now
        server.capacity_bytes = capacity_bytes
        if not server.from_metrics:
            server.used_bytes = used_bytes
        server.under_pressure = under_pressure
        if server.liveness == "suspect" and server.probe_deadline is None:
            server.liveness = "live"
        return True

    def set_utilization(self, server_id: str, used: int, capacity: int, at: float) -> None:
        """A metric sample taken at wall time `at`; forgets reservations older than it."""
        server = self.servers.get(server_id)
        if server is None or (server.from_metrics and at <= server.sample_at):
            return
        server.used_bytes, server.capacity_bytes, server.sample_at = used, capacity, at
        server.from_metrics = True
        server.reservations = [stamp for stamp in server.reservations if stamp > at]

    def report_failure(self, server_id: str, now: float) -> Liveness:
        """A client could not use the server: suspect it until a probe answers in time.

        Raises:
            KeyError: unknown server.
        """
        server = self.servers[server_id]
        if server.liveness != "dead":
            server.liveness = "suspect"
            if server.probe_deadline is None:
                server.probe_deadline = now + self.settings.dead_after
        return server.liveness

    def missed_write(self, server_id: str, key: SlabKey, now: float) -> list[Drop]:
        """A client's write of slab `key` reached other replicas but not `server_id`: its
        copy is stale. It leaves the slab (a new epoch; `plan` copies the slab anew from the
        others) and is told to drop its copy; a push to or from it is abandoned. Nothing
        changes when it is the slab's last replica. Returns the drops to send."""
        slab = self.slabs.get(key)
        if slab is None:
            return []
        drops: list[Drop] = []
        for push in list(self.pushes.values()):
            if push.key == key and server_id in (push.source, push.target):
                drops.extend(self._abandon(push, now))
        if server_id in slab.replicas and len(slab.replicas) > 1:
            slab.replicas.remove(server_id)
            self._unhold(server_id, key)
            self._touch(key)
            if server_id in self.servers:
                drops.append(Drop(server_id, key))
        return list(dict.fromkeys(drops))

    def probe_answered(self, server_id: str, now: float) -> None:
        server = self.servers.get(server_id)
        if server is None or server.liveness == "dead":
            return
        server.probe_deadline = None
        if now - server.last_seen <= self.settings.suspect_after:
            server.liveness = "live"

    def tick(self, now: float) -> tuple[list[str], list[Drop]]:
        """Advance liveness; returns (servers declared dead now, drops of partial copies)."""
        dead: list[str] = []
        drops: list[Drop] = []
        stalled = now - self._last_tick
        self._last_tick = now
        if stalled > self.settings.stall_after:
            # Placement itself did not run (paused, swapped, overloaded): it could not hear
            # heartbeats meanwhile, so the silence is its own, not the servers'. Without this a
            # pause of placement would declare every server dead and re-replicate everything.
            for server in self.servers.values():
                server.last_seen += stalled
        for server in self.servers.values():
            if server.liveness == "dead":
                continue
            silent = now - server.last_seen
            probe_failed = server.probe_deadline is not None and now > server.probe_deadline
            if silent > self.settings.dead_after or probe_failed:
                dead.append(server.server_id)
                drops.extend(self._declare_dead(server, now))
            elif silent > self.settings.suspect_after:
                server.liveness = "suspect"
        return dead, drops

    def _declare_dead(self, server: Server, now: float) -> list[Drop]:
        server.liveness = "dead"
        server.probe_deadline = None
        server.reservations = []
        drops: list[Drop] = []
        for push in list(self.pushes.values()):
            if server.server_id in (push.source, push.target):
                drops.extend(self._abandon(push, now))
        for key in self.held_by(server.server_id):
            slab = self.slabs[key]
            if server.server_id in slab.replicas:
                slab.replicas.remove(server.server_id)
            if server.server_id in slab.filling:
                slab.filling.remove(server.server_id)
            self._touch(key)
        self._held.pop(server.server_id, None)
        return [drop for drop in drops if drop.server_id != server.server_id]

    def drain(self, server_id: str, *, cancel: bool = False) -> int:
        """Start (or cancel) draining; returns the slabs still listed on the server.

        Raises:
            KeyError: unknown server.
        """
        server = self.servers[server_id]
        server.draining = not cancel
        return len(self.held_by(server_id))

    # -- inventories -----------------------------------------------------------------------

    def adopt_inventory(self, server_id: str, keys: Iterable[SlabKey], now: float) -> list[Drop]:
        """Merge what a server holds into the map; returns drops of its stale copies."""
        server = self.servers.get(server_id)
        if server is None or server.liveness == "dead":
            return []
        drops: list[Drop] = []
        grace = self.in_grace(now)
        for key in keys:
            slab = self.slabs.get(key)
            if slab is None:
                slab = self._new_slab(key, self.settings.default_replicas)
            elif server_id in slab.replicas or server_id in slab.filling:
                continue
            elif (push_id := self.pushing.get(key)) is not None and (
                self.pushes[push_id].target == server_id
            ):
                continue  # a push target clearing its old copy: that copy is no replica
            elif not grace and any(self._live(other) for other in slab.replicas):
                drops.append(Drop(server_id, key))
                continue
            self._add_replica(key, slab, server_id)
            self._touch(key)
        return drops

    # -- allocation ------------------------------------------------------------------------

    def eligible(self, server: Server) -> bool:
        return (
            server.liveness == "live"
            and not server.leaving
            and server.free_estimate(self.settings.alloc_reserve) >= self.settings.min_free
        )

    def choose(
        self, k: int, *, exclude: Iterable[str] = (), zones_used: Iterable[str] = ()
    ) -> list[str]:
        """Up to k eligible servers, most free first, distinct zones while zones remain."""
        skip = set(exclude)
        reserve = self.settings.alloc_reserve
        candidates = sorted(
            (s for s in self.servers.values() if s.server_id not in skip and self.eligible(s)),
            key=lambda s: (
                -s.free_estimate(reserve),
                len(self._held.get(s.server_id, ())),
                s.server_id,
            ),
        )
        chosen: list[Server] = []
        zones = set(zones_used)
        for server in candidates:
            if len(chosen) < k and server.zone not in zones:
                chosen.append(server)
                zones.add(server.zone)
        for server in candidates:
            if len(chosen) < k and server not in chosen:
                chosen.append(server)
        return [server.server_id for server in chosen]

    def why_none_eligible(self) -> str:
        if not self.servers:
            return "no page server has registered"
        reasons = []
        for server in sorted(self.servers.values(), key=lambda s: s.server_id):
            why: str
            if server.liveness != "live":
                why = server.liveness
            elif server.draining:
                why = "draining"
            elif server.under_pressure:
                why = "under memory pressure"
            else:
                free = server.free_estimate(self.settings.alloc_reserve)
                why = f"full ({max(free, 0) >> 20} MiB free, needs {self.settings.min_free >> 20})"
            reasons.append(f"{server.server_id}: {why}")
        return "no eligible page server: " + "; ".join(reasons)

    def allocate(
        self, key: SlabKey, k: int, *, known: Iterable[str] = (), now: float, wall: float
    ) -> Allocation:
        """Place slab `key` on k servers, or answer where it already is (idempotent).

        Raises:
            Rebuilding: in the restart grace period and the slab is not known yet.
            NoEligibleServer: no server can take it.
        """
        slab = self.slabs.get(key)
        if slab is None:
            adopt = [sid for sid in known if self._live(sid)]
            if adopt:
                slab = self._new_slab(key, k)
                for server_id in adopt:
                    self._add_replica(key, slab, server_id)
                self._touch(key)
            else:
                if self.in_grace(now):
                    raise Rebuilding(
                        f"placement restarted and is rebuilding its map for "
                        f"{self.started + self.settings.restart_grace - now:.1f}s more; retry"
                    )
                chosen = self.choose(k)
                if not chosen:
                    raise NoEligibleServer(self.why_none_eligible())
                slab = self._new_slab(key, k)
                for server_id in chosen:
                    self._add_replica(key, slab, server_id)
                    self.servers[server_id].reservations.append(wall)
                self._touch(key)
        elif k > slab.target:
            slab.target = k  # repairs add the missing replicas in the background
        return self.view(key)

    def view(self, key: SlabKey) -> Allocation:
        slab = self.slabs[key]
        return Allocation(
            replicas=list(slab.replicas),
            filling=list(slab.filling),
            degraded=len(slab.replicas) < slab.target,
            epoch=self.epoch,
        )

    # -- repairs, drains, pressure ---------------------------------------------------------

    def _staying(self, slab: Slab) -> list[str]:
        return [sid for sid in slab.replicas if not self.servers[sid].leaving]

    def plan(self, now: float, wall: float) -> tuple[list[Push], list[Drop]]:
        """New pushes to start (missing replicas first, then replicas that must leave), and
        drops of leaving replicas that are no longer needed."""
        if self.in_grace(now):
            return [], []
        budget = PLANNED_PER_SLOT * self.settings.max_pushes - len(self.pushes)
        wanted: list[tuple[int, SlabKey]] = []
        drops: list[Drop] = []
        for key, slab in self.slabs.items():
            if key in self.pushing or slab.retry_at > now:
                continue
            staying = len(self._staying(slab))
            missing = slab.target - staying - len(slab.filling)
            if missing > 0:
                wanted.append((len(slab.replicas) - slab.target, key))
            elif staying >= slab.target and staying < len(slab.replicas):
                drops.extend(self._release_leaving(key, slab))
        wanted.sort()
        planned = 0
        for _, key in wanted:
            if planned >= budget:
                break
            push = self._plan_one(key, now, wall)
            if push is not None:
                planned += 1
                drops.append(Drop(push.target, key, push.push_id))
        return self._release(now), drops

    def cleared(self, push_id: int, *, ok: bool, now: float) -> list[Drop]:
        """The target of a planned push answered its clearing drop (or failed to): it now
        holds nothing of the slab and is listed as filling. Only now, or a page it kept from
        an earlier copy, which neither a client write nor the push (which never overwrites
        a page the target has) would replace, could be served stale later. Returns drops."""
        push = self.pushes.get(push_id)
        if push is None or push_id not in self.clearing:
            return []  # abandoned meanwhile
        self.clearing.discard(push_id)
        if not ok or not self._live(push.target):
            return self._abandon(push, now)
        self.slabs[push.key].filling.append(push.target)
        self._touch(push.key)
        # The wait for clients to see the target (`_release`, map_settle) starts only now.
        self.pushes[push_id] = replace(push, epoch=self.epoch, started=now)
        self.waiting.add(push_id)
        return []

    def map_applied(self, tenant: str, volume: int, epoch: int) -> None:
        """A client of the volume polled with `since_epoch=epoch`: it applied that map."""
        key = (tenant, volume)
        if epoch > self.applied.get(key, 0):
            self.applied[key] = epoch

    def _release(self, now: float) -> list[Push]:
        """Planned pushes that may start now.

        A push may only start copying once every client writing the slab writes to the target
        too: a page written to the source alone after the push read it would be missing or
        stale on the new replica. So it waits until a client of the volume has polled the map
        that lists the target as filling (`map_applied`), or `map_settle` seconds (a volume
        nobody polls has nobody writing to it); then for a copying slot.

        Which ready push takes a free slot: the one that leaves the busiest page server least
        busy (ties: the oldest). A page server copies from one thread, so copies spread over
        the servers finish sooner than copies piled on one; storing a pushed slab costs its
        target about twice what reading and sending it costs its source (measured on
        loopback), so a target counts double.
        """
        for push_id in sorted(self.waiting):
            push = self.pushes[push_id]
            applied = self.applied.get((push.key[0], push.key[1]), 0)
            if applied >= push.epoch or now >= push.started + self.settings.map_settle:
                self.waiting.discard(push_id)
                self.ready.append(push_id)
        load: Counter[str] = Counter()
        for push_id in self.copying:
            push = self.pushes[push_id]
            load[push.target] += TARGET_LOAD
            load[push.source] += SOURCE_LOAD
        starting: list[Push] = []
        while self.ready and len(self.copying) < self.settings.max_pushes:
            _, index = min(
                (self._busiest_after(self.pushes[push_id], load), index)
                for index, push_id in enumerate(self.ready)
            )
            push = self.pushes[self.ready.pop(index)]
            load[push.target] += TARGET_LOAD
            load[push.source] += SOURCE_LOAD
            self.copying.add(push.push_id)
            starting.append(push)
        return starting

    @staticmethod
    def _busiest_after(push: Push, load: Counter[str]) -> int:
        """The copying load of the busier of the push's two servers, were it started."""
        return max(load[push.target] + TARGET_LOAD, load[push.source] + SOURCE_LOAD)

    def _release_leaving(self, key: SlabKey, slab: Slab) -> list[Drop]:
        drops = []
        for server_id in [sid for sid in slab.replicas if self.servers[sid].leaving]:
            slab.replicas.remove(server_id)
            self._unhold(server_id, key)
            drops.append(Drop(server_id, key))
        if drops:
            self._touch(key)
        return drops

    def _plan_one(self, key: SlabKey, now: float, wall: float) -> Push | None:
        slab = self.slabs[key]
        leaving = [sid for sid in slab.replicas if self.servers[sid].leaving]
        staying = self._staying(slab)
        # Copy from a leaving replica when it is alive (spares the servers that keep serving).
        sources = [sid for sid in leaving + staying if self._live(sid)]
        if not sources:
            return None  # lost, or only suspect copies left: wait
        zones = [self.servers[sid].zone for sid in staying + slab.filling]
        targets = self.choose(1, exclude=slab.replicas + slab.filling, zones_used=zones)
        if not targets:
            slab.retry_at = now + self.settings.retry_after
            return None
        target = targets[0]
        reason: PushReason = "repair"
        if len(slab.replicas) >= slab.target:
            reason = "drain" if any(self.servers[sid].draining for sid in leaving) else "pressure"
        self._hold(target, key)
        self.servers[target].reservations.append(wall)
        # Listed as filling once the target cleared any old copy (`cleared`); epoch set then.
        push = Push(next(self._push_ids), key, sources[0], target, reason, now, 0)
        self.pushes[push.push_id] = push
        self.pushing[key] = push.push_id
        self.clearing.add(push.push_id)
        return push

    def _abandon(self, push: Push, now: float) -> list[Drop]:
        """Forget a push that will not complete; its target drops the partial copy."""
        self.pushes.pop(push.push_id, None)
        self.pushing.pop(push.key, None)
        self.waiting.discard(push.push_id)
        self.clearing.discard(push.push_id)
        if push.push_id in self.ready:
            self.ready.remove(push.push_id)
        self.copying.discard(push.push_id)
        self.pushes_failed += 1
        slab = self.slabs[push.key]
        slab.retry_at = now + self.settings.retry_after
        self._unhold(push.target, push.key)  # held since planned (the target holds no copy)
        if push.target in slab.filling:
            slab.filling.remove(push.target)
            self._touch(push.key)
        return [Drop(push.target, push.key)] if self._live(push.target) else []

    def push_finished(
        self, push_id: int, *, ok: bool, copied_bytes: int = 0, now: float
    ) -> list[Drop]:
        """The source answered (or timed out). Returns drops to send."""
        push = self.pushes.get(push_id)
        if push is None:
            return []  # abandoned already (a server died)
        if not ok or not self._live(push.target):
            return self._abandon(push, now)
        self.pushes.pop(push_id)
        self.pushing.pop(push.key, None)
        self.copying.discard(push_id)
        self.pushes_done += 1
        self.rereplicated_bytes += copied_bytes
        slab = self.slabs[push.key]
        slab.filling.remove(push.target)
        self._add_replica(push.key, slab, push.target)
        self._touch(push.key)
        if len(self._staying(slab)) >= slab.target:
            return self._release_leaving(push.key, slab)
        return []

    # -- views -----------------------------------------------------------------------------

    def volume_map(self, tenant: str, volume: int) -> dict[int, Slab]:
        """The slabs of one volume by number, in order (indexed: clients poll this)."""
        slabs = self._by_volume.get((tenant, volume), {})
        return {number: slabs[number] for number in sorted(slabs)}

    def slab_states(self) -> dict[str, int]:
        counts = {"healthy": 0, "degraded": 0, "lost": 0}
        for slab in self.slabs.values():
            if not slab.replicas:
                counts["lost"] += 1
            elif len(slab.replicas) < slab.target:
                counts["degraded"] += 1
            else:
                counts["healthy"] += 1
        return counts
