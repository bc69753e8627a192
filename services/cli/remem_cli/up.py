"""`remem up`: the whole system on one machine, in the foreground.

Starts placement, the page servers, the mirror (STATE_DIR/mirror.img) and the client (its
page key in STATE_DIR/page.key, kept across runs so a restarted client still decrypts) as
separate processes, each logging to STATE_DIR/logs/NAME.log, writes STATE_DIR/pids/NAME.pid,
waits until every page server is registered with placement and the client serves NBD, writes
every process's metrics endpoint to STATE_DIR/prometheus-targets.json (a Prometheus file_sd
file, jobs remem-placement, remem-pageserver, remem-mirror, remem-client), then prints one
line with `ready`, the NBD URI and that file (`metrics_targets=`). SIGINT or SIGTERM stops
them all, client first.

The processes talk over ZeroMQ on Unix sockets in STATE_DIR/zmq (`--transport ipc`, the
default), a folder of mode 0700: only this user can connect, so the file system is the access
control and CurveZMQ is off unless `--no-insecure` asks for it. Curve costs ~7 us of CPU per
4 KiB page on each side of every hop, which is most of a page-out's cost here (three hops:
two replicas and the mirror). `--transport tcp` uses loopback TCP instead, which any local
user can reach, so there every socket runs Curve as in a real deployment: `remem up` makes a
keypair per process in STATE_DIR/keys (once; later runs reuse them), every service admits the
public certificates of that folder, and the client's key is of `--tenant`.
`--insecure` turns Curve off either way.

Once placement is up, STATE_DIR/cluster.json says where it listens, over which transport and,
with Curve, which keys an admin uses (STATE_DIR/keys/admin.key_secret and placement.key):
`remem status --state-dir STATE_DIR` and `remem drain` read it (from ./state by default, as
`make up` uses). It is removed when `remem up` stops.

The page servers' arenas live in SHM_DIR/remem-up-HASH (one folder per state dir). They
commit memory as pages arrive, not their whole capacity. A clean stop (SIGINT, SIGTERM)
removes them, so a stopped `remem up` holds no RAM; `--keep-arenas` leaves them for the next
run to reopen with their pages. A crash leaves them too (of `remem up`, of a page server, or
placement or the client dying, which stops the rest): a page server restarted on its arena
finds its pages.

A page server or the mirror that dies is left dead (that is what re-replication and the
client's failover are for, and what the fault tests exercise); if placement or the client
dies, everything is stopped and the exit is 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Literal
from urllib.parse import urlsplit

import zmq
from pydantic import ByteSize, Field, model_validator
from remem_common.config import ServiceConfig, load_config
from remem_common.local_cluster import LocalCluster, remove_cluster, write_cluster
from remem_common.logs import setup_logging
from remem_common.placement_requests import (
    BlockingPlacementClient,
    PlacementRequestError,
    PlacementRequestTimeout,
)
from remem_common.process import ServiceProcess, ServiceStartError, spawn_service
from remem_common.protocol.pages import PAGE_SIZE, SLAB_BYTES
from remem_common.security import Role, Security, load_public_key, write_keypair

log = logging.getLogger("up")
# sun_path holds 108 bytes with its terminating NUL; libzmq refuses longer ipc paths.
IPC_PATH_MAX = 107


class UpConfig(ServiceConfig):
    """Settings of `remem up`; REMEM_UP_* in the environment."""

    state_dir: Path = Field(description="folder for logs, pid files and the NBD socket")
    pageservers: int = Field(default=3, ge=1, le=32, description="page server processes")
    replicas: int = Field(default=2, ge=1, le=8, description="copies of every page (k)")
    size: ByteSize = Field(default=ByteSize(1 << 30), description="size of the NBD device")
    pageserver_capacity: ByteSize | None = Field(
        default=None,
        description="RAM of each page server (default: enough for k copies of the device "
        "with one server lost)",
    )
    nbd_socket: Path | None = Field(
        default=None, description="the NBD server's Unix socket (default STATE_DIR/nbd.sock)"
    )
    nbd_listen: str | None = Field(default=None, description="also serve NBD on HOST:PORT")
    tenant: str = Field(default="local", description="tenant name of the client")
    shm_dir: Path = Field(default=Path("/dev/shm"), description="where arenas live")
    forget: bool = Field(
        default=False, description="wipe the page servers' arenas and the mirror first"
    )
    keep_arenas: bool = Field(
        default=False,
        description="leave the page servers' arenas in SHM_DIR after a clean stop, with their "
        "pages, for the next run (a clean stop removes them; a crash always leaves them)",
    )
    mirror: bool = Field(
        default=True,
        description="run the local mirror (write-behind copy on STATE_DIR/mirror.img that "
        "serves page-ins when no page server answers); --no-mirror to go without",
    )
    mirror_path: Path | None = Field(
        default=None,
        description="file or block device of the mirror (default STATE_DIR/mirror.img)",
    )
    encrypt_pages: bool = Field(
        default=True,
        description="the client encrypts pages with the key STATE_DIR/page.key (kept across "
        "runs, --forget too: the mirror and a restarted client need it); "
        "--no-encrypt-pages only to measure the cost",
    )
    transport: Literal["ipc", "tcp"] = Field(
        default="ipc",
        description="ipc: ZeroMQ over Unix sockets in STATE_DIR/zmq (mode 0700, this user "
        "only); tcp: over loopback TCP, which any local user can reach",
    )
    insecure: bool | None = Field(
        default=None,
        description="no Curve (plaintext ZeroMQ); default: plaintext with --transport ipc, "
        "Curve with keys in STATE_DIR/keys with --transport tcp",
    )
    start_timeout: float = Field(default=180.0, gt=0, description="seconds for each start")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="log level of `remem up` and of every process it starts"
    )

    @model_validator(mode="after")
    def _fits(self) -> UpConfig:
        if self.size % PAGE_SIZE:
            raise ValueError(f"size must be a multiple of {PAGE_SIZE}")
        if self.replicas > self.pageservers:
            raise ValueError("replicas cannot exceed pageservers")
        return self

    @property
    def curve(self) -> bool:
        """Whether the sockets run Curve: asked for, or by default over TCP only."""
        return not self.insecure if self.insecure is not None else self.transport == "tcp"

    def capacity_each(self) -> int:
        """Per page server: k copies of the device over n-1 servers (room to re-replicate
        after one death), rounded up to whole slabs."""
        if self.pageserver_capacity is not None:
            return int(self.pageserver_capacity)
        survivors = max(1, self.pageservers - 1)
        need = -(-int(self.size) * self.replicas // survivors)
        return -(-need // SLAB_BYTES) * SLAB_BYTES


class Cluster:
    """The child processes of one `remem up`, in start order."""

    def __init__(self, config: UpConfig) -> None:
        self.config = config
        self.children: dict[str, ServiceProcess] = {}
        self.pid_dir = config.state_dir / "pids"
        self.log_dir = config.state_dir / "logs"
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        # One arena folder per state dir: two `remem up`s never share arenas.
        digest = hashlib.sha1(str(config.state_dir.resolve()).encode()).hexdigest()[:10]
        self.arena_dir = config.shm_dir / f"remem-up-{digest}"
        self.key_dir = config.state_dir / "keys"
        self.socket_dir = config.state_dir / "zmq"
        self.own_socket_dir = False

    def listen_endpoint(self, name: str) -> str:
        """Where process `name` binds its ZeroMQ socket."""
        if self.config.transport == "tcp":
            return "tcp://127.0.0.1:0"
        return f"ipc://{self.socket_dir / f'{name}.sock'}"

    def make_socket_dir(self) -> None:
        """STATE_DIR/zmq, mode 0700; a private folder under /tmp instead if a socket path
        there would be too long for a Unix socket."""
        # The last page server's name is the longest ("placement" and "mirror" are shorter).
        longest = self.listen_endpoint(f"pageserver-{self.config.pageservers - 1}")
        if len(longest.removeprefix("ipc://")) > IPC_PATH_MAX:
            self.socket_dir = Path(tempfile.mkdtemp(prefix="remem-up-"))  # mode 0700
            self.own_socket_dir = True
            log.info(
                "socket paths under %s would be too long: using %s",
                self.config.state_dir,
                self.socket_dir,
            )
            return
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self.socket_dir.chmod(0o700)  # also when an older run left it more open

    def make_keys(self) -> None:
        """A keypair per process in STATE_DIR/keys, made once and reused by later runs."""
        cfg = self.config
        wanted: list[tuple[str, Role, str | None]] = [
            ("placement", "placement", None),
            ("mirror", "mirror", None),
            ("client", "client", cfg.tenant),
            ("admin", "admin", None),
        ]
        wanted += [(f"pageserver-{i}", "pageserver", None) for i in range(cfg.pageservers)]
        for name, role, tenant in wanted:
            secret = self.key_dir / f"{name}.key_secret"
            if secret.exists() and (self.key_dir / f"{name}.key").exists():
                continue
            write_keypair(self.key_dir, name, role, tenant)

    def security_args(self, name: str, *, admits: bool = True) -> list[str]:
        """The flags giving process `name` its keypair (and the admitted keys)."""
        if not self.config.curve:
            return ["--insecure"]
        # --no-insecure: an inherited REMEM_*_INSECURE must not turn Curve off behind our back.
        args = ["--no-insecure", "--curve-secret-key", str(self.key_dir / f"{name}.key_secret")]
        if admits:
            args += ["--curve-authorized", str(self.key_dir)]
        return args

    def public_key_arg(self, flag: str, name: str) -> list[str]:
        return [] if not self.config.curve else [flag, str(self.key_dir / f"{name}.key")]

    def admin_security(self) -> tuple[Security | None, str | None]:
        """`remem up`'s own key for its status requests to placement."""
        if not self.config.curve:
            return None, None
        security = Security.curve(self.key_dir / "admin.key_secret")
        return security, load_public_key(self.key_dir / "placement.key")

    def start(self, name: str, args: list[str]) -> ServiceProcess:
        log.info("starting %s", name)
        child = spawn_service(
            name, args, timeout=self.config.start_timeout, log_path=self.log_dir / f"{name}.log"
        )
        self.children[name] = child
        (self.pid_dir / f"{name}.pid").write_text(f"{child.pid}\n")
        return child

    def start_all(self) -> str:
        """Start everything; returns the NBD URI."""
        cfg = self.config
        for folder in (cfg.state_dir, self.pid_dir, self.log_dir, self.arena_dir):
            folder.mkdir(parents=True, exist_ok=True)
        if cfg.transport == "ipc":
            self.make_socket_dir()
        if cfg.curve:
            self.make_keys()
        placement = self.start(
            "placement",
            [
                "placement",
                "--listen",
                self.listen_endpoint("placement"),
                "--metrics-port",
                "0",
                "--log-level",
                cfg.log_level,
                *self.security_args("placement"),
            ],
        )
        endpoint = placement.ready["endpoint"]
        self.write_cluster_file(endpoint)
        capacity = self.capacity_each()
        for index in range(cfg.pageservers):
            args = [
                "pageserver",
                "--capacity",
                str(capacity),
                "--listen",
                self.listen_endpoint(f"pageserver-{index}"),
                "--metrics-port",
                "0",
                "--zone",
                f"zone-{index}",
                "--placement",
                endpoint,
                "--server-id",
                f"pageserver-{index}",
                "--shm-path",
                str(self.arena(index)),
                "--log-level",
                cfg.log_level,
                *self.security_args(f"pageserver-{index}"),
                *self.public_key_arg("--placement-public-key", "placement"),
            ]
            if cfg.forget:
                args.append("--forget")
            self.start(f"pageserver-{index}", args)
        self.wait_registered(endpoint, cfg.pageservers)
        socket_path = cfg.nbd_socket or cfg.state_dir / "nbd.sock"
        client_args = [
            "client",
            "--backend",
            "remote",
            "--placement",
            endpoint,
            "--replicas",
            str(cfg.replicas),
            "--size",
            str(int(cfg.size)),
            "--tenant",
            cfg.tenant,
            "--nbd-socket",
            str(socket_path),
            "--metrics-port",
            "0",
            "--log-level",
            cfg.log_level,
            *self.security_args("client", admits=False),
            *self.public_key_arg("--placement-public-key", "placement"),
        ]
        if cfg.encrypt_pages:
            client_args += ["--page-key", str(cfg.state_dir / "page.key")]
        else:
            client_args.append("--no-encrypt-pages")
        if cfg.nbd_listen:
            client_args += ["--nbd-listen", cfg.nbd_listen]
        if cfg.mirror:
            client_args += ["--mirror", self.start_mirror()]
            client_args += self.public_key_arg("--mirror-public-key", "mirror")
        client = self.start("client", client_args)
        return client.ready.get("nbd_uri", f"nbd+unix:///remem?socket={socket_path}")

    def start_mirror(self) -> str:
        """Start the mirror; returns its endpoint."""
        cfg = self.config
        args = [
            "mirror",
            "--listen",
            self.listen_endpoint("mirror"),
            "--path",
            str(cfg.mirror_path or cfg.state_dir / "mirror.img"),
            "--size",
            str(int(cfg.size)),
            "--metrics-port",
            "0",
            "--log-level",
            cfg.log_level,
            *self.security_args("mirror"),
        ]
        if cfg.forget:
            args.append("--forget")
        return self.start("mirror", args).ready["endpoint"]

    def capacity_each(self) -> int:
        return self.config.capacity_each()

    @property
    def scrape_targets_path(self) -> Path:
        return self.config.state_dir / "prometheus-targets.json"

    def write_scrape_targets(self) -> Path:
        """Every child's metrics endpoint as a Prometheus file_sd file, job `remem-SERVICE`
        (the job names charts/remem/files/alerts.yaml expects); returns its path."""
        groups: list[dict[str, object]] = []
        for name, child in self.children.items():
            address = urlsplit(child.ready.get("metrics", "")).netloc
            if address:
                job = "remem-" + name.split("-")[0]
                groups.append({"targets": [address], "labels": {"job": job}})
        # Prometheus watches the file: replace it whole, never let it read a partial one.
        partial = self.scrape_targets_path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(groups, indent=2) + "\n")
        partial.replace(self.scrape_targets_path)
        return self.scrape_targets_path

    def wait_registered(self, endpoint: str, count: int) -> None:
        """Block until placement lists `count` live page servers."""
        deadline = time.monotonic() + self.config.start_timeout
        security, server_key = self.admin_security()
        with BlockingPlacementClient(
            endpoint, context=self.context, timeout=1.0, security=security, server_key=server_key
        ) as placement:
            while time.monotonic() < deadline:
                try:
                    status = placement.status()
                except (PlacementRequestError, PlacementRequestTimeout):
                    continue
                if sum(1 for s in status.servers if s.state == "live") >= count:
                    return
                time.sleep(0.05)  # polling placement's state, not waiting for a process
        raise ServiceStartError(f"not all {count} page servers registered with placement")

    def arena(self, index: int) -> Path:
        return self.arena_dir / f"pageserver-{index}.arena"

    def write_cluster_file(self, placement: str, nbd_uri: str | None = None) -> None:
        """STATE_DIR/cluster.json, for `remem status` and `remem drain` (absolute paths: they
        may run from another folder)."""
        keys = self.key_dir.resolve()
        write_cluster(
            LocalCluster(
                pid=os.getpid(),
                state_dir=self.config.state_dir.resolve(),
                placement=placement,
                transport=self.config.transport,
                curve=self.config.curve,
                admin_secret_key=keys / "admin.key_secret" if self.config.curve else None,
                placement_public_key=keys / "placement.key" if self.config.curve else None,
                nbd_uri=nbd_uri,
                arena_dir=self.arena_dir.absolute(),
            )
        )

    def remove_arenas(self) -> None:
        """Delete the page servers' arena files (their memory goes back to the host once no
        process maps them), also those a run with more --pageservers kept, and the arena
        folder if nothing else is in it."""
        for arena in self.arena_dir.glob("pageserver-*.arena"):
            arena.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.arena_dir.rmdir()
        log.info("removed the arenas in %s (--keep-arenas keeps them)", self.arena_dir)

    def stop_all(self) -> None:
        """Stop children, the client first so NBD users see a clean disconnect."""
        for name in reversed(list(self.children)):
            child = self.children[name]
            try:
                child.stop(timeout=20)
            except ServiceStartError as exc:
                log.error("%s", exc)
            (self.pid_dir / f"{name}.pid").unlink(missing_ok=True)
        self.context.destroy(linger=0)
        self.scrape_targets_path.unlink(missing_ok=True)  # no stale targets for a Prometheus
        remove_cluster(self.config.state_dir)  # nothing left to reach
        if self.own_socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def first_dead(self) -> tuple[str, int] | None:
        """A child that must not die and did: (name, exit status)."""
        for name, child in self.children.items():
            code = child.proc.poll()
            if code is not None and name in ("placement", "client"):
                return name, code
        return None


