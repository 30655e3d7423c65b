"""Start, use and stop the serving app from Python (`launch`) or as a long-running service (`serve_forever`).

Other stages (evaluation hosting candidate and judge models) use `launch`:

    from serve import ServeConfig, launch
    cfg = ServeConfig(port=0, models=[{"id": "merged", "model": "outputs/demo/merge/model"},
                                      {"id": "judge", "model": "tiny://qwen2@1"}])
    with launch(cfg) as ep:                      # blocks until every model answers
        client = ep.client()                     # openai.OpenAI(base_url=ep.base_url, api_key=ep.api_key)
        client.chat.completions.create(model="merged", messages=[...])
    # leaving the block deletes the app (and stops Serve if nothing else runs on it)
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
from dataclasses import dataclass, field
from typing import Optional

from serve.config import ServeConfig

log = logging.getLogger("definemed.serve")


@dataclass
class Endpoint:
    """A running app. `base_url` ends in /v1 (what the openai client wants); `url` is the server root."""

    url: str
    base_url: str
    api_key: str = field(repr=False)
    models: list[str]
    app_name: str
    _owns_ray: bool = field(default=False, repr=False)
    _closed: bool = field(default=False, repr=False)

    def client(self, **kwargs):
        """An `openai.OpenAI` client for this endpoint (kwargs go to the client, e.g. timeout, max_retries)."""
        import openai

        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key, **kwargs)

    def async_client(self, **kwargs):
        import openai

        kwargs.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, **kwargs)

    def info(self) -> dict:
        """What may be written to disk or printed: everything but the key."""
        return {"url": self.url, "base_url": self.base_url, "models": list(self.models), "app_name": self.app_name}

    def shutdown(self) -> None:
        """Delete this app; stop Serve when no other app remains (frees the replicas' CPUs/GPUs). Idempotent."""
        if self._closed:
            return
        self._closed = True
        shutdown_app(self.app_name)
        if self._owns_ray:
            import ray

            ray.shutdown()

    def __enter__(self) -> "Endpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def shutdown_app(app_name: str) -> None:
    from ray import serve

    with contextlib.suppress(Exception):
        serve.delete(app_name)
    with contextlib.suppress(Exception):
        if not serve.status().applications:
            serve.shutdown()


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _running_http_options():
    """HTTP options of a Serve instance already running on this cluster, or None."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else client.http_config


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "localhost") else ("::1" if host == "::" else host)


def _wait_ready(cfg: ServeConfig, url: str, api_key: str, timeout: float) -> None:
    import httpx
    from ray import serve

    deadline = time.monotonic() + timeout
    last = "not started"
    while time.monotonic() < deadline:
        app = serve.status().applications.get(cfg.app_name)
        if app is not None and str(app.status).endswith("DEPLOY_FAILED"):
            raise RuntimeError(f"serve app '{cfg.app_name}' failed to deploy: {app.message}")
        if app is not None and str(app.status).endswith("RUNNING"):
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
    cluster-wide and cannot change while it runs); `Endpoint.url` tells where it really is.
    """
    import ray
    from ray import serve
    from ray.serve.api import _run

    from definemed.ray_utils import init_ray
    from serve.app import build_app
    from serve.security import key_digest, load_api_keys

    keys = load_api_keys(cfg.api_key_env, cfg.api_key_file)  # before Ray starts: fail fast
    if api_key:
        keys.append(api_key)
    if not keys:
        if not ephemeral_key:
            from serve.security import NoApiKeyError

            raise NoApiKeyError(f"invalid config field 'api_key_env': no API key in ${cfg.api_key_env}"
                                + (f" or {cfg.api_key_file}" if cfg.api_key_file else "")
                                + "; the endpoint never starts without one")
        keys = [secrets.token_urlsafe(32)]
    owns_ray = not ray.is_initialized()
    if owns_ray:  # Serve's proxy inherits the local Ray's environment; replicas get it via runtime_env
        from serve.app import serve_env

        for k, v in serve_env(cfg).items():
            os.environ.setdefault(k, v)
    init_ray(cfg.ray, address=ray_address)
    try:
        running = _running_http_options()
        if running is not None:
            host, port = running.host, running.port
            if (host, port) != (cfg.host, cfg.port) and cfg.port != 0:
                log.warning("Serve already runs on %s:%s on this cluster; ignoring host/port %s:%s from config",
                            host, port, cfg.host, cfg.port)
            scheme = "https" if getattr(running, "ssl_certfile", None) else "http"
        else:
            host = cfg.host
            port = cfg.port or free_port(cfg.host)
            http = {"host": host, "port": port}
            if cfg.request_timeout_s:
                http["request_timeout_s"] = cfg.request_timeout_s
            if cfg.tls_certfile:
                http.update(ssl_certfile=cfg.tls_certfile, ssl_keyfile=cfg.tls_keyfile)
            scheme = "https" if cfg.tls_certfile else "http"
            serve.start(http_options=http, logging_config={"enable_access_log": cfg.access_log})
        app = build_app(cfg, key_digests=[key_digest(k) for k in dict.fromkeys(keys)])
        _run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, _blocking=False,
             logging_config={"enable_access_log": cfg.access_log})
        root = f"{scheme}://{_client_host(host)}:{port}{cfg.route_prefix.rstrip('/')}"
        _wait_ready(cfg, root, keys[-1] if api_key else keys[0], cfg.ready_timeout_s)
    except BaseException:
        shutdown_app(cfg.app_name)
        if owns_ray:
            ray.shutdown()
        raise
    return Endpoint(url=root, base_url=root + "/v1", api_key=api_key or keys[0], models=cfg.model_ids(),
                    app_name=cfg.app_name, _owns_ray=owns_ray)


def serve_forever(cfg: ServeConfig, ray_address: Optional[str] = None, detach: bool = False) -> None:
    """`definemed serve`: deploy, print where it is (never the key), serve until SIGINT/SIGTERM, then stop."""
    ep = launch(cfg, ephemeral_key=False, ray_address=ray_address)
    print(f"definemed serve: {', '.join(ep.models)} at {ep.base_url} "
          f"(API key from {'$' + cfg.api_key_env if cfg.api_key_env else ''}"
          f"{' / ' if cfg.api_key_env and cfg.api_key_file else ''}{cfg.api_key_file or ''})", flush=True)
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
