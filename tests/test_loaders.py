"""Loaders read each real source format from small fixture files written in that exact format."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from definemed.config import ConfigError, parse_config
from definemed.data.loaders import (MCSourceConfig, MissingColumnError, SourceError, WebSourceConfig, count_web_rows, load_mc_items,
                                    load_prompts, normalise_subject, read_web_pandas, read_web_ray,
                                    sample_mc_config, sample_web_config)
from definemed.data.sample import SAMPLE_MEDQA, SAMPLE_MMLU, SAMPLE_PROMPTS, PROMPT_CATEGORIES
from definemed.data.schemas import FINEWEB2_COLUMNS

# ------------------------------------------------------------------------------------------------ fixtures


def _fineweb2_table(start: int, n: int) -> pa.Table:
    """Exactly FineWeb2's columns and types (HuggingFaceFW/fineweb-2, data/deu_Latn/train/*.parquet)."""
    return pa.table({
        "text": [f"Dokument {i}: Die Patientin erhielt Ramipril gegen Bluthochdruck." for i in range(start, start + n)],
        "id": [f"<urn:uuid:00000000-0000-4000-8000-{i:012d}>" for i in range(start, start + n)],
        "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://www.beispiel.example.de/seite/{i}" for i in range(start, start + n)],
        "date": ["2024-02-21T07:13:52Z"] * n,
        "file_path": ["s3://commoncrawl/crawl-data/CC-MAIN-2024-10/segments/1707947473347.0/warc/"
                      "CC-MAIN-20240220211055-20240221001055-00123.warc.gz"] * n,
        "language": ["deu"] * n,
        "language_score": pa.array([0.99] * n, pa.float64()),
        "language_script": ["Latn"] * n,
        "minhash_cluster_size": pa.array([1] * n, pa.int64()),
    })


@pytest.fixture()
def fineweb2_dir(tmp_path: Path) -> Path:
    d = tmp_path / "fineweb-2" / "data" / "deu_Latn" / "train"
    d.mkdir(parents=True)
    pq.write_table(_fineweb2_table(0, 3), d / "000_00000.parquet")
    pq.write_table(_fineweb2_table(3, 2), d / "000_00001.parquet")
    (d / ".000_00002.parquet.tmp").write_bytes(b"half-written")  # an in-flight temp file must be ignored
    return tmp_path / "fineweb-2"


MMMLU_CSV = """\
,Question,A,B,C,D,Answer,Subject
0,Welches Enzym spaltet Stärke im Mund?,Pepsin,Alpha-Amylase,Trypsin,Lipase,B,clinical_knowledge
1,Wie viele Halswirbel hat der Mensch?,5,7,12,"8, selten 9",B,anatomy
2,Was ist die SI-Einheit der Kraft?,Joule,Watt,Newton,Pascal,C,high_school_physics
3,"Welcher Wert ist ""normal"" für die Atemfrequenz, Erwachsene in Ruhe?",2-4/min,12-20/min,40-60/min,80-100/min,B,clinical_knowledge
4,Welche Aussage ist richtig?,NA,None,Keine,Alle,D,anatomy
"""


@pytest.fixture()
def mmmlu_csv(tmp_path: Path) -> Path:
    p = tmp_path / "mmlu_DE-DE.csv"  # file name as in openai/MMMLU test/
    p.write_text(MMMLU_CSV, encoding="utf-8")
    return p


@pytest.fixture()
def medqa_jsonl(tmp_path: Path) -> Path:
    """MMedBench/MedQA JSONL rows, with the keys they really carry."""
    rows = [
        {"question": "Welches Medikament ist bei anaphylaktischem Schock Mittel der ersten Wahl?",
         "answer": "Adrenalin i.m.",
         "options": {"A": "Prednisolon i.v.", "B": "Adrenalin i.m.", "C": "Clemastin i.v.", "D": "Salbutamol",
                     "E": "Ranitidin"},
         "meta_info": "step2&3", "answer_idx": "B", "rationale": "Adrenalin wirkt sofort.", "human_checked": 0},
        {"question": "Welcher Erreger verursacht am häufigsten eine ambulant erworbene Pneumonie?",
         "answer": "Streptococcus pneumoniae",
         "options": {"A": "Legionella pneumophila", "B": "Pseudomonas aeruginosa", "C": "Klebsiella pneumoniae",
                     "D": "Streptococcus pneumoniae", "E": "Candida albicans"},
         "meta_info": "step1", "answer_idx": "D", "rationale": "", "human_checked": 1},
    ]
    p = tmp_path / "medqa_de_test.jsonl"
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return p


