"""Shared bits of the admin tools (`remem status`, `remem drain`): flags and formatting."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from remem_common.placement_client import PlacementClient
from remem_common.security import KeyFileError, Security, load_public_key

from remem_placement.config import DEFAULT_ENDPOINT, ENV_PREFIX

ENDPOINT_ENV = f"{ENV_PREFIX}ENDPOINT"
SECRET_KEY_ENV = "REMEM_ADMIN_CURVE_SECRET_KEY"
PLACEMENT_KEY_ENV = "REMEM_ADMIN_PLACEMENT_PUBLIC_KEY"


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
        self.add_argument(
            "--curve-secret-key",
            type=Path,
            default=os.environ.get(SECRET_KEY_ENV),
            help=f"an admin keypair (remem keys --role admin) [env {SECRET_KEY_ENV}]; "
            "without it the request goes in plaintext (placement run with --insecure)",
        )
        self.add_argument(
            "--placement-public-key",
            type=Path,
            default=os.environ.get(PLACEMENT_KEY_ENV),
            help=f"placement's public certificate (NAME.key) [env {PLACEMENT_KEY_ENV}]",
        )

    def placement_client(self, args: argparse.Namespace) -> PlacementClient:
        """The client the flags describe (Curve when --curve-secret-key is given)."""
        if args.curve_secret_key is None:
            return PlacementClient(args.placement, timeout=args.timeout)
        if args.placement_public_key is None:
            self.error("--curve-secret-key needs --placement-public-key")
        try:
            security = Security.curve(Path(args.curve_secret_key))
            server_key = load_public_key(Path(args.placement_public_key))
        except KeyFileError as exc:
            self.error(str(exc))
        return PlacementClient(
            args.placement, timeout=args.timeout, security=security, server_key=server_key
        )

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def human_bytes(value: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if value >= 1 << shift:
            return f"{value / (1 << shift):.1f}{unit}"
    return f"{value}B"
