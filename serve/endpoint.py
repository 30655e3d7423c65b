"""Where OpenAI-compatible models answer: the one `Endpoint` that serving (`serve.launch`) returns and evaluation
talks to. Light on purpose (no Ray import), so clients of any endpoint can use it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass
class Endpoint:
    """An OpenAI-compatible endpoint.

    `base_url` ends in /v1 (what the openai client wants); `url` is the server root. `launch()` returns one that
    owns a running app (`shutdown()`, or use it as a context manager); evaluation uses one per model (`model`),
    optionally resolved on first use (`resolve` returns `(base_url, api_key)`, e.g. by starting our serve app).
    """

    base_url: Optional[str]
    api_key: str = field(default="", repr=False)
    models: list[str] = field(default_factory=list)
    model: Optional[str] = None
    timeout_s: float = 120.0
    http_client: Any = field(default=None, repr=False)  # tests pass an httpx client with a MockTransport
    resolve: Optional[Callable[[], tuple[str, str]]] = field(default=None, repr=False)
    app_name: Optional[str] = None
    _stop: Optional[Callable[[], None]] = field(default=None, repr=False)

    @property
    def url(self) -> str:
        base = self._resolved()
        return base[: -len("/v1")] if base.endswith("/v1") else base

    def _resolved(self) -> str:
        if self.base_url is None:
            if self.resolve is None:
                raise RuntimeError("endpoint has no base_url and nothing to resolve it")
            self.base_url, self.api_key = self.resolve()
        return self.base_url

    def client(self, **kwargs):
        """An `openai.OpenAI` client. Its own retries are off unless asked for: callers decide what is transient."""
        import openai

        base = self._resolved()
        kwargs.setdefault("timeout", self.timeout_s)
        kwargs.setdefault("max_retries", 0)
        if self.http_client is not None:
            kwargs.setdefault("http_client", self.http_client)
        return openai.OpenAI(base_url=base, api_key=self.api_key, **kwargs)

    def for_model(self, model: str) -> "Endpoint":
        """The same endpoint, asked for one model (does not own the app)."""
        return dataclasses.replace(self, model=model, _stop=None)

    def info(self) -> dict:
        """What may be written to disk or printed: everything but the key."""
        return {"url": self.url, "base_url": self.base_url, "models": list(self.models), "app_name": self.app_name}

    def shutdown(self) -> None:
        """Stop what this endpoint owns (the serve app `launch()` started). Idempotent."""
        stop, self._stop = self._stop, None
        if stop is not None:
            stop()

    def __enter__(self) -> "Endpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
