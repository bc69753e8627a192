"""Placement's answers to operators: the cluster's status and drains (`remem status`, `drain`)."""

from __future__ import annotations

import logging
import time

from remem_common.protocol.admin_placement import (
    DrainServerReply,
    DrainServerRequest,
    GetStatusReply,
    GetStatusRequest,
    PushStatus,
    ServerStatus,
    SlabStatus,
)
from remem_common.protocol.envelope import (
    ErrorCode,
    ErrorReply,
)

from remem_placement.policy import (
    Cluster,
)

log = logging.getLogger("placement")


def status_reply(cluster: Cluster, msg: GetStatusRequest) -> GetStatusReply:
    """The cluster as `remem status` shows it: servers, degraded slabs, pushes running."""
    now = time.monotonic()
    reserve = cluster.settings.alloc_reserve
    servers = [
        ServerStatus(
            server_id=s.server_id,
            zone=s.zone,
            state=s.state,
            endpoint=s.endpoint,
            used_bytes=max(0, s.capacity_bytes - max(0, s.free_estimate(reserve))),
            capacity_bytes=s.capacity_bytes,
            slabs=len(cluster.held_by(s.server_id)),
            under_pressure=s.under_pressure,
            draining=s.draining,
            utilization_from="metrics" if s.from_metrics else "register",
        )
        for s in sorted(cluster.servers.values(), key=lambda s: s.server_id)
    ]
    degraded = [
        SlabStatus(
            tenant=key[0],
            volume=key[1],
            slab=key[2],
            target=slab.target,
            replicas=list(slab.replicas),
            filling=list(slab.filling),
        )
        for key, slab in sorted(cluster.slabs.items())
        if len(slab.replicas) < slab.target
    ]
    pushes = [
        PushStatus(
            tenant=p.key[0],
            volume=p.key[1],
            slab=p.key[2],
            source=p.source,
            target=p.target,
            reason=p.reason,
            seconds=max(0.0, now - p.started),
            copying=p.push_id in cluster.copying,
        )
        for p in cluster.pushes.values()
    ]
    return GetStatusReply(
        msg_id=0,
        parent_id=msg.msg_id,
        epoch=cluster.epoch,
        in_grace=cluster.in_grace(now),
        slabs_total=len(cluster.slabs),
        servers=servers,
        degraded=degraded,
        pushes=pushes,
        pushes_done=cluster.pushes_done,
        pushes_failed=cluster.pushes_failed,
        rereplicated_bytes=cluster.rereplicated_bytes,
    )


def drain_reply(cluster: Cluster, msg: DrainServerRequest) -> DrainServerReply | ErrorReply:
    """Start (or cancel) moving every slab off a page server; `not_found` for an unknown one."""
    try:
        left = cluster.drain(msg.server_id, cancel=msg.cancel)
    except KeyError:
        return ErrorReply(
            msg_id=0,
            parent_id=msg.msg_id,
            error_code=ErrorCode.NOT_FOUND,
            detail=f"no server {msg.server_id!r}",
        )
    log.info(
        "%s server_id=%s slabs=%d",
        "drain cancelled" if msg.cancel else "draining",
        msg.server_id,
        left,
    )
    return DrainServerReply(
        msg_id=0,
        parent_id=msg.msg_id,
        server_id=msg.server_id,
        draining=not msg.cancel,
        slabs_left=left,
    )
