"""Run deploy/systemd's units the way systemd would, on a machine where systemd is not PID 1.

`UnitFile` parses a unit (sections, repeated keys, continuation lines, %-specifiers) and
gives its Exec lines as argument lists. `ServiceUnit` plays the service manager for one
service unit: the environment from its EnvironmentFile=, ExecStart= under its
OOMScoreAdjust= (choom) and LimitMEMLOCK= (prlimit), in a process group of its own (the
unit's cgroup); Type=notify waits for READY=1 from the main process on a NOTIFY_SOCKET, as
systemd does. `stop` runs ExecStop= lines, then sends the KillSignal= (SIGTERM) to the group
and waits up to TimeoutStopSec=; `restart` is stop then start, which is what
`systemctl restart` does to a unit.

The file-descriptor store (FileDescriptorStoreMax=) as systemd 252 keeps it: the main
process sends descriptors with "FDSTORE=1" (and FDNAME=; SCM_RIGHTS on the notify socket,
sd_pid_notify_with_fds(3)), up to the maximum (more, or any with a store of 0, are closed);
the same open file twice is kept once; "FDSTOREREMOVE=1" with FDNAME= closes the ones of
that name; a descriptor that shows POLLHUP or POLLERR is dropped. The store survives
`restart` and goes with a full `stop`. The next ExecStart= gets the descriptors from fd 3
on, with LISTEN_FDS=, LISTEN_FDNAMES= and LISTEN_PID= its own pid (sd_listen_fds(3)).
RuntimeDirectory= is made under the stand-in's folder and named in $RUNTIME_DIRECTORY;
RuntimeDirectoryPreserve=restart keeps it over a restart.

What this stand-in does not do: User=, capabilities, the sandboxing options, and
StateDirectory= (a test's env file points at its own folders instead); only what the units
here use is supported, and anything else (a `$VAR` in an Exec line, an unknown specifier,
another Type=) is refused rather than run differently.
"""

from __future__ import annotations

import array
import contextlib
import os
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
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
SD_LISTEN_FDS_START = 3
FDNAME_MAX = 255
MAX_FDS_PER_MESSAGE = 253  # SCM_MAX_FD


def fdname_is_valid(name: str) -> bool:
    """systemd's rule: printable ASCII but ':' (the LISTEN_FDNAMES separator), 1-255 long."""
    return 0 < len(name) <= FDNAME_MAX and all(" " <= c <= "~" and c != ":" for c in name)


