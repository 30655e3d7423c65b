"""`merge` stage: mergekit SLERP with a layer-wise, component-specific t schedule, run as a Ray task.

The schedule and SLERP are recomputed by hand here (not with definemed or mergekit helpers), so a wrong
mapping of our config onto mergekit, or a wrong t convention, fails these tests.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from definemed.config import ConfigError, parse_config
from definemed.merge.config import MergeStageConfig

REPO = Path(__file__).resolve().parents[1]
STUDY_T = {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0], "default": 0.5}


def make_cfg(out: Path, **over) -> MergeStageConfig:
    data = {"output_dir": str(out), "model_a": "tiny://qwen2", "model_b": "tiny://qwen2@1",
            "resources": {"num_cpus": 1, "memory": "1GiB"}, **over}
    return parse_config(MergeStageConfig, data)


def run_merge_stage(cfg: MergeStageConfig) -> dict[str, str]:
    from definemed.stages import STAGES, run_stage

    return run_stage(STAGES["merge"], cfg)


def weights(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def gradient_by_hand(values, layer: int, num_layers: int) -> float:
    """mergekit: layer i of L sits at i/(L-1) on the gradient; piecewise-linear between the listed values."""
    if not isinstance(values, list):
        return float(values)
    pos = layer / (num_layers - 1)
    scaled = pos * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(i0 + 1, len(values) - 1)
    return (1 - (scaled - i0)) * values[i0] + (scaled - i0) * values[i1]


def slerp_by_hand(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Textbook SLERP of the whole flattened tensor, in float64 (lerp when nearly collinear)."""
    x, y = a.double().flatten(), b.double().flatten()
    dot = float(torch.dot(x / x.norm(), y / y.norm()).clamp(-1, 1))
    if abs(dot) > 0.9995:
        return ((1 - t) * x + t * y).view(a.shape)
    theta = math.acos(dot)
    return ((math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)).view(a.shape)


# ---------------------------------------------------------------- config (unit)

@pytest.mark.parametrize("t, needle", [
    ({"self_attn": [0, 1.5], "default": 0.5}, "'self_attn': t must lie in [0, 1], got 1.5"),
    ({"mlp": [], "default": 0.5}, "'mlp': gradient list is empty"),
    ({"mlp": [0, 1]}, "needs a 'default' entry"),
    ({"default": -0.1}, "t must lie in [0, 1]"),
])
def test_bad_schedule_is_one_line_naming_t(tmp_path, t, needle):
    with pytest.raises(ConfigError) as e:
        make_cfg(tmp_path / "o", t=t)
    msg = str(e.value)
    assert "invalid config field 't'" in msg and needle in msg and "\n" not in msg


@pytest.mark.parametrize("over, field", [
    ({"method": "task_arithmetic"}, "method"),
    ({"density": 0.5}, "density"),  # slerp has no density
    ({"method": "ties", "density": 0}, "density"),
    ({"resources": {"memory": "lots"}}, "resources.memory"),
    ({"model_b": "tiny://llama"}, "model_b"),
    ({"model_b": "./no/such/checkpoint"}, "model_b"),
    ({"modela": "tiny://qwen2"}, "modela"),
])
def test_bad_config_names_the_field(tmp_path, over, field):
    with pytest.raises(ConfigError, match=f"invalid config field '{field}'"):
        make_cfg(tmp_path / "o", **over)


def test_schedule_defaults_and_normalisation(tmp_path):
    cfg = make_cfg(tmp_path / "o")
    assert cfg.t == STUDY_T and cfg.method == "slerp" and cfg.model_dir.endswith("/o/model")
    assert make_cfg(tmp_path / "o", t=0.25).t == {"default": 0.25}
    # mergekit takes the first matching filter, so default must end up last whatever the YAML order
    assert list(make_cfg(tmp_path / "o", t={"default": 0.5, "mlp": 1}).t) == ["mlp", "default"]
    assert make_cfg(tmp_path / "o", resources={"memory": "2GiB", "num_gpus": 1}).resources.ray_options() == \
        {"num_cpus": 1, "num_gpus": 1, "memory": 2 * 2**30}


def test_laptop_and_cluster_configs_differ_only_in_paths_dtype_and_resources():
    from definemed.config import load_yaml

    laptop = load_yaml(REPO / "configs" / "merge.yaml")
    cluster = load_yaml(REPO / "configs" / "cluster" / "merge.yaml")
    # the cluster's /models and /data mounts do not exist here; treat them like paths a stage produces
    c = parse_config(MergeStageConfig, cluster, context={"deferred_paths": ("/models", "/data")})
    assert c.dtype == "bfloat16" and c.resources.num_gpus == 1 and c.resources.memory == 64 * 2**30
    assert c.model_b.endswith("/hf_model") and c.t == parse_config(MergeStageConfig, laptop).t
    differ = {k for k in set(laptop) | set(cluster) if laptop.get(k) != cluster.get(k)}
    assert differ <= {"ray", "output_dir", "model_a", "model_b", "dtype", "resources"}


