"""Loud checks on the Ray internals `serve/ray_private.py` relies on (and the Serve behaviour the swap needs).
When a Ray upgrade breaks one of these, this file says which, before a deployment fails in a hospital."""
from __future__ import annotations

import inspect


def test_llm_server_builds_vllms_own_app():
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
    from ray.serve.llm.deployment import LLMServer

    hook = getattr(LLMServer, "__serve_build_asgi_app__", None)
    assert hook is not None and inspect.iscoroutinefunction(hook), \
        "LLMServer.__serve_build_asgi_app__ is gone: serve/ray_private.native_openai_app needs a new source"
    assert "build_asgi_app" in inspect.getsource(hook)
    assert inspect.iscoroutinefunction(getattr(VLLMEngine, "build_asgi_app", None)), \
        "VLLMEngine.build_asgi_app is gone: vLLM's own OpenAI app can no longer be served in the replica"


def test_serve_exposes_the_running_http_options():
    from ray.serve.context import _get_global_client

    assert "raise_if_no_controller_running" in inspect.signature(_get_global_client).parameters
    from ray.serve._private.client import ServeControllerClient

    assert isinstance(inspect.getattr_static(ServeControllerClient, "http_config"), property), \
        "ServeControllerClient.http_config is gone: serve/ray_private.running_http_options needs a new source"


def test_serve_supports_late_bound_ingress_and_surge_rollouts():
    from ray import serve
    from ray.serve.schema import DeploymentSchema

    class WithHook:
        async def __serve_build_asgi_app__(self):
            return None

    serve.ingress()(WithHook)  # late-bound ingress: the app comes from the hook at replica start
    assert "max_surge_percent" in DeploymentSchema.model_fields, \
        "Serve lost max_surge_percent: a swap would stop the old replica before the new one is up"


def test_the_session_log_directory_is_reachable(ray_local):
    from serve.ray_private import session_log_dir

    assert session_log_dir().is_dir(), "Ray moved its session directory: serve/ray_private.session_log_dir"


def test_local_weights_skip_serve_llms_node_download_and_remote_ones_do_not(tiny_qwen2):
    import asyncio

    from ray.llm._internal.serve.engines.vllm import vllm_engine

    from serve.app import llm_config
    from serve.config import ServeConfig

    assert "run_init_node" in inspect.getsource(vllm_engine.VLLMEngine.start), \
        "Serve LLM no longer checks CallbackCtx.run_init_node: serve/ray_private.LocalWeightsCallback does nothing"
    cfg = ServeConfig(app_name="t", port=0, models=[{"id": "m", "model": tiny_qwen2}])
    local = llm_config(cfg.models[0], cfg)
    cb = local.get_or_create_callback()
    asyncio.run(cb.run_callback("on_before_node_init"))
    assert cb.ctx.run_init_node is False  # a local directory: nothing to download, no task per node
    remote = local.model_copy(update={"model_loading_config": local.model_loading_config.model_copy(
        update={"model_source": "Qwen/Qwen2.5-7B-Instruct"})})
    remote._callback_instance = None
    cb = remote.get_or_create_callback()
    asyncio.run(cb.run_callback("on_before_node_init"))
    assert cb.ctx.run_init_node is True  # a hub id: Serve LLM's own download runs as before
