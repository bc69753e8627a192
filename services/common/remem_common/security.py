"""Socket security of every remem service and client link: CurveZMQ, keys, roles and tenants.

One place sets up every ZeroMQ socket remem opens (pyzmq's Ironhouse pattern):

- Every process has a keypair (`--curve-secret-key NAME.key_secret`, made by `remem keys`).
- A server socket (page server, placement, mirror) is a Curve server; a ZAP handler
  (`zmq.auth.thread.ThreadAuthenticator`, one per process, answering for every server socket
  of its context) admits only the public keys in `--curve-authorized DIR` whose role the
  service accepts. Anything else - an unknown key, a key of a refused role, a plaintext
  peer - never completes the handshake: it gets no reply at all, and is counted in
  `<service>_auth_refused_total{reason}`.
- A client socket is a Curve client that must know its server's public key: placement's and
  the mirror's come from flags, a page server's from placement (a page server registers its
  public key; clients get it in the slab map, placement and pushing peers in their orders).
- Each certificate's metadata names a `role` (client, pageserver, placement, mirror, admin)
  and, for clients, a `tenant`. ZeroMQ stamps every message with the sender's User-Id (its
  z85 public key, set by the ZAP handler); `Security.identity` turns it into an `Identity`
  and `permits` decides what that identity may ask. A request that is not permitted gets a
  `forbidden` error reply, counted in `<service>_forbidden_requests_total`.

`--insecure` turns all of it off (plaintext, every request trusted, as on a loopback test
bench); without keys and without `--insecure`, a service refuses to start.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import zmq
import zmq.auth
from prometheus_client import CollectorRegistry, Counter
from pydantic import Field, model_validator
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from remem_common.config import ServiceConfig
from remem_common.protocol.envelope import ErrorCode, ProtocolError

log = logging.getLogger("security")

Role = Literal["client", "pageserver", "placement", "mirror", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)
ZAP_DOMAIN = b"remem"
# unknown_key, role: refused by the ZAP handler; handshake: the peer speaks no Curve, or
# not to this server's key (seen by a socket monitor; such a peer retries every ~100 ms, and
# each refused attempt counts).
REFUSED_REASONS = ("unknown_key", "role", "handshake")
# A refused peer retries its handshake, a refused client may repeat its request: each is
# counted, but logged only the first time (per key and reason), up to this many lines.
MAX_LOGGED = 1000
HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL

_META_LINE = re.compile(r'^\s+([A-Za-z0-9_-]+)\s*=\s*"?([^"]*)"?\s*$')


class KeyFileError(Exception):
    """A key file or folder is missing or does not parse; the message is one line."""


@dataclass(frozen=True)
class Identity:
    """Who is behind a Curve public key, from its certificate's metadata."""

    name: str
    role: Role
    tenant: str | None
    public_key: str  # z85


@dataclass(frozen=True)
class Keypair:
    """A process's own Curve keypair (z85 bytes) and what its certificate says."""

    public: bytes
    secret: bytes
    identity: Identity


# -- key files ------------------------------------------------------------------------------


def _certificate(public: bytes, secret: bytes | None, metadata: dict[str, str]) -> str:
    """pyzmq's certificate text (what `zmq.auth.load_certificate` reads), metadata included
    in the public one too: pyzmq's own `create_certificates` leaves it out there, and the
    public certificate is what a service admits."""
    kind = "Secret" if secret is not None else "Public"
    lines = [f"#   ZeroMQ CURVE {kind} Certificate, made by `remem keys`", "", "metadata"]
    lines += [f'    {key} = "{value}"' for key, value in metadata.items()]
    lines += ["curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def write_keypair(directory: Path, name: str, role: Role, tenant: str | None) -> tuple[Path, Path]:
    """Create NAME.key (public) and NAME.key_secret (mode 0600) in pyzmq's certificate format.

    The metadata section carries `name`, `role` and, if given, `tenant`. Returns both paths.
    """
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"name": name, "role": role}
    if tenant is not None:
        metadata["tenant"] = tenant
    public, secret = zmq.curve_keypair()
    public_path = directory / f"{name}.key"
    secret_path = directory / f"{name}.key_secret"
    public_path.write_text(_certificate(public, None, metadata))
    # Created 0600 from the start: the secret is never readable by others, not even briefly.
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(_certificate(public, secret, metadata))
    os.chmod(secret_path, 0o600)
    return public_path, secret_path


