"""`distill` stage: train a student against a frozen teacher on Ray Train, beside a CE-only control.

It runs CPT's machinery (definemed/train: FSDP2 over the (replicate, shard) mesh, the packed deterministic loader,
DCP checkpoints with automatic resume after a killed worker, metrics, HF export, lineage); only the loss differs:

    loss = (1 - alpha) * CE + alpha * T^2 * KL(p_teacher^T || p_student^T)     (definemed/train/kd_loss.py)

The student is a prune stage's output (`student.prune`) or any model whose tokenizer is the teacher's
(`student.model`). With `control: true` a second run trains the same initial student on exactly the same token
stream (the loader's order is a function of the seed alone) with alpha = 0 and no teacher, so the report can
compare KD against plain CE at equal tokens. Outputs: `student/` and `control/`, each with `hf_model/`,
metrics, batches, loss curve and checkpoints; `loss_curves.png` (CE and KL parts) and `summary.json` (parameter
counts, the runs, teacher placement) at the top.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from definemed.config import ConfigError, InputPath, StrictModel
from definemed.models.registry import ModelRef
from definemed.train.config import PackedTrainingConfig

log = logging.getLogger(__name__)
RUN_NAME = "distill"
HF_MODEL_DIR = "hf_model"
RUNS = ("student", "control")


class TeacherConfig(StrictModel):
    model: ModelRef  # the specialist to distil: a merge stage's model dir, tiny://qwen2, ...
    # replicated: whole teacher in every worker; sharded: fully_shard over the workers, no optimizer; auto: by memory
    placement: Literal["auto", "replicated", "sharded"] = "auto"
    # auto: replicated while the teacher's weights take at most this share of one worker's device memory
    replicate_below: float = Field(0.25, gt=0, le=1)


class StudentConfig(StrictModel):
    prune: InputPath | None = None  # a prune stage's output_dir (its model/ is the student)
    model: ModelRef | None = None  # or any model whose tokenizer is the teacher's

    @field_validator("model")
    @classmethod
    def _exactly_one(cls, v, info: ValidationInfo):
        if (v is None) == (info.data.get("prune") is None):
            raise ValueError("set exactly one of student.prune or student.model")
        return v

    @property
    def field(self) -> str:
        return "student.prune" if self.prune is not None else "student.model"

    @property
    def ref(self) -> str:
        from definemed.distill.prune import MODEL_SUBDIR

        return f"{self.prune.rstrip('/')}/{MODEL_SUBDIR}" if self.prune is not None else str(self.model)


class KdConfig(StrictModel):
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the KL term: (1 - alpha) * CE + alpha * T^2 * KL
    temperature: float = Field(1.0, gt=0)  # T: both distributions are softened by it
    # forward: KL(teacher || student) (torchtune, NeMo AutoModel); reverse: KL(student || teacher) (MiniLLM)
    divergence: Literal["forward", "reverse"] = "forward"
    chunk_tokens: int = Field(0, ge=0)  # KL over this many target tokens at a time, recomputed in backward; 0: all


class DistillConfig(PackedTrainingConfig):
    """`definemed distill`: a student trained on the teacher's soft targets (and a CE-only control)."""

    teacher: TeacherConfig
    student: StudentConfig
    kd: KdConfig = KdConfig()
    control: bool = True  # also train the same student from the same init on the same tokens with CE only


# ----------------------------------------------------------------------------------------------------------------
# the worker (Ray Train)


def distill_loop_per_worker(loop: dict[str, Any]) -> None:
    from definemed.distill.teacher import load_teacher
    from definemed.train.kd_loss import DistillLoss
    from definemed.train.loop import build_model, run_steps, setup_worker

    w = setup_worker(loop)
    model, mesh, info = build_model(w, loop["student_path"])
    teacher, t_info, after = None, None, None
    if loop["alpha"] > 0:
        teacher, t_info, after = load_teacher(w, loop["teacher_path"], mesh)
        info["flops_per_token"] += t_info["forward_flops_per_token"]  # MFU counts the teacher's forward too
    kd = w.cfg.kd
    loss = DistillLoss(teacher, loop["alpha"], kd.temperature, kd.divergence, kd.chunk_tokens, after)
    run_steps(w, model, mesh, info, micro_loss=loss,
              state_extra={"run": loop["run"], "alpha": loop["alpha"], "teacher": t_info})


# ----------------------------------------------------------------------------------------------------------------
# the stage (driver)


def check_student(cfg: DistillConfig, teacher_path: str, student_path: str) -> None:
    """Distillation compares next-token distributions id by id: the student must have the teacher's tokenizer."""
    from transformers import AutoConfig

    from definemed.train.pack import same_vocabulary

    if not same_vocabulary(teacher_path, student_path):
        raise ConfigError(f"invalid config field '{cfg.student.field}': the tokenizer of {cfg.student.ref} differs "
                          f"from teacher {cfg.teacher.model}'s; distillation needs the same vocabulary")
    vs, vt = (AutoConfig.from_pretrained(p).vocab_size for p in (student_path, teacher_path))
    if vs != vt:
        raise ConfigError(f"invalid config field '{cfg.student.field}': {cfg.student.ref} has {vs} output logits, "
                          f"teacher {cfg.teacher.model} {vt}")


