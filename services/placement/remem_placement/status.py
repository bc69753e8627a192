"""`remem status`: page servers, degraded slabs and re-replication progress, from placement."""

from __future__ import annotations

import sys

from remem_common.placement_requests import PlacementRequestError, PlacementRequestTimeout
from remem_common.protocol.admin_placement import GetStatusReply

from remem_placement.tools import ToolParser, human_bytes


def render(status: GetStatusReply) -> str:
    """The human table: one row per page server, then degraded slabs and pushes."""
    rows = [("SERVER", "ZONE", "STATE", "USED/CAPACITY", "SLABS", "ENDPOINT")]
    for s in status.servers:
        pct = 100 * s.used_bytes / s.capacity_bytes if s.capacity_bytes else 0.0
        used = f"{human_bytes(s.used_bytes)}/{human_bytes(s.capacity_bytes)} ({pct:.0f}%)"
        rows.append((s.server_id, s.zone, s.state, used, str(s.slabs), s.endpoint))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.append("")
    grace = " (rebuilding map after restart)" if status.in_grace else ""
    lines.append(
        f"slabs: {status.slabs_total} total, {len(status.degraded)} degraded; "
        f"epoch {status.epoch}{grace}"
    )
    for slab in status.degraded:
        filling = f" filling={','.join(slab.filling)}" if slab.filling else ""
        lines.append(
            f"  degraded {slab.tenant}/{slab.volume}/{slab.slab}: "
            f"{len(slab.replicas)}/{slab.target} replicas [{','.join(slab.replicas)}]{filling}"
        )
    lines.append(
        f"re-replication: {len(status.pushes)} in flight, {status.pushes_done} done, "
        f"{status.pushes_failed} failed, {human_bytes(status.rereplicated_bytes)} copied"
    )
    for push in status.pushes:
        lines.append(
            f"  {push.reason} {push.tenant}/{push.volume}/{push.slab}: "
            f"{push.source} -> {push.target} "
            f"({'copying' if push.copying else 'waiting for clients or a slot'}, "
            f"{push.seconds:.1f}s)"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print placement's view of the cluster; exit 1 if placement does not answer."""
    parser = ToolParser("remem status", "Show page servers, degraded slabs and repairs.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        with parser.placement_client(args) as client:
            status = client.status()
    except (PlacementRequestError, PlacementRequestTimeout) as exc:
        sys.stderr.write(f"remem status: {exc}\n")
        return 1
    if args.json:
        sys.stdout.write(status.model_dump_json(indent=2) + "\n")
    else:
        sys.stdout.write(render(status))
    return 0
