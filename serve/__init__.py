"""On-prem serving: Ray Serve LLM (vLLM engine) behind a secured OpenAI-compatible endpoint.

`serve.launch(cfg)` is the Python API other stages use; `serve.swap_model(id, path)` rolls one model of a
running endpoint to new weights; `definemed serve --config configs/serve.yaml` the service (`definemed serve keys
add|revoke|list` rotates its keys live, `definemed serve audit verify DIR` checks its audit trail); `serve run
serve/config.yaml` the plain Ray Serve way. Heavy imports (Ray, vLLM) load lazily.
"""
from __future__ import annotations

from serve.config import AutoscalingConfig, LimitsConfig, ModelSpec, ServeConfig
from serve.endpoint import Endpoint

__all__ = ["ServeConfig", "ModelSpec", "AutoscalingConfig", "LimitsConfig", "Endpoint", "launch", "swap_model",
           "serve_forever"]


def __getattr__(name: str):
    if name in ("launch", "swap_model", "serve_forever"):
        from serve import runtime

        return getattr(runtime, name)
    raise AttributeError(name)
