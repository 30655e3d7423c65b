"""One optimizer step, torch only: the same function runs in the Ray Train workers of cpt and distill and in a
`torchrun` launch (definemed.train.torchrun), so a machine without Ray checks the very step the stages take."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from definemed.train.loss import count_targets, forward_logits, loss_sum


def scalar(t) -> float:
    from torch.distributed.tensor import DTensor

    return float(t.full_tensor() if isinstance(t, DTensor) else t)


def ce_micro_loss(model, mb, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CPT's loss of one micro-batch: summed next-token cross-entropy, no parts."""
    logits = forward_logits(model, mb.input_ids.to(device), mb.position_ids.to(device))
    ls, _ = loss_sum(logits, mb.labels.to(device))
    return ls, {}


def train_step(model, optimizer, scheduler, micro: Sequence[Any], *, device, world: int, max_grad_norm: float,
               hsdp: bool = False, micro_loss: Callable | None = None) -> dict[str, Any]:
    """One optimizer step over this rank's grad_accum micro-batches (objects with input_ids, position_ids and
    labels); the loss is normalised by the target tokens of the whole global batch.

    `micro_loss(model, mb, device) -> (summed loss, {name: summed part})` defaults to CPT's cross-entropy; the
    parts (distill: its CE and KL terms) come back per target token of the global batch, like `loss`."""
    micro_loss = micro_loss or ce_micro_loss
    n_targets = torch.tensor(float(sum(count_targets(mb.labels) for mb in micro)), device=device)
    dist.all_reduce(n_targets)
    loss_acc = torch.zeros((), device=device)
    part_acc: dict[str, torch.Tensor] = {}
    for m, mb in enumerate(micro):
        if hsdp:  # reduce-scatter every micro-batch, all-reduce across replicas once per step
            model.set_requires_all_reduce(m == len(micro) - 1)
        ls, parts = micro_loss(model, mb, device)
        # FSDP averages gradients over the `world` replicas: scale so the result is sum / global targets.
        (ls * world / n_targets).backward()
        loss_acc += ls.detach()
        for k, v in parts.items():
            part_acc[k] = part_acc.get(k, torch.zeros((), device=device)) + v.detach().float()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    lr = optimizer.param_groups[0]["lr"]  # the lr this step used
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(loss_acc)
    out = {"loss": float(loss_acc / n_targets), "lr": lr, "grad_norm": scalar(grad_norm),
           "target_tokens_step": int(n_targets)}
    if part_acc:
        names = sorted(part_acc)
        sums = torch.stack([part_acc[k] for k in names])
        dist.all_reduce(sums)  # one collective for every part
        out.update({k: float(v / n_targets) for k, v in zip(names, sums)})
    return out
