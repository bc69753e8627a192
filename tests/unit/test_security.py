"""Curve settings and keys: `remem keys`, certificates' metadata, who may ask what, and the
one-line exit 2 of a service started with neither keys nor --insecure."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from remem_cli.keys import main as keys_main
from remem_client.config import ENV_PREFIX as CLIENT_PREFIX
from remem_client.config import ClientConfig
from remem_client.remote.assembly import open_remote
from remem_common.config import load_config
from remem_common.lifecycle import ConfigError
from remem_common.security import (
    Identity,
    KeyFileError,
    Security,
    load_authorized,
    load_keypair,
    permits,
    read_identity,
)
from remem_pageserver.config import ENV_PREFIX, PageServerConfig


def test_remem_keys_writes_a_public_and_a_private_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert keys_main(["--dir", str(tmp_path), "alice", "--tenant", "a"]) == 0
    assert keys_main(["--dir", str(tmp_path), "ps-0", "--role", "pageserver"]) == 0
    public, secret = tmp_path / "alice.key", tmp_path / "alice.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "secret-key" not in public.read_text()
    alice = read_identity(public)
    assert (alice.name, alice.role, alice.tenant) == ("alice", "client", "a")
    pair = load_keypair(secret)
    assert pair.identity == alice and pair.public.decode() == alice.public_key
    admitted = load_authorized(tmp_path)  # *.key only, never the secrets
    assert {i.name for i in admitted.values()} == {"alice", "ps-0"}
    # An existing pair is not replaced by accident.
    assert keys_main(["--dir", str(tmp_path), "alice", "--tenant", "a"]) == 1
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["bob"],  # a client without a tenant
        ["ps", "--role", "pageserver", "--tenant", "a"],
        ["bob", "--tenant", "no spaces"],
        ["../escape", "--tenant", "a"],
    ],
)
def test_remem_keys_refuses_bad_requests(tmp_path: Path, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        keys_main(["--dir", str(tmp_path), *argv])
    assert exited.value.code == 2
    assert not list(tmp_path.iterdir())


def test_a_public_certificate_is_not_a_keypair(tmp_path: Path) -> None:
    keys_main(["--dir", str(tmp_path), "alice", "--tenant", "a"])
    with pytest.raises(KeyFileError, match="no secret key"):
        load_keypair(tmp_path / "alice.key")
    with pytest.raises(KeyFileError, match="cannot read"):
        load_keypair(tmp_path / "missing.key_secret")
    with pytest.raises(KeyFileError, match="is not a folder"):
        load_authorized(tmp_path / "nothing-here")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KeyFileError, match="holds no certificate"):
        load_authorized(empty)


def load_pageserver(argv: list[str]) -> PageServerConfig:
    return load_config(
        PageServerConfig, argv, prog="remem pageserver", env_prefix=ENV_PREFIX, environ={}
    )


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "Curve is on by default: give --curve-secret-key FILE and --curve-authorized DIR"),
        (["--curve-secret-key", "k"], "needs --curve-authorized"),
        (
            ["--curve-secret-key", "k", "--curve-authorized", "d", "--placement", "tcp://p:1"],
            "give --placement-public-key",
        ),
    ],
)
def test_a_service_without_keys_or_insecure_exits_2_with_one_line(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        load_pageserver(["--capacity", "64MiB", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and err.startswith("remem pageserver: ")


def test_insecure_is_explicit_and_the_client_memory_backend_needs_no_key() -> None:
    assert load_pageserver(["--capacity", "64MiB", "--insecure"]).insecure
    memory = load_config(
        ClientConfig, ["--size", "1MiB", "--nbd-socket", "/tmp/x"], prog="c",
        env_prefix=CLIENT_PREFIX, environ={},
    )  # fmt: skip
    assert memory.backend == "memory" and not memory.insecure
    with pytest.raises(SystemExit):
        load_config(
            ClientConfig,
            ["--size", "1MiB", "--nbd-socket", "/tmp/x", "--backend", "remote",
             "--placement", "tcp://p:1", "--curve-secret-key", "k"],
            prog="c", env_prefix=CLIENT_PREFIX, environ={},
        )  # fmt: skip


def test_who_may_ask_what() -> None:
    alice = Identity(name="alice", role="client", tenant="a", public_key="x" * 40)
    placement = Identity(name="p", role="placement", tenant=None, public_key="y" * 40)
    peer = Identity(name="ps", role="pageserver", tenant=None, public_key="z" * 40)
    assert permits(alice, ("client",), "a")
    assert not permits(alice, ("client",), "b")
    assert not permits(alice, ("placement",))
    assert not permits(placement, ("client",), "a")  # not on the client data path
    assert permits(placement, ("placement",))
    assert permits(peer, ("pageserver",), "b")  # a slab push, of any tenant
    assert permits(None, ("admin",), "anything")  # --insecure trusts every request


def test_insecure_security_leaves_sockets_plaintext() -> None:
    security = Security.insecure()
    assert not security.enabled and security.public_key is None
    assert security.identity(object()) is None


async def test_a_client_key_of_another_tenant_stops_the_client_at_start(tmp_path: Path) -> None:

    keys_main(["--dir", str(tmp_path), "alice", "--tenant", "a"])
    keys_main(["--dir", str(tmp_path), "placement", "--role", "placement"])
    config = load_config(
        ClientConfig,
        ["--size", "1MiB", "--nbd-socket", str(tmp_path / "nbd.sock"), "--backend", "remote",
         "--placement", "tcp://127.0.0.1:1", "--tenant", "b",
         "--curve-secret-key", str(tmp_path / "alice.key_secret"),
         "--placement-public-key", str(tmp_path / "placement.key"),
         "--page-key", str(tmp_path / "page.key")],
        prog="c", env_prefix=CLIENT_PREFIX, environ={},
    )  # fmt: skip
    with pytest.raises(ConfigError, match="key of tenant a, not of --tenant b"):
        await open_remote(config, CollectorRegistry())
