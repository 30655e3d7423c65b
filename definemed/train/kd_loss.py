"""Knowledge-distillation loss on packed sequences, torch only:

    loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL_T

with KL_T the divergence between teacher and student next-token distributions softened by the temperature T:
forward KL(p_T || p_S) by default (torchtune's KD recipe, NeMo AutoModel's KDLoss), reverse KL(p_S || p_T) as
an option (MiniLLM: mode-seeking, the student does not spread mass over what the teacher finds unlikely). T^2
keeps the KL gradient's size independent of T (Hinton et al. 2015). Unlike torchtune's forward "KL" (the
cross-entropy -sum p_T log p_S, which differs by the teacher's entropy), this is the divergence itself, so it is 0
when the student is the teacher.

Both terms are sums over the same target tokens as CPT's loss (definemed/train/loss.py: a packed row's document
starts and padding are ignore_index), so the step normalises them by the global batch's target tokens exactly
as it does the CE. Computed in fp32. `chunk_tokens` bounds the fp32 [tokens, vocab] temporaries of the KL: each
chunk's softmaxes are recomputed in backward instead of kept (activation checkpointing of the loss).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from definemed.train.loss import IGNORE_INDEX, forward_logits, loss_sum

Divergence = Literal["forward", "reverse"]


def kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                 divergence: Divergence = "forward") -> torch.Tensor:
    """[tokens, vocab] logits -> [tokens] KL at temperature T (without the T^2 factor), in fp32."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if divergence == "forward":  # sum p_T (log p_T - log p_S)
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    if divergence == "reverse":  # sum p_S (log p_S - log p_T)
        return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    raise ValueError(f"divergence must be forward or reverse, not {divergence!r}")


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
           divergence: Divergence = "forward", chunk_tokens: int = 0) -> torch.Tensor:
    """Summed KL over the target tokens of packed rows (HF convention: position i predicts labels i + 1)."""
    vocab = student_logits.size(-1)
    keep = labels[..., 1:].reshape(-1) != IGNORE_INDEX
    s = student_logits[..., :-1, :].reshape(-1, vocab)[keep]
    t = teacher_logits[..., :-1, :].reshape(-1, vocab)[keep].detach()
    if not 0 < chunk_tokens < s.size(0):
        return kl_per_token(s, t, temperature, divergence).sum()
    from torch.utils.checkpoint import checkpoint

    total = s.new_zeros((), dtype=torch.float32)
    for s_c, t_c in zip(s.split(chunk_tokens), t.split(chunk_tokens)):
        total = total + checkpoint(lambda a, b: kl_per_token(a, b, temperature, divergence).sum(), s_c, t_c,
                                   use_reentrant=False)
    return total


def kd_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, *,
                alpha: float, temperature: float = 1.0, divergence: Divergence = "forward",
                chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(summed loss, summed CE, summed KL or None). With alpha = 0 the loss is CPT's summed CE exactly; a
    missing teacher is allowed only then (the CE-only control)."""
    ce, _ = loss_sum(student_logits, labels)
    if teacher_logits is None:
        if alpha != 0:
            raise ValueError("a KL term (alpha > 0) needs teacher logits")
        return ce, ce, None
    kl = kl_sum(student_logits, teacher_logits, labels, temperature, divergence, chunk_tokens)
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl, ce, kl


@dataclass
class DistillLoss:
    """The `micro_loss` of definemed.train.step.train_step for distillation: the frozen teacher's logits (no
    grad) and the student's, on the same packed micro-batch. `teacher=None` with alpha = 0 is the CE-only
    control. `after_teacher` runs after each teacher forward (a sharded teacher frees its gathered weights)."""

    teacher: Any
    alpha: float
    temperature: float = 1.0
    divergence: Divergence = "forward"
    chunk_tokens: int = 0
    after_teacher: Any = None

    def __call__(self, model, mb, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids, pos, labels = mb.input_ids.to(device), mb.position_ids.to(device), mb.labels.to(device)
        t_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                t_logits = forward_logits(self.teacher, ids, pos)
            if self.after_teacher is not None:
                self.after_teacher(self.teacher)
        s_logits = forward_logits(model, ids, pos)
        loss, ce, kl = kd_loss_sum(s_logits, t_logits, labels, alpha=self.alpha, temperature=self.temperature,
                                   divergence=self.divergence, chunk_tokens=self.chunk_tokens)
        parts = {"ce": ce.detach()}
        if kl is not None:
            parts["kl"] = kl.detach()
        return loss, parts
