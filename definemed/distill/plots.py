"""Plots of the prune and distill stages: block importance with the dropped blocks marked, and the loss curves of
the KD student (total, CE and KL parts) beside the CE-only control."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    from definemed.io import atomic_write_bytes

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_block_importance(scores: list[float], dropped: list[int], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(scores) + 2), 3.8))
    colors = ["tab:red" if i in set(dropped) else "tab:blue" for i in range(len(scores))]
    ax.bar(range(len(scores)), scores, color=colors)
    ax.set_xlabel("block (decoder layer)")
    ax.set_ylabel("BI = 1 - E[cos(x_in, x_out)]")
    ax.set_title(title + (f"\nred: {len(dropped)} dropped" if dropped else ""), fontsize=10)
    ax.set_xticks(range(len(scores)))
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_distill_curves(runs: dict[str, list[dict[str, Any]]], path: str | Path, title: str) -> Path:
    """`runs`: name -> metrics rows (step, loss, ce, and kl where the run has a teacher)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["ce"] for r in rows], marker="o", ms=2, label=f"{name}: CE")
        if any("kl" in r for r in rows):
            ax.plot(steps, [r["loss"] for r in rows], ls="--", label=f"{name}: total loss")
            ax_kl.plot(steps, [r["kl"] for r in rows], marker="o", ms=2, label=f"{name}: KL at T")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats / target token")
    ax.set_title("cross-entropy on the training tokens")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax_kl.set_xlabel("optimizer step")
    ax_kl.set_ylabel("KL (nats / target token)")
    ax_kl.set_title("KL to the teacher")
    ax_kl.legend(fontsize=8)
    ax_kl.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
