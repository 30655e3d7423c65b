"""Model references: tiny offline models (``tiny://qwen2``) and real paths / hub ids share one loading path."""
from definemed.models.registry import resolve_model, is_tiny_ref

__all__ = ["resolve_model", "is_tiny_ref"]
