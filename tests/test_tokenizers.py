"""Tokenizer fertility, split share and parity: hand-counted definitions, the offline sources, the bundled parallel
set and the stage end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from definemed.text import word_spans, words
from definemed.tokenizers.fertility import SetMeasure, split_count, tokens_per_word
from definemed.tokenizers.sources import load_counter, spans_from_pieces

REPO = Path(__file__).resolve().parents[1]
V3 = "mistral_common:mistral_instruct_tokenizer_240323.model.v3"

# A word-level tokenizer whose counts are known by hand: whitespace, then punctuation (hyphens too) isolated, then
# digit runs apart from letters.
VOCAB = ["[UNK]", "Der", "Magen", "-", "Darm", "Trakt", "schmerzt", ",", "10", "mg", "Ibuprofen", "helfen", ".",
         "The", "gastrointestinal", "tract", "hurts", "Fieber", "Fever"]


@pytest.fixture(scope="module")
def word_level(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                                 pre_tokenizers.Digits(individual_digits=False)])
    out = tmp_path_factory.mktemp("wordlevel")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(out))
    return str(out)


def test_fertility_and_split_share_on_a_hand_counted_text(word_level):
    text = "Der Magen-Darm-Trakt schmerzt, 10mg Ibuprofen helfen."
    # words: Der | Magen-Darm-Trakt | schmerzt | 10 | mg | Ibuprofen | helfen                      -> 7
    # tokens: Der | Magen - Darm - Trakt | schmerzt , | 10 mg | Ibuprofen | helfen .              -> 13
    # tokens per word: 1, 5 (the hyphens lie inside the compound), 1, 1, 1, 1, 1: one word split
    assert len(words(text)) == 7
    c = load_counter("wl", word_level, family="smollm2")
    n, spans = c.encode([text])[0]
    assert n == 13
    assert tokens_per_word(word_spans(text), spans) == [1, 5, 1, 1, 1, 1, 1]
    m = SetMeasure(["wl"], parallel=False)
    m.add_batch([c], [text, "Fieber."])  # + 1 word, 2 tokens ("Fieber", ".")
    r = m.results(n_boot=200)["wl"]
    assert (r["words"], r["tokens"], r["split_words"]) == (8, 15, 1)
    assert r["fertility"] == pytest.approx(15 / 8) and r["split_share"] == pytest.approx(1 / 8)
    assert r["fertility_lo"] <= r["fertility"] <= r["fertility_hi"]


def test_parity_is_the_ratio_of_totals_over_pairs(word_level):
    c = load_counter("wl", word_level, family="smollm2")
    de = ["Der Magen-Darm-Trakt schmerzt.", "Fieber."]  # 8 and 2 tokens
    en = ["The gastrointestinal tract hurts.", "Fever."]  # 5 and 2 tokens
    m = SetMeasure(["wl"], parallel=True)
    m.add_batch([c], de, en)
    r = m.results(n_boot=200)["wl"]
    assert (r["tokens"], r["tokens_en"]) == (10, 7)
    # Petrov et al.: total German tokens / total English tokens (10/7), not the mean of per-pair ratios (1.3)
    assert r["parity"] == pytest.approx(10 / 7)
    assert r["parity_lo"] <= r["parity"] <= r["parity_hi"]
    assert r["fertility_en"] == pytest.approx(7 / 5)  # English words: The gastrointestinal tract hurts Fever


def test_a_token_is_attributed_to_every_word_it_overlaps():
    w = [(0, 3), (4, 9), (10, 12)]  # "Die Niere li"
    assert tokens_per_word(w, [(0, 3), (3, 6), (6, 9), (9, 12)]) == [1, 2, 1]  # " Ni" + "ere"; " li"
    assert tokens_per_word(w, [(0, 6), (6, 12)]) == [1, 2, 1]  # a token across two words counts for both
    assert tokens_per_word(w, [(3, 4), (5, 5)]) == [0, 0, 0]  # a lone space and an empty span: no word
    assert split_count(w, [(0, 1), (1, 3), (4, 9), (10, 11), (11, 12)]) == 2


def test_byte_pieces_map_back_to_characters():
    # SentencePiece's dummy prefix, a two-byte character split over two byte-fallback pieces
    assert spans_from_pieces("Öl ab", [b" \xc3", b"\x96l", b" ab"]) == [(0, 1), (0, 2), (2, 5)]
    assert spans_from_pieces("ab", [b"a", b"b"]) == [(0, 1), (1, 2)]
    assert spans_from_pieces("ab", [b"A", b"b"]) is None  # a normalising tokenizer: left out of the split share


def test_mistral_tokenizers_count_without_bos_eos_and_round_trip():
    from definemed.data.sample import SAMPLE_PARALLEL

    rows = [json.loads(x) for x in SAMPLE_PARALLEL.read_text(encoding="utf-8").splitlines()]
    texts = [r["de"] for r in rows] + [r["en"] for r in rows]
    for src in (V3, "mistral_common:tekken_240911.json"):
        c = load_counter("m", src)
        assert c.family in ("mistral-7b-v0.3", "mistral-small") and not c.tiny
        assert c.vocab_size == (32768 if src == V3 else 131072)
        for t, (n, spans) in zip(texts, c.encode(texts)):
            ids = c.tok.encode(t, bos=False, eos=False)
            assert n == len(ids) and c.tok.bos_id not in ids and c.tok.eos_id not in ids
            assert c.tok.decode(ids) == t and spans is not None  # every sentence maps back to its characters


def test_gguf_smollm2_tokenizer_restores_the_digit_split_its_gguf_names(real_smollm2):
    """The GGUF names llama.cpp's 'smollm' pre-tokenizer (every digit isolated first); transformers' conversion
    drops that step. Restored, "\\n\\n1." is "\\n\\n" "1" "." as SmolLM2 was trained; converted as is, "\\n" "\\n"."""
    import gguf
    from importlib import metadata
    from transformers import AutoTokenizer

    from definemed.models.real import REAL_MODELS

    spec = REAL_MODELS["smollm2-135m-instruct"]
    reader = gguf.GGUFReader(str(metadata.distribution(spec.package).locate_file(spec.gguf_file)))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    c = load_counter("smollm2", "real://smollm2-135m-instruct")
    text = "Therapie:\n\n1. Ruhe"
    n, spans = c.encode([text])[0]
    pieces = [text[a:b] for a, b in spans]
    assert "\n\n" in pieces and pieces[pieces.index("\n\n"):][:3] == ["\n\n", "1", "."], pieces
    hf = AutoTokenizer.from_pretrained(real_smollm2)
    assert len(hf(text, add_special_tokens=False).input_ids) == n + 1  # the conversion as it is
    # Elsewhere the two agree: an English sentence without digits after a blank line
    s = "The patient reports chest pain."
    assert c.encode([s])[0][0] == len(hf(s, add_special_tokens=False).input_ids)


def test_gguf_gemma_tokenizer_behaves_as_gemma_3s(real_gemma):
    """What Gemma 3's tokenizer is documented to do: <bos> opens a text only with special tokens on, every digit is
    its own token, whitespace is kept (decoding gives the text back), 262,144 entries."""
    import re

    from definemed.data.sample import SAMPLE_PARALLEL

    c = load_counter("gemma-3", "real://gemma-3-270m")
    hf = c.hf  # the transformers tokenizer the counter's backend belongs to (loading 262k entries twice is slow)
    assert hf.name_or_path == real_gemma
    assert c.vocab_size == 262144 and c.family == "gemma-3"
    texts = [json.loads(x)["de"] for x in SAMPLE_PARALLEL.read_text(encoding="utf-8").splitlines()]
    texts.append("Puls  128/min,\tRR 90/60 mmHg\n\nSpO2 88 %")
    for t, (n, spans) in zip(texts, c.encode(texts)):
        ids = hf(t, add_special_tokens=False).input_ids
        assert n == len(ids) and hf(t).input_ids == [hf.bos_token_id] + ids
        assert hf.decode(ids) == t
        assert all(not re.search(r"\d\D|\D\d|\d\d", t[a:b].strip()) for a, b in spans)


def test_bundled_parallel_set_is_complete():
    from definemed.data.sample import SAMPLE_PARALLEL

    rows = [json.loads(x) for x in SAMPLE_PARALLEL.read_text(encoding="utf-8").splitlines() if x.strip()]
    assert len(rows) >= 100
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert all(set(r) == {"id", "topic", "de", "en"} for r in rows)
    assert all(r["de"].strip() and r["en"].strip() and r["de"] != r["en"] for r in rows)
    assert {r["topic"] for r in rows} >= {"symptoms", "drugs_doses", "lab_values", "discharge_letter",
                                          "patient_information", "anatomy"}
    assert sum(any(ch in r["de"] for ch in "äöüÄÖÜß") for r in rows) >= len(rows) // 2  # German, with umlauts


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.tokenizers", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_bad_config_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("output_dir: o\ntokenizers:\n  - {name: x, source: /nowhere}\nsets:\n  - {name: p, kind: parallel, "
                   "description: d, path: definemed/data/sample/src/mmlu_de.jsonl}\n")
    r = _cli("--config", str(bad))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "tokenizers.0.source" in lines[0], r.stderr
    bad.write_text("output_dir: o\ntokenizers:\n  - {name: x, source: /work, family: llama}\nsets: []\n")
    r = _cli("--config", str(bad))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_stage_end_to_end_on_the_bundled_sets(tmp_path, real_smollm2):
    import yaml

    from definemed.config import load_config
    from definemed.lineage import DONE_MARKER, MANIFEST_NAME
    from definemed.stages import get_stage, run_stage

    base = yaml.safe_load((REPO / "configs" / "tokenizers.yaml").read_text())
    base["output_dir"] = str(tmp_path / "tok")
    base["tokenizers"] = [t for t in base["tokenizers"] if t["name"] in ("mistral-v3", "smollm2", "qwen2-tiny")]
    for s in base["sets"]:
        if s.get("kind") != "parallel":
            s["limit"] = 25
    base["n_boot"] = 200
    cfg_path = tmp_path / "t.yaml"
    cfg_path.write_text(yaml.safe_dump(base))
    stage = get_stage("tokenizers")
    out = run_stage(stage, load_config(stage.config_model(), cfg_path))
    doc = json.loads(Path(out["table_json"]).read_text())
    rows = {(r["tokenizer"], r["set"]): r for r in doc["rows"]}
    assert len(rows) == 9
    for r in rows.values():
        assert r["fertility"] == pytest.approx(r["tokens"] / r["words"])
        assert r["fertility_lo"] <= r["fertility"] <= r["fertility_hi"] and 0 < r["split_share"] < 1
    assert rows[("mistral-v3", "finemed_de")]["texts"] == 25
    par = rows[("smollm2", "parallel_med")]
    assert par["texts"] == 120 and par["parity"] == pytest.approx(par["tokens"] / par["tokens_en"])
    # English-centred SmolLM2 pays more for German than Mistral's multilingual-leaning v3 tokenizer
    assert par["parity_lo"] > rows[("mistral-v3", "parallel_med")]["parity_hi"]
    assert rows[("qwen2-tiny", "finemed_de")]["tiny"] and not par["tiny"]
    md = Path(out["table_md"]).read_text()
    assert "qwen2-tiny (tiny)" in md and "Qwen2.5: not measured" in md
    assert Path(out["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert len(Path(out["table_csv"]).read_text().splitlines()) == 10
    assert (tmp_path / "tok" / DONE_MARKER).exists() and (tmp_path / "tok" / MANIFEST_NAME).exists()
    lineage = json.loads((tmp_path / "tok" / MANIFEST_NAME).read_text())
    assert lineage["inputs"]["tokenizers.mistral-v3"]["hash"].startswith("sha256:")  # the file the package ships


def test_cluster_config_validates_for_the_plan():
    """configs/cluster/tokenizers.yaml names /models and /data paths that exist only on the cluster: it must validate
    the way `definemed plan` validates (paths unchecked), with Qwen2.5's own tokenizer listed."""
    from definemed.config import load_yaml, parse_config
    from definemed.tokenizers.config import TokenizersConfig

    data = load_yaml(REPO / "configs" / "cluster" / "tokenizers.yaml")
    cfg = parse_config(TokenizersConfig, data, context={"plan_only": True})
    from definemed.tokenizers.sources import known

    families = {t.family or known(t.source).family for t in cfg.tokenizers}
    assert families == {"qwen2.5", "mistral-7b-v0.3", "mistral-small", "gemma-3", "smollm2"}
    assert cfg.output_dir.startswith("/data/")


def test_a_missing_column_is_named_before_any_work():
    from definemed.config import ConfigError
    from definemed.data.sample import SAMPLE_WEB_DIR
    from definemed.tokenizers.config import DocumentSet
    from definemed.tokenizers.sets import check_document_set

    s = DocumentSet(name="x", description="d", path=str(SAMPLE_WEB_DIR), where={"label": "medical"})
    with pytest.raises(ConfigError, match="column 'label' not found"):
        check_document_set(s)
    assert check_document_set(s.model_copy(update={"where": {"gold_label": "medical"}})) == 322  # rows before where
