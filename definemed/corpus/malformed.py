"""The one definition of malformed text, shared by the corpus ingest (filter, annotate) and the pack stage.

A row is malformed when its text is null, not a string (or bytes that are not UTF-8), empty, only whitespace,
longer than the stage's character limit, or (where rows carry ids) when its id is missing. The reason names
are the quarantine's `reason` column in every stage.
"""
from __future__ import annotations

from typing import Any

REASONS = ("null_text", "non_string", "empty", "whitespace", "oversized", "null_id")
_NO_ID = object()


def is_missing(value: Any) -> bool:
    """None, NaN, pd.NA or NaT: how a Parquet null reaches a pandas batch depends on the column dtype."""
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # arrays and other non-scalars
        return False


def as_text(value: Any) -> tuple[str | None, str | None]:
    """(text, reason). Binary columns holding UTF-8 are text; anything else that is not a str is malformed."""
    if value is None or (not isinstance(value, (str, bytes, bytearray)) and is_missing(value)):
        return None, "null_text"
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_string"
    if not isinstance(value, str):
        return None, "non_string"
    return value, None


def malformed_reason(text: Any, doc_id: Any = _NO_ID, max_chars: int | None = None) -> str | None:
    """Why a row cannot be used, or None if it is fine. Checked in a fixed order so counts are stable.
    `doc_id` is checked only when given (the pack stage's rows have no id); `max_chars` only when set."""
    text, reason = as_text(text)
    if reason:
        return reason
    if text == "":
        return "empty"
    if not text.strip():  # str.strip() also removes NBSP and ideographic spaces
        return "whitespace"
    if max_chars is not None and len(text) > max_chars:
        return "oversized"
    if doc_id is not _NO_ID and (doc_id is None or is_missing(doc_id) or str(doc_id) == ""):
        return "null_id"
    return None
