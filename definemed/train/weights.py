"""Load the base model once per job, not once per worker (torchtitan's recipe for Hugging Face weights).

Every rank builds the architecture with its parameters on the meta device (no memory), FSDP2 shards it and each
rank allocates only its own shards; rank 0 alone reads the checkpoint and `set_model_state_dict(...,
broadcast_from_rank0=True)` sends every tensor to the ranks that hold a piece of it. Host memory for the weights:
one full copy on rank 0 while loading, plus each rank's shards, instead of a full fp32 copy in every worker
(~30 GB x 8 workers per node for a 7B model).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class AttentionKernel:
    requested: str
    used: str  # what transformers set up (model.config._attn_implementation)
    why: str

    def to_dict(self) -> dict[str, str]:
        return {"requested": self.requested, "used": self.used, "why": self.why}


def choose_attention(choice: str, device_type: str) -> tuple[str, str]:
    """(implementation, reason). auto: flash_attention_2 (varlen: packed documents without a dense mask) on CUDA
    when flash-attn is installed, else sdpa with a dense block-diagonal mask per packed row."""
    if choice != "auto":
        return choice, "set in parallel.attn_implementation"
    if device_type != "cuda":
        return "sdpa", "auto on CPU: flash-attn needs CUDA; packed rows use a dense block-diagonal mask"
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2", "auto on CUDA with flash-attn installed: varlen kernel, no dense mask"
    except ImportError:
        return "sdpa", ("auto on CUDA without flash-attn (install the gpu extra): sdpa with a dense "
                        "block-diagonal mask per packed row")


def build_on_meta(model_path: str, attn: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The architecture with parameters on the meta device. Buffers stay real: the rotary tables are computed
    in __init__ and are not in the checkpoint, so they cannot be loaded later. fp32 for trained models (master
    weights); a frozen teacher may be built in its compute dtype."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with init_empty_weights(include_buffers=False):
        # fp32 master weights; bf16 compute comes from the FSDP mixed-precision policy
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.tie_weights()  # init_empty_weights re-creates each parameter, which unties lm_head from the embeddings
    model.config.use_cache = False
    return model


def materialize(model: nn.Module, device: torch.device, buffers: dict[str, torch.Tensor]) -> None:
    """Allocate this rank's shards (uninitialised: the broadcast fills them) and restore the real buffers."""
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])


def read_full_state_dict(model_path: str) -> dict[str, torch.Tensor]:
    """Rank 0 only: the checkpoint as one state dict in its stored dtype (bf16 for real checkpoints: half the
    host memory of fp32; each rank upcasts its shards as it copies them in). transformers does the reading, so
    its renames, tied weights and sharded safetensors apply as in from_pretrained."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
    return model.state_dict()


def broadcast_weights(model: nn.Module, full: dict[str, torch.Tensor] | None) -> None:
    """Collective: rank 0 passes the full state dict, the others None; every rank ends with its shards filled."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, full or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def load_base_model(model_path: str, mesh, device: torch.device, rank: int, parallel) -> tuple[nn.Module, dict[str, Any]]:
    """Build, shard and load the base model once per job. `parallel` is the stage's ParallelConfig."""
    from definemed.train.parallelize import parallelize

    attn, why = choose_attention(parallel.attn_implementation, device.type)
    model = build_on_meta(model_path, attn)
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    parallelize(model, mesh, parallel.mixed_precision, parallel.activation_checkpointing)
    materialize(model, device, buffers)
    full = read_full_state_dict(model_path) if rank == 0 else None
    broadcast_weights(model, full)
    del full
    kernel = AttentionKernel(parallel.attn_implementation, model.config._attn_implementation, why)
    return model, {"attention": kernel.to_dict()}
