"""STATE_DIR/cluster.json: how `remem up` tells `remem status` and `remem drain` to reach it.

`remem up --state-dir DIR` writes DIR/cluster.json once placement is up (and again when the
whole cluster is ready) and removes it when it stops; the admin tools read it when run with
`--state-dir DIR`, or from ./state (where `make up` puts it) by default. It holds placement's
endpoint, whichever transport `remem up` chose (an ipc:// socket in DIR/zmq, or loopback TCP
on a port picked at start) and, with Curve, the admin keypair and placement's certificate in
DIR/keys: paths, never key material.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

CLUSTER_FILE = "cluster.json"
# `make up` runs `remem up --state-dir $(CURDIR)/state`: the admin tools look there by default.
DEFAULT_STATE_DIR = Path("state")


class LocalClusterError(Exception):
    """No usable cluster.json in the state dir."""


class LocalCluster(BaseModel):
    """What an admin tool needs to reach the placement of one `remem up`."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    pid: int
    state_dir: Path
    placement: str
    transport: Literal["ipc", "tcp"]
    curve: bool
    admin_secret_key: Path | None = None
    placement_public_key: Path | None = None
    nbd_uri: str | None = None
    arena_dir: Path | None = None

    def running(self) -> bool:
        """Whether the `remem up` that wrote the file still runs (a crash leaves it behind)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # another user's process: it exists
        return True


def cluster_file(state_dir: Path) -> Path:
    return state_dir / CLUSTER_FILE


def write_cluster(cluster: LocalCluster) -> Path:
    """Write STATE_DIR/cluster.json whole (a reader never sees half of it); returns its path."""
    path = cluster_file(cluster.state_dir)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(cluster.model_dump_json(indent=2) + "\n")
    partial.replace(path)
    return path


def read_cluster(state_dir: Path) -> LocalCluster:
    """The cluster.json of `state_dir`.

    Raises:
        LocalClusterError: there is none, or it cannot be read.
    """
    path = cluster_file(state_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LocalClusterError(
            f"no {path}: no `remem up --state-dir {state_dir}` is running"
        ) from None
    except OSError as exc:
        raise LocalClusterError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return LocalCluster.model_validate_json(text)
    except ValidationError as exc:
        why = exc.errors()[0]["msg"]
        raise LocalClusterError(f"{path} is not a remem cluster file: {why}") from None


def remove_cluster(state_dir: Path) -> None:
    cluster_file(state_dir).unlink(missing_ok=True)