@pytest.fixture()
def hf_mmlu_parquet(tmp_path: Path) -> Path:
    """cais/mmlu-style Parquet: question, subject, choices list<string>, answer int64."""
    t = pa.table({
        "question": ["Welcher Muskel beugt den Ellenbogen hauptsächlich?", "Welche Base paart mit Adenin in der DNA?"],
        "subject": ["anatomy", "medical_genetics"],
        "choices": pa.array([["M. triceps brachii", "M. brachialis", "M. deltoideus", "M. anconeus"],
                             ["Cytosin", "Guanin", "Thymin", "Uracil"]], pa.list_(pa.string())),
        "answer": pa.array([1, 2], pa.int64()),
    })
    p = tmp_path / "mmlu" / "test-00000-of-00001.parquet"
    p.parent.mkdir()
    pq.write_table(t, p)
    return p


# ------------------------------------------------------------------------------------------------ web documents


def test_read_fineweb2_dir_keeps_its_columns(fineweb2_dir):
    df = read_web_pandas(WebSourceConfig(path=str(fineweb2_dir)))
    assert list(df.columns) == list(FINEWEB2_COLUMNS)
    assert len(df) == 5 and df["id"].is_unique
    assert df["text"].iloc[3].startswith("Dokument 3")


def test_count_web_rows_from_footers(fineweb2_dir):
    assert count_web_rows(WebSourceConfig(path=str(fineweb2_dir))) == 5
    assert count_web_rows(WebSourceConfig(path=str(fineweb2_dir), limit=2)) == 2


def test_read_fineweb2_glob_uri_and_limit(fineweb2_dir):
    glob = str(fineweb2_dir / "data" / "deu_Latn" / "train" / "*_00001.parquet")
    assert len(read_web_pandas(WebSourceConfig(path=glob))) == 2
    uri = "file://" + str(fineweb2_dir / "data" / "deu_Latn" / "train")
    assert len(read_web_pandas(WebSourceConfig(path=uri, limit=4))) == 4


def test_remote_fsspec_path_is_read_through_the_filesystem(fineweb2_dir):
    """hf:// and s3:// go through fsspec; memory:// exercises the same code path offline."""
    import fsspec

    fs = fsspec.filesystem("memory")
    src = fineweb2_dir / "data" / "deu_Latn" / "train" / "000_00000.parquet"
    with fs.open("/fw2/deu_Latn/train/000_00000.parquet", "wb") as fh:
        fh.write(src.read_bytes())
    try:
        df = read_web_pandas(WebSourceConfig(path="memory://fw2/deu_Latn/train",
                                             columns={"id": None}, extra_columns=["language_score"]))
        assert list(df.columns) == ["text", "url", "language_score"] and len(df) == 3
        with pytest.raises(MissingColumnError, match="'body'.*memory://"):
            read_web_pandas(WebSourceConfig(path="memory://fw2/deu_Latn/train", columns={"text": "body"}))
    finally:
        fs.rm("/fw2", recursive=True)


def test_column_mapping_renames_and_drops_clashing_source_column(tmp_path):
    pq.write_table(pa.table({"content": ["Hallo Welt"], "doc_id": ["d1"], "link": ["https://a.example.de"],
                             "text": ["stale copy"], "quality": [0.5]}), tmp_path / "x.parquet")
    cfg = WebSourceConfig(path=str(tmp_path), columns={"text": "content", "id": "doc_id", "url": "link"})
    df = read_web_pandas(cfg)
    assert list(df.columns) == ["text", "id", "url", "quality"]
    assert df.iloc[0].to_dict() == {"text": "Hallo Welt", "id": "d1", "url": "https://a.example.de", "quality": 0.5}
    only = read_web_pandas(cfg.model_copy(update={"extra_columns": []}))
    assert list(only.columns) == ["text", "id", "url"]


def test_missing_web_column_names_column_and_file(fineweb2_dir):
    cfg = WebSourceConfig(path=str(fineweb2_dir), columns={"text": "content"})
    with pytest.raises(MissingColumnError) as e:
        read_web_pandas(cfg)
    msg = str(e.value)
    assert "'content'" in msg and "000_00000.parquet" in msg and "'text'" in msg
    assert isinstance(e.value, ConfigError)  # the CLI turns it into one line and exit 2
    with pytest.raises(MissingColumnError, match="'warc_id'"):
        read_web_pandas(WebSourceConfig(path=str(fineweb2_dir), extra_columns=["warc_id"]))


