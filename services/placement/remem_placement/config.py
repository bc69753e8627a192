"""Settings of `remem placement`; every field is a flag and a REMEM_PLACEMENT_* variable."""

from __future__ import annotations

from typing import Literal

from pydantic import ByteSize, Field, field_validator, model_validator
from remem_common.config import zmq_endpoint
from remem_common.protocol.pages import SLAB_BYTES
from remem_common.security import CurveSettings

from remem_placement.records import PolicySettings

PROG = "remem placement"
DESCRIPTION = "Control plane: page server registry, slab placement and repair."
ENV_PREFIX = "REMEM_PLACEMENT_"
DEFAULT_ENDPOINT = "tcp://127.0.0.1:7000"


class PlacementConfig(CurveSettings):
    """What placement needs to know before it binds anything.

    Liveness defaults: page servers heartbeat every 0.25 s; a server silent for 0.75 s is
    suspect (no new slabs) and for 1.5 s dead (its slabs are re-replicated), so a death on a
    LAN is acted on within 2 s while a single lost heartbeat or GC pause is not fatal.
    """

    listen: str = Field(default=DEFAULT_ENDPOINT, description="ROUTER endpoint; port 0 picks")
    publish: str | None = Field(
        default=None, description="optional PUB endpoint for map-change notices; port 0 picks"
    )
    metrics_host: str = Field(default="127.0.0.1", description="address of /metrics")
    metrics_port: int = Field(
        default=9103, ge=0, le=65535, description="0 picks a free port (9100 is node_exporter)"
    )
    heartbeat_interval: float = Field(default=0.25, gt=0, le=60, description="seconds")
    suspect_after: float = Field(default=0.75, gt=0, description="seconds without heartbeat")
    dead_after: float = Field(default=1.5, gt=0, description="seconds without heartbeat")
    utilization_source: Literal["scrape", "prometheus"] = Field(
        default="scrape",
        description="scrape each page server's /metrics, or query a Prometheus server",
    )
    prometheus_url: str | None = Field(
        default=None, description="Prometheus base URL for --utilization-source prometheus"
    )
    scrape_interval: float = Field(default=2.0, gt=0, description="seconds between samples")
    scrape_timeout: float = Field(default=1.0, gt=0, description="seconds per HTTP request")
    restart_grace: float = Field(
        default=3.0,
        ge=0,
        description="seconds after start to rebuild the map before repairing or allocating",
    )
    push_timeout: float = Field(
        default=60.0, gt=0, description="seconds a slab push may take before it is abandoned"
    )
    map_settle: float = Field(
        default=3.0,
        ge=0,
        description="longest a slab push waits for the volume's clients to poll the new map",
    )
    max_pushes: int = Field(
        default=4,
        ge=1,
        le=256,
        description="slab pushes copying at once (more are prepared meanwhile)",
    )
    replicas: int = Field(
        default=2, ge=1, le=8, description="replica target of slabs learned from inventories"
    )
    min_free: ByteSize = Field(
        default=ByteSize(SLAB_BYTES),
        description="a server with less estimated free memory gets no new slab",
    )
    alloc_reserve: ByteSize = Field(
        default=ByteSize(SLAB_BYTES),
        description="bytes counted against a server per slab placed since its last sample",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("listen", "publish")
    @classmethod
    def _zmq_endpoint(cls, value: str | None) -> str | None:
        return zmq_endpoint(value, "tcp://127.0.0.1:7000")

    @field_validator("prometheus_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL like http://127.0.0.1:9090")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PlacementConfig:
        if not self.heartbeat_interval < self.suspect_after < self.dead_after:
            raise ValueError("need heartbeat_interval < suspect_after < dead_after")
        if self.utilization_source == "prometheus" and not self.prometheus_url:
            raise ValueError("--utilization-source prometheus needs --prometheus-url")
        return self

    def policy(self) -> PolicySettings:
        return PolicySettings(
            suspect_after=self.suspect_after,
            dead_after=self.dead_after,
            restart_grace=self.restart_grace,
            alloc_reserve=int(self.alloc_reserve),
            min_free=int(self.min_free),
            default_replicas=self.replicas,
            max_pushes=self.max_pushes,
            stall_after=self.suspect_after / 2,
            map_settle=self.map_settle,
        )
