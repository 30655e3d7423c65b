"""Our config -> a mergekit MergeConfiguration, one small module per method."""
from __future__ import annotations

from definemed.merge import dare, linear, slerp, ties

BUILDERS = {"slerp": slerp.mergekit_config, "linear": linear.mergekit_config,
            "ties": ties.mergekit_config, "dare_ties": dare.mergekit_config}


def to_mergekit(cfg, path_a: str, path_b: str, dtype: str | None):
    """Validated mergekit MergeConfiguration. Math runs in float32 (SLERP's own precision); `dtype` is what is
    written out."""
    from mergekit.config import MergeConfiguration

    d = BUILDERS[cfg.method](cfg, path_a, path_b)
    d["dtype"] = "float32"
    if dtype:
        d["out_dtype"] = dtype
    return MergeConfiguration.model_validate(d)