def test_missing_column_in_a_later_local_file_is_caught(fineweb2_dir):
    d = fineweb2_dir / "data" / "deu_Latn" / "train"
    pq.write_table(_fineweb2_table(9, 1).drop_columns(["url"]), d / "000_00009.parquet")
    with pytest.raises(MissingColumnError, match="'url'.*000_00009"):
        read_web_pandas(WebSourceConfig(path=str(fineweb2_dir)))


def test_web_config_errors_are_one_line_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="columns"):
        parse_config(WebSourceConfig, {"path": str(tmp_path), "columns": {"text": None}})
    with pytest.raises(ConfigError, match="columns"):
        parse_config(WebSourceConfig, {"path": str(tmp_path), "columns": {"id": "text"}})  # text mapped twice
    with pytest.raises(ConfigError, match="path"):
        parse_config(WebSourceConfig, {"path": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="format"):
        parse_config(WebSourceConfig, {"path": str(tmp_path), "format": "csv"})
    with pytest.raises(SourceError, match="no .parquet files"):
        read_web_pandas(WebSourceConfig(path=str(tmp_path)))


def test_sample_web_config_reads_bundled_shards():
    df = read_web_pandas(sample_web_config())
    assert len(df) >= 300 and set(df["gold_label"]) == {"medical", "non_medical"}


@pytest.mark.integration
def test_read_web_ray_streams_with_our_names(ray_local, tmp_path):
    import ray.data

    d = tmp_path / "renamed"
    d.mkdir()
    pq.write_table(_fineweb2_table(0, 4).rename_columns(
        ["content" if c == "text" else c for c in FINEWEB2_COLUMNS]), d / "a.parquet")
    ds = read_web_ray(WebSourceConfig(path=str(d), columns={"text": "content"}, extra_columns=["dump"]))
    assert isinstance(ds, ray.data.Dataset)
    rows = ds.take_all()
    assert len(rows) == 4 and set(rows[0]) == {"text", "id", "url", "dump"}
    assert sorted(r["text"] for r in rows)[0].startswith("Dokument 0")


# ------------------------------------------------------------------------------------------------ multiple choice


def test_mmmlu_csv_with_subject_filter(mmmlu_csv):
    items = load_mc_items(MCSourceConfig(path=str(mmmlu_csv), format="mmmlu",
                                         subjects=["Clinical Knowledge", "anatomy"]))
    assert [i.subject for i in items] == ["clinical_knowledge", "anatomy", "clinical_knowledge", "anatomy"]
    first = items[0]
    assert first.choices == ["Pepsin", "Alpha-Amylase", "Trypsin", "Lipase"]
    assert first.answer == 1 and first.answer_letter == "B" and first.benchmark == "mmlu"
    assert items[1].choices[3] == "8, selten 9"  # quoted comma survives
    assert items[2].question == 'Welcher Wert ist "normal" für die Atemfrequenz, Erwachsene in Ruhe?'
    assert items[3].choices[:2] == ["NA", "None"]  # not turned into missing values
    assert items[0].id == "mmlu/mmlu_DE-DE/0" and items[1].id == "mmlu/mmlu_DE-DE/1"
    all_items = load_mc_items(MCSourceConfig(path=str(mmmlu_csv), format="mmmlu"))
    assert len(all_items) == 5 and all_items[2].subject == "high_school_physics"


def test_mmmlu_missing_column_names_it(tmp_path):
    p = tmp_path / "mmlu_DE-DE.csv"
    p.write_text(MMMLU_CSV.replace(",Answer,", ",Antwort,"), encoding="utf-8")
    with pytest.raises(MissingColumnError, match="'Answer'.*mmlu_DE-DE.csv"):
        load_mc_items(MCSourceConfig(path=str(p), format="mmmlu"))
    items = load_mc_items(MCSourceConfig(path=str(p), format="mmmlu", columns={"answer": "Antwort"}))
    assert items[0].answer_letter == "B"


def test_medqa_jsonl(medqa_jsonl):
    items = load_mc_items(MCSourceConfig(path=str(medqa_jsonl), format="medqa"))
    assert len(items) == 2
    assert items[0].letters == list("ABCDE") and items[0].answer == 1
    assert items[0].choices[items[0].answer] == "Adrenalin i.m."
    assert items[1].answer_letter == "D" and items[1].subject == "step1" and items[0].subject == "step2_3"
    assert items[0].benchmark == "medqa"
    only = load_mc_items(MCSourceConfig(path=str(medqa_jsonl), format="medqa", subjects=["step1"]))
    assert [i.answer_letter for i in only] == ["D"]


def test_medqa_option_list_variant_and_invalid_answers(tmp_path):
    good = {"question": "Frage?", "options": [{"key": k, "value": f"Option {k}"} for k in "ABCD"],
            "answer_idx": "C"}
    multi = {"question": "Zwei richtige?", "options": {k: f"Antwort {k}" for k in "ABCDE"}, "answer_idx": "A,C"}
    p = tmp_path / "medqa.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps(multi) + "\n", encoding="utf-8")
    with pytest.raises(SourceError, match="row 1"):
        load_mc_items(MCSourceConfig(path=str(p), format="medqa"))
    items = load_mc_items(MCSourceConfig(path=str(p), format="medqa", on_invalid="skip"))
    assert len(items) == 1 and items[0].letters == list("ABCD") and items[0].answer_letter == "C"
    assert items[0].subject == "medqa"  # no meta_info: subject from the file name


def test_hf_mmlu_parquet(hf_mmlu_parquet):
    items = load_mc_items(MCSourceConfig(path=str(hf_mmlu_parquet.parent), format="mmlu"))
    assert [(i.subject, i.answer_letter) for i in items] == [("anatomy", "B"), ("medical_genetics", "C")]
    assert items[1].choices == ["Cytosin", "Guanin", "Thymin", "Uracil"]


def test_mc_invalid_items_are_errors(tmp_path):
    p = tmp_path / "bad.jsonl"
    rows = [{"question": "A?", "choices": ["x", "y", "z", "w"], "answer": 4, "subject": "anatomy"},
            {"question": "B?", "choices": ["x", "x", "z", "w"], "answer": 0, "subject": "anatomy"},
            {"question": "C?", "choices": ["x", "y", "z", "w"], "answer": True, "subject": "anatomy"}]
    p.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    with pytest.raises(SourceError, match="row 0.*out of range"):
        load_mc_items(MCSourceConfig(path=str(p), format="mmlu"))
    with pytest.raises(SourceError, match="no items"):
        load_mc_items(MCSourceConfig(path=str(p), format="mmlu", on_invalid="skip"))


def test_mc_config_validation(tmp_path, mmmlu_csv):
    with pytest.raises(ConfigError, match="format"):
        parse_config(MCSourceConfig, {"path": str(mmmlu_csv), "format": "mmlu_pro"})
    with pytest.raises(ConfigError, match="unknown column key"):
        parse_config(MCSourceConfig, {"path": str(mmmlu_csv), "format": "mmmlu", "columns": {"E": "E"}})
    with pytest.raises(ConfigError, match="must be mapped"):
        parse_config(MCSourceConfig, {"path": str(mmmlu_csv), "format": "mmmlu", "columns": {"A": None}})


def test_bundled_mc_samples_load_with_their_answers():
    mmlu = load_mc_items(sample_mc_config("mmlu"))
    raw = [json.loads(l) for l in SAMPLE_MMLU.read_text(encoding="utf-8").splitlines() if l.strip()]
    assert len(mmlu) == len(raw) >= 120
    assert all(i.choices[i.answer] == r["choices"][r["answer"]] for i, r in zip(mmlu, raw))
    medqa = load_mc_items(sample_mc_config("medqa"))
    raw = [json.loads(l) for l in SAMPLE_MEDQA.read_text(encoding="utf-8").splitlines() if l.strip()]
    assert len(medqa) == len(raw) >= 60
    assert all(i.choices[i.answer] == r["options"][r["answer_idx"]] for i, r in zip(medqa, raw))
    assert len(load_mc_items(sample_mc_config("mmlu", subjects=["anatomy"], limit=5))) == 5


def test_normalise_subject():
    assert normalise_subject("Clinical Knowledge") == normalise_subject("clinical-knowledge") == "clinical_knowledge"


# ------------------------------------------------------------------------------------------------ prompts


def test_load_prompts_sample_and_filter():
    prompts = load_prompts(SAMPLE_PROMPTS)
    assert len(prompts) >= 60 and {p.category for p in prompts} == set(PROMPT_CATEGORIES)
    dd = load_prompts(SAMPLE_PROMPTS, categories=["differential_diagnosis"])
    assert dd and all(p.category == "differential_diagnosis" for p in dd)


def test_load_prompts_errors(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "category": "x", "prompt": "Hallo"}\n{"id": "a", "category": "x", "prompt": "Du"}\n')
    with pytest.raises(SourceError, match="duplicate prompt ids"):
        load_prompts(p)
    p.write_text('{"id": "a", "kategorie": "x", "prompt": "Hallo"}\n')
    with pytest.raises(MissingColumnError, match="'category'"):
        load_prompts(p)
