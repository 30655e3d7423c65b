"""FineMed-de corpus pipeline (datatrove style: one small, separately testable step per module).

ingest (read + quarantine) -> sample -> annotate (LLM labels, resumable shards) -> quality (vs human gold)
-> classify (XLM-R under Ray Train) -> score (actor pool) -> filter (threshold, dedup, decontam, PII) -> stats.
"""
