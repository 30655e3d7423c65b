"""XLM-R medical/non-medical classifier under Ray Train (TorchTrainer, data-parallel DDP workers).

The train loop is short on purpose (torchtitan style): tokenise a batch, step, evaluate F-beta at the decision
threshold on the validation shard (all-reduced over workers), checkpoint only on improvement, stop after
`patience` epochs without one. Data preparation and held-out evaluation live outside the loop.
"""
from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from definemed.corpus.config import ClassifyConfig

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)
ID2LABEL = {0: "non_medical", 1: "medical"}
LABEL2ID = {v: k for k, v in ID2LABEL.items()}


# ------------------------------------------------------------------------------------------------ data


def split_of(doc_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic per-document split (salted apart from the annotation sample key)."""
    h = int.from_bytes(hashlib.sha256(f"split:{seed}:{doc_id}".encode()).digest()[:8], "big") / 2**64
    return "test" if h < test_fraction else "val" if h < test_fraction + val_fraction else "train"


def load_examples(cfg: ClassifyConfig) -> tuple["pd.DataFrame", dict[str, int]]:
    """id, text, label (0/1), split. Rows without a usable label are counted, not silently lost."""
    import pandas as pd

    root = Path(cfg.annotations)
    sample = pd.concat([pd.read_parquet(p) for p in sorted((root / "sample").glob("shard-*.parquet"))],
                       ignore_index=True)
    counts = {"sample_docs": len(sample)}
    if cfg.label_source == "gold":
        if cfg.gold_column not in sample.columns:
            from definemed.config import ConfigError

            raise ConfigError(f"invalid config field 'gold_column': column '{cfg.gold_column}' is not in the "
                              f"annotation sample {root / 'sample'}")
        lab = sample[["id", cfg.gold_column]].rename(columns={cfg.gold_column: "label_str"})
    else:
        ann = pd.read_parquet(root / "labels.parquet", columns=["id", "label"])
        lab = ann.rename(columns={"label": "label_str"})
    df = sample[["id", "text"]].merge(lab, on="id", how="inner")
    usable = df["label_str"].isin(list(LABEL2ID))
    counts["unusable_labels"] = int((~usable).sum())  # unparsed answers or missing gold labels
    df = df[usable].copy()
    df["label"] = df["label_str"].map(LABEL2ID).astype("int64")
    df["split"] = [split_of(i, cfg.seed, cfg.val_fraction, cfg.test_fraction) for i in df["id"]]
    for s in ("train", "val", "test"):
        counts[f"{s}_docs"] = int((df["split"] == s).sum())
        counts[f"{s}_medical"] = int(((df["split"] == s) & (df["label"] == 1)).sum())
    return df[["id", "text", "label", "split"]].reset_index(drop=True), counts


def shuffle_labels(df: "pd.DataFrame", seed: int) -> "pd.DataFrame":
    """Control experiment: the same texts with labels permuted within each split. A classifier that learns
    from text must fail on these."""
    df = df.copy()
    rng = np.random.default_rng(seed)
    for s in df["split"].unique():
        idx = df.index[df["split"] == s]
        df.loc[idx, "label"] = rng.permutation(df.loc[idx, "label"].to_numpy())
    return df


# ------------------------------------------------------------------------------------------------ train loop


def _setup(config: dict[str, Any]):
    """Tokenizer, DDP-wrapped model, device, optimizer and linear warmup schedule."""
    import ray.train.torch
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    torch.manual_seed(config["seed"])
    tok = AutoTokenizer.from_pretrained(config["model_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(
        config["model_dir"], num_labels=2, id2label=ID2LABEL, label2id=LABEL2ID, ignore_mismatched_sizes=True)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    total = config["steps_per_epoch"] * config["epochs"]
    sched = get_linear_schedule_with_warmup(opt, int(config["warmup_ratio"] * total), total)
    return tok, model, device, opt, sched


def _train_epoch(model, ds, encode, opt, sched, device, config: dict[str, Any], epoch: int) -> list[float]:
    import torch

    model.train()
    losses = []
    for b in ds.iter_batches(batch_size=config["batch_size"], batch_format="numpy",
                             local_shuffle_buffer_size=4 * config["batch_size"],
                             local_shuffle_seed=config["seed"] + epoch):
        out = model(**encode(b["text"]), labels=torch.as_tensor(b["label"], device=device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        losses.append(out.loss.item())
    return losses


def _validate(model, ds, encode, device, threshold: float):
    """tp, fp, fn, loss sum and n over this worker's validation shard, all-reduced over workers."""
    import torch
    import torch.distributed as dist

    model.eval()
    c = torch.zeros(5, dtype=torch.float64)
    with torch.inference_mode():
        for b in ds.iter_batches(batch_size=64, batch_format="numpy"):
            y_t = torch.as_tensor(b["label"], device=device)
            logits = model(**encode(b["text"])).logits.float()
            p = torch.softmax(logits, -1)[:, 1].cpu().numpy()
            pred, y = p >= threshold, b["label"].astype(bool)
            loss_sum = torch.nn.functional.cross_entropy(logits, y_t, reduction="sum").item()
            c += torch.tensor([(pred & y).sum(), (pred & ~y).sum(), (~pred & y).sum(), loss_sum, len(y)],
                              dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(c)
    return c


def _report(model, tok, metrics: dict, improved: bool, rank: int) -> None:
    """Checkpoint only on improvement: the latest checkpoint is always the best one."""
    import tempfile

    import ray.train

    if improved and rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            inner = model.module if hasattr(model, "module") else model
            inner.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import json

    import ray.train

    from definemed.corpus.metrics import fbeta, prf
    from definemed.io import atomic_write_text

    rank = ray.train.get_context().get_world_rank()
    tok, model, device, opt, sched = _setup(config)
    train_ds, val_ds = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")

    def encode(texts):
        enc = tok(list(texts), truncation=True, max_length=config["max_length"], padding=True, return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}

    best, since_best = (-1.0, -math.inf), 0
    history: list[dict] = []
    for epoch in range(config["epochs"]):
        losses = _train_epoch(model, train_ds, encode, opt, sched, device, config, epoch)
        c = _validate(model, val_ds, encode, device, config["threshold"])
        tp, fp, fn = (int(x) for x in c[:3].tolist())
        score, val_loss = fbeta(tp, fp, fn, config["beta"]), float(c[3] / max(c[4], 1))
        metrics = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else math.nan,
                   "val_loss": val_loss, "val_fbeta": score, **{f"val_{k}": v for k, v in prf(tp, fp, fn).items()}}
        history.append(dict(metrics))
        if rank == 0:  # Result.metrics holds only the best checkpoint's metrics; keep every epoch's
            atomic_write_text(config["history_path"], json.dumps(history, indent=1))
        # F-beta at the threshold decides; while it is tied (typically 0.0 before any score reaches 0.9) a
        # lower validation loss counts as progress, so patience does not run out before learning starts.
        improved = (score, -val_loss) > best
        best, since_best = ((score, -val_loss), 0) if improved else (best, since_best + 1)
        _report(model, tok, metrics, improved, rank)
        if since_best >= config["patience"]:
            break  # every rank sees the same all-reduced score, so all stop together


def train(cfg: ClassifyConfig, df: "pd.DataFrame", model_dir: str, storage: Path, name: str):
    """Run TorchTrainer; returns (best checkpoint path, per-epoch metrics)."""
    import ray.data
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train_df = df[df["split"] == "train"].sample(frac=1.0, random_state=cfg.seed)
    val_df = df[df["split"] == "val"]
    if train_df.empty or val_df.empty:
        from definemed.config import ConfigError

        raise ConfigError(f"invalid config field 'annotations': too few labelled documents to split "
                          f"({len(train_df)} train, {len(val_df)} val)")
    steps = max(1, math.ceil(len(train_df) / (cfg.batch_size * cfg.num_workers)))
    history_path = str((storage / f"{name}_history.json").resolve())  # storage is shared by all nodes
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dict(model_dir=model_dir, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               warmup_ratio=cfg.warmup_ratio, epochs=cfg.epochs, batch_size=cfg.batch_size,
                               max_length=cfg.max_length, threshold=cfg.threshold, beta=cfg.beta,
                               patience=cfg.patience, seed=cfg.seed, steps_per_epoch=steps,
                               history_path=history_path),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(name=name, storage_path=str(storage.resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
        datasets={"train": ray.data.from_pandas(train_df[["text", "label"]].reset_index(drop=True)),
                  "val": ray.data.from_pandas(val_df[["text", "label"]].reset_index(drop=True))},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training reported no checkpoint (F-beta never improved above -1?)")
    import json

    return result.checkpoint.path, json.loads(Path(history_path).read_text()) if Path(history_path).exists() else []


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate(model_dir: str, df: "pd.DataFrame", cfg: ClassifyConfig) -> dict[str, Any]:
    """Held-out (test split) scores -> metrics at the threshold, threshold sweep, PR curve points."""
    from definemed.corpus.metrics import at_threshold, pr_curve, threshold_sweep
    from definemed.corpus.score import Scorer

    test = df[df["split"] == "test"]
    scorer = Scorer(model_dir, max_length=cfg.max_length, device="cpu" if not cfg.use_gpu else None)
    scores = np.asarray([s for i in range(0, len(test), 64)
                         for s in scorer.score_texts(test["text"].iloc[i:i + 64].tolist())])
    y = test["label"].to_numpy().astype(bool)
    prec, rec, thr = pr_curve(scores, y)
    return {"n_test": int(len(test)), "test_medical": int(y.sum()),
            "at_threshold": at_threshold(scores, y, cfg.threshold, cfg.beta),
            "sweep": threshold_sweep(scores, y, sorted(set(cfg.sweep) | {cfg.threshold}), cfg.beta),
            "pr_curve": {"precision": prec.tolist(), "recall": rec.tolist(), "thresholds": thr.tolist()},
            "scores": scores.tolist(), "labels": y.astype(int).tolist()}


def plot_pr(ev: dict[str, Any], threshold: float, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from definemed.io import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    pc = ev["pr_curve"]
    ax.step(pc["recall"], pc["precision"], where="post", label="classifier (test split)")
    at = ev["at_threshold"]
    ax.scatter([at["recall"]], [at["precision"]], color="C3", zorder=3, label=f"threshold {threshold:g}")
    ax.scatter([0.8], [0.95], marker="x", color="k", zorder=3, label="study @0.9 (P 0.95, R 0.80)")
    ax.set_xlabel("recall (medical)"), ax.set_ylabel("precision (medical)")
    ax.set_xlim(0, 1.02), ax.set_ylim(0, 1.02), ax.grid(alpha=0.3), ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title, fontsize=9)
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def report_markdown(rep: dict[str, Any]) -> str:
    ev, cfg = rep["eval"], rep["config"]
    at = ev["at_threshold"]
    lines = ["# Medical classifier (XLM-R)", ""]
    for n in rep["notes"]:
        lines += [f"> **{n}**", ""]
    lines += [f"Labels: `{cfg['label_source']}`. Held-out test documents: {ev['n_test']} "
              f"({ev['test_medical']} medical). Early stopping on F-beta (beta={cfg['beta']}) at threshold "
              f"{cfg['threshold']}; best epoch {rep['best_epoch']} of {len(rep['history'])} run.", "",
              f"At threshold {cfg['threshold']}: precision {at['precision']:.3f}, recall {at['recall']:.3f}, "
              f"F1 {at['f1']:.3f} (study at 0.9: precision 0.95, recall 0.80).", "",
              "## Threshold sweep (test split)", "",
              "| threshold | precision | recall | F1 | F-beta | kept fraction |", "| --- | --- | --- | --- | --- | --- |"]
    bkey = f"f_beta_{cfg['beta']:g}"
    for r in ev["sweep"]:
        lines.append(f"| {r['threshold']:g} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
                     f"{r.get(bkey, r['f1']):.3f} | {r['kept_fraction']:.3f} |")
    lines += ["", "![precision-recall curve](pr_curve.png)", ""]
    return "\n".join(lines)
