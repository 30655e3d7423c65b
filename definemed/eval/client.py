"""OpenAI-compatible chat endpoints (our serve app or any other) through the official `openai` client, with a
bounded, explicit retry policy: transient failures (connection, timeout, 429, 5xx) are retried with backoff up
to `max_retries`; a 4xx is a request error and is not retried."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from definemed.config import StrictModel
from serve.endpoint import Endpoint  # noqa: F401 - one Endpoint for serving and evaluation

log = logging.getLogger(__name__)


class EndpointConfig(StrictModel):
    """An OpenAI-compatible endpoint and the model id to ask it for. The key comes from an environment
    variable or a secret file, never from the config itself."""

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str = Field(min_length=1, description="model id at the endpoint")
    api_key_env: str | None = "OPENAI_API_KEY"
    api_key_file: str | None = None
    timeout_s: float = Field(120.0, gt=0)


class RetryConfig(StrictModel):
    max_retries: int = Field(3, ge=0)
    backoff_s: float = Field(1.0, ge=0)
    max_backoff_s: float = Field(30.0, ge=0)


class RequestFailed(RuntimeError):
    """A request failed for good (a 4xx, or transient failures beyond the retry bound)."""


def resolve_api_key(cfg: EndpointConfig) -> str:
    if cfg.api_key_file:
        for line in Path(cfg.api_key_file).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                return line
    if cfg.api_key_env and os.environ.get(cfg.api_key_env):
        return os.environ[cfg.api_key_env]
    return "EMPTY"  # endpoints without auth (vLLM's default) accept any key


def endpoint_from_config(cfg: EndpointConfig) -> Endpoint:
    return Endpoint(base_url=cfg.base_url, model=cfg.model, api_key=resolve_api_key(cfg), timeout_s=cfg.timeout_s)


def _transient(exc: Exception) -> bool:
    import openai

    if isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
                        openai.InternalServerError)):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


def chat(client, model: str, messages: list[dict[str, str]], retry: RetryConfig | None = None,
         **params: Any) -> dict[str, Any]:
    """One chat completion. Returns {"text", "finish_reason", "usage", "attempts"}; raises RequestFailed."""
    retry = retry or RetryConfig()
    attempt = 0
    while True:
        attempt += 1
        try:
            resp = client.chat.completions.create(model=model, messages=messages, **params)
            choice = resp.choices[0]
            usage = resp.usage.model_dump() if getattr(resp, "usage", None) else None
            return {"text": choice.message.content or "", "finish_reason": choice.finish_reason, "usage": usage,
                    "attempts": attempt}
        except Exception as e:  # noqa: BLE001 - classified below; BaseException (kill) propagates
            if not _transient(e) or attempt > retry.max_retries:
                why = f"{type(e).__name__}: {str(e)[:200]}"
                raise RequestFailed(f"{model}: request failed after {attempt} attempt(s): {why}") from e
            delay = min(retry.max_backoff_s, retry.backoff_s * 2 ** (attempt - 1))
            log.warning("%s: transient %s, retry %d/%d in %.1fs", model, type(e).__name__, attempt,
                        retry.max_retries, delay)
            time.sleep(delay)


def map_requests(fn, items: list, concurrency: int, desc: str) -> list[tuple[Any, Exception]]:
    """Run fn(item) for every item on a thread pool with a progress bar. Failures (RequestFailed) are collected
    and returned, so one bad request never loses the others' finished (already cached) work."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm import tqdm

    failures: list[tuple[Any, Exception]] = []
    if not items:
        return failures
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool, \
            tqdm(total=len(items), desc=desc, unit="req", leave=False) as bar:
        futures = {pool.submit(fn, it): it for it in items}
        for fut in as_completed(futures):
            try:
                fut.result()
            except RequestFailed as e:
                failures.append((futures[fut], e))
            bar.update(1)
    return failures
