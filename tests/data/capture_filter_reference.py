"""Run the filter on the bundled sample + planted rows and write the reference summary (run once, on the
filter as it was before it streamed: python tests/data/capture_filter_reference.py OUT.json WORKDIR)."""
import json, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.filter_reference import build_source, filter_cfg, summarise  # noqa

def main(out_json, work):
    from definemed.config import RayConfig
    from definemed.ray_utils import init_ray, shutdown_ray
    from definemed.models import resolve_model
    from definemed.stages import STAGES, run_stage
    work = Path(work)
    src = build_source(work / "src")
    model = resolve_model("tiny://xlm-roberta")
    init_ray(RayConfig(num_cpus=8))
    ref = {}
    for pii in (True, False):
        cfg = filter_cfg(src, work / f"out-{pii}", model, pii=pii)
        run_stage(STAGES["filter"], cfg)
        ref[f"pii={pii}"] = summarise(Path(cfg.output_dir))
    shutdown_ray()
    Path(out_json).write_text(json.dumps(ref, indent=1, ensure_ascii=False, sort_keys=True) + "\n")

main(sys.argv[1], sys.argv[2])
