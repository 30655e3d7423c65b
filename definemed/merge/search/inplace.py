"""Merge in memory, straight into a running vLLM engine: the one place that couples mergekit's planner to vLLM's
worker.

mergekit plans the same merge that `mergekit-yaml` runs (mergekit-evolve's in-memory evaluator does the same) and
its executor yields each merged tensor under its Hugging Face name. vLLM's worker `reload_weights` takes exactly
such (name, tensor) pairs in checkpoint format (it stacks q/k/v and gate/up, skips a tied lm_head and repacks for
its kernels, as when it loads a checkpoint). So a trial replaces every weight of one long-lived engine instead of
writing a model to disk and starting a fresh engine. The merge runs inside the engine's worker
(`LLM.collective_rpc` with a function), so only the mergekit config crosses a process boundary, never the tensors.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Iterator


def merged_tensors(mk: dict[str, Any], device: str = "cpu", seed: int = 0) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of every weight of the merge that this mergekit config describes, computed in memory.

    The plan is `mergekit-yaml`'s own (`plan_to_disk`), of which only each SaveTensor's tensor task runs: the
    writer never does, so nothing touches the disk. (mergekit's `plan_in_memory` fails under pydantic 2.14: its
    ReturnTensor re-validates every task as an abstract `Task[Tensor]`.) Each tensor is cast to the dtype the
    save task would write, so the values are the ones `mergekit-yaml` writes."""
    from mergekit.architecture import get_architecture_info
    from mergekit.common import dtype_from_name
    from mergekit.config import MergeConfiguration
    from mergekit.graph import Executor
    from mergekit.io.tasks import SaveTensor
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    from definemed.merge.mergekit_adapter import release_loaders

    config = MergeConfiguration.model_validate(mk)
    # the options seed every RNG as run_merge does: dare_ties drops at random, and must match `mergekit-yaml`
    options = MergeOptions(device=device, random_seed=seed, copy_tokenizer=False, write_model_card=False)
    arch = get_architecture_info(config, options)
    planner = MergePlanner(config, arch, options, config.base_model.config())
    saves = [t for t in planner.plan_to_disk(out_path="/nonexistent-never-written") if isinstance(t, SaveTensor)]
    names: dict[Any, list[SaveTensor]] = {}
    for s in saves:
        names.setdefault(s.tensor_task, []).append(s)
    try:
        for task, value in Executor(list(names), math_device=device, storage_device=device).run(quiet=True):
            for s in names[task]:
                if value is None:
                    if not s.optional:
                        raise RuntimeError(f"mergekit produced no value for required tensor {s.tensor_name}")
                    continue
                yield s.tensor_name, value.to(dtype=dtype_from_name(s.dtype)) if s.dtype else value
    finally:
        release_loaders()


def _reload(worker, mk: dict[str, Any], device: str, seed: int) -> None:
    worker.reload_weights(weights_iterator=merged_tensors(mk, device, seed), is_checkpoint_format=True)


def load_merge(llm, mk: dict[str, Any], device: str = "cpu", seed: int = 0) -> None:
    """Replace every weight of `llm` (a vllm.LLM) by the merge `mk`, through vLLM's in-place reload (which also
    redoes the kernel-format processing, such as the CPU backend's repacked linear weights), and drop cached
    prefixes, whose KV the old weights computed."""
    llm.collective_rpc(partial(_reload, mk=mk, device=device, seed=seed))
    llm.reset_prefix_cache()
