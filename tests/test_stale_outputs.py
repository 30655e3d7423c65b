"""A finished stage is reused only while its config AND its inputs are the ones it was made from.

Toy stages (no Ray) pin the runner's rules; tests/test_stale_outputs_stages.py runs the real pack / cpt / merge.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from definemed.config import InputPath, StageConfig
from definemed.stages import DONE_MARKER, RUN_MARKER, STAGES, Stage, StaleOutputsError, run_stage

CALLS: list[str] = []


class ReadCfg(StageConfig):
    input: InputPath
    tag: str = "a"


def read_run(cfg: ReadCfg) -> dict[str, str]:
    """Concatenate every file under `input` into out.txt (a stand-in for any stage that reads a directory)."""
    CALLS.append(Path(cfg.output_dir).name)
    src = Path(cfg.input)
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    out = Path(cfg.output_dir) / "out.txt"
    out.write_text("".join(f.read_text() for f in files))
    return {"out": str(out)}


READ = Stage("read", "tests.test_stale_outputs:ReadCfg", "tests.test_stale_outputs:read_run", "t", uses_ray=False)


def _corpus(d: Path, n: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"part-{i:03d}.txt").write_text(f"doc {i}\n")
    return d


def _replace_with_one_file(d: Path) -> None:
    for f in d.iterdir():
        f.unlink()
    (d / "only.txt").write_text("the one remaining doc\n")


def test_changed_input_is_refused_naming_it_and_old_outputs_stay(tmp_path):
    CALLS.clear()
    src = _corpus(tmp_path / "finemed", 96)
    cfg = ReadCfg(output_dir=str(tmp_path / "o"), input=str(src))
    first = run_stage(READ, cfg)
    assert run_stage(READ, cfg) == first and CALLS == ["o"]  # unchanged inputs: reused
    _replace_with_one_file(src)
    with pytest.raises(StaleOutputsError) as e:
        run_stage(READ, cfg)
    msg = str(e.value)
    assert "\n" not in msg and "input 'input'" in msg and "--rerun" in msg
    assert CALLS == ["o"] and Path(first["out"]).read_text().count("doc") == 96  # old outputs untouched
    run_stage(READ, cfg, rerun=True)
    assert CALLS == ["o", "o"] and Path(first["out"]).read_text() == "the one remaining doc\n"
    assert not list(tmp_path.glob(".o.replaced-*"))  # set-aside outputs are dropped once the new run finished


def test_mtime_only_change_of_a_small_file_is_not_a_change_but_content_is(tmp_path):
    import os

    CALLS.clear()
    src = _corpus(tmp_path / "src", 2)
    cfg = ReadCfg(output_dir=str(tmp_path / "o"), input=str(src))
    run_stage(READ, cfg)
    f = src / "part-000.txt"
    os.utime(f, (1, 1))  # small files are content-hashed: a touch alone does not invalidate
    run_stage(READ, cfg)
    assert CALLS == ["o"]
    f.write_text("doc X\n")  # same size, other content
    with pytest.raises(StaleOutputsError, match="input 'input'"):
        run_stage(READ, cfg)


def test_large_files_are_checked_by_size_and_mtime_without_reading_them(tmp_path, monkeypatch):
    import definemed.lineage as lineage

    src = tmp_path / "big"
    src.mkdir()
    (src / "shard.bin").write_bytes(b"x" * 4096)
    monkeypatch.setattr(lineage, "SMALL_FILE_BYTES", 1024)
    read = []
    real_hash = lineage.hash_file
    monkeypatch.setattr(lineage, "hash_file", lambda p: read.append(p) or real_hash(p))
    fp1 = lineage.fingerprint_input(src)
    assert read == []  # a stat per file, no content read
    import os

    os.utime(src / "shard.bin", ns=(1, 1))
    assert lineage.fingerprint_input(src) != fp1


def test_partial_work_from_other_inputs_is_set_aside_not_resumed(tmp_path, monkeypatch):
    CALLS.clear()
    src = _corpus(tmp_path / "src", 3)
    cfg = ReadCfg(output_dir=str(tmp_path / "o"), input=str(src))
    out = Path(cfg.output_dir)
    out.mkdir()
    (out / "half-done.parquet").write_text("made from older inputs")
    (out / RUN_MARKER).write_text(json.dumps({"run_id": "old", "config_fingerprint": "x", "inputs": {}}))
    seen, plain_run = {}, read_run

    def observing_run(c):  # what the new run finds while it runs: the old work beside it, not in its way
        seen["in_out"] = (out / "half-done.parquet").exists()
        seen["aside"] = [p.read_text() for p in tmp_path.glob(".o.replaced-*/half-done.parquet")]
        return plain_run(c)

    monkeypatch.setattr(sys.modules[__name__], "read_run", observing_run)
    run_stage(READ, cfg)
    assert seen == {"in_out": False, "aside": ["made from older inputs"]}  # moved, not deleted, during the run
    assert not (out / "half-done.parquet").exists() and (out / DONE_MARKER).exists()
    assert not list(tmp_path.glob(".o.replaced-*"))  # dropped once the new run finished


def test_model_refs_are_fingerprinted_without_building_them(tmp_path, monkeypatch):
    from definemed.models import resolve_model
    from definemed.models.registry import fingerprint_ref

    built = resolve_model("tiny://qwen2")  # the session's cache: already built
    assert fingerprint_ref("tiny://qwen2") == "model:" + Path(built).name
    assert fingerprint_ref("tiny://qwen2@1") != fingerprint_ref("tiny://qwen2")
    monkeypatch.setenv("DEFINEMED_CACHE", str(tmp_path / "empty-cache"))
    fp = fingerprint_ref("tiny://mistral")
    assert fp.startswith("model:mistral-s0-") and fingerprint_ref("real://gemma-3-270m").startswith("model:gemma")
    assert not (tmp_path / "empty-cache").exists()  # nothing was built or converted to fingerprint them


def test_killed_run_with_same_inputs_resumes_in_place_with_its_run_id(tmp_path, monkeypatch):
    from definemed.stages import config_fingerprint, input_fingerprints

    src = _corpus(tmp_path / "src", 3)
    cfg = ReadCfg(output_dir=str(tmp_path / "o"), input=str(src))
    out = Path(cfg.output_dir)
    out.mkdir()
    (out / "shard-0.parquet").write_text("resumable")
    (out / RUN_MARKER).write_text(json.dumps({"run_id": "abc123", "config_fingerprint": config_fingerprint(cfg),
                                              "inputs": input_fingerprints(cfg)}))
    run_stage(READ, cfg)
    assert (out / "shard-0.parquet").exists()
    assert json.loads((out / DONE_MARKER).read_text())["run_id"] == "abc123"
    assert not (out / RUN_MARKER).exists()


def test_cli_refuses_stale_outputs_with_exit_2_and_one_line(tmp_path, monkeypatch, capsys):
    from definemed.cli import run_stage_cli

    monkeypatch.setitem(STAGES, "read", READ)
    src = _corpus(tmp_path / "src", 4)
    cfg_file = tmp_path / "read.yaml"
    cfg_file.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "o"), "input": str(src)}))
    run_stage_cli("read", str(cfg_file), None)
    _replace_with_one_file(src)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_stage_cli("read", str(cfg_file), None)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "input 'input'" in err[0]
    run_stage_cli("read", str(cfg_file), None, rerun=True)
    assert (tmp_path / "o" / "out.txt").read_text() == "the one remaining doc\n"


def test_pipeline_reruns_a_changed_stage_and_everything_downstream(tmp_path, monkeypatch, capsys):
    """a -> b -> c, where b reads a's output and c reads b's output plus an external file."""
    from definemed.pipeline import load_pipeline, run_pipeline

    for name in ("a", "b", "c"):
        monkeypatch.setitem(STAGES, name, Stage(name, READ.config, READ.run, "t", uses_ray=False))
    src = _corpus(tmp_path / "src", 3)
    extra = tmp_path / "extra.txt"
    extra.write_text("external\n")
    o = tmp_path / "out"
    spec = {"stages": {
        "a": {"output_dir": str(o / "a"), "input": str(src)},
        "b": {"output_dir": str(o / "b"), "input": str(o / "a" / "out.txt")},
        "c": {"output_dir": str(o / "c"), "input": str(o / "b"), "tag": "c"},
    }}
    pfile = tmp_path / "p.yaml"
    pfile.write_text(yaml.safe_dump(spec))

    def run_ids():
        return {n: json.loads((o / n / DONE_MARKER).read_text())["run_id"] for n in "abc"}

    CALLS.clear()
    run_pipeline(load_pipeline(str(pfile)))
    first = run_ids()
    assert CALLS == ["a", "b", "c"]
    run_pipeline(load_pipeline(str(pfile)))
    assert CALLS == ["a", "b", "c"] and run_ids() == first  # nothing changed: all reused

    (src / "part-001.txt").write_text("edited upstream\n")
    capsys.readouterr()
    run_pipeline(load_pipeline(str(pfile)))
    assert CALLS == ["a", "b", "c"] * 2
    second = run_ids()
    assert all(second[n] != first[n] for n in "abc")
    b_inputs = json.loads((o / "b" / "lineage.json").read_text())["inputs"]
    assert b_inputs["input"]["produced_by"]["run_id"] == second["a"]  # lineage names the producing run

    spec["stages"]["c"]["tag"] = "other"
    pfile.write_text(yaml.safe_dump(spec))
    with pytest.raises(Exception, match="output_dir"):  # a different config is still refused, never clobbered
        run_pipeline(load_pipeline(str(pfile)))


def test_pipeline_says_why_it_recomputes(tmp_path, monkeypatch, caplog):
    from definemed.pipeline import load_pipeline, run_pipeline

    monkeypatch.setitem(STAGES, "a", Stage("a", READ.config, READ.run, "t", uses_ray=False))
    monkeypatch.setitem(STAGES, "b", Stage("b", READ.config, READ.run, "t", uses_ray=False))
    src = _corpus(tmp_path / "src", 2)
    spec = {"stages": {"a": {"output_dir": str(tmp_path / "a"), "input": str(src)},
                       "b": {"output_dir": str(tmp_path / "b"), "input": str(tmp_path / "a")}}}
    pfile = tmp_path / "p.yaml"
    pfile.write_text(yaml.safe_dump(spec))
    run_pipeline(load_pipeline(str(pfile)))
    (src / "part-000.txt").write_text("changed\n")
    caplog.clear()
    with caplog.at_level("WARNING"):
        run_pipeline(load_pipeline(str(pfile)))
    text = caplog.text
    assert f"[a] recomputing {tmp_path / 'a'}: input 'input' ({src}) changed" in text
    assert "[b] recomputing" in text and "was remade by its stage" in text


def test_markers_from_before_input_tracking_count_as_stale(tmp_path):
    from definemed.stages import config_fingerprint

    src = _corpus(tmp_path / "src", 2)
    cfg = ReadCfg(output_dir=str(tmp_path / "o"), input=str(src))
    out = Path(cfg.output_dir)
    out.mkdir()
    (out / DONE_MARKER).write_text(json.dumps({"stage": "read", "config_fingerprint": config_fingerprint(cfg),
                                               "outputs": {"out": "x"}}))
    with pytest.raises(StaleOutputsError, match="predate input tracking"):
        run_stage(READ, cfg)
