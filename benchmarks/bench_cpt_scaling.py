"""CPT data-parallel scaling on CPU: tokens/s with 1 Ray Train worker vs 2, as a scaling efficiency.

Weak scaling: every worker does the same work per step (micro batch 1 x grad_accum x seq_len), so 2 workers
process twice the tokens per step. Both runs use the same tiny model, packed sample, code path (FSDP2 over gloo)
and machine, in the same invocation; the 1-worker run is the baseline.

    python benchmarks/bench_cpt_scaling.py [--model tiny://qwen2] [--steps 10] [--out outputs/bench/cpt_scaling.json]

Scaling efficiency = tokens/s(2 workers) / (2 x tokens/s(1 worker)); 1.0 is perfect. On a 2-core laptop the two
workers share the cores with Ray itself, so expect well below 1. Tiny random model: the absolute tokens/s
measure framework overhead more than model compute; the ratio is the number to read.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_once(packed: Path, model: str, workers: int, steps: int, seq_len: int, accum: int, out: Path) -> dict:
    from definemed.models import resolve_model
    from definemed.train.cpt import CptConfig, build_trainer
    from definemed.train.metrics import read_jsonl

    cfg = CptConfig.model_validate(dict(
        output_dir=str(out), model=model, packed=str(packed),
        parallel=dict(num_workers=workers, cpus_per_worker=1),
        optim=dict(lr=1e-3, warmup_steps=1),
        train=dict(seq_len=seq_len, global_batch_tokens=seq_len * accum * workers, max_steps=steps),
        checkpoint=dict(every_steps=10_000, keep=1, max_failures=0)))
    t0 = time.perf_counter()
    build_trainer(cfg, resolve_model(model)).fit()
    wall = time.perf_counter() - t0
    rows = read_jsonl(out / "metrics.jsonl")
    timed = rows[2:] if len(rows) > 4 else rows[1:]  # the first steps include allocator / thread warm-up
    return {"workers": workers, "steps": len(rows), "timed_steps": len(timed),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "tokens_per_s_per_worker": statistics.median(r["tokens_per_s_per_worker"] for r in timed),
            "mfu_cpu_estimate": statistics.median(r["mfu"] for r in timed),
            "final_loss": rows[-1]["loss"], "wall_s_incl_startup": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny://qwen2")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--out", default="outputs/bench/cpt_scaling.json")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pyarrow.parquet as pq

    from definemed.config import RayConfig
    from definemed.data.sample import SAMPLE_WEB_DIR
    from definemed.ray_utils import init_ray, shutdown_ray
    from definemed.train.pack import pack_local

    init_ray(RayConfig(num_cpus=4))
    try:
        with tempfile.TemporaryDirectory(prefix="bench-cpt-") as tmp:
            packed = pack_local(pq.read_table(SAMPLE_WEB_DIR, columns=["text"]), args.model, Path(tmp) / "pack",
                                args.seq_len)
            results = [run_once(packed, args.model, w, args.steps, args.seq_len, args.grad_accum,
                                Path(tmp) / f"cpt{w}") for w in (1, 2)]
    finally:
        shutdown_ray()
    one, two = results
    eff = two["tokens_per_s"] / (2 * one["tokens_per_s"])
    report = {"benchmark": "cpt_scaling_cpu", "model": args.model, "seq_len": args.seq_len,
              "grad_accum_per_worker": args.grad_accum, "baseline": "1 worker", "runs": results,
              "speedup_2_vs_1": two["tokens_per_s"] / one["tokens_per_s"], "scaling_efficiency": eff,
              "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
              "note": "tiny random model; CPU MFU uses the configured cpu_peak_tflops estimate"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nCPT scaling on CPU ({args.model}, seq_len {args.seq_len}, grad_accum {args.grad_accum}/worker, "
          f"{os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f})")
    for r in results:
        print(f"  {r['workers']} worker(s): {r['tokens_per_s']:8.0f} tokens/s  "
              f"({r['tokens_per_s_per_worker']:.0f}/worker, CPU MFU estimate {100 * r['mfu_cpu_estimate']:.1f}%)")
    print(f"  speedup 2 vs 1 worker (baseline): {report['speedup_2_vs_1']:.2f}x   scaling efficiency: {eff:.2f}")
    print(f"  -> {out}")


if __name__ == "__main__":
    main()
