"""Peak host RSS of loading the CPT base model: every worker reads it (before) vs rank 0 reads it once (after).

before: what cpt did until now: every rank `from_pretrained(..., dtype=float32)` in full, then FSDP2 shards it.
after:  definemed.train.weights.load_base_model: every rank builds the model on the meta device, FSDP2 shards it,
        rank 0 alone reads the checkpoint and set_model_state_dict(broadcast_from_rank0=True) fills the shards.

Both run the same FSDP2 sharding (definemed.train.parallelize) over gloo with W CPU worker processes, on random
Qwen2-shaped models saved as bf16 safetensors (like real checkpoints). Per worker: RSS before loading (Python,
torch, transformers) and the peak after (ru_maxrss). Per job: the peak of the workers' summed RSS, sampled every
20 ms by the parent. "model part" = peak minus the pre-load baseline. The claim to check: with `after`, the job's
model part grows with the model size, not with workers x model size.

    python benchmarks/bench_cpt_load_rss.py                               # 2 and 4 workers, ~120M and ~300M params
    python benchmarks/bench_cpt_load_rss.py --layers 2,4 --workers 2,4    # quick (tiny) check that it works
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, intermediate_size=2816,
             vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=4096)


def make_model(layers: int, root: Path) -> tuple[Path, int]:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    path = root / f"qwen2-{layers}l"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(num_hidden_layers=layers, **SHAPE), dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, safe_serialization=True)
    del model
    return path, n


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def worker(rank: int, world: int, mode: str, model_path: str, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM  # noqa: F401 - imported before the baseline, like in cpt

    from definemed.train.cpt import ParallelConfig
    from definemed.train.parallelize import build_mesh, parallelize
    from definemed.train.weights import load_base_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = build_mesh("cpu", world, None)
    base = _rss()
    dist.barrier()
    t0 = time.perf_counter()
    if mode == "before":
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
        parallelize(model, mesh, "fp32")
    else:
        model, _ = load_base_model(model_path, mesh, torch.device("cpu"), rank,
                                   ParallelConfig(num_workers=world, mixed_precision="fp32"))
    dist.barrier()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    w = next(model.parameters()).detach().to_local()
    Path(out, f"{rank}.json").write_text(json.dumps({"rank": rank, "baseline": base, "peak": peak, "after": _rss(),
                                                     "seconds": seconds, "checksum": float(w.float().sum())}))
    dist.destroy_process_group()


def measure(mode: str, world: int, model_path: Path, port: int) -> dict:
    import psutil
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(worker, args=(world, mode, str(model_path), port, out), nprocs=world, join=False,
                                 start_method="spawn")
        procs = [psutil.Process(p.pid) for p in ctx.processes]
        job_peak, stop = [0], threading.Event()

        def sample():
            while not stop.is_set():
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                job_peak[0] = max(job_peak[0], total)
                time.sleep(0.02)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        while not ctx.join():
            pass
        stop.set()
        t.join()
        ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(world)]
    base = sum(r["baseline"] for r in ranks)
    return {"mode": mode, "workers": world, "per_worker_peak": [r["peak"] for r in ranks],
            "per_worker_model_part": [r["peak"] - r["baseline"] for r in ranks], "job_peak": job_peak[0],
            "job_baseline": base, "job_model_part": job_peak[0] - base, "load_s": max(r["seconds"] for r in ranks)}


def gib(x: float) -> str:
    return f"{x / 2**30:6.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="8,24", help="model sizes as decoder layer counts (8 ~ 120M, 24 ~ 300M)")
    ap.add_argument("--workers", default="2,4")
    ap.add_argument("--out", default="outputs/bench/cpt_load_rss.json")
    args = ap.parse_args()
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        port = 29600
        for layers in [int(x) for x in args.layers.split(",")]:
            path, n = make_model(layers, Path(tmp))
            fp32 = 4 * n
            for world in [int(x) for x in args.workers.split(",")]:
                for mode in ("before", "after"):
                    port += 1
                    r = measure(mode, world, path, port)
                    r.update(params=n, fp32_bytes=fp32, layers=layers)
                    rows.append(r)
                    print(f"{n / 1e6:6.0f}M params ({gib(fp32)} GiB fp32)  {world} workers  {mode:6s}: job model part "
                          f"{gib(r['job_model_part'])} GiB = {r['job_model_part'] / fp32:4.1f} x fp32 model; max per "
                          f"worker {gib(max(r['per_worker_model_part']))} GiB; load {r['load_s']:.1f} s", flush=True)
    print("\nhost RSS attributable to the model (peak minus the pre-load baseline), in multiples of the fp32 model:")
    print(f"{'params':>8} {'workers':>7} {'before/job':>11} {'after/job':>10} {'after/before':>13}")
    for layers in dict.fromkeys(r["layers"] for r in rows):
        for world in dict.fromkeys(r["workers"] for r in rows):
            b = next(r for r in rows if r["layers"] == layers and r["workers"] == world and r["mode"] == "before")
            a = next(r for r in rows if r["layers"] == layers and r["workers"] == world and r["mode"] == "after")
            print(f"{b['params'] / 1e6:7.0f}M {world:7d} {b['job_model_part'] / b['fp32_bytes']:10.1f}x "
                  f"{a['job_model_part'] / a['fp32_bytes']:9.1f}x {a['job_model_part'] / b['job_model_part']:12.2f}x")
    print(f"load average (1/5/15 min) at start: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; now: "
          f"{os.getloadavg()[0]:.1f}" + ("  (busy machine: provisional numbers)" if load[0] >= 2 else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "cpt_load_rss", "load_avg": load, "rows": rows}, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
