"""The serving app's small control plane: which replicas are alive with which weights, and each ingress replica's
share of the per-key limits.

Nothing here is on the request path. Every replica keeps one long-poll call open to a named actor
(`ControlActor`); answers change only when replicas come, go or swap weights, so a request never waits on it.

A replica that dies without deregistering (killed, OOM, its node lost) is dropped within `WATCH_S`: each replica
registers its Serve actor's name, and the control actor lists the cluster's named actors (one cheap GCS call,
`ray.util.list_named_actors`) every `WATCH_S`; a dead actor's name is gone from that list at once. `EXPIRY_S`
stays as the fallback for a replica that is alive but silent (its event loop stuck) or registered without a name.

The control actor restarts on failure (`max_restarts=-1`) and rebuilds its state from the replicas: each one
re-registers with what it holds (registration number, open gate, the limit share it applies, and the latest
deployment record `launch` stored), so gates, shares and `swap_model` keep working. For `REBUILD_S` after a
restart no gate opens and no share grows, until every live replica has had the time to re-register.

Two jobs:

- **Swap gate.** A replica whose weights differ from those of an *older* live replica of the same model holds its
  requests until that replica has drained and deregistered. Serve's rollout (`max_surge_percent`) starts the new
  replica before stopping the old one; the gate makes the answers switch at one moment: every answer completed
  before the last old replica is gone came from the old weights, every later one from the new.
- **Limit shares.** The configured per-key limits hold for the whole app: the concurrency budget is split into
  integer slots and the rate into fractions across the live ingress replicas. A replica's grant never makes the
  sum exceed the budget: it gets at most what the others do not hold, and a shrinking share is granted only once
  the replica has taken it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

log = logging.getLogger("definemed.serve")

NAMESPACE = "definemed"
EXPIRY_S = 15.0  # a replica that has not called in for this long (alive but stuck, or unnamed) is dropped
POLL_S = 2.0  # long-poll timeout: how often an idle replica checks in
WATCH_S = 1.0  # how often the control actor checks which registered replica actors are still alive
REBUILD_S = 2 * POLL_S + 2.0  # after a restart: time for every live replica to re-register


def actor_name(app_name: str) -> str:
    return f"definemed-control:{app_name}"


@dataclass
class Limits:
    """The configured per-key budgets (whole app)."""

    max_concurrent_per_key: Optional[int] = None
    requests_per_minute_per_key: Optional[float] = None


@dataclass
class _Replica:
    model_id: str
    weights: str
    ingress: bool
    seq: int
    card: dict
    seen: float
    gate_open: bool = False
    granted_slots: int = 0
    granted_rate: float = 0.0
    actor: Optional[str] = None  # the name of the replica's actor: how its death is seen
    since: float = 0.0  # registered at (clock): a liveness snapshot taken before it says nothing about it
    swap: bool = False  # registered next to other weights of its model: its gate opening completes a swap


@dataclass
class ControlState:
    """The control plane's state and rules, without Ray (unit-testable)."""

    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], float] = time.monotonic
    replicas: dict[str, _Replica] = field(default_factory=dict)
    version: int = 0
    _seq: int = 0
    deployed: Optional[dict] = None  # what `launch` deployed (config + key digests), for `swap`
    deployed_gen: int = 0
    rebuilding_until: float = 0.0  # a restarted actor: hold gates and shares until the replicas are back
    events: list[tuple[str, str]] = field(default_factory=list)  # (model, started|completed) swaps, for metrics

    def _changed(self) -> None:
        self.version += 1

    def restarted(self) -> None:
        self.rebuilding_until = self.clock() + REBUILD_S

    def rebuilding(self) -> bool:
        return self.clock() < self.rebuilding_until

    def _next_seq(self) -> int:
        # Registration numbers order replicas across restarts of this actor: time-based, never below one seen.
        self._seq = max(self._seq + 1, time.time_ns() // 1000)
        return self._seq

    def register(self, rid: str, model_id: str, weights: str, ingress: bool, card: dict,
                 actor: Optional[str] = None, held: Optional[dict] = None) -> None:
        """A new replica, or (`held`) one re-registering after this actor restarted, with what it holds:
        its registration number, whether its gate is open, the share it applies, its deployment record."""
        if rid in self.replicas:
            self.replicas[rid].seen = self.clock()
            return
        held = held or {}
        if held.get("seq"):
            seq = int(held["seq"])
            self._seq = max(self._seq, seq)
        else:
            seq = self._next_seq()
        r = _Replica(model_id, weights, ingress, seq, card, self.clock(), actor=actor or None,
                     since=self.clock(), gate_open=bool(held.get("gate_open")),
                     granted_slots=int(held.get("granted_slots") or 0),
                     granted_rate=float(held.get("granted_rate") or 0.0))
        if not r.gate_open and any(o.model_id == model_id and o.weights != weights for o in self.replicas.values()):
            r.swap = True
            self.events.append((model_id, "started"))
        self.replicas[rid] = r
        if held.get("deployed") is not None:
            self.offer_deployed(held["deployed"], int(held.get("deployed_gen") or 0))
        self._changed()

    def offer_deployed(self, deployed: dict, gen: int) -> None:
        if gen > self.deployed_gen or self.deployed is None:
            self.deployed, self.deployed_gen = deployed, gen
            self._changed()

    def set_deployed(self, deployed: dict) -> None:
        self.deployed, self.deployed_gen = deployed, max(self.deployed_gen + 1, time.time_ns() // 1000)
        self._changed()  # replicas take a copy: the record outlives a restart of this actor

    def deregister(self, rid: str) -> None:
        if self.replicas.pop(rid, None) is not None:
            self._changed()

    def touch(self, rid: str) -> bool:
        r = self.replicas.get(rid)
        if r is None:
            return False
        r.seen = self.clock()
        return True

    def expire(self) -> list[str]:
        now = self.clock()
        dead = [rid for rid, r in self.replicas.items() if now - r.seen > EXPIRY_S]
        for rid in dead:
            del self.replicas[rid]
        if dead:
            self._changed()
        return dead

    def drop_dead(self, alive: set[str], snapshot_at: float) -> list[str]:
        """Drop the replicas whose actor is not in `alive` (the named actors alive at `snapshot_at`)."""
        dead = [rid for rid, r in self.replicas.items()
                if r.actor is not None and r.since < snapshot_at and r.actor not in alive]
        for rid in dead:
            log.info("replica %s of %s is dead: dropped (its limit share goes to the live replicas)", rid,
                     self.replicas[rid].model_id)
            del self.replicas[rid]
        if dead:
            self._changed()
        return dead

    def set_limits(self, limits: Limits) -> None:
        if limits != self.limits:
            self.limits = limits
            self._changed()

    def _gate_open(self, rid: str) -> bool:
        me = self.replicas[rid]
        if not me.gate_open and not self.rebuilding():  # an older replica may not have re-registered yet
            me.gate_open = not any(o.model_id == me.model_id and o.weights != me.weights and o.seq < me.seq
                                   for o in self.replicas.values())
            if me.gate_open:
                if me.swap:
                    self.events.append((me.model_id, "completed"))
                self._changed()  # cards follow the weights that now answer
        return me.gate_open

    def _targets(self) -> dict[str, tuple[int, float]]:
        ingress = sorted((r.seq, rid) for rid, r in self.replicas.items() if r.ingress)
        n = len(ingress)
        if not n:
            return {}
        slots = self.limits.max_concurrent_per_key or 0
        rate = self.limits.requests_per_minute_per_key or 0.0
        return {rid: (slots // n + (1 if i < slots % n else 0), rate / n) for i, (_, rid) in enumerate(ingress)}

    def view(self, rid: str) -> dict[str, Any]:
        """What replica `rid` must apply now. Records the grant: the sum of grants never exceeds the budget."""
        me = self.replicas[rid]
        out: dict[str, Any] = {"gate_open": self._gate_open(rid)}
        if me.ingress:
            target_slots, target_rate = self._targets().get(rid, (0, 0.0))
            others = [r for o, r in self.replicas.items() if o != rid and r.ingress]
            slots, rate = me.granted_slots, me.granted_rate
            if self.rebuilding():  # shares of replicas not yet re-registered are unknown: none may grow
                target_slots, target_rate = min(target_slots, slots), min(target_rate, rate)
            if self.limits.max_concurrent_per_key is not None:
                free = self.limits.max_concurrent_per_key - sum(r.granted_slots for r in others)
                me.granted_slots = max(0, min(target_slots, free))
                out["max_concurrent_per_key"] = me.granted_slots
            if self.limits.requests_per_minute_per_key is not None:
                free_rate = self.limits.requests_per_minute_per_key - sum(r.granted_rate for r in others)
                me.granted_rate = max(0.0, min(target_rate, free_rate))
                out["requests_per_minute_per_key"] = me.granted_rate
            if (slots, rate) != (me.granted_slots, me.granted_rate):
                self._changed()  # a replica waiting for this share to shrink looks again
        out["seq"] = me.seq
        out["deployed_gen"] = self.deployed_gen
        out["version"] = self.version
        return out

    def cards(self) -> dict[str, dict]:
        """Per model id, the card of the weights that answer now (the newest replica whose gate is open)."""
        best: dict[str, _Replica] = {}
        for r in self.replicas.values():
            if r.gate_open and (r.model_id not in best or r.seq > best[r.model_id].seq):
                best[r.model_id] = r
        return {m: dict(r.card) for m, r in best.items()}

    def live(self, model_id: str) -> list[dict]:
        """Every live replica of a model, oldest first: registration number, weights, whether it answers."""
        return [{"seq": r.seq, "weights": r.weights, "gate_open": r.gate_open}
                for r in sorted(self.replicas.values(), key=lambda r: r.seq) if r.model_id == model_id]


def live_actor_names() -> set[str]:
    """The name of every named actor alive in the cluster, any namespace: one GCS call, whatever the number.
    (Serve's replica names hold the app, deployment and a unique id; a replica does not learn its actor's
    namespace through a public API, so names alone are compared.)"""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}


class ControlActor:
    """Holds a ControlState; replicas long-poll `sync` and wake up whenever the state changes. Watches the
    registered replicas' actors, and counts swap events in the metrics."""

    def __init__(self, limits: dict, app_name: str = ""):
        import ray

        from serve.audit import log_to_stderr
        from serve.metrics import ServeMetrics

        log_to_stderr()
        self.state = ControlState(Limits(**limits))
        self.changed = asyncio.Condition()
        self.metrics = ServeMetrics(app_name)
        self.restarts = 0
        if ray.get_runtime_context().was_current_actor_reconstructed:
            self.restarts = 1
            self.state.restarted()
            log.warning("control plane of '%s' restarted: rebuilding its state from the replicas (%.0fs)", app_name,
                        REBUILD_S)
        self._watch: Optional[asyncio.Task] = None

    def _ensure_watch(self) -> None:
        if self._watch is None or self._watch.done():
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop())

    async def _watch_loop(self) -> None:
        was_rebuilding = self.state.rebuilding()
        while True:
            await asyncio.sleep(WATCH_S)
            before = self.state.version
            try:
                at = self.state.clock()
                self.state.drop_dead(await asyncio.to_thread(live_actor_names), at)
            except Exception as e:  # noqa: BLE001 - expiry still drops silent replicas
                log.warning("replica liveness check failed (%s)", type(e).__name__)
            if was_rebuilding and not self.state.rebuilding():
                was_rebuilding = False
                self.state._changed()  # held gates and shares are decided now
            await self._notify(before)

    async def _notify(self, before: int) -> None:
        for model, event in self.state.events:
            self.metrics.swap(model, event)
        self.state.events.clear()
        if self.state.version != before:
            async with self.changed:
                self.changed.notify_all()

    async def register(self, rid: str, model_id: str, weights: str, ingress: bool, card: dict,
                       actor: Optional[str] = None, held: Optional[dict] = None) -> None:
        self._ensure_watch()
        before = self.state.version
        self.state.register(rid, model_id, weights, ingress, card, actor=actor, held=held)
        await self._notify(before)

    async def deregister(self, rid: str) -> None:
        before = self.state.version
        self.state.deregister(rid)
        await self._notify(before)

    async def sync(self, rid: str, known: int, timeout: float = POLL_S, deployed_gen: int = -1) -> Optional[dict]:
        """The replica's view once it differs from version `known` (or after `timeout`); None if unknown.
        Carries the deployment record when the replica's copy (`deployed_gen`) is not the latest."""
        self._ensure_watch()
        before = self.state.version
        self.state.expire()
        if not self.state.touch(rid):
            return None
        await self._notify(before)
        if self.state.version == known:
            async with self.changed:
                try:
                    await asyncio.wait_for(self.changed.wait_for(lambda: self.state.version != known), timeout)
                except asyncio.TimeoutError:
                    pass
        if rid not in self.state.replicas:
            return None
        before = self.state.version
        view = self.state.view(rid)
        if self.state.deployed is not None and deployed_gen != self.state.deployed_gen:
            view["deployed"] = self.state.deployed
        await self._notify(before)
        return view

    async def set_limits(self, limits: dict) -> None:
        before = self.state.version
        self.state.set_limits(Limits(**limits))
        await self._notify(before)

    def cards(self) -> dict:
        return self.state.cards()

    def live(self, model_id: str) -> list:
        return self.state.live(model_id)

    def replicas(self) -> dict:
        """Every registered replica: model, whether ingress, registration number, gate, granted share."""
        return {rid: {"model_id": r.model_id, "ingress": r.ingress, "seq": r.seq, "gate_open": r.gate_open,
                      "granted_slots": r.granted_slots, "granted_rate": r.granted_rate,
                      "actor": r.actor}
                for rid, r in self.state.replicas.items()}

    def info(self) -> dict:
        return {"restarted": bool(self.restarts), "rebuilding": self.state.rebuilding(),
                "deployed_gen": self.state.deployed_gen, "replicas": len(self.state.replicas)}

    def last_seq(self) -> int:
        return self.state._seq

    async def set_deployed(self, deployed: dict) -> None:
        before = self.state.version
        self.state.set_deployed(deployed)
        await self._notify(before)

    def deployed(self) -> Optional[dict]:
        return self.state.deployed


def make_actor_class():
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=1000)(ControlActor)


_ACTOR_CLS = None


def get_control(app_name: str, limits: Optional[Limits] = None):
    """The app's control actor (created on first use; detached, so it outlives the process that deployed)."""
    global _ACTOR_CLS
    if _ACTOR_CLS is None:
        _ACTOR_CLS = make_actor_class()
    lim = limits or Limits()
    # DEFAULT: a replica that starts it (under `serve run`) must not put it in its own placement group, where it
    # would die with that replica
    return _ACTOR_CLS.options(name=actor_name(app_name), namespace=NAMESPACE, lifetime="detached",
                              get_if_exists=True, scheduling_strategy="DEFAULT").remote(lim.__dict__, app_name)


def lookup_named(name: str):
    """One of our detached actors (control plane, audit writer) by name, or None."""
    import ray

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def kill_named(name: str) -> None:
    import ray

    actor = lookup_named(name)
    if actor is not None:
        ray.kill(actor, no_restart=True)


def lookup_control(app_name: str):
    """The running app's control actor, or None."""
    return lookup_named(actor_name(app_name))


def kill_control(app_name: str) -> None:
    kill_named(actor_name(app_name))


class ControlClient:
    """A replica's side: registers, keeps one long-poll open, opens the swap gate and applies limit shares. It keeps
    what the control actor would need to rebuild its state (its registration number, gate, share, the latest
    deployment record) and hands it over when it registers again after a restart of that actor."""

    def __init__(self, app_name: str, rid: str, model_id: str, weights: str, ingress: bool, card: dict,
                 limits: Optional[Limits] = None, on_limits: Optional[Callable[[dict], None]] = None,
                 actor: Optional[str] = None):
        self.app_name, self.rid, self.model_id, self.weights = app_name, rid, model_id, weights
        self.ingress, self.card, self.limits, self.on_limits = ingress, card, limits, on_limits
        self.actor = actor
        self.gate = asyncio.Event()
        self._actor = None
        self._task: Optional[asyncio.Task] = None
        self._version = -1
        self._gated_since = time.monotonic()
        self._held: dict[str, Any] = {}  # seq, granted shares, deployed (+gen) as last seen
        self.registrations = 0

    async def _register(self) -> None:
        self._actor = get_control(self.app_name, self.limits)
        held = dict(self._held, gate_open=self.gate.is_set()) if self._held else None
        await self._actor.register.remote(self.rid, self.model_id, self.weights, self.ingress, self.card,
                                          self.actor, held)
        self.registrations += 1
        if self.limits is not None and self.ingress:
            await self._actor.set_limits.remote(self.limits.__dict__)

    async def start(self) -> None:
        await self._register()
        await self._apply(await self._actor.sync.remote(self.rid, -1, 0, -1))
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _apply(self, view: Optional[dict]) -> None:
        if view is None:  # the actor restarted or dropped us: register again
            await self._register()
            self._version = -1
            return
        self._version = view["version"]
        self._held["seq"] = view.get("seq")
        if "deployed" in view:
            self._held["deployed"], self._held["deployed_gen"] = view["deployed"], view.get("deployed_gen", 0)
        if view["gate_open"] and not self.gate.is_set():
            waited = time.monotonic() - self._gated_since
            if waited > 1.0:
                log.info("model %s: serving weights %s (waited %.1fs for the previous weights to drain)",
                         self.model_id, self.weights, waited)
            self.gate.set()
        if self.ingress:
            shares = {k: v for k, v in view.items() if k.endswith("_per_key")}
            self._held["granted_slots"] = shares.get("max_concurrent_per_key", 0)
            self._held["granted_rate"] = shares.get("requests_per_minute_per_key", 0.0)
            if self.on_limits is not None:
                self.on_limits(shares)

    async def _loop(self) -> None:
        while True:
            try:
                await self._apply(await self._actor.sync.remote(self.rid, self._version, POLL_S,
                                                                self._held.get("deployed_gen", -1)))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep the last state; the actor comes back (max_restarts)
                log.warning("control plane unreachable (%s); keeping the current gate and limit shares",
                            type(e).__name__)
                await asyncio.sleep(1.0)
                try:
                    await self._register()
                except Exception:  # noqa: BLE001
                    pass

    async def cards(self) -> dict[str, dict]:
        return await self._actor.cards.remote()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._actor is not None:
            try:
                await asyncio.wait_for(self._actor.deregister.remote(self.rid), 10)
            except Exception:  # noqa: BLE001 - expiry drops us anyway
                pass
