"""Classifier scoring: P(medical) for a batch of texts. One class serves the filter's Ray Data actor pool, the
classifier's held-out evaluation and the single-process baseline of the benchmark, so they run identical code."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import pyarrow as pa


def medical_index(model) -> int:
    label2id = {str(k).lower(): v for k, v in (model.config.label2id or {}).items()}
    return int(label2id.get("medical", 1))


class Scorer:
    """Callable class for `Dataset.map_batches(Scorer, compute=ActorPoolStrategy(...))`: the model loads once
    per actor. `score` is appended to the batch (Arrow or pandas).

    `torch_threads` pins intra-op threads: an actor given 1 CPU by Ray must not run a thread per core, or actors
    sharing a node fight over the cores. On a GPU the forward pass runs under bf16 autocast. `micro_batch` splits a batch into length-sorted chunks so each chunk
    pads only to its own longest text (scores are returned in input order)."""

    def __init__(self, model_dir: str, max_length: int = 256, device: str | None = None,
                 text_column: str = "text", torch_threads: int | None = None, micro_batch: int | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(self.device).eval()
        self.pos = medical_index(self.model)
        self.max_length = max_length
        self.text_column = text_column
        self.micro_batch = micro_batch

    def _forward(self, texts: list[str]) -> list[float]:
        import torch

        enc = self.tok(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        # bf16 autocast on GPUs (tensor cores); CPU scores stay fp32, so the demo's thresholds do not move
        gpu = str(self.device).startswith("cuda")
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
        return torch.softmax(logits.float(), dim=-1)[:, self.pos].cpu().tolist()

    def score_texts(self, texts: Iterable[str]) -> list[float]:
        texts = list(texts)
        if not texts:
            return []
        if not self.micro_batch or len(texts) <= self.micro_batch:
            return self._forward(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = [0.0] * len(texts)
        for s in range(0, len(order), self.micro_batch):
            idx = order[s:s + self.micro_batch]
            for i, p in zip(idx, self._forward([texts[i] for i in idx])):
                out[i] = p
        return out

    def __call__(self, batch):
        import pyarrow as pa

        if isinstance(batch, pa.Table):
            scores = self.score_texts(batch.column(self.text_column).to_pylist())
            return batch.append_column("score", pa.array(scores, type=pa.float64()))
        batch = batch.copy()
        batch["score"] = self.score_texts(batch[self.text_column].tolist())
        return batch


# A cheap stand-in for the classifier (dry runs, scale benchmarks): the density of German medical word stems,
# counted by Arrow's regex kernel. It has no model to load and costs microseconds a document, so a benchmark
# measures the pipeline around the scorer; its keep decisions are crude and never the study's.
MEDICAL_STEMS = (r"\b(?:patient|therap|diagnos|symptom|klinik|ärzt|arzt|medikament|behandl|erkrank|infekt|dosis|"
                 r"leitlinie|krank|schmerz|blut|herz|tablette|mg\b|operation|chirurg|entzünd|syndrom|virus|bakteri|"
                 r"impf|pflege|station|notfall|labor|befund|tumor|krebs|diabet|insulin|fieber)")
KEYWORD_FULL_DENSITY = 0.04  # stems per whitespace token at which the score reaches 1


def keyword_score(batch: "pa.Table", text_column: str = "text") -> "pa.Table":
    import pyarrow as pa
    import pyarrow.compute as pc

    text = batch.column(text_column)
    hits = pc.count_substring_regex(pc.utf8_lower(text), MEDICAL_STEMS).cast(pa.float64())
    tokens = pc.max_element_wise(pc.count_substring_regex(text, r"\S+").cast(pa.float64()), 1.0)
    score = pc.min_element_wise(pc.divide(pc.divide(hits, tokens), KEYWORD_FULL_DENSITY), 1.0)
    return batch.append_column("score", score)
