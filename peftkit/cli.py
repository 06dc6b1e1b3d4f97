"""The `peftkit` command line. Every heavy import happens inside a command so that --help is fast."""

from __future__ import annotations

import errno
import sys
from typing import List, Optional

import typer

app = typer.Typer(
    name="peftkit",
    help="Parameter- and memory-efficient fine-tuning from YAML recipes (ApiQ, MEFT, PaFi/HiWi, 3ML, LoRA, BitFit, full).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipes_app = typer.Typer(help="List, show and validate recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

OVERRIDES_HELP = "Dotted overrides, e.g. train.lr=3e-4 method.r=16 data.root=../shared/data/glue"


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # the disk, not the input: exit 1 with a message


def _run(fn, *args, **kwargs):
    """Call a command body; turn user errors into one paragraph + exit 2, failed runs into exit 1."""
    from peftkit.errors import RunFailed, UserError
    from peftkit.utils.quiet import quiet_libraries

    quiet_libraries()
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except RunFailed as e:
        typer.echo(f"run failed: {e}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except OSError as e:
        if e.errno not in _DISK_ERRNOS:
            raise
        where = f" {e.filename}" if e.filename else " (a file of the run)"
        typer.echo(f"run failed: cannot write{where}: {e.strerror}. Free disk space or choose a "
                   f"writable output.dir; a training run continues from its last checkpoint with train.resume=auto.", err=True)
        raise typer.Exit(1) from None
    except Exception as e:  # an interruption raised by the trainer carries its own exit code
        code = getattr(e, "exit_code", None)
        if code is not None:
            typer.echo(f"{type(e).__name__}: {e}", err=True)
            raise typer.Exit(code) from None
        raise


@app.command()
def finetune(recipe: str = typer.Argument(..., help="Recipe YAML file or name in configs/."),
             overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP)):
    """Fine-tune a model on a GLUE task with any method (full, lora, bitfit, pafi, hiwi, meft1-3, apiq)."""
    from peftkit.finetune import finetune as run

    _run(run, recipe, list(overrides or []))


@app.command()
def quantize(recipe: str = typer.Argument(..., help="Quantization recipe YAML (rtn | nf | loftq | apiq-lw | apiq-bw)."),
             overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP)):
    """Quantize an LLM to 2/3/4 bits and initialise LoRA (ApiQ, LoftQ, RTN, NF)."""
    _run(_call, "peftkit.quant.command", "quantize", "issue 5", recipe, list(overrides or []))


@app.command()
def pretrain(recipe: str = typer.Argument(..., help="Pretraining recipe YAML (mlm | 3ml-self | 3ml-cross)."),
             overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP)):
    """Masked-LM pretraining: vanilla MLM, 3ML-self and 3ML-cross."""
    _run(_call, "peftkit.pretrain.command", "pretrain", "issue 6", recipe, list(overrides or []))


@app.command("eval")
def evaluate(task: str = typer.Option(..., "--task", help="glue, glue:sst2,mrpc or wikitext2."),
             model: List[str] = typer.Option(..., "--model", help="Run directory or checkpoint (repeatable)."),
             data_root: Optional[str] = typer.Option(None, help="GLUE data root (default: env PEFTKIT_DATA_DIR)."),
             limit: Optional[int] = typer.Option(None, help="Evaluate on the first N rows only."),
             batch_size: int = typer.Option(128, help="Evaluation batch size."),
             max_windows: Optional[int] = typer.Option(None, help="wikitext2: number of windows."),
             seq_len: int = typer.Option(512, help="wikitext2: window length in tokens."),
             json_out: Optional[str] = typer.Option(None, "--json", help="Also write the results to this file.")):
    """Evaluate fine-tuned models on GLUE (table + JSON) or a language model on WikiText-2 (perplexity)."""

    def body():
        from peftkit.errors import UserError
        from peftkit.eval.glue_eval import evaluate_glue, parse_task_spec

        suite, tasks = parse_task_spec(task)
        if suite == "glue":
            return evaluate_glue(model, tasks, data_root, batch_size, limit, json_out)
        if suite == "wikitext2":
            return _call("peftkit.eval.perplexity", "run_cli", "issue 5", model, seq_len, max_windows, json_out)
        raise UserError(f'unknown task suite "{suite}" in --task {task}; use glue, glue:<task>[,<task>] or wikitext2.')

    _run(body)


