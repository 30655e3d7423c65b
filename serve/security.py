"""Hospital guard rails for the OpenAI endpoint, as one pure ASGI middleware (streaming-safe).

Order per request: API key (401) -> per-key rate / concurrency limit (429) -> body size (413) -> the app.
The limits are per key for the whole app: each ingress replica enforces its share (`serve.control`).
Keys are held as SHA-256 digests only and compared with hmac.compare_digest against every stored digest, so
neither the key nor its position in the list leaks through timing. Log lines name a key by a short digest
prefix, never by the key, and never contain request or response bodies.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Optional

log = logging.getLogger("definemed.serve.security")

Scope = dict
Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class NoApiKeyError(ValueError):
    """No API key is configured: the endpoint must not start open."""


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def read_key_file(path: str | os.PathLike) -> list[str]:
    """One key per line; blank lines and `#` comments ignored (a Kubernetes secret mount works as is)."""
    text = Path(path).expanduser().read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def load_api_keys(api_key_env: Optional[str], api_key_file: Optional[str]) -> list[str]:
    """Keys from the environment variable (comma-separated allowed) and the secret file, in that order."""
    keys: list[str] = []
    if api_key_env and os.environ.get(api_key_env):
        keys += [k.strip() for k in os.environ[api_key_env].split(",") if k.strip()]
    if api_key_file:
        p = Path(api_key_file).expanduser()
        if not p.is_file():
            raise NoApiKeyError(f"invalid config field 'api_key_file': file not found: {api_key_file}")
        keys += read_key_file(p)
    short = [k for k in keys if len(k) < 16]
    if short:
        raise NoApiKeyError("API keys must be at least 16 characters (use e.g. `openssl rand -hex 32`)")
    return list(dict.fromkeys(keys))


def resolve_key_digests(api_key_env: Optional[str], api_key_file: Optional[str]) -> list[str]:
    """SHA-256 digests of the configured keys; refuses (NoApiKeyError) when there is none."""
    keys = load_api_keys(api_key_env, api_key_file)
    if not keys:
        where = " or ".join(x for x in (f"${api_key_env}" if api_key_env else "",
                                         f"file {api_key_file}" if api_key_file else "") if x)
        raise NoApiKeyError(f"invalid config field 'api_key_env': no API key found in {where}; "
                            "the endpoint never starts without one")
    return [key_digest(k) for k in keys]


def error_body(message: str, type_: str, code: str, param: Optional[str] = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class SecuritySettings:
    key_digests: list[str]
    max_body_bytes: int = 1 << 20
    max_concurrent_per_key: int = 32
    requests_per_minute_per_key: Optional[int] = None
    # Paths under the route prefix that skip nothing: every route needs a key. Kept explicit for reviewers.
    public_paths: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if not self.key_digests:
            raise NoApiKeyError("no API key configured: every route requires one")


class KeyStore:
    def __init__(self, digests: Iterable[str]):
        self._digests = [bytes.fromhex(d) for d in digests]

    def match(self, presented: Optional[str]) -> Optional[str]:
        """The matching digest (hex) or None. Compares against all digests, whatever matches first."""
        if not presented:
            return None
        probe = hashlib.sha256(presented.encode("utf-8")).digest()
        found = None
        for d in self._digests:
            if hmac.compare_digest(probe, d):
                found = d
        return found.hex() if found is not None else None


def bearer_token(scope: Scope) -> Optional[str]:
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            try:
                text = value.decode("latin-1").strip()
            except Exception:  # noqa: BLE001
                return None
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def content_length(scope: Scope) -> Optional[int]:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class _TokenBucket:
    def __init__(self, per_minute: float, clock: Callable[[], float]):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.tokens = self.capacity
        self.clock = clock
        self.stamp = clock()

    def resize(self, per_minute: float) -> None:
        """A new share of the app's rate limit: refill at the new rate, never hold more than the new capacity."""
        self.take(dry=True)
        self.capacity, self.rate = float(per_minute), per_minute / 60.0
        self.tokens = min(self.tokens, self.capacity)

    def take(self, dry: bool = False) -> float:
        """0.0 if a token was taken, else seconds until one is available."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if dry:
            return 0.0
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate if self.rate > 0 else 60.0


class _BodyTooLarge(Exception):
    pass


class SecurityMiddleware:
    """ASGI middleware: auth, per-key limits, body size limit. Non-HTTP scopes (lifespan) pass through.

    The limits it enforces are this replica's share of the app's budget (`set_shares`, from the control plane);
    alone (one replica, unit tests) the share is the whole budget. The key is checked once, here: what runs
    behind sees the request without its `Authorization` header.
    """

    def __init__(self, app: ASGIApp, settings: SecuritySettings, clock: Callable[[], float] = time.monotonic):
        self.app = app
        self.settings = settings
        self.keys = KeyStore(settings.key_digests)
        self.clock = clock
        self.in_flight: dict[str, int] = {}
        self.buckets: dict[str, _TokenBucket] = {}
        self.max_concurrent = settings.max_concurrent_per_key
        self.rate_per_minute: Optional[float] = settings.requests_per_minute_per_key

    def set_shares(self, shares: dict) -> None:
        """Apply this replica's share of the per-key budgets (keys as in SecuritySettings)."""
        if "max_concurrent_per_key" in shares:
            self.max_concurrent = int(shares["max_concurrent_per_key"])
        rate = shares.get("requests_per_minute_per_key")
        if rate is not None and rate != self.rate_per_minute:
            self.rate_per_minute = float(rate)
            for bucket in self.buckets.values():
                bucket.resize(self.rate_per_minute)

    async def _reject(self, send: Send, status: int, body: dict, headers: Optional[list] = None) -> None:
        payload = json.dumps(body).encode("utf-8")
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": hdrs + (headers or [])})
        await send({"type": "http.response.body", "body": payload})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        s = self.settings
        digest = self.keys.match(bearer_token(scope))
        if digest is None:
            log.warning("401 %s %s: missing or invalid API key", scope.get("method"), scope.get("path"))
            await self._reject(send, 401, error_body(
                "Missing or invalid API key. Send it as 'Authorization: Bearer <key>'.",
                "invalid_request_error", "invalid_api_key"), [(b"www-authenticate", b"Bearer")])
            return
        kid = digest[:8]

        if self.rate_per_minute is not None:
            bucket = self.buckets.get(digest)
            if bucket is None:
                bucket = self.buckets[digest] = _TokenBucket(self.rate_per_minute, self.clock)
            wait = bucket.take()
            if wait > 0:
                log.warning("429 key %s: rate limit %s/min", kid, s.requests_per_minute_per_key)
                await self._reject(send, 429, error_body(
                    f"Rate limit of {s.requests_per_minute_per_key} requests per minute reached for this key.",
                    "rate_limit_error", "rate_limit_exceeded"), [(b"retry-after", str(max(1, round(wait))).encode())])
                return

        if self.in_flight.get(digest, 0) >= self.max_concurrent:
            log.warning("429 key %s: %d requests in flight", kid, s.max_concurrent_per_key)
            await self._reject(send, 429, error_body(
                f"Too many concurrent requests for this key (limit {s.max_concurrent_per_key}).",
                "rate_limit_error", "concurrency_limit_exceeded"), [(b"retry-after", b"1")])
            return

        declared = content_length(scope)
        if declared is not None and declared > s.max_body_bytes:
            await self._too_large(send, declared)
            return

        self.in_flight[digest] = self.in_flight.get(digest, 0) + 1
        try:
            try:
                body = await self._read_body(receive)
            except _BodyTooLarge:
                await self._too_large(send, None)
                return
            scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"authorization"]}
            await self.app(scope, replay(body, receive), send)
        finally:
            n = self.in_flight.get(digest, 1) - 1
            if n <= 0:
                self.in_flight.pop(digest, None)
            else:
                self.in_flight[digest] = n

    async def _too_large(self, send: Send, declared: Optional[int]) -> None:
        s = self.settings
        log.warning("413 request body %s bytes > limit %d", declared if declared is not None else "(chunked)",
                    s.max_body_bytes)
        await self._reject(send, 413, error_body(
            f"Request body exceeds the limit of {s.max_body_bytes} bytes.", "invalid_request_error",
            "request_too_large"))

    async def _read_body(self, receive: Receive) -> bytes:
        # Buffer at most max_body_bytes: a chunked upload without Content-Length cannot slip past the limit.
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise asyncio.CancelledError("client disconnected")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                raise _BodyTooLarge()
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)


def replay(body: bytes, then: Optional[Receive] = None) -> Receive:
    """A `receive` that hands over the buffered body, then the client's later messages (its disconnect), if any."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if then is not None:
            return await then()  # later calls wait for http.disconnect, as Starlette expects
        await asyncio.Event().wait()  # across a handle hop the caller cancels us when the client leaves
        return {"type": "http.disconnect"}

    return receive
