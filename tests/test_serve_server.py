"""The model card /v1/models reports: which weights a replica serves, and where they came from."""
from __future__ import annotations

import json


def test_weights_card_names_content_hash_and_lineage(tmp_path):
    from definemed.lineage import hash_path, write_manifest
    from serve.server import weights_card

    (tmp_path / "model.safetensors").write_bytes(b"weights v1")
    write_manifest(tmp_path, "merge", {"method": "slerp"})
    card = weights_card("merged", str(tmp_path), 256)
    assert card["id"] == "merged" and card["root"] == str(tmp_path) and card["max_model_len"] == 256
    assert card["weights_sha256"] == hash_path(tmp_path)
    assert card["lineage"]["stage"] == "merge" and "created_utc" in card["lineage"]

    (tmp_path / "model.safetensors").write_bytes(b"weights v2")
    assert weights_card("merged", str(tmp_path), 256)["weights_sha256"] != card["weights_sha256"]
    json.dumps(card)  # served as JSON


def test_weights_card_without_lineage(tmp_path):
    from serve.server import weights_card

    (tmp_path / "config.json").write_text("{}")
    card = weights_card("base", str(tmp_path), None)
    assert "lineage" not in card and card["weights_sha256"]
