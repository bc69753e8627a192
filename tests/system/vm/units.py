"""Run deploy/systemd's units the way systemd would, on a machine where systemd is not PID 1.

`UnitFile` parses a unit (sections, repeated keys, continuation lines, %-specifiers) and
gives its Exec lines as argument lists. `ServiceUnit` plays the service manager for one
service unit: the environment from its EnvironmentFile=, ExecStart= under its
OOMScoreAdjust= (choom) and LimitMEMLOCK= (prlimit), in a process group of its own (the
unit's cgroup); Type=notify waits for READY=1 from the main process on a NOTIFY_SOCKET, as
systemd does. `stop` runs ExecStop= lines, then sends the KillSignal= (SIGTERM) to the group
and waits up to TimeoutStopSec=; `restart` is stop then start, which is what
`systemctl restart` does to a unit.

What this stand-in does not do: User=, capabilities, the sandboxing options, and
State/RuntimeDirectory= (a test's env file points at its own folders instead); only what
the units here use is supported, and anything else (a `$VAR` in an Exec line, an unknown
specifier, another Type=) is refused rather than run differently.
"""

from __future__ import annotations

import os
import re
import resource
import shlex
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

# What systemd gives every system service (its default PATH); the rest comes from the unit.
BASE_ENVIRONMENT = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
DEFAULT_TIMEOUT = 90.0  # DefaultTimeoutStartSec= / DefaultTimeoutStopSec=
_TIMESPAN_UNITS = {
    "us": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0,
    "hr": 3600.0,
}  # fmt: skip


CAP_SYS_RESOURCE = 24


def has_capability(bit: int) -> bool:
    """Whether this process's effective capabilities include `bit`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


class UnitError(Exception):
    """A unit uses something this stand-in does not support, or did not start or stop."""


def parse_timespan(text: str) -> float:
    """systemd's time span ("90", "30min", "1min 30s", "infinity") in seconds."""
    text = text.strip()
    if text == "infinity":
        return float("inf")
    total = 0.0
    for number, unit in re.findall(r"([0-9.]+)\s*([a-z]*)", text):
        if unit not in _TIMESPAN_UNITS and unit:
            raise UnitError(f"unknown time unit in {text!r}")
        total += float(number) * _TIMESPAN_UNITS.get(unit or "s", 1.0)
    return total


