"""Counters of the remote backend, kept as plain ints (cheap on the hot path) and exported by
the metrics collector (`remote.assembly`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RemoteStats:
    """Counters every part of the backend adds to; read at scrape time."""

    failovers: int = 0
    replica_failures: int = 0
    pages_read_remote: int = 0
    pages_read_zero: int = 0
    pages_written: int = 0
    pages_read_mirror: int = 0
    pages_written_mirror_only: int = 0
    pages_resynced: int = 0
    resync_failures: int = 0
    # Pages copied from the replicas to a mirror that may have missed writes, and rebuilds
    # that completed (the mirror serves page-ins again).
    pages_rebuilt: int = 0
    mirror_rebuilds: int = 0
    # Pages whose checksum matched but whose AES-GCM tag did not: altered by or on the way
    # from a page server, or served for another address.
    auth_failures: int = 0
    # Pages written back to a replica that served them corrupt or missing (read repair),
    # repairs that failed, and repairs skipped (a write to the slab was in flight, or the
    # bound on repairs in flight was reached).
    read_repairs: int = 0
    missed_writes: int = 0
    read_repairs_failed: int = 0
    read_repairs_skipped: int = 0
