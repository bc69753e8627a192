"""Assemble the remote backend: placement link, mirror link, page server links, metrics.

Kept apart from `server.py` so the NBD service stays transport-agnostic: `open_remote`
returns a `Backend` whose `close()` also closes the placement link and the ZeroMQ context.
What cannot start is a `ConfigError` (a key or a mirror that does not fit: exit status 2)
or a `ServiceFailure` (the mirror does not answer: 1), as `remem_common.lifecycle` maps them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import zmq
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from remem_common.lifecycle import ConfigError, ServiceFailure
from remem_common.security import Security, load_public_key

from remem_client.metrics import MalformedReplies
from remem_client.mirror_link import MirrorFailure, MirrorLink
from remem_client.placement_link import PlacementLink
from remem_client.readahead import read_ahead_of
from remem_client.remote.backend import RemoteBackend
from remem_client.sealing import PageSealer, SealingError, open_page_sealer

log = logging.getLogger("client.remote")

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from remem_client.config import ClientConfig


class _RemoteCollector(Collector):
    """Replica and placement state, read at scrape time (plain ints on the hot path)."""

    def __init__(self, backend: RemoteBackend, placement: PlacementLink) -> None:
        self._backend = backend
        self._placement = placement

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._backend.stats
        yield CounterMetricFamily(
            "client_replica_failovers_total",
            "Reads that moved on to another replica (error, timeout, missing or bad page)",
            value=stats.failovers,
        )
        yield CounterMetricFamily(
            "client_replica_failures_total",
            "Requests a replica failed (error or timeout), reported to placement",
            value=stats.replica_failures,
        )
        yield CounterMetricFamily(
            "client_replica_missed_writes_total",
            "Replicas found to have missed a write of a slab another replica stored (stale "
            "copies: not read, reported to placement, which replaces them)",
            value=stats.missed_writes,
        )
        repairs = CounterMetricFamily(
            "client_read_repairs_total",
            "Pages written back to a replica that served them corrupt or missing, by result "
            "(skipped: a write to the slab was in flight, or too many repairs were)",
            labels=["result"],
        )
        repairs.add_metric(["ok"], stats.read_repairs)
        repairs.add_metric(["failed"], stats.read_repairs_failed)
        repairs.add_metric(["skipped"], stats.read_repairs_skipped)
        yield repairs
        pages = CounterMetricFamily(
            "client_pages_total", "Pages moved by the remote backend", labels=["kind"]
        )
        pages.add_metric(["read_remote"], stats.pages_read_remote)
        pages.add_metric(["read_zero"], stats.pages_read_zero)
        pages.add_metric(["written"], stats.pages_written)
        ahead = self._backend.read_ahead
        if ahead is not None:  # fetched ahead of sequential reads, and read from there
            pages.add_metric(["read_ahead_fetched"], ahead.fetched)
            pages.add_metric(["read_ahead_hit"], ahead.hits)
            pages.add_metric(["read_ahead_waited"], ahead.waited)
        yield pages
        if self._backend.malformed is not None:
            malformed = CounterMetricFamily(
                "client_malformed_messages",
                "Replies from a page server, placement or the mirror that did not decode",
                labels=["peer", "reason"],
            )
            for (peer, reason), count in list(self._backend.malformed.counts.items()):
                malformed.add_metric([peer, reason], count)
            yield malformed
            late = CounterMetricFamily(
                "client_late_replies",
                "Replies from a page server, placement or the mirror to a request no longer "
                "waiting (it timed out, or its caller gave up), dropped",
                labels=["peer"],
            )
            for peer, count in list(self._backend.malformed.late.items()):
                late.add_metric([peer], count)
            yield late
        yield CounterMetricFamily(
            "client_page_auth_failures_total",
            "Pages read whose checksum matched but whose AES-GCM tag did not (altered or "
            "misplaced ciphertext); each was read from another copy",
            value=stats.auth_failures,
        )
        yield GaugeMetricFamily(
            "client_page_encryption",
            "1 if pages are encrypted before they leave this host",
            value=1.0 if self._backend.sealer is not None else 0.0,
        )
        yield GaugeMetricFamily(
            "client_location_metadata_bytes",
            "Client memory holding page locations (written-page bitmap and slab map)",
            value=self._backend.metadata_bytes(),
        )
        pages_mirror = CounterMetricFamily(
            "client_mirror_pages_total",
            "Pages served by or written to the local mirror alone",
            labels=["kind"],
        )
        pages_mirror.add_metric(["read"], stats.pages_read_mirror)
        pages_mirror.add_metric(["written_mirror_only"], stats.pages_written_mirror_only)
        pages_mirror.add_metric(["resynced"], stats.pages_resynced)
        pages_mirror.add_metric(["rebuilt"], stats.pages_rebuilt)
        yield pages_mirror
        yield GaugeMetricFamily(
            "client_unreplicated_pages",
            "Pages whose newest copy only the mirror holds (written while the network was down)",
            value=self._backend.unreplicated_pages,
        )
        mode = GaugeMetricFamily("client_mode", "1 for the mode the client is in", labels=["mode"])
        for name in ("normal", "network_down", "resyncing"):
            mode.add_metric([name], 1.0 if self._backend.mode == name else 0.0)
        yield mode
        mirror = self._backend.mirror
        if mirror is not None:
            yield GaugeMetricFamily(
                "client_mirror_cache_bytes",
                "Page bytes sent to the mirror and not yet confirmed on its disk",
                value=mirror.cache_bytes,
            )
            yield GaugeMetricFamily(
                "client_mirror_up",
                "1 if the mirror answers and holds every write (it can serve page-ins)",
                value=1.0 if mirror.serves_reads else 0.0,
            )
            yield CounterMetricFamily(
                "client_mirror_written_bytes",
                "Page bytes the mirror confirmed on disk",
                value=mirror.written_bytes,
            )
            yield CounterMetricFamily(
                "client_mirror_rebuilds",
                "Rebuilds of the mirror from the replicas that completed (it missed writes)",
                value=stats.mirror_rebuilds,
            )
            yield CounterMetricFamily(
                "client_mirror_failures",
                "Mirror requests that failed or timed out",
                value=mirror.failures,
            )
        yield GaugeMetricFamily(
            "client_map_epoch", "Epoch of the slab map last applied", value=self._placement.epoch
        )
        yield GaugeMetricFamily(
            "client_degraded_slabs",
            "Slabs of this volume with fewer replicas than asked for",
            value=len(self._placement.degraded),
        )


async def open_remote(config: ClientConfig, registry: CollectorRegistry) -> RemoteBackend:
    """Connect to placement, adopt the volume's current map, and return the backend."""
    assert config.placement is not None  # the config validator requires it for "remote"
    sealer: PageSealer | None = None
    if config.encrypt_pages:
        assert config.page_key is not None  # the config validator requires it
        try:
            sealer = open_page_sealer(config.page_key, tenant=config.tenant, volume=config.volume)
        except SealingError as exc:
            raise ConfigError(str(exc)) from exc
    else:
        log.warning(
            "--no-encrypt-pages: pages go to the page servers in plaintext, unauthenticated "
            "(for measuring the cost of encryption only)"
        )
    # A key file that cannot be used raises KeyFileError: exit status 2, like a ConfigError.
    security = Security.from_settings(config, "client")
    placement_key = (
        load_public_key(config.placement_public_key) if config.placement_public_key else None
    )
    mirror_key = load_public_key(config.mirror_public_key) if config.mirror_public_key else None
    if security.keypair is not None and security.keypair.identity.tenant != config.tenant:
        # Every request would be answered `forbidden`: say so once, at start.
        raise ConfigError(
            f"--curve-secret-key is a key of tenant {security.keypair.identity.tenant}, "
            f"not of --tenant {config.tenant}"
        )
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    malformed = MalformedReplies()
    placement = PlacementLink(
        config.placement,
        tenant=config.tenant,
        volume=config.volume,
        replicas=config.replicas,
        context=context,
        timeout=config.placement_timeout,
        poll_interval=config.map_poll_interval,
        malformed=malformed,
        security=security,
        server_key=placement_key,
    )
    mirror = None
    if config.mirror:
        mirror = MirrorLink(
            config.mirror,
            context=context,
            cache_bytes=int(config.mirror_cache),
            timeout=config.mirror_timeout,
            malformed=malformed,
            security=security,
            server_key=mirror_key,
        )
    backend = RemoteBackend(
        size=int(config.size),
        tenant=config.tenant,
        volume=config.volume,
        placement=placement,
        context=context,
        replica_timeout=config.replica_timeout,
        sealer=sealer,
        mirror=mirror,
        resync_interval=config.resync_interval,
        malformed=malformed,
        security=security,
        read_ahead=read_ahead_of(int(config.read_ahead)),
    )

    async def close_links() -> None:
        await placement.close()
        context.destroy(linger=0)

    backend.on_close.append(close_links)
    if mirror is not None:
        try:
            await _adopt_mirror(mirror, backend, config)
        except (ConfigError, ServiceFailure):
            await backend.close()
            raise
    await placement.start(backend.slabs)
    if mirror is not None and mirror.incomplete and not backend.written_anywhere():
        # Nothing to copy (a new volume): trims only, done before serving, so a new client
        # has a mirror that serves page-ins from its first write.
        await backend.rebuild_mirror()
    backend.start_resync()
    registry.register(_RemoteCollector(backend, placement))
    return backend


async def _adopt_mirror(mirror: MirrorLink, backend: RemoteBackend, config: ClientConfig) -> None:
    """Attach to the mirror: check it fits the device and take over its mirror-only pages
    (a restart). A mirror whose last session did not end cleanly is rebuilt from the
    replicas (by the resync task) before it serves page-ins.

    Raises:
        ConfigError: the mirror holds another number of pages than the device.
        ServiceFailure: the mirror did not answer.
    """
    try:
        attached = await mirror.attach()
        if attached.page_count != backend.page_count:
            raise ConfigError(
                f"mirror {config.mirror} holds {attached.page_count} pages, the device "
                f"has {backend.page_count}"
            )
        _reply, bitmap = await mirror.list_unreplicated()
    except MirrorFailure as exc:
        raise ServiceFailure(f"mirror {config.mirror} did not answer: {exc}") from exc
    pages = backend.mark_unreplicated(bitmap)
    log.info(
        "mirror attached endpoint=%s path=%s direct_io=%s unreplicated_pages=%d complete=%s",
        config.mirror,
        attached.path,
        attached.direct_io,
        pages,
        attached.complete,
    )
