"""Export our MC benchmarks as an lm-evaluation-harness task, so lm-eval scores exactly our prompts.

`python -m definemed.eval.lm_eval_task --out DIR` writes DIR/definemed_mmlu_de.yaml and DIR/definemed_medqa_de.yaml
with their documents (rendered with our German prompt builder) beside them. Run lm-eval against our endpoint with
`--include_path DIR --tasks definemed_mmlu_de` (docs/evaluation.md has the full command). lm-eval itself is not
needed here: it is a dev/test extra, never a runtime dependency.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from definemed.data.loaders import MCSourceConfig, load_mc_items
from definemed.eval.mc import MCPromptConfig, build_prompt, select_shots

SOURCES = {"mmlu_de": ("mmlu_de.jsonl", "mmlu"), "medqa_de": ("medqa_de.jsonl", "medqa")}


def task_yaml(task: str, data_file: Path) -> str:
    # lm-eval scores context + target_delimiter + choice; " " + "A" is exactly the " A" our scorer appends.
    return "\n".join([
        f"task: {task}",
        "dataset_path: json",
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data_file))}}}}}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: prompt",
        "doc_to_choice: letters",
        "doc_to_target: gold",
        "target_delimiter: \" \"",
        "metric_list:",
        "  - metric: acc",
        "metadata: {version: 1.0}",
        "",
    ])


def export(out: str | Path, benchmarks: tuple[str, ...] = ("mmlu_de", "medqa_de"),
           prompt: MCPromptConfig = MCPromptConfig(), per_subject: int | None = None) -> dict[str, Path]:
    """Write the task YAMLs and their documents; `per_subject` keeps only the first N items of each subject
    (shots are still drawn from all items)."""
    from definemed.data.sample import SRC_DIR
    from definemed.io import atomic_write_text

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for bench in benchmarks:
        fname, fmt = SOURCES[bench]
        items = load_mc_items(MCSourceConfig(path=str(SRC_DIR / fname), format=fmt, benchmark=bench))
        shots = select_shots(items, prompt.shots, prompt.seed)
        seen: dict[str, int] = {}
        rows = []
        for it in items:
            seen[it.subject] = seen.get(it.subject, 0) + 1
            if per_subject is None or seen[it.subject] <= per_subject:
                rows.append({"id": it.id, "prompt": build_prompt(it, shots[it.id]), "letters": list(it.letters),
                             "gold": it.answer})
        data = out / f"definemed_{bench}.jsonl"
        atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        written[bench] = atomic_write_text(out / f"definemed_{bench}.yaml", task_yaml(f"definemed_{bench}", data))
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shots", type=int, default=0)
    args = ap.parse_args()
    for bench, path in export(args.out, prompt=MCPromptConfig(shots=args.shots)).items():
        print(f"{bench}: {path}")


if __name__ == "__main__":
    main()
