"""Unit tests (no Ray, no vLLM) for the serving control plane and the gateway routes: the swap gate, the
split of per-key limits across ingress replicas, and what the endpoint answers on each route."""
from __future__ import annotations

import asyncio
import json
import random

import pytest

from serve.control import ControlState, Limits
from serve.gateway import Gateway, run_asgi
from serve.security import SecurityMiddleware, SecuritySettings, key_digest


def state(slots=None, rate=None) -> tuple[ControlState, list[float]]:
    now = [0.0]
    return ControlState(Limits(slots, rate), clock=lambda: now[0]), now


# ---------------------------------------------------------------- swap gate
def test_gate_holds_new_weights_until_every_older_replica_is_gone():
    s, _ = state()
    s.register("old-1", "merged", "w1", True, {"id": "merged", "w": "w1"})
    s.register("old-2", "merged", "w1", True, {"id": "merged", "w": "w1"})
    assert s.view("old-1")["gate_open"] and s.view("old-2")["gate_open"]
    s.register("new-1", "merged", "w2", True, {"id": "merged", "w": "w2"})
    s.register("judge", "judge", "j1", False, {"id": "judge"})  # another model never gates this one
    assert s.view("judge")["gate_open"]
    assert not s.view("new-1")["gate_open"]
    assert s.view("old-1")["gate_open"]  # the old weights keep answering while the new replica waits
    assert s.cards()["merged"]["w"] == "w1"
    s.deregister("old-1")
    assert not s.view("new-1")["gate_open"]
    s.deregister("old-2")
    assert s.view("new-1")["gate_open"]
    assert s.cards()["merged"]["w"] == "w2"


def test_same_weights_never_gate_and_a_rollback_gates_on_the_newer_weights():
    s, _ = state()
    s.register("a", "m", "w1", False, {})
    s.register("b", "m", "w1", False, {})  # scale-up with the same weights
    assert s.view("b")["gate_open"]
    s.register("c", "m", "w2", False, {})
    s.register("d", "m", "w1", False, {})  # rolled back before w2 took over: waits for w2 (older) to go
    assert not s.view("c")["gate_open"] and not s.view("d")["gate_open"]
    s.deregister("a"), s.deregister("b")
    assert s.view("c")["gate_open"] and not s.view("d")["gate_open"]
    s.deregister("c")
    assert s.view("d")["gate_open"]


def test_a_replica_that_stops_calling_in_expires_and_releases_the_gate():
    s, now = state()
    s.register("old", "m", "w1", False, {})
    s.register("new", "m", "w2", False, {})
    assert not s.view("new")["gate_open"]
    now[0] += 20  # "old" crashed without deregistering
    s.touch("new")
    assert s.expire() == ["old"]
    assert s.view("new")["gate_open"]


def test_a_dead_replica_releases_its_limit_share_at_once_not_after_the_expiry():
    """A replica killed without deregistering: its actor's name leaves the cluster's named actors, and the next
    liveness check (every WATCH_S) hands its share to the live replicas; before, it stayed reserved for EXPIRY_S."""
    from serve.control import EXPIRY_S, WATCH_S

    s, now = state(slots=32)
    names = {rid: f"SERVE_REPLICA::app#model:m#{rid}" for rid in ("r1", "r2")}
    for rid in names:
        s.register(rid, "m", "w", True, {}, actor=names[rid])
    for rid in ("r1", "r2", "r1", "r2"):
        s.view(rid)
    assert [s.replicas[r].granted_slots for r in ("r1", "r2")] == [16, 16]
    now[0] += WATCH_S
    assert s.drop_dead({names["r1"]}, snapshot_at=now[0]) == ["r2"]  # r2's actor is gone
    assert now[0] < EXPIRY_S and s.view("r1")["max_concurrent_per_key"] == 32
    # A replica registered after the snapshot was taken is not judged by it.
    snapshot = now[0]
    now[0] += 0.5
    s.register("r3", "m", "w", True, {}, actor="SERVE_REPLICA::app#model:m#r3")
    assert s.drop_dead({names["r1"]}, snapshot_at=snapshot) == []
    assert "r3" in s.replicas


