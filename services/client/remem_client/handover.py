"""Keeping NBD connections open across a restart of the client: systemd's file-descriptor store.

A swap device's NBD connection must never close while pages are out on it: Linux (6.1)
fails every request issued before `nbd-client -persist` has reconnected ("Dead connection,
failed to find a fallback"), and a failed page-in kills its process. So on SIGTERM, with
`--handover` (the unit sets it, next to FileDescriptorStoreMax=), the client does not close
its connections; it hands them to the service manager, which gives them to the next process
(systemd.service(5) FileDescriptorStoreMax=, sd_pid_notify_with_fds(3), sd_listen_fds(3)):

1. Stop listening; for each connection in transmission, stop reading at a request boundary
   (`BaseConnection.begin_handover`): requests not yet read stay in the kernel's socket
   buffer. Bytes of the next request already read are exact state too: a big WRITE being
   received into its own buffer is read to its end (exactly its length) and served; a
   partial request in the receive buffer (at most its 256 KiB) is written to the state file
   and put back in front of the stream by the next process.
2. Finish the requests in flight and send their replies (writes acknowledged as always:
   every live replica plus the mirror rule), until the socket has taken every reply byte.
3. Write the connection's state (export, size, structured replies, transmission flags, the
   partial request) to $RUNTIME_DIRECTORY/handover/nbd-N.json, then send a dup of its socket
   with "FDSTORE=1\\nFDNAME=nbd-N" (SCM_RIGHTS on the notify socket); only then close ours.
   The kernel's peer never sees a FIN: systemd holds the other reference.
4. The next process gets the sockets as LISTEN_FDS/LISTEN_FDNAMES (fd 3 on) once its
   backend is ready, checks each state against its own export, resumes transmission on it
   with no handshake, deletes the state and sends FDSTOREREMOVE=1 for the name, so the store
   only ever holds connections in transit (a TCP peer's FIN would not make systemd drop a
   socket it still held: no POLLHUP until both directions are shut).

FDNAME may not contain ':' (the LISTEN_FDNAMES separator), hence a state file and not the
state in the name. A connection whose state is missing or does not match the new export is
closed (the kernel then reconnects as after a crash), never served with other parameters.
On systemd 252 the store survives `systemctl restart` (a stop with a start job queued) and
is emptied by a full stop; FileDescriptorStorePreserve= (254+) is not needed for that.
"""

from __future__ import annotations

import array
import base64
import contextlib
import fcntl
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from remem_client.nbd.handshake import Negotiated

if TYPE_CHECKING:
    import logging
    from collections.abc import Mapping, MutableMapping

    from remem_client.nbd.connection import ExportContext

FDNAME_PREFIX = "nbd-"
STATE_FORMAT = 1
SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed descriptors start at fd 3
# Seconds a notify message may wait for room in the service manager's queue (a datagram
# socket blocks while it is full): the stop must not hang on it.
NOTIFY_TIMEOUT = 2.0


class HandoverUnavailable(Exception):
    """The service manager cannot keep the connections; the message says why."""


@dataclass(frozen=True)
class ConnectionState:
    """What a connection in transmission needs to resume in another process.

    Attributes:
        export: the export name it was negotiated for.
        size: the export's size as it was told.
        structured: structured replies negotiated.
        transmission_flags: the transmission flags it was sent.
        pending: bytes of a request already read from the socket but not yet complete.
    """

    export: str
    size: int
    structured: bool
    transmission_flags: int
    pending: bytes = b""

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": STATE_FORMAT,
                "export": self.export,
                "size": self.size,
                "structured": self.structured,
                "transmission_flags": self.transmission_flags,
                "pending": base64.b64encode(self.pending).decode(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ConnectionState:
        """Parse a state file (ValueError/KeyError/TypeError if it is not one)."""
        data = json.loads(text)
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"state format {data.get('format')!r}, expected {STATE_FORMAT}")
        return cls(
            export=str(data["export"]),
            size=int(data["size"]),
            structured=bool(data["structured"]),
            transmission_flags=int(data["transmission_flags"]),
            pending=base64.b64decode(data["pending"], validate=True),
        )

    def mismatch(self, ctx: ExportContext) -> str | None:
        """Why this connection cannot be served by `ctx`'s export (None if it can)."""
        export = ctx.export
        if self.export != export.name:
            return f"export {self.export!r}, this process serves {export.name!r}"
        if self.size != export.size:
            return f"size {self.size}, this export has {export.size}"
        offered = export.transmission_flags(self.structured)
        if self.transmission_flags & ~offered:
            return f"transmission flags {self.transmission_flags:#x} not all offered ({offered:#x})"
        return None

    @property
    def negotiated(self) -> Negotiated:
        return Negotiated(
            structured_replies=self.structured, transmission_flags=self.transmission_flags
        )


