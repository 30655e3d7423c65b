"""One replica of one model: Ray Serve LLM's `LLMServer` (vLLM engine) plus vLLM's own OpenAI app.

The first model's replicas are also the endpoint's HTTP ingress: the key check, the limits and the routes run in
the same process as the engine (`serve.gateway`), so a request for that model crosses Serve's proxy and nothing
else. Other models' replicas are reached with one handle call (`http`). Every replica registers its weights with
the app's control plane (`serve.control`), which holds a swapped-in replica's requests until the previous
weights have drained.
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

from serve.control import ControlClient, Limits
from serve.gateway import Gateway, Named, run_asgi
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


class ModelServer(LLMServer):
    """`LLMServer` that serves vLLM's own app, registers with the control plane and, on the ingress model, is
    the endpoint (`__serve_build_asgi_app__`, used when the class is wrapped with `serve.ingress()`)."""

    async def __init__(self, llm_config: LLMConfig, *, app_name: str, security: Optional[SecuritySettings] = None,
                       cors_origins: tuple[str, ...] = (), peers: Optional[dict[str, Peer]] = None):
        await super().__init__(llm_config)
        self._model_id = llm_config.model_id
        self._native = await native_openai_app(self)
        path = llm_config.model_loading_config.model_source
        card = await asyncio.to_thread(weights_card, self._model_id, str(path),
                                       llm_config.engine_kwargs.get("max_model_len"))
        self._security = SecurityMiddleware(self._native, security) if security is not None else None
        limits = (Limits(security.max_concurrent_per_key, security.requests_per_minute_per_key)
                  if security is not None else None)
        self._control = ControlClient(
            app_name, serve.get_replica_context().replica_id.unique_id, self._model_id,
            card["weights_sha256"] or str(path), ingress=security is not None, card=card, limits=limits,
            on_limits=self._security.set_shares if self._security is not None else None)
        await self._control.start()
        self._peers: dict[str, Peer] = dict(peers or {})
        self._cors_origins = tuple(cors_origins)

    # ---------------------------------------------------------------- ingress
    async def __serve_build_asgi_app__(self):
        if self._security is None:
            raise TypeError("only the ingress model's deployment serves HTTP")
        gateway = Gateway(self._model_id, self._native, self._control.gate,
                          {m: self._forwarder(m) for m in self._peers}, self._cards, self._failed_models)
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
        async for batch in run_asgi(self._native, scope, body):
            yield batch

    async def __del__(self):
        # Serve calls this after the replica has drained: only now may a swapped-in replica start answering.
        control = getattr(self, "_control", None)
        if control is not None:
            await control.close()
        await super().__del__()
