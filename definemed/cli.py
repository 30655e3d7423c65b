"""`definemed <stage> --config FILE [--ray-address ADDR]` and `definemed pipeline`. A thin wrapper over
definemed.stages / definemed.pipeline; exit code 2 means the config was rejected before any work started."""
from __future__ import annotations

from typing import Optional

import typer

from definemed.config import ConfigError, load_config
from definemed.stages import STAGES, get_stage, run_stage

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="DeFineMed: German medical LLMs from general instruct models, on Ray.")

CONFIG_OPT = typer.Option(..., "--config", "-c", help="Stage YAML config (see configs/).")
RAY_OPT = typer.Option(None, "--ray-address",
                       help="Ray cluster address or 'auto'. Default: start a local Ray in-process.")
VERBOSE_OPT = typer.Option(False, "--verbose", "-v",
                           help="Print every library log line (vLLM, Ray, transformers) too; by default they go "
                                "only to <output_dir>/logs/<stage>.log.")
RERUN_OPT = typer.Option(False, "--rerun",
                         help="Recompute even if output_dir holds a finished run (e.g. made from inputs that "
                              "have since changed); the old outputs are kept until the new run finishes.")


def _fail_config(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise SystemExit(2)


def print_outputs(stage: str, outputs: dict[str, str]) -> None:
    typer.echo(f"[{stage}] outputs:")
    for k, v in outputs.items():
        typer.echo(f"  {k}: {v}")


def run_stage_cli(stage_name: str, config: str, ray_address: Optional[str], rerun: bool = False) -> dict[str, str]:
    try:
        stage = get_stage(stage_name)
        cfg = load_config(stage.config_model(), config)
    except ConfigError as e:
        _fail_config(e)
    try:
        outputs = run_stage(stage, cfg, ray_address=ray_address, rerun=rerun)
    except ConfigError as e:
        _fail_config(e)
    print_outputs(stage_name, outputs)
    return outputs


def _make_stage_command(name: str, help_text: str):
    def command(config: str = CONFIG_OPT, ray_address: Optional[str] = RAY_OPT, rerun: bool = RERUN_OPT,
                verbose: bool = VERBOSE_OPT) -> None:
        _verbose(verbose)
        run_stage_cli(name, config, ray_address, rerun=rerun)

    command.__name__ = name.replace("-", "_")
    command.__doc__ = help_text
    return command


for _name, _stage in STAGES.items():
    app.command(name=_name, help=_stage.help)(_make_stage_command(_name, _stage.help))


@app.command("serve")
def serve_command(config: str = CONFIG_OPT, ray_address: Optional[str] = RAY_OPT,
                  detach: bool = typer.Option(False, help="On a cluster: deploy and return, leaving the app up.")
                  ) -> None:
    """Host the configured models behind the secured OpenAI-compatible endpoint until Ctrl-C / SIGTERM."""
    from serve.config import ServeConfig
    from serve.runtime import serve_forever
    from serve.security import NoApiKeyError

    try:
        cfg = load_config(ServeConfig, config)
        serve_forever(cfg, ray_address=ray_address, detach=detach)
    except (ConfigError, NoApiKeyError) as e:
        _fail_config(e)


@app.command()
def pipeline(config: str = CONFIG_OPT, ray_address: Optional[str] = RAY_OPT,
             only: Optional[str] = typer.Option(None, help="Comma-separated subset of stages to run."),
             verbose: bool = VERBOSE_OPT) -> None:
    """Run the stages of a pipeline config in order (the demo: configs/demo.yaml). A finished stage is reused
    only while its config and inputs are unchanged; otherwise it and everything downstream is recomputed."""
    _verbose(verbose)
    from definemed.pipeline import load_pipeline, run_pipeline

    try:
        pcfg = load_pipeline(config, only=only.split(",") if only else None)
    except ConfigError as e:
        _fail_config(e)
    try:
        results = run_pipeline(pcfg, ray_address=ray_address)
    except ConfigError as e:
        _fail_config(e)
    typer.echo("\n=== definemed pipeline finished; outputs ===")
    for stage, outputs in results.items():
        print_outputs(stage, outputs)


@app.command("plan")
def plan_command(config: str = CONFIG_OPT,
                 stage: Optional[str] = typer.Option(None, help="Stage of a single-stage config (or 'serve')."),
                 ray_address: Optional[str] = RAY_OPT,
                 cluster_spec: Optional[str] = typer.Option(None, help="Plan against a cluster spec file instead "
                                                            "of a live Ray (configs/cluster/a100-4node.yaml)."),
                 throughput: Optional[str] = typer.Option(None, help="YAML with throughput figures per stage."),
                 reserve: bool = typer.Option(False, help="Live cluster: create the placement groups and a "
                                              "trivial actor in each, then release them."),
                 json_out: Optional[str] = typer.Option(None, "--json", help="Also write the plan as JSON.")) -> None:
    """Resources per stage, whether the cluster holds them, projected wall time and GPU-hours (exit 1: no fit)."""
    from definemed.plan.cli import main as plan_main

    try:
        code = plan_main(config, stage, ray_address, cluster_spec, throughput, reserve, json_out)
    except ConfigError as e:
        _fail_config(e)
    raise SystemExit(code)


@app.command()
def validate(stage: str = typer.Argument(..., help="Stage name, or 'pipeline'."), config: str = CONFIG_OPT) -> None:
    """Validate a config without running anything (exit 2 if invalid)."""
    try:
        if stage == "pipeline":
            from definemed.pipeline import load_pipeline

            load_pipeline(config)
        else:
            load_config(get_stage(stage).config_model(), config)
    except ConfigError as e:
        _fail_config(e)
    typer.echo(f"{config}: valid {stage} config")


def _verbose(verbose: bool) -> None:
    from definemed.console import configure

    if verbose:
        configure(verbose=True)


@app.callback()
def _options(verbose: bool = VERBOSE_OPT) -> None:
    from definemed.console import configure

    configure(verbose=verbose)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
