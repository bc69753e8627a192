"""`remem mirror`: parse the flags, then run the mirror's lifecycle (`remem_common.lifecycle`:
validate, open the mirror file, bind, ready, serve, drain and fdatasync, exit)."""

from __future__ import annotations

from functools import partial

from remem_common.config import load_config
from remem_common.lifecycle import run_service
from remem_common.logs import setup_logging

from remem_mirror.config import ENV_PREFIX, MirrorConfig
from remem_mirror.service import start

PROG = "remem mirror"


def main(argv: list[str] | None = None) -> int:
    """Run the mirror; returns the process exit status."""
    config = load_config(
        MirrorConfig,
        argv,
        prog=PROG,
        env_prefix=ENV_PREFIX,
        description="Keep a local write-behind copy of every page-out.",
    )
    log = setup_logging("mirror", config.log_level)
    return run_service(PROG, log, partial(start, config))