def main(argv: list[str] | None = None) -> int:
    config = load_config(
        UpConfig,
        argv,
        prog="remem up",
        env_prefix="REMEM_UP_",
        description="Run a whole remem cluster on this machine.",
    )
    setup_logging("up", config.log_level)
    # A plain list, not a threading.Event: a handler runs between two bytecodes of the main
    # thread, which may be inside Event.wait() holding the Event's lock, so Event.set() from
    # the handler can deadlock (seen with a second signal).
    stop: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster = Cluster(config)
    try:
        uri = cluster.start_all()
    except ServiceStartError as exc:
        log.error("could not start the cluster: %s", exc)
        cluster.stop_all()
        if config.forget and not config.keep_arenas:
            cluster.remove_arenas()  # wiped at start: nothing in them to keep
        return 1
    names = ",".join(cluster.children)
    curve = f"on keys={cluster.key_dir}" if config.curve else "off"
    targets = cluster.write_scrape_targets()
    cluster.write_cluster_file(cluster.children["placement"].ready["endpoint"], uri)
    print(
        f"ready nbd_uri={uri} state_dir={config.state_dir} processes={names} curve={curve} "
        f"metrics_targets={targets}",
        flush=True,
    )
    dead = None
    lost: set[str] = set()
    while not stop:
        time.sleep(0.2)  # a supervisor's poll of its children, not a wait for readiness
        if stop:
            break
        dead = cluster.first_dead()
        if dead is not None:
            log.error("%s exited with status %s; stopping the cluster", *dead)
            break
        for name, child in cluster.children.items():
            if name not in lost and child.proc.poll() is not None:
                lost.add(name)
                log.warning(
                    "%s exited with status %s; the others carry on without it",
                    name,
                    child.proc.returncode,
                )
    cluster.stop_all()
    # A clean stop gives the arenas' memory back; after a failure they stay for a restart to
    # find its pages (as after a crash), unless the run began with --forget (nothing kept).
    if not config.keep_arenas and (dead is None or config.forget):
        cluster.remove_arenas()
    return 1 if dead is not None else 0


if __name__ == "__main__":
    sys.exit(main())
