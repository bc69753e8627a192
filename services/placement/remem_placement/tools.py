"""Shared bits of the admin tools (`remem status`, `remem drain`): flags and formatting."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from remem_placement.config import DEFAULT_ENDPOINT, ENV_PREFIX

ENDPOINT_ENV = f"{ENV_PREFIX}ENDPOINT"


class ToolParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and the common --placement/--timeout flags."""

    def __init__(self, prog: str, description: str) -> None:
        super().__init__(prog=prog, description=description)
        self.add_argument(
            "--placement",
            default=os.environ.get(ENDPOINT_ENV, DEFAULT_ENDPOINT),
            help=f"placement's endpoint [env {ENDPOINT_ENV}, default {DEFAULT_ENDPOINT}]",
        )
        self.add_argument(
            "--timeout", type=float, default=5.0, help="seconds to wait for each reply"
        )

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def human_bytes(value: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if value >= 1 << shift:
            return f"{value / (1 << shift):.1f}{unit}"
    return f"{value}B"
