"""Settings of `remem pageserver`; every field is a flag and a REMEM_PAGESERVER_* variable."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import ByteSize, Field, field_validator, model_validator
from remem_common.config import zmq_endpoint
from remem_common.protocol.pages import PAGE_SIZE
from remem_common.protocol.pageserver_placement import ServerId, Zone
from remem_common.security import CurveSettings

PROG = "remem pageserver"
DESCRIPTION = "Store clients' pages in this host's RAM."
ENV_PREFIX = "REMEM_PAGESERVER_"


class PageServerConfig(CurveSettings):
    """What a page server needs to know before it binds anything."""

    capacity: ByteSize = Field(description="RAM to donate for pages, e.g. 64MiB or 4GiB")
    listen: str = Field(
        default="tcp://127.0.0.1:7100",
        description="ZeroMQ endpoint to bind; port 0 picks a free port",
    )
    advertise: str | None = Field(
        default=None,
        description="endpoint others use to reach this server (default: the bound one, "
        "with a wildcard host replaced by this host's name)",
    )
    metrics_host: str = Field(default="127.0.0.1", description="address of /metrics")
    metrics_port: int = Field(default=9101, ge=0, le=65535, description="0 picks a free port")
    zone: Zone = Field(default="default", description="failure domain (rack, host, AZ)")
    placement: str | None = Field(default=None, description="placement's ZeroMQ endpoint")
    placement_public_key: Path | None = Field(
        default=None, description="placement's public certificate (NAME.key), with Curve"
    )
    server_id: ServerId | None = Field(
        default=None, description="stable id for placement (default: host name and port)"
    )
    shm_path: Path = Field(
        default=Path("/dev/shm/remem-pageserver.arena"),
        description="arena file; in /dev/shm it survives a restart of this process (it is "
        "sparse: RAM is committed as pages arrive and given back as slabs leave)",
    )
    forget: bool = Field(default=False, description="wipe the arena at start")
    host_reserve: ByteSize = Field(
        default=ByteSize(0),
        description="host memory to keep free; below it, ask placement to move slabs off",
    )
    drain_timeout: float = Field(default=5.0, gt=0, description="seconds to finish on SIGTERM")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="log level"
    )

    @field_validator("capacity")
    @classmethod
    def _whole_pages(cls, value: ByteSize) -> ByteSize:
        if value < PAGE_SIZE:
            raise ValueError(f"must be at least one page ({PAGE_SIZE} bytes)")
        return value

    @field_validator("listen", "placement")
    @classmethod
    def _zmq_endpoint(cls, value: str | None) -> str | None:
        return zmq_endpoint(value, "tcp://127.0.0.1:7100")

    @model_validator(mode="after")
    def _placement_key(self) -> PageServerConfig:
        if self.placement:
            self.require_peer_key("--placement-public-key", self.placement_public_key is not None)
        return self

    @property
    def capacity_pages(self) -> int:
        return int(self.capacity) // PAGE_SIZE


def advertised_endpoint(bound: str, advertise: str | None) -> str:
    """Where peers reach us: `advertise` if given, else the bound endpoint made routable."""
    if advertise:
        return advertise
    for wildcard in ("0.0.0.0", "*", "[::]"):
        prefix = f"tcp://{wildcard}:"
        if bound.startswith(prefix):
            return f"tcp://{socket.gethostname()}:{bound[len(prefix) :]}"
    return bound
