"""Model parallelisation, apart from the model definition (torchtitan style): FSDP2 / HSDP over a 2-D mesh.

Mesh (dp_replicate, dp_shard): parameters are sharded inside a group of `shard_group_size` workers and replicated
across groups. (1, W) is pure FSDP, (W, 1) pure replication (DDP-like), e.g. (4, 8) is HSDP over 4 nodes of 8
GPUs, sharding inside a node (fast NVLink) and all-reducing across nodes.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

MixedPrecision = Literal["auto", "bf16", "fp32"]


def mesh_shape(world_size: int, shard_group_size: int | None) -> tuple[int, int]:
    shard = world_size if shard_group_size in (None, 0, -1) else int(shard_group_size)
    if shard < 1 or world_size % shard:
        raise ValueError(f"shard_group_size {shard} must divide the number of workers {world_size}")
    return world_size // shard, shard


def build_mesh(device_type: str, world_size: int, shard_group_size: int | None):
    from torch.distributed.device_mesh import init_device_mesh

    shape = mesh_shape(world_size, shard_group_size)
    return init_device_mesh(device_type, shape, mesh_dim_names=("dp_replicate", "dp_shard"))


def uses_bf16(mode: MixedPrecision, device_type: str) -> bool:
    """auto: bf16 on GPU, fp32 on CPU (bf16 matmuls are slow there and the tiny-model numbers should be exact);
    bf16 forces the GPU policy on CPU workers too, which is how CI runs the GPU code path."""
    return mode == "bf16" or (mode == "auto" and device_type == "cuda")


def mp_policy(mode: MixedPrecision, device_type: str):
    """bf16 parameters and compute with fp32 gradient reduction (fp32 master weights stay in the optimizer's
    shards), or plain fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if uses_bf16(mode, device_type):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a HF causal LM (Qwen2, Mistral, Llama, ... keep them in model.model.layers)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no model.layers; add its block list to parallelize.decoder_layers")
    return list(layers)


def apply_activation_checkpointing(model: nn.Module) -> None:
    # HF's per-layer checkpointing keeps parameter names unchanged (a wrapper module would rename them in
    # checkpoints); non-reentrant is the variant that composes with FSDP2.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def parallelize(model: nn.Module, mesh, mixed_precision: MixedPrecision = "auto",
                activation_checkpointing: bool = False, reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard every decoder layer, then the root (embeddings, final norm, lm_head; tied weights stay tied)."""
    from torch.distributed.fsdp import fully_shard

    if activation_checkpointing:
        apply_activation_checkpointing(model)
    policy = mp_policy(mixed_precision, mesh.device_type)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # The last layer's params are needed again right away by backward: keep them unsharded after forward.
        fully_shard(layer, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model
