import subprocess
import sys
import textwrap

import pytest

from definemed.config import ConfigError, StageConfig, InputPath, load_config, parse_config
from definemed.pipeline import load_pipeline


class DemoCfg(StageConfig):
    data: InputPath
    batch_size: int = 4


def _write(tmp_path, body):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(body))
    return p


def test_unknown_key_names_field(tmp_path):
    p = _write(tmp_path, f"output_dir: {tmp_path}/o\ndata: {tmp_path}\nbatch_sise: 3\n")
    with pytest.raises(ConfigError, match=r"'batch_sise': unknown key"):
        load_config(DemoCfg, p)


def test_wrong_type_names_field(tmp_path):
    p = _write(tmp_path, f"output_dir: {tmp_path}/o\ndata: {tmp_path}\nbatch_size: viele\n")
    with pytest.raises(ConfigError, match=r"'batch_size'"):
        load_config(DemoCfg, p)


def test_missing_input_path_names_field(tmp_path):
    p = _write(tmp_path, f"output_dir: {tmp_path}/o\ndata: {tmp_path}/nope\n")
    with pytest.raises(ConfigError, match=r"'data': .*does not exist"):
        load_config(DemoCfg, p)


def test_error_is_one_line(tmp_path):
    p = _write(tmp_path, "output_dir: 3\nbogus: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(DemoCfg, p)
    assert "\n" not in str(e.value)


def test_remote_and_glob_inputs_pass_through(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # hf:// needs hub access (refused offline: tests/test_resources.py)
    for v in ["hf://datasets/HuggingFaceFW/fineweb-2/data/deu_Latn/train/*.parquet", f"{tmp_path}/*.parquet"]:
        assert parse_config(DemoCfg, {"output_dir": "o", "data": v}).data == v


def test_cli_invalid_config_exits_2_and_names_field(tmp_path):
    p = _write(tmp_path, f"output_dir: {tmp_path}/o\nmodelz: []\n")
    r = subprocess.run([sys.executable, "-m", "definemed.cli", "tiny-models", "--config", str(p)],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "modelz" in r.stderr and "unknown key" in r.stderr
    assert len([ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]) == 1


def test_cli_missing_config_file_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "definemed.cli", "tiny-models", "--config", str(tmp_path / "x.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not found" in r.stderr


def test_pipeline_rejects_unknown_stage_and_per_stage_ray(tmp_path):
    p = _write(tmp_path, "stages:\n  tiny-modelz: {output_dir: o}\n")
    with pytest.raises(ConfigError, match="stages.tiny-modelz"):
        load_pipeline(str(p))
    p = _write(tmp_path, "stages:\n  tiny-models: {output_dir: o, ray: {num_cpus: 2}}\n")
    with pytest.raises(ConfigError, match="stages.tiny-models.ray"):
        load_pipeline(str(p))


def test_demo_config_is_valid():
    from tests.conftest import REPO

    p = load_pipeline(str(REPO / "configs" / "demo.yaml"))
    assert list(p.stages)[0] == "tiny-models"


def test_cluster_pipeline_references_stage_configs_and_validates():
    from tests.conftest import REPO

    # Real model/data paths (/models, /data) do not exist here: they are checked by the stages on the cluster,
    # so validate with every path deferred, as a pipeline does for paths earlier stages produce.
    import definemed.pipeline as pl

    p = REPO / "configs" / "cluster" / "pipeline.yaml"
    raw = pl.load_yaml(str(p))
    assert all(isinstance(v, str) for v in raw["stages"].values())
    for name, path in raw["stages"].items():
        assert (REPO / path).exists(), path
        section = pl.load_yaml(str(REPO / path))
        section.pop("ray", None)
        cfg = parse_config(pl.STAGES[name].config_model(), section, context={"deferred_paths": ("/models", "/data")})
        assert cfg.output_dir.startswith("/data/")


def test_pipeline_section_may_name_a_stage_file(tmp_path):
    stage_file = tmp_path / "tm.yaml"
    stage_file.write_text(f"output_dir: {tmp_path}/o\nray: {{num_cpus: 2}}\nmodels: ['tiny://qwen2']\n")
    p = _write(tmp_path, f"ray: {{num_cpus: 4}}\nstages:\n  tiny-models: {stage_file}\n")
    cfg = load_pipeline(str(p))
    assert cfg.stages["tiny-models"].models == ["tiny://qwen2"]
    assert cfg.stages["tiny-models"].ray.num_cpus == 4  # the pipeline's ray wins
