"""`remem mirror`: parse the flags, then run the mirror's lifecycle (`remem_common.lifecycle`:
validate, open the mirror file, bind, ready, serve, drain and fdatasync, exit)."""

from __future__ import annotations

from remem_common.lifecycle import run_cli

from remem_mirror.config import DESCRIPTION, ENV_PREFIX, PROG, MirrorConfig
from remem_mirror.service import start


def main(argv: list[str] | None = None) -> int:
    """Run the mirror; returns the process exit status."""
    return run_cli(
        argv, MirrorConfig, start, prog=PROG, env_prefix=ENV_PREFIX, description=DESCRIPTION
    )
