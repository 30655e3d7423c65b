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


serve_app = typer.Typer(no_args_is_help=False, help="Host the secured OpenAI-compatible endpoint (`--config`), "
                        "check its audit trail, rotate its API keys.")
app.add_typer(serve_app, name="serve")
keys_app = typer.Typer(no_args_is_help=True, help="API keys in a key file of digests that the running endpoint "
                       "re-reads within seconds (no restart).")
audit_app = typer.Typer(no_args_is_help=True, help="The endpoint's hash-chained audit trail.")
serve_app.add_typer(keys_app, name="keys")
serve_app.add_typer(audit_app, name="audit")
KEY_FILE_OPT = typer.Option(..., "--file", "-f", help="The key file (the config's api_key_file).")


@serve_app.callback(invoke_without_command=True)
def serve_command(ctx: typer.Context,
                  config: Optional[str] = typer.Option(None, "--config", "-c", help="Serve YAML config (configs/serve.yaml)."),
                  ray_address: Optional[str] = RAY_OPT,
                  detach: bool = typer.Option(False, help="On a cluster: deploy and return, leaving the app up.")
                  ) -> None:
    """Host the configured models behind the secured OpenAI-compatible endpoint until Ctrl-C / SIGTERM."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None:
        typer.echo(ctx.get_help())
        raise SystemExit(2)
    from serve.config import ServeConfig
    from serve.runtime import serve_forever
    from serve.security import NoApiKeyError

    try:
        cfg = load_config(ServeConfig, config)
        serve_forever(cfg, ray_address=ray_address, detach=detach)
    except (ConfigError, NoApiKeyError) as e:
        _fail_config(e)


@audit_app.command("verify")
def audit_verify(paths: list[str] = typer.Argument(..., help="An audit directory, or audit-*.jsonl files."),
                 partial: bool = typer.Option(False, help="Accept a chain that does not start at its first line "
                                              "(older files removed by a retention policy).")) -> None:
    """Check the hash chain: exit 0 if intact, 1 naming the first edited, removed or reordered line."""
    from serve.audit import verify

    v = verify(paths, partial=partial)
    for w in v.warnings:
        typer.echo(f"warning: {w}", err=True)
    if not v.ok:
        typer.echo(f"audit trail NOT intact: {v.error}", err=True)
        raise SystemExit(1)
    typer.echo(f"audit trail intact: {v.lines} lines in {v.files} file(s), head {v.head}")


@keys_app.command("add")
def keys_add(file: str = KEY_FILE_OPT, name: Optional[str] = typer.Option(None, help="A label, e.g. the client.")
             ) -> None:
    """Make a new key: printed once, only its digest is stored."""
    from serve.keys import add_key

    try:
        key, entry = add_key(file, name=name)
    except (KeyError, ValueError) as e:
        _fail_config(e)
    typer.echo(key)
    typer.echo(f"added key {entry.id}{f' ({name})' if name else ''} to {file}; it is shown only now", err=True)


@keys_app.command("revoke")
def keys_revoke(ident: str = typer.Argument(..., help="The key's id or name."), file: str = KEY_FILE_OPT) -> None:
    """Revoke a key: the running endpoint refuses it within seconds."""
    from serve.keys import revoke_key

    try:
        entry = revoke_key(file, ident)
    except (KeyError, ValueError, OSError) as e:
        _fail_config(e)
    typer.echo(f"revoked key {entry.id} at {entry.revoked}")


@keys_app.command("list")
def keys_list(file: str = KEY_FILE_OPT) -> None:
    """Key ids, names, when made, whether revoked (never a key or a digest)."""
    from serve.keys import read_key_file

    try:
        kf = read_key_file(file)
    except (ValueError, OSError) as e:
        _fail_config(e)
    typer.echo(f"{'id':12}  {'name':16}  {'created':20}  status")
    for e in kf.entries:
        status = f"revoked {e.revoked}" if e.revoked else "active" + (" (plaintext line)" if e.plaintext else "")
        typer.echo(f"{e.id:12}  {(e.name or '-'):16}  {(e.created or '-'):20}  {status}")


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
