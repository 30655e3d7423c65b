#!/usr/bin/env bash
# Run the GPU-only code paths once on ONE CUDA GPU and print one line per path (PASS/FAIL/SKIP, seconds, detail).
# The script keeps the whole run under 8 minutes itself: every path gets a timeout cut from what is left of the
# 470 s budget (plus at most 10 s for a killed path to exit), and a path with under 30 s left is skipped.
# Nothing is downloaded: the tiny offline models, random Qwen2-shaped models and the bundled German sample.
#
#   scripts/gpu_check.sh                              # full: a GPU node with the gpu extra (Ray, vLLM) installed
#   scripts/gpu_check.sh --torch-only                 # a GPU machine with torch + transformers only (no Ray,
#                                                     # vLLM, mergekit, pydantic, accelerate, pyarrow, network)
#   scripts/gpu_check.sh [--torch-only] --validate-only   # anywhere: check configs/commands, no GPU needed
#
# Paths (full):
#   annotate  vLLM (CUDA build) labels 256 documents through ray.data.llm on one GPU, CUDA graphs on
#   serve     Ray Serve LLM on CUDA answers the official `openai` client (definemed serve-demo)
#   cpt       20 CPT steps of the cpt stage (Ray Train), FSDP2 with bf16 mixed precision, flash-attn if installed
#   mfu       benchmarks/bench_cpt_mfu_gpu.py on a Qwen2.5-0.5B-shaped random model, prints MFU
# Paths (--torch-only; every Python process runs under scripts/torch_only.py, which makes the packages above
# unimportable, as they are on that machine):
#   cpt       torchrun (1 process per GPU, NCCL) -> definemed.train.torchrun: 20 FSDP2 bf16 CPT steps of a
#             Qwen2.5-0.5B-shaped random model; rank and world size from torchrun's environment, no Ray
#   mfu       the same benchmark as above
# --validate-only: full mode validates the stage configs; torch-only mode imports the torch-only modules without
# the absent packages and runs both paths' exact commands on CPU with a tiny shape (2 gloo processes, 2 steps).
# Logs of every path: $GPU_CHECK_DIR (default outputs/gpu_check/<timestamp>/).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
VALIDATE_ONLY=0
TORCH_ONLY=0
for a in "$@"; do
  case $a in
    --validate-only) VALIDATE_ONLY=1 ;;
    --torch-only) TORCH_ONLY=1 ;;
    *) echo "gpu_check: unknown option $a (use --torch-only and/or --validate-only)"; exit 2 ;;
  esac
done
DIR=${GPU_CHECK_DIR:-outputs/gpu_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$DIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}  # + up to 10 s for a killed path to exit: under 8 minutes in all
FAILED=0

line() { printf '%-9s %-4s %5ss  %s\n' "$1" "$2" "$3" "$4"; }

# Seconds a path may run: its own cap, cut to what is left of the budget (0: skip it).
allowance() {
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local t=$(( $1 < left ? $1 : left ))
  (( t >= 30 )) && echo "$t" || echo 0
}

# One line of evidence per path, read from what the path wrote.
write_detail() {
cat > "$DIR/detail.py" <<'PYEOF'
import json, sys
from pathlib import Path
path, d = sys.argv[1], Path(sys.argv[2])
if path == "annotate":
    import pandas as pd
    done = json.loads((d / "annotate" / "_DONE.json").read_text())
    lab = pd.read_parquet(done["outputs"]["labels"])
    print(f"{len(lab)} docs labelled by vLLM on CUDA ({(lab.label != 'unparsed').mean():.0%} parsed)")
elif path == "serve":
    a = json.loads((d / "serve" / "answer.json").read_text())
    print(f"openai client: {len(a['answer'])} chars, finish {a['finish_reason']}, {a['latency_s']} s")
elif path == "cpt" and (d / "cpt_torchrun.json").exists():
    s = json.loads((d / "cpt_torchrun.json").read_text())
    mfu = f", MFU {s['mfu']:.1%}" if "mfu" in s else ""
    print(f"torchrun x{s['world_size']} ({s['backend']}) on {s['device_name']}: {s['steps']} steps, loss "
          f"{s['first_loss']:.2f} -> {s['final_loss']:.2f}, compute {'/'.join(s['compute_dtypes'])}, attention "
          f"{s['attention']['used']}, {s['tokens_per_s']:,.0f} tok/s{mfu}")
elif path == "cpt":
    s = json.loads((d / "cpt" / "summary.json").read_text())
    print(f"{s['steps']} steps on {s['device']}, loss {s['first_loss']:.2f} -> {s['final_loss']:.2f}, "
          f"{s['mixed_precision']}, attention {s['attention']['used']}, mean MFU {s['mean_mfu']:.1%}")
elif path == "mfu":
    r = json.loads((d / "cpt_mfu_gpu.json").read_text())
    print(f"MFU {r['mfu']:.1%} of {r['peak_tflops']:.0f} TFLOP/s ({r['gpu']}, {r['params'] / 1e6:.0f}M params, "
          f"attn {r['attn']}, {r['tokens_per_s']:,.0f} tok/s; bf16 matmul baseline {r['baseline_matmul_tflops']:.0f})")
PYEOF
}

