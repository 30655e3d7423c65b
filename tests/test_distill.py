"""Pruning and knowledge distillation (issue 24): the KD loss on hand-computed numbers, pruning that must find
planted dead blocks and channels, vLLM and mergekit on the pruned model, and the distill stage on Ray Train with
a sharded teacher, a CE-only control and a killed worker.

The planted models make the pruning checks exact: a block whose attention and MLP outputs are zeroed passes the
residual stream through unchanged (block importance 0), and an MLP channel whose gate and up rows are zeroed never
activates (channel importance 0). Pruning must remove exactly those, and the pruned model must then compute the
same logits as the model it was cut from.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from definemed.train.kd_loss import DistillLoss, kd_loss_sum, kl_per_token, kl_sum
from definemed.train.loss import IGNORE_INDEX, loss_sum, packed_labels

DEAD_BLOCKS = [1, 3]  # of the tiny Qwen2's 4
DEAD_CHANNELS = 56  # of its 256 MLP channels, in every block


# ------------------------------------------------------------------------------------------------ the KD loss


def _packed_example(vocab: int = 11, seed: int = 0):
    """Two packed rows, documents of 3 + 4 tokens (+ 1 padding) and of 8: 5 + 7 = 12 target tokens (document
    starts and padding are not targets)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 8), generator=g)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0], list(range(8))])
    labels = torch.stack([packed_labels(ids[0:1], pos[0:1], 7)[0], packed_labels(ids[1:2], pos[1:2], 8)[0]])
    s = torch.randn(2, 8, vocab, generator=g, requires_grad=True)
    t = torch.randn(2, 8, vocab, generator=g)
    return s, t, labels


def test_kd_loss_equals_ce_at_alpha_0():
    s, t, labels = _packed_example()
    loss, ce, kl = kd_loss_sum(s, t, labels, alpha=0.0, temperature=3.0)
    ref, n = loss_sum(s, labels)
    assert n == 12 and torch.equal(loss, ref) and torch.equal(ce, ref) and kl > 0
    (g_kd,) = torch.autograd.grad(loss, s)
    (g_ce,) = torch.autograd.grad(loss_sum(s, labels)[0], s)
    assert torch.equal(g_kd, g_ce)
    # the control has no teacher at all: the same CE
    assert torch.equal(kd_loss_sum(s, None, labels, alpha=0.0)[0], ref)
    with pytest.raises(ValueError, match="needs teacher logits"):
        kd_loss_sum(s, None, labels, alpha=0.5)


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kl_term_is_zero_when_the_student_is_the_teacher(divergence, temperature):
    s, _, labels = _packed_example()
    kl = kl_sum(s, s.detach().clone(), labels, temperature, divergence).detach()
    assert abs(float(kl)) < 1e-5
    loss, ce, _ = kd_loss_sum(s, s.detach().clone(), labels, alpha=0.7, temperature=temperature,
                              divergence=divergence)
    assert float(loss) == pytest.approx(0.3 * float(ce), abs=1e-5)


