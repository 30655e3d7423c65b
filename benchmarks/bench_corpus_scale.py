"""The filter stage at growing corpus size: does it stream (flat driver memory) and keep its rate?

    python benchmarks/bench_corpus_scale.py [--sizes 10000,100000,1000000] [--scorer keywords|classifier]

For each N it builds (once, cached under $DEFINEMED_CACHE/bench_corpus) a FineWeb2-schema corpus from the bundled
sample (definemed.corpus.synthetic: recombined German sentences with log-normal lengths around FineWeb2-de's ~550
words, ~2% medical, 1% exact duplicates, 1% near-duplicates at Jaccard 0.8-0.95, 1% planted PII), written as
Parquet shards of 10k documents; a corpus of N is the first N/10k shards. Each N then runs the real filter stage
(`definemed.corpus.stage.run_filter`: ingest -> score -> exact dedup -> fuzzy dedup -> decontaminate -> PII ->
write) in a fresh child process with its own local Ray, so peak driver RSS (ru_maxrss) belongs to that N alone.
It prints docs/s, peak driver RSS, peak object-store use and spilled bytes, with the ratio to the smallest N.

`--scorer keywords` (default) swaps the classifier for a medical-stem density score, so N=1M fits on 2 cores; the
model-bound rate comes from benchmarks/bench_filter.py. Targets: driver RSS at 1M <= 1.5x that at 10k; docs/s at
1M >= docs/s at 100k. Numbers from a loaded machine are provisional; the load average is printed with them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHARD = 10_000
VERSION = "v1"


def cache_root(seed: int) -> Path:
    from definemed.cache import cache_root as root

    return root() / "bench_corpus" / f"fineweb2de-synth-s{seed}-{VERSION}"


def _build_shard(args: tuple[int, int, str]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from definemed.corpus.synthetic import synth_shard
    from definemed.io import write_parquet_atomic

    idx, seed, out = args
    shards, truth_dir = Path(out) / "shards", Path(out) / "truth"
    target = shards / f"train-{idx:05d}.parquet"
    if target.exists() and (truth_dir / f"truth-{idx:05d}.parquet").exists():
        return idx
    cols, truth = synth_shard(idx * SHARD, SHARD, seed)
    with tempfile.TemporaryDirectory(dir=out) as tmp:  # write then rename: a killed build leaves no half shard
        p = Path(tmp) / target.name
        pq.write_table(pa.table(cols), p, compression="zstd", row_group_size=2_000)
        os.replace(p, target)
    keys = sorted({k for r in truth for k in r})
    t = pa.table({k: [r.get(k) for r in truth] for k in keys}) if truth else pa.table({"id": pa.array([], pa.string())})
    write_parquet_atomic(t, truth_dir / f"truth-{idx:05d}.parquet")
    return idx


def ensure_corpus(n: int, seed: int, workers: int) -> Path:
    """The first ceil(n / 10k) shards exist (built in parallel if missing); returns a dir of links to them."""
    from multiprocessing import get_context

    from tqdm import tqdm

    root = cache_root(seed)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    (root / "truth").mkdir(parents=True, exist_ok=True)
    k = -(-n // SHARD)
    todo = [i for i in range(k) if not (root / "shards" / f"train-{i:05d}.parquet").exists()]
    if todo:
        with get_context("spawn").Pool(workers) as pool:
            for _ in tqdm(pool.imap_unordered(_build_shard, [(i, seed, str(root)) for i in todo]), total=len(todo),
                          desc=f"building corpus shards (N={n:,})"):
                pass
    view = root / f"n{n}"
    if not view.exists():
        tmp = root / f".n{n}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for i in range(k):
            (tmp / f"train-{i:05d}.parquet").symlink_to(root / "shards" / f"train-{i:05d}.parquet")
        os.replace(tmp, view)
    return view


# ------------------------------------------------------------------------------------------------ one size


class StoreSampler(threading.Thread):
    """Peak object-store use, sampled twice a second while the stage runs."""

    def __init__(self, address: str, period: float = 0.5):
        super().__init__(daemon=True)
        from _ray_store import store_stats

        self.stats, self.address, self.period = store_stats, address, period
        self.peak, self.last, self._stop_evt = 0, {"spilled": 0, "restored": 0, "used": 0}, threading.Event()

    def run(self):
        while not self._stop_evt.is_set():
            try:
                self.last = self.stats(self.address)
                self.peak = max(self.peak, self.last["used"])
            except Exception:  # a sample lost to a busy GCS is not a result
                pass
            self._stop_evt.wait(self.period)

    def stop(self) -> dict[str, int]:
        self._stop_evt.set()
        self.join()
        final = self.stats(self.address)
        return {"peak_object_store": max(self.peak, final["used"]), "spilled": final["spilled"],
                "restored": final["restored"]}


def run_one(n: int, args) -> dict:
    from definemed.config import RayConfig
    from definemed.corpus.config import FilterConfig
    from definemed.corpus.stage import run_filter
    from definemed.data.loaders import count_web_rows, sample_mc_config
    from definemed.data.sample import SAMPLE_PROMPTS
    from definemed.models import resolve_model
    from definemed.ray_utils import init_ray, shutdown_ray

    src = ensure_corpus(n, args.seed, args.build_workers)
    work = Path(tempfile.mkdtemp(prefix=f"bench_scale_{n}_", dir=args.work_dir))
    cfg = FilterConfig(output_dir=str(work / "out"), source={"path": str(src), "extra_columns": []},
                       classifier=resolve_model(args.model), scorer=args.scorer, threshold=0.9,
                       min_actors=1, max_actors=args.max_actors, batch_size=args.batch_size, max_length=256,
                       decontam={"mc": [sample_mc_config("mmlu").model_dump(), sample_mc_config("medqa").model_dump()],
                                 "prompts": [str(SAMPLE_PROMPTS)]})
    n = count_web_rows(cfg.source)  # whole shards: N rounded up to a multiple of 10k
    ctx = init_ray(RayConfig(num_cpus=args.num_cpus), object_store_memory=args.object_store_mb * 2**20)
    sampler = StoreSampler(ctx.address_info["address"])
    sampler.start()
    t0, started = time.perf_counter(), time.time()
    try:
        out = run_filter(cfg)
        wall = time.perf_counter() - t0
        mem = sampler.stop()
    finally:
        shutdown_ray()
    stats = json.loads(Path(out["stats_json"]).read_text())
    scored_at = (work / "out" / "scored" / "_STATS.json").stat().st_mtime
    steps = stats["steps"]
    res = {"n": n, "wall_s": wall, "docs_per_s": n / wall, "score_pass_s": scored_at - started,
           "peak_driver_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **mem, "kept": steps["kept_docs"], "exact_removed": steps["duplicates_removed"],
        "near_removed": steps["near_duplicates_removed"], "contaminated": steps["contaminated_removed"],
        "final": steps["final_docs"], "pii": sum(steps["pii_redacted"].values())}
    shutil.rmtree(work, ignore_errors=True)
    return res


# ------------------------------------------------------------------------------------------------ the table


def _mb(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def print_table(rows: list[dict]) -> None:
    base = rows[0]
    print("\n| docs | wall s | docs/s | x smallest | peak driver RSS | x smallest | peak object store | spilled | "
          "kept | exact dup | near dup | contaminated | FineMed-de | PII |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['n']:,} | {r['wall_s']:.0f} | {r['docs_per_s']:,.0f} | {r['docs_per_s'] / base['docs_per_s']:.2f} | "
              f"{_mb(r['peak_driver_rss'])} | {r['peak_driver_rss'] / base['peak_driver_rss']:.2f} | "
              f"{_mb(r['peak_object_store'])} | {_mb(r['spilled'])} | {r['kept']:,} | {r['exact_removed']:,} | "
              f"{r['near_removed']:,} | {r['contaminated']:,} | {r['final']:,} | {r['pii']:,} |")
    by_n = {r["n"]: r for r in rows}
    if 10_000 in by_n and 1_000_000 in by_n:
        x = by_n[1_000_000]["peak_driver_rss"] / by_n[10_000]["peak_driver_rss"]
        print(f"\nRESULT driver RSS 1M / 10k: {x:.2f}x (target <= 1.5x)")
    if 100_000 in by_n and 1_000_000 in by_n:
        x = by_n[1_000_000]["docs_per_s"] / by_n[100_000]["docs_per_s"]
        print(f"RESULT docs/s 1M / 100k: {x:.2f}x (target >= 1.0x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--scorer", choices=["keywords", "classifier"], default="keywords")
    ap.add_argument("--model", default="tiny://xlm-roberta", help="classifier for --scorer classifier")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--max-actors", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--object-store-mb", type=int, default=2000)
    ap.add_argument("--build-workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--work-dir", default=None, help="where each run's outputs go (deleted after the run)")
    ap.add_argument("--run-one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_one is not None:
        print("RESULT_JSON " + json.dumps(run_one(args.run_one, args)), flush=True)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"scale benchmark: sizes {sizes}, scorer {args.scorer}, cores {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for n in sizes:  # build every corpus first, so the timed runs do not compete with it
        ensure_corpus(n, args.seed, args.build_workers)
    rows = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--run-one", str(n)] + [a for a in sys.argv[1:]]
        load = os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT_JSON ")]
        if proc.returncode or not line:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"run for N={n} failed (exit {proc.returncode})")
        r = json.loads(line[0].removeprefix("RESULT_JSON "))
        r["load"] = load
        rows.append(r)
        print(f"N={n:,}: {r['docs_per_s']:,.0f} docs/s, driver RSS {_mb(r['peak_driver_rss'])}, object store peak "
              f"{_mb(r['peak_object_store'])}, spilled {_mb(r['spilled'])} (load average at start {load:.1f})",
              flush=True)
    print_table(rows)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f} (numbers from a loaded machine are provisional)")


if __name__ == "__main__":
    main()
