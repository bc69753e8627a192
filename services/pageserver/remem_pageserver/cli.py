"""`remem pageserver`: parse the flags, then run the page server's lifecycle
(`remem_common.lifecycle`: validate, open the arena, bind, ready, serve, drain, exit)."""

from __future__ import annotations

from remem_common.lifecycle import run_cli

from remem_pageserver.config import DESCRIPTION, ENV_PREFIX, PROG, PageServerConfig
from remem_pageserver.service import start


def main(argv: list[str] | None = None) -> int:
    """Run a page server; returns the process exit status."""
    return run_cli(
        argv, PageServerConfig, start, prog=PROG, env_prefix=ENV_PREFIX, description=DESCRIPTION
    )
