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
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipes_app = typer.Typer(help="List, show, validate and copy recipes.", no_args_is_help=True,
                          context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(recipes_app, name="recipes")

OVERRIDES_HELP = "Dotted overrides, e.g. train.lr=3e-4 method.r=16 data.root=/data/glue"


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # the disk, not the input: exit 1 with a message


def _version(value: bool) -> None:
    if value:
        from peftkit import __version__

        typer.echo(f"peftkit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Parameter- and memory-efficient fine-tuning from YAML recipes (ApiQ, MEFT, PaFi/HiWi, 3ML, LoRA, BitFit, full)."""


def _run(fn, *args, **kwargs):
    """Call a command body; turn user errors into one paragraph + exit 2, failed runs into exit 1."""
    from peftkit.errors import RunFailed, UserError
    from peftkit.utils.env import separate_compile_cache_per_capability
    from peftkit.utils.quiet import quiet_libraries

    separate_compile_cache_per_capability()
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
def finetune(recipe: str = typer.Argument(..., help="Recipe YAML file, or the name of a shipped recipe (peftkit recipes list)."),
             overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP)):
    """Fine-tune a model on a GLUE task with any method (full, lora, bitfit, pafi, hiwi, meft1-3, apiq)."""
    from peftkit.commands.train import finetune as run

    _run(run, recipe, list(overrides or []))


@app.command()
def quantize(recipe: str = typer.Argument(..., help="Quantization recipe YAML (rtn | nf | loftq | apiq-lw | apiq-bw)."),
             overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP)):
    """Quantize an LLM to 2/3/4 bits and initialise LoRA (ApiQ, LoftQ, RTN, NF)."""
    from peftkit.commands.quantize import quantize as run

    _run(run, recipe, list(overrides or []))


@app.command()
def pretrain(recipe: str = typer.Argument(..., help="Pretraining recipe YAML (mlm | 3ml-self | 3ml-cross)."),
             overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP)):
    """Masked-LM pretraining: vanilla MLM, 3ML-self and 3ML-cross."""
    from peftkit.commands.train import pretrain as run

    _run(run, recipe, list(overrides or []))


@app.command()
def plan(recipe: str = typer.Argument(..., help="Fine-tune recipe YAML file, or the name of a shipped recipe."),
         overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
         world_size: int = typer.Option(1, "--world-size", min=1, max=65536, help="Processes (GPUs) under torchrun; "
                                        "train.strategy fsdp shards weights, gradients and optimizer state over them."),
         device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda where there is one)."),
         memory: Optional[str] = typer.Option(None, "--memory", help="Memory per device to fit in, e.g. 24GiB "
                                                                    "(default: the GPU's memory, or this machine's RAM)."),
         bits: Optional[int] = typer.Option(None, "--bits", min=2, max=4, help="Plan the frozen base packed at 2, 3 "
                                                                              "or 4 bits (a quantize output says its own)."),
         json_out: Optional[str] = typer.Option(None, "--json", help="Also write the plan to this JSON file.")):
    """Memory per device of a fine-tune before launching it: weights, gradients, optimizer state, activations."""
    if device not in (None, "cuda", "cpu"):
        typer.echo(f"error: --device {device!r} is not a device the plan knows. Use --device cuda or --device cpu.",
                   err=True)
        raise typer.Exit(2)

    def body():
        from peftkit.commands.plan import plan as run

        typer.echo(run(recipe, list(overrides or []), world_size, device, memory, bits, json_out))

    _run(body)


@app.command("eval")
def evaluate(task: str = typer.Option(..., "--task", help="glue, glue:sst2,mrpc, wikitext2, or labeled rows of "
                                                           "your own: a CSV/JSONL/Parquet file or a dataset id."),
             model: List[str] = typer.Option(..., "--model", help="Run directory or checkpoint (repeatable)."),
             data_root: Optional[str] = typer.Option(None, help="GLUE data root (default: env PEFTKIT_DATA_DIR); "
                                                                  "wikitext2: the WikiText-2 directory (default: env "
                                                                  "PEFTKIT_WIKITEXT)."),
             limit: Optional[int] = typer.Option(None, min=1, help="Evaluate on the first N rows only."),
             batch_size: int = typer.Option(128, min=1, max=65536, help="Evaluation batch size."),
             max_windows: Optional[int] = typer.Option(None, min=1, help="wikitext2: number of windows."),
             seq_len: int = typer.Option(512, min=2, max=1_048_576, help="wikitext2: window length in tokens."),
             trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                                    help="Let model code shipped with the checkpoint run (never "
                                                         "decided by the run directory itself)."),
             json_out: Optional[str] = typer.Option(None, "--json", help="Also write the results to this file.")):
    """Evaluate fine-tuned models on GLUE (table + JSON) or a language model on WikiText-2 (perplexity)."""

    from peftkit.commands.evaluate import evaluate as run

    _run(run, task, model, data_root, batch_size, limit, seq_len, max_windows, json_out, trust_remote_code)


@app.command()
def bench(name: str = typer.Argument(..., help="Benchmark name (see `peftkit bench list`)."),
          quick: bool = typer.Option(False, "--quick", help="Small sizes that finish in minutes on 2 CPU cores."),
          json_out: Optional[str] = typer.Option(None, "--json", help="Write the figures to this JSON file."),
          option: Optional[List[str]] = typer.Option(None, "--set", help="Bench option key=value (repeatable).")):
    """Run a measured comparison; prints a table and writes JSON ({bench, machine, command, rows})."""

    def body():
        from peftkit.commands.bench import run_bench

        return run_bench(name, quick, json_out, list(option or []))

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
    """List the method plugins with one-line descriptions, and which model families each supports."""
    from peftkit.commands.support import support_table
    from peftkit.utils.registry import METHODS

    for entry in METHODS.entries():
        typer.echo(f"{entry.name:12s} {entry.help}")
    typer.echo("\nmodel families each method supports (docs/methods/support.md):")
    typer.echo(support_table())


