"""Answers of each candidate model to the clinical prompts, through its OpenAI-compatible endpoint.

Resumable: every answer is cached on disk under a key of (model, prompt text, sampling parameters), so a killed
run asks again only for what is missing, and a changed prompt or parameter is asked anew.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field

from definemed.config import StrictModel
from definemed.data.schemas import PromptItem
from definemed.eval.cache import JsonlCache, stable_key
from definemed.eval.client import Endpoint, RequestFailed, RetryConfig, chat, map_requests

log = logging.getLogger(__name__)

SYSTEM_PROMPT_DE = ("Du bist ein sorgfältiger medizinischer Assistent in einem deutschen Krankenhaus. "
                    "Antworte ausschließlich auf Deutsch, fachlich korrekt, klar und sicher.")


class GenerationConfig(StrictModel):
    system_prompt: str | None = SYSTEM_PROMPT_DE
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0)
    seed: int | None = 0
    concurrency: int = Field(8, ge=1)
    retry: RetryConfig = RetryConfig()
    extra_body: dict[str, Any] = Field(default_factory=dict, description="server-specific request fields")


def messages(cfg: GenerationConfig, prompt: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return msgs + [{"role": "user", "content": prompt}]


def _params(cfg: GenerationConfig) -> dict:
    p = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
    if cfg.seed is not None:
        p["seed"] = cfg.seed
    if cfg.extra_body:
        p["extra_body"] = cfg.extra_body
    return p


def chat_offline(path: str, engine: dict, conversations: list[list[dict[str, str]]],
                 cfg: GenerationConfig) -> list[dict[str, Any]]:
    """Answers from a local vLLM engine's chat (the model's own template, as the serve app's chat route applies
    it), one record per conversation. Runs where Ray puts it, in a process that holds nothing else (a Ray task
    with max_calls=1): build the engine, answer, free it. For models that are not served, such as the merge
    frontier's points."""
    import gc

    from definemed.engine import EngineConfig, make_llm

    llm = make_llm(path, EngineConfig(**engine), sole_engine=True)
    try:
        return chat_records(llm, conversations, cfg)
    finally:
        del llm
        gc.collect()


def chat_records(llm, conversations: list[list[dict[str, str]]], cfg: GenerationConfig) -> list[dict[str, Any]]:
    """One record per conversation from an engine's chat, shaped like the endpoint's (answer, finish_reason,
    usage)."""
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed)
    outs = llm.chat(conversations, sp, use_tqdm=False)
    return [{"answer": o.outputs[0].text, "finish_reason": o.outputs[0].finish_reason,
             "usage": {"prompt_tokens": len(o.prompt_token_ids or []),
                       "completion_tokens": len(o.outputs[0].token_ids)}} for o in outs]


def generate_answers(name: str, endpoint: Endpoint, prompts: Sequence[PromptItem], cache_path: str | Path,
                     cfg: GenerationConfig | None = None) -> dict[str, dict]:
    """{prompt_id: record with "answer"} for one model; raises RequestFailed after finishing all others if some
    requests failed beyond the retry bound (a rerun resumes from the cache)."""
    cfg = cfg or GenerationConfig()
    return generate_chats(name, endpoint, [(p.id, messages(cfg, p.prompt)) for p in prompts], cache_path, cfg)


def generate_chats(name: str, endpoint: Endpoint, chats: Sequence[tuple[str, list[dict[str, str]]]],
                   cache_path: str | Path, cfg: GenerationConfig | None = None) -> dict[str, dict]:
    """{id: record with "answer"} for whole conversations (a one-shot exemplar turn, a system message), through
    the endpoint's chat route; cached and resumed like generate_answers (the system prompt of `cfg` is not
    added: each conversation carries its own)."""
    cfg = cfg or GenerationConfig()
    cache = JsonlCache(cache_path)
    params = _params(cfg)

    def key_of(msgs: list[dict[str, str]]) -> str:
        return stable_key("generate", name, endpoint.model, msgs, params)

    todo = [(cid, msgs) for cid, msgs in chats if key_of(msgs) not in cache]
    if len(todo) < len(chats):
        log.info("[%s] %d/%d answers cached, generating %d", name, len(chats) - len(todo), len(chats), len(todo))

    client = endpoint.client() if todo else None

    def one(chat_: tuple[str, list[dict[str, str]]]) -> None:
        cid, msgs = chat_
        out = chat(client, endpoint.model, msgs, retry=cfg.retry, **params)
        cache.put({"key": key_of(msgs), "model": name, "endpoint_model": endpoint.model, "prompt_id": cid,
                   "answer": out["text"], "finish_reason": out["finish_reason"], "usage": out["usage"]})

    failures = map_requests(one, todo, cfg.concurrency, desc=f"generate {name}")
    if failures:
        raise RequestFailed(f"[{name}] {len(failures)} of {len(todo)} generation request(s) failed; rerun to "
                            f"resume. First: {failures[0][1]}")
    return {cid: cache.get(key_of(msgs)) for cid, msgs in chats}  # type: ignore[misc]
