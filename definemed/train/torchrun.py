"""CPT steps launched by `torchrun`, with no Ray: rank, world size and the rendezvous come from torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

The cpt stage's own pieces run here (FSDP2 `parallelize` with the bf16 policy, the packed loss, `step.train_step`,
the lr schedule, MFU), on a randomly initialised Qwen2 and random packed token rows: nothing is downloaded and
only torch and transformers are imported, so it runs on a GPU machine that has nothing else
(scripts/gpu_check.sh --torch-only). Each rank trains on the same few rows every step, so a working step
memorises them and the loss falls. Rank 0 writes a JSON summary.

    torchrun --standalone --nproc-per-node 1 -m definemed.train.torchrun --device cuda --shape qwen2.5-0.5b
    torchrun --standalone --nproc-per-node 2 -m definemed.train.torchrun --device cpu --shape tiny   # CI (gloo)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

# Qwen2.5-0.5B: 494M parameters (tied embeddings).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                         rope_theta=1_000_000.0, max_position_embeddings=32768),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=256, vocab_size=4096, tie_word_embeddings=True, max_position_embeddings=4096),
}


@dataclass
class Row:
    input_ids: Any
    position_ids: Any
    labels: Any


def packed_batch(vocab: int, seq_len: int, gen):
    """One packed row: documents of random lengths (mean ~600 tokens), positions restarting per document."""
    import torch

    from definemed.train.loss import packed_labels

    lens, left = [], seq_len
    while left > 0:
        n = min(left, int(torch.randint(64, 1200, (1,), generator=gen)))
        lens.append(n)
        left -= n
    ids = torch.randint(3, vocab, (1, seq_len), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    return ids, pos, packed_labels(ids, pos, seq_len)


def build(shape: str, device, attn: str):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**SHAPES[shape])
    torch.manual_seed(0)  # every rank starts from the same weights
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    return model, config


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--mixed-precision", choices=["bf16", "fp32", "auto"], default="bf16")
    ap.add_argument("--attn", default="auto", choices=["auto", "sdpa", "flash_attention_2"])
    ap.add_argument("--out", default=None, help="rank 0 writes the summary JSON here")
    args = ap.parse_args(argv)

    import torch
    import torch.distributed as dist

    from definemed.train.lr_scheduler import build_lr_scheduler
    from definemed.train.metrics import device_peak_flops, flops_per_token
    from definemed.train.parallelize import build_mesh, decoder_layers, parallelize
    from definemed.train.step import train_step
    from definemed.train.weights import choose_attention

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])  # set by torchrun
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        t0 = time.perf_counter()
        attn, why = choose_attention(args.attn, device.type)
        model, config = build(args.shape, device, attn)
        n_params = sum(p.numel() for p in model.parameters())
        fpt = flops_per_token(config, n_params, model.get_input_embeddings().weight.numel(), args.seq_len)
        seen_dtypes: set[str] = set()
        decoder_layers(model)[0].mlp.down_proj.register_forward_hook(
            lambda m, i, o: seen_dtypes.add(str(o.dtype)))  # what the matmuls really compute in
        parallelize(model, build_mesh(device.type, world, None), args.mixed_precision)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                      fused=device.type == "cuda")
        scheduler = build_lr_scheduler(optimizer, 2, args.steps, 0.1)
        gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own rows, as data parallelism has
        micro = [Row(*packed_batch(config.vocab_size, args.seq_len, gen)) for _ in range(args.grad_accum)]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        setup_s = time.perf_counter() - t0
        losses, times = [], []
        for _ in range(args.steps):
            t = time.perf_counter()
            res = train_step(model, optimizer, scheduler, micro, device=device, world=world, max_grad_norm=1.0)
            sync()
            times.append(time.perf_counter() - t)
            losses.append(res["loss"])
        tokens_s = world * args.grad_accum * args.seq_len / statistics.median(times)
        summary = {"world_size": world, "backend": dist.get_backend(), "device": str(device),
                   "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "shape": args.shape, "params": n_params, "seq_len": args.seq_len,
                   "mixed_precision": args.mixed_precision, "compute_dtypes": sorted(seen_dtypes),
                   "attention": {"used": attn, "why": why}, "steps": args.steps, "losses": losses,
                   "first_loss": losses[0], "final_loss": losses[-1], "setup_s": setup_s,
                   "median_step_s": statistics.median(times), "tokens_per_s": tokens_s}
        if device.type == "cuda":
            summary["mfu"] = fpt * tokens_s / (device_peak_flops("cuda", 0.0) * world)
            summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        if rank == 0:
            if args.out:
                from definemed.io import atomic_write_json

                atomic_write_json(args.out, summary)
            print(json.dumps({k: v for k, v in summary.items() if k != "losses"}), flush=True)
        return summary
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
