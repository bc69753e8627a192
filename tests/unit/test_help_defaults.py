"""Every `remem SUBCOMMAND --help` shows each flag's default (or that it is required)."""

from __future__ import annotations

import re

import pytest
from remem_cli.main import SUBCOMMANDS, main

OPTION_START = re.compile(r"^  (-\w, )?--[\w-]+")


def option_helps(text: str) -> dict[str, str]:
    """{first long flag: its whole help text} of an argparse help page."""
    helps: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if OPTION_START.match(line):
            current = re.search(r"--[\w-]+", line).group(0)  # type: ignore[union-attr]
            helps[current] = line
        elif current is not None and line.startswith("    "):
            helps[current] += " " + line.strip()
        else:
            current = None
    return helps


def help_of(subcommand: str, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    with pytest.raises(SystemExit) as done:
        main([subcommand, "--help"])
    assert done.value.code == 0
    return option_helps(capsys.readouterr().out)


@pytest.mark.parametrize("subcommand", sorted(SUBCOMMANDS))
def test_every_flag_shows_its_default(
    subcommand: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    helps = help_of(subcommand, capsys)
    assert len(helps) >= 3, helps
    missing = [
        flag
        for flag, text in helps.items()
        if flag != "--help" and "default" not in text and "(required)" not in text
    ]
    assert not missing, f"remem {subcommand} --help: no default shown for {missing}"


def test_defaults_are_the_values_in_effect(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    up = help_of("up", capsys)
    assert "(default: 1.0GiB)" in up["--size"]
    assert "(default: 3)" in up["--pageservers"]
    assert "(default: /dev/shm)" in up["--shm-dir"]
    assert "(default: on)" in up["--mirror"]
    assert "(default: off)" in up["--keep-arenas"]
    assert "(required)" in up["--state-dir"]
    assert "(default: INFO)" in up["--log-level"]
    pageserver = help_of("pageserver", capsys)
    assert "(required)" in pageserver["--capacity"]
    assert "(default: tcp://127.0.0.1:7100)" in pageserver["--listen"]
    assert "(default: 5.0)" in pageserver["--drain-timeout"]
    assert "(default: 0)" in pageserver["--host-reserve"]
    status = help_of("status", capsys)
    assert "(default: 5.0)" in status["--timeout"]
    assert "cluster.json" in status["--placement"] and "cluster.json" in status["--state-dir"]
    keys = help_of("keys", capsys)
    assert "(default: client)" in keys["--role"]
    assert "(required)" in keys["--dir"]
