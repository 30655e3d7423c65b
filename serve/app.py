"""The Ray Serve LLM application: one deployment per model (`serve.server.ModelServer`: Ray's `LLMServer` on the
vLLM engine), the first of which is also the secured OpenAI-compatible ingress.

Built from `ray.serve.llm` (`LLMConfig`, `build_llm_deployment`, `LLMServer`) rather than `build_openai_app`:
that builder puts a separate router deployment (`OpenAiIngress`) in front of the models, which costs a
deployment hop and a pydantic round trip per request, and hard-wires wildcard CORS with credentials.

Two layouts, same deployments:

- `build_targets` (`definemed serve`, `serve.launch`): one Serve application per model, so swapping one model's
  weights rolls only that model. The first model's application owns the route prefix.
- `build_app` / `app_builder` (`serve run serve/config.yaml`, RayService): the same deployments in one
  application, as Serve config files expect.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

from definemed.config import ConfigError, load_config, parse_config
from definemed.engine import engine_device, engine_kwargs, placement_group_config
from serve.config import ModelSpec, ServeConfig
from serve.security import SecuritySettings, env_keys, key_digest, resolve_key_digests

if TYPE_CHECKING:
    from serve.audit import AuditSettings

if TYPE_CHECKING:
    from ray.serve.llm import LLMConfig

# vLLM's own app would add CORS from these (default: any origin); ours runs in the gateway, from cors_origins.
_VLLM_FRONTEND = {"allowed_origins": [], "allow_credentials": False, "disable_fastapi_docs": True}


def serve_env(cfg: ServeConfig) -> dict[str, str]:
    """Serve process settings for the proxy (via the local Ray's environment) and the replicas (runtime_env)."""
    # Serve mirrors every replica log line (one access line per request per hop) to stderr, which Ray then
    # streams to the driver; the log files under the Ray session dir keep everything either way.
    env = {"RAY_SERVE_LOG_TO_STDERR": "1" if cfg.log_to_stderr else "0"}
    if cfg.direct_ingress:
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"  # read when Serve starts: a cluster sets it in its own env
    if cfg.throughput_optimized:
        # Ray's throughput-optimized request path minus direct ingress (opt-in above: per-replica HTTP ports):
        # each hop costs a thread switch less, which matters on oversubscribed CPUs.
        env.update(RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD="0", RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP="0",
                   RAY_SERVE_USE_GRPC_BY_DEFAULT="1")
    return env


def model_env(spec: ModelSpec, cfg: ServeConfig) -> dict[str, str]:
    # VLLM_CONFIGURE_LOGGING=0: vLLM's logging.config.dictConfig at import closes every handler of the process,
    # Serve's replica log file among them (everything logged after it was lost); the replica sends vLLM's and our
    # records to Serve's logger instead (serve.server).
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false",
           "VLLM_CONFIGURE_LOGGING": "0", **serve_env(cfg)}
    if engine_device(spec.engine) == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(spec.engine.kv_cache_space_gib)
    return env


def llm_config(spec: ModelSpec, cfg: ServeConfig) -> "LLMConfig":
    """LLMConfig for one model: our engine kwargs and placement (one GPU per TP rank, or a CPU bundle, as config
    and the cluster decide), autoscaling from config, vLLM request logging (which prints prompts) off unless
    asked, and a rollout that starts a replacement before it stops the replica it replaces."""
    from ray.serve.llm import LLMConfig

    from definemed.models import resolve_model

    kwargs = {**engine_kwargs(spec.engine), **_VLLM_FRONTEND, "enable_log_requests": cfg.log_requests}
    return LLMConfig(
        model_loading_config={"model_id": spec.id, "model_source": resolve_model(spec.model)},
        engine_kwargs=kwargs,
        placement_group_config=placement_group_config(spec.engine),
        deployment_config={"autoscaling_config": spec.autoscaling.to_serve(),
                           "max_ongoing_requests": spec.max_ongoing_requests,
                           "max_surge_percent": 100,  # new weights come up before the old replica drains
                           "graceful_shutdown_timeout_s": cfg.request_timeout_s or 300,
                           "graceful_shutdown_wait_loop_s": 0.5},
        runtime_env={"env_vars": model_env(spec, cfg)},
        log_engine_metrics=cfg.engine_metrics,  # vLLM's engine metrics on Ray's Prometheus port
        callback_config={"callback_class": "serve.ray_private:LocalWeightsCallback"},
    )


def deployment_name(model_id: str) -> str:
    return "model:" + model_id.replace("/", "--")


