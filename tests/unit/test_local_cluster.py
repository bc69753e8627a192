"""STATE_DIR/cluster.json and how `remem status`/`remem drain` use it: flags and their env
first, then the cluster.json of --state-dir (or ./state), then the built-in default."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from remem_common.local_cluster import (
    LocalCluster,
    LocalClusterError,
    read_cluster,
    remove_cluster,
    write_cluster,
)
from remem_common.security import write_keypair
from remem_placement.config import DEFAULT_ENDPOINT
from remem_placement.tools import ENDPOINT_ENV, PLACEMENT_KEY_ENV, SECRET_KEY_ENV, ToolParser


@pytest.fixture(autouse=True)
def no_admin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENDPOINT_ENV, SECRET_KEY_ENV, PLACEMENT_KEY_ENV):
        monkeypatch.delenv(name, raising=False)


def a_cluster(state: Path, *, curve: bool) -> LocalCluster:
    keys = state / "keys"
    state.mkdir(parents=True, exist_ok=True)
    if curve:
        write_keypair(keys, "admin", "admin", None)
        write_keypair(keys, "placement", "placement", None)
    return LocalCluster(
        pid=os.getpid(),
        state_dir=state,
        placement="tcp://127.0.0.1:45678" if curve else f"ipc://{state}/zmq/placement.sock",
        transport="tcp" if curve else "ipc",
        curve=curve,
        admin_secret_key=keys / "admin.key_secret" if curve else None,
        placement_public_key=keys / "placement.key" if curve else None,
    )


def resolve(*argv: str) -> tuple[str, bool]:
    """(placement endpoint, Curve on) as `remem status ARGV` would connect."""
    parser = ToolParser("remem status", "test")
    args = parser.parse_args(list(argv))
    with parser.placement_client(args) as client:
        return client.endpoint, args.curve_secret_key is not None


def test_the_file_round_trips_and_a_missing_one_is_named(tmp_path: Path) -> None:
    cluster = a_cluster(tmp_path, curve=True)
    path = write_cluster(cluster)
    assert path == tmp_path / "cluster.json" and read_cluster(tmp_path) == cluster
    assert cluster.running()
    remove_cluster(tmp_path)
    with pytest.raises(LocalClusterError, match="no `remem up --state-dir"):
        read_cluster(tmp_path)
    path.write_text("{}")
    with pytest.raises(LocalClusterError, match="not a remem cluster file"):
        read_cluster(tmp_path)


@pytest.mark.parametrize("curve", [False, True])
def test_state_dir_gives_endpoint_and_keys(tmp_path: Path, curve: bool) -> None:
    cluster = a_cluster(tmp_path / "elsewhere", curve=curve)
    write_cluster(cluster)
    assert resolve("--state-dir", str(cluster.state_dir)) == (cluster.placement, curve)


def test_dot_state_is_the_default_and_flags_and_env_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve() == (DEFAULT_ENDPOINT, False)  # no ./state/cluster.json: the default
    cluster = a_cluster(tmp_path / "state", curve=True)
    write_cluster(cluster)
    assert resolve() == (cluster.placement, True)
    # An explicit --placement without --state-dir is another cluster: ./state is not read.
    assert resolve("--placement", "tcp://127.0.0.1:1") == ("tcp://127.0.0.1:1", False)
    monkeypatch.setenv(ENDPOINT_ENV, "tcp://127.0.0.1:2")
    assert resolve() == ("tcp://127.0.0.1:2", False)
    # With --state-dir too, the endpoint given wins and the cluster's keys are used.
    assert resolve("--state-dir", "state") == ("tcp://127.0.0.1:2", True)


def test_a_named_state_dir_without_a_cluster_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        resolve("--state-dir", str(tmp_path))
    assert refused.value.code == 2
    assert f"no {tmp_path}/cluster.json" in capsys.readouterr().err


def test_a_stale_file_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gone = 2**22 + 1  # above the largest pid_max Linux allows
    write_cluster(a_cluster(tmp_path, curve=False).model_copy(update={"pid": gone}))
    resolve("--state-dir", str(tmp_path))
    assert "is not running" in capsys.readouterr().err
