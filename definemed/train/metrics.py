"""Training metrics: loss, tokens/s (total and per worker) and MFU, logged as JSON lines, CSV and a loss-curve PNG.

MFU = achieved model FLOP/s / peak FLOP/s of the devices. FLOPs per token follow the PaLM/torchtitan estimate,
6 * (parameters doing matmuls) + 12 * layers * heads * head_dim * seq_len; the attention term counts the full
packed context, so with short packed documents it overstates the attention work a little. GPU peaks are the
vendors' dense bf16 numbers; the CPU peak is a configured estimate (`cpu_peak_tflops`), so CPU MFU is indicative
only.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}

METRICS_FILE = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
BATCHES_FILE = "batches.jsonl"
LOSS_PNG = "loss_curve.png"


def flops_per_token(model_config, num_params: int, embedding_params: int, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token."""
    c = model_config
    hidden = c.hidden_size
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    matmul_params = num_params - embedding_params
    if getattr(c, "tie_word_embeddings", False):
        matmul_params += c.vocab_size * hidden  # the tied lm_head still does a vocab x hidden matmul
    return 6.0 * matmul_params + 12.0 * c.num_hidden_layers * heads * head_dim * seq_len


def device_peak_flops(device_type: str, cpu_peak_tflops: float, gpu_peak_tflops: float | None = None) -> float:
    """Peak FLOP/s of one worker's device."""
    if device_type == "cuda":
        if gpu_peak_tflops:
            return gpu_peak_tflops * 1e12
        import torch

        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAK_FLOPS.items():  # "H100 PCIe" is checked before "H100"
            if key in name:
                return peak
        raise ValueError(f"unknown GPU '{name}': set metrics.gpu_peak_tflops in the config")
    return cpu_peak_tflops * 1e12


def step_metrics(*, step: int, loss: float, lr: float, grad_norm: float, step_time_s: float, tokens_step: int,
                 target_tokens_step: int, world_size: int, flops_token: float, peak_flops: float,
                 **parts: float) -> dict[str, Any]:
    """One row of metrics.jsonl; `parts` are a loss's named terms (distill: ce, kl), appended as they come."""
    tps = tokens_step / step_time_s
    return {
        "step": step,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "step_time_s": step_time_s,
        "tokens": tokens_step,
        "target_tokens": target_tokens_step,
        "tokens_per_s": tps,
        "tokens_per_s_per_worker": tps / world_size,
        "mfu": flops_token * tps / (peak_flops * world_size),
        **parts,
    }


class MetricsLog:
    """Append-only JSON-lines log written by rank 0. On resume, rows after the checkpointed step are dropped
    first, so the log reads as one uninterrupted run (the batch log keeps every attempt; see BatchLog)."""

    def __init__(self, path: str | os.PathLike, resume_step: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            from definemed.io import atomic_write_text

            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def follow_progress(path: str | os.PathLike, total: int, desc: str = "cpt", poll_s: float = 2.0) -> Iterator[None]:
    """A progress bar on the driver, fed by the last row rank 0 appended to `path` (metrics.jsonl). The workers'
    own output goes to the stage log, where a bar printed by a Ray worker would arrive only when it closes."""
    import threading

    from tqdm import tqdm

    p = Path(path)
    stop = threading.Event()
    bar = tqdm(total=total, desc=desc, unit="step")

    def last_row() -> dict[str, Any] | None:
        try:
            with p.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
                lines = f.read().decode("utf-8", errors="ignore").splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            try:
                return json.loads(line)
            except ValueError:
                continue
        return None

    def update() -> None:
        row = last_row()
        if row and "step" in row:
            bar.n = min(int(row["step"]), total)
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.3f}", tok_s=f"{row.get('tokens_per_s', 0):.0f}",
                            refresh=False)
            bar.refresh()

    def follow() -> None:
        while not stop.wait(poll_s):
            update()

    t = threading.Thread(target=follow, name="cpt-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        update()
        bar.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a killed worker
                continue
    return rows


def write_csv(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> Path:
    from definemed.io import atomic_write_text

    rows = list(rows)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def plot_loss_curve(rows: list[dict[str, Any]], path: str | os.PathLike, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from definemed.io import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o", ms=3, label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="lr")
    ax2.set_ylabel("learning rate")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
