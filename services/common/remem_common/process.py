"""Start remem service processes and wait for readiness: used by `remem up` and the tests.

A service prints one `ready key=value ...` line once it serves. `spawn_service` starts
`python -m remem_cli SUBCOMMAND ...`, copies the child's output to a log file (or keeps the
last lines in memory), and returns once that line appeared, with its fields parsed. It never
sleeps for readiness, and a child that exits first is reported with its output.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

READY_RE = re.compile(r"\bready\b(?P<fields>.*)$")
FIELD_RE = re.compile(r"(\w+)=(\S+)")


class ServiceStartError(Exception):
    """A service exited or timed out before it printed its ready line."""


@dataclass
class ServiceProcess:
    """A running service started by `spawn_service`."""

    name: str
    proc: subprocess.Popen[str]
    ready: dict[str, str]
    output: deque[str] = field(default_factory=lambda: deque(maxlen=2000))
    reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """The last 2000 lines the process printed."""
        return "\n".join(self.output)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal (default SIGKILL); reap the process if the signal ends it."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; SIGKILL and raise if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise ServiceStartError(
                    f"{self.name} ignored SIGTERM for {timeout}s:\n{self.log()}"
                ) from None
        if self.reader is not None:
            self.reader.join(timeout=5)
        return self.proc.returncode


def _pump(
    proc: subprocess.Popen[str],
    sink: deque[str],
    log_file: TextIO | None,
    ready_event: threading.Event,
    ready_holder: list[str],
) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        sink.append(line)
        if log_file is not None:
            log_file.write(line + "\n")
            log_file.flush()
        if not ready_event.is_set() and READY_RE.search(line):
            ready_holder.append(line)
            ready_event.set()
    proc.stdout.close()  # the process ended: release the pipe now, not at garbage collection
    if log_file is not None:
        log_file.close()
    ready_event.set()


def spawn_service(
    name: str,
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    log_path: Path | None = None,
    cwd: str | Path | None = None,
    prefix: list[str] | None = None,
) -> ServiceProcess:
    """Start `python -m remem_cli ARGS...` and return once it printed its ready line.

    Args:
        name: label for messages.
        args: the subcommand and its flags, e.g. ["pageserver", "--capacity", "64MiB"].
        env: extra environment variables.
        timeout: seconds to wait for readiness.
        log_path: append the child's output there (it is also kept in memory).
        prefix: a command the service runs under, e.g. ["ip", "netns", "exec", "ns1"].

    Raises:
        ServiceStartError: the child exited or timed out first (the message has its output).
    """
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    proc = subprocess.Popen(
        [*(prefix or []), sys.executable, "-m", "remem_cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=full_env,
        cwd=cwd,
    )
    output: deque[str] = deque(maxlen=2000)
    ready_event = threading.Event()
    ready_holder: list[str] = []
    log_file = open(log_path, "a") if log_path is not None else None  # noqa: SIM115
    reader = threading.Thread(
        target=_pump, args=(proc, output, log_file, ready_event, ready_holder), daemon=True
    )
    reader.start()
    deadline = time.monotonic() + timeout
    ready_event.wait(timeout)
    service = ServiceProcess(name=name, proc=proc, ready={}, output=output, reader=reader)
    if not ready_holder:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        reader.join(timeout=5)
        why = "exited" if time.monotonic() < deadline else f"was not ready after {timeout}s"
        raise ServiceStartError(f"{name} {why} (rc={proc.returncode}):\n" + "\n".join(output))
    match = READY_RE.search(ready_holder[0])
    assert match is not None
    service.ready = dict(FIELD_RE.findall(match.group("fields")))
    return service
