"""How configs/real-distill.yaml's KD settings (alpha, T, lr) were chosen: a small sweep on the DEV half of the
held-out FineMed-de documents, never on the test half the eval stage reports on.

    python scripts/distill_sweep.py run --settings '[{"alpha": 0, "lr": 1e-3}, {"alpha": 0.5, "T": 1, "lr": 1e-3}]'
    python scripts/distill_sweep.py select [--results docs/distill-sweep.json]

`run` trains the pruned SmolLM2 student of real-distill (outputs/real-distill/prune/model) for `--steps` steps per
setting in one process (the distill stage's loss, loader, optimizer and scheduler, without Ray) and records every
held-out document's summed NLL by id. `select` reads the records and picks, by medical perplexity on the dev half
(`definemed.train.split.dev_test_split`, the split the eval stage's `split: test` leaves out), the best KD setting
and the best CE-only lr. The test half is not read.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEACHER = "outputs/real-instruct/merge/model"
STUDENT = "outputs/real-distill/prune/model"
PACK = "outputs/real-instruct/pack"
RESULTS = "docs/distill-sweep.json"
MAX_TOKENS = 256  # tokens per document, as the eval stage's perplexity (configs/real-distill.yaml)


def heldout(tokenizer) -> tuple[list[str], list[list[int]]]:
    from definemed.eval.perplexity import PerplexitySetConfig, load_set, tokenize_docs

    docs = load_set(PerplexitySetConfig(path=f"{PACK}/heldout.parquet"))
    return [i for i, _ in docs], tokenize_docs(tokenizer, [t for _, t in docs], MAX_TOKENS)


def load(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    m.config.use_cache = False
    return m


def run(settings: list[dict], steps: int, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from definemed.eval.perplexity import nll_transformers
    from definemed.train.dataloader import PackedDataLoader
    from definemed.train.kd_loss import kd_loss_sum
    from definemed.train.loss import count_targets, forward_logits
    from definemed.train.lr_scheduler import build_lr_scheduler

    torch.set_num_threads(os.cpu_count() or 1)
    ids, docs = heldout(AutoTokenizer.from_pretrained(TEACHER))
    teacher = load(TEACHER).eval().requires_grad_(False) if any(s["alpha"] > 0 for s in settings) else None
    loader = PackedDataLoader(f"{PACK}/shards", 0, 1, grad_accum=2, seed=0)  # real-distill: 2 x 512 per step
    rows = json.loads(out.read_text())["runs"] if out.exists() else []
    for s in settings:
        t0 = time.time()
        torch.manual_seed(0)
        student = load(STUDENT).train()
        opt = torch.optim.AdamW(student.parameters(), lr=s["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        sched = build_lr_scheduler(opt, s.get("warmup", 4), steps, 0.1)
        for step in range(steps):
            micro = loader.step_batches(step)
            n_t = sum(count_targets(mb.labels) for mb in micro)
            for mb in micro:
                tl = None
                if teacher is not None and s["alpha"] > 0:
                    with torch.no_grad():
                        tl = forward_logits(teacher, mb.input_ids, mb.position_ids)
                sl = forward_logits(student, mb.input_ids, mb.position_ids)
                loss, _, _ = kd_loss_sum(sl, tl, mb.labels, alpha=s["alpha"], temperature=s.get("T", 1.0),
                                         divergence=s.get("divergence", "forward"))
                (loss / n_t).backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        student.eval()
        with torch.no_grad():
            nll = nll_transformers(student, docs)
        rows.append({**s, "steps": steps, "seconds": round(time.time() - t0, 1),
                     "nll": dict(zip(ids, nll)), "tokens": dict(zip(ids, (len(d) - 1 for d in docs)))})
        out.write_text(json.dumps({"about": __doc__.splitlines()[0], "runs": rows}, indent=1) + "\n")
        print(f"{s}: {rows[-1]['seconds']} s", flush=True)


def dev_ppl(row: dict, dev: set[str]) -> float:
    return math.exp(sum(v for k, v in row["nll"].items() if k in dev) /
                    sum(v for k, v in row["tokens"].items() if k in dev))


def select(path: Path, seed: int = 0) -> dict:
    from definemed.train.split import dev_test_split

    rows = json.loads(path.read_text())["runs"]
    ids = sorted(rows[0]["nll"])
    dev = {i for i, _ in dev_test_split([(i, i) for i in ids], seed, "dev")}
    table = sorted(({"setting": {k: r[k] for k in ("alpha", "T", "lr", "divergence") if k in r},
                     "dev_ppl": round(dev_ppl(r, dev), 2)} for r in rows), key=lambda r: r["dev_ppl"])
    kd = [r for r in table if r["setting"]["alpha"] > 0]
    ce = [r for r in table if r["setting"]["alpha"] == 0]
    return {"dev_documents": len(dev), "of": len(ids), "table": table,
            "best_kd": kd[0] if kd else None, "best_ce": ce[0] if ce else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--settings", required=True, help="JSON list of {alpha, T, lr[, divergence, warmup]}")
    r.add_argument("--steps", type=int, default=30)
    r.add_argument("--results", default=RESULTS)
    s = sub.add_parser("select")
    s.add_argument("--results", default=RESULTS)
    a = ap.parse_args()
    if a.cmd == "run":
        run(json.loads(a.settings), a.steps, Path(a.results))
    else:
        print(json.dumps(select(Path(a.results)), indent=1))


if __name__ == "__main__":
    main()
