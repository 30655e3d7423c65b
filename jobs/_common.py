"""Shared main() for jobs/<stage>.py: same config handling and exit codes as the CLI (2 = invalid config)."""
from __future__ import annotations

import argparse
import logging
import sys


def main(stage: str, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{stage.replace('-', '_')}",
                                     description=f"Run the definemed '{stage}' stage (Ray job entrypoint).")
    parser.add_argument("--config", "-c", required=True, help="stage YAML config")
    parser.add_argument("--ray-address", default=None,
                        help="Ray address; inside `ray job submit` the job's cluster is used automatically")
    parser.add_argument("--rerun", action="store_true",
                        help="recompute even if output_dir holds a finished run made from other inputs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from definemed.cli import run_stage_cli

    run_stage_cli(stage, args.config, args.ray_address, rerun=args.rerun)  # exits 2 on a rejected config
