"""Start, update, use and stop the serving app from Python (`launch`, `swap_model`) or as a long-running service
(`serve_forever`).

Other stages (evaluation hosting candidate and judge models) use `launch`:

    from serve import ServeConfig, launch
    cfg = ServeConfig(port=0, models=[{"id": "merged", "model": "outputs/demo/merge/model"},
                                      {"id": "judge", "model": "tiny://qwen2@1"}])
    with launch(cfg) as ep:                      # blocks until every model answers
        client = ep.client()                     # openai.OpenAI(base_url=ep.base_url, api_key=ep.api_key)
        client.chat.completions.create(model="merged", messages=[...])
    # leaving the block deletes the app (and stops Serve if nothing else runs on it)

`launch` on an app that already runs (same `app_name`) updates it in place instead: only the models whose
settings changed roll, each to new replicas that are healthy before the old ones drain (`swap_model` is the
same for one model's weights).
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import threading
import time
from typing import Optional

from serve.config import ServeConfig
from serve.endpoint import Endpoint

log = logging.getLogger("definemed.serve")


def shutdown_app(cfg: ServeConfig) -> None:
    """Delete every Serve application of this endpoint and its control plane; stop Serve when nothing remains."""
    from ray import serve

    from serve.app import model_app_name
    from serve.audit import kill_writer
    from serve.control import kill_control

    for name in [cfg.app_name] + [model_app_name(cfg, m.id) for m in cfg.models[1:]]:
        with contextlib.suppress(Exception):
            serve.delete(name)  # blocks until the replicas are gone: their last audit lines are written
    with contextlib.suppress(Exception):
        kill_control(cfg.app_name)
    with contextlib.suppress(Exception):
        kill_writer(cfg.app_name)
    with contextlib.suppress(Exception):
        if not serve.status().applications:
            serve.shutdown()


def _stop_ray() -> None:
    """Stop the Ray this process started, and Serve with it (else Serve keeps a client to the dead cluster)."""
    import ray
    from ray import serve

    with contextlib.suppress(Exception):
        serve.shutdown()
    ray.shutdown()


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "localhost") else ("::1" if host == "::" else host)


# ---------------------------------------------------------------- the steps of launch
def _keys(cfg: ServeConfig, api_key: Optional[str], ephemeral_key: bool) -> tuple[Optional[str], list[str]]:
    """(a key this process can use to talk to the app, or None; the digests fixed for the app's life). Checked
    before Ray starts: fail fast. The fixed digests are the environment's keys and `api_key` (or a one-off key);
    the key file's keys are not among them: replicas follow that file as it changes."""
    from serve.keys import read_key_file
    from serve.security import NoApiKeyError, env_keys, key_digest, load_api_keys

    fixed = ([api_key] if api_key else []) + env_keys(cfg.api_key_env)
    in_file = load_api_keys(None, cfg.api_key_file) if cfg.api_key_file else []  # checks the file, or refuses
    file_active = read_key_file(cfg.api_key_file).active if cfg.api_key_file else []
    if not fixed and not file_active:
        if not ephemeral_key:
            raise NoApiKeyError(f"invalid config field 'api_key_env': no API key in ${cfg.api_key_env}"
                                + (f" or {cfg.api_key_file}" if cfg.api_key_file else "")
                                + "; the endpoint never starts without one")
        fixed = [secrets.token_urlsafe(32)]
    usable = list(dict.fromkeys(fixed + in_file))
    return (usable[0] if usable else None), [key_digest(k) for k in dict.fromkeys(fixed)]


def _start_ray(cfg: ServeConfig, ray_address: Optional[str]) -> bool:
    """Join or start Ray; True if this call started it (and so must stop it)."""
    import ray

    from definemed.ray_utils import init_ray
    from serve.app import serve_env

    owns_ray = not ray.is_initialized()
    if owns_ray:  # Serve's proxy inherits the local Ray's environment; replicas get it via runtime_env
        for k, v in serve_env(cfg).items():
            os.environ.setdefault(k, v)
    init_ray(cfg.ray, address=ray_address)
    return owns_ray


def _start_http(cfg: ServeConfig) -> str:
    """Start Serve's proxy (or find the running one: its host/port are cluster-wide); the endpoint's root URL."""
    from ray import serve

    from serve.ray_private import running_http_options

    running = running_http_options()
    if running is not None:
        host, port = running.host, running.port
        if (host, port) != (cfg.host, cfg.port) and cfg.port != 0:
            log.warning("Serve already runs on %s:%s on this cluster; ignoring host/port %s:%s from config",
                        host, port, cfg.host, cfg.port)
        scheme = "https" if getattr(running, "ssl_certfile", None) else "http"
    else:
        host, port = cfg.host, cfg.port or free_port(cfg.host)
        http = {"host": host, "port": port}
        if cfg.request_timeout_s:
            http["request_timeout_s"] = cfg.request_timeout_s
        if cfg.tls_certfile:
            http.update(ssl_certfile=cfg.tls_certfile, ssl_keyfile=cfg.tls_keyfile)
        scheme = "https" if cfg.tls_certfile else "http"
        serve.start(http_options=http, logging_config={"enable_access_log": cfg.access_log})
    return f"{scheme}://{_client_host(host)}:{port}{cfg.route_prefix.rstrip('/')}"


def _deployed(cfg: ServeConfig) -> Optional[dict]:
    """What `launch` last deployed under this app name ({"config", "key_digests"}), or None if nothing runs."""
    import ray
    from ray import serve

    from serve.control import lookup_control

    if cfg.app_name not in serve.status().applications:
        return None
    control = lookup_control(cfg.app_name)
    return ray.get(control.deployed.remote()) if control is not None else {}


def _stored_config(deployed: dict) -> ServeConfig:
    """A deployed config as stored in the control plane (its model paths live on the cluster, maybe not here)."""
    data = deployed["config"]
    return ServeConfig.model_validate(data, context={"deferred_paths": [m["model"] for m in data["models"]]})


def _deploy(cfg: ServeConfig, digests: list[str], previous: Optional[dict]) -> list[str]:
    """Deploy the apps whose settings differ from `previous` (all if None); returns the model ids that roll."""
    import ray
    from ray import serve

    from serve.app import build_targets, model_app_name
    from serve.control import Limits, get_control

    old = _stored_config(previous) if previous and previous.get("config") else None
    old_specs = {m.id: m for m in old.models} if old else {}
    changed = {m.id for m in cfg.models if old_specs.get(m.id) != m}
    if old is None or old.model_copy(update={"models": []}) != cfg.model_copy(update={"models": []}) \
            or previous.get("key_digests") != digests or [m.id for m in old.models] != cfg.model_ids():
        changed.add(cfg.models[0].id)  # the ingress holds the keys, limits, routes and the model list
    control = get_control(cfg.app_name, Limits(cfg.limits.max_concurrent_per_key,
                                               cfg.limits.requests_per_minute_per_key))
    ray.get(control.set_deployed.remote({"config": cfg.model_dump(mode="json"), "key_digests": digests}))
    _start_audit(cfg)
    targets = build_targets(cfg, digests, only=changed)
    if targets:  # one call: the ingress finds its peers by name whenever they come up
        serve.run_many(targets, wait_for_applications_running=False)
    for m in set(old_specs) - set(cfg.model_ids()):
        if old is not None and m != old.models[0].id:
            serve.delete(model_app_name(old, m))
    return sorted(changed)


def _start_audit(cfg: ServeConfig) -> None:
    """The app's audit writer, up before any replica (so a directory it cannot write fails the launch here)."""
    import ray

    from definemed.config import ConfigError
    from serve.app import audit_settings
    from serve.audit import get_writer

    settings = audit_settings(cfg)
    if settings is None:
        log.info("app '%s': no audit trail (audit.dir is not set)", cfg.app_name)
        return
    try:
        head = ray.get(get_writer(cfg.app_name, settings).head.remote(), timeout=120)
    except Exception as e:  # noqa: BLE001 - the actor's creation error, e.g. a read-only or foreign directory
        cause = getattr(e, "cause", None) or e
        raise ConfigError(f"invalid config field 'audit.dir': the audit writer cannot use {settings.dir}: "
                          f"{type(cause).__name__}: {str(cause).splitlines()[-1] if str(cause) else ''}") from None
    log.info("app '%s': audit trail in %s (%s, seq %d)", cfg.app_name, settings.dir, head["file"], head["seq"])


def _ready_by_handles(cfg: ServeConfig) -> Optional[str]:
    """Without a key to call /ready with (a key file of digests only): every model's health check, by handle.
    None if all answer, else what failed."""
    from ray import serve

    from serve.app import deployment_name, model_app_name

    for i, m in enumerate(cfg.models):
        app = cfg.app_name if i == 0 else model_app_name(cfg, m.id)
        try:
            serve.get_deployment_handle(deployment_name(m.id), app_name=app).check_health.remote().result(
                timeout_s=15)
        except Exception as e:  # noqa: BLE001 - any failure means "not ready"
            return f"{m.id}: {type(e).__name__}"
    return None


def _wait_ready(cfg: ServeConfig, url: str, api_key: Optional[str], timeout: float) -> None:
    import httpx
    from ray import serve

    from serve.app import model_app_name

    ours = {cfg.app_name, *(model_app_name(cfg, m.id) for m in cfg.models[1:])}
    deadline = time.monotonic() + timeout
    last = "not started"
    while time.monotonic() < deadline:
        apps = serve.status().applications
        failed = [f"{n}: {a.message}" for n, a in apps.items()
                  if n in ours and str(a.status).endswith("DEPLOY_FAILED")]
        if failed:
            raise RuntimeError(f"serve app '{cfg.app_name}' failed to deploy: {failed[0]}")
        app = apps.get(cfg.app_name)
        if app is not None and str(app.status).endswith("RUNNING") and api_key is None:
            failed_model = _ready_by_handles(cfg)
            if failed_model is None:
                return
            last = failed_model
        elif app is not None and str(app.status).endswith("RUNNING"):
            try:
                r = httpx.get(f"{url}/ready", headers={"Authorization": f"Bearer {api_key}"}, timeout=15,
                              verify=False)
                if r.status_code == 200:
                    return
                last = f"/ready answered {r.status_code}"
            except httpx.HTTPError as e:
                last = type(e).__name__
        else:
            last = f"app status {getattr(app, 'status', None)}"
        time.sleep(1.0)
    raise TimeoutError(f"serve app '{cfg.app_name}' not ready after {timeout:.0f}s ({last})")


def _direct_root(cfg: ServeConfig, proxy_root: str) -> str:
    """With direct ingress and one ingress replica, the replica's own address (else the proxy's)."""
    from urllib.parse import urlsplit

    from serve.ray_private import direct_ingress_urls

    proxy = urlsplit(proxy_root)
    urls = direct_ingress_urls(cfg.app_name, proxy.scheme)
    if len(urls) != 1:
        log.info("direct ingress: %d ingress replicas answer on their own ports; handing out the proxy's address "
                 "(put a load balancer such as Serve's HAProxy mode in front of %s)", len(urls), urls)
        return proxy_root
    direct = urlsplit(urls[0])
    host = proxy.hostname if proxy.hostname in ("127.0.0.1", "::1") else direct.hostname  # bound like the proxy
    log.info("direct ingress at %s:%s (proxy: %s)", host, direct.port, proxy_root)
    return f"{proxy.scheme}://{host}:{direct.port}{cfg.route_prefix.rstrip('/')}"


def _wait_swapped(cfg: ServeConfig, model_ids: list[str], since: int, timeout: float) -> None:
    """Wait until each rolled model answers only from replicas registered after `since` (the old ones have
    drained), and log each swap: old and new weights, where the new ones came from."""
    import ray

    from serve.control import lookup_control

    control = lookup_control(cfg.app_name)
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    for model_id in model_ids:
        old = sorted({r["weights"] for r in ray.get(control.live.remote(model_id)) if r["seq"] <= since})
        while True:
            live = ray.get(control.live.remote(model_id))
            if live and all(r["seq"] > since and r["gate_open"] for r in live):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"model '{model_id}': new replicas not serving after {timeout:.0f}s")
            time.sleep(0.5)
        new = sorted({r["weights"] for r in live})
        spec = next(m for m in cfg.models if m.id == model_id)
        log.info("swap %s: weights %s -> %s (%s); the new replicas were healthy before the old drained (%.1fs)",
                 model_id, ", ".join(old) or "-", ", ".join(new), spec.model, time.monotonic() - t0)


