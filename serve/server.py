"""One replica of one model: Ray Serve LLM's `LLMServer` (vLLM engine) plus vLLM's own OpenAI app.

The first model's replicas are also the endpoint's HTTP ingress: the key check, the limits and the routes run in
the same process as the engine (`serve.gateway`), so a request for that model crosses Serve's proxy and nothing
else. Other models' replicas are reached with one handle call (`http`). Every replica registers its weights with
the app's control plane (`serve.control`), which holds a swapped-in replica's requests until the previous
weights have drained. Ingress replicas also follow the key file (`serve.keys`) and feed the metrics and the audit
trail (`serve.audit`); every completion answer names the weights that produced it (`x-definemed-weights`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Optional, Union

from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.llm import LLMConfig
from ray.serve.llm.deployment import LLMServer

from serve.audit import AuditSettings, Recorder, get_writer
from serve.control import ControlClient, Limits
from serve.gateway import WEIGHTS_HEADER, Gateway, Named, run_asgi
from serve.keys import KeyWatcher
from serve.metrics import ServeMetrics
from serve.ray_private import native_openai_app
from serve.security import SecurityMiddleware, SecuritySettings

log = logging.getLogger("definemed.serve")

Peer = Union[DeploymentHandle, tuple[str, str]]  # a handle, or (deployment, app) to look up on first use


def weights_card(model_id: str, path: str, max_model_len: Optional[int]) -> dict[str, Any]:
    """The OpenAI model object for /v1/models, with what identifies the weights: their content hash and, beside
    artifacts of this platform, the stage and git revision from lineage.json."""
    from pathlib import Path

    from definemed.lineage import MANIFEST_NAME, hash_path

    card: dict[str, Any] = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "definemed",
                            "root": path, "max_model_len": max_model_len, "weights_sha256": hash_path(path)}
    if (Path(path) / MANIFEST_NAME).is_file():
        m = json.loads((Path(path) / MANIFEST_NAME).read_text(encoding="utf-8"))
        card["lineage"] = {"stage": m.get("stage"), "created_utc": m.get("created_utc"),
                           "git_revision": m.get("git_revision")}
    return card


class _ToServeLogger(logging.Handler):
    """Hands our records to Serve's replica logger, whichever handlers it has at the time (Serve replaces them
    while a replica starts, so copying them once loses everything logged later)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("ray.serve").handle(record)


def _log_like_serve() -> None:
    """Our loggers (`definemed.serve.*`: 401/413/429 lines, key reloads, audit and control-plane trouble) and vLLM's
    (its own logging setup is off: VLLM_CONFIGURE_LOGGING=0, see serve.app.model_env) write where Serve's replica
    logger does: the replica's log file under the Ray session (`logs/serve/`)."""
    for name in ("definemed.serve", "vllm"):
        lg = logging.getLogger(name)
        if not any(isinstance(h, _ToServeLogger) for h in lg.handlers):
            lg.addHandler(_ToServeLogger())
        lg.setLevel(logging.INFO)
        lg.propagate = False


