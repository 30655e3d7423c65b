"""docs/configuration.md is generated from the config models; it must match what they render now."""
from definemed import config_reference


def test_config_reference_is_current():
    page = config_reference.PAGE
    assert page.exists(), "run: python -m definemed.config_reference"
    assert page.read_text(encoding="utf-8") == config_reference.render(), (
        "docs/configuration.md is stale: run python -m definemed.config_reference")


def test_reference_lists_every_stage_and_nested_field():
    text = config_reference.render()
    from definemed.stages import STAGES

    for name in STAGES:
        assert f"## {name} stage" in text
    assert "`train.global_batch_tokens`" in text  # nested sections are expanded with dotted paths
    assert "| `output_dir` | str | **required** |" in text


def test_comment_descriptions_are_picked_up():
    from definemed.config import RayConfig

    assert "oversubscribed" in config_reference._field_comments(RayConfig)["num_cpus"]