def test_each_method_maps_to_a_valid_mergekit_config(tmp_path):
    from definemed.merge.methods import to_mergekit

    for method in ("slerp", "linear", "ties", "dare_ties"):
        cfg = make_cfg(tmp_path / "o", method=method, t={"mlp": [0.2, 0.8], "default": 0.25})
        mk = to_mergekit(cfg, "/A", "/B", "bfloat16")
        d = mk.model_dump(mode="json", exclude_none=True)
        assert d["merge_method"] == method and d["base_model"] == "/A"
        assert d["dtype"] == "float32" and d["out_dtype"] == "bfloat16"
        if method == "linear":  # weights of A are 1 - t, of B are t
            wa, wb = (m["parameters"]["weight"] for m in d["models"])
            assert wa[0] == {"filter": "mlp", "value": [0.8, 0.2]} and wa[1] == {"value": 0.75}
            assert wb[0] == {"filter": "mlp", "value": [0.2, 0.8]}
        if method in ("ties", "dare_ties"):  # B's task vector scaled by t, not normalised away
            assert d["parameters"]["normalize"] is False and len(d["models"]) == 1
            assert d["models"][0]["parameters"]["density"] == 0.5


def test_validation_names_both_models_and_every_mismatch(tmp_path, tiny_qwen2):
    from definemed.merge.validate import IncompatibleModelsError, check_compatible
    from definemed.models import resolve_model

    b = resolve_model("tiny://qwen2@1")
    fewer = tmp_path / "qwen2-3-layers"
    shutil.copytree(b, fewer)
    c = json.loads((fewer / "config.json").read_text())
    c.update(num_hidden_layers=3, hidden_size=256)
    (fewer / "config.json").write_text(json.dumps(c))
    with pytest.raises(IncompatibleModelsError) as e:
        check_compatible("tiny://qwen2", tiny_qwen2, "cpt-ckpt", str(fewer))
    msg = str(e.value)
    assert "'tiny://qwen2'" in msg and "'cpt-ckpt'" in msg
    assert "num_hidden_layers differs (4 vs 3)" in msg and "hidden_size differs (128 vs 256)" in msg
    # a filter that matches no tensor would silently fall back to `default`
    with pytest.raises(IncompatibleModelsError, match="'t.self_atn': filter matches no tensor"):
        check_compatible("tiny://qwen2", tiny_qwen2, "tiny://qwen2@1", b, filters=["mlp", "self_atn"])
    assert check_compatible("tiny://qwen2", tiny_qwen2, "tiny://qwen2@1", b, filters=["mlp"])["num_hidden_layers"] == 4


def test_cli_rejects_bad_config_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from definemed.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\nmodel_a: tiny://qwen2\nmodel_b: tiny://qwen2@1\nt: {mlp: [2], default: 0}\n")
    res = CliRunner().invoke(app, ["merge", "--config", str(bad)])
    assert res.exit_code == 2 and "invalid config field 't'" in res.output
    ok = CliRunner().invoke(app, ["validate", "merge", "--config", str(REPO / "configs" / "merge.yaml")])
    assert ok.exit_code == 0, ok.output


# ---------------------------------------------------------------- merges on Ray (integration)

@pytest.fixture(scope="module")
def study_merge(ray_local, tmp_path_factory):
    cfg = make_cfg(tmp_path_factory.mktemp("merge") / "study", t=STUDY_T)
    return cfg, run_merge_stage(cfg)