def test_a_restarted_control_plane_rebuilds_gates_shares_and_the_deployment_record_from_the_replicas():
    """The control actor restarts with an empty state. Replicas re-register with what they hold; until REBUILD_S
    has passed no gate opens and no share grows (a replica that has not re-registered yet may still hold one)."""
    from serve.control import REBUILD_S

    s, now = state(slots=10)
    s.set_deployed({"config": {"app_name": "a"}, "key_digests": ["d"]})
    s.register("old", "m", "w1", True, {"w": "w1"})
    s.register("old2", "m", "w1", True, {"w": "w1"})
    for rid in ("old", "old2", "old", "old2"):
        s.view(rid)
    s.register("new", "m", "w2", True, {"w": "w2"})  # a swap under way: gated behind the old weights
    held = {}
    for rid in ("old", "old2", "new", "old", "old2", "new"):
        v = s.view(rid)
        r = s.replicas[rid]
        held[rid] = {"seq": v["seq"], "gate_open": r.gate_open, "granted_slots": r.granted_slots,
                     "granted_rate": r.granted_rate, "deployed": s.deployed, "deployed_gen": v["deployed_gen"]}
    assert not held["new"]["gate_open"] and held["old"]["gate_open"]
    assert sum(h["granted_slots"] for h in held.values()) <= 10

    fresh = ControlState(Limits(10, None), clock=lambda: now[0])  # the restarted actor
    fresh.restarted()
    assert fresh.deployed is None
    # The new replica is back first; the old ones have not re-registered yet: its gate must stay closed.
    fresh.register("new", "m", "w2", True, {"w": "w2"}, held=held["new"])
    assert not fresh.view("new")["gate_open"]
    fresh.register("old", "m", "w1", True, {"w": "w1"}, held=held["old"])
    fresh.register("old2", "m", "w1", True, {"w": "w1"}, held=held["old2"])
    for rid in ("new", "old", "old2"):
        fresh.view(rid)
    assert sum(r.granted_slots for r in fresh.replicas.values()) <= 10
    assert fresh.deployed == {"config": {"app_name": "a"}, "key_digests": ["d"]}  # swap_model works again
    now[0] += REBUILD_S + 0.1
    assert not fresh.view("new")["gate_open"]  # the older weights still answer: the order survived the restart
    assert fresh.cards()["m"]["w"] == "w1"
    fresh.deregister("old"), fresh.deregister("old2")
    assert fresh.view("new")["gate_open"] and fresh.cards()["m"]["w"] == "w2"
    # A replica registering after the restart comes after every replica registered before it.
    fresh.register("later", "m", "w1", True, {})
    assert fresh.replicas["later"].seq > max(h["seq"] for h in held.values())


def test_swap_events_count_a_swap_once_it_completes():
    s, _ = state()
    s.register("a", "m", "w1", False, {})
    s.view("a")
    s.register("b", "m", "w2", False, {})
    s.view("b")
    assert s.events == [("m", "started")]
    s.deregister("a")
    s.view("b")
    assert s.events == [("m", "started"), ("m", "completed")]
    s.register("c", "m", "w2", False, {})  # scale-up with the same weights: no swap
    s.view("c")
    assert len(s.events) == 2


