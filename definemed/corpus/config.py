"""Configs of the corpus stages. Laptop and cluster YAMLs differ only in sizes, model paths and the Ray address."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from definemed.config import InputPath, StageConfig, StrictModel, not_below
from definemed.models.registry import ModelRef
from definemed.data.loaders import MCSourceConfig, WebSourceConfig
from definemed.engine import EngineConfig

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"


class _WebStage(StageConfig):
    source: WebSourceConfig
    # Longer texts go to quarantine ("oversized"): FineWeb2 has a few multi-MB pages that stall tokenisers.
    max_text_chars: int = Field(200_000, ge=1)


class HttpBackendConfig(StrictModel):
    """Any OpenAI-compatible endpoint (our own serve app, vLLM's server, a hosted API)."""

    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str  # the served model name sent in each request
    api_key_env: str | None = "OPENAI_API_KEY"  # read from the environment, never from the YAML
    # How the endpoint takes a fixed choice: vLLM >= 0.11 "structured_outputs", older vLLM "guided_choice".
    choice_field: Literal["structured_outputs", "guided_choice", "none"] = "structured_outputs"
    concurrency: int = Field(1, ge=1)
    qps: int | None = Field(None, ge=1)
    max_retries: int = Field(3, ge=0)


class AnnotateConfig(_WebStage):
    sample_size: int = Field(260_000, ge=1)
    seed: int = 0
    shard_size: int = Field(1000, ge=1)  # unit of resume: a finished shard is never labelled again
    prompt_version: str = "v1"
    max_doc_chars: int = Field(4000, ge=100)  # the document is cut to this many characters inside the prompt
    backend: Literal["vllm", "http"] = "vllm"
    model: ModelRef = "tiny://qwen2"  # vLLM backend: tiny://..., a local path or a hub id
    engine: EngineConfig = EngineConfig(max_model_len=2048)
    min_replicas: int = Field(1, ge=1, description="vLLM engine replicas (Ray Data actors) started first")
    max_replicas: int = Field(1, ge=1, description="Ray Data grows up to this many replicas while the cluster has "
                                                   "free resources and work is queued (= min_replicas: fixed pool)")
    batch_size: int = Field(32, ge=1)
    max_tokens: int = Field(16, ge=4)  # must cover the longest label in tokens, or labels get cut
    http: HttpBackendConfig | None = None
    gold_column: str | None = "gold_label"  # human labels for the quality report, when the source has them
    bootstrap: int = Field(1000, ge=0)

    @field_validator("prompt_version")
    @classmethod
    def _prompt_exists(cls, v: str) -> str:
        if not (PROMPT_DIR / f"annotate_{v}.txt").exists():
            known = sorted(p.stem.removeprefix("annotate_") for p in PROMPT_DIR.glob("annotate_*.txt"))
            raise ValueError(f"unknown prompt version '{v}', known: {known}")
        return v

    _replica_bounds = not_below("min_replicas", "max_replicas")

    def replica_bounds(self) -> tuple[int, int]:
        """ray.data.llm `concurrency`: always a (min, max) tuple, because an int n means 1..n there."""
        return self.min_replicas, self.max_replicas

    @field_validator("http")
    @classmethod
    def _http_for_http_backend(cls, v: HttpBackendConfig | None, info: ValidationInfo) -> HttpBackendConfig | None:
        if v is None and info.data.get("backend") == "http":  # a field error, so the message names 'http'
            raise ValueError("backend 'http' needs this section (base_url, model)")
        return v


class ClassifyConfig(StageConfig):
    annotations: InputPath  # the annotate stage's output_dir
    # llm: the annotator's labels (the study). gold: the sample's human labels (the demo: a tiny random
    # annotator's labels are noise, so training on them would prove nothing).
    label_source: Literal["llm", "gold"] = "llm"
    gold_column: str = "gold_label"
    model: ModelRef = "tiny://xlm-roberta"
    num_workers: int = Field(2, ge=1)  # Ray Train data-parallel workers
    use_gpu: bool = False
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1)  # per worker
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    max_length: int = Field(256, ge=8)
    threshold: float = Field(0.9, gt=0, lt=1)  # decision threshold for "medical" (study: 0.9)
    beta: float = Field(0.7, gt=0)  # early stopping on F-beta at the threshold (study: 0.7)
    patience: int = Field(2, ge=1)  # epochs without F-beta improvement before stopping
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    seed: int = 0
    sweep: list[float] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95]


class DecontamConfig(StrictModel):
    enabled: bool = True
    ngram: int = Field(13, ge=3)
    # Items shorter than `ngram` words but at least this long are matched whole; shorter ones are counted only.
    min_item_words: int = Field(8, ge=1)
    mc: list[MCSourceConfig] = []
    prompts: list[InputPath] = []


class FuzzyDedupConfig(StrictModel):
    """MinHash LSH near-duplicate removal (word n-gram shingles, bands x rows permutations, 64-bit hashes)."""

    enabled: bool = True
    ngram: int = Field(5, ge=1)  # word n-gram shingles
    bands: int = Field(14, ge=1)  # 14 x 8 = 112 permutations: candidate pairs from Jaccard ~0.72 (datatrove)
    rows: int = Field(8, ge=1)
    seed: int = 1  # permutation seed: fixed so a rerun removes the same documents


class FilterConfig(_WebStage):
    classifier: InputPath  # an HF model directory (the classify-train stage's model/)
    # classifier: the model above in an actor pool (the study). keywords: a medical-stem density score with no
    # model, for dry runs and the scale benchmark only; its keep decisions are crude.
    scorer: Literal["classifier", "keywords"] = "classifier"
    threshold: float = Field(0.9, gt=0, lt=1)
    min_actors: int = Field(1, ge=1)  # autoscaling scorer pool (Ray Data ActorPoolStrategy)
    max_actors: int = Field(2, ge=1)
    batch_size: int = Field(64, ge=1)
    max_length: int = Field(256, ge=8)
    num_cpus_per_actor: float = Field(1.0, gt=0)
    num_gpus_per_actor: float = Field(0.0, ge=0)
    # Rows per part of the scoring pass: one task of the scorer pool, one output file with its completion marker,
    # the unit a killed run resumes from. Many parts keep every actor busy; at corpus scale, larger parts mean
    # fewer files (427.7M docs / 2048 = 209k parts).
    block_rows: int = Field(2048, ge=1)
    # Score only: a torch thread count per actor (None = the actor's CPUs) and length-sorted micro-batches.
    torch_threads: int | None = Field(None, ge=1)
    micro_batch: int | None = Field(None, ge=1)
    dedup: bool = True
    fuzzy_dedup: FuzzyDedupConfig = FuzzyDedupConfig()
    # Hash partitions of the dedup shuffles; None: one per `rows_per_partition` rows (at least 1).
    shuffle_partitions: int | None = Field(None, ge=1)
    rows_per_partition: int = Field(100_000, ge=1)
    decontam: DecontamConfig = DecontamConfig()
    pii: bool = True

    _pool = not_below("min_actors", "max_actors")