def model_app_name(cfg: ServeConfig, model_id: str) -> str:
    """Serve application of a model that is not the ingress (`build_targets` layout)."""
    return f"{cfg.app_name}--{model_id.replace('/', '--')}"


def abs_path(path: str) -> str:
    """Absolute, without resolving symlinks: a Kubernetes Secret mount's file is a symlink into a directory the
    kubelet replaces on every update, so the path, not its target, is what replicas must keep reading."""
    return os.path.abspath(os.path.expanduser(path))


def security_settings(cfg: ServeConfig, key_digests: Optional[list[str]] = None) -> SecuritySettings:
    """Keys are resolved where the app is built and only digests travel to the replicas: `key_digests` (default:
    the environment's keys) stay fixed, the key file is re-read by the replicas whenever it changes."""
    if key_digests is None:
        resolve_key_digests(cfg.api_key_env, cfg.api_key_file)  # refuses to build an app no key opens
        key_digests = [key_digest(k) for k in env_keys(cfg.api_key_env)]
    digests = key_digests
    lim = cfg.limits
    return SecuritySettings(key_digests=list(digests), max_body_bytes=lim.max_body_bytes,
                            max_concurrent_per_key=lim.max_concurrent_per_key,
                            requests_per_minute_per_key=lim.requests_per_minute_per_key,
                            key_file=abs_path(cfg.api_key_file) if cfg.api_key_file else None)


def audit_settings(cfg: ServeConfig) -> Optional["AuditSettings"]:
    from serve.audit import AuditSettings

    a = cfg.audit
    return AuditSettings(abs_path(a.dir), a.max_file_bytes, a.fsync) if a.dir else None


def model_deployment(cfg: ServeConfig, spec: ModelSpec, *, security: Optional[SecuritySettings] = None,
                     peers: Optional[dict[str, Any]] = None):
    """One model's deployment, bound. With `security` it is the ingress: it serves HTTP for the endpoint and
    forwards other models' requests to `peers` (handles, or (deployment, app) names)."""
    from ray import serve
    from ray.serve.llm import build_llm_deployment

    from serve.server import ModelServer

    cls = serve.ingress()(ModelServer) if security is not None else ModelServer
    bind: dict[str, Any] = {"app_name": cfg.app_name}
    if security is not None:
        bind.update(security=security, cors_origins=tuple(cfg.cors_origins), peers=peers or {},
                    audit=audit_settings(cfg))
    return build_llm_deployment(llm_config(spec, cfg), deployment_cls=cls, bind_kwargs=bind,
                                override_serve_options={"name": deployment_name(spec.id)})


def build_targets(cfg: ServeConfig, key_digests: Optional[list[str]] = None,
                  only: Optional[set[str]] = None) -> list:
    """`serve.RunTarget`s: the ingress model's application at the route prefix, one application per other
    model without a route. `only` restricts to those model ids (a swap redeploys just them)."""
    from ray import serve

    ingress, *others = cfg.models
    logging_config = {"enable_access_log": cfg.access_log}
    targets = []
    if only is None or ingress.id in only:
        peers = {m.id: (deployment_name(m.id), model_app_name(cfg, m.id)) for m in others}
        app = model_deployment(cfg, ingress, security=security_settings(cfg, key_digests), peers=peers)
        targets.append(serve.RunTarget(app, name=cfg.app_name, route_prefix=cfg.route_prefix,
                                       logging_config=logging_config))
    for m in others:
        if only is None or m.id in only:
            targets.append(serve.RunTarget(model_deployment(cfg, m), name=model_app_name(cfg, m.id),
                                           route_prefix=None, logging_config=logging_config))
    return targets


def build_app(cfg: ServeConfig, key_digests: Optional[list[str]] = None):
    """The whole endpoint as one Serve Application (not yet running): what Serve config files deploy."""
    ingress, *others = cfg.models
    peers = {m.id: model_deployment(cfg, m) for m in others}
    return model_deployment(cfg, ingress, security=security_settings(cfg, key_digests), peers=peers)


def check_tls(cfg: ServeConfig) -> None:
    """Under `serve run` / RayService, Serve's proxy (its `http_options`) terminates TLS, not this config."""
    if not cfg.tls_certfile:
        return
    from serve.ray_private import running_http_options

    http = running_http_options()
    if http is None or not getattr(http, "ssl_certfile", None):
        raise ConfigError("invalid config field 'tls_certfile': under `serve run`/RayService Serve's proxy "
                          "terminates TLS; set http_options.ssl_certfile/ssl_keyfile in the Serve config "
                          "(infra/k8s/rayservice.yaml does) or terminate TLS at the load balancer and drop tls_*")


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
        check_tls(cfg)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return build_app(cfg)