# ---------------------------------------------------------------- limit shares
def test_limits_split_exactly_across_ingress_replicas_and_rebalance():
    s, _ = state(slots=10, rate=60.0)
    s.register("r1", "m", "w", True, {})
    view = s.view("r1")
    assert {k: view[k] for k in ("gate_open", "max_concurrent_per_key", "requests_per_minute_per_key")} == {
        "gate_open": True, "max_concurrent_per_key": 10, "requests_per_minute_per_key": 60.0}
    s.register("r2", "m", "w", True, {})
    s.register("peer", "judge", "j", False, {})  # not an ingress replica: no share
    assert "max_concurrent_per_key" not in s.view("peer")
    assert s.view("r2")["max_concurrent_per_key"] == 0  # r1 still holds all 10 until it takes its new share
    assert s.view("r1")["max_concurrent_per_key"] == 5
    assert s.view("r2")["max_concurrent_per_key"] == 5
    s.register("r3", "m", "w", True, {})
    views = {r: s.view(r) for r in ("r1", "r2", "r3", "r1", "r2", "r3")}
    assert sorted(v["max_concurrent_per_key"] for v in views.values()) == [3, 3, 4]
    assert sum(v["requests_per_minute_per_key"] for v in views.values()) == pytest.approx(60.0)
    s.deregister("r3")
    assert s.view("r1")["max_concurrent_per_key"] + s.view("r2")["max_concurrent_per_key"] == 10


