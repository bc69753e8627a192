"""Settings of `remem mirror`; every field is a flag and a REMEM_MIRROR_* variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ByteSize, Field, field_validator
from remem_common.config import zmq_endpoint
from remem_common.protocol.pages import PAGE_SIZE
from remem_common.security import CurveSettings

PROG = "remem mirror"
DESCRIPTION = "Keep a local write-behind copy of every page-out."
ENV_PREFIX = "REMEM_MIRROR_"

DirectIO = Literal["auto", "on", "off"]


class MirrorConfig(CurveSettings):
    """What the mirror needs to know before it opens its file or binds anything."""

    path: Path = Field(
        description="the mirror: a regular file (created and sized to --size if missing or "
        "shorter) or a block device at least --size large"
    )
    size: ByteSize = Field(description="device size mirrored, a multiple of 4096, e.g. 4GiB")
    listen: str = Field(
        default="tcp://127.0.0.1:7300",
        description="ZeroMQ endpoint to bind (tcp:// or ipc://); port 0 picks a free port",
    )
    meta_path: Path | None = Field(
        default=None,
        description="persistent bitmap of pages held only by the mirror (default PATH.meta; "
        "give one on a real file system when PATH is a block device)",
    )
    metrics_host: str = Field(default="127.0.0.1", description="address of /metrics")
    metrics_port: int = Field(default=9103, ge=0, le=65535, description="0 picks a free port")
    queue_pages: int = Field(
        default=16384,
        ge=1,
        description="written pages queued before the mirror stops reading requests "
        "(back-pressure; 16384 = 64 MiB)",
    )
    direct_io: DirectIO = Field(
        default="auto",
        description="O_DIRECT: on, off, or auto (fall back to buffered writes with a warning "
        "where the file system refuses it)",
    )
    forget: bool = Field(default=False, description="zero the mirror and its bitmap at start")
    drain_timeout: float = Field(default=5.0, gt=0, description="seconds to finish on SIGTERM")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("size")
    @classmethod
    def _whole_pages(cls, value: ByteSize) -> ByteSize:
        if value < PAGE_SIZE or value % PAGE_SIZE:
            raise ValueError(f"must be a positive multiple of {PAGE_SIZE} bytes")
        return value

    @field_validator("listen")
    @classmethod
    def _zmq_endpoint(cls, value: str) -> str:
        return zmq_endpoint(value, "tcp://127.0.0.1:7300")

    @property
    def page_count(self) -> int:
        return int(self.size) // PAGE_SIZE

    @property
    def bitmap_path(self) -> Path:
        """Where the unreplicated bitmap lives: --meta-path, else PATH.meta."""
        return self.meta_path or self.path.with_name(self.path.name + ".meta")
