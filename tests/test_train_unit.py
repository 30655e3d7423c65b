"""Unit tests of the CPT building blocks (no Ray): packing, packed loss, data order, lr schedule, config."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from definemed.train.pack import best_fit_decreasing, build_rows, chunk_document, padding_stats


# ------------------------------------------------------------------------------------------------ packing


def test_chunking_splits_long_documents_and_keeps_every_token():
    doc = list(range(23))
    chunks = chunk_document(doc, 10)
    assert [len(c) for c in chunks] == [10, 10, 3]
    assert sum(chunks, []) == doc
    assert chunk_document([1, 2, 3], 10) == [[1, 2, 3]]


def test_bfd_is_best_fit_decreasing():
    # Decreasing: 7 opens bin0 (rem 3), 6 opens bin1 (rem 4), 4 fills bin1, 3 fills bin0.
    bins = best_fit_decreasing([3, 7, 4, 6], 10)
    assert sorted(sorted(b) for b in bins) == [[0, 1], [2, 3]]
    bins = best_fit_decreasing([5, 4, 5], 10)  # 5(i0) -> b0 rem5; 5(i2) -> b0 rem0; 4 -> b1
    assert sorted(sorted(b) for b in bins) == [[0, 2], [1]]
    with pytest.raises(ValueError, match="chunk documents first"):
        best_fit_decreasing([11], 10)


def test_bfd_properties_on_random_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(1, 256) for _ in range(2000)]
    bins = best_fit_decreasing(lengths, 256)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))  # every item exactly once
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    lower_bound = -(-sum(lengths) // 256)
    assert len(bins) <= lower_bound * 1.02 + 1  # BFD is near-optimal on many small items
    assert best_fit_decreasing(lengths, 256) == bins  # deterministic


def test_build_rows_layout_positions_restart_and_padding_fraction():
    docs = [list(range(100, 100 + n)) for n in (5, 7, 3, 14)]  # 14 > seq_len 8 -> chunks 8 + 6
    cols = build_rows(docs, seq_len=8, pad_id=0)
    assert all(len(r) == 8 for r in cols["input_ids"])
    all_tokens = sorted(t for r, n in zip(cols["input_ids"], cols["num_tokens"]) for t in r[:n])
    assert all_tokens == sorted(t for d in docs for t in d)
    for ids, pos, lens, n in zip(cols["input_ids"], cols["position_ids"], cols["doc_lens"], cols["num_tokens"]):
        assert sum(lens) == n
        expect = [p for L in lens for p in range(L)] + list(range(8 - n))
        assert pos == expect
        assert ids[n:] == [0] * (8 - n)
    stats = padding_stats(cols["doc_lens"], 8)
    total = sum(len(d) for d in docs)
    assert stats["tokens"] == total and stats["chunks"] == 5
    assert stats["padding_fraction"] == pytest.approx(1 - total / (8 * len(cols["input_ids"])))
    assert stats["naive_padding_fraction"] == pytest.approx(1 - total / (8 * 5))
    assert stats["padding_fraction"] < stats["naive_padding_fraction"]


def test_packing_the_sample_corpus_pads_under_one_percent(tiny_qwen2):
    from definemed.data.sample import iter_tokenizer_texts
    from definemed.train.pack import load_tokenizer, tokenize_batch

    texts = list(iter_tokenizer_texts())
    batch = pa.table({"text": texts + [None, "  "]})
    toks = tokenize_batch(batch, tiny_qwen2, "text", min_doc_tokens=2).column("tokens").to_pylist()
    eos = load_tokenizer(tiny_qwen2).eos_token_id
    assert toks and all(t[-1] == eos for t in toks)
    assert len(toks) <= len(texts)  # the None and blank rows are dropped (and quarantined by the stage)
    cols = build_rows(toks, 256, pad_id=0)
    stats = padding_stats(cols["doc_lens"], 256)
    assert stats["padding_fraction"] < 0.01, stats
    assert stats["naive_padding_fraction"] > 10 * stats["padding_fraction"]


# ------------------------------------------------------------------------------------------------ loss


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_mistral"])
def test_packed_loss_equals_token_weighted_mean_of_document_losses(fixture, request):
    import torch
    from transformers import AutoModelForCausalLM

    from definemed.train.loss import forward_logits, loss_sum, packed_labels

    path = request.getfixturevalue(fixture)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    vocab = model.config.vocab_size
    docs = [torch.randint(5, vocab, (n,)).tolist() for n in (17, 40, 9, 30)]
    cols = build_rows(docs, seq_len=128, pad_id=0)
    assert len(cols["input_ids"]) == 1  # all four documents in one packed row (+ padding)
    ids = torch.tensor(cols["input_ids"])
    pos = torch.tensor(cols["position_ids"])
    with torch.no_grad():
        packed, n_packed = loss_sum(forward_logits(model, ids, pos), packed_labels(ids, pos, cols["num_tokens"][0]))
        total, n_total = 0.0, 0
        for d in docs:
            x = torch.tensor([d])
            ls, n = loss_sum(forward_logits(model, x, torch.arange(len(d))[None]), x.clone())
            total, n_total = total + float(ls), n_total + n
        # Control: plain 0..N positions let documents attend to each other and change the loss.
        leaky, _ = loss_sum(forward_logits(model, ids, torch.arange(128)[None]), packed_labels(ids, pos, cols["num_tokens"][0]))
    assert n_packed == n_total == sum(len(d) - 1 for d in docs)
    assert float(packed) / n_packed == pytest.approx(total / n_total, rel=1e-5, abs=1e-5)
    assert abs(float(leaky) - float(packed)) / n_packed > 1e-3


# ------------------------------------------------------------------------------------------------ data order


def _write_shards(tmp_path, sizes, seq_len=4):
    d = tmp_path / "shards"
    d.mkdir()
    k = 0
    for i, n in enumerate(sizes):
        ids = [[k + r] * seq_len for r in range(n)]
        k += n
        pq.write_table(pa.table({
            "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
            "position_ids": pa.array([list(range(seq_len))] * n, type=pa.list_(pa.int32())),
            "doc_lens": pa.array([[seq_len]] * n, type=pa.list_(pa.int32())),
            "num_tokens": pa.array([seq_len] * n, type=pa.int32()),
        }), d / f"part-{i:05d}.parquet")
    return d


def test_dataloader_is_deterministic_sharded_and_resumable(tmp_path):
    from definemed.train.dataloader import PackedDataLoader

    d = _write_shards(tmp_path, [5, 3, 8])
    world, accum = 2, 2
    loaders = [PackedDataLoader(d, r, world, accum, seed=3) for r in range(world)]
    seen = []
    for step in range(7):  # 28 sequences: one full epoch (16) and most of a second
        per_rank = [[mb.seq_id for mb in ld.step_batches(step)] for ld in loaders]
        for r in range(world):  # the row content is the seq_id: reads are right
            for mb in loaders[r].step_batches(step):
                assert int(mb.input_ids[0, 0]) == mb.seq_id
        assert not set(per_rank[0]) & set(per_rank[1])  # ranks never share a sequence within a step
        seen += [i for ids in per_rank for i in ids]
    assert sorted(seen[:16]) == list(range(16))  # epoch 1 covers every sequence exactly once
    assert seen[:16] != list(range(16))  # and is shuffled
    assert seen[16:] != seen[:len(seen) - 16]  # epoch 2 is a different order
    # Resume: a fresh loader (same seed) continues at any step with exactly the same batches.
    again = PackedDataLoader(d, 1, world, accum, seed=3)
    state = loaders[1].state_dict(4)
    assert again.check_resume(json.loads(json.dumps(state))) == 4
    assert [mb.seq_id for mb in again.step_batches(4)] == [mb.seq_id for mb in loaders[1].step_batches(4)]
    assert [mb.seq_id for mb in PackedDataLoader(d, 0, world, accum, seed=4).step_batches(0)] != \
        [mb.seq_id for mb in loaders[0].step_batches(0)]
    with pytest.raises(ValueError, match="seed"):
        PackedDataLoader(d, 0, world, accum, seed=4).check_resume(state)


def test_labels_mask_document_starts_and_padding():
    import torch

    from definemed.train.loss import IGNORE_INDEX, packed_labels

    ids = torch.tensor([[5, 6, 7, 8, 9, 0, 0]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1]])
    lab = packed_labels(ids, pos, 5)
    assert lab.tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX]]


# ------------------------------------------------------------------------------------------------ schedule, config


def test_warmup_then_cosine():
    from definemed.train.lr_scheduler import lr_factor

    f = [lr_factor(s, 4, 20, 0.1) for s in range(21)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0) and f[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))  # monotone decay after warmup
    assert f[12] == pytest.approx(0.55)  # cosine midpoint


def test_cpt_config_rejects_bad_batch_and_mesh(tmp_path):
    from definemed.config import ConfigError, parse_config
    from definemed.train.cpt import CptConfig

    base = {"output_dir": str(tmp_path / "o"), "model": "tiny://qwen2", "packed": str(tmp_path),
            "train": {"seq_len": 256, "global_batch_tokens": 1024, "max_steps": 2}}
    assert parse_config(CptConfig, base).grad_accum() == 2
    with pytest.raises(ConfigError, match=r"'train'.*global_batch_tokens"):
        parse_config(CptConfig, {**base, "train": {**base["train"], "global_batch_tokens": 1000}})
    with pytest.raises(ConfigError, match=r"parallel.shard_group_size"):
        parse_config(CptConfig, {**base, "parallel": {"num_workers": 4, "shard_group_size": 3}})
    with pytest.raises(ConfigError, match="packed"):
        parse_config(CptConfig, {**base, "packed": str(tmp_path / "missing")})


def test_mesh_shape():
    from definemed.train.parallelize import mesh_shape

    assert mesh_shape(2, None) == (1, 2) and mesh_shape(2, 1) == (2, 1) and mesh_shape(32, 8) == (4, 8)
    with pytest.raises(ValueError):
        mesh_shape(6, 4)


def test_flops_per_token_matches_6n_for_qwen2_0_5b_shape():
    from transformers import Qwen2Config

    from definemed.train.metrics import flops_per_token

    c = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                    intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)
    n_params, n_embed = 494_032_768, 151936 * 896
    f = flops_per_token(c, n_params, n_embed, 4096)
    assert f == pytest.approx(6 * n_params + 12 * 24 * 14 * 64 * 4096)


def test_document_separator_can_be_the_pretraining_eos(tiny_qwen2):
    from definemed.config import ConfigError
    from definemed.train.pack import load_tokenizer, separator_id, tokenize_batch

    tok = load_tokenizer(tiny_qwen2)
    sep = separator_id(tok, "<|endoftext|>")
    assert sep != tok.eos_token_id  # the instruct eos is <|im_end|>
    toks = tokenize_batch(pa.table({"text": ["Der Blutdruck ist hoch."]}), tiny_qwen2, "text", 2, eos_id=sep)
    assert toks.column("tokens").to_pylist()[0][-1] == sep
    with pytest.raises(ConfigError, match="eos_token"):
        separator_id(tok, "<|nope|>")


@pytest.mark.parametrize("config,family", [("pack.yaml", "tiny://qwen2"), ("pack-mistral.yaml", "tiny://mistral")])
def test_cluster_pack_configs_name_their_families_separator(config, family):
    """Each cluster pack config chooses its model family's pre-training separator explicitly (tiny models share
    their family's special tokens): Qwen2.5 <|endoftext|>, not the Instruct eos <|im_end|>; Mistral </s>."""
    import yaml

    from definemed.models import resolve_model
    from definemed.train.pack import load_tokenizer, separator_id

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "cluster" / config).read_text())
    assert cfg["eos_token"], config
    tok = load_tokenizer(resolve_model(family))
    sep = separator_id(tok, cfg["eos_token"])
    if family == "tiny://qwen2":
        assert tok.convert_ids_to_tokens(sep) == "<|endoftext|>" and sep != tok.eos_token_id
    else:
        assert sep == tok.eos_token_id


def test_driver_progress_follows_rank0_metrics(tmp_path, capsys):
    """The cpt bar lives on the driver and reads metrics.jsonl, including a rewrite on resume."""
    import json
    import time

    from definemed.train.metrics import MetricsLog, follow_progress

    path = tmp_path / "metrics.jsonl"
    with follow_progress(path, total=4, poll_s=0.05):
        log = MetricsLog(path, resume_step=0)
        for step in (1, 2, 3):
            log.write({"step": step, "loss": 5.0 - step, "tokens_per_s": 100.0})
            time.sleep(0.1)
        MetricsLog(path, resume_step=2)  # resumed from step 2: step 3 is dropped and redone
        log.write({"step": 3, "loss": 1.5, "tokens_per_s": 90.0})
        log.write({"step": 4, "loss": 1.25, "tokens_per_s": 90.0})
    err = capsys.readouterr().err
    assert "4/4" in err and "loss=1.250" in err
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]
