"""Wall time of every stage of the real-model pipeline (configs/real-small.yaml), with the load average.

    python benchmarks/bench_real_small.py [--config configs/real-small.yaml] [--out outputs/bench/real_small.json]

Runs the pipeline's stages in order in this process (the same code as `definemed pipeline`), timing each one
and recording the 1-minute load average before and after it. Finished stages are skipped by the pipeline's
done markers, so delete the config's output directories first for a full measurement. The target is the whole
pipeline in at most 60 minutes on 2 idle cores; a load average above 2 means other work shared the machine and
the times are inflated. The baseline is the 60-minute budget (printed as the ratio total / budget).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUDGET_S = 60 * 60


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/real-small.yaml")
    ap.add_argument("--out", default="outputs/bench/real_small.json")
    ap.add_argument("--only", default=None, help="comma-separated stages")
    args = ap.parse_args()

    from definemed.pipeline import load_pipeline
    from definemed.stages import STAGES, run_stage

    p = load_pipeline(args.config, only=args.only.split(",") if args.only else None)
    rows = []
    t_all = time.perf_counter()
    for name, cfg in p.stages.items():
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        print(f"\n=== stage {name} (load average {load0:.2f}) ===", flush=True)
        run_stage(STAGES[name], cfg)
        wall = time.perf_counter() - t0
        rows.append({"stage": name, "seconds": round(wall, 1), "load_before": round(load0, 2),
                     "load_after": round(os.getloadavg()[0], 2)})
        print(f"=== {name}: {wall:.0f} s (load average {load0:.2f} -> {rows[-1]['load_after']:.2f}) ===", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"config": args.config, "stages": rows}, indent=2) + "\n")
    total = time.perf_counter() - t_all
    print("\n| stage | seconds | load avg before -> after |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r['stage']} | {r['seconds']:.0f} | {r['load_before']:.2f} -> {r['load_after']:.2f} |")
    print(f"| **total** | {total:.0f} | |")
    print(f"total / 60-minute budget: {total / BUDGET_S:.2f} (load average now {os.getloadavg()[0]:.2f}; "
          "final numbers need < 2)")
    Path(args.out).write_text(json.dumps({"config": args.config, "stages": rows, "total_seconds": round(total, 1),
                                          "budget_ratio": round(total / BUDGET_S, 3)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
