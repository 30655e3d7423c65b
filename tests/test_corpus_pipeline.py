"""Acceptance tests of the corpus stages on the bundled sample with tiny models (one shared local Ray)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from definemed.config import ConfigError

pytestmark = pytest.mark.integration


def _echo_gold_labeler(ds):
    """Test double for the LLM (unit of resume only): answers from a hash of the id, one in seven garbled."""
    import hashlib

    def f(df: pd.DataFrame) -> pd.DataFrame:
        h = [int(hashlib.md5(i.encode()).hexdigest(), 16) for i in df["id"]]
        raw = ["kaputt" if x % 7 == 0 else "medizinisch" if x % 2 else "nicht medizinisch" for x in h]
        return pd.DataFrame({"id": df["id"], "shard": df["shard"], "raw_answer": raw, "error": None})

    return ds.map_batches(f, batch_format="pandas")


def _annotate_cfg(out: Path, **kw):
    from definemed.corpus.config import AnnotateConfig
    from definemed.data.loaders import sample_web_config

    return AnnotateConfig(output_dir=str(out), source=sample_web_config(), **{"sample_size": 1000, "shard_size": 64,
                                                                               **kw})


@pytest.fixture(scope="module")
def annotated(ray_local, tmp_path_factory):
    """The whole bundled sample labelled in one uninterrupted run (by the test double)."""
    from definemed.corpus.stage import run_annotate

    out = tmp_path_factory.mktemp("corpus") / "annotate_full"
    run_annotate(_annotate_cfg(out), labeler=_echo_gold_labeler)
    return out


def test_annotate_with_vllm_engine_labels_every_sampled_doc(ray_local, tmp_path):
    from definemed.corpus.annotate import CHOICES
    from definemed.stages import STAGES, run_stage

    cfg = _annotate_cfg(tmp_path / "ann", sample_size=24, shard_size=12, model="tiny://qwen2", batch_size=24)
    outputs = run_stage(STAGES["annotate"], cfg)
    labels = pd.read_parquet(outputs["labels"])
    sample = pd.concat(pd.read_parquet(p) for p in sorted(Path(outputs["sample"]).glob("shard-*.parquet")))
    assert len(sample) == 24 and sorted(labels["id"]) == sorted(sample["id"])
    # constrained decoding: every answer is one of the choices, so no label is unparsed
    assert set(labels["label"]) <= {"medical", "non_medical"}
    assert set(labels["raw_answer"]) <= set(CHOICES)
    assert (labels["model"] == "tiny://qwen2").all() and (labels["prompt_version"] == "v1").all()
    quality = json.loads(Path(outputs["quality_json"]).read_text())
    assert quality["n_compared"] == 24 and "noise" in quality["note"]
    assert (tmp_path / "ann" / "lineage.json").exists()


def _slow_echo_labeler(ds):
    """The test double answering slowly (one task at a time, 8 rows per 0.1 s): a kill lands half-way."""
    import time

    def f(df: pd.DataFrame) -> pd.DataFrame:
        time.sleep(0.1)
        return df

    return _echo_gold_labeler(ds.map_batches(f, batch_format="pandas", batch_size=8, concurrency=1))


def test_annotation_killed_mid_shard_resumes_to_identical_output(annotated, tmp_path):
    import pyarrow.parquet as pq

    from definemed.corpus.annotate import check_resumable
    from definemed.corpus.stage import run_annotate
    from tests.killer import kill_when

    full = pd.read_parquet(annotated / "labels.parquet")
    assert full["id"].is_unique and len(list((annotated / "sample").glob("shard-*.parquet"))) >= 3
    assert (full["label"] == "unparsed").sum() > 0  # garbled answers are counted, never guessed

    out = tmp_path / "ann"
    ann = out / "annotations"

    def labelled() -> int:
        files = [*ann.glob("shard-*.parquet"), *ann.glob("shard-*.parts/*.parquet")]
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files if f.exists())

    code = ("from definemed.ray_utils import init_ray\n"
            "from definemed.corpus.stage import run_annotate\n"
            "from tests.test_corpus_pipeline import _annotate_cfg, _slow_echo_labeler\n"
            "init_ray()\n"
            f"run_annotate(_annotate_cfg(__import__('pathlib').Path({str(out)!r})), labeler=_slow_echo_labeler)\n")
    kill_when(code, lambda: labelled() >= len(full) // 2 and any(ann.glob("shard-*.parts/*.parquet")))
    assert not (out / "labels.parquet").exists()
    done = {p.name: p.stat().st_mtime_ns for p in ann.glob("shard-*.parquet")}
    partial = sum(pq.ParquetFile(f).metadata.num_rows for f in ann.glob("shard-*.parts/*.parquet"))
    assert partial > 0  # a shard's labels survived the kill though the shard was not finished

    sent: list[int] = []

    def counting(ds):
        sent.append(ds.count())
        return _echo_gold_labeler(ds)

    remaining = len(full) - sum(len(pd.read_parquet(ann / n)) for n in done) - partial
    run_annotate(_annotate_cfg(out), labeler=counting)
    # the rerun labels exactly what neither a finished shard nor a killed shard's parts hold (under load the
    # in-flight parts can complete every row before the kill lands: then there is nothing left to send)
    assert remaining <= 0.6 * len(full)
    assert sum(sent) == remaining and (sent == [] if remaining == 0 else sent[0] > 0)
    for name, mtime in done.items():  # finished shards were skipped, not relabelled
        assert (ann / name).stat().st_mtime_ns == mtime
    assert not list(ann.glob("shard-*.parts"))
    pd.testing.assert_frame_equal(pd.read_parquet(out / "labels.parquet"), full)

    # every shard is checked, not just the first: a later shard by another annotator is refused
    last = sorted(ann.glob("shard-*.parquet"))[-1]
    t = pq.read_table(last).to_pandas().assign(model="tiny://other")
    t.to_parquet(last)
    with pytest.raises(ConfigError, match=last.name):
        check_resumable(ann, full["model"].iloc[0], full["prompt_sha"].iloc[0], str(out))


def _classify_cfg(annotated: Path, out: Path, num_workers: int = 2):
    from definemed.corpus.config import ClassifyConfig

    # Tiny random XLM-R (no pre-training) on ~190 training docs: large LR, a few epochs.
    return ClassifyConfig(output_dir=str(out), annotations=str(annotated), label_source="gold", epochs=10,
                          batch_size=8, lr=2e-3, max_length=256, patience=3, val_fraction=0.2,
                          test_fraction=0.2, num_workers=num_workers)


def test_classifier_learns_gold_labels_but_not_shuffled_ones(annotated, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from definemed.corpus.stage import run_classify

    out = run_classify(_classify_cfg(annotated, tmp_path / "gold"))
    rep = json.loads(Path(out["report_json"]).read_text())
    at = rep["eval"]["at_threshold"]
    assert rep["eval"]["n_test"] >= 40 and at["threshold"] == 0.9
    assert at["f1"] >= 0.75, at
    assert any("gold" in n for n in rep["notes"])
    assert Path(out["pr_curve"]).read_bytes()[:4] == b"\x89PNG"
    assert {r["threshold"] for r in rep["eval"]["sweep"]} >= {0.5, 0.9}
    model = AutoModelForSequenceClassification.from_pretrained(out["model"])
    assert model.config.id2label[1] == "medical"
    assert json.loads((Path(out["model"]) / "lineage.json").read_text())["stage"] == "classify-train"

    # the control only has to fail to learn: one worker is enough
    control = run_classify(_classify_cfg(annotated, tmp_path / "shuffled", num_workers=1), shuffle_labels=True)
    crep = json.loads(Path(control["report_json"]).read_text())
    assert crep["eval"]["at_threshold"]["f1"] < 0.75, crep["eval"]["at_threshold"]


# The filter's acceptance test (quarantine, dedup, decontamination, PII on the bundled sample) is
# tests/test_corpus_filter_stream.py.


def test_annotate_through_openai_compatible_http_endpoint(ray_local, tmp_path):
    """The alternative backend: any OpenAI-compatible endpoint. The server here is a test double that answers
    like a constrained model and records what it was sent."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from definemed.corpus.stage import run_annotate

    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server API
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
            text = body["messages"][0]["content"]
            answer = "medizinisch" if "Patient" in text else "nicht medizinisch"
            out = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": answer}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        import os

        os.environ["DEFINEMED_TEST_KEY"] = "sk-test"
        cfg = _annotate_cfg(tmp_path / "http", sample_size=16, shard_size=8, backend="http", batch_size=8,
                            http={"base_url": f"http://127.0.0.1:{server.server_port}/v1", "model": "annotator",
                                  "api_key_env": "DEFINEMED_TEST_KEY"})
        out = run_annotate(cfg)
    finally:
        server.shutdown()
    labels = pd.read_parquet(out["labels"])
    assert len(labels) == 16 and set(labels["label"]) <= {"medical", "non_medical"}
    assert len(seen) == 16 and all(s["path"] == "/v1/chat/completions" for s in seen)
    assert all(s["structured_outputs"] == {"choice": ["medizinisch", "nicht medizinisch"]} for s in seen)
    assert all(s["auth"] == "Bearer sk-test" and s["model"] == "annotator" for s in seen)
    assert labels["model"].str.endswith("#annotator").all()
