"""Cut a Hugging Face causal LM down to a pruned architecture that every consumer loads as a plain model.

A pruned model is a new config (fewer `num_hidden_layers`, or a smaller `intermediate_size`) and the teacher's
tensors for what is kept: kept blocks renumbered 0..n-1 (their weights unchanged), kept MLP channels sliced out of
gate/up (rows) and down (columns). Per-layer config entries follow the kept blocks: every list as long as the
layer count (gemma3's and qwen2's `layer_types`), and qwen2's `max_window_layers`. The new model is built from
that config and loaded strictly, so a tensor the config does not explain is an error here, not in vLLM.
"""
from __future__ import annotations

import copy
import re
from typing import Any

import torch

_LAYER_KEY = re.compile(r"^(.*\blayers\.)(\d+)(\..*)$")
MLP_ROWS = ("gate_proj", "up_proj")  # [intermediate, hidden]: channels are rows
MLP_COLS = ("down_proj",)  # [hidden, intermediate]: channels are columns


def count_parameters(model) -> int:
    """Distinct parameters (a tied lm_head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _per_layer_keys(cfg: dict[str, Any], n_layers: int) -> list[str]:
    return [k for k, v in cfg.items() if isinstance(v, list) and len(v) == n_layers and k != "architectures"]


def depth_config(config, keep: list[int]):
    """The teacher's config with only the `keep` blocks (sorted indices)."""
    new = copy.deepcopy(config)
    n_old = config.num_hidden_layers
    for k in _per_layer_keys(config.to_dict(), n_old):
        setattr(new, k, [getattr(config, k)[i] for i in keep])
    if isinstance(getattr(config, "max_window_layers", None), int):
        # qwen2: blocks at index >= max_window_layers use the sliding window; keep each kept block's kind
        new.max_window_layers = sum(1 for i in keep if i < config.max_window_layers)
    new.num_hidden_layers = len(keep)
    return new


def depth_state_dict(state: dict[str, torch.Tensor], keep: list[int]) -> dict[str, torch.Tensor]:
    """Tensors of the kept blocks renumbered 0..len(keep)-1; everything outside the blocks unchanged."""
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for name, t in state.items():
        m = _LAYER_KEY.match(name)
        if m is None:
            out[name] = t
        elif int(m.group(2)) in new_index:
            out[f"{m.group(1)}{new_index[int(m.group(2))]}{m.group(3)}"] = t
    return out


def width_config(config, intermediate_size: int):
    new = copy.deepcopy(config)
    new.intermediate_size = intermediate_size
    return new


def width_state_dict(state: dict[str, torch.Tensor], keep: list[list[int]]) -> dict[str, torch.Tensor]:
    """gate/up rows and down columns of each block's kept channels (`keep[i]`: block i's channel indices)."""
    out = {}
    for name, t in state.items():
        m = _LAYER_KEY.match(name)
        part = name.split(".")[-2] if name.endswith((".weight", ".bias")) else ""
        if m is not None and ".mlp." in name and part in MLP_ROWS:
            out[name] = t.index_select(0, torch.tensor(keep[int(m.group(2))])).contiguous()
        elif m is not None and ".mlp." in name and part in MLP_COLS and name.endswith(".weight"):
            out[name] = t.index_select(1, torch.tensor(keep[int(m.group(2))])).contiguous()
        else:
            out[name] = t
    return out


def build_pruned(config, state: dict[str, torch.Tensor], dtype: torch.dtype):
    """A model of `config` holding exactly `state` (strict: nothing missing, nothing left over)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tied = getattr(config, "tie_word_embeddings", False)
    state = {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"pruned state does not fit the pruned config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.tie_weights()
    model.config.use_cache = True
    return model
