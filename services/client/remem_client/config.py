"""Settings of `remem client`: one frozen model, flags and REMEM_CLIENT_* environment.

Loaded by `remem_common.config.load_config` (flag > environment > default), validated
before any socket is bound; a bad value prints one line and exits 2. Backend-specific
settings (the remote backend's placement address, replicas, mirror...) are added as more
fields here; `backend` selects which backend `service.make_backend` builds.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import ByteSize, Field, field_validator, model_validator
from remem_common.protocol.client_pageserver import Tenant, VolumeId
from remem_common.protocol.pages import PAGE_SIZE
from remem_common.security import CurveSettings

from remem_client.nbd import wire

PROG = "remem client"
ENV_PREFIX = "REMEM_CLIENT_"


def parse_host_port(value: str) -> tuple[str, int]:
    """Split "HOST:PORT" or "[V6ADDR]:PORT" into (host, port); raise ValueError if malformed."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"put an IPv6 address in brackets: [{host}]:{port_text}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range 0-65535")
    return host, port


class ClientConfig(CurveSettings):
    """Everything `remem client` needs before it binds its sockets.

    Curve (the default for the remote backend): `--curve-secret-key` is the client's key (role
    client, its tenant), `--placement-public-key` and `--mirror-public-key` its servers' keys;
    page servers' keys come from placement.
    """

    # The client binds no ZeroMQ socket: it admits nobody, so needs no authorized keys.
    needs_authorized: ClassVar[bool] = False

    nbd_socket: Path | None = Field(
        None, description="Unix socket the NBD export listens on (nbd+unix:///NAME?socket=PATH)"
    )
    nbd_listen: str | None = Field(
        None, description="TCP HOST:PORT for NBD (off by default; port 0 picks a free port)"
    )
    export_name: str = Field("remem", description="NBD export name")
    size: ByteSize = Field(description="device size, e.g. 64MiB or 4GiB (required)")
    backend: Literal["memory", "remote"] = Field(
        "memory",
        description="where pages live: remote (page servers chosen by placement) or memory "
        "(this process's RAM: tests and benchmarks)",
    )
    placement: str | None = Field(
        None, description="placement's ZeroMQ endpoint (required with --backend remote)"
    )
    placement_public_key: Path | None = Field(
        None, description="placement's public certificate (NAME.key), with Curve"
    )
    replicas: int = Field(2, ge=1, le=8, description="copies of every page (k)")
    tenant: Tenant = Field("default", description="tenant that owns this device's pages")
    volume: VolumeId = Field(0, description="volume number of this device within the tenant")
    replica_timeout: float = Field(
        1.0, gt=0, description="seconds before a page server's silence fails it over"
    )
    placement_timeout: float = Field(5.0, gt=0, description="seconds to wait for placement")
    map_poll_interval: float = Field(
        1.0, gt=0, description="seconds between slab-map polls (also polled after a failure)"
    )
    mirror: str | None = Field(
        None,
        description="ZeroMQ endpoint of `remem mirror`, the local write-behind copy that "
        "serves page-ins when no page server is reachable (remote backend only)",
    )
    mirror_public_key: Path | None = Field(
        None, description="the mirror's public certificate (NAME.key), with Curve"
    )
    mirror_cache: ByteSize = Field(
        ByteSize(64 << 20),
        description="bound on pages written but not yet confirmed on the mirror's disk; "
        "past it, writes wait (back-pressure)",
    )
    read_ahead: ByteSize = Field(
        ByteSize(8 << 20),
        description="memory for pages fetched ahead of sequential page-ins (0: off); "
        "allocated once at start",
    )
    mirror_timeout: float = Field(
        10.0, gt=0, description="seconds before a silent mirror is considered lost"
    )
    resync_interval: float = Field(
        0.5, gt=0, description="seconds between attempts to resync mirror-only pages"
    )
    page_key: Path | None = Field(
        None,
        description="file of the 32-byte AES-256-GCM key that seals every page before it "
        "leaves this host (created, mode 0600, if missing; its nonce state is kept in "
        "FILE.nonce beside it); required with --backend remote unless --no-encrypt-pages",
    )
    encrypt_pages: bool = Field(
        True,
        description="encrypt and authenticate pages sent to page servers; "
        "--no-encrypt-pages is only for measuring what that costs",
    )
    metrics_host: str = Field("127.0.0.1", description="address of the Prometheus endpoint")
    metrics_port: int = Field(
        9102, ge=0, le=65535, description="Prometheus endpoint port (0 picks a free port)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    lock_memory: bool = Field(
        True,
        description="mlockall, PR_SET_IO_FLUSHER and oom_score_adj -1000, so the swap "
        "server is not itself swapped out or killed (--no-lock-memory to disable)",
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="event loop: auto = uvloop when installed, else asyncio"
    )
    drain_timeout: float = Field(
        10.0, gt=0, description="seconds to finish in-flight requests on SIGTERM"
    )
    handover: bool = Field(
        False,
        description="on SIGTERM, hand the NBD connections to systemd's file-descriptor store "
        "(FileDescriptorStoreMax=) instead of closing them, and resume them on the next "
        "start: a restart under swap goes unseen by the kernel",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: ByteSize) -> ByteSize:
        if not 0 < value <= wire.MAX_EXPORT_SIZE:
            raise ValueError(f"size must be between 1 byte and {wire.MAX_EXPORT_SIZE}")
        return value

    @field_validator("export_name")
    @classmethod
    def _check_export_name(cls, value: str) -> str:
        if len(value.encode()) > wire.MAX_STRING or "\0" in value:
            raise ValueError(f"export name must be at most {wire.MAX_STRING} bytes, no NUL")
        return value

    @field_validator("nbd_listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value

    @model_validator(mode="after")
    def _need_a_listener(self) -> ClientConfig:
        if self.nbd_socket is None and self.nbd_listen is None:
            raise ValueError("set --nbd-socket PATH and/or --nbd-listen HOST:PORT")
        if self.backend == "remote":
            if not self.placement:
                raise ValueError("--backend remote needs --placement ENDPOINT")
            if self.size % PAGE_SIZE:
                raise ValueError(f"--size must be a multiple of {PAGE_SIZE} for remote")
            if self.encrypt_pages and self.page_key is None:
                raise ValueError(
                    "--backend remote needs --page-key FILE (pages are encrypted before they "
                    "leave this host)"
                )
            self.require_peer_key("--placement-public-key", self.placement_public_key is not None)
            if self.mirror:
                self.require_peer_key("--mirror-public-key", self.mirror_public_key is not None)
        elif self.mirror:
            raise ValueError("--mirror needs --backend remote")
        return self

    def uses_zeromq(self) -> bool:
        # The memory backend talks to nobody: Curve applies to the remote backend only.
        return self.backend == "remote"

    @property
    def nbd_listen_address(self) -> tuple[str, int] | None:
        """`nbd_listen` as (host, port), or None when TCP is off."""
        return None if self.nbd_listen is None else parse_host_port(self.nbd_listen)
