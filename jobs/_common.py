"""Shared main() for jobs/<stage>.py: same config handling and exit codes as the CLI (2 = invalid config)."""
from __future__ import annotations

import argparse


def main(stage: str, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{stage.replace('-', '_')}",
                                     description=f"Run the definemed '{stage}' stage (Ray job entrypoint).")
    parser.add_argument("--config", "-c", required=True, help="stage YAML config")
    parser.add_argument("--ray-address", default=None,
                        help="Ray address; inside `ray job submit` the job's cluster is used automatically")
    parser.add_argument("--rerun", action="store_true",
                        help="recompute even if output_dir holds a finished run made from other inputs")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="print every library log line; by default they go to <output_dir>/logs/<stage>.log")
    args = parser.parse_args(argv)
    from definemed.cli import run_stage_cli
    from definemed.console import configure

    configure(verbose=args.verbose)

    run_stage_cli(stage, args.config, args.ray_address, rerun=args.rerun)  # exits 2 on a rejected config
