"""Model card (README.md) and the header of the reproducing mergekit YAML."""
from __future__ import annotations

from definemed.merge.config import DEFAULT_KEY, MergeStageConfig
from definemed.models import is_tiny_ref


def yaml_header(cfg: MergeStageConfig, path_a: str, path_b: str) -> str:
    seed = f" --random-seed {cfg.seed}" if cfg.method == "dare_ties" else ""
    return (f"# Reproduce: mergekit-yaml mergekit_config.yml OUT_DIR{seed}  (definemed merge, method {cfg.method})\n"
            f"# model_a (instruct, t = 0): {cfg.model_a} -> {path_a}\n"
            f"# model_b (CPT,      t = 1): {cfg.model_b} -> {path_b}\n")


def _fmt(v) -> str:
    return "[" + ", ".join(f"{x:g}" for x in v) + "]" if isinstance(v, list) else f"{v:g}"


def model_card(cfg: MergeStageConfig, path_a: str, path_b: str, hashes: dict, schedule: list[dict],
               mergekit_yaml: str, out_dtype: str | None) -> str:
    keys = list(cfg.t)
    filters = [k for k in keys if k != DEFAULT_KEY]
    meaning = {
        "slerp": "spherical interpolation per tensor from model_a (t = 0) to model_b (t = 1)",
        "linear": "(1 - t) * model_a + t * model_b",
        "ties": f"model_a + t * TIES-trimmed task vector (model_b - model_a), density {cfg.density or 0.5:g}",
        "dare_ties": f"model_a + t * DARE task vector (model_b - model_a), density {cfg.density or 0.5:g}, "
                     f"seed {cfg.seed}",
    }[cfg.method]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, mergekit, " + cfg.method + ", definemed]",
        "language: [de]",
        "base_model:",
        f"  - {cfg.model_a}",
        f"  - {cfg.model_b}",
        "---",
        f"# Merged model: {cfg.model_a} + {cfg.model_b}",
        "",
        f"Merged with [mergekit](https://github.com/arcee-ai/mergekit) method **{cfg.method}**: {meaning}. "
        "Built by `definemed merge` (DeFineMed: continual pre-training on German medical text, then merged back "
        "into the instruct model to restore instruction following).",
        "",
        "## Parents",
        "",
        "| role | reference | resolved path | content hash |",
        "| --- | --- | --- | --- |",
        f"| model_a: instruct, t = 0, tokenizer + chat template | `{cfg.model_a}` | `{path_a}` | `{hashes.get('model_a')}` |",
        f"| model_b: continual pre-training (CPT), t = 1 | `{cfg.model_b}` | `{path_b}` | `{hashes.get('model_b')}` |",
        "",
        "## Schedule of t",
        "",
        "Filters match a substring of the tensor name, first match wins; `default` covers every other tensor. "
        "A list is a gradient over the layers: layer i of L sits at position i/(L-1). Tensors outside the "
        "layers (embeddings, final norm, lm_head) take their value at position 0.",
        "",
        *[f"- `{k}`: {_fmt(cfg.t[k])}" for k in keys],
        "",
        "| layer | " + " | ".join(f"t {k}" for k in keys) + " |",
        "| --- | " + " | ".join("---" for _ in keys) + " |",
        *[f"| {row['layer']} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |" for row in schedule],
        "",
        f"Filters: {', '.join(f'`{f}`' for f in filters) or 'none'}. Output dtype: {out_dtype or 'as model_a'}.",
        "",
        "## Reproduce",
        "",
        "```yaml",
        mergekit_yaml.rstrip(),
        "```",
        "",
        "`mergekit_config.yml` beside this card is that YAML; `lineage.json` records the resolved definemed "
        "config, package versions, git revision and the input hashes.",
    ]
    if is_tiny_ref(cfg.model_a) or is_tiny_ref(cfg.model_b):
        lines += ["", "**Tiny randomly initialised parents: this model proves the code path; its outputs carry "
                  "no meaning.**"]
    return "\n".join(lines) + "\n"