def launch(cfg: ServeConfig, api_key: Optional[str] = None, *, ephemeral_key: bool = True,
           ray_address: Optional[str] = None) -> Endpoint:
    """Deploy `cfg.models` behind the secured OpenAI endpoint and block until every model is ready.

    Args:
        cfg: the serving config (port 0 picks a free port; use that for evaluation and tests).
        api_key: an extra key accepted besides the configured ones (`cfg.api_key_env` / `cfg.api_key_file`).
        ephemeral_key: if no key is configured or given, make a random one valid for this launch only;
            `Endpoint.api_key` holds it. `definemed serve` passes False and refuses to start without a key.
        ray_address: join this cluster; default: the running Ray, else a local one from `cfg.ray`.

    Returns an `Endpoint` (`.url`, `.base_url`, `.api_key`, `.models`, `.client()`, `.shutdown()`; also a
    context manager). If Serve already runs on this cluster its HTTP host/port are reused (they are
    cluster-wide and cannot change while it runs); `Endpoint.url` tells where it really is. If this app
    already runs, it is updated in place and the returned Endpoint does not own it (`shutdown()` leaves it up).
    """
    return _launch(cfg, api_key, ephemeral_key, ray_address)[0]


def _launch(cfg: ServeConfig, api_key: Optional[str], ephemeral_key: bool,
            ray_address: Optional[str]) -> tuple[Endpoint, bool]:
    """launch(); also says whether this call started the app (False: it updated a running one)."""
    key, digests = _keys(cfg, api_key, ephemeral_key)
    owns_ray = _start_ray(cfg, ray_address)
    fresh = False
    try:
        root = _start_http(cfg)
        previous = _deployed(cfg)
        fresh = previous is None
        since = _last_seq(cfg)
        rolled = _deploy(cfg, digests, previous)
        _wait_ready(cfg, root, key, cfg.ready_timeout_s)
        if not fresh:
            _wait_swapped(cfg, rolled, since, cfg.ready_timeout_s)
        root = _direct_root(cfg, root) if cfg.direct_ingress else root
    except BaseException:
        if fresh:
            shutdown_app(cfg)
        if owns_ray:
            _stop_ray()
        raise

    def stop() -> None:
        shutdown_app(cfg)
        if owns_ray:
            _stop_ray()

    return Endpoint(base_url=root + "/v1", api_key=key or "", models=cfg.model_ids(), app_name=cfg.app_name,
                    _stop=stop if fresh else (_stop_ray if owns_ray else None)), fresh