def test_temperature_scaling_on_a_hand_computed_example():
    """Vocabulary of two. Teacher logits (0, ln 3), student logits (0, 0), the next token is token 1.

    T = 1: p_T = (1/4, 3/4), p_S = (1/2, 1/2);
           KL(p_T || p_S) = 1/4 ln(1/2) + 3/4 ln(3/2) = -0.173287 + 0.304099 = 0.130812.
    T = 2: teacher logits / 2 = (0, ln sqrt 3): p_T = (1/(1+sqrt 3), sqrt 3/(1+sqrt 3)) = (0.366025, 0.633975),
           p_S still (1/2, 1/2); KL = 0.366025 ln 0.732051 + 0.633975 ln 1.267949 = 0.036341; T^2 KL = 0.145363.
    CE = -ln 1/2 = 0.693147 (temperature never touches the CE).
    alpha = 0.5, T = 2: loss = 0.5 * 0.693147 + 0.5 * 4 * 0.036341 = 0.346574 + 0.072682 = 0.419255.
    """
    t = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    s = torch.zeros(1, 2, 2)
    labels = torch.tensor([[IGNORE_INDEX, 1]])  # position 0 predicts token 1; position 1 has no target
    assert float(kl_per_token(s[0, :1], t[0, :1], 1.0)) == pytest.approx(0.130812, abs=1e-6)
    assert float(kl_per_token(s[0, :1], t[0, :1], 2.0)) == pytest.approx(0.036341, abs=1e-6)
    loss, ce, kl = kd_loss_sum(s, t, labels, alpha=0.5, temperature=2.0)
    assert float(ce) == pytest.approx(0.693147, abs=1e-6) and float(kl) == pytest.approx(0.036341, abs=1e-6)
    assert float(loss) == pytest.approx(0.419255, abs=1e-6)
    assert float(kd_loss_sum(s, t, labels, alpha=1.0, temperature=2.0)[0]) == pytest.approx(0.145363, abs=1e-6)


def test_reverse_kl_differs_from_forward_kl_on_a_hand_example():
    """Same distributions, T = 1. Reverse: KL(p_S || p_T) = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4)
    = 0.346574 - 0.202733 = 0.143841, against forward 0.130812: KL is not symmetric."""
    t = torch.tensor([[0.0, math.log(3.0)]])
    s = torch.zeros(1, 2)
    assert float(kl_per_token(s, t, 1.0, "reverse")) == pytest.approx(0.143841, abs=1e-6)
    assert float(kl_per_token(s, t, 1.0, "forward")) == pytest.approx(0.130812, abs=1e-6)


def test_chunked_kl_equals_the_whole_and_ignored_positions_do_not_count():
    s, t, labels = _packed_example(vocab=17, seed=1)
    whole = kl_sum(s, t, labels, 2.0, "forward")
    (g_whole,) = torch.autograd.grad(whole, s)
    chunked = kl_sum(s, t, labels, 2.0, "forward", chunk_tokens=3)
    (g_chunked,) = torch.autograd.grad(chunked, s)
    assert float(chunked) == pytest.approx(float(whole), rel=1e-6)
    assert torch.allclose(g_chunked, g_whole, atol=1e-7)
    # logits at positions whose next token is not a target (before a document start, on padding) change nothing
    ignored = labels[..., 1:] == IGNORE_INDEX
    s2 = s.detach().clone()
    s2[..., :-1, :][ignored] += 5.0
    assert float(kl_sum(s2, t, labels, 2.0)) == pytest.approx(float(whole), rel=1e-6)


def test_teacher_placement_auto_follows_memory():
    from definemed.distill.teacher import choose_placement

    gib = 2 ** 30
    assert choose_placement("auto", 1 * gib, 16 * gib, 0.25)[0] == "replicated"
    # a 7B teacher in bf16 (14 GiB): replicated on an 80 GB GPU, sharded on a 40 GB one
    assert choose_placement("auto", 14 * gib, 80 * gib, 0.25)[0] == "replicated"
    placement, why = choose_placement("auto", 14 * gib, 40 * gib, 0.25)
    assert placement == "sharded" and "40.0 GiB" in why
    assert choose_placement("replicated", 14 * gib, 1 * gib, 0.25) == ("replicated", "set in teacher.placement")


def test_depth_config_keeps_per_layer_entries_of_the_kept_blocks():
    from transformers import Qwen2Config

    from definemed.distill.surgery import depth_config, depth_state_dict

    cfg = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=64, max_window_layers=2,
                      layer_types=["full_attention", "full_attention", "sliding_attention", "sliding_attention"])
    new = depth_config(cfg, [0, 3])
    assert new.num_hidden_layers == 2 and new.layer_types == ["full_attention", "sliding_attention"]
    assert new.max_window_layers == 1 and cfg.num_hidden_layers == 4  # the teacher's config is untouched
    state = {"model.layers.0.mlp.up_proj.weight": 0, "model.layers.2.x": 2, "model.layers.3.x": 3,
             "model.norm.weight": 9}
    assert depth_state_dict(state, [0, 3]) == {"model.layers.0.mlp.up_proj.weight": 0, "model.layers.1.x": 3,
                                               "model.norm.weight": 9}


