"""The audit trail's cost per request, A/A/B: two apps of ours with the audit trail off and one with it on.

bench_serve.py measures audit on vs off beside `vllm serve` and direct ingress: four servers on the machine,
and on 2 cores its audit ratios scattered more than any cost they could show (0.37x-1.28x between rounds). Here
three apps of ours run on the same weights through the same Serve proxy, each with its own replica and engine:
"a" and "c" without audit, "b" with `audit.dir` set. They are measured in turn per concurrency level, who goes
first rotating each round. The a/c ratio is the noise floor: the audit trail costs something only where b falls
below both a and c by more than they differ from each other.

    python benchmarks/bench_serve_audit.py --model real://gemma-3-270m [--rounds 3] [--out outputs/bench/serve_audit.json]

Baseline: the same endpoint with the audit trail off (the mean of a and c). After the run the audited app's
chain is verified and its lines counted (one per request, warm-up included).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_serve as bs  # noqa: E402  the same request shapes, levels, model resolution and load generator

APPS = {"a": False, "b": True, "c": False}  # name -> audit on


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="real://gemma-3-270m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--out", default="outputs/bench/serve_audit.json")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model_dir = bs.resolve(args.model)
    except bs.UnknownModel as e:
        print(e, file=sys.stderr)
        return 2
    from serve import ServeConfig, launch
    from serve.audit import verify
    from serve.ray_private import running_http_options

    key = secrets.token_urlsafe(32)
    os.environ["DEFINEMED_BENCH_KEY"] = key
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
          "(final numbers need < 2)", flush=True)
    path, body = bs.request_body("bench", bs.uses_chat(model_dir), args.max_tokens)
    audit_dir = tempfile.TemporaryDirectory(prefix="bench-audit-")
    common = dict(port=0, api_key_env="DEFINEMED_BENCH_KEY",
                  models=[{"id": "bench", "model": model_dir, "engine": {"max_model_len": args.max_model_len},
                           "max_ongoing_requests": 256}],
                  limits={"max_concurrent_per_key": 256}, access_log=True, ready_timeout_s=1800)
    eps, runs = [], {name: [] for name in APPS}
    try:
        for name, audited in APPS.items():
            extra = {"audit": {"dir": audit_dir.name}} if audited else {}
            eps.append(launch(ServeConfig(app_name=f"bench-audit-{name}", route_prefix=f"/{name}", **common, **extra)))
        proxy = f"http://127.0.0.1:{running_http_options().port}"
        targets = {name: f"{proxy}/{name}/v1" for name in APPS}
        for url in targets.values():  # warm-up, not measured
            asyncio.run(bs.measure(url, key, path, body, 4, 8))
        names = list(APPS)
        for rnd in range(args.rounds):
            for conc, n in bs.LEVELS.items():
                for name in names[rnd % 3:] + names[:rnd % 3]:
                    r = bs.measured_run(targets[name], key, path, body, conc, n, rnd)
                    runs[name].append(r)
                    print(f"  round {rnd} {name} (audit {'on ' if APPS[name] else 'off'}) c={conc:2d}: "
                          f"{r['rps']:6.1f} req/s  p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  "
                          f"errors {r['errors'] or 0}  load {r['load1']:.1f}", flush=True)
    finally:
        for ep in reversed(eps):
            ep.shutdown()  # deleting an app waits for its replicas' last audit lines
    chain = verify([audit_dir.name])
    audit_dir.cleanup()
    rows = summarize(runs)
    sent = sum(r["requests"] for r in runs["b"]) + 8
    print(f"\nbench_serve_audit [{args.model}] {Path(model_dir).name}, {path}: three apps of ours through one proxy; "
          "a, c audit off, b audit on. ratio = req/s per round, median [min-max]")
    for s in rows:
        print(f"  c={s['concurrency']:>2}: b / mean(a, c) {fmt(s['b_vs_off'])}, p50 {s['b_p50_delta_ms']:+.1f} ms;"
              f" noise floor a / c {fmt(s['a_vs_c'])}")
    print(f"  audited app's chain after shutdown: {chain.lines} lines for {sent} requests sent"
          f" ({'none lost' if chain.lines >= sent else f'{sent - chain.lines} MISSING'}), verified: {chain.ok}"
          + (f" ({chain.error})" if chain.error else ""))
    load_end = os.getloadavg()
    print(f"load average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}"
          + ("" if load_start[0] < 2 else "  -- busy at the start: these numbers are provisional"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "load_avg_start": load_start, "load_avg_end": load_end,
                               "rounds": args.rounds, "summary": rows, "runs": runs,
                               "chain": {"lines": chain.lines, "sent": sent, "verified": chain.ok}}, indent=2),
                   encoding="utf-8")
    print(f"results: {out}")
    return 0


def fmt(r: dict) -> str:
    return f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]"


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """Per concurrency and round: b over the mean of a and c (audit cost), and a over c (the noise floor)."""
    rows = []
    spread = (lambda xs: {"median": statistics.median(xs), "min": min(xs), "max": max(xs)})
    for conc in bs.LEVELS:
        by = {name: {r["round"]: r for r in rs if r["concurrency"] == conc} for name, rs in runs.items()}
        rounds = sorted(by["b"])
        off = {k: (by["a"][k]["rps"] + by["c"][k]["rps"]) / 2 for k in rounds}
        rows.append({"concurrency": conc,
                     "b_vs_off": spread([by["b"][k]["rps"] / off[k] for k in rounds]),
                     "a_vs_c": spread([by["a"][k]["rps"] / by["c"][k]["rps"] for k in rounds]),
                     "b_p50_delta_ms": statistics.median(
                         by["b"][k]["p50_ms"] - (by["a"][k]["p50_ms"] + by["c"][k]["p50_ms"]) / 2 for k in rounds)})
    return rows


if __name__ == "__main__":  # vLLM spawns workers
    sys.exit(main())
