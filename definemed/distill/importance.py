"""What pruning ranks by, measured on calibration sequences from the training side (pack shards, never held-out).

Block importance (ShortGPT, Minitron's depth axis): BI_i = 1 - E[cos(x_i, x_{i+1})], the mean over real tokens of
the cosine between block i's input and output hidden states. A block that barely turns the residual stream
(BI near 0) is the cheapest to drop.

MLP channel importance (Minitron's width axis): for each intermediate channel of each block, the root mean square
of its activation (the input of down_proj, i.e. act(gate) * up for gated MLPs) over the calibration tokens.

Rows are packed: positions restart per document and the model sees no attention mask, so documents do not attend
to each other (definemed/train/loss.py); padding after `num_tokens` is left out of every statistic.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class CalibrationRow:
    seq_id: int  # row in the concatenation of the pack's shards (file order), as the train loader counts
    input_ids: torch.Tensor  # [1, seq_len]
    position_ids: torch.Tensor
    num_tokens: int


def calibration_rows(shards_dir: str | Path, n: int, seed: int) -> list[CalibrationRow]:
    """`n` packed rows (all if fewer) in a seeded order, read shard by shard."""
    from definemed.train.dataloader import PackedShards

    data = PackedShards(shards_dir)
    pick = np.sort(np.random.default_rng(seed).permutation(data.total)[:n])
    rows = []
    for g in pick.tolist():
        shard = int(np.searchsorted(data.offsets, g, side="right") - 1)
        ids, pos, ntok = data.shard(shard)
        r = g - int(data.offsets[shard])
        rows.append(CalibrationRow(g, torch.from_numpy(ids[r].astype(np.int64))[None],
                                   torch.from_numpy(pos[r].astype(np.int64))[None], int(ntok[r])))
    return rows


def _hidden(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


@torch.no_grad()
def measure(model, rows: list[CalibrationRow], device, channels: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """{"block_importance": [BI per block], "channel_importance": [[RMS per channel] per block] or None,
    "tokens": real tokens seen}."""
    from tqdm import tqdm

    from definemed.train.loss import forward_logits
    from definemed.train.parallelize import decoder_layers

    layers = decoder_layers(model)
    n_layers = len(layers)
    cos_sum = torch.zeros(n_layers, dtype=torch.float64)
    sq_sum: list[torch.Tensor | None] = [None] * n_layers
    state: dict[str, Any] = {"n": 0, "inputs": {}}
    handles = []

    def pre_hook(i):
        def hook(_mod, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            state["inputs"][i] = x[0, :state["n"]].float()
        return hook

    def post_hook(i):
        def hook(_mod, _args, _kwargs, out):
            y = _hidden(out)[0, :state["n"]].float()
            cos_sum[i] += torch.nn.functional.cosine_similarity(state["inputs"].pop(i), y, dim=-1).double().sum()
        return hook

    def mlp_hook(i):
        def hook(_mod, args):
            a = args[0][0, :state["n"]].float()
            s = (a * a).sum(0).double()
            sq_sum[i] = s if sq_sum[i] is None else sq_sum[i] + s
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
        if channels:
            down = getattr(getattr(layer, "mlp", None), "down_proj", None)
            if down is None:
                raise ValueError(f"{type(model).__name__}: width pruning needs an MLP with gate/up/down_proj")
            handles.append(down.register_forward_pre_hook(mlp_hook(i)))
    model.eval()
    tokens = 0
    try:
        for row in tqdm(rows, desc="calibration", unit="seq", disable=not progress):
            state["n"] = row.num_tokens
            forward_logits(model, row.input_ids.to(device), row.position_ids.to(device))
            tokens += row.num_tokens
    finally:
        for h in handles:
            h.remove()
    if tokens == 0:
        raise ValueError("calibration rows hold no tokens")
    return {"block_importance": (1.0 - cos_sum / tokens).tolist(),
            "channel_importance": [torch.sqrt(s / tokens).tolist() for s in sq_sum] if channels else None,
            "tokens": tokens}


def lowest(scores: list[float], k: int) -> list[int]:
    """Indices of the k lowest scores (ties: the later block first, it sits closer to the output), sorted."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], -i))
    return sorted(order[:k])


def top_channels(scores: list[float], k: int) -> list[int]:
    """Indices of the k highest channel scores, in their original order (ties: lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])
