"""`tiny-models` stage: build or reuse the cached tiny models and prove each loads in transformers."""
from __future__ import annotations

from definemed.config import StageConfig


class TinyModelsConfig(StageConfig):
    models: list[str] = ["tiny://qwen2", "tiny://mistral", "tiny://xlm-roberta"]


def run(cfg: TinyModelsConfig) -> dict[str, str]:
    from tqdm import tqdm
    from transformers import AutoConfig

    from definemed.models import resolve_model

    out = {}
    for ref in tqdm(cfg.models, desc="tiny models", unit="model"):
        path = resolve_model(ref)
        AutoConfig.from_pretrained(path)  # fails loudly if the directory is not a model
        out[ref] = path
    return out