@app.command()
def env():
    """Versions, device and threads, for bug reports."""
    import json

    from peftkit.utils.env import environment

    typer.echo(json.dumps(environment(), indent=2))


@recipes_app.command("list")
def recipes_list():
    """List the shipped recipes: name, group, kind, method, model, task."""
    from peftkit.commands.recipes import list_recipes

    _run(lambda: typer.echo(list_recipes()))


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="Recipe name or file."),
                 overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP)):
    """Print the resolved recipe (every option with its value) and the option docs."""

    def body():
        from peftkit.commands.recipes import show_recipe

        typer.echo(show_recipe(name, list(overrides or [])))

    _run(body)


@recipes_app.command("validate")
def recipes_validate(files: List[str] = typer.Argument(..., help="Recipe files or names.")):
    """Validate recipes without running them (exit 2 if any is invalid)."""

    def body():
        from peftkit.config.loader import load_recipe
        from peftkit.errors import UserError

        bad = 0
        for f in files:
            try:
                load_recipe(f)
                typer.echo(f"ok       {f}")
            except UserError as e:
                bad += 1
                typer.echo(f"invalid  {f}: {e}", err=True)
        if bad:
            raise typer.Exit(2)

    _run(body)


@recipes_app.command("copy")
def recipes_copy(name: str = typer.Argument(..., help="Name of a shipped recipe (peftkit recipes list)."),
                 dest: str = typer.Argument(..., help="New file, or an existing folder to put NAME.yaml in.")):
    """Copy a shipped recipe to start your own (never overwrites a file)."""

    def body():
        from peftkit.commands.recipes import copy_recipe

        typer.echo(copy_recipe(name, dest))

    _run(body)


@app.command()
def export(run: str = typer.Argument(..., help="Run directory (runs/<name>) or its final/ directory."),
           out: str = typer.Option(..., "--out", help="New or empty directory for the export."),
           merge: Optional[bool] = typer.Option(None, "--merge/--no-merge",
                                                help="Merge the method into a plain transformers model, or keep it "
                                                     "separate (peft adapter, compact delta, or peftkit's format). "
                                                     "Default: merge when the method can."),
           merge_mode: Optional[str] = typer.Option(
               None, "--merge-mode", help="LoRA on a quantized base (apiq): calibrated (re-quantize to the base's bits, "
                                          "calibrated on text; the default), naive (round onto the base's grid) or "
                                          "float (a full-precision model)."),
           calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text of a low-bit merge: train (the "
                                                                     "run's own training text, default) or wikitext2."),
           calib_windows: Optional[int] = typer.Option(None, "--calib-windows",
                                                       help="Calibration windows of a low-bit merge (default 8)."),
           calib_len: Optional[int] = typer.Option(None, "--calib-len",
                                                   help="Tokens per calibration window (default 256)."),
           tune_windows: Optional[int] = typer.Option(None, "--tune-windows",
                                                      help="Windows of the calibrated merge's end-to-end tuning of "
                                                           "scales and norms (default 64)."),
           tune_epochs: Optional[int] = typer.Option(None, "--tune-epochs",
                                                     help="Epochs of that tuning (default 4; 0: block by block "
                                                          "only)."),
           tune_lr: Optional[float] = typer.Option(None, "--tune-lr",
                                                   help="Learning rate of that tuning (default 1e-3 at 4 bits and "
                                                        "more, 3e-3 below).")):
    """Export a run so that transformers / peft load it (model card, sizes next to the base model)."""
    from peftkit.commands.export import export as run_export

    _run(run_export, run, out, merge, merge_mode, calib, calib_windows, calib_len, tune_windows, tune_epochs,
         tune_lr)


@app.command()
def predict(run: str = typer.Argument(..., help="Run directory (any method, your own data or GLUE) or checkpoint."),
            input_file: str = typer.Option(..., "--input", help="Rows to label: CSV, JSONL, JSON or Parquet."),
            output: Optional[str] = typer.Option(None, "--output", help="JSON-lines file (default: stdout)."),
            batch_size: int = typer.Option(64, min=1, max=65536, help="Rows per forward pass."),
            trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                                   help="Let model code shipped with the checkpoint run.")):
    """Label new rows: one JSON line per row (label + probabilities, or value for regression)."""
    from peftkit.commands.predict import predict as body

    _run(body, run, input_file, output, batch_size, trust_remote_code)


@app.command()
def generate(run: str = typer.Argument(..., help="Causal-LM or SFT run, quantize output directory or model."),
             prompt: Optional[List[str]] = typer.Option(None, "--prompt", help="A prompt (repeatable)."),
             input_file: Optional[str] = typer.Option(None, "--input", help="File of prompts (the run's prompt "
                                                                             "column, else 'prompt')."),
             output: Optional[str] = typer.Option(None, "--output", help="JSON-lines file (default: stdout)."),
             max_new_tokens: int = typer.Option(64, min=1, max=65536, help="Tokens generated per prompt."),
             temperature: float = typer.Option(0.0, min=0.0, max=100.0, help="0 = greedy; > 0 samples."),
             top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling mass, in (0, 1]."),
             seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Sampling seed.")):
    """Generate answers: one JSON line per prompt (prompt + generation)."""
    from peftkit.commands.predict import generate as body

    _run(body, run, list(prompt or []), input_file, output, max_new_tokens, temperature, top_p, seed)


def main() -> None:
    app(prog_name="peftkit")


if __name__ == "__main__":
    sys.exit(main())