def _last_seq(cfg: ServeConfig) -> int:
    import ray

    from serve.control import lookup_control

    control = lookup_control(cfg.app_name)
    return ray.get(control.last_seq.remote()) if control is not None else 0


def swap_model(model_id: str, model: str, app_name: str = "definemed", ray_address: Optional[str] = None,
               timeout_s: Optional[float] = None) -> None:
    """Roll one model of a running endpoint to new weights (a path, hub id or tiny:// reference): its new
    replicas come up and are healthy before the old ones drain, and answers switch at one moment."""
    import ray

    from definemed.config import ConfigError, RayConfig
    from definemed.ray_utils import init_ray
    from serve.control import lookup_control

    init_ray(RayConfig(), address=ray_address or "auto")
    control = lookup_control(app_name)
    deployed = ray.get(control.deployed.remote()) if control is not None else None
    if not deployed:
        raise ConfigError(f"invalid config field 'app_name': no endpoint '{app_name}' started by definemed runs "
                          "on this cluster")
    cfg = _stored_config(deployed)
    if model_id not in cfg.model_ids():
        raise ConfigError(f"invalid config field 'models': no model '{model_id}' in '{app_name}' "
                          f"(serving {', '.join(cfg.model_ids())})")
    data = cfg.model_dump(mode="json")
    data["models"] = [{**m, "model": model} if m["id"] == model_id else m for m in data["models"]]
    new = _stored_config({"config": data})
    since = _last_seq(new)
    rolled = _deploy(new, deployed["key_digests"], deployed)
    _wait_swapped(new, rolled, since, timeout_s or new.ready_timeout_s)


def serve_forever(cfg: ServeConfig, ray_address: Optional[str] = None, detach: bool = False) -> None:
    """`definemed serve`: deploy (or update the running app), print where it is (never the key), serve until
    SIGINT/SIGTERM, then stop."""
    ep, fresh = _launch(cfg, None, False, ray_address)
    if not cfg.audit.dir:
        print("definemed serve: WARNING no audit trail (set audit.dir: one hash-chained line per request)",
              flush=True)
    print(f"definemed serve: {', '.join(ep.models)} at {ep.base_url} "
          f"(API key from {'$' + cfg.api_key_env if cfg.api_key_env else ''}"
          f"{' / ' if cfg.api_key_env and cfg.api_key_file else ''}{cfg.api_key_file or ''})", flush=True)
    if not fresh:
        print("updated the running app in place; it keeps running", flush=True)
        return
    if detach:
        print("detached: the app keeps running on the cluster; stop it with `serve shutdown`", flush=True)
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        print("definemed serve: shutting down", flush=True)
        ep.shutdown()