def parameter_counts(teacher_path: str, student_path: str) -> dict[str, Any]:
    from definemed.distill.surgery import count_parameters
    from definemed.train.weights import build_on_meta

    t, s = (count_parameters(build_on_meta(p, "sdpa")) for p in (teacher_path, student_path))
    return {"teacher": t, "student": s, "reduction": 1 - s / t, "reduction_pct": round(100 * (1 - s / t), 1)}


def effective_batches(batches_file: Path) -> dict[int, Any]:
    """Sequence ids per step as the run finally trained them (a re-run step after a resume wins)."""
    from definemed.train.metrics import read_jsonl

    return {r["step"]: r["seq_ids"] for r in read_jsonl(batches_file)}


def train_one(cfg: DistillConfig, run: str, teacher_path: str, student_path: str, out: Path,
              meaningless: bool) -> dict[str, Any]:
    from definemed.train.export import export_hf
    from definemed.train.trainer import build_trainer, fit, ran_with, run_summary, write_metrics

    alpha = cfg.kd.alpha if run == "student" else 0.0
    run_dir = out / run
    loop = {"tag": f"distill {run}", "run": run, "alpha": alpha, "student_path": student_path,
            "teacher_path": teacher_path, "model_ref": cfg.student.ref, "fault_injection": run == "student"}
    ckpt_dir, state = fit(cfg, build_trainer(cfg, distill_loop_per_worker, loop, RUN_NAME, run_dir), run_dir,
                          RUN_NAME, desc=f"distill {run}")
    what = (f"KD alpha={alpha:g}, T={cfg.kd.temperature:g}, {cfg.kd.divergence} KL" if run == "student"
            else "CE-only control")
    rows = write_metrics(run_dir, f"{what}: {cfg.student.ref}" + (" (tiny random model)" if meaningless else ""))
    hf = export_hf(ckpt_dir, student_path, run_dir / HF_MODEL_DIR, cfg.export_dtype, cfg,
                   lineage_inputs={"teacher": teacher_path, "student_init": student_path, "packed": cfg.packed},
                   extra={"run": run, "alpha": alpha, "step": state["step"], "teacher": state.get("teacher"),
                          "final_loss": rows[-1]["loss"] if rows else None, **ran_with(state)},
                   stage="distill")
    last = rows[-1] if rows else {}
    return {**run_summary(rows, state, ckpt_dir), "what": what, "alpha": alpha, "hf_model": str(hf),
            "final_ce": last.get("ce"), "final_kl": last.get("kl"), "teacher": state.get("teacher"),
            "tokens": state["step"] * cfg.train.global_batch_tokens, "rows": rows}


def check_inputs(cfg: DistillConfig) -> tuple[str, str]:
    """Before anything is written (the stage's preflight): the pack fits, and teacher, student and pack share one
    vocabulary. (teacher path, student path)."""
    from definemed.models import resolve_model
    from definemed.train.trainer import check_pack_tokenizer, check_packed

    stats = check_packed(cfg)
    teacher_path = resolve_model(cfg.teacher.model)
    student_path = resolve_model(cfg.student.ref)
    check_student(cfg, teacher_path, student_path)
    check_pack_tokenizer(stats, cfg.packed, teacher_path, cfg.teacher.model)
    return teacher_path, student_path


def run(cfg: DistillConfig) -> dict[str, str]:
    from definemed.distill.plots import plot_distill_curves
    from definemed.io import atomic_write_json
    from definemed.models import is_meaningless_model
    from definemed.train.metrics import BATCHES_FILE

    teacher_path, student_path = check_inputs(cfg)
    params = parameter_counts(teacher_path, student_path)
    meaningless = is_meaningless_model(teacher_path) or is_meaningless_model(student_path)
    out = Path(cfg.output_dir).resolve()
    runs = [r for r in RUNS if r == "student" or cfg.control]
    print(f"[distill] {cfg.teacher.model} ({params['teacher'] / 1e6:.1f}M) -> {cfg.student.ref} "
          f"({params['student'] / 1e6:.1f}M, {params['reduction']:.1%} fewer parameters); runs: {', '.join(runs)}; "
          f"{cfg.parallel.num_workers} workers, mesh {cfg.parallel.mesh_label()}, {cfg.train.max_steps} steps of "
          f"{cfg.train.global_batch_tokens} tokens", flush=True)
    done = {r: train_one(cfg, r, teacher_path, student_path, out, meaningless) for r in runs}
    same_tokens = None
    if cfg.control:
        same_tokens = effective_batches(out / "student" / BATCHES_FILE) == effective_batches(
            out / "control" / BATCHES_FILE)
        if not same_tokens:
            raise RuntimeError("the KD student and the control trained on different batches; the comparison would "
                               "not be at equal tokens")
    curves = out / "loss_curves.png"
    plot_distill_curves({r: d.pop("rows") for r, d in done.items()}, curves,
                        f"{cfg.teacher.model} -> {cfg.student.ref}" + (" (tiny random models: the numbers prove "
                                                                       "the code path only)" if meaningless else ""))
    summary = {"parameters": params, "teacher": cfg.teacher.model, "student_init": cfg.student.ref,
               "kd": cfg.kd.model_dump(), "same_token_stream": same_tokens,
               "note": "tiny random models: the numbers prove the code path only" if meaningless else None,
               "runs": done}
    atomic_write_json(out / "summary.json", summary)
    outputs = {"student": done["student"]["hf_model"], "loss_curves": str(curves), "summary": str(out / "summary.json")}
    if cfg.control:
        outputs["control"] = done["control"]["hf_model"]
    return outputs