def read_identity(path: Path) -> Identity:
    """The identity a certificate (public or secret) describes."""
    try:
        text = path.read_text()
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read certificate {path}: {exc}") from exc
    if public is None:
        raise KeyFileError(f"{path} holds no public key")
    meta: dict[str, str] = {}
    section = ""
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        if not line[0].isspace():
            section = line.strip()
            continue
        match = _META_LINE.match(line)
        if section == "metadata" and match:
            meta[match.group(1)] = match.group(2)
    role = meta.get("role")
    if role not in ROLES:
        raise KeyFileError(f"{path}: metadata role must be one of {', '.join(ROLES)}")
    tenant = meta.get("tenant") or None
    if role == "client" and tenant is None:
        raise KeyFileError(f"{path}: a client certificate needs a tenant in its metadata")
    name = meta.get("name") or path.name.split(".")[0]
    return Identity(name=name, role=role, tenant=tenant, public_key=public.decode())


def load_keypair(path: Path) -> Keypair:
    """This process's keypair from NAME.key_secret."""
    identity = read_identity(path)
    public, secret = zmq.auth.load_certificate(path)
    if secret is None or public is None:
        raise KeyFileError(f"{path} holds no secret key (give NAME.key_secret, not NAME.key)")
    return Keypair(public=public, secret=secret, identity=identity)


def load_public_key(path: Path) -> str:
    """A peer's z85 public key from its certificate (NAME.key)."""
    return read_identity(path).public_key


def load_authorized(directory: Path) -> dict[str, Identity]:
    """Every public certificate (*.key) in `directory`, by z85 public key."""
    if not directory.is_dir():
        raise KeyFileError(f"--curve-authorized {directory} is not a folder")
    found = {}
    for path in sorted(directory.glob("*.key")):
        identity = read_identity(path)
        found[identity.public_key] = identity
    if not found:
        raise KeyFileError(f"--curve-authorized {directory} holds no certificate (*.key)")
    return found


# -- settings -------------------------------------------------------------------------------


class CurveSettings(ServiceConfig):
    """The security flags every service has; a service's config derives from this.

    `needs_authorized`: a service that binds (and so admits peers) must name its admitted keys.
    """

    needs_authorized: ClassVar[bool] = True

    curve_secret_key: Path | None = Field(
        default=None,
        description="this process's Curve keypair, NAME.key_secret from `remem keys`",
    )
    curve_authorized: Path | None = Field(
        default=None,
        description="folder of public certificates (*.key) admitted; their metadata gives "
        "each key's role and tenant",
    )
    insecure: bool = Field(
        default=False,
        description="no Curve: plaintext and unauthenticated, every request's tenant trusted "
        "(only on a trusted loopback; the default is Curve)",
    )

    def uses_zeromq(self) -> bool:
        """Whether this configuration opens any ZeroMQ socket (so needs Curve or --insecure)."""
        return True

    @model_validator(mode="after")
    def _curve_or_insecure(self) -> CurveSettings:
        if self.insecure or not self.uses_zeromq():
            return self
        if self.curve_secret_key is None:
            raise ValueError(
                "Curve is on by default: give --curve-secret-key FILE"
                + (" and --curve-authorized DIR" if self.needs_authorized else "")
                + " (see `remem keys`), or --insecure"
            )
        if self.needs_authorized and self.curve_authorized is None:
            raise ValueError("--curve-secret-key needs --curve-authorized DIR (admitted keys)")
        return self

    @property
    def curve(self) -> bool:
        """Whether sockets run Curve (not --insecure)."""
        return not self.insecure

    def require_peer_key(self, flag: str, present: bool) -> None:
        """Raise (a config error) when Curve is on and a peer's public key flag is missing."""
        if self.curve and not present:
            raise ValueError(f"Curve is on: give {flag} FILE (the peer's NAME.key), or --insecure")


# -- metrics --------------------------------------------------------------------------------


