"""Stale outputs with the real stages: the pack scenario from the field, a cascade pack -> cpt -> merge in one
pipeline, and an external model that changes under a finished merge."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from definemed.stages import DONE_MARKER, STAGES, StaleOutputsError, run_stage

pytestmark = pytest.mark.integration


def _finemed(d: Path, texts: list[str], files: int) -> Path:
    """A FineMed-de-shaped directory: `texts` spread over `files` Parquet files."""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for i in range(files):
        part = texts[i::files]
        if part:
            pq.write_table(pa.table({"text": part, "id": [f"{i}-{j}" for j in range(len(part))]}),
                           d / f"part-{i:03d}.parquet")
    return d


@pytest.fixture(scope="module")
def medical_texts() -> list[str]:
    from definemed.data.sample import SAMPLE_WEB_DIR

    t = pq.read_table(SAMPLE_WEB_DIR, columns=["text", "gold_label"]).to_pylist()
    return [r["text"] for r in t if r["gold_label"] == "medical"]


def _run_ids(*dirs: Path) -> list[str]:
    return [json.loads((d / DONE_MARKER).read_text())["run_id"] for d in dirs]


def test_pack_refuses_a_replaced_input_directory_and_reruns_on_request(ray_local, tmp_path, medical_texts, capsys):
    """The report: pack ran on 96 files (131 docs; 12 files here, for CI time); the directory was replaced by one
    one-document file; pack with the same config said 'already complete' and exited 0."""
    from definemed.cli import run_stage_cli

    src = _finemed(tmp_path / "finemed_de", medical_texts, files=12)
    cfg_file = tmp_path / "pack.yaml"
    cfg_file.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "pack"), "input": str(src),
                                        "model": "tiny://qwen2", "seq_len": 256, "sequences_per_shard": 64}))
    run_stage_cli("pack", str(cfg_file), None)
    before = json.loads((tmp_path / "pack" / "stats.json").read_text())
    assert before["sequences"] > 50

    _finemed(src, ["Metformin ist ein Medikament zur Behandlung von Diabetes mellitus Typ 2."], files=1)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_stage_cli("pack", str(cfg_file), None)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "input 'input'" in err[0] and "--rerun" in err[0], err
    assert json.loads((tmp_path / "pack" / "stats.json").read_text()) == before  # old outputs untouched

    run_stage_cli("pack", str(cfg_file), None, rerun=True)
    after = json.loads((tmp_path / "pack" / "stats.json").read_text())
    assert after["sequences"] == 1 and after["chunks"] == 1


def test_pipeline_cascades_an_upstream_change_through_pack_cpt_merge(ray_local, tmp_path, medical_texts, capsys):
    from definemed.pipeline import load_pipeline, run_pipeline

    src = _finemed(tmp_path / "finemed_de", medical_texts, files=4)
    o = tmp_path / "out"
    spec = {"stages": {
        "pack": {"output_dir": str(o / "pack"), "input": str(src), "model": "tiny://qwen2", "seq_len": 256,
                 "sequences_per_shard": 64},
        "cpt": {"output_dir": str(o / "cpt"), "model": "tiny://qwen2", "packed": str(o / "pack"),
                "parallel": {"num_workers": 1, "cpus_per_worker": 1},  # the cascade, not sharding, is tested
                "train": {"seq_len": 256, "global_batch_tokens": 256, "max_steps": 1},
                "checkpoint": {"every_steps": 1, "keep": 1}},
        "merge": {"output_dir": str(o / "merge"), "model_a": "tiny://qwen2", "model_b": str(o / "cpt" / "hf_model"),
                  "resources": {"num_cpus": 1, "memory": "1GiB"}},
    }}
    pfile = tmp_path / "pipeline.yaml"
    pfile.write_text(yaml.safe_dump(spec))
    dirs = [o / "pack", o / "cpt", o / "merge"]

    run_pipeline(load_pipeline(str(pfile)))
    first = _run_ids(*dirs)
    first_tokens = json.loads((o / "pack" / "stats.json").read_text())["tokens"]
    run_pipeline(load_pipeline(str(pfile)))
    assert _run_ids(*dirs) == first  # unchanged: every stage reused

    _finemed(src, medical_texts[: len(medical_texts) // 2], files=2)  # upstream data changed
    run_pipeline(load_pipeline(str(pfile)))
    second = _run_ids(*dirs)
    assert all(a != b for a, b in zip(first, second)), (first, second)
    merged = json.loads((o / "merge" / "lineage.json").read_text())
    assert merged["inputs"]["model_b"]["produced_by"]["run_id"] == second[1]
    assert json.loads((o / "pack" / "stats.json").read_text())["tokens"] < first_tokens


def test_external_model_change_invalidates_a_finished_merge(ray_local, tmp_path):
    from definemed.config import parse_config
    from definemed.models import resolve_model

    base = tmp_path / "instruct"
    shutil.copytree(resolve_model("tiny://qwen2"), base)
    cfg = parse_config(STAGES["merge"].config_model(), {
        "output_dir": str(tmp_path / "merge"), "model_a": str(base), "model_b": "tiny://qwen2@1",
        "resources": {"num_cpus": 1, "memory": "1GiB"}})
    run_stage(STAGES["merge"], cfg)
    assert run_stage(STAGES["merge"], cfg)  # reused
    # The instruct model is re-published at the same path with other weights.
    shutil.copy2(Path(resolve_model("tiny://qwen2@2")) / "model.safetensors", base / "model.safetensors")
    with pytest.raises(StaleOutputsError, match="input 'model_a'"):
        run_stage(STAGES["merge"], cfg)
    before = _run_ids(tmp_path / "merge")
    run_stage(STAGES["merge"], cfg, rerun=True)
    assert _run_ids(tmp_path / "merge") != before
