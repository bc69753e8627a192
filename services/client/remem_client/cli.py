"""`remem client` / `python -m remem_client`: parse the flags, protect the process, then run
the client's lifecycle (`remem_common.lifecycle`: validate, bind, ready, serve, hand over or
drain, exit; service.py) on the event loop the flags name."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from functools import partial

from remem_common.config import load_config
from remem_common.heap import keep_freed_memory
from remem_common.lifecycle import EXIT_CONFIG, run_service_async
from remem_common.logs import setup_logging

from remem_client.config import ENV_PREFIX, PROG, ClientConfig
from remem_client.memlock import protect_process
from remem_client.nbd.wire import MAX_BLOCK_SIZE
from remem_client.service import EXIT_FORCED, cancel_leftover_tasks, start

DESCRIPTION = (
    "Serve a block device over NBD (Unix socket and/or TCP) for the kernel's nbd-client, "
    "qemu, nbdfuse or fio; the host swaps onto it."
)


def main(argv: list[str] | None = None) -> int:
    """Run the client service; returns the exit status."""
    config = load_config(
        ClientConfig, argv, prog=PROG, env_prefix=ENV_PREFIX, description=DESCRIPTION
    )
    log = setup_logging("remem.client", config.log_level)
    loop_factory = event_loop_factory(config.event_loop, log)
    if loop_factory is None:
        sys.stderr.write(f"{PROG}: --event-loop uvloop: uvloop is not installed\n")
        return EXIT_CONFIG
    # Request buffers reuse what earlier requests freed: the write cache's bound and two
    # requests of the largest size NBD allows.
    keep_freed_memory(config.mirror_cache + 2 * MAX_BLOCK_SIZE)
    if config.lock_memory:
        protect_process(log)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        status = runner.run(
            run_service_async(PROG, log, partial(start, config), forced_exit=EXIT_FORCED)
        )
        if not runner.run(cancel_leftover_tasks()):
            # The runner's own close would wait for them forever: leave them to the kernel.
            logging.shutdown()
            os._exit(status)
    return status


def event_loop_factory(
    choice: str, log: logging.Logger
) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop to run on: uvloop unless asked otherwise (None: the choice is unavailable).

    uvloop matters on the hot path: its transports send a reply header and a large READ
    payload with one writev and no copy, where asyncio's (Python 3.11) join or buffer
    them. Measured with bench_nbd: 1 MiB reads about 3x faster, 4 KiB requests 10-20%.
    """
    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            return None
        log.warning("uvloop not installed; using asyncio's event loop (slower for large I/O)")
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
