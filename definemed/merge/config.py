"""Config of the `merge` stage: two parents, a mergekit method and a layer-wise, component-specific t schedule.

Convention (mergekit's): t = 0 keeps model_a, t = 1 takes model_b. model_a is the instruct model (it is
mergekit's `base_model`; its tokenizer, chat template and model config are used), model_b the CPT model.
"""
from __future__ import annotations

import re
from typing import Literal, Union

from pydantic import Field, ValidationInfo, field_validator

from definemed.config import StageConfig, StrictModel
from definemed.models.registry import ModelRef

DEFAULT_KEY = "default"
# The study's shape: attention moves from instruct (first layers) to CPT (last layers), MLP the other way round.
STUDY_SCHEDULE: dict[str, float | list[float]] = {
    "self_attn": [0, 0.5, 0.3, 0.7, 1],
    "mlp": [1, 0.5, 0.7, 0.3, 0],
    DEFAULT_KEY: 0.5,
}


Gradient = Union[float, list[float]]


def _parse_bytes(value: int | str | None) -> int | None:
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a memory size: {value!r} (e.g. 4GiB, 512MiB, 2GB or bytes)")
    num, unit = float(m.group(1)), (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(num * scale)


class MergeResources(StrictModel):
    """Resources of the Ray task that runs the merge (it lands on a node that has them and reaches the
    checkpoints). num_gpus > 0 does the tensor math on that GPU."""

    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)
    memory: int | None = None  # bytes for Ray's `memory` resource; "4GiB" style strings accepted
    # Custom Ray resources pin the task to a node class, e.g. {a100_80gb: 1} (cluster.yaml node types) or a
    # resource declared only by the nodes that mount the checkpoints.
    custom: dict[str, float] = {}

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v):
        v = _parse_bytes(v)
        if v is not None and v <= 0:
            raise ValueError("must be positive")
        return v

    def ray_options(self) -> dict:
        opts = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory:
            opts["memory"] = self.memory
        if self.custom:
            opts["resources"] = dict(self.custom)
        return opts


class MergeStageConfig(StageConfig):
    """`definemed merge`: mergekit merge of model_a (instruct, t = 0) and model_b (CPT, t = 1)."""

    model_a: ModelRef  # instruct model: t = 0 endpoint, mergekit base_model, tokenizer + chat template donor
    model_b: ModelRef  # CPT model: t = 1 endpoint
    method: Literal["slerp", "linear", "ties", "dare_ties"] = "slerp"
    # Schedule for t. Keys are mergekit filters (a substring of the tensor name, first listed match wins);
    # `default` covers every other tensor. A list is a gradient over the layers: layer i of L sits at
    # position i/(L-1) and takes the piecewise-linear value there. Embeddings, final norm and lm_head are
    # outside the layers and take the value at position 0 (mergekit's rule).
    t: dict[str, Gradient] = Field(default_factory=lambda: dict(STUDY_SCHEDULE))
    density: float | None = Field(None, gt=0, le=1)  # ties / dare_ties: fraction of the task vector kept (0.5 if unset)
    seed: int = 0  # dare_ties drops entries at random
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # output dtype; None = model_a's dtype
    resources: MergeResources = MergeResources()

    @field_validator("t", mode="before")
    @classmethod
    def _scalar_t(cls, v):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return {DEFAULT_KEY: v}
        return v

    @field_validator("t")
    @classmethod
    def _check_t(cls, v: dict[str, Gradient]) -> dict[str, Gradient]:
        if DEFAULT_KEY not in v:
            raise ValueError(f"needs a '{DEFAULT_KEY}' entry: the t of tensors no filter matches")
        for key, val in v.items():
            if not key.strip():
                raise ValueError("filter names must be non-empty")
            vals = val if isinstance(val, list) else [val]
            if not vals:
                raise ValueError(f"'{key}': gradient list is empty")
            bad = [x for x in vals if not 0.0 <= x <= 1.0]
            if bad:
                raise ValueError(f"'{key}': t must lie in [0, 1], got {bad[0]}")
        # mergekit takes the first matching filter, so `default` goes last whatever the YAML order.
        return {**{k: val for k, val in v.items() if k != DEFAULT_KEY}, DEFAULT_KEY: v[DEFAULT_KEY]}

    @field_validator("density")
    @classmethod
    def _density_needs_sparse_method(cls, v, info: ValidationInfo):
        method = info.data.get("method")
        if v is not None and method not in ("ties", "dare_ties"):
            raise ValueError(f"applies to ties/dare_ties only, not method '{method}'")
        return v

    @property
    def model_dir(self) -> str:
        """The merged model's stable path (serving and evaluation read it)."""
        return f"{self.output_dir.rstrip('/')}/model"
