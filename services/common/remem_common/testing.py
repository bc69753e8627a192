"""Test helpers shared by the suites: start a real service process and wait for readiness.

A service prints one `ready key=value ...` line on stderr once it serves; `start_service`
waits for that line (never a fixed sleep), parses its fields, and keeps draining the
process's output in a thread so a chatty service never blocks on a full pipe.
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

READY_RE = re.compile(r"\bready\b(?P<fields>.*)$")
FIELD_RE = re.compile(r"(\w+)=(\S+)")


@dataclass
class ServiceProcess:
    """A running service started by `start_service`."""

    name: str
    proc: subprocess.Popen[str]
    ready: dict[str, str]
    output: deque[str] = field(default_factory=lambda: deque(maxlen=2000))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """Everything the process printed so far (last 2000 lines)."""
        return "\n".join(self.output)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal (default SIGKILL) and reap the process if it ends."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait; SIGKILL if it does not exit in time. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError(
                    f"{self.name} ignored SIGTERM for {timeout}s:\n{self.log()}"
                ) from None
        return self.proc.returncode


def _drain(
    proc: subprocess.Popen[str],
    sink: deque[str],
    ready_event: threading.Event,
    ready_holder: list[str],
) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        sink.append(line)
        if not ready_event.is_set() and READY_RE.search(line):
            ready_holder.append(line)
            ready_event.set()
    proc.stdout.close()  # the process ended: release the pipe now, not at garbage collection
    ready_event.set()


def start_service(
    name: str,
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    cwd: str | Path | None = None,
) -> ServiceProcess:
    """Start `python -m remem_cli ARGS...` and return once it printed its ready line.

    Args:
        name: label for messages.
        args: the remem subcommand and its flags, e.g. ["pageserver", "--capacity", "64MiB"].
        env: extra environment variables.
        timeout: seconds to wait for readiness.

    Raises:
        AssertionError: the process exited or timed out before it was ready (with its output).
    """
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "remem_cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=cwd,
    )
    output: deque[str] = deque(maxlen=2000)
    ready_event = threading.Event()
    ready_holder: list[str] = []
    thread = threading.Thread(
        target=_drain, args=(proc, output, ready_event, ready_holder), daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout
    ready_event.wait(timeout)
    service = ServiceProcess(name=name, proc=proc, ready={}, output=output)
    if not ready_holder:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        thread.join(timeout=5)
        why = "exited" if time.monotonic() < deadline else f"not ready after {timeout}s"
        raise AssertionError(f"{name} {why} (rc={proc.returncode}):\n" + "\n".join(output))
    match = READY_RE.search(ready_holder[0])
    assert match is not None
    service.ready = dict(FIELD_RE.findall(match.group("fields")))
    return service
