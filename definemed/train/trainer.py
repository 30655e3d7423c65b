"""The driver side every training stage on Ray Train shares (cpt, distill): check the packed input, build the
`TorchTrainer` (workers from config and the cluster, a named run that resumes), follow rank 0's metrics with a
progress bar, find the final checkpoint, and write the metrics as CSV and a loss curve."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from definemed.config import ConfigError


def check_packed(cfg) -> dict[str, Any]:
    """The pack stage's stats for `cfg.packed`; its seq_len must be the stage's `train.seq_len`."""
    from definemed.train.pack import SHARDS_DIR, read_stats

    try:
        stats = read_stats(cfg.packed)
    except FileNotFoundError:
        raise ConfigError(f"invalid config field 'packed': {cfg.packed} is not a pack stage output "
                          "(no stats.json)") from None
    if stats["seq_len"] != cfg.train.seq_len:
        raise ConfigError(f"invalid config field 'train.seq_len': {cfg.train.seq_len} but {cfg.packed} was packed "
                          f"with seq_len {stats['seq_len']}")
    if not (Path(cfg.packed) / SHARDS_DIR).is_dir():
        raise ConfigError(f"invalid config field 'packed': {cfg.packed}/{SHARDS_DIR} missing")
    return stats


def check_pack_tokenizer(stats: dict[str, Any], packed: str, model_path: str, model_ref: str) -> None:
    """Token ids only mean something to the tokenizer that made them: refuse a pack from another vocabulary."""
    from definemed.train.pack import same_vocabulary

    if not same_vocabulary(stats["tokenizer"], model_path):
        raise ConfigError(f"invalid config field 'packed': {packed} was tokenized for {stats['model']} "
                          f"({stats['tokenizer']}), whose vocabulary differs from model {model_ref}")


def scaling_config(cfg, resources: dict[str, float] | None = None):
    """Ray Train workers: GPU or CPU from `parallel.use_gpu` and the cluster (`resources`, default the connected
    one), never from the driver's hardware."""
    from ray.train import ScalingConfig

    from definemed.resources import resolve_device

    p = cfg.parallel
    gpu = resolve_device(p.use_gpu, resources) == "gpu"
    return ScalingConfig(num_workers=p.num_workers, use_gpu=gpu, resources_per_worker={"CPU": p.cpus_per_worker},
                         accelerator_type=p.accelerator_type if gpu else None)


def build_trainer(cfg, loop_fn: Callable[[dict[str, Any]], None], loop: dict[str, Any], run_name: str,
                  out: Path):
    """A TorchTrainer whose run `run_name` lives in `out/ray` (same name + storage: a restarted job resumes).
    `loop` gains `output_dir` (= out: rank 0's metrics and batch logs), `run_dir` and the packed `shards`."""
    from ray.train import CheckpointConfig as RayCheckpointConfig
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from definemed.train.pack import SHARDS_DIR

    out = Path(out).resolve()  # workers may not share the driver's cwd
    run_config = RunConfig(
        name=run_name, storage_path=str(out / "ray"),
        failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
        checkpoint_config=RayCheckpointConfig(num_to_keep=cfg.checkpoint.keep))
    loop = {**loop, "cfg": cfg, "output_dir": str(out), "run_dir": str(out / "ray" / run_name),
            "shards": str((Path(cfg.packed) / SHARDS_DIR).resolve())}
    return TorchTrainer(loop_fn, train_loop_config=loop, scaling_config=scaling_config(cfg),
                        run_config=run_config)


def fit(cfg, trainer, out: Path, run_name: str, desc: str) -> tuple[Path, dict[str, Any]]:
    """Run the trainer with a progress bar; (final checkpoint dir, its train state), checked to be the last step."""
    from definemed.train.checkpoint import latest_checkpoint_dir, read_train_state
    from definemed.train.metrics import METRICS_FILE, follow_progress

    out = Path(out).resolve()
    with follow_progress(out / METRICS_FILE, cfg.train.max_steps, desc=desc):
        trainer.fit()
    ckpt_dir = latest_checkpoint_dir(out / "ray" / run_name)
    if ckpt_dir is None:
        raise RuntimeError(f"training finished without a checkpoint under {out / 'ray' / run_name}")
    state = read_train_state(ckpt_dir)
    if state["step"] != cfg.train.max_steps:
        raise RuntimeError(f"latest checkpoint is step {state['step']}, expected {cfg.train.max_steps}")
    return ckpt_dir, state


def write_metrics(out: Path, title: str) -> list[dict[str, Any]]:
    """metrics.jsonl (rank 0's, one row per step) as metrics.csv and loss_curve.png; the rows."""
    from definemed.train.metrics import LOSS_PNG, METRICS_CSV, METRICS_FILE, plot_loss_curve, read_jsonl, write_csv

    rows = read_jsonl(Path(out) / METRICS_FILE)
    write_csv(rows, Path(out) / METRICS_CSV)
    plot_loss_curve(rows, Path(out) / LOSS_PNG, title)
    return rows


def run_summary(rows: list[dict[str, Any]], state: dict[str, Any], ckpt_dir: Path) -> dict[str, Any]:
    """Loss at the ends, mean throughput and MFU (without the warm-up step), what the workers ran."""
    timed = rows[1:] or rows
    return {
        "steps": state["step"],
        "first_loss": rows[0]["loss"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "mean_tokens_per_s": sum(r["tokens_per_s"] for r in timed) / max(1, len(timed)),
        "mean_mfu": sum(r["mfu"] for r in timed) / max(1, len(timed)),
        "mfu_note": "GPU dense bf16 peak" if state.get("device") == "cuda" else
                    "CPU peak is an estimate (metrics.cpu_peak_tflops)",
        **ran_with(state),
        "checkpoint": str(ckpt_dir),
    }


def ran_with(state: dict[str, Any]) -> dict[str, Any]:
    """What the workers actually used, from a checkpoint's train state."""
    return {"device": state.get("device"), "mesh": state.get("mesh"), "attention": state.get("attention"),
            "mixed_precision": state.get("mixed_precision")}
