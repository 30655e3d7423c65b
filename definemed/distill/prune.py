"""`prune` stage: a smaller student cut from the teacher, ranked on calibration documents from the training side.

- `depth`: drop the blocks of lowest block importance (definemed/distill/importance.py), either `drop_layers`
  of them or the fewest that remove `target_reduction` of the parameters;
- `width`: keep each block's MLP channels of highest activation importance, down to `intermediate_size` or to
  the size that removes `target_reduction` of the parameters.

Runs as a Ray task with declared resources (like merge): load the teacher, measure on `calibration.sequences`
packed rows of a pack stage's shards (its held-out documents are never in them), cut (definemed/distill/surgery.py)
and write `<output_dir>/model/` (safetensors, consistent config, the teacher's tokenizer and chat template,
lineage.json) atomically, with `importance.json` (every score, what was kept, parameter counts) and
`block_importance.png`. The model is reloaded in transformers and checked against mergekit's architecture
definition before the stage succeeds; the tests serve it with vLLM.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from definemed.config import ConfigError, InputPath, StageConfig, StrictModel
from definemed.merge.config import MergeResources
from definemed.models.registry import ModelRef

log = logging.getLogger(__name__)
MODEL_SUBDIR = "model"
IMPORTANCE_JSON = "importance.json"
IMPORTANCE_PNG = "block_importance.png"


class CalibrationConfig(StrictModel):
    # A pack stage's output_dir: its shards hold training documents only (pack keeps held-out ones apart).
    packed: InputPath
    sequences: int = Field(32, ge=1)  # packed rows measured (all if the pack has fewer)
    seed: int = 0  # which rows


class DepthPrune(StrictModel):
    drop_layers: int | None = Field(None, ge=1)  # drop this many blocks, lowest block importance first
    # or: the fewest blocks (lowest importance first) that remove at least this share of all parameters
    target_reduction: float | None = Field(None, gt=0, lt=1)


class WidthPrune(StrictModel):
    intermediate_size: int | None = Field(None, ge=1)  # MLP channels kept in every block
    # or: the largest uniform intermediate_size that removes at least this share of all parameters
    target_reduction: float | None = Field(None, gt=0, lt=1)


def _exactly_one(section: StrictModel, names: tuple[str, str]) -> None:
    given = [n for n in names if getattr(section, n) is not None]
    if len(given) != 1:
        raise ValueError(f"set exactly one of {names[0]} or {names[1]}")


class PruneConfig(StageConfig):
    """`definemed prune`: a depth- or width-pruned copy of the teacher, ranked on calibration documents."""

    teacher: ModelRef  # tiny://qwen2, real://smollm2-135m-instruct, a merge stage's model dir, ...
    calibration: CalibrationConfig
    method: Literal["depth", "width"] = "depth"
    depth: DepthPrune = DepthPrune()  # used when method is depth
    width: WidthPrune = WidthPrune()  # used when method is width
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # output dtype; None = the teacher's
    resources: MergeResources = MergeResources()  # the Ray task that measures and cuts (num_gpus > 0: on a GPU)

    @field_validator("depth", "width")
    @classmethod
    def _one_target(cls, v, info: ValidationInfo):
        if info.data.get("method") == info.field_name:
            _exactly_one(v, ("drop_layers" if info.field_name == "depth" else "intermediate_size",
                             "target_reduction"))
        return v

    @property
    def model_dir(self) -> str:
        """The pruned model's stable path (distill's `student.prune` reads it)."""
        return f"{self.output_dir.rstrip('/')}/{MODEL_SUBDIR}"


# ----------------------------------------------------------------------------------------------------------------
# choosing what to keep (pure)


def block_parameters(model) -> list[int]:
    from definemed.train.parallelize import decoder_layers

    return [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)]


def channel_parameters(model) -> int:
    """Parameters one MLP channel of one block holds (a gate row, an up row, a down column, their biases)."""
    from definemed.distill.surgery import MLP_COLS, MLP_ROWS
    from definemed.train.parallelize import decoder_layers

    mlp = decoder_layers(model)[0].mlp
    n = 0
    for name in MLP_ROWS + MLP_COLS:
        lin = getattr(mlp, name, None)
        if lin is None:
            raise ConfigError(f"invalid config field 'method': width pruning needs an MLP with gate_proj, up_proj "
                              f"and down_proj; {type(mlp).__name__} has no {name}")
        n += lin.weight.shape[1] if name in MLP_ROWS else lin.weight.shape[0]
        if name in MLP_ROWS and lin.bias is not None:
            n += 1
    return n


def depth_drop_count(cfg: PruneConfig, blocks: list[int], total: int, n_embed: int) -> int:
    """How many blocks to drop; a target depth pruning cannot reach is a config error naming the field."""
    n = len(blocks)
    if cfg.depth.drop_layers is not None:
        if cfg.depth.drop_layers >= n:
            raise ConfigError(f"invalid config field 'depth.drop_layers': {cfg.depth.drop_layers} but the teacher "
                              f"has {n} blocks (at least one must stay)")
        return cfg.depth.drop_layers
    target = cfg.depth.target_reduction * total
    removed = 0
    for k, size in enumerate(sorted(blocks), start=1):  # blocks of one model are the same size
        removed += size
        if removed >= target and k < n:
            return k
    most = sum(blocks) - min(blocks)
    raise ConfigError(f"invalid config field 'depth.target_reduction': {cfg.depth.target_reduction:.0%} cannot be "
                      f"reached by depth pruning: dropping {n - 1} of {n} blocks removes {most / total:.1%} of "
                      f"{total / 1e6:.1f}M parameters (the embeddings alone hold {n_embed / 1e6:.1f}M); prune in "
                      "width or set a lower target")


def width_size(cfg: PruneConfig, intermediate: int, n_layers: int, per_channel: int, total: int) -> int:
    if cfg.width.intermediate_size is not None:
        if cfg.width.intermediate_size >= intermediate:
            raise ConfigError(f"invalid config field 'width.intermediate_size': {cfg.width.intermediate_size} is not "
                              f"below the teacher's {intermediate}")
        return cfg.width.intermediate_size
    drop = math.ceil(cfg.width.target_reduction * total / (n_layers * per_channel))
    if drop >= intermediate:
        raise ConfigError(f"invalid config field 'width.target_reduction': {cfg.width.target_reduction:.0%} would "
                          f"remove every MLP channel")
    return intermediate - drop


# ----------------------------------------------------------------------------------------------------------------
# the Ray task


def check_mergekit_architecture(model_dir: str | Path) -> str:
    """mergekit knows the architecture and finds every tensor its definition requires (at this layer count)."""
    from mergekit.architecture import arch_info_for_config
    from transformers import AutoConfig

    from definemed.merge.validate import tensor_shapes

    config = AutoConfig.from_pretrained(str(model_dir))
    arch = arch_info_for_config(config)
    if arch is None:
        raise ValueError(f"mergekit has no architecture definition for {config.architectures}")
    names = set(tensor_shapes(str(model_dir)))
    missing = [w.name for w in arch.all_weights(config) if not w.optional and w.name not in names
               and not any(a in names for a in (w.aliases or ()) + (w.tied_names or ()))]
    if missing:
        raise ValueError(f"mergekit's {config.architectures[0]} definition needs tensors the pruned model lacks: "
                         f"{missing[:3]}")
    return config.architectures[0]


def prune_on_node(cfg: PruneConfig, output_dir: str, teacher_path: str, shards_dir: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from definemed.distill import surgery
    from definemed.distill.importance import calibration_rows, lowest, measure, top_channels
    from definemed.distill.plots import plot_block_importance
    from definemed.io import atomic_dir, atomic_write_json
    from definemed.lineage import write_manifest
    from definemed.merge.run import copy_tokenizer
    from definemed.merge.validate import load_model_config, model_dtype
    from definemed.models import is_meaningless_model
    from definemed.train.export import DTYPES

    device = torch.device("cuda" if cfg.resources.num_gpus > 0 else "cpu")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32, attn_implementation="sdpa")
    teacher.to(device)
    teacher.config.use_cache = False
    out_dtype = cfg.dtype or model_dtype(load_model_config(cfg.teacher, teacher_path, "teacher")) or "float32"
    total = surgery.count_parameters(teacher)
    blocks = block_parameters(teacher)
    n_embed = teacher.get_input_embeddings().weight.numel()
    rows = calibration_rows(shards_dir, cfg.calibration.sequences, cfg.calibration.seed)
    stats = measure(teacher, rows, device, channels=cfg.method == "width")
    bi = stats["block_importance"]
    config = teacher.config
    state = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
    kept_layers, dropped, kept_channels = list(range(len(blocks))), [], None
    if cfg.method == "depth":
        dropped = lowest(bi, depth_drop_count(cfg, blocks, total, n_embed))
        kept_layers = [i for i in range(len(blocks)) if i not in dropped]
        new_cfg, new_state = surgery.depth_config(config, kept_layers), surgery.depth_state_dict(state, kept_layers)
    else:
        size = width_size(cfg, config.intermediate_size, len(blocks), channel_parameters(teacher), total)
        kept_channels = [top_channels(s, size) for s in stats["channel_importance"]]
        new_cfg, new_state = surgery.width_config(config, size), surgery.width_state_dict(state, kept_channels)
    del teacher
    student = surgery.build_pruned(new_cfg, new_state, DTYPES[out_dtype])
    n_student = surgery.count_parameters(student)
    params = {"teacher": total, "student": n_student, "reduction": 1 - n_student / total,
              "embedding": n_embed, "per_block": blocks}
    out = Path(output_dir)
    final = out / MODEL_SUBDIR
    tiny = is_meaningless_model(teacher_path)
    with atomic_dir(final, overwrite=True) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer(teacher_path, tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=DTYPES[out_dtype])
        if surgery.count_parameters(reloaded) != n_student:
            raise RuntimeError(f"the saved pruned model reloads with {surgery.count_parameters(reloaded)} parameters, "
                               f"not {n_student}")
        arch = check_mergekit_architecture(tmp)
        write_manifest(tmp, "prune", cfg, inputs={"teacher": teacher_path, "calibration": cfg.calibration.packed},
                       extra={"method": cfg.method, "kept_layers": kept_layers, "dropped_layers": dropped,
                              "intermediate_size": new_cfg.intermediate_size, "parameters": params,
                              "mergekit_architecture": arch, "dtype": out_dtype})
    report = {
        "method": cfg.method,
        "teacher": cfg.teacher,
        "note": "tiny random teacher: the scores prove the code path only" if tiny else None,
        "calibration": {"packed": cfg.calibration.packed, "sequences": [r.seq_id for r in rows],
                        "tokens": stats["tokens"]},
        "block_importance": bi,
        "kept_layers": kept_layers,
        "dropped_layers": dropped,
        "num_hidden_layers": {"teacher": len(blocks), "student": new_cfg.num_hidden_layers},
        "intermediate_size": {"teacher": config.intermediate_size, "student": new_cfg.intermediate_size},
        "channel_importance": stats["channel_importance"],
        "kept_channels": kept_channels,
        "parameters": params,
        "mergekit_architecture": arch,
    }
    atomic_write_json(out / IMPORTANCE_JSON, report)
    plot_block_importance(bi, dropped, out / IMPORTANCE_PNG,
                          f"Block importance of {cfg.teacher}" + (" (tiny random model)" if tiny else ""))
    print(f"[prune] {cfg.method}: {len(blocks)} -> {new_cfg.num_hidden_layers} blocks, intermediate "
          f"{config.intermediate_size} -> {new_cfg.intermediate_size}; {total / 1e6:.1f}M -> {n_student / 1e6:.1f}M "
          f"parameters ({params['reduction']:.1%} fewer)" + (f"; dropped blocks {dropped}" if dropped else ""),
          flush=True)
    return {"model": str(final), "importance": str(out / IMPORTANCE_JSON), "plot": str(out / IMPORTANCE_PNG)}


# ----------------------------------------------------------------------------------------------------------------
# the stage (driver)


def check_target(cfg: PruneConfig, teacher_path: str) -> None:
    """Refuse an unreachable target before the task loads anything (the architecture on the meta device)."""
    from definemed.distill.surgery import count_parameters
    from definemed.train.weights import build_on_meta

    meta = build_on_meta(teacher_path, "sdpa")
    total, blocks = count_parameters(meta), block_parameters(meta)
    if cfg.method == "depth":
        depth_drop_count(cfg, blocks, total, meta.get_input_embeddings().weight.numel())
    else:
        width_size(cfg, meta.config.intermediate_size, len(blocks), channel_parameters(meta), total)


def check_inputs(cfg: PruneConfig) -> str:
    """Before anything is written (the stage's preflight): the calibration pack speaks the teacher's vocabulary
    and the target is reachable. The teacher's resolved path."""
    from definemed.merge.run import node_ref
    from definemed.models import resolve_model
    from definemed.train.pack import read_stats, same_vocabulary

    teacher_path = resolve_model(node_ref(cfg.teacher))
    packed = Path(cfg.calibration.packed)
    try:
        pack_stats = read_stats(packed)
    except FileNotFoundError:
        raise ConfigError(f"invalid config field 'calibration.packed': {packed} is not a pack stage output "
                          "(no stats.json)") from None
    if not same_vocabulary(pack_stats["tokenizer"], teacher_path):
        raise ConfigError(f"invalid config field 'calibration.packed': {packed} was tokenized for "
                          f"{pack_stats['model']}, whose vocabulary differs from teacher {cfg.teacher}")
    check_target(cfg, teacher_path)
    return teacher_path


def run(cfg: PruneConfig) -> dict[str, str]:
    import ray

    from definemed.train.pack import SHARDS_DIR

    teacher_path = check_inputs(cfg)
    packed = Path(cfg.calibration.packed)
    out = Path(cfg.output_dir).resolve()
    task = ray.remote(**cfg.resources.ray_options())(prune_on_node).options(name="definemed-prune")
    log.info("prune: %s of %s on %d calibration rows as a Ray task with %s", cfg.method, cfg.teacher,
             cfg.calibration.sequences, cfg.resources.ray_options())
    ref = task.remote(cfg, str(out), teacher_path, str((packed / SHARDS_DIR).resolve()))
    try:
        result = ray.get(ref)
    except BaseException:
        ray.cancel(ref, force=True)
        raise
    summary = json.loads(Path(result["importance"]).read_text(encoding="utf-8"))["parameters"]
    log.info("prune: %s", summary)
    return result