run() {  # name, cap in seconds, command...
  local name=$1 cap=$2; shift 2
  local t0=$(date +%s) t
  t=$(allowance "$cap")
  if (( t == 0 )); then
    line "$name" SKIP 0 "no time left in the ${BUDGET} s budget"; FAILED=1; return
  fi
  if timeout -k 10 "$t" "$@" >"$DIR/$name.log" 2>&1; then
    line "$name" PASS $(( $(date +%s) - t0 )) "$($PY "$DIR/detail.py" "$name" "$DIR" 2>&1 | tail -1)"
  else
    local why
    why=$(grep -E 'Error|error' "$DIR/$name.log" | tail -1 | cut -c1-160)
    (( $(date +%s) - t0 >= t )) && why="timed out after ${t} s; $why"
    line "$name" FAIL $(( $(date +%s) - t0 )) "$why"
    FAILED=1
  fi
}

finish() {
  local total=$(( $(date +%s) - START ))
  echo "gpu_check: $total s in all (budget $BUDGET s)"
  exit $FAILED
}

# ---- torch only: torch + transformers, nothing else ----------------------------------------------------------
if [[ $TORCH_ONLY == 1 ]]; then
  GUARD=(scripts/torch_only.py)
  TORCHRUN=($PY -m torch.distributed.run --standalone)  # = torchrun, without relying on PATH
  if [[ $VALIDATE_ONLY == 1 ]]; then
    CPT_ARGS=(--nproc-per-node 2 "${GUARD[@]}" -m definemed.train.torchrun --device cpu --shape tiny --steps 2
              --seq-len 128)
    MFU_ARGS=(--cpu-dry-run --out "$DIR/cpt_mfu_gpu.json")
    $PY "${GUARD[@]}" --check >"$DIR/imports.log" 2>&1 && line imports ok 0 "$(tail -1 "$DIR/imports.log")" \
      || { line imports FAIL 0 "$(tail -1 "$DIR/imports.log")"; FAILED=1; }
  else
    if ! nvidia-smi -L >"$DIR/gpu.txt" 2>&1; then
      echo "gpu_check: no NVIDIA GPU (nvidia-smi failed); nothing run. See $DIR/gpu.txt"; exit 2
    fi
    echo "gpu_check --torch-only on $(head -1 "$DIR/gpu.txt"); $($PY -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'); logs in $DIR"
    CPT_ARGS=(--nproc-per-node 1 "${GUARD[@]}" -m definemed.train.torchrun --device cuda --shape qwen2.5-0.5b
              --steps 20 --seq-len 2048 --lr 1e-4)
    MFU_ARGS=(--steps 20 --out "$DIR/cpt_mfu_gpu.json")
  fi
  write_detail
  run cpt 200 "${TORCHRUN[@]}" "${CPT_ARGS[@]}" --out "$DIR/cpt_torchrun.json"
  if [[ $VALIDATE_ONLY == 1 ]]; then  # the dry run writes no JSON: its log line is the evidence
    t0=$(date +%s)
    timeout -k 10 "$(allowance 120)" $PY "${GUARD[@]}" -m benchmarks.bench_cpt_mfu_gpu "${MFU_ARGS[@]}" \
      >"$DIR/mfu.log" 2>&1 && line mfu ok $(( $(date +%s) - t0 )) "$(tail -1 "$DIR/mfu.log" | cut -c1-120)" \
      || { line mfu FAIL $(( $(date +%s) - t0 )) "$(tail -1 "$DIR/mfu.log")"; FAILED=1; }
  else
    run mfu 180 $PY "${GUARD[@]}" -m benchmarks.bench_cpt_mfu_gpu "${MFU_ARGS[@]}"
  fi
  finish
