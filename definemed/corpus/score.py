"""Classifier scoring: P(medical) for a batch of texts. One class serves the filter's Ray Data actor pool, the
classifier's held-out evaluation and the single-process baseline of the benchmark, so they run identical code."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import pandas as pd


def medical_index(model) -> int:
    label2id = {str(k).lower(): v for k, v in (model.config.label2id or {}).items()}
    return int(label2id.get("medical", 1))


class Scorer:
    """Callable class for `Dataset.map_batches(Scorer, compute=ActorPoolStrategy(...))`: the model loads once
    per actor. Rows are scored in the given batch; `score` is added to the batch."""

    def __init__(self, model_dir: str, max_length: int = 256, device: str | None = None,
                 text_column: str = "text"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(self.device).eval()
        self.pos = medical_index(self.model)
        self.max_length = max_length
        self.text_column = text_column

    def score_texts(self, texts: Iterable[str]) -> list[float]:
        import torch

        texts = list(texts)
        if not texts:
            return []
        enc = self.tok(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        with torch.inference_mode():
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
        return torch.softmax(logits.float(), dim=-1)[:, self.pos].cpu().tolist()

    def __call__(self, batch: "pd.DataFrame") -> "pd.DataFrame":
        batch = batch.copy()
        batch["score"] = self.score_texts(batch[self.text_column].tolist())
        return batch
