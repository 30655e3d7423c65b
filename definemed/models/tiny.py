"""Tiny, randomly initialised models of the study's real architectures, for the demo and the tests.

Shapes respect vLLM's CPU attention kernel (head_dim 64). Each model gets a byte-level BPE tokenizer trained on
the bundled German sample text and the chat template of the family it imitates. Built once per
(name, seed, spec, corpus) and cached under $DEFINEMED_CACHE/tiny.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from definemed.cache import build_once, cache_root

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] in ['user', 'system'] %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class TinySpec:
    family: str  # qwen2 | mistral | xlm-roberta
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 256
    vocab_size: int = 4096
    max_position_embeddings: int = 2048
    extra: dict = field(default_factory=dict)


SPECS: dict[str, TinySpec] = {
    # Qwen2.5-7B-Instruct / Mistral-7B-Instruct-v0.3 shapes scaled down; head_dim = 128 / 2 = 64.
    "qwen2": TinySpec("qwen2"),
    "mistral": TinySpec("mistral"),
    # xlm-roberta-base scaled down, as a binary sequence classifier.
    "xlm-roberta": TinySpec("xlm-roberta", hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                            vocab_size=4096, max_position_embeddings=514),
}

_FALLBACK_TEXT = (
    "Der Patient klagt über Brustschmerzen und Atemnot. Die Ärztin verordnet Ramipril gegen Bluthochdruck. "
    "Das Herz pumpt Blut durch den Körper. Heute scheint die Sonne über Berlin, und der Zug fährt pünktlich. "
    "Welche Diagnose ist am wahrscheinlichsten? Antwort: B. Die Pflegekraft misst Blutdruck und Puls."
)


def tokenizer_corpus() -> list[str]:
    """Bundled German text for tokenizer training (sample web docs and MC items when present)."""
    texts: list[str] = []
    try:
        from definemed.data.sample import iter_tokenizer_texts

        texts = list(iter_tokenizer_texts())
    except ImportError:
        pass
    return texts or [_FALLBACK_TEXT]


def _fingerprint(name: str, seed: int, spec: TinySpec, texts: list[str]) -> str:
    h = hashlib.sha256(json.dumps({"name": name, "seed": seed, "spec": asdict(spec), "v": 1}, sort_keys=True).encode())
    for t in texts:
        h.update(t.encode("utf-8"))
    return h.hexdigest()[:12]


def _train_tokenizer(spec: TinySpec, texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if spec.family == "qwen2":
        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    elif spec.family == "mistral":
        special = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    else:
        special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token=None if spec.family == "qwen2" else "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if spec.family == "qwen2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       additional_special_tokens=["<|im_start|>", "<|im_end|>"])
        fast.chat_template = QWEN_CHAT_TEMPLATE
    elif spec.family == "mistral":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token="</s>", additional_special_tokens=["[INST]", "[/INST]"])
        fast.chat_template = MISTRAL_CHAT_TEMPLATE
    else:
        tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                          ("<s>", tok.token_to_id("<s>")))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                       sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    fast.model_max_length = spec.max_position_embeddings if spec.family != "xlm-roberta" else 512
    return fast


def _model_config(spec: TinySpec, tok):
    from transformers import MistralConfig, Qwen2Config, XLMRobertaConfig

    common = dict(vocab_size=len(tok), hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                  num_attention_heads=spec.num_heads, intermediate_size=spec.intermediate_size,
                  max_position_embeddings=spec.max_position_embeddings)
    if spec.family == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=spec.num_kv_heads, tie_word_embeddings=True,
                           rope_theta=1_000_000.0, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                           pad_token_id=tok.pad_token_id, bos_token_id=None, torch_dtype="float32")
    if spec.family == "mistral":
        return MistralConfig(**common, num_key_value_heads=spec.num_kv_heads, head_dim=spec.hidden_size // spec.num_heads,
                             tie_word_embeddings=False, sliding_window=None, rope_theta=1_000_000.0,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, torch_dtype="float32")
    return XLMRobertaConfig(**common, num_labels=2, id2label={0: "non_medical", 1: "medical"},
                            label2id={"non_medical": 0, "medical": 1}, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, type_vocab_size=1,
                            torch_dtype="float32")


def tiny_dir(name: str, seed: int = 0) -> Path:
    """Where tiny model `name` is (or will be) cached: the name carries its fingerprint."""
    if name not in SPECS:
        raise ValueError(f"unknown tiny model '{name}', choose one of {sorted(SPECS)}")
    return cache_root() / "tiny" / f"{name}-s{seed}-{_fingerprint(name, seed, SPECS[name], tokenizer_corpus())}"


def build_tiny_model(name: str, seed: int = 0, force: bool = False) -> Path:
    """Return the cached directory of tiny model `name`, building it under a file lock if needed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from definemed.io import atomic_dir

    out = tiny_dir(name, seed)
    spec = SPECS[name]
    texts = tokenizer_corpus()

    def build(out: Path) -> None:
        # The tokenizer depends only on the corpus, so all seeds of one family share a vocabulary (merge needs it).
        tok = _train_tokenizer(spec, texts)
        cfg = _model_config(spec, tok)
        torch.manual_seed(seed)
        auto = AutoModelForSequenceClassification if spec.family == "xlm-roberta" else AutoModelForCausalLM
        model = auto.from_config(cfg, dtype=torch.float32)
        with atomic_dir(out, overwrite=force) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "TINY_MODEL.md").write_text(
                f"Tiny randomly initialised {spec.family} model '{name}' (seed {seed}) built by definemed for "
                "tests and the demo. Its outputs carry no meaning.\n", encoding="utf-8")

    return build_once(out, build, force=force)