@app.command()
def bench(name: str = typer.Argument(..., help="Benchmark name (see `peftkit bench list`)."),
          quick: bool = typer.Option(False, "--quick", help="Small sizes that finish in minutes on 2 CPU cores."),
          json_out: Optional[str] = typer.Option(None, "--json", help="Write the figures to this JSON file."),
          option: Optional[List[str]] = typer.Option(None, "--set", help="Bench option key=value (repeatable).")):
    """Run a measured comparison; prints a table and writes JSON ({bench, machine, command, rows})."""

    def body():
        import importlib

        from peftkit.bench import BENCHES
        from peftkit.bench.common import write_bench
        from peftkit.config.loader import parse_override
        from peftkit.errors import UserError, did_you_mean

        if name == "list":
            for key, (_, description) in BENCHES.items():
                typer.echo(f"{key:10s} {description}")
            return None
        if name not in BENCHES:
            raise UserError(f'unknown bench "{name}"{did_you_mean(name, BENCHES)}; available: {", ".join(BENCHES)}.')
        module_name = BENCHES[name][0]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            raise UserError(f'bench "{name}" ({BENCHES[name][1]}) is not built yet in this version.') from None
        options = {}
        for text in option or []:
            parts, value = parse_override(f"bench.{text}")
            options[".".join(parts[1:])] = value
        rows = module.run(quick, options)
        return write_bench(name, rows, json_out)

    _run(body)


@app.command()
def report(paths: List[str] = typer.Argument(..., help="Run directories, quantized model directories, bench JSON files "
                                                        "or directories holding them."),
           out: str = typer.Option("report", "--out", help="Directory for the PNG plots and report.md.")):
    """Plots (loss curves, memory, accuracy vs trainable %, quantization error per block) and a markdown summary."""
    from peftkit.report import make_report

    _run(make_report, list(paths), out)


@app.command()
def methods():
    """List the method plugins with one-line descriptions."""
    from peftkit.methods import METHODS, available_methods

    built = set(available_methods())
    for key, (_, _, description) in METHODS.items():
        typer.echo(f"{key:12s} {description}{'' if key in built else '  [not built yet]'}")


@app.command()
def env():
    """Versions, device and threads, for bug reports."""
    import json

    from peftkit.utils.env import environment

    typer.echo(json.dumps(environment(), indent=2))


@recipes_app.command("list")
def recipes_list():
    """List the recipes in configs/."""
    import yaml

    from peftkit.config.loader import configs_dir

    def field(raw, section, key):
        value = raw.get(section)
        return str(value.get(key, "")) if isinstance(value, dict) else ""

    for path in sorted(configs_dir().glob("*.yaml")):
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            raw = {}
        if not isinstance(raw, dict):
            raw = {}
        # finetune recipes name a method, quantize recipes a quant.method, pretrain recipes an mlm.variant
        method = field(raw, "method", "name") or field(raw, "quant", "method") or field(raw, "mlm", "variant") or "?"
        model = field(raw, "model", "name") or field(raw, "model", "preset") or "?"
        task = field(raw, "data", "task") or (f"{field(raw, 'quant', 'bits')}-bit" if "quant" in raw else "")
        typer.echo(f"{path.stem:36s} {method:10s} {model:14s} {task}")


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="Recipe name or file."),
                 overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP)):
    """Print the resolved recipe (every option with its value) and the option docs."""

    def body():
        import yaml

        from peftkit.config.loader import load_recipe

        recipe = load_recipe(name, list(overrides or []))
        typer.echo(yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    _run(body)


@recipes_app.command("validate")
def recipes_validate(files: List[str] = typer.Argument(..., help="Recipe files or names.")):
    """Validate recipes without running them (exit 2 if any is invalid)."""

    def body():
        from peftkit.config.loader import load_any_recipe
        from peftkit.errors import UserError

        bad = 0
        for f in files:
            try:
                load_any_recipe(f)
                typer.echo(f"ok       {f}")
            except UserError as e:
                bad += 1
                typer.echo(f"invalid  {f}: {e}", err=True)
        if bad:
            raise typer.Exit(2)

    _run(body)


def _call(module_name: str, function: str, issue: str, *args):
    """Import a command's implementation lazily; a clear message while it is not built yet."""
    import importlib

    from peftkit.errors import UserError

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise UserError(f"this command is not built yet in this version of peftkit ({issue}).") from None
        raise
    return getattr(module, function)(*args)


def main() -> None:
    app(prog_name="peftkit")


if __name__ == "__main__":
    sys.exit(main())
