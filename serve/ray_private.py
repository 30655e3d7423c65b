"""The Ray internals serving relies on, in one place. Each has no public equivalent in Ray 2.60;
`tests/test_serve_ray_private.py` fails loudly when a Ray upgrade moves or changes one of them.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from ray.llm._internal.common.callbacks.base import CallbackBase


async def native_openai_app(server: Any):
    """vLLM's own OpenAI FastAPI app, bound to the engine this `LLMServer` started.

    Why private: Ray builds it for its experimental direct-streaming mode (`LLMServer.__serve_build_asgi_app__`
    -> `VLLMEngine.build_asgi_app`). Serving it ourselves is what removes the second deployment hop and the
    pydantic round trip (parse, pickle, `model_dump`, JSON) of Ray's `OpenAiIngress` path.
    """
    from ray.serve.llm.deployment import LLMServer

    return await LLMServer.__serve_build_asgi_app__(server)


def running_http_options() -> Optional[Any]:
    """HTTP options (host, port, ssl_*) of the Serve instance already running on this cluster, or None.

    Why private: Serve's proxy settings are cluster-wide and fixed once Serve runs; `serve.status()` does not
    report them, and `launch` must know where (and whether over TLS) the endpoint really listens.
    """
    import ray

    if not ray.is_initialized():  # the lookup below would start a local Ray just to find nothing
        return None
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else client.http_config


def session_log_dir():
    """The running Ray session's log directory (Serve's access logs live under `serve/`).

    Why private: Ray has no public API for the session directory; the benchmark's per-hop profile and the
    no-prompt-in-logs test read the files there.
    """
    from pathlib import Path

    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"


def direct_ingress_urls(app_name: str, scheme: str = "http") -> list[str]:
    """Base URLs (`scheme://ip:port`) at which the app's ingress replicas answer directly (Serve direct ingress).

    Why private: Serve 2.60 publishes the replicas' own ports only to its HAProxy manager (the controller's
    `get_target_groups`); `launch` needs them to hand out the direct address.
    """
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    groups = ray.get(client._controller.get_target_groups.remote(app_name))
    return sorted(f"{scheme}://{t.ip}:{t.port}" for g in groups if g.protocol == RequestProtocol.HTTP
                  for t in g.targets)


class LocalWeightsCallback(CallbackBase):
    """Skips Ray Serve LLM's node initialisation when the model is a local directory.

    Why private: Serve LLM starts one `initialize_remote_node` task per node of the replica's placement group to
    download the model, each in a fresh worker process with the replica's runtime env. For a local path
    (every `resolve_model` result: `tiny://`, `real://`, a merge output on shared storage) there is nothing to
    download, and on 2 CPU cores that process start costs several seconds per replica. The only way to skip it
    is the `CallbackCtx.run_init_node` flag of `LLMConfig.callback_config`.
    """

    async def on_before_node_init(self) -> None:
        source = self.llm_config.model_loading_config.model_source
        if isinstance(source, str) and os.path.isdir(source):
            self.ctx.run_init_node = False