def test_prune_config_needs_exactly_one_target_and_a_reachable_one(tmp_path, tiny_qwen2):
    from definemed.config import ConfigError, parse_config
    from definemed.distill.prune import PruneConfig, check_target

    base = {"output_dir": str(tmp_path / "p"), "teacher": "tiny://qwen2", "calibration": {"packed": str(tmp_path)}}
    with pytest.raises(ConfigError, match=r"'depth': Value error, set exactly one of drop_layers or target_"):
        parse_config(PruneConfig, base)
    with pytest.raises(ConfigError, match=r"'width': .*exactly one of intermediate_size or target_reduction"):
        parse_config(PruneConfig, {**base, "method": "width", "width": {"intermediate_size": 8,
                                                                        "target_reduction": 0.2}})
    # the tiny Qwen2's embeddings hold 47% of its parameters: depth pruning cannot remove 60%
    cfg = parse_config(PruneConfig, {**base, "depth": {"target_reduction": 0.6}})
    with pytest.raises(ConfigError, match=r"^invalid config field 'depth.target_reduction': 60% cannot be reached"):
        check_target(cfg, tiny_qwen2)
    check_target(parse_config(PruneConfig, {**base, "depth": {"target_reduction": 0.2}}), tiny_qwen2)


def test_distill_config_names_the_student_field(tmp_path):
    from definemed.config import ConfigError, parse_config
    from definemed.distill.stage import DistillConfig

    base = {"output_dir": str(tmp_path / "d"), "teacher": {"model": "tiny://qwen2"}, "packed": str(tmp_path),
            "train": {"seq_len": 256, "global_batch_tokens": 1024, "max_steps": 2}}
    for student in ({}, {"prune": str(tmp_path), "model": "tiny://qwen2"}):
        with pytest.raises(ConfigError, match="'student.model': Value error, set exactly one of student.prune"):
            parse_config(DistillConfig, {**base, "student": student})
    with pytest.raises(ConfigError, match="'kd.divergence'"):
        parse_config(DistillConfig, {**base, "student": {"model": "tiny://qwen2"}, "kd": {"divergence": "js"}})


def test_plan_lists_the_kd_and_control_workers(tmp_path):
    from definemed.distill.stage import DistillConfig
    from definemed.plan.requests import stage_requests

    cfg = DistillConfig.model_validate(
        {"output_dir": str(tmp_path / "d"), "teacher": {"model": "tiny://qwen2"}, "student": {"model": "tiny://qwen2"},
         "packed": str(tmp_path), "parallel": {"num_workers": 4, "use_gpu": True},
         "train": {"seq_len": 256, "global_batch_tokens": 1024, "max_steps": 2}})
    req = stage_requests("distill", cfg, {"CPU": 64, "GPU": 8})
    assert req.phases() == ["student", "control"]
    assert all(r.min_units == 4 and r.gpus_per_unit == 1 for r in req.requests)


# ------------------------------------------------------------------------------------------------ pruning


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_qwen2) -> Path:
    """The bundled sample packed for the tiny Qwen2 in this process (the pack stage's own steps)."""
    import pyarrow.parquet as pq

    from definemed.data.sample import SAMPLE_WEB_DIR
    from definemed.train.pack import pack_local

    return pack_local(pq.read_table(SAMPLE_WEB_DIR, columns=["text"]), "tiny://qwen2",
                      tmp_path_factory.mktemp("pack"), 256)


