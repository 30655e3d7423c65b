#!/usr/bin/env bash
# Run every GPU-only code path once on ONE CUDA GPU and print one line per path (PASS/FAIL, seconds, detail).
# Budget: at most 8 minutes on one GPU. Nothing is downloaded: the tiny offline models and the bundled German
# sample are used, with the cluster's GPU settings (accelerator: gpu, CUDA graphs, FSDP2 bf16, flash-attn if
# installed).
#
#   scripts/gpu_check.sh                 # on a GPU node with the gpu extra installed
#   scripts/gpu_check.sh --validate-only # anywhere: write the configs and validate them, run nothing
#
# Paths:
#   annotate  vLLM (CUDA build) labels 256 documents through ray.data.llm on one GPU, CUDA graphs on
#   serve     Ray Serve LLM on CUDA answers the official `openai` client (definemed serve-demo)
#   cpt       20 CPT steps, FSDP2 with bf16 mixed precision, flash_attention_2 when flash-attn is installed
#   mfu       benchmarks/bench_cpt_mfu_gpu.py on a Qwen2.5-0.5B-shaped random model, prints MFU
# Logs of every path: $GPU_CHECK_DIR (default outputs/gpu_check/<timestamp>/).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
VALIDATE_ONLY=0
[[ "${1:-}" == "--validate-only" ]] && VALIDATE_ONLY=1
DIR=${GPU_CHECK_DIR:-outputs/gpu_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$DIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
FAILED=0

line() { printf '%-9s %-4s %5ss  %s\n' "$1" "$2" "$3" "$4"; }

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

# One line of evidence per path, read from what the path wrote.
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
elif path == "cpt":
    s = json.loads((d / "cpt" / "summary.json").read_text())
    print(f"{s['steps']} steps on {s['device']}, loss {s['first_loss']:.2f} -> {s['final_loss']:.2f}, "
          f"{s['mixed_precision']}, attention {s['attention']['used']}, mean MFU {s['mean_mfu']:.1%}")
elif path == "mfu":
    r = json.loads((d / "cpt_mfu_gpu.json").read_text())
    print(f"MFU {r['mfu']:.1%} of {r['peak_tflops']:.0f} TFLOP/s ({r['gpu']}, {r['params'] / 1e6:.0f}M params, "
          f"attn {r['attn']}, {r['tokens_per_s']:,.0f} tok/s; bf16 matmul baseline {r['baseline_matmul_tflops']:.0f})")
PYEOF

run() {  # name, command...
  local name=$1; shift
  local t0=$(date +%s)
  if "$@" >"$DIR/$name.log" 2>&1; then
    line "$name" PASS $(( $(date +%s) - t0 )) "$($PY "$DIR/detail.py" "$name" "$DIR" 2>&1 | tail -1)"
  else
    line "$name" FAIL $(( $(date +%s) - t0 )) "$(grep -E 'Error|error' "$DIR/$name.log" | tail -1 | cut -c1-160)"
    FAILED=1
  fi
}

$PY -m definemed.cli tiny-models --config "$DIR/tiny-models.yaml" >"$DIR/tiny-models.log" 2>&1 \
  || { echo "tiny models failed: $DIR/tiny-models.log"; exit 1; }
ln -sfn "$($PY -c 'from definemed.models import resolve_model; print(resolve_model("tiny://qwen2"))')" "$DIR/tiny-qwen2"

run annotate timeout 150 $PY -m definemed.cli annotate --config "$DIR/annotate.yaml"
run serve timeout 150 $PY -m definemed.cli serve-demo --config "$DIR/serve.yaml"
run cpt bash -c "timeout 60 $PY -m definemed.cli pack --config '$DIR/pack.yaml' \
                 && timeout 150 $PY -m definemed.cli cpt --config '$DIR/cpt.yaml'"
run mfu timeout 120 $PY benchmarks/bench_cpt_mfu_gpu.py --steps 20 --out "$DIR/cpt_mfu_gpu.json"

TOTAL=$(( $(date +%s) - START ))
echo "gpu_check: $TOTAL s in all (budget 480 s)$([[ $TOTAL -gt 480 ]] && echo ', OVER BUDGET')"
exit $FAILED
