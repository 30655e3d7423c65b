"""The model card /v1/models reports: which weights a replica serves, and where they came from."""
from __future__ import annotations

import json


def test_weights_card_names_content_hash_and_lineage(tmp_path):
    from definemed.lineage import hash_path, write_manifest
    from serve.server import weights_card

    (tmp_path / "model.safetensors").write_bytes(b"weights v1")
    write_manifest(tmp_path, "merge", {"method": "slerp"})
    card = weights_card("merged", str(tmp_path), 256)
    assert card["id"] == "merged" and card["root"] == str(tmp_path) and card["max_model_len"] == 256
    assert card["weights_sha256"] == hash_path(tmp_path)
    assert card["lineage"]["stage"] == "merge" and "created_utc" in card["lineage"]

    (tmp_path / "model.safetensors").write_bytes(b"weights v2")
    assert weights_card("merged", str(tmp_path), 256)["weights_sha256"] != card["weights_sha256"]
    json.dumps(card)  # served as JSON


def test_weights_card_without_lineage(tmp_path):
    from serve.server import weights_card

    (tmp_path / "config.json").write_text("{}")
    card = weights_card("base", str(tmp_path), None)
    assert "lineage" not in card and card["weights_sha256"]


def test_replicas_switch_off_vllms_logging_setup_and_log_through_serve():
    """vLLM's dictConfig at import closes every handler of the process (Serve's replica log file included);
    replicas run with VLLM_CONFIGURE_LOGGING=0 and hand vLLM's and our records to Serve's logger instead."""
    import logging

    import vllm.envs

    from serve.app import model_env
    from serve.config import ServeConfig
    from serve.server import _log_like_serve

    assert "VLLM_CONFIGURE_LOGGING" in vllm.envs.environment_variables, "vLLM dropped VLLM_CONFIGURE_LOGGING"
    cfg = ServeConfig(app_name="t", port=0, models=[{"id": "m", "model": "tiny://qwen2"}])
    assert model_env(cfg.models[0], cfg)["VLLM_CONFIGURE_LOGGING"] == "0"
    seen = []

    class Capture(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    serve_logger = logging.getLogger("ray.serve")
    before = list(serve_logger.handlers)
    saved = {n: (list(lg.handlers), lg.propagate, lg.level)
             for n in ("definemed.serve", "vllm") for lg in [logging.getLogger(n)]}
    _log_like_serve()
    serve_logger.handlers = [Capture()]  # Serve replaces its handlers while a replica starts: records follow
    try:
        logging.getLogger("definemed.serve.audit").warning("audit line")
        logging.getLogger("vllm.engine").info("engine line")
    finally:
        serve_logger.handlers = before
        for n, (handlers, propagate, level) in saved.items():  # this test process keeps its own logging
            lg = logging.getLogger(n)
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)
    assert seen == ["audit line", "engine line"]
