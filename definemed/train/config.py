"""Config sections every training stage on Ray Train shares (cpt, distill): workers and mesh, optimizer, steps and
batch, checkpoints, metrics, fault injection, gathered in `PackedTrainingConfig`, the base of both stage configs;
`check_global_batch` and `grad_accum` are the one definition of how the global batch splits into micro-batches."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from definemed.config import InputPath, StageConfig, StrictModel


class ParallelConfig(StrictModel):
    num_workers: int = Field(2, ge=1)
    # auto: GPU workers if the Ray cluster has GPUs (definemed.resources); cluster configs say true
    use_gpu: bool | Literal["auto"] = "auto"
    accelerator_type: str | None = None  # e.g. "A100" (Ray's accelerator_type resource; GPU workers only)
    cpus_per_worker: float = Field(1.0, gt=0)
    # Workers per FSDP shard group; None = all workers (pure FSDP). 1 = pure replication. 8 = HSDP per node.
    shard_group_size: int | None = Field(None, ge=1)
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"

    @field_validator("shard_group_size")
    @classmethod
    def _divides(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("num_workers")
        if v is not None and n and n % v:
            raise ValueError(f"must divide parallel.num_workers ({n})")
        return v

    def mesh_label(self) -> str:
        """(replicate x shard), as logged."""
        shard = self.shard_group_size or self.num_workers
        return f"{self.num_workers // shard} x {shard}"


class OptimConfig(StrictModel):
    lr: float = Field(1e-5, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)


class TrainConfig(StrictModel):
    seq_len: int = Field(4096, ge=8)  # must equal the pack stage's seq_len (checked at start)
    global_batch_tokens: int = Field(..., ge=8)  # micro batch 1 x grad_accum x workers x seq_len
    max_steps: int = Field(..., ge=1)
    seed: int = 0


class CheckpointConfig(StrictModel):
    every_steps: int = Field(100, ge=1)
    keep: int = Field(2, ge=1)
    max_failures: int = Field(3, ge=-1)  # worker-failure restarts from the last checkpoint (-1: unlimited)


class MetricsConfig(StrictModel):
    # Dense fp32 peak of ONE worker's CPU share, an estimate (1 core with AVX2 FMA ~ 0.05-0.1 TFLOP/s):
    # CPU MFU is indicative only. GPUs use the vendor's dense bf16 peak unless gpu_peak_tflops is set.
    cpu_peak_tflops: float = Field(0.1, gt=0)
    gpu_peak_tflops: float | None = Field(None, gt=0)


class FaultInjection(StrictModel):
    """Test-only: worker `rank` exits hard at the start of `step` unless `marker` exists (it creates it first),
    i.e. on the first attempt only."""

    rank: int = Field(1, ge=0)
    step: int = Field(..., ge=1)
    marker: str


def check_global_batch(cls, v: TrainConfig, info: ValidationInfo) -> TrainConfig:
    """Field validator of a stage's `train` section (declare `parallel` before it): micro batch 1."""
    par = info.data.get("parallel")
    if par is not None:
        per_step = v.seq_len * par.num_workers
        if v.global_batch_tokens % per_step:
            raise ValueError(f"global_batch_tokens ({v.global_batch_tokens}) must be a multiple of seq_len x "
                             f"parallel.num_workers ({per_step}) with micro batch 1")
    return v


def grad_accum(cfg: Any) -> int:
    """Micro-batches of one packed sequence per worker and optimizer step."""
    return cfg.train.global_batch_tokens // (cfg.train.seq_len * cfg.parallel.num_workers)


class PackedTrainingConfig(StageConfig):
    """What a stage that trains on packed sequences under Ray Train configures besides its models."""

    packed: InputPath  # a pack stage's output_dir, tokenized with the trained model's tokenizer (checked at start)
    parallel: ParallelConfig = ParallelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig
    checkpoint: CheckpointConfig = CheckpointConfig()
    metrics: MetricsConfig = MetricsConfig()
    export_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    fault_injection: FaultInjection | None = None  # test-only (distill: the KD student's run)

    _batch_divides = field_validator("train")(classmethod(check_global_batch))

    def grad_accum(self) -> int:
        return grad_accum(self)