def same_open_file(a: int, b: int) -> bool:
    """Whether two descriptors are the same open file (systemd's same_fd, by inode)."""
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


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
    # the file-descriptor store: (fd, name) in the order they came
    fd_store: list[tuple[int, str]] = field(default_factory=list)
    # FDNAMEs of the descriptors each start was given, in order
    passed: list[list[str]] = field(default_factory=list)
    _log: IO[bytes] | None = None
    _notify: socket.socket | None = None
    _ready = False

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

    @property
    def fd_store_max(self) -> int:
        return int(self.unit.value("Service", "FileDescriptorStoreMax", "0") or "0")

    @property
    def runtime_directory(self) -> Path | None:
        name = self.unit.value("Service", "RuntimeDirectory")
        return None if name is None else self.runtime / "run" / name

    def environment(self) -> dict[str, str]:
        env = dict(BASE_ENVIRONMENT)
        # The services run the code the test itself imports (a source tree on PYTHONPATH).
        if "PYTHONPATH" in os.environ:
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        # Environment= first: EnvironmentFile= settings override it (systemd.exec(5)).
        for assignment in self.unit.values("Service", "Environment"):
            for word in shlex.split(assignment):
                key, _, value = word.partition("=")
                env[key] = value
        for name in self.unit.values("Service", "EnvironmentFile"):
            optional = name.startswith("-")
            name = name.removeprefix("-")
            if name not in self.files:
                raise UnitError(f"{self.unit.name}: no file given for EnvironmentFile={name}")
            if self.files[name].exists() or not optional:
                env.update(read_environment_file(self.files[name]))
        if self.runtime_directory is not None:
            env["RUNTIME_DIRECTORY"] = str(self.runtime_directory)
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

    def _notify_socket(self) -> socket.socket:
        """The unit's notify socket, bound once and kept: messages sent while the stand-in
        is not waiting (FDSTORE=1 on the way out) queue there, as they do for systemd."""
        if self._notify is None:
            path = self.runtime / f"notify-{self.unit.name}"
            path.unlink(missing_ok=True)
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            notify.bind(str(path))
            notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._notify = notify
        return self._notify

    def start(self) -> None:
        """ExecStart=; returns when systemd would call the unit started (READY=1 for notify).

        Raises:
            UnitError: the process exited or did not get ready within TimeoutStartSec=.
        """
        env = self.environment()
        (command,) = self.unit.commands("ExecStart", env)
        # FileDescriptorStoreMax= implies NotifyAccess=main, hence a notify socket.
        notify = self.type == "notify" or self.fd_store_max > 0
        if notify:
            env["NOTIFY_SOCKET"] = self._notify_socket().getsockname()
        runtime_directory = self.runtime_directory
        if runtime_directory is not None:
            runtime_directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._log is None:
            self._log = self.log_path.open("ab")
        argv = self.argv(command)
        self._drop_hung_up()
        stored = list(self.fd_store)
        self.passed.append([name for _fd, name in stored])
        sources = [fd for fd, _name in stored]
        if stored:
            env["LISTEN_FDS"] = str(len(stored))
            env["LISTEN_FDNAMES"] = ":".join(name for _fd, name in stored)
            # The descriptors go on 3, 4, ... and LISTEN_PID= is the service's own pid:
            # both are done by a small exec helper (same pid: it, prlimit and choom exec).
            argv = [
                sys.executable, "-c", _LISTEN_FDS_HELPER, str(len(sources)),
                *map(str, sources), *argv,
            ]  # fmt: skip
        self._log.write(f"---- start {self.starts + 1}: {argv} fds={self.passed[-1]}\n".encode())
        self._log.flush()
        self._ready = False
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=tuple(sources),
        )
        self.starts += 1
        if self.type == "notify":
            self._wait_ready(self.timeout("TimeoutStartSec"))

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not self._ready:
            if self.proc.poll() is not None:
                self._read_notifications(0)
                if self._ready:
                    return
                raise UnitError(
                    f"{self.unit.name} exited ({self.proc.returncode}) before READY=1; "
                    f"see {self.log_path}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise UnitError(f"{self.unit.name} not ready after {timeout}s")
            self._read_notifications(min(left, 0.5))

    def _read_notifications(self, wait: float) -> None:
        """Handle the notify messages queued, waiting up to `wait` seconds for the first."""
        notify = self._notify
        if notify is None:
            return
        creds_size = socket.CMSG_SPACE(struct.calcsize("iII"))
        rights_size = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)
        while select.select([notify], [], [], wait)[0]:
            wait = 0
            data, ancillary, _flags, _address = notify.recvmsg(
                4096, creds_size + rights_size, socket.MSG_CMSG_CLOEXEC
            )
            sender = None
            fds: list[int] = []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = struct.unpack("iII", payload[: struct.calcsize("iII")])[0]
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                    fds.extend(received)
            # NotifyAccess=main: systemd ignores messages from any other process.
            if self.proc is None or sender != self.proc.pid:
                _close_all(fds)
                continue
            self._notification(data.decode(errors="replace").splitlines(), fds)

    def _notification(self, lines: list[str], fds: list[int]) -> None:
        """One message of the main process (systemd 252's service_notify_message)."""
        fields = dict(line.partition("=")[::2] for line in lines if "=" in line)
        self.status = fields.get("STATUS", self.status)
        if fields.get("READY") == "1":
            self._ready = True
        name = fields.get("FDNAME")
        if "FDSTOREREMOVE=1" in lines and name is not None and fdname_is_valid(name):
            keep = []
            for fd, stored_name in self.fd_store:
                if stored_name == name:
                    os.close(fd)
                else:
                    keep.append((fd, stored_name))
            self.fd_store = keep
        if "FDSTORE=1" in lines:
            if name is None or not fdname_is_valid(name):
                name = "stored"
            for fd in fds:
                if any(same_open_file(fd, kept) for kept, _ in self.fd_store):
                    os.close(fd)
                elif len(self.fd_store) >= self.fd_store_max:
                    self._note(f"fd store full ({self.fd_store_max}): closing {name}")
                    os.close(fd)
                else:
                    self.fd_store.append((fd, name))
            return
        _close_all(fds)  # descriptors sent without FDSTORE=1 are not kept

    def _drop_hung_up(self) -> None:
        """Close stored descriptors that show POLLHUP or POLLERR, as systemd does."""
        keep = []
        for fd, name in self.fd_store:
            poller = select.poll()
            poller.register(fd, select.POLLHUP | select.POLLERR)
            if poller.poll(0):
                self._note(f"fd store: {name} hung up, dropped")
                os.close(fd)
            else:
                keep.append((fd, name))
        self.fd_store = keep

    def _note(self, text: str) -> None:
        if self._log is not None:
            self._log.write(f"---- {text}\n".encode())
            self._log.flush()

    def _release_fd_store(self) -> None:
        _close_all([fd for fd, _name in self.fd_store])
        self.fd_store = []

    def stop(self, *, restarting: bool = False) -> int:
        """ExecStop= lines, then KillSignal= to the unit's processes; returns the exit status.

        The notify socket is served until the main process has exited (FDSTORE=1 comes on
        the way out). A full stop (not `restarting`) empties the file-descriptor store and
        removes the RuntimeDirectory= unless RuntimeDirectoryPreserve=yes.

        Raises:
            UnitError: still running after TimeoutStopSec= (then it is SIGKILLed, as
                systemd does, and the stop counts as failed).
        """
        try:
            return self._stop()
        finally:
            if not restarting:
                self._full_stop()

    def _stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            self._read_notifications(0)
            return self.proc.returncode if self.proc is not None else 0
        env = self.environment()
        timeout = self.timeout("TimeoutStopSec")
        for command in self.unit.commands("ExecStop", env):
            subprocess.run(self.argv(command), env=env, check=True, timeout=timeout)
        kill_signal = signal.Signals[self.unit.value("Service", "KillSignal", "SIGTERM") or ""]
        os.killpg(self.proc.pid, kill_signal)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise UnitError(f"{self.unit.name} still running {timeout}s after SIGTERM")
            if self._notify is not None:
                self._read_notifications(min(left, 0.1))
            else:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=min(left, 0.5))
        self._read_notifications(0)
        return self.proc.returncode

    def _full_stop(self) -> None:
        self._release_fd_store()
        runtime_directory = self.runtime_directory
        preserve = self.unit.value("Service", "RuntimeDirectoryPreserve", "no")
        if runtime_directory is not None and preserve not in ("yes", "true", "1"):
            shutil.rmtree(runtime_directory, ignore_errors=True)

    def restart(self) -> int:
        """What `systemctl restart` does: stop, then start; returns the old process's status.

        The file-descriptor store and a RuntimeDirectoryPreserve=restart directory stay.
        """
        status = self.stop(restarting=True)
        self.start()
        return status

    def kill(self) -> None:
        """Teardown: SIGKILL whatever of the unit still runs; close the store and sockets."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._release_fd_store()
        if self._notify is not None:
            self._read_notifications(0)
            self._release_fd_store()
            path = self._notify.getsockname()
            self._notify.close()
            self._notify = None
            with contextlib.suppress(OSError):
                os.unlink(path)
        if self._log is not None:
            self._log.close()
            self._log = None


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# argv: N, the N inherited descriptors, the command. Puts them on 3, 4, ... in order
# (sd_listen_fds(3)'s layout), first out of the way since a source may sit on a target,
# sets LISTEN_PID= to its pid and execs the command (which keeps that pid).
_LISTEN_FDS_HELPER = """
import fcntl, os, sys
count = int(sys.argv[1])
sources = [int(fd) for fd in sys.argv[2 : 2 + count]]
command = sys.argv[2 + count :]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + count) for fd in sources]
for fd in sources:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index, inheritable=True)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execvp(command[0], command)
"""
