"""Next-token loss on packed sequences without crossing documents.

Attention: position_ids restart at 0 for every document, attention_mask=None and use_cache=False make
transformers mask attention per document (sdpa/eager on CPU, flash-attention varlen on GPU).
Labels: the first token of each document is never a target (it would be predicted from the previous document)
and padding is never a target. The loss of a packed row is then exactly the token-weighted mean of the losses of
its documents run alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def packed_labels(input_ids: torch.Tensor, position_ids: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
    """Labels aligned with input_ids (HF convention: the model shifts). -100 at document starts and padding."""
    labels = input_ids.clone()
    labels[position_ids == 0] = IGNORE_INDEX
    if num_tokens is not None:
        labels[..., num_tokens:] = IGNORE_INDEX
    return labels


def forward_logits(model, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False).logits


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy (fp32) and the number of target tokens."""
    shift_logits = logits[..., :-1, :].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[..., 1:].reshape(-1)
    n = int((shift_labels != IGNORE_INDEX).sum())
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum"), n


def count_targets(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != IGNORE_INDEX).sum())