class ModelServer(LLMServer):
    """`LLMServer` that serves vLLM's own app, registers with the control plane and, on the ingress model, is
    the endpoint (`__serve_build_asgi_app__`, used when the class is wrapped with `serve.ingress()`)."""

    async def __init__(self, llm_config: LLMConfig, *, app_name: str, security: Optional[SecuritySettings] = None,
                       cors_origins: tuple[str, ...] = (), peers: Optional[dict[str, Peer]] = None,
                       audit: Optional[AuditSettings] = None):
        import ray

        _log_like_serve()
        await super().__init__(llm_config)
        self._model_id = llm_config.model_id
        self._native = await native_openai_app(self)
        path = llm_config.model_loading_config.model_source
        card = await asyncio.to_thread(weights_card, self._model_id, str(path),
                                       llm_config.engine_kwargs.get("max_model_len"))
        self._weights = card["weights_sha256"] or str(path)
        self._peers: dict[str, Peer] = dict(peers or {})
        self._cors_origins = tuple(cors_origins)
        rid = serve.get_replica_context().replica_id.unique_id
        self._security = self._recorder = self._keys = None
        if security is not None:
            self._recorder = self._make_recorder(app_name, rid, audit)
            self._security = SecurityMiddleware(self._native, security, recorder=self._recorder)
            if security.key_file:
                self._keys = self._watch_keys(security.key_file, ServeMetrics(app_name))
                await asyncio.to_thread(self._keys.check)  # the file's keys count from the first request on
                self._keys.start()
        limits = (Limits(security.max_concurrent_per_key, security.requests_per_minute_per_key)
                  if security is not None else None)
        self._control = ControlClient(
            app_name, rid, self._model_id, self._weights, ingress=security is not None, card=card, limits=limits,
            on_limits=self._security.set_shares if self._security is not None else None,
            actor=ray.get_runtime_context().get_actor_name())  # how the control plane sees this replica die
        await self._control.start()

    def _make_recorder(self, app_name: str, rid: str, audit: Optional[AuditSettings]) -> Recorder:
        writer = None
        if audit is not None:
            handle = [get_writer(app_name, audit)]

            async def writer(batch: list[dict]) -> int:
                if handle[0] is None:  # after a failure: look it up again, or start it if it is gone for good
                    handle[0] = get_writer(app_name, audit)
                try:
                    return await handle[0].append.remote(batch)
                except BaseException:  # also the caller's timeout (a cancellation): the handle may be stale
                    handle[0] = None
                    raise

        models = {self._model_id: self._weights, **{m: None for m in self._peers}}
        recorder = Recorder(ServeMetrics(app_name), self._model_id, models, rid, writer=writer)
        recorder.start()
        return recorder

    def _watch_keys(self, path: str, metrics: ServeMetrics) -> KeyWatcher:
        def changed(kf) -> None:
            self._security.set_file_keys(kf)
            metrics.key_reload("ok")

        return KeyWatcher(path, changed, on_error=lambda _msg: metrics.key_reload("error"))

    # ---------------------------------------------------------------- ingress
    async def __serve_build_asgi_app__(self):
        if self._security is None:
            raise TypeError("only the ingress model's deployment serves HTTP")
        gateway = Gateway(self._model_id, self._native, self._control.gate,
                          {m: self._forwarder(m) for m in self._peers}, self._cards, self._failed_models,
                          weights=self._weights)
        app = gateway
        if self._cors_origins:
            from starlette.middleware.cors import CORSMiddleware

            app = CORSMiddleware(gateway, allow_origins=list(self._cors_origins), allow_credentials=False,
                                 allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
        self._security.app = app
        return Named(self._security)

    def _handle(self, model_id: str) -> DeploymentHandle:
        peer = self._peers[model_id]
        if isinstance(peer, tuple):
            peer = self._peers[model_id] = serve.get_deployment_handle(*peer)
        return peer

    def _forwarder(self, model_id: str):
        async def forward(scope: dict, body: bytes) -> AsyncIterator[list[dict]]:
            async for batch in self._handle(model_id).options(stream=True).http.remote(scope, body):
                yield batch

        return forward

    async def _cards(self) -> dict[str, dict]:
        return await self._control.cards()

    async def _failed_models(self) -> dict[str, str]:
        async def probe(model_id: str, check) -> tuple[str, Optional[str]]:
            try:
                await asyncio.wait_for(check(), timeout=10)
                return model_id, None
            except Exception as e:  # noqa: BLE001 - any failure means "not ready"
                return model_id, type(e).__name__

        checks = {self._model_id: self.check_health,
                  **{m: (lambda m=m: self._handle(m).check_health.remote()) for m in self._peers}}
        results = await asyncio.gather(*(probe(m, c) for m, c in checks.items()))
        return {m: err for m, err in results if err}

    # ---------------------------------------------------------------- forwarded requests (other models)
    async def http(self, scope: dict, body: bytes) -> AsyncIterator[list[dict]]:
        """One HTTP request the ingress forwarded (already authenticated): vLLM's ASGI messages, batched."""
        await self._control.gate.wait()
        named = (WEIGHTS_HEADER, self._weights.encode())
        async for batch in run_asgi(self._native, scope, body):
            for msg in batch:
                if msg["type"] == "http.response.start":  # the ingress audits which weights answered
                    msg["headers"] = [*msg.get("headers", ()), named]
            yield batch

    async def __del__(self):
        # Serve calls this after the replica has drained: only now may a swapped-in replica start answering.
        if getattr(self, "_keys", None) is not None:
            self._keys.stop()
        if getattr(self, "_recorder", None) is not None:
            await self._recorder.close()  # the last requests' audit lines
        control = getattr(self, "_control", None)
        if control is not None:
            await control.close()
        await super().__del__()
