"""The serving app's own Prometheus metrics, through `ray.util.metrics`: Ray exports them on every node's metrics
port (`--metrics-export-port`, `ray.nodes()[i]["MetricsExportPort"]`) with the prefix `ray_`, beside Serve's own
(`ray_serve_*`) and, with `log_engine_metrics`, vLLM's engine metrics (`ray_vllm_*`).

Label values are bounded: key ids (one per configured key), HTTP statuses, the fixed routes, model ids.
Outside a Ray worker (unit tests) every call is a no-op.
"""
from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger("definemed.serve")

# name (Ray prepends "ray_"), description, tag keys
SPECS = {
    "requests": ("definemed_serve_requests_total", "Requests the endpoint answered, by key id, route and status "
                 "(refused ones included)", ("application", "key_id", "route", "status")),
    "limited": ("definemed_serve_rate_limited_total", "429 answers by key id and which limit refused",
                ("application", "key_id", "reason")),
    "audit_failures": ("definemed_serve_audit_write_failures_total", "Audit lines not (yet) written: a batch the "
                       "writer did not take (retried) or records dropped", ("application", "reason")),
    "audit_lines": ("definemed_serve_audit_lines_total", "Audit lines appended to the chain", ("application",)),
    "swaps": ("definemed_serve_swap_events_total", "Weight swaps per model: started (a replica with new weights "
              "registered) and completed (it answers, the old weights have drained)", ("application", "model", "event")),
    "key_reloads": ("definemed_serve_key_reloads_total", "Key file reloads by result (ok, error)",
                    ("application", "result")),
}


class ServeMetrics:
    def __init__(self, application: str):
        self.application = application
        self._m: Optional[dict] = None

    def _metrics(self) -> dict:
        if self._m is None:
            self._m = {}
            try:
                import ray
                from ray.util.metrics import Counter

                if ray.is_initialized():
                    self._m = {k: Counter(name, description=desc, tag_keys=tags)
                               for k, (name, desc, tags) in SPECS.items()}
            except Exception as e:  # noqa: BLE001 - metrics never break serving
                log.warning("metrics unavailable: %s", type(e).__name__)
        return self._m

    def _inc(self, kind: str, value: float = 1.0, **tags: str) -> None:
        m = self._metrics().get(kind)
        if m is not None:
            m.inc(value, tags={"application": self.application, **tags})

    def request(self, key_id: Optional[str], route: str, status: int) -> None:
        self._inc("requests", key_id=key_id or "none", route=route, status=str(status))

    def limited(self, key_id: str, reason: str) -> None:
        self._inc("limited", key_id=key_id, reason=reason)

    def audit_failure(self, reason: str, n: int = 1) -> None:
        self._inc("audit_failures", float(n), reason=reason)

    def audit_lines(self, n: int) -> None:
        self._inc("audit_lines", float(n))

    def swap(self, model: str, event: str) -> None:
        self._inc("swaps", model=model, event=event)

    def key_reload(self, result: str) -> None:
        self._inc("key_reloads", result=result)


def metrics_export_urls() -> list[str]:
    """Every alive node's Prometheus endpoint (what a scrape config targets)."""
    import ray

    return sorted(f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes()
                  if n.get("Alive") and n.get("MetricsExportPort"))