def test_granted_shares_never_exceed_the_budget_whatever_the_order():
    rng = random.Random(0)
    s, _ = state(slots=7, rate=30.0)
    live: list[str] = []
    for step in range(2000):
        op = rng.random()
        if op < 0.15 or not live:
            rid = f"r{step}"
            s.register(rid, "m", "w", True, {})
            live.append(rid)
        elif op < 0.25 and len(live) > 1:
            s.deregister(live.pop(rng.randrange(len(live))))
        else:
            s.view(rng.choice(live))
        granted = [s.replicas[r].granted_slots for r in live]
        assert sum(granted) <= 7
        assert sum(s.replicas[r].granted_rate for r in live) <= 30.0 + 1e-9
    for _ in range(3):  # once everyone has looked, the whole budget is handed out
        for r in live:
            s.view(r)
    assert sum(s.replicas[r].granted_slots for r in live) == min(7, 7 // len(live) * len(live) + 7 % len(live))


def test_security_middleware_applies_its_share():
    async def app(scope, receive, send):
        assert not any(k == b"authorization" for k, _ in scope["headers"])  # the key stops at the check
        await asyncio.sleep(0.05)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    key = "k" * 32

    async def one(mw) -> int:
        out = {}

        async def send(msg):
            out.setdefault("status", msg.get("status"))

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        await mw({"type": "http", "method": "POST", "path": "/v1/completions",
                  "headers": [(b"authorization", f"Bearer {key}".encode())]}, receive, send)
        return out["status"]

    async def burst(mw, n):
        return sorted(await asyncio.gather(*(one(mw) for _ in range(n))))

    mw = SecurityMiddleware(app, SecuritySettings([key_digest(key)], max_concurrent_per_key=10))
    assert asyncio.run(burst(mw, 4)) == [200] * 4
    mw.set_shares({"max_concurrent_per_key": 2})  # this replica's share of 10
    assert asyncio.run(burst(mw, 4)) == [200, 200, 429, 429]
    mw = SecurityMiddleware(app, SecuritySettings([key_digest(key)], requests_per_minute_per_key=600))
    assert asyncio.run(burst(mw, 4)) == [200] * 4
    mw.set_shares({"requests_per_minute_per_key": 3.0})  # the bucket shrinks to this replica's 3/min
    assert asyncio.run(burst(mw, 4)) == [200, 200, 200, 429]


# ---------------------------------------------------------------- gateway routes
class Native:
    """A stand-in for vLLM's app (test double): echoes which model it served, streaming two chunks."""

    def __init__(self):
        self.seen: list[dict] = []

    async def __call__(self, scope, receive, send):
        msg = await receive()
        self.seen.append({"scope": scope, "body": json.loads(msg["body"])})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": False})


async def request(app, method: str, path: str, body: dict | bytes | None = None) -> tuple[int, bytes]:
    payload = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
    out = {"status": None, "body": b""}

    async def receive():
        return {"type": "http.request", "body": payload, "more_body": False}

    async def send(msg):
        if msg["type"] == "http.response.start":
            out["status"] = msg["status"]
        else:
            out["body"] += msg.get("body", b"")

    await app({"type": "http", "method": method, "path": path, "root_path": "", "headers": []}, receive, send)
    return out["status"], out["body"]


def make_gateway(gate_open: bool = True):
    local, remote = Native(), Native()

    async def forward(scope, body):
        async for batch in run_asgi(remote, scope, body):
            yield batch

    async def cards():
        return {"merged": {"id": "merged", "weights_sha256": "sha256-tree:aa"}, "judge": {"id": "judge"}}

    async def ready():
        return {}

    gate = asyncio.Event()
    if gate_open:
        gate.set()
    return Gateway("merged", local, gate, {"judge": forward}, cards, ready), local, remote, gate


def test_gateway_routes_by_model_and_streams_the_answer_back():
    async def scenario():
        gw, local, remote, _ = make_gateway()
        assert await request(gw, "POST", "/v1/chat/completions", {"model": "merged"}) == (200, b"data: 1\n\ndata: 2\n\n")
        assert await request(gw, "POST", "/v1/completions", {"model": "judge"}) == (200, b"data: 1\n\ndata: 2\n\n")
        assert [s["body"]["model"] for s in local.seen] == ["merged"] and remote.seen[0]["body"]["model"] == "judge"
        status, body = await request(gw, "POST", "/v1/chat/completions", {"model": "nope"})
        assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
        status, body = await request(gw, "POST", "/v1/chat/completions", b"{not json")
        assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
        status, body = await request(gw, "GET", "/v1/models")
        assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["judge", "merged"]
        status, body = await request(gw, "GET", "/v1/models/merged")
        assert json.loads(body)["weights_sha256"] == "sha256-tree:aa"
        assert (await request(gw, "GET", "/v1/models/nope"))[0] == 404
        assert (await request(gw, "GET", "/ready"))[0] == 200
        for method, path, code in [("GET", "/tokenize", 404), ("POST", "/v1/embeddings", 404),
                                   ("GET", "/v1/chat/completions", 405), ("GET", "/openapi.json", 404),
                                   ("POST", "/scale_elastic_ep", 404), ("GET", "/metrics", 404)]:
            status, body = await request(gw, method, path)
            assert status == code, path
            assert json.loads(body)["error"]["message"]
        assert len(local.seen) == 1  # nothing else reached vLLM's app

    asyncio.run(scenario())


def test_gateway_holds_local_requests_while_the_gate_is_closed():
    async def scenario():
        gw, local, _, gate = make_gateway(gate_open=False)
        task = asyncio.create_task(request(gw, "POST", "/v1/completions", {"model": "merged"}))
        await asyncio.sleep(0.05)
        assert not task.done() and local.seen == []
        assert (await request(gw, "GET", "/health"))[0] == 200  # probes are not held
        gate.set()
        assert (await task)[0] == 200

    asyncio.run(scenario())


# ---------------------------------------------------------------- the one Endpoint
def test_endpoint_resolves_lazily_serves_per_model_views_and_stops_once():
    from serve.endpoint import Endpoint

    calls, stops = [], []

    def resolve():
        calls.append(1)
        return "http://127.0.0.1:9/v1", "secret-key-" + "x" * 16

    ep = Endpoint(base_url=None, models=["merged", "judge"], resolve=resolve, _stop=lambda: stops.append(1))
    judge = ep.for_model("judge")
    assert calls == [] and judge.model == "judge"
    client = judge.client(timeout=5)
    assert str(client.base_url).rstrip("/") == "http://127.0.0.1:9/v1" and client.max_retries == 0
    assert calls == [1] and judge.url == "http://127.0.0.1:9"
    assert "secret-key" not in repr(ep) and "secret-key" not in str(ep.info())
    judge.shutdown()  # a per-model view owns nothing
    assert stops == []
    with ep:
        pass
    ep.shutdown()
    assert stops == [1]
