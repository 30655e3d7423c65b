"""The Ray Serve LLM application: one OpenAI-compatible ingress in front of one vLLM deployment per model.

Built from `ray.serve.llm` (LLMConfig, build_llm_deployment, OpenAiIngress, make_fastapi_ingress) rather than
`build_openai_app`, because that builder hard-wires its FastAPI app with wildcard CORS and credentials. Here the
FastAPI app is ours: Ray's exception handling, metrics and request-id middleware, explicit CORS origins only,
no OpenAPI/docs routes, and `serve.security.SecurityMiddleware` outermost so nothing runs before the key check.

`app_builder` is the import path for Serve config files (`serve run serve/config.yaml`, `serve deploy`).
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Optional

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from ray import serve
from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
from ray.llm._internal.serve.core.ingress.middleware import SetRequestIdMiddleware, add_exception_handling_middleware
from ray.llm._internal.serve.observability.metrics.fast_api_metrics import (
    add_http_metrics_middleware,
    metrics_lifespan,
)
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from definemed.config import ConfigError, load_config, parse_config
from definemed.engine import engine_device, engine_kwargs, placement_group_config
from serve.config import ModelSpec, ServeConfig
from serve.security import SecurityMiddleware, SecuritySettings, error_body, key_digest, resolve_key_digests

log = logging.getLogger("definemed.serve")

# The OpenAI surface we expose. Embeddings, audio, score and tokenize stay off: smaller attack surface.
ENDPOINTS = {
    "models": lambda app: app.get("/v1/models"),
    "model_data": lambda app: app.get("/v1/models/{model:path}"),
    "completions": lambda app: app.post("/v1/completions"),
    "chat": lambda app: app.post("/v1/chat/completions"),
    "health": lambda app: app.get("/health"),
    "ready": lambda app: app.get("/ready"),
}


class DefinemedIngress(OpenAiIngress):
    """Ray's OpenAI router plus liveness (`/health`) and readiness (`/ready`: every model answers its health
    check) endpoints. Both sit behind the API key like every other route."""

    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def ready(self) -> JSONResponse:
        async def probe(model_id: str, handle) -> tuple[str, Optional[str]]:
            try:
                await asyncio.wait_for(handle.check_health.remote(), timeout=10)
                return model_id, None
            except Exception as e:  # noqa: BLE001 - any failure means "not ready"
                return model_id, type(e).__name__

        results = await asyncio.gather(*(probe(m, h) for m, h in self._default_serve_handles.items()))
        failed = {m: err for m, err in results if err}
        body = {"status": "ready" if not failed else "not_ready", "models": sorted(self._default_serve_handles)}
        if failed:
            body["failed"] = failed
            return JSONResponse(body, status_code=503)
        return JSONResponse(body)


_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 429: "rate_limit_error"}


async def _http_exception(request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI answers {"detail": ...}; OpenAI clients expect {"error": {...}} (e.g. unknown model, unknown route).
    status = exc.status_code
    code = "model_not_found" if status == 404 and "model" in str(exc.detail) else f"http_{status}"
    return JSONResponse(error_body(str(exc.detail), _ERROR_TYPES.get(status, "api_error"), code),
                        status_code=status, headers=getattr(exc, "headers", None))


def make_fastapi_app(cfg: ServeConfig, settings: SecuritySettings) -> FastAPI:
    # Middleware runs last-added-first: security, request id, metrics, CORS, exception handling, route.
    app = FastAPI(lifespan=metrics_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    add_exception_handling_middleware(app)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    add_http_metrics_middleware(app)
    app.add_middleware(SetRequestIdMiddleware)
    app.add_middleware(SecurityMiddleware, settings=settings)
    return app


def serve_env(cfg: ServeConfig) -> dict[str, str]:
    """Serve process settings for the proxy (via the local Ray's environment) and the replicas (runtime_env)."""
    # Serve mirrors every replica log line (one access line per request per hop) to stderr, which Ray then
    # streams to the driver; the log files under the Ray session dir keep everything either way.
    env = {"RAY_SERVE_LOG_TO_STDERR": "1" if cfg.log_to_stderr else "0"}
    if cfg.throughput_optimized:
        # Ray's throughput-optimized request path minus direct ingress (which opens per-replica HTTP ports):
        # each hop costs a thread switch less, which matters on oversubscribed CPUs.
        env.update(RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD="0", RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP="0",
                   RAY_SERVE_USE_GRPC_BY_DEFAULT="1")
    return env


def model_env(spec: ModelSpec, cfg: ServeConfig) -> dict[str, str]:
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false",
           **serve_env(cfg)}
    if engine_device(spec.engine) == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(spec.engine.kv_cache_space_gib)
    return env


def llm_config(spec: ModelSpec, cfg: ServeConfig) -> LLMConfig:
    """LLMConfig for one model: our engine kwargs and placement (one GPU per TP rank, or a CPU bundle, as config
    and the cluster decide), autoscaling from config, and vLLM request logging (which prints prompts) off unless asked."""
    from definemed.models import resolve_model

    kwargs = engine_kwargs(spec.engine)
    kwargs["enable_log_requests"] = cfg.log_requests
    return LLMConfig(
        model_loading_config={"model_id": spec.id, "model_source": resolve_model(spec.model)},
        engine_kwargs=kwargs,
        placement_group_config=placement_group_config(spec.engine),
        deployment_config={"autoscaling_config": spec.autoscaling.to_serve(),
                           "max_ongoing_requests": spec.max_ongoing_requests},
        runtime_env={"env_vars": model_env(spec, cfg)},
        log_engine_metrics=False,
    )


def build_app(cfg: ServeConfig, key_digests: Optional[list[str]] = None):
    """The Serve Application (not yet running). Keys are resolved here, where the app is built, and only their
    digests travel to the replicas."""
    digests = key_digests if key_digests is not None else resolve_key_digests(cfg.api_key_env, cfg.api_key_file)
    settings = SecuritySettings(key_digests=list(digests), max_body_bytes=cfg.limits.max_body_bytes,
                                max_concurrent_per_key=cfg.limits.max_concurrent_per_key,
                                requests_per_minute_per_key=cfg.limits.requests_per_minute_per_key)
    configs = [llm_config(m, cfg) for m in cfg.models]
    deployments = {c.model_id: build_llm_deployment(c) for c in configs}
    cards = {c.model_id: to_model_metadata(c.model_id, c) for c in configs}
    ingress_cls = make_fastapi_ingress(DefinemedIngress, endpoint_map=ENDPOINTS,
                                       app=make_fastapi_app(cfg, settings))
    ing = cfg.ingress
    return serve.deployment(
        ingress_cls, name="OpenAiIngress", max_ongoing_requests=ing.max_ongoing_requests,
        autoscaling_config=ing.autoscaling.to_serve(),
        ray_actor_options={"num_cpus": ing.num_cpus, "runtime_env": {"env_vars": serve_env(cfg)}},
    ).bind(llm_deployments=deployments, model_cards=cards)


def app_builder(args: dict[str, Any]):
    """Import path for Serve config files. `args` is either `{config: path/to/serve.yaml}` (optionally with
    `overrides:`) or the ServeConfig fields inline."""
    args = dict(args or {})
    try:
        if "config" in args:
            cfg = load_config(ServeConfig, args.pop("config"), overrides=args.pop("overrides", None))
            if args:
                raise ConfigError(f"invalid config field 'args.{sorted(args)[0]}': unknown key")
        else:
            cfg = parse_config(ServeConfig, args, source="serve app args")
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return build_app(cfg)