class AuthMetrics:
    """`<service>_auth_refused_total{reason}` and `<service>_forbidden_requests_total`."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        refused = Counter(
            f"{service}_auth_refused",
            "Curve handshakes refused: unknown key, role not admitted, no or wrong Curve",
            ["reason"],
            registry=registry,
        )
        self.refused = {reason: refused.labels(reason) for reason in REFUSED_REASONS}
        self.forbidden = Counter(
            f"{service}_forbidden_requests",
            "Requests answered `forbidden`: another tenant's pages, or not the sender's role",
            registry=registry,
        )
        self._logged: set[tuple[str, str]] = set()

    def log_once(self, key: str, reason: str, line: str) -> None:
        """Log `line` at warning the first time `key` is refused for `reason`."""
        if (key, reason) in self._logged or len(self._logged) >= MAX_LOGGED:
            return
        self._logged.add((key, reason))
        log.warning("%s (logged once per key)", line)

    def forbid(self, identity: Identity | None, what: str, msg_id: int) -> ProtocolError:
        """Count a forbidden request; the error its reply carries (the caller raises it)."""
        self.forbidden.inc()
        detail = forbidden_detail(identity, what)
        key = identity.public_key if identity is not None else ""
        self.log_once(key, what, f"forbidden: {detail}")
        return ProtocolError(ErrorCode.FORBIDDEN, detail, reason="forbidden", msg_id=msg_id)


# -- the process's security -----------------------------------------------------------------


class _KeyRing:
    """The ZAP credentials provider: admits authorized keys of the accepted roles."""

    def __init__(
        self, authorized: dict[str, Identity], roles: frozenset[Role], metrics: AuthMetrics | None
    ) -> None:
        self.authorized = authorized
        self.roles = roles
        self.metrics = metrics

    def callback(self, domain: str, key: bytes) -> bool:
        identity = self.authorized.get(key.decode("ascii", "replace"))
        reason = None
        if identity is None:
            reason = "unknown_key"
        elif identity.role not in self.roles:
            reason = "role"
        if reason is None:
            return True
        if self.metrics is not None:
            self.metrics.refused[reason].inc()
            self.metrics.log_once(
                key.decode(),
                reason,
                f"refused a Curve handshake reason={reason} key={key.decode()}",
            )
        return False


_MONITOR_IDS = itertools.count()


class Security:
    """One process's socket security: Curve with its keypair, or explicitly none.

    Build with `from_settings` (services) or `curve`/`insecure` (tools, tests); call `serve`
    once before binding any server socket, then `server_socket` before each bind and
    `client_socket` before each connect; `close` at the end.
    """

    def __init__(
        self,
        keypair: Keypair | None,
        authorized: dict[str, Identity] | None = None,
    ) -> None:
        self.keypair = keypair
        self.authorized = authorized or {}
        self._authenticator: ThreadAuthenticator | None = None
        self._context: zmq.Context[Any] | None = None
        self._metrics: AuthMetrics | None = None
        self._stop_watching = threading.Event()
        self._watchers: list[threading.Thread] = []

    @classmethod
    def insecure(cls) -> Security:
        return cls(None)

    @classmethod
    def curve(cls, secret_key: Path, authorized: Path | None = None) -> Security:
        """Curve with this keypair (and, for a server, these admitted certificates)."""
        return cls(
            load_keypair(secret_key),
            load_authorized(authorized) if authorized is not None else None,
        )

    @classmethod
    def from_settings(cls, settings: CurveSettings, role: Role) -> Security:
        """The security a service of `role` runs with. Raises KeyFileError when a key file
        or folder is unusable, or the keypair is not of `role` (a swapped key file)."""
        if settings.insecure:
            return cls.insecure()
        assert settings.curve_secret_key is not None  # the settings validator checks it
        security = cls.curve(settings.curve_secret_key, settings.curve_authorized)
        assert security.keypair is not None
        found = security.keypair.identity.role
        if found != role:
            raise KeyFileError(
                f"--curve-secret-key {settings.curve_secret_key} is a {found} key, not a {role} key"
            )
        return security

    @property
    def enabled(self) -> bool:
        return self.keypair is not None

    @property
    def public_key(self) -> str | None:
        """This process's z85 public key (None when insecure)."""
        return None if self.keypair is None else self.keypair.public.decode()

    def serve(
        self,
        context: zmq.Context[Any],
        roles: Iterable[Role],
        metrics: AuthMetrics | None = None,
    ) -> None:
        """Start the ZAP handler of `context`: admit authorized keys whose role is in `roles`."""
        if not self.enabled:
            return
        self._context, self._metrics = context, metrics
        authenticator = ThreadAuthenticator(context, log=logging.getLogger("security.zap"))
        authenticator.start()
        authenticator.configure_curve_callback(
            ZAP_DOMAIN.decode(),
            credentials_provider=_KeyRing(self.authorized, frozenset(roles), metrics),
        )
        self._authenticator = authenticator

    def close(self) -> None:
        """Stop the ZAP handler and the handshake watchers (before the context terminates)."""
        self._stop_watching.set()
        for watcher in self._watchers:
            watcher.join(timeout=5)
        self._watchers.clear()
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None

    def server_socket(self, sock: zmq.Socket[Any]) -> None:
        """Make `sock` a Curve server (call before bind)."""
        if self.keypair is None:
            return
        sock.curve_secretkey = self.keypair.secret
        sock.curve_publickey = self.keypair.public
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN
        if self._context is not None and self._metrics is not None:
            self._watch(sock, self._context, self._metrics)

    _monitor_ids = itertools.count()

    def _watch(
        self, sock: zmq.Socket[Any], context: zmq.Context[Any], metrics: AuthMetrics
    ) -> None:
        """Count the handshakes `sock` fails before ZAP is asked (plaintext peers, a wrong
        server key), in a thread of its own: the service loops block on their sockets."""
        address = f"inproc://remem-handshakes-{next(_MONITOR_IDS)}"
        sock.monitor(address, HANDSHAKE_EVENTS)
        watcher = threading.Thread(
            target=self._count_handshakes,
            args=(context, address, metrics),
            name="curve-handshakes",
            daemon=True,
        )
        watcher.start()
        self._watchers.append(watcher)

    def _count_handshakes(
        self, context: zmq.Context[Any], address: str, metrics: AuthMetrics
    ) -> None:
        events: zmq.Socket[Any] = context.socket(zmq.PAIR)
        events.setsockopt(zmq.LINGER, 0)
        events.connect(address)
        try:
            while not self._stop_watching.is_set():
                if not events.poll(200):
                    continue
                event = recv_monitor_message(events)
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    return
                metrics.refused["handshake"].inc()
                log.debug("a peer failed the Curve handshake: %s", event["value"])
        finally:
            events.close(linger=0)

    def client_socket(self, sock: zmq.Socket[Any], server_key: str | bytes | None) -> None:
        """Make `sock` a Curve client of the server whose public key is `server_key` (call
        before connect). With Curve on and no server key the peer cannot be authenticated:
        raises KeyFileError."""
        if self.keypair is None:
            return
        if not server_key:
            raise KeyFileError("no public key known for the server to connect to")
        sock.curve_secretkey = self.keypair.secret
        sock.curve_publickey = self.keypair.public
        sock.curve_serverkey = server_key.encode() if isinstance(server_key, str) else server_key

    def identity(self, frame: Any) -> Identity | None:
        """Who sent the message `frame` (a zmq.Frame) belongs to; None when insecure."""
        if self.keypair is None:
            return None
        # The ZAP handler set User-Id to the sender's z85 public key (pyzmq's default).
        identity = self.authorized.get(frame.get("User-Id"))
        if identity is None:
            # The ZAP handler admits only keys of this same table: unreachable unless they
            # disagree, and then the sender is nobody.
            raise ProtocolError(
                ErrorCode.FORBIDDEN, "the sender's key is not authorized", reason="forbidden"
            )
        return identity


def permits(identity: Identity | None, roles: Iterable[Role], tenant: str | None = None) -> bool:
    """May `identity` make a request reserved to `roles`, about `tenant`'s data?

    None (insecure) may do anything. A client acts only for the tenant of its key; other
    roles act for every tenant.
    """
    if identity is None:
        return True
    if identity.role not in roles:
        return False
    return identity.role != "client" or tenant is None or identity.tenant == tenant


def forbidden_detail(identity: Identity | None, what: str) -> str:
    """The detail of a `forbidden` reply, naming the key, never the other tenant's data."""
    if identity is None:
        return f"{what} is not permitted"
    who = f"{identity.role} key {identity.name}"
    if identity.tenant:
        who += f" (tenant {identity.tenant})"
    return f"{who} may not {what}"