@pytest.mark.integration
def test_t0_is_model_a_and_t1_is_model_b(ray_local, tmp_path, tiny_qwen2):
    from definemed.models import resolve_model

    wa, wb = weights(tiny_qwen2), weights(resolve_model("tiny://qwen2@1"))
    for t, expected in ((0, wa), (1, wb)):
        out = run_merge_stage(make_cfg(tmp_path / f"t{t}", t=t))
        merged = weights(out["model"])
        assert merged.keys() == expected.keys()
        assert all(torch.equal(merged[k], expected[k]) for k in merged), f"t={t}"
    assert not torch.equal(wa["model.layers.0.mlp.up_proj.weight"], wb["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.integration
@pytest.mark.parametrize("layer", [1, 2])
def test_layer_tensors_follow_their_component_schedule(study_merge, tiny_qwen2, layer):
    from definemed.models import resolve_model

    cfg, out = study_merge
    wa, wb, wm = weights(tiny_qwen2), weights(resolve_model("tiny://qwen2@1")), weights(out["model"])
    t_attn = gradient_by_hand(STUDY_T["self_attn"], layer, 4)
    t_mlp = gradient_by_hand(STUDY_T["mlp"], layer, 4)
    assert (round(t_attn, 4), round(t_mlp, 4)) == {1: (0.4333, 0.5667), 2: (0.5667, 0.4333)}[layer]
    checked = {"self_attn": 0, "mlp": 0}
    for name in wm:
        if f"layers.{layer}." not in name or not ("self_attn" in name or "mlp" in name):
            continue
        if torch.equal(wa[name], wb[name]):  # zero-initialised biases: nothing to interpolate
            assert torch.equal(wm[name], wa[name]), name
            continue
        comp = "self_attn" if "self_attn" in name else "mlp"
        t, other = (t_attn, t_mlp) if comp == "self_attn" else (t_mlp, t_attn)
        expected = slerp_by_hand(t, wa[name], wb[name])
        torch.testing.assert_close(wm[name].double(), expected, atol=2e-6, rtol=1e-5, msg=name)
        # the other component's t would give a clearly different tensor, so the check discriminates
        assert (wm[name].double() - slerp_by_hand(other, wa[name], wb[name])).abs().max() > 1e-4, name
        checked[comp] += 1
    assert checked == {"self_attn": 4, "mlp": 3}  # q, k, v, o; gate, up, down
    # outside the layers: default t (0.5) at position 0
    name = "model.embed_tokens.weight"
    torch.testing.assert_close(wm[name].double(), slerp_by_hand(0.5, wa[name], wb[name]), atol=2e-6, rtol=1e-5)


@pytest.mark.integration
def test_output_is_a_complete_reproducible_model(study_merge, tiny_qwen2, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from definemed.lineage import hash_path
    from definemed.models import resolve_model

    cfg, out = study_merge
    model = Path(out["model"])
    assert model == Path(cfg.output_dir).resolve() / "model"
    names = {p.name for p in model.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "mergekit_config.yml",
            "README.md", "lineage.json"} <= names
    assert not list(model.parent.glob(".model.tmp-*"))
    # tokenizer + chat template are model_a's
    msgs = [{"role": "user", "content": "Was ist eine Anämie?"}]
    tok = AutoTokenizer.from_pretrained(model)
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        AutoTokenizer.from_pretrained(tiny_qwen2).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # lineage: input hashes of both parents, the schedule per layer
    lin = json.loads((model / "lineage.json").read_text())
    b = resolve_model("tiny://qwen2@1")
    assert lin["inputs"]["model_a"]["hash"] == hash_path(tiny_qwen2)
    assert lin["inputs"]["model_b"]["hash"] == hash_path(b) and lin["inputs"]["model_b"]["hash"]
    assert lin["extra"]["model_refs"] == {"model_a": "tiny://qwen2", "model_b": "tiny://qwen2@1"}
    assert [r["self_attn"] for r in lin["extra"]["t_per_layer"]] == [0, 0.433333, 0.566667, 1]
    # model card names both parents and the schedule
    card = (model / "README.md").read_text()
    assert "tiny://qwen2@1" in card and tiny_qwen2 in card and "| 1 | 0.4333 | 0.5667 | 0.5 |" in card
    assert "carry no meaning" in card
    # the mergekit YAML alone reproduces the weights
    again = tmp_path / "again"
    run_merge(MergeConfiguration.model_validate(__import__("yaml").safe_load((model / "mergekit_config.yml").read_text())),
              str(again), options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    w1, w2 = weights(model), weights(again)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    # the stage machinery wrote its own lineage and done marker; a second run reuses the result
    assert (Path(cfg.output_dir) / "_DONE.json").exists() and (Path(cfg.output_dir) / "lineage.json").exists()
    assert run_merge_stage(cfg) == out
    # killed after the rename but before _DONE: the finished model is reused, not rebuilt
    (Path(cfg.output_dir) / "_DONE.json").unlink()
    mtime = (model / "model.safetensors").stat().st_mtime_ns
    assert run_merge_stage(cfg)["model"] == out["model"]
    assert (model / "model.safetensors").stat().st_mtime_ns == mtime
    # transformers loads every merged weight (none missing, none freshly initialised); its predictions are
    # neither parent's
    lm, info = AutoModelForCausalLM.from_pretrained(model, output_loading_info=True)
    assert not any(info.values()), info
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = [m(**ids).logits for m in (lm, AutoModelForCausalLM.from_pretrained(tiny_qwen2),
                                              AutoModelForCausalLM.from_pretrained(b))]
    assert torch.isfinite(logits[0]).all()
    assert not torch.allclose(logits[0], logits[1], atol=1e-4) and not torch.allclose(logits[0], logits[2], atol=1e-4)


@pytest.mark.integration
def test_merged_model_generates_in_vllm_cpu_engine(study_merge, in_own_process):
    def generate(path: str) -> list[int]:
        from vllm import SamplingParams

        from definemed.engine import make_llm

        llm = make_llm(path, sole_engine=True)
        o = llm.chat([[{"role": "user", "content": "Was ist Bluthochdruck?"}]],
                     SamplingParams(max_tokens=8, temperature=0))[0]
        return list(o.prompt_token_ids), list(o.outputs[0].token_ids)

    from tests.hf_check import assert_greedy_tokens_match_transformers

    model = study_merge[1]["model"]
    assert_greedy_tokens_match_transformers(model, *in_own_process(generate, model))


@pytest.mark.integration
@pytest.mark.parametrize("case", ["mistral", "fewer_layers"])
def test_mismatched_parents_fail_cleanly(ray_local, tmp_path, case):
    from definemed.models import resolve_model

    if case == "mistral":
        model_b, name_b = "tiny://mistral", "tiny://mistral"
    else:
        model_b = tmp_path / "cpt-3-layers"
        shutil.copytree(resolve_model("tiny://qwen2@1"), model_b)
        c = json.loads((model_b / "config.json").read_text())
        (model_b / "config.json").write_text(json.dumps({**c, "num_hidden_layers": 3}))
        model_b = name_b = str(model_b)
    out = tmp_path / "out" / "merge"
    with pytest.raises(ConfigError) as e:
        run_merge_stage(make_cfg(out, model_b=model_b))
    msg = str(e.value)
    assert "cannot merge model_a 'tiny://qwen2'" in msg and f"model_b '{name_b}'" in msg
    assert ("architectures differ" in msg) if case == "mistral" else ("num_hidden_layers differs (4 vs 3)" in msg)
    # no model, not even part of one: only the run marker (what a resume would check), the run's lock file
    # (released; the kernel lock, not the file, is what refuses a second writer) and, with the quiet console on,
    # the failed run's log, which names the error
    left = {str(p.relative_to(out)) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert left <= {"_RUN.json", ".lock", "logs/merge.log"}, left
    if "logs/merge.log" in left:
        assert "cannot merge model_a" in (out / "logs" / "merge.log").read_text()


@pytest.mark.integration
@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_ablation_methods_give_loadable_models(ray_local, tmp_path, tiny_qwen2, method):
    from transformers import AutoModelForCausalLM

    from definemed.models import resolve_model

    t = {"mlp": [0.2, 0.8], "default": 0.3}
    extra = {"density": 1.0} if method == "ties" else {"density": 0.5} if method == "dare_ties" else {}
    out = run_merge_stage(make_cfg(tmp_path / method, method=method, t=t, **extra))
    wa, wb, wm = weights(tiny_qwen2), weights(resolve_model("tiny://qwen2@1")), weights(out["model"])
    name, t_up = "model.layers.1.mlp.up_proj.weight", gradient_by_hand(t["mlp"], 1, 4)  # 0.4
    if method in ("linear", "ties"):  # ties at density 1 keeps the whole task vector: a + t (b - a)
        torch.testing.assert_close(wm[name], wa[name] + t_up * (wb[name] - wa[name]), atol=1e-6, rtol=1e-5)
    else:  # DARE drops about half of the task vector at random: those entries stay model_a's
        kept_a = (wm[name] == wa[name]).float().mean().item()
        assert 0.4 < kept_a < 0.6, kept_a
    lm = AutoModelForCausalLM.from_pretrained(out["model"])
    logits = lm(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape[-1] == lm.config.vocab_size and torch.isfinite(logits).all()


@pytest.mark.integration
def test_cli_runs_the_stage(ray_local, tmp_path):
    from typer.testing import CliRunner

    from definemed.cli import app

    cfg = tmp_path / "merge.yaml"
    text = (REPO / "configs" / "merge.yaml").read_text().replace("output_dir: outputs/merge", f"output_dir: {tmp_path}/m")
    cfg.write_text(text)
    res = CliRunner().invoke(app, ["merge", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert f"model: {(tmp_path / 'm' / 'model').resolve()}" in res.output
    assert (tmp_path / "m" / "model" / "model.safetensors").exists()