def read_environment_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (comments, quotes)."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UnitError(f"{path}: not KEY=VALUE: {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def write_environment_file(path: Path, env: dict[str, str]) -> None:
    """Write `env` as an EnvironmentFile= (values must need no quoting)."""
    for key, value in env.items():
        if re.search(r"['\"\\\n]", value) or value != value.strip():
            raise UnitError(f"{key}: value {value!r} would need quoting")
    path.write_text("".join(f"{key}={value}\n" for key, value in env.items()))


@dataclass
class UnitFile:
    """One unit file: its settings by section, in order (keys may repeat)."""

    path: Path
    name: str
    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, instance: str | None = None) -> UnitFile:
        """Parse `path`; a template (NAME@.service) needs the `instance` (%i) to run."""
        name = path.name
        if name.endswith("@.service") != (instance is not None):
            raise UnitError(f"{name}: an instance is needed exactly for a template")
        if instance is not None:
            name = name.replace("@.", f"@{instance}.")
        unit = cls(path=path, name=name)
        section = ""
        pending = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not pending and (not line or line[0] in "#;"):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            line, pending = pending + line, ""
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                unit.sections.setdefault(section, [])
                continue
            key, sep, value = line.partition("=")
            if not sep or not section:
                raise UnitError(f"{path}: cannot parse {raw!r}")
            unit.sections[section].append((key.strip(), value.strip()))
        return unit

    @property
    def instance(self) -> str | None:
        prefix = self.name.rpartition(".")[0]
        return prefix.partition("@")[2] if "@" in prefix else None

    def specifiers(self, text: str) -> str:
        """Resolve %i, %I, %n, %N, %p and %%; refuse any other specifier."""
        prefix = self.name.rpartition(".")[0]
        values = {
            "i": self.instance or "",
            "I": self.instance or "",
            "n": self.name,
            "N": prefix,
            "p": prefix.partition("@")[0],
            "%": "%",
        }

        def one(match: re.Match[str]) -> str:
            if match.group(1) not in values:
                raise UnitError(f"{self.name}: specifier %{match.group(1)} not supported here")
            return values[match.group(1)]

        return re.sub(r"%(.)", one, text)

    def values(self, section: str, key: str) -> list[str]:
        """Every value of `key` in `section`, specifiers resolved ("" resets, as in systemd)."""
        found: list[str] = []
        for name, value in self.sections.get(section, []):
            if name == key:
                found = [] if value == "" else [*found, self.specifiers(value)]
        return found

    def value(self, section: str, key: str, default: str | None = None) -> str | None:
        found = self.values(section, key)
        return found[-1] if found else default

    def commands(self, key: str, env: dict[str, str] | None = None) -> list[list[str]]:
        """The Exec lines of `key` (ExecStart, ExecStop...) as argument lists.

        Variables expand as systemd.service(5) says: `${NAME}` in place, within a word;
        `$NAME` standing alone as a word becomes the value's whitespace-separated words.
        """
        env = env or {}
        commands = []
        for line in self.values("Service", key):
            if line.startswith(("@", "-", ":", "+", "!")):
                raise UnitError(f"{self.name}: {key} prefix {line[0]!r} not supported here")
            argv: list[str] = []
            for word in shlex.split(line):
                alone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
                if alone:
                    argv += env.get(alone.group(1), "").split()
                    continue
                argv.append(
                    re.sub(
                        r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word
                    )
                )
                if "$" in argv[-1]:
                    raise UnitError(f"{self.name}: {key}: cannot expand {word!r} here")
            commands.append(argv)
        return commands


