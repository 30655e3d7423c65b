"""serve-demo stage: deploy the merged model behind the secured endpoint, ask it one German clinical question
through the official `openai` client, record the answer and where it was served, and shut the app down."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from pydantic import Field

from definemed.config import InputPath, StageConfig
from definemed.engine import EngineConfig
from definemed.io import atomic_write_json

DEFAULT_QUESTION = ("Eine 67-jährige Patientin stellt sich mit seit zwei Stunden anhaltenden drückenden "
                    "Brustschmerzen und Atemnot vor. Welche Diagnostik veranlassen Sie als Erstes, und warum?")
SYSTEM_PROMPT = "Du bist ein medizinischer Assistent. Antworte kurz, sachlich und auf Deutsch."


class ServeDemoConfig(StageConfig):
    model: InputPath = Field(description="model directory to serve (the demo: the merge stage's output)")
    model_id: str = "merged"
    question: str = DEFAULT_QUESTION
    system_prompt: Optional[str] = SYSTEM_PROMPT
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    engine: EngineConfig = EngineConfig()
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 = a free port")
    api_key_env: Optional[str] = "DEFINEMED_API_KEY"  # unset -> a one-off random key for this run


def run(cfg: ServeDemoConfig) -> dict[str, str]:
    from serve.config import ModelSpec, ServeConfig
    from serve.runtime import launch

    scfg = ServeConfig(app_name="definemed-demo", host=cfg.host, port=cfg.port, api_key_env=cfg.api_key_env,
                       models=[ModelSpec(id=cfg.model_id, model=cfg.model, engine=cfg.engine)], ray=cfg.ray)
    out = Path(cfg.output_dir)
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + \
        [{"role": "user", "content": cfg.question}]
    t0 = time.monotonic()
    with launch(scfg) as ep:
        ready_s = time.monotonic() - t0
        client = ep.client(timeout=300)
        served = [m.id for m in client.models.list().data]
        t1 = time.monotonic()
        resp = client.chat.completions.create(model=cfg.model_id, messages=messages, max_tokens=cfg.max_tokens,
                                              temperature=cfg.temperature)
        latency = time.monotonic() - t1
        info = ep.info()
    answer = resp.choices[0].message.content or ""
    from definemed.models import is_meaningless_model

    note = ("The demo serves tiny randomly initialised models: the answer text is noise. The stage proves the "
            "serving path (Ray Serve LLM + vLLM, API key, chat template, official openai client), not answer "
            "quality." if is_meaningless_model(cfg.model) else
            "One greedy answer through the serving path (Ray Serve LLM + vLLM, API key, chat template, official "
            "openai client); the eval stage measures quality.")
    endpoint = {**info, "served_models": served, "auth": "Authorization: Bearer <key>",
                "key_source": (f"${cfg.api_key_env}" if cfg.api_key_env and os.environ.get(cfg.api_key_env)
                               else "one-off random key for this run"),
                "ready_after_s": round(ready_s, 1), "shut_down": True}
    result = {
        "model_id": cfg.model_id, "model": cfg.model, "question": cfg.question, "answer": answer,
        "finish_reason": resp.choices[0].finish_reason, "latency_s": round(latency, 3),
        "usage": resp.usage.model_dump() if resp.usage else None,
        "note": note,
    }
    answer_path = atomic_write_json(out / "answer.json", result)
    endpoint_path = atomic_write_json(out / "endpoint.json", endpoint)
    print(f"\n[serve-demo] {info['base_url']} served {served}; asked '{cfg.model_id}':\n  Q: {cfg.question}\n"
          f"  A: {answer}\n  ({result['note']})", flush=True)
    return {"answer": str(answer_path), "endpoint": str(endpoint_path)}

