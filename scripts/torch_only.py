"""Run a module the way the torch-only GPU machine would: Ray, vLLM, mergekit, pydantic, accelerate, pyarrow,
pandas and datasets cannot be imported (they are marked missing in sys.modules), so an accidental dependency on
any of them fails here as it would there.

    python scripts/torch_only.py -m definemed.train.torchrun --device cpu --shape tiny
    torchrun --nproc-per-node 2 scripts/torch_only.py -m definemed.train.torchrun ...
    python scripts/torch_only.py --check        # import every module of the torch-only path, run nothing
"""
import runpy
import sys
from pathlib import Path

ABSENT = ("ray", "vllm", "mergekit", "pydantic", "accelerate", "pyarrow", "pandas", "datasets")
TORCH_ONLY_MODULES = ("definemed.train.torchrun", "definemed.train.step", "definemed.train.parallelize",
                      "definemed.train.loss", "definemed.train.kd_loss", "definemed.train.lr_scheduler",
                      "definemed.train.metrics", "definemed.train.weights", "definemed.io", "transformers.models.qwen2")

for name in ABSENT:
    sys.modules[name] = None  # `import name` raises ImportError, as on a machine without it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        import importlib

        for m in TORCH_ONLY_MODULES:
            importlib.import_module(m)
        print(f"torch-only imports ok ({len(TORCH_ONLY_MODULES)} modules without {', '.join(ABSENT)})")
    elif len(sys.argv) > 2 and sys.argv[1] == "-m":
        module = sys.argv[2]
        sys.argv = [module, *sys.argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.exit(__doc__)
