"""Run the merge as a Ray task with declared resources, on the node that reaches the checkpoints.

Inside the task: resolve both refs, validate compatibility (nothing written yet), mergekit.merge.run_merge
into a temporary sibling of the final directory, add model_a's tokenizer and chat template, the reproducing
mergekit YAML, a model card and a lineage manifest, then rename into place.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from definemed.config import ConfigError
from definemed.merge.config import DEFAULT_KEY, MergeStageConfig

log = logging.getLogger(__name__)
MODEL_SUBDIR = "model"
MERGEKIT_YAML = "mergekit_config.yml"
# What makes a tokenizer + chat template + generation defaults (mergekit's own copy list).
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def merge_fingerprint(cfg: MergeStageConfig) -> str:
    """What the merged weights depend on (not where they are written or which node computes them)."""
    data = cfg.model_dump(mode="json", include={"model_a", "model_b", "method", "t", "density", "seed", "dtype"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def node_ref(ref: str) -> str:
    """Relative local paths become absolute on the driver (Ray workers may run elsewhere in the tree)."""
    if "://" in ref:
        return ref
    p = Path(ref).expanduser()
    return str(p.resolve()) if p.exists() else ref


def _outputs(model_dir: Path) -> dict[str, str]:
    return {"model": str(model_dir), "mergekit_config": str(model_dir / MERGEKIT_YAML),
            "model_card": str(model_dir / "README.md")}


def _reusable(model_dir: Path, fingerprint: str) -> bool:
    """A model left by a run killed after its rename but before the stage's _DONE marker."""
    manifest = model_dir / "lineage.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text())["extra"]["merge_fingerprint"] == fingerprint
    except (KeyError, ValueError):
        return False


def copy_tokenizer(src: str, dst: Path) -> None:
    """model_a's tokenizer and chat template, byte for byte where local; re-serialised from the hub cache
    otherwise."""
    copied = [f for f in TOKENIZER_FILES if (Path(src) / f).is_file()]
    for f in copied:
        shutil.copy2(Path(src) / f, dst / f)
    if not any(f in copied for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(src).save_pretrained(dst)


def merge_on_node(cfg: MergeStageConfig, output_dir: str, ref_a: str, ref_b: str) -> dict[str, str]:
    """Body of the Ray task. Validation happens before the first byte is written."""
    from mergekit.merge import MergeOptions, run_merge

    from definemed.io import atomic_dir
    from definemed.lineage import hash_path, write_manifest
    from definemed.merge.card import model_card, yaml_header
    from definemed.merge.mergekit_adapter import release_loaders
    from definemed.merge.methods import to_mergekit
    from definemed.merge.schedule import per_layer
    from definemed.merge.validate import check_compatible, model_dtype
    from definemed.models import resolve_model

    path_a, path_b = resolve_model(ref_a), resolve_model(ref_b)
    cfg_a = check_compatible(cfg.model_a, path_a, cfg.model_b, path_b,
                             filters=[k for k in cfg.t if k != DEFAULT_KEY])
    out_dtype = cfg.dtype or model_dtype(cfg_a)
    mk = to_mergekit(cfg, path_a, path_b, out_dtype)
    mk_yaml, mk_dict = mk.to_yaml(), mk.model_dump(mode="json", exclude_none=True)  # run_merge normalises mk

    out = Path(output_dir)
    final = out / MODEL_SUBDIR
    fingerprint = merge_fingerprint(cfg)
    if _reusable(final, fingerprint):
        log.warning("merge: reusing %s (same inputs and schedule)", final)
        return _outputs(final)
    for stale in out.glob(f".{MODEL_SUBDIR}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)

    schedule = per_layer(cfg.t, int(cfg_a["num_hidden_layers"]))
    hashes = {"model_a": hash_path(path_a), "model_b": hash_path(path_b)}
    options = MergeOptions(device="cuda" if cfg.resources.num_gpus > 0 else "cpu", random_seed=cfg.seed,
                           copy_tokenizer=False, write_model_card=False, safe_serialization=True)
    try:
        with atomic_dir(final, overwrite=True) as tmp:
            run_merge(mk, str(tmp), options=options)
            copy_tokenizer(path_a, tmp)
            (tmp / MERGEKIT_YAML).write_text(yaml_header(cfg, path_a, path_b) + mk_yaml + "\n",
                                             encoding="utf-8")
            (tmp / "README.md").write_text(
                model_card(cfg, path_a, path_b, hashes, schedule, mk_yaml, out_dtype), encoding="utf-8")
            write_manifest(tmp, "merge", cfg, inputs={"model_a": path_a, "model_b": path_b},
                           extra={"merge_fingerprint": fingerprint, "model_refs": {"model_a": cfg.model_a,
                                  "model_b": cfg.model_b}, "mergekit": mk_dict, "t_per_layer": schedule, "out_dtype": out_dtype})
    finally:
        release_loaders()  # Ray reuses this worker for later merges
    return _outputs(final)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()  # only succeeds when empty: a failed merge leaves no output directory behind
    except OSError:
        pass


def run(cfg: MergeStageConfig) -> dict[str, str]:
    import ray
    from ray.exceptions import RayTaskError

    from definemed.ray_utils import init_ray

    init_ray(cfg.ray)
    out = Path(cfg.output_dir).resolve()
    task = ray.remote(**cfg.resources.ray_options())(merge_on_node).options(name="definemed-merge")
    log.info("merge: %s of %s (t=0) and %s (t=1) as a Ray task with %s", cfg.method, cfg.model_a,
             cfg.model_b, cfg.resources.ray_options())
    ref = task.remote(cfg, str(out), node_ref(cfg.model_a), node_ref(cfg.model_b))
    try:
        return ray.get(ref)
    except RayTaskError as e:
        _remove_if_empty(out)
        if isinstance(e.cause, ConfigError):
            raise e.cause from None  # one line naming both models; the CLI exits 2
        raise
    except BaseException:
        ray.cancel(ref, force=True)  # Ctrl-C: stop the merge; its temp dir is removed by the next run
        _remove_if_empty(out)
        raise