@dataclass
class ServiceUnit:
    """A service unit run by hand the way systemd runs it (see the module docstring).

    Attributes:
        unit: the parsed unit.
        executables: path in the unit -> path here (e.g. /usr/local/bin/remem -> the venv's).
        files: path in the unit -> path here (its EnvironmentFile=).
        runtime: a private folder for the notify socket.
        log_path: where the service's stdout and stderr go (its journal).
    """

    unit: UnitFile
    executables: dict[str, str]
    files: dict[str, Path]
    runtime: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    status: str = ""
    starts: int = 0
    not_applied: set[str] = field(default_factory=set)
    _log: IO[bytes] | None = None

    @property
    def type(self) -> str:
        kind = self.unit.value("Service", "Type", "simple")
        assert kind is not None
        if kind not in ("simple", "exec", "notify"):
            raise UnitError(f"{self.unit.name}: Type={kind} not supported here")
        return kind

    def timeout(self, key: str) -> float:
        value = self.unit.value("Service", key)
        return DEFAULT_TIMEOUT if value is None else parse_timespan(value)

    def environment(self) -> dict[str, str]:
        env = dict(BASE_ENVIRONMENT)
        # The services run the code the test itself imports (a source tree on PYTHONPATH).
        if "PYTHONPATH" in os.environ:
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        for name in self.unit.values("Service", "EnvironmentFile"):
            optional = name.startswith("-")
            name = name.removeprefix("-")
            if name not in self.files:
                raise UnitError(f"{self.unit.name}: no file given for EnvironmentFile={name}")
            if self.files[name].exists() or not optional:
                env.update(read_environment_file(self.files[name]))
        for assignment in self.unit.values("Service", "Environment"):
            for word in shlex.split(assignment):
                key, _, value = word.partition("=")
                env[key] = value
        return env

    def argv(self, command: list[str]) -> list[str]:
        """The command with its executable mapped here, under the unit's process limits."""
        if command[0] not in self.executables:
            raise UnitError(f"{self.unit.name}: no stand-in given for {command[0]}")
        wrapped = [self.executables[command[0]], *command[1:]]
        # systemd, as root with every capability, sets both; a sandbox that took
        # CAP_SYS_RESOURCE away can do neither (raise a hard limit, lower oom_score_adj), so
        # the test reports them as not applied instead of failing on the machine's limits.
        privileged = has_capability(CAP_SYS_RESOURCE)
        memlock = self.unit.value("Service", "LimitMEMLOCK")
        if memlock is not None:
            limit = "unlimited" if memlock == "infinity" else memlock
            if privileged or resource.getrlimit(resource.RLIMIT_MEMLOCK)[1] == (
                resource.RLIM_INFINITY
            ):
                wrapped = ["prlimit", f"--memlock={limit}:{limit}", "--", *wrapped]
            else:
                self.not_applied.add(f"LimitMEMLOCK={memlock} (no CAP_SYS_RESOURCE here)")
        oom = self.unit.value("Service", "OOMScoreAdjust")
        if oom is not None:
            if privileged or int(oom) >= 0:
                wrapped = ["choom", "-n", oom, "--", *wrapped]
            else:
                self.not_applied.add(f"OOMScoreAdjust={oom} (no CAP_SYS_RESOURCE here)")
        return wrapped

    def start(self) -> None:
        """ExecStart=; returns when systemd would call the unit started (READY=1 for notify).

        Raises:
            UnitError: the process exited or did not get ready within TimeoutStartSec=.
        """
        env = self.environment()
        (command,) = self.unit.commands("ExecStart", env)
        notify: socket.socket | None = None
        if self.type == "notify":
            path = self.runtime / f"notify-{self.unit.name}"
            path.unlink(missing_ok=True)
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            notify.bind(str(path))
            notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            env["NOTIFY_SOCKET"] = str(path)
        if self._log is None:
            self._log = self.log_path.open("ab")
        self._log.write(f"---- start {self.starts + 1}: {self.argv(command)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.argv(command),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.starts += 1
        if notify is not None:
            try:
                self._wait_ready(notify, self.timeout("TimeoutStartSec"))
            finally:
                notify.close()

    def _wait_ready(self, notify: socket.socket, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        creds_size = socket.CMSG_SPACE(struct.calcsize("iII"))
        while True:
            if self.proc.poll() is not None:
                raise UnitError(
                    f"{self.unit.name} exited ({self.proc.returncode}) before READY=1; "
                    f"see {self.log_path}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise UnitError(f"{self.unit.name} not ready after {timeout}s")
            notify.settimeout(min(left, 0.5))
            try:
                data, ancillary, _flags, _address = notify.recvmsg(4096, creds_size)
            except TimeoutError:
                continue
            sender = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = struct.unpack("iII", payload[: struct.calcsize("iII")])[0]
            # NotifyAccess=main: systemd ignores messages from any other process.
            if sender != self.proc.pid:
                continue
            fields = dict(
                line.partition("=")[::2] for line in data.decode().splitlines() if "=" in line
            )
            self.status = fields.get("STATUS", self.status)
            if fields.get("READY") == "1":
                return

    def stop(self) -> int:
        """ExecStop= lines, then KillSignal= to the unit's processes; returns the exit status.

        Raises:
            UnitError: still running after TimeoutStopSec= (then it is SIGKILLed, as
                systemd does, and the stop counts as failed).
        """
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc is not None else 0
        env = self.environment()
        timeout = self.timeout("TimeoutStopSec")
        for command in self.unit.commands("ExecStop", env):
            subprocess.run(self.argv(command), env=env, check=True, timeout=timeout)
        kill_signal = signal.Signals[self.unit.value("Service", "KillSignal", "SIGTERM") or ""]
        os.killpg(self.proc.pid, kill_signal)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise UnitError(f"{self.unit.name} still running {timeout}s after SIGTERM") from None

    def restart(self) -> int:
        """What `systemctl restart` does: stop, then start; returns the old process's status."""
        status = self.stop()
        self.start()
        return status

    def kill(self) -> None:
        """Teardown: SIGKILL whatever of the unit still runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        if self._log is not None:
            self._log.close()
            self._log = None