fi

# ---- configs: the demo's stages at GPU settings, one GPU ------------------------------------------------------
cat > "$DIR/tiny-models.yaml" <<EOF
output_dir: $DIR/tiny-models
models: ["tiny://qwen2"]
EOF
cat > "$DIR/annotate.yaml" <<EOF
output_dir: $DIR/annotate
ray: {num_cpus: 8}
source: {path: definemed/data/sample/fineweb2_de}
sample_size: 256
shard_size: 128
backend: vllm
model: tiny://qwen2
engine: {accelerator: gpu, max_model_len: 2048, gpu_memory_utilization: 0.5}   # enforce_eager unset: CUDA graphs
min_replicas: 1
max_replicas: 1
batch_size: 64
EOF
cat > "$DIR/serve.yaml" <<EOF
output_dir: $DIR/serve
ray: {num_cpus: 8}
model: $DIR/tiny-qwen2
model_id: merged
max_tokens: 32
engine: {accelerator: gpu, max_model_len: 2048, gpu_memory_utilization: 0.4}
EOF
cat > "$DIR/pack.yaml" <<EOF
output_dir: $DIR/pack
ray: {num_cpus: 8}
input: definemed/data/sample/fineweb2_de
model: tiny://qwen2
seq_len: 1024
eos_token: "<|endoftext|>"
sequences_per_shard: 64
EOF
cat > "$DIR/cpt.yaml" <<EOF
output_dir: $DIR/cpt
ray: {num_cpus: 8}
model: tiny://qwen2
packed: $DIR/pack
parallel: {num_workers: 1, use_gpu: true, cpus_per_worker: 1, mixed_precision: auto, attn_implementation: auto}
optim: {lr: 1.0e-3, warmup_steps: 2}
train: {seq_len: 1024, global_batch_tokens: 2048, max_steps: 20, seed: 0}
checkpoint: {every_steps: 10, keep: 1, max_failures: 0}
EOF

if [[ $VALIDATE_ONLY == 1 ]]; then
  for s in tiny-models annotate pack; do
    $PY -m definemed.cli validate "$s" --config "$DIR/$s.yaml" >/dev/null 2>"$DIR/$s.validate.log" \
      && line "$s" ok 0 "config valid" || { line "$s" FAIL 0 "$(tail -1 "$DIR/$s.validate.log")"; FAILED=1; }
  done
  # serve and cpt read what earlier paths produce: validated as `definemed plan` does, before it exists
  for s in serve-demo cpt; do
    f=$DIR/${s%-demo}.yaml
    $PY -c "import sys; from definemed.plan.load import load_stages; load_stages(sys.argv[1], stage=sys.argv[2])" \
      "$f" "$s" 2>"$DIR/$s.validate.log" && line "$s" ok 0 "config valid" \
      || { line "$s" FAIL 0 "$(tail -1 "$DIR/$s.validate.log")"; FAILED=1; }
  done
  exit $FAILED
fi

if ! nvidia-smi -L >"$DIR/gpu.txt" 2>&1; then
  echo "gpu_check: no NVIDIA GPU (nvidia-smi failed); nothing run. See $DIR/gpu.txt"; exit 2
fi
echo "gpu_check on $(head -1 "$DIR/gpu.txt"); logs in $DIR"

write_detail

$PY -m definemed.cli tiny-models --config "$DIR/tiny-models.yaml" >"$DIR/tiny-models.log" 2>&1 \
  || { echo "tiny models failed: $DIR/tiny-models.log"; exit 1; }
ln -sfn "$($PY -c 'from definemed.models import resolve_model; print(resolve_model("tiny://qwen2"))')" "$DIR/tiny-qwen2"

run annotate 120 $PY -m definemed.cli annotate --config "$DIR/annotate.yaml"
run serve 110 $PY -m definemed.cli serve-demo --config "$DIR/serve.yaml"
run cpt 130 bash -c "$PY -m definemed.cli pack --config '$DIR/pack.yaml' \
                     && $PY -m definemed.cli cpt --config '$DIR/cpt.yaml'"
run mfu 100 $PY benchmarks/bench_cpt_mfu_gpu.py --steps 20 --out "$DIR/cpt_mfu_gpu.json"
finish
