"""Model references: tiny offline models (``tiny://qwen2``), real registry-shipped models (``real://gemma-3-270m``)
and plain paths / hub ids share one loading path."""
from definemed.models.registry import ModelRef, check_model_ref, is_meaningless_model, is_tiny_ref, resolve_model

__all__ = ["ModelRef", "resolve_model", "is_tiny_ref", "is_meaningless_model", "check_model_ref"]
