"""Test helpers shared by the suites: start a real service process and wait for readiness.

`start_service` is `remem_common.process.spawn_service` with the failure raised as an
AssertionError, so a service that does not come up fails the test with its output.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

from remem_common.process import ServiceProcess, ServiceStartError, spawn_service

__all__ = ["ServiceProcess", "scrape_metrics", "start_service"]


def start_service(
    name: str,
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    cwd: str | Path | None = None,
    prefix: list[str] | None = None,
) -> ServiceProcess:
    """Start `python -m remem_cli ARGS...` (under `prefix`, if given); returns once it
    printed its ready line."""
    try:
        return spawn_service(name, args, env=env, timeout=timeout, cwd=cwd, prefix=prefix)
    except ServiceStartError as exc:
        raise AssertionError(str(exc)) from None


def scrape_metrics(url: str) -> dict[str, float]:
    """A Prometheus endpoint's samples as {'name{labels}': value}."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
