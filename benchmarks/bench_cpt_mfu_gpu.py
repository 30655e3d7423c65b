"""MFU of the CPT train step for a ~0.5B Qwen2-shaped model (Qwen2.5-0.5B shape) on one GPU. Target: >= 40% on H100.

Same code as the cpt stage: FSDP2 `fully_shard` per decoder layer then root (mesh 1x1), bf16 MixedPrecisionPolicy,
packed 4096-token sequences with position ids restarting per document (flash-attention varlen when installed),
micro batch 1, AdamW, grad clipping. Random weights and tokens: speed does not depend on their values.

    python benchmarks/bench_cpt_mfu_gpu.py [--seq-len 4096] [--steps 20] [--ac] [--out outputs/bench/cpt_mfu_gpu.json]
    python benchmarks/bench_cpt_mfu_gpu.py --cpu-dry-run     # exercise the code path on CPU with a tiny shape

MFU = FLOPs/token (6N + 12*L*H*Dh*T, PaLM/torchtitan) x tokens/s / dense bf16 peak (H100 SXM 989 TFLOP/s).
Baseline measured in the same run: a large bf16 matmul's TFLOP/s on the same GPU (what the device really
sustains); MFU is printed against both. Without a CUDA GPU the script says so and exits 0 (nothing measured).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from definemed.train.torchrun import SHAPES, packed_batch  # noqa: E402  (the torchrun CPT check's shapes and rows)

TARGET_MFU = 0.40
QWEN2_0_5B, TINY = SHAPES["qwen2.5-0.5b"], SHAPES["tiny"]


def matmul_tflops(device, dtype, n: int = 8192, iters: int = 20) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - t) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--ac", action="store_true", help="activation checkpointing")
    ap.add_argument("--attn", default="auto", choices=["auto", "sdpa", "flash_attention_2"])
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny shape on CPU: checks the code path only")
    ap.add_argument("--out", default="outputs/bench/cpt_mfu_gpu.json")
    args = ap.parse_args()

    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("SKIPPED: no CUDA GPU on this machine. bench_cpt_mfu_gpu measures the MFU of a ~0.5B Qwen2-shaped "
              "model on one H100 (target >= 40%); run it on a GPU node:\n"
              "    python benchmarks/bench_cpt_mfu_gpu.py\n"
              "(`--cpu-dry-run` exercises the same code path on CPU with a tiny shape; it measures nothing useful.)")
        return

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, Qwen2Config

    from definemed.train.loss import forward_logits, loss_sum
    from definemed.train.metrics import device_peak_flops, flops_per_token
    from definemed.train.parallelize import build_mesh, parallelize
    from definemed.train.weights import choose_attention

    device_type = "cpu" if args.cpu_dry_run else "cuda"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo" if args.cpu_dry_run else "nccl", rank=0, world_size=1)
    try:
        device = torch.device(device_type)
        if device_type == "cuda":
            torch.cuda.set_device(0)
        shape = TINY if args.cpu_dry_run else QWEN2_0_5B
        seq_len = min(args.seq_len, 256) if args.cpu_dry_run else args.seq_len
        attn, _ = choose_attention(args.attn, device_type)
        config = Qwen2Config(**shape)
        torch.manual_seed(0)
        with device:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
        model.config.use_cache = False
        n_params = sum(p.numel() for p in model.parameters())
        fpt = flops_per_token(config, n_params, model.get_input_embeddings().weight.numel(), seq_len)
        parallelize(model, build_mesh(device_type, 1, None), "auto", args.ac)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=device_type == "cuda")
        gen = torch.Generator().manual_seed(0)
        batches = [packed_batch(config.vocab_size, seq_len, gen) for _ in range(4)]

        def step(i: int) -> float:
            for m in range(args.grad_accum):
                ids, pos, lab = (t.to(device, non_blocking=True) for t in batches[(i + m) % len(batches)])
                ls, n = loss_sum(forward_logits(model, ids, pos), lab)
                (ls / n).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(ls.detach() / n)

        sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
        steps = 2 if args.cpu_dry_run else args.steps
        for i in range(0 if args.cpu_dry_run else args.warmup):
            step(i)
        sync()
        times = []
        for i in range(steps):
            t = time.perf_counter()
            loss = step(i)
            sync()
            times.append(time.perf_counter() - t)
        tokens = seq_len * args.grad_accum
        tps = tokens / statistics.median(times)
        achieved = fpt * tps
        if args.cpu_dry_run:
            print(f"CPU dry run OK: {n_params / 1e6:.1f}M params, attn={attn}, {tps:.0f} tokens/s, loss {loss:.3f} "
                  "(no MFU: not a GPU measurement)")
            return
        peak = device_peak_flops("cuda", 0.0)
        mm = matmul_tflops(device, torch.bfloat16)
        mfu = achieved / peak
        report = {"benchmark": "cpt_mfu_gpu", "gpu": torch.cuda.get_device_name(), "params": n_params,
                  "seq_len": seq_len, "grad_accum": args.grad_accum, "attn": attn, "activation_checkpointing": args.ac,
                  "tokens_per_s": tps, "flops_per_token": fpt, "achieved_tflops": achieved / 1e12,
                  "peak_tflops": peak / 1e12, "mfu": mfu, "baseline_matmul_tflops": mm,
                  "fraction_of_matmul_baseline": achieved / 1e12 / mm, "target_mfu": TARGET_MFU,
                  "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30, "final_loss": loss}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nCPT train step, Qwen2-shaped {n_params / 1e6:.0f}M params on {report['gpu']} "
              f"(seq_len {seq_len}, attn {attn}, AC {args.ac})")
        print(f"  {tps:,.0f} tokens/s -> {achieved / 1e12:.1f} TFLOP/s model FLOPs")
        print(f"  MFU {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s dense bf16 peak "
              f"(target >= {100 * TARGET_MFU:.0f}%: {'met' if mfu >= TARGET_MFU else 'NOT met'})")
        print(f"  baseline bf16 8k matmul on this GPU: {mm:.0f} TFLOP/s; the train step reaches "
              f"{100 * report['fraction_of_matmul_baseline']:.0f}% of it")
        print(f"  -> {out}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
