"""`remem placement`: parse the flags, then run placement's lifecycle
(`remem_common.lifecycle`: validate, bind, ready, serve, exit)."""

from __future__ import annotations

from functools import partial

from remem_common.config import load_config
from remem_common.lifecycle import run_service
from remem_common.logs import setup_logging

from remem_placement.config import ENV_PREFIX, PlacementConfig
from remem_placement.service import start

PROG = "remem placement"


def main(argv: list[str] | None = None) -> int:
    """Run placement; returns the process exit status."""
    config = load_config(
        PlacementConfig,
        argv,
        prog=PROG,
        env_prefix=ENV_PREFIX,
        description="Control plane: page server registry, slab placement and repair.",
    )
    log = setup_logging("placement", config.log_level)
    return run_service(PROG, log, partial(start, config))
