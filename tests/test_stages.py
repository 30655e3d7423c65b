import json

import pytest

from definemed.config import ConfigError, StageConfig
from definemed.io import atomic_dir
from definemed.lineage import MANIFEST_NAME
from definemed.stages import DONE_MARKER, Stage, run_stage

CALLS = []


class CountCfg(StageConfig):
    n: int = 1


def count_run(cfg):
    CALLS.append(cfg.n)
    p = f"{cfg.output_dir}/out.txt"
    open(p, "w").write(str(cfg.n))
    return {"out": p}


STAGE = Stage("count", "tests.test_stages:CountCfg", "tests.test_stages:count_run", "test", uses_ray=False)


def test_rerun_with_same_config_skips_and_other_config_refuses(tmp_path):
    CALLS.clear()
    cfg = CountCfg(output_dir=str(tmp_path / "o"), n=1)
    out = run_stage(STAGE, cfg)
    assert CALLS == [1]
    manifest = json.loads((tmp_path / "o" / MANIFEST_NAME).read_text())
    assert manifest["config"]["n"] == 1 and "versions" in manifest and manifest["versions"]["ray"]
    assert run_stage(STAGE, cfg) == out and CALLS == [1]
    with pytest.raises(ConfigError, match="output_dir"):
        run_stage(STAGE, CountCfg(output_dir=str(tmp_path / "o"), n=2))
    assert (tmp_path / "o" / "out.txt").read_text() == "1"


def test_failed_stage_leaves_no_done_marker(tmp_path):
    def boom(cfg):
        raise RuntimeError("killed")

    st = Stage("boom", "tests.test_stages:CountCfg", "tests.test_stages:count_run", "t", uses_ray=False)
    object.__setattr__(st, "run", "tests.test_stages:boom_run")
    globals()["boom_run"] = boom
    with pytest.raises(RuntimeError):
        run_stage(st, CountCfg(output_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o" / DONE_MARKER).exists()


def test_atomic_dir_cleans_up_on_failure(tmp_path):
    with pytest.raises(ValueError):
        with atomic_dir(tmp_path / "model") as d:
            (d / "weights").write_text("half")
            raise ValueError("disk full")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "model") as d:
        (d / "weights").write_text("full")
    assert (tmp_path / "model" / "weights").read_text() == "full"