def state_directory(environ: Mapping[str, str]) -> Path:
    """$RUNTIME_DIRECTORY/handover (the first of several runtime directories).

    Raises:
        HandoverUnavailable: no $RUNTIME_DIRECTORY (the unit has no RuntimeDirectory=).
    """
    runtime = environ.get("RUNTIME_DIRECTORY", "")
    if not runtime:
        raise HandoverUnavailable("no $RUNTIME_DIRECTORY (RuntimeDirectory= in the unit)")
    return Path(runtime.split(":")[0]) / "handover"


def check_available(environ: Mapping[str, str]) -> Path:
    """The state directory, if the service manager can take the connections.

    systemd 254+ says how many descriptors it would keep ($FDSTORE); 252 says nothing, and
    a unit without FileDescriptorStoreMax= gets the descriptors closed (as a SIGTERM
    without handover would).

    Raises:
        HandoverUnavailable: no notify socket, a store of 0, or no runtime directory.
    """
    if not environ.get("NOTIFY_SOCKET"):
        raise HandoverUnavailable("no $NOTIFY_SOCKET (not started by systemd as Type=notify)")
    if environ.get("FDSTORE", "").strip() == "0":
        raise HandoverUnavailable("the unit's file-descriptor store is off ($FDSTORE=0)")
    return state_directory(environ)


def _notify_address(environ: Mapping[str, str]) -> str:
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        raise OSError("no $NOTIFY_SOCKET")
    return "\0" + address[1:] if address.startswith("@") else address


def notify_with_fds(state: str, fds: list[int], environ: Mapping[str, str] = os.environ) -> None:
    """sd_pid_notify_with_fds(3): one datagram with `state`, `fds` attached (SCM_RIGHTS).

    Raises:
        OSError: the message could not be sent (the descriptors are then not stored).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(NOTIFY_TIMEOUT)
        sock.connect(_notify_address(environ))
        ancillary = []
        if fds:
            ancillary.append(
                (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())
            )
        sent = sock.sendmsg([state.encode()], ancillary)
        if sent != len(state.encode()):
            raise OSError(f"notify message truncated ({sent} bytes sent)")


def listen_fds(environ: MutableMapping[str, str]) -> list[tuple[int, str]]:
    """sd_listen_fds_with_names(3) with unset_environment: the descriptors passed to us.

    Only when $LISTEN_PID is this process. Each gets FD_CLOEXEC (no child inherits it), and
    the LISTEN_* variables are removed. Names default to "unknown", as in sd_listen_fds.

    Returns:
        (fd, name) pairs from fd 3 on.
    """
    try:
        pid = int(environ.get("LISTEN_PID", ""))
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    finally:
        names_text = environ.pop("LISTEN_FDNAMES", "")
        for key in ("LISTEN_PID", "LISTEN_FDS"):
            environ.pop(key, None)
    if pid != os.getpid() or count <= 0:
        return []
    names = names_text.split(":") if names_text else []
    passed = []
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        passed.append((fd, names[index] if index < len(names) else "unknown"))
    return passed


def write_state(directory: Path, name: str, state: ConnectionState) -> Path:
    """Write `state` for the descriptor named `name` (atomically: temp file, rename)."""
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / f"{name}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(state.to_json())
    temporary.replace(path)
    return path


def read_state(directory: Path, name: str) -> ConnectionState:
    """The state written for `name` (OSError/ValueError/KeyError/TypeError if unusable)."""
    return ConnectionState.from_json((directory / f"{name}.json").read_text())


def clear_states(directory: Path) -> None:
    """Delete every state file (after adopting, or to drop stale ones)."""
    if directory.is_dir():
        for path in directory.iterdir():
            with contextlib.suppress(OSError):
                path.unlink()


def forget_stored(name: str, log: logging.Logger, environ: Mapping[str, str] = os.environ) -> None:
    """FDSTOREREMOVE=1 for `name`: the store drops its copy (ours stays open)."""
    if not environ.get("NOTIFY_SOCKET"):
        return
    try:
        notify_with_fds(f"FDSTOREREMOVE=1\nFDNAME={name}", [], environ)
    except OSError as exc:
        log.warning("could not remove %s from the file-descriptor store: %s", name, exc)
