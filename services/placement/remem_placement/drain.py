"""`remem drain SERVER`: move every slab off a page server, showing progress on stderr.

Placement copies each slab page server to page server (as for re-replication) and drops it
from the drained server once the copy is a full replica; when the bar reaches the end the
server holds nothing placement needs and can be stopped.
"""

from __future__ import annotations

import sys
import time

from remem_common.placement_requests import PlacementRequestError, PlacementRequestTimeout

from remem_placement.tools import ToolParser

BAR_WIDTH = 30
POLL_SECONDS = 0.2


def bar(done: int, total: int) -> str:
    filled = BAR_WIDTH if total == 0 else BAR_WIDTH * done // total
    return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + f"] {done}/{total} slabs moved"


def main(argv: list[str] | None = None) -> int:
    """Drain a server; 0 when it holds no slab, 1 on error or timeout."""
    parser = ToolParser("remem drain", "Move every slab off a page server.")
    parser.add_argument("server", help="server id (see remem status)")
    parser.add_argument("--cancel", action="store_true", help="stop draining the server")
    parser.add_argument("--no-wait", action="store_true", help="start the drain and return")
    parser.add_argument(
        "--deadline", type=float, default=600.0, help="seconds to wait for the drain"
    )
    args = parser.parse_args(argv)
    err = sys.stderr
    tty = err.isatty()
    try:
        with parser.placement_client(args) as client:
            reply = client.drain(args.server, cancel=args.cancel)
            if args.cancel or args.no_wait:
                word = "cancelled" if args.cancel else "started"
                err.write(f"drain {word}: {args.server} holds {reply.slabs_left} slabs\n")
                return 0
            total = reply.slabs_left
            deadline = time.monotonic() + args.deadline
            shown = ""
            while True:
                status = client.status()
                server = next((s for s in status.servers if s.server_id == args.server), None)
                if server is None or server.state == "dead":
                    err.write(f"\nremem drain: {args.server} died before the drain finished\n")
                    return 1
                total = max(total, server.slabs)
                line = f"draining {args.server} " + bar(total - server.slabs, total)
                if line != shown:
                    err.write(("\r" + line) if tty else (line + "\n"))
                    err.flush()
                    shown = line
                if server.slabs == 0:
                    err.write(("\n" if tty else "") + f"{args.server} drained: safe to stop\n")
                    return 0
                if time.monotonic() > deadline:
                    err.write(f"\nremem drain: not done after {args.deadline}s\n")
                    return 1
                time.sleep(POLL_SECONDS)  # polling interval of a progress display
    except (PlacementRequestError, PlacementRequestTimeout) as exc:
        err.write(f"remem drain: {exc}\n")
        return 1