def _planted_teacher(tiny_qwen2: str, out: Path) -> Path:
    """The tiny Qwen2 with blocks DEAD_BLOCKS passing the residual stream through (attention and MLP outputs
    zeroed) and the first DEAD_CHANNELS MLP channels of every block never activating (gate and up rows zeroed)."""
    from transformers import AutoModelForCausalLM

    from definemed.merge.run import copy_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            if i in DEAD_BLOCKS:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            layer.mlp.gate_proj.weight[:DEAD_CHANNELS] = 0
            layer.mlp.up_proj.weight[:DEAD_CHANNELS] = 0
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(tiny_qwen2, out)
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_qwen2) -> Path:
    return _planted_teacher(tiny_qwen2, tmp_path_factory.mktemp("teacher") / "model")


def _logits(path, ids) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(input_ids=ids).logits


@pytest.fixture(scope="module")
def depth_pruned(ray_local, teacher, packed, tmp_path_factory):
    from definemed.stages import STAGES, run_stage

    cfg = STAGES["prune"].config_model().model_validate({
        "output_dir": str(tmp_path_factory.mktemp("prune") / "depth"), "teacher": str(teacher),
        "calibration": {"packed": str(packed), "sequences": 8}, "method": "depth", "depth": {"drop_layers": 2}})
    return cfg, run_stage(STAGES["prune"], cfg)


