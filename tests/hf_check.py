"""Did an engine run this model's weights? Compare what it generated with transformers on the same tokens."""
from __future__ import annotations


def assert_greedy_tokens_match_transformers(model_dir: str, prompt_ids, out_ids, k: int = 5) -> None:
    """Every token the engine generated greedily is among transformers' top-k next tokens for that model (fp32,
    teacher-forced on the same sequence). k > 1 absorbs the bf16 near-ties of a random tiny model; another
    model's weights would hit the top k with probability k/vocab per token."""
    import torch
    from transformers import AutoModelForCausalLM

    assert len(out_ids) > 0
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([list(prompt_ids) + list(out_ids)])
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[0]
    p = len(prompt_ids)
    for j, t in enumerate(out_ids):
        top = logits[p + j - 1].topk(k).indices.tolist()
        assert t in top, f"generated token {j} ({t}) is not among the model's top {k} ({top})"
