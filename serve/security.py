"""Hospital guard rails for the OpenAI endpoint, as one pure ASGI middleware (streaming-safe).

Order per request: API key (401) -> per-key rate / concurrency limit (429) -> body size (413) -> the app.
The limits are per key for the whole app: each ingress replica enforces its share (`serve.control`).
Keys are held as SHA-256 digests only and compared with hmac.compare_digest against every stored digest, so
neither the key nor its position in the list leaks through timing. The digests from the key file are replaced
whenever the file changes (`serve.keys.KeyWatcher`); a request already admitted is never affected. Log lines,
metrics and audit lines name a key by its key id (a short hash of its digest), never by the key, and never
contain request or response bodies. Every request, refused or not, is handed to the `Recorder` (metrics and the
audit trail, `serve.audit`) as an Observation: references only, no work on the request path.
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
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable, Optional

from serve.keys import MIN_KEY_LEN, KeyFile, KeyFileError, key_digest, key_id, plaintext_keys, read_key_file

if TYPE_CHECKING:
    from serve.audit import Observation, Recorder

log = logging.getLogger("definemed.serve.security")

Scope = dict
Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class NoApiKeyError(ValueError):
    """No API key is configured: the endpoint must not start open."""


def env_keys(api_key_env: Optional[str]) -> list[str]:
    """Keys from the environment variable (comma-separated: several keys are accepted at once)."""
    if api_key_env and os.environ.get(api_key_env):
        keys = [k.strip() for k in os.environ[api_key_env].split(",") if k.strip()]
        if any(len(k) < MIN_KEY_LEN for k in keys):
            raise NoApiKeyError(f"API keys must be at least {MIN_KEY_LEN} characters (use e.g. `openssl rand -hex "
                                "32` or `definemed serve keys add`)")
        return list(dict.fromkeys(keys))
    return []


def _key_file(api_key_file: str) -> KeyFile:
    p = Path(api_key_file).expanduser()
    if not p.is_file():
        raise NoApiKeyError(f"invalid config field 'api_key_file': file not found: {api_key_file}")
    try:
        return read_key_file(p)
    except KeyFileError as e:
        raise NoApiKeyError(f"invalid config field 'api_key_file': {e}") from None


def load_api_keys(api_key_env: Optional[str], api_key_file: Optional[str]) -> list[str]:
    """The keys written in clear: the environment variable's, then the key file's plaintext lines (its digest
    entries have no key to return)."""
    keys = env_keys(api_key_env)
    if api_key_file:
        _key_file(api_key_file)  # validates the whole file
        keys += plaintext_keys(api_key_file)
    return list(dict.fromkeys(keys))


def resolve_key_digests(api_key_env: Optional[str], api_key_file: Optional[str]) -> list[str]:
    """SHA-256 digests of every key accepted now (environment and the file's active entries); refuses
    (NoApiKeyError) when there is none."""
    digests = [key_digest(k) for k in env_keys(api_key_env)]
    if api_key_file:
        digests += _key_file(api_key_file).active
    if not digests:
        where = " or ".join(x for x in (f"${api_key_env}" if api_key_env else "",
                                         f"file {api_key_file}" if api_key_file else "") if x)
        raise NoApiKeyError(f"invalid config field 'api_key_env': no API key found in {where}; "
                            "the endpoint never starts without one")
    return list(dict.fromkeys(digests))


def error_body(message: str, type_: str, code: str, param: Optional[str] = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class SecuritySettings:
    key_digests: list[str]  # fixed for the replica's life: the environment's keys (and a launch's own key)
    max_body_bytes: int = 1 << 20
    max_concurrent_per_key: int = 32
    requests_per_minute_per_key: Optional[int] = None
    # Paths under the route prefix that skip nothing: every route needs a key. Kept explicit for reviewers.
    public_paths: tuple[str, ...] = field(default_factory=tuple)
    key_file: Optional[str] = None  # watched: its digests join key_digests and follow every change of the file

    def __post_init__(self):
        if not self.key_digests and not self.key_file:
            raise NoApiKeyError("no API key configured: every route requires one")


class KeyStore:
    def __init__(self, digests: Iterable[str], revoked: Iterable[str] = ()):
        self._digests = [bytes.fromhex(d) for d in dict.fromkeys(digests)]
        self._revoked = [bytes.fromhex(d) for d in revoked]

    def __len__(self) -> int:
        return len(self._digests)

    @staticmethod
    def _find(probe: bytes, digests: list[bytes]) -> Optional[str]:
        found = None
        for d in digests:
            if hmac.compare_digest(probe, d):
                found = d
        return found.hex() if found is not None else None

    def match(self, presented: Optional[str]) -> Optional[str]:
        """The matching digest (hex) or None. Compares against all digests, whatever matches first."""
        if not presented:
            return None
        return self._find(hashlib.sha256(presented.encode("utf-8")).digest(), self._digests)

    def match_revoked(self, presented: Optional[str]) -> Optional[str]:
        """The digest of a revoked key (for the audit line of its 401), or None."""
        if not presented or not self._revoked:
            return None
        return self._find(hashlib.sha256(presented.encode("utf-8")).digest(), self._revoked)


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
    behind sees the request without its `Authorization` header. `set_file_keys` swaps in the key file's
    current digests (the environment's stay).
    """

    def __init__(self, app: ASGIApp, settings: SecuritySettings, clock: Callable[[], float] = time.monotonic,
                 recorder: Optional["Recorder"] = None):
        self.app = app
        self.settings = settings
        self.keys = KeyStore(settings.key_digests)
        self.clock = clock
        self.recorder = recorder
        self.in_flight: dict[str, int] = {}
        self.buckets: dict[str, _TokenBucket] = {}
        self.max_concurrent = settings.max_concurrent_per_key
        self.rate_per_minute: Optional[float] = settings.requests_per_minute_per_key

    def set_file_keys(self, kf: KeyFile) -> None:
        """The key file changed: accept the environment's keys and the file's active ones, from the next request
        on. Admitted requests keep running; a revoked key's limit state goes once its requests are done."""
        store = KeyStore(list(self.settings.key_digests) + kf.active, kf.revoked)
        if not len(store):
            log.error("no API key left (the key file has none active and no environment key is set): every request "
                      "gets 401 until a key is added")
        before = len(self.keys)
        self.keys = store
        live = set(self.settings.key_digests) | set(kf.active)
        for d in [d for d in self.buckets if d not in live]:
            del self.buckets[d]
        log.info("API keys reloaded: %d accepted (was %d), %d revoked", len(store), before, len(kf.revoked))

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
        if self.recorder is None:
            await self._handle(scope, receive, send, None)
            return
        obs = self.recorder.begin(scope)
        try:
            await self._handle(scope, receive, obs.wrap(send), obs)
        finally:
            self.recorder.observe(obs)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, obs: Optional["Observation"]) -> None:
        s = self.settings
        token = bearer_token(scope)
        digest = self.keys.match(token)
        if digest is None:
            revoked = self.keys.match_revoked(token)
            if obs is not None:
                obs.refusal = "revoked_key" if revoked else "invalid_api_key"
                obs.key_id = key_id(revoked) if revoked else None
            log.warning("401 %s %s: %s", scope.get("method"), scope.get("path"),
                        f"revoked key {key_id(revoked)}" if revoked else "missing or invalid API key")
            await self._reject(send, 401, error_body(
                "Missing or invalid API key. Send it as 'Authorization: Bearer <key>'.",
                "invalid_request_error", "invalid_api_key"), [(b"www-authenticate", b"Bearer")])
            return
        kid = key_id(digest)
        if obs is not None:
            obs.key_id = kid

        if self.rate_per_minute is not None:
            bucket = self.buckets.get(digest)
            if bucket is None:
                bucket = self.buckets[digest] = _TokenBucket(self.rate_per_minute, self.clock)
            wait = bucket.take()
            if wait > 0:
                if obs is not None:
                    obs.refusal = "rate_limit"
                log.warning("429 key %s: rate limit %s/min", kid, s.requests_per_minute_per_key)
                await self._reject(send, 429, error_body(
                    f"Rate limit of {s.requests_per_minute_per_key} requests per minute reached for this key.",
                    "rate_limit_error", "rate_limit_exceeded"), [(b"retry-after", str(max(1, round(wait))).encode())])
                return

        if self.in_flight.get(digest, 0) >= self.max_concurrent:
            if obs is not None:
                obs.refusal = "concurrency_limit"
            log.warning("429 key %s: %d requests in flight", kid, s.max_concurrent_per_key)
            await self._reject(send, 429, error_body(
                f"Too many concurrent requests for this key (limit {s.max_concurrent_per_key}).",
                "rate_limit_error", "concurrency_limit_exceeded"), [(b"retry-after", b"1")])
            return

        declared = content_length(scope)
        if declared is not None and declared > s.max_body_bytes:
            if obs is not None:
                obs.refusal = "body_too_large"
            await self._too_large(send, declared)
            return

        self.in_flight[digest] = self.in_flight.get(digest, 0) + 1
        try:
            try:
                body = await self._read_body(receive)
            except _BodyTooLarge:
                if obs is not None:
                    obs.refusal = "body_too_large"
                await self._too_large(send, None)
                return
            if obs is not None and obs.keep:
                obs.body = body
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