@pytest.mark.integration
def test_depth_pruning_drops_the_planted_blocks_and_keeps_the_others_unchanged(depth_pruned, teacher):
    from safetensors.torch import load_file

    cfg, out = depth_pruned
    report = json.loads(Path(out["importance"]).read_text())
    bi = report["block_importance"]
    assert all(abs(bi[i]) < 1e-6 for i in DEAD_BLOCKS) and min(bi[0], bi[2]) > 1e-3, bi
    assert report["dropped_layers"] == DEAD_BLOCKS and report["kept_layers"] == [0, 2]
    assert len(report["calibration"]["sequences"]) == 8 and report["calibration"]["tokens"] > 1000
    model = Path(out["model"])
    conf = json.loads((model / "config.json").read_text())
    assert conf["num_hidden_layers"] == 2 and len(conf["layer_types"]) == 2
    # kept blocks renumbered, their weights (and everything outside the blocks) the teacher's, bit for bit
    t, s = load_file(teacher / "model.safetensors"), load_file(model / "model.safetensors")
    for name, w in s.items():
        src = name.replace("layers.1.", "layers.2.") if "layers.1." in name else name
        assert torch.equal(w, t[src]), name
    assert not any("layers.2." in k or "layers.3." in k for k in s)
    assert {k for k in t if "layers.0." in k or "layers.2." in k or "layers." not in k} == \
        {k.replace("layers.1.", "layers.2.") for k in s}
    # the dropped blocks were identities, so the pruned model computes the teacher's logits
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3]])
    assert torch.allclose(_logits(model, ids), _logits(teacher, ids), atol=1e-5)
    p = report["parameters"]
    assert p["teacher"] - p["student"] == 2 * p["per_block"][0]
    lineage = json.loads((model / "lineage.json").read_text())
    assert lineage["stage"] == "prune" and lineage["extra"]["dropped_layers"] == DEAD_BLOCKS
    assert (model / "chat_template.jinja").exists() or "chat_template" in (model / "tokenizer_config.json").read_text()
    assert Path(out["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_pruned_model_is_served_by_vllm_and_merged_by_mergekit(depth_pruned, in_own_process, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import load_file

    from tests.hf_check import assert_greedy_tokens_match_transformers

    def generate(path: str):
        from vllm import SamplingParams

        from definemed.engine import make_llm

        llm = make_llm(path, sole_engine=True)
        o = llm.generate(["Der Patient klagt über Brustschmerzen und"], SamplingParams(max_tokens=8, temperature=0))[0]
        return list(o.prompt_token_ids), list(o.outputs[0].token_ids)

    model = depth_pruned[1]["model"]
    assert_greedy_tokens_match_transformers(model, *in_own_process(generate, model))
    # mergekit reads the pruned architecture: a linear merge of the model with a copy of itself gives it back
    import shutil

    twin = shutil.copytree(model, tmp_path / "twin")
    mk = MergeConfiguration.model_validate({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": model, "parameters": {"weight": 0.5}}, {"model": str(twin), "parameters": {"weight": 0.5}}]})
    run_merge(mk, str(tmp_path / "merged"), options=MergeOptions(copy_tokenizer=False, safe_serialization=True))
    a, b = load_file(Path(model) / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert set(b) <= set(a) and all(torch.allclose(b[k], a[k]) for k in b)


def test_width_pruning_keeps_the_live_channels(teacher, packed, tmp_path):
    """Width pruning in the task's own function (no Ray): to 256 - DEAD_CHANNELS channels, the dead ones go."""
    from safetensors.torch import load_file

    from definemed.distill.prune import PruneConfig, prune_on_node

    cfg = PruneConfig.model_validate({"output_dir": str(tmp_path / "w"), "teacher": str(teacher),
                                      "calibration": {"packed": str(packed), "sequences": 4}, "method": "width",
                                      "width": {"intermediate_size": 256 - DEAD_CHANNELS}})
    out = prune_on_node(cfg, cfg.output_dir, str(teacher), str(packed / "shards"))
    report = json.loads(Path(out["importance"]).read_text())
    live = list(range(DEAD_CHANNELS, 256))
    assert report["kept_channels"] == [live] * 4 and report["kept_layers"] == [0, 1, 2, 3]
    assert all(max(ci[:DEAD_CHANNELS]) == 0 and min(ci[DEAD_CHANNELS:]) > 0 for ci in report["channel_importance"])
    t, s = load_file(teacher / "model.safetensors"), load_file(Path(out["model"]) / "model.safetensors")
    w = "model.layers.2.mlp."
    assert torch.equal(s[w + "up_proj.weight"], t[w + "up_proj.weight"][DEAD_CHANNELS:])
    assert torch.equal(s[w + "down_proj.weight"], t[w + "down_proj.weight"][:, DEAD_CHANNELS:])
    assert json.loads((Path(out["model"]) / "config.json").read_text())["intermediate_size"] == 256 - DEAD_CHANNELS
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3]])
    assert torch.allclose(_logits(out["model"], ids), _logits(teacher, ids), atol=1e-5)


# ------------------------------------------------------------------------------------------------ distill


STEPS, EVERY, KILL_AT = 4, 2, 3


def _jsonl(p) -> list[dict]:
    return [json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def distilled(depth_pruned, teacher, packed, tmp_path_factory):
    from definemed.stages import STAGES, run_stage

    out = tmp_path_factory.mktemp("distill")
    cfg = STAGES["distill"].config_model().model_validate({
        "output_dir": str(out / "d"), "teacher": {"model": str(teacher), "placement": "sharded"},
        "student": {"prune": depth_pruned[0].output_dir}, "packed": str(packed),
        "kd": {"alpha": 0.5, "temperature": 2.0, "chunk_tokens": 128}, "control": True,
        "parallel": {"num_workers": 2, "cpus_per_worker": 1}, "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"seq_len": 256, "global_batch_tokens": 1024, "max_steps": STEPS},
        "checkpoint": {"every_steps": EVERY, "keep": 2, "max_failures": 2},
        "fault_injection": {"rank": 1, "step": KILL_AT, "marker": str(out / "killed.marker")}})
    return cfg, run_stage(STAGES["distill"], cfg), out / "killed.marker"


@pytest.mark.integration
def test_distill_kd_and_control_on_the_same_tokens_resume_after_a_killed_worker(distilled, packed, teacher):
    from definemed.train.dataloader import PackedDataLoader

    cfg, out, marker = distilled
    assert marker.exists(), "the fault was never injected"
    d = Path(cfg.output_dir)
    kd_log, ctl_log = _jsonl(d / "student" / "batches.jsonl"), _jsonl(d / "control" / "batches.jsonl")
    first = [r for r in kd_log if r["resumed_from"] is None]
    resumed = [r for r in kd_log if r["resumed_from"] is not None]
    assert first[-1]["step"] == KILL_AT - 1 and {r["resumed_from"] for r in resumed} == {EVERY}
    assert [r["step"] for r in resumed] == list(range(EVERY + 1, STEPS + 1))
    # KD student and control saw exactly the loader's batches, step for step (the control was never killed)
    loaders = [PackedDataLoader(packed / "shards", r, 2, 2, seed=0) for r in range(2)]
    expect = {s + 1: [[mb.seq_id for mb in ld.step_batches(s)] for ld in loaders] for s in range(STEPS)}
    assert {r["step"]: r["seq_ids"] for r in kd_log} == expect == {r["step"]: r["seq_ids"] for r in ctl_log}
    kd, ctl = _jsonl(d / "student" / "metrics.jsonl"), _jsonl(d / "control" / "metrics.jsonl")
    assert [r["step"] for r in kd] == [r["step"] for r in ctl] == list(range(1, STEPS + 1))
    # step 1, same init and batch: the KD run's CE part is the control's loss; the pruned student computes the
    # teacher's logits (the dropped blocks were identities), so a teacher whose shards arrived intact gives KL 0
    assert kd[0]["ce"] == pytest.approx(ctl[0]["loss"], rel=1e-6)
    assert abs(kd[0]["kl"]) < 1e-6 and kd[0]["loss"] == pytest.approx(0.5 * kd[0]["ce"], rel=1e-6)
    assert kd[-1]["kl"] > 1e-4 and "kl" not in ctl[0]  # training moved the student away from the teacher
    summary = json.loads(Path(out["summary"]).read_text())
    assert summary["same_token_stream"] is True
    t = summary["runs"]["student"]["teacher"]
    assert t["placement"] == "sharded" and t["trainable_parameters"] == 0 and t["training_mode"] is False
    assert summary["runs"]["control"]["alpha"] == 0 and summary["runs"]["control"]["teacher"] is None
    p = summary["parameters"]
    assert p["student"] < p["teacher"] and p["reduction_pct"] == pytest.approx(100 * (1 - p["student"] / p["teacher"]),
                                                                                abs=0.05)
    assert Path(out["loss_curves"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_distilled_students_export_as_hf_models_that_differ(distilled):
    from safetensors.torch import load_file

    _, out, _ = distilled
    a, b = (load_file(Path(out[k]) / "model.safetensors") for k in ("student", "control"))
    assert set(a) == set(b)
    assert not torch.allclose(a["model.layers.0.mlp.up_proj.weight"].float(),
                              b["model.layers.0.mlp.up_proj.weight"].float())
    lineage = json.loads((Path(out["student"]) / "lineage.json").read_text())
    assert lineage["stage"] == "distill" and lineage["extra"]["run"] == "student" and lineage["extra"]["alpha"] == 0.5
    assert json.loads((Path(out["control"]) / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.mark.integration
def test_mismatched_tokenizer_exits_2_with_one_line(ray_local, packed, tmp_path, tiny_mistral):
    import yaml
    from typer.testing import CliRunner

    from definemed.cli import app

    spec = {"output_dir": str(tmp_path / "d"), "teacher": {"model": "tiny://qwen2"},
            "student": {"model": "tiny://mistral"}, "packed": str(packed),
            "train": {"seq_len": 256, "global_batch_tokens": 512, "max_steps": 1}}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(spec))
    res = CliRunner().invoke(app, ["distill", "--config", str(tmp_path / "d.yaml")])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "invalid config field 'student.model'" in lines[0] and "tokenizer of tiny://mistral differs" in lines[0]
    assert not (tmp_path / "d").exists()  # checked before the stage wrote anything
