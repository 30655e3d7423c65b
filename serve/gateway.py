"""The endpoint's routes, as one pure ASGI app that runs inside the ingress model's replica (behind
`SecurityMiddleware`).

Completions for the model of this replica go straight to vLLM's own OpenAI app, so the request body is parsed
once (by vLLM) and the response is vLLM's own bytes: no second JSON encoding, no extra deployment hop. Other models
are one handle call away (`forward`), which streams vLLM's ASGI messages back unchanged. Only the routes below
exist; everything else vLLM's app would offer (tokenize, embeddings, scaling, docs) answers 404.
"""
from __future__ import annotations

import asyncio
import json
import re
from types import SimpleNamespace
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from starlette.routing import Route

from serve.security import ASGIApp, Receive, Scope, Send, error_body, replay

COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
WEIGHTS_HEADER = b"x-definemed-weights"  # on every completion answer: the content hash of the weights that answered
_MODEL_PATH = re.compile(r"^/v1/models/(?P<model>.+)$")
_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
                503: "service_unavailable_error"}

Forward = Callable[[dict, bytes], AsyncIterator[list[dict]]]


async def send_json(send: Send, status: int, body: Any, headers: Optional[list] = None) -> None:
    payload = json.dumps(body).encode("utf-8")
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": hdrs + list(headers or [])})
    await send({"type": "http.response.body", "body": payload})


async def send_error(send: Send, status: int, message: str, code: str) -> None:
    await send_json(send, status, error_body(message, _ERROR_TYPES.get(status, "api_error"), code))


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            return b"".join(chunks)


def forwarded_scope(scope: Scope) -> dict:
    """The picklable part of an HTTP scope (what vLLM's app reads), for the hop to another model's replica."""
    keep = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string", "root_path",
            "headers", "client", "server")
    out = {k: scope[k] for k in keep if k in scope}
    out["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])]
    return out


async def run_asgi(app: ASGIApp, scope: dict, body: bytes) -> AsyncIterator[list[dict]]:
    """Run an ASGI app on one buffered request and yield its messages, batched: whatever the app has sent while
    the previous batch was on its way goes in the next one (one message at low load, many SSE chunks under load)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def run() -> None:
        try:
            await app(scope, replay(body), queue.put)
        finally:
            queue.put_nowait(done)

    task = asyncio.get_running_loop().create_task(run())
    try:
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            finished = batch[-1] is done
            if finished:
                batch.pop()
            if batch:
                yield batch
            if finished:
                break
        await task  # re-raise what the app raised
    finally:
        if not task.done():
            task.cancel()


def _unused(request):  # the routes below only name requests; Gateway.__call__ serves them
    raise NotImplementedError


ROUTES = [Route("/v1/chat/completions", _unused, methods=["POST"]), Route("/v1/completions", _unused, methods=["POST"]),
          Route("/v1/models", _unused, methods=["GET"]), Route("/v1/models/{model:path}", _unused, methods=["GET"]),
          Route("/health", _unused, methods=["GET"]), Route("/ready", _unused, methods=["GET"])]


class Named:
    """Wraps the endpoint's ASGI stack with Starlette-style `routes`: Serve names access-log lines and metrics by
    the matched route (`POST /v1/chat/completions 200 41.2ms`), not by the route prefix."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.routes = ROUTES
        self.router = SimpleNamespace(redirect_slashes=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class Gateway:
    """Routes: completions (local or forwarded by `model`), `/v1/models`, `/health`, `/ready`."""

    def __init__(self, local_id: str, local_app: ASGIApp, gate: asyncio.Event, forward: dict[str, Forward],
                 cards: Callable[[], Awaitable[dict[str, dict]]], ready: Callable[[], Awaitable[dict[str, str]]],
                 weights: Optional[str] = None):
        self.local_id = local_id
        self.weights = (WEIGHTS_HEADER, weights.encode()) if weights else None
        self.local_app = local_app
        self.gate = gate
        self.forward = forward
        self.cards = cards
        self.ready = ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        root = scope.get("root_path", "")
        path = scope["path"][len(root):] if root and scope["path"].startswith(root) else scope["path"]
        method = scope["method"]
        if path in COMPLETION_PATHS:
            if method != "POST":
                await send_error(send, 405, f"Method {method} not allowed on {path}.", "method_not_allowed")
                return
            await self._completion(scope, receive, send)
        elif method != "GET":
            await send_error(send, 405 if path in ("/health", "/ready", "/v1/models") else 404,
                             f"No route {method} {path}.", "not_found")
        elif path == "/health":
            await send_json(send, 200, {"status": "ok"})
        elif path == "/ready":
            await self._ready(send)
        elif path == "/v1/models":
            cards = await self.cards()
            await send_json(send, 200, {"object": "list", "data": [cards[m] for m in sorted(cards)]})
        elif m := _MODEL_PATH.match(path):
            card = (await self.cards()).get(m["model"])
            if card is None:
                await send_error(send, 404, f"The model `{m['model']}` does not exist.", "model_not_found")
            else:
                await send_json(send, 200, card)
        else:
            await send_error(send, 404, f"No route GET {path}.", "not_found")

    async def _completion(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        model = self.local_id
        if self.forward:  # only then does the body decide where to go
            try:
                data = json.loads(body)
            except ValueError:
                await send_error(send, 400, "The request body is not valid JSON.", "invalid_json")
                return
            model = data.get("model", self.local_id) if isinstance(data, dict) else self.local_id
        if model == self.local_id or not isinstance(model, str):
            await self.gate.wait()
            await self.local_app(scope, replay(body, receive), self._named(send) if self.weights else send)
            return
        forward = self.forward.get(model)
        if forward is None:
            await send_error(send, 404, f"The model `{model}` does not exist.", "model_not_found")
            return
        async for batch in forward(forwarded_scope(scope), body):
            for msg in batch:
                await send(msg)

    def _named(self, send: Send) -> Send:
        async def send_named(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", ()), self.weights]}
            await send(msg)

        return send_named

    async def _ready(self, send: Send) -> None:
        failed = await self.ready()
        models = sorted([self.local_id, *self.forward])
        if failed:
            await send_json(send, 503, {"status": "not_ready", "models": models, "failed": failed})
        else:
            await send_json(send, 200, {"status": "ready", "models": models})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
