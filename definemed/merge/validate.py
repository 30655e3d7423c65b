"""Check the two parents can be merged before anything is written: same architecture, layer count, widths,
vocabulary and tensor shapes. One error lists every mismatch and names both models."""
from __future__ import annotations

import json
from pathlib import Path

from definemed.config import ConfigError

# Config fields that fix tensor shapes or their meaning; a mismatch in any makes a merge meaningless.
_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size", "intermediate_size",
           "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
# Often omitted (derived or class default); compared only when both configs state them.
_OPTIONAL = ("head_dim", "tie_word_embeddings", "num_key_value_heads", "intermediate_size")


class IncompatibleModelsError(ConfigError):
    """model_a and model_b cannot be merged (exit 2 like any rejected config: nothing was written)."""


def _label(ref: str, path: str) -> str:
    return f"'{ref}'" + (f" ({path})" if path != ref else "")


def load_model_config(ref: str, path: str, role: str) -> dict:
    """config.json of a local model dir, or via transformers (hub cache) otherwise."""
    p = Path(path) / "config.json"
    try:
        if p.is_file():
            cfg = json.loads(p.read_text(encoding="utf-8"))
        else:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(path).to_dict()
    except Exception as e:  # noqa: BLE001 - any failure means "not a model we can read"
        raise IncompatibleModelsError(
            f"invalid config field '{role}': cannot read model {_label(ref, path)}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    # Multimodal wrappers keep the LM under text_config; the LM is what gets merged.
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    return {**cfg, **text, "architectures": cfg.get("architectures")}


def tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from safetensors headers (no weights are read). Empty if not local."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def model_dtype(model_cfg: dict) -> str | None:
    d = model_cfg.get("dtype") or model_cfg.get("torch_dtype")
    return d if d in ("float32", "bfloat16", "float16") else None


def check_compatible(ref_a: str, path_a: str, ref_b: str, path_b: str,
                     filters: list[str] | None = None) -> dict:
    """Raise IncompatibleModelsError naming both models and every mismatch; return model_a's config.

    `filters` are the schedule's tensor-name filters: one that matches no tensor of model_a is a typo that
    would silently fall back to `default`, so it is an error too."""
    ca = load_model_config(ref_a, path_a, "model_a")
    cb = load_model_config(ref_b, path_b, "model_b")
    problems = []
    if ca.get("architectures") != cb.get("architectures"):
        problems.append(f"architectures differ ({ca.get('architectures')} vs {cb.get('architectures')})")
    for f in _FIELDS:
        if f == "model_type" and problems:
            continue  # already said by architectures
        va, vb = ca.get(f), cb.get(f)
        if f in _OPTIONAL and (va is None or vb is None):
            continue  # left to the class default on one side; the tensor shapes below still compare
        if va != vb:
            problems.append(f"{f} differs ({va} vs {vb})")
    sa, sb = tensor_shapes(path_a), tensor_shapes(path_b)
    if not problems and sa and sb:
        only_a, only_b = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
        if only_a or only_b:
            problems.append(f"tensor names differ (only in model_a: {only_a[:3]}, only in model_b: {only_b[:3]})")
        shape_diff = [k for k in sorted(set(sa) & set(sb)) if sa[k] != sb[k]]
        if shape_diff:
            k = shape_diff[0]
            problems.append(f"{len(shape_diff)} tensor shapes differ (e.g. {k}: {sa[k]} vs {sb[k]})")
    if problems:
        raise IncompatibleModelsError(
            f"cannot merge model_a {_label(ref_a, path_a)} with model_b {_label(ref_b, path_b)}: "
            + "; ".join(problems))
    if filters and sa:
        unused = [f for f in filters if not any(f in name for name in sa)]
        if unused:
            raise IncompatibleModelsError(
                f"invalid config field 't.{unused[0]}': filter matches no tensor of model_a {_label(ref_a, path_a)}")
    return ca
