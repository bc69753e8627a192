"""`remem placement`: parse the flags, then run placement's lifecycle
(`remem_common.lifecycle`: validate, bind, ready, serve, exit)."""

from __future__ import annotations

from remem_common.lifecycle import run_cli

from remem_placement.config import DESCRIPTION, ENV_PREFIX, PROG, PlacementConfig
from remem_placement.service import start


def main(argv: list[str] | None = None) -> int:
    """Run placement; returns the process exit status."""
    return run_cli(
        argv, PlacementConfig, start, prog=PROG, env_prefix=ENV_PREFIX, description=DESCRIPTION
    )
