"""Config loading: flag > environment > default; a bad value is one line and exit 2."""

from __future__ import annotations

import json

import pytest
from remem_client.config import ClientConfig
from remem_common.config import bind_address, load_config
from remem_pageserver.config import (
    ENV_PREFIX,
    PageServerConfig,
    advertised_endpoint,
)


def load(argv: list[str], env: dict[str, str] | None = None) -> PageServerConfig:
    # Without keys: the Curve settings are tested in test_security.
    environ = {"REMEM_PAGESERVER_INSECURE": "true", **(env or {})}
    return load_config(
        PageServerConfig, argv, prog="remem pageserver", env_prefix=ENV_PREFIX, environ=environ
    )


def test_flag_beats_environment_beats_default() -> None:
    env = {"REMEM_PAGESERVER_CAPACITY": "4GiB", "REMEM_PAGESERVER_ZONE": "rack-a"}
    config = load(["--zone", "rack-b"], env)
    assert config.capacity == 4 << 30
    assert config.capacity_pages == 1 << 20
    assert config.zone == "rack-b"
    assert config.metrics_port == 9101
    assert load(["--capacity", "64MiB", "--forget"]).forget is True
    assert load([], {**env, "REMEM_PAGESERVER_FORGET": "true"}).forget is True


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "--capacity: Field required"),
        (["--capacity", "lots"], "--capacity"),
        (["--capacity", "64MiB", "--metrics-port", "70000"], "--metrics-port"),
        (["--capacity", "64MiB", "--listen", "http://x"], "--listen"),
        (["--capacity", "64MiB", "--zone", "no spaces"], "--zone"),
        (["--capacity", "64MiB", "--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_values_exit_2_with_one_line(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        load(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err


def test_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        load(["--capacity", "1MiB", "--print-config"])
    assert exited.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["capacity"] == 1 << 20 and printed["zone"] == "default"


def test_endpoints() -> None:
    assert bind_address("tcp://127.0.0.1:0") == "tcp://127.0.0.1:*"
    assert bind_address("tcp://127.0.0.1:7100") == "tcp://127.0.0.1:7100"
    assert advertised_endpoint("tcp://127.0.0.1:5", None) == "tcp://127.0.0.1:5"
    assert advertised_endpoint("tcp://0.0.0.0:5", "tcp://ps-0.ps:5") == "tcp://ps-0.ps:5"
    assert advertised_endpoint("tcp://0.0.0.0:5", None).endswith(":5")


def test_remote_client_needs_a_page_key_unless_told_not_to_encrypt(
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["--backend", "remote", "--placement", "tcp://127.0.0.1:1", "--size", "64MiB",
            "--nbd-socket", "/tmp/x.sock", "--insecure"]  # fmt: skip

    def load_client(argv: list[str]) -> ClientConfig:
        return load_config(ClientConfig, argv, prog="remem client", env_prefix="X_", environ={})

    with pytest.raises(SystemExit) as exited:
        load_client(base)
    assert exited.value.code == 2
    assert "--page-key FILE" in capsys.readouterr().err
    keyed = load_client([*base, "--page-key", "/tmp/k"])
    assert keyed.encrypt_pages is True and str(keyed.page_key) == "/tmp/k"
    assert load_client([*base, "--no-encrypt-pages"]).encrypt_pages is False
