"""Check a plan on a live cluster: create each phase's real placement groups, schedule a trivial actor into each
request's first group, record where Ray put everything, release it all. Nothing but the probe actor runs (no CUDA,
no model), so this is safe on a cluster that other jobs use, as long as it has the resources free.
"""
from __future__ import annotations

import os
import time
from typing import Any

from definemed.plan.requests import CORE, Request, StageRequests


def _probe_cls():
    import ray

    @ray.remote
    class Probe:
        """Reports where Ray placed it and which accelerators Ray handed it."""

        def where(self) -> dict[str, Any]:
            ctx = ray.get_runtime_context()
            return {"node_id": ctx.get_node_id(), "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])],
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}

    return Probe


def _actor_options(bundle: dict[str, float]) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": bundle.get("CPU", 0.0), "num_gpus": bundle.get("GPU", 0.0)}
    if bundle.get("memory"):
        opts["memory"] = int(bundle["memory"])
    custom = {k: v for k, v in bundle.items() if k not in CORE}
    if custom:
        opts["resources"] = custom
    return opts


def reserve_phase(requests: list[Request], timeout_s: float) -> dict[str, Any]:
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    Probe = _probe_cls()
    groups: list[tuple[Request, Any]] = []
    actors = []
    out: dict[str, Any] = {"ok": True, "units": [], "error": ""}
    try:
        for r in requests:
            for _ in range(r.min_units):
                groups.append((r, placement_group(r.bundles, strategy=r.strategy)))
        ready, pending = ray.wait([pg.ready() for _, pg in groups], num_returns=len(groups), timeout=timeout_s)
        if pending:
            out["ok"] = False
            out["error"] = f"{len(pending)} of {len(groups)} placement groups not ready after {timeout_s:.0f} s"
            return out
        probed: dict[str, Any] = {}
        for r, pg in groups:  # one probe actor per request, in its first group's first bundle
            if r.key not in probed:
                a = Probe.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
                                  **_actor_options(r.bundles[0])).remote()
                actors.append(a)
                probed[r.key] = a.where.remote()
        where = dict(zip(probed, ray.get(list(probed.values()), timeout=timeout_s)))
        first: set[str] = set()
        for r, pg in groups:
            table = placement_group_table(pg)
            unit = {"key": r.key, "gpus_per_unit": r.gpus_per_unit,
                    "bundle_nodes": [table["bundles_to_node_id"][i] for i in range(len(r.bundles))]}
            if r.key not in first:
                unit["probe"] = where[r.key]
                first.add(r.key)
            out["units"].append(unit)
        return out
    except Exception as e:  # noqa: BLE001 - report, then release what was taken
        out["ok"] = False
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    finally:
        for a in actors:
            ray.kill(a)
        for _, pg in groups:
            remove_placement_group(pg)


def reserve_stage(sreq: StageRequests, timeout_s: float = 120.0) -> dict[str, Any]:
    phases = []
    for p in sreq.phases():
        t0 = time.monotonic()
        res = reserve_phase(sreq.in_phase(p), timeout_s)
        res.update(phase=p, seconds=round(time.monotonic() - t0, 1))
        phases.append(res)
    return {"ok": all(p["ok"] for p in phases), "phases": phases}
