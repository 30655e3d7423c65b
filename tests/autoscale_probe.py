"""Driver for tests/test_plan_cluster.py: does annotation's engine pool grow into free GPUs and shrink when done?

Runs on the simulated cluster (its own Ray, so in a subprocess of the test). The processor is the product's:
`definemed.corpus.annotate.build_labeler(cfg)` builds ray.data.llm's vLLM stage from the annotate config (replica
bounds, placement bundles, strategy). Only the engine is a test double: the stage's own map_batches arguments
(ActorPoolStrategy(min, max), GPU bundles / placement-group function, concurrency) run a class that sleeps per
batch instead of vLLM, because CUDA is absent here. GPUs in use are sampled from Ray while it runs and after.

    python tests/autoscale_probe.py ADDRESS ANNOTATE_YAML OUT_JSON
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time


class SleepEngine:
    """Stands in for vLLMEngineStageUDF: same constructor arguments, a fixed delay per batch."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, batch):
        time.sleep(float(os.environ.get("PROBE_BATCH_S", "1.0")))
        return {"id": batch["id"]}


def main(address: str, config: str, out: str) -> None:
    import ray

    from definemed.config import load_yaml, parse_config
    from definemed.corpus.annotate import build_labeler
    from definemed.corpus.config import AnnotateConfig
    from definemed.engine import placement_bundles

    ray.init(address=address, logging_level="ERROR")
    cfg = parse_config(AnnotateConfig, load_yaml(config), context={"plan_only": True})
    proc = build_labeler(cfg)
    stage = proc.stages["vLLMEngineStage"]  # ray.data.llm's engine stage as our config built it
    kwargs = stage.get_dataset_map_batches_kwargs(batch_size=cfg.batch_size, data_column="__data")
    compute = kwargs["compute"]
    total = ray.cluster_resources()["GPU"]
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample():
        t0 = time.monotonic()
        while not stop.is_set():
            samples.append((round(time.monotonic() - t0, 2), total - ray.available_resources().get("GPU", 0.0)))
            time.sleep(0.25)

    threading.Thread(target=sample, daemon=True).start()
    # Materialized input: the engine stage's queue is full from the start, as when shards of documents wait.
    ds = ray.data.range(cfg.batch_size * int(os.environ.get("PROBE_BATCHES", "24")),
                        override_num_blocks=int(os.environ.get("PROBE_BATCHES", "24"))).materialize()
    n = ds.map_batches(SleepEngine, **{k: v for k, v in kwargs.items() if k != "zero_copy_batch"}).count()
    done_at = samples[-1][0] if samples else 0.0
    # Ray Data releases the pool's actors (and their placement groups) once the dataset is done: sample until
    # no GPU has been held for 2 s, or 30 s have passed (then the test sees what stayed held)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (len(samples) > 8 and all(g == 0 for _, g in samples[-8:])):
        time.sleep(0.25)
    stop.set()
    json.dump({"rows": n, "gpus_total": total, "done_at": done_at, "samples": samples,
               "min_size": compute.min_size, "max_size": compute.max_size,
               "gpus_per_replica": sum(b.get("GPU", 0) for b in placement_bundles(cfg.engine))},
              open(out, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
