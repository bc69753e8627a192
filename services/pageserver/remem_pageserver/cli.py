"""`remem pageserver`: parse the flags, then run the page server's lifecycle
(`remem_common.lifecycle`: validate, open the arena, bind, ready, serve, drain, exit)."""

from __future__ import annotations

from functools import partial

from remem_common.config import load_config
from remem_common.lifecycle import run_service
from remem_common.logs import setup_logging

from remem_pageserver.config import ENV_PREFIX, PageServerConfig
from remem_pageserver.service import start

PROG = "remem pageserver"


def main(argv: list[str] | None = None) -> int:
    """Run a page server; returns the process exit status."""
    config = load_config(
        PageServerConfig,
        argv,
        prog=PROG,
        env_prefix=ENV_PREFIX,
        description="Store clients' pages in this host's RAM.",
    )
    log = setup_logging("pageserver", config.log_level)
    return run_service(PROG, log, partial(start, config))
