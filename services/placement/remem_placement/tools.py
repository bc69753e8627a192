"""Shared bits of the admin tools (`remem status`, `remem drain`): flags and formatting."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from remem_common.config import DefaultsHelpFormatter
from remem_common.local_cluster import (
    CLUSTER_FILE,
    DEFAULT_STATE_DIR,
    LocalCluster,
    LocalClusterError,
    read_cluster,
)
from remem_common.placement_requests import BlockingPlacementClient
from remem_common.security import KeyFileError, Security, load_public_key

from remem_placement.config import DEFAULT_ENDPOINT, ENV_PREFIX

ENDPOINT_ENV = f"{ENV_PREFIX}ENDPOINT"
SECRET_KEY_ENV = "REMEM_ADMIN_CURVE_SECRET_KEY"
PLACEMENT_KEY_ENV = "REMEM_ADMIN_PLACEMENT_PUBLIC_KEY"


class ToolParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and the common --placement/--timeout flags.

    Where placement is: --placement (or its env), else the cluster.json that `remem up`
    wrote in --state-dir (./state by default, `make up`'s), else DEFAULT_ENDPOINT. The keys
    come the same way: flags, env, then cluster.json.
    """

    def __init__(self, prog: str, description: str) -> None:
        super().__init__(prog=prog, description=description, formatter_class=DefaultsHelpFormatter)
        self.add_argument(
            "--placement",
            default=os.environ.get(ENDPOINT_ENV),
            help=f"placement's endpoint [env {ENDPOINT_ENV}] (default: the one in "
            f"STATE_DIR/{CLUSTER_FILE}, else {DEFAULT_ENDPOINT})",
        )
        self.add_argument(
            "--state-dir",
            type=Path,
            help=f"the --state-dir of a running `remem up`: its {CLUSTER_FILE} gives "
            "placement's endpoint and, with Curve, the admin keys (default: ./state, where "
            "`make up` runs it, if it has one)",
        )
        self.add_argument(
            "--timeout", type=float, default=5.0, help="seconds to wait for each reply"
        )
        self.add_argument(
            "--curve-secret-key",
            type=Path,
            default=os.environ.get(SECRET_KEY_ENV),
            help=f"an admin keypair (remem keys --role admin) [env {SECRET_KEY_ENV}] "
            f"(default: the one {CLUSTER_FILE} names if its cluster runs Curve; else none, "
            "and the request goes in plaintext, for a placement run with --insecure)",
        )
        self.add_argument(
            "--placement-public-key",
            type=Path,
            default=os.environ.get(PLACEMENT_KEY_ENV),
            help=f"placement's public certificate (NAME.key) [env {PLACEMENT_KEY_ENV}] "
            f"(default: the one {CLUSTER_FILE} names, with Curve)",
        )

    def local_cluster(self, args: argparse.Namespace) -> LocalCluster | None:
        """The cluster.json of --state-dir (an error if it has none), else of ./state if
        there is one."""
        try:
            return read_cluster(args.state_dir or DEFAULT_STATE_DIR)
        except LocalClusterError as exc:
            if args.state_dir is not None:
                self.error(str(exc))
            return None

    def placement_client(self, args: argparse.Namespace) -> BlockingPlacementClient:
        """The client the flags describe (Curve when --curve-secret-key is given, or the
        cluster.json in --state-dir says so)."""
        cluster = None
        if args.state_dir is not None or args.placement is None:
            cluster = self.local_cluster(args)
        if cluster is not None:
            if not cluster.running():
                sys.stderr.write(
                    f"{self.prog}: the remem up (pid {cluster.pid}) that wrote "
                    f"{cluster.state_dir / CLUSTER_FILE} is not running\n"
                )
            if args.placement is None:
                args.placement = cluster.placement
            if cluster.curve:
                args.curve_secret_key = args.curve_secret_key or cluster.admin_secret_key
                args.placement_public_key = (
                    args.placement_public_key or cluster.placement_public_key
                )
        if args.placement is None:
            args.placement = DEFAULT_ENDPOINT
        if args.curve_secret_key is None:
            return BlockingPlacementClient(args.placement, timeout=args.timeout)
        if args.placement_public_key is None:
            self.error("--curve-secret-key needs --placement-public-key")
        try:
            security = Security.curve(Path(args.curve_secret_key))
            server_key = load_public_key(Path(args.placement_public_key))
        except KeyFileError as exc:
            self.error(str(exc))
        return BlockingPlacementClient(
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
