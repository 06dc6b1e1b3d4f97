"""The equal-compute 3ML comparison: pretrain vanilla MLM, 3ML-self and 3ML-cross on the same FLOP budget, fine-tune
each checkpoint on SST-2, fine-tune a randomly initialised model of the same shape the same way (the "from-scratch"
row: what pretraining adds at all), and write one bench-format JSON + the pretraining loss curves.

Each step is a plain peftkit command (printed before it runs), so any row can be reproduced by hand:
  peftkit pretrain pretrain-<variant>-<size> train.seed=<seed>
  peftkit finetune full-pretrained-sst2 model.name=runs/pretrain-<variant>-<size>/final train.seed=<seed> output.dir=...
The from-scratch checkpoint is the model `peftkit pretrain pretrain-mlm-<size> train.seed=<seed>` starts from (same
tokenizer, shape and initialisation), exported before any step. Finished runs (metrics.json present) are reused.

Seeds: ``--seeds 42,43`` runs every selected row once per seed (pretraining and fine-tuning both take it; 42 is the
recipes' own seed). Rows: variant, seed, size, mask_rate, steps, flops_per_step, train_flops, mlm_val_loss (15%
masking on WikiText-2 test blocks, the same corruption for every variant), sst2_accuracy, pretrain_seconds, commit
(the commit its fine-tune ran at). With ``--keep-rows`` the rows of the existing JSON that this invocation did not
run are kept as they are (with the commit and seed they came from), so a partial rerun updates a full table.

usage: python scripts/pretrain_compare.py [--size small] [--variants mlm,3ml-self,3ml-cross,scratch] [--seeds 42]
                                          [--finetune full-pretrained-sst2] [--keep-rows]
                                          [--json docs/results/pretrain-compare.json] [--plots docs/results/pretrain-compare]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRETRAINED = ("mlm", "3ml-self", "3ml-cross")
SCRATCH = "scratch"
RECIPE_SEED = 42  # the seed the pretrain-* and full-pretrained-sst2 recipes carry


def peftkit(*args: str) -> None:
    command = [sys.executable, "-m", "peftkit", *args]
    print("$ peftkit " + " ".join(args), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"


def suffix(seed: int) -> str:
    """Run directories of the recipe seed keep their old names, so earlier runs are found again."""
    return "" if seed == RECIPE_SEED else f"-seed{seed}"


def export_untrained(recipe, seed: int, out_dir: Path) -> Path:
    """The model the pretraining recipe ``recipe`` (name, path or dict) with ``seed`` starts from, before any step,
    as a checkpoint (RobertaForMaskedLM + the corpus tokenizer) that `peftkit finetune` loads like a pretrained one."""
    from peftkit.config.loader import load_recipe
    from peftkit.pretrain.export import export_encoder
    from peftkit.train.pipeline import create_recipe_method, create_task
    from peftkit.utils.seed import seed_everything

    recipe = load_recipe(recipe, [f"train.seed={seed}"], kind="pretrain")
    task = create_task(recipe)
    task.read_data()
    tokenizer = task.load_tokenizer()
    seed_everything(seed)  # as run_training does right before building the model
    model = task.build_model(create_recipe_method(recipe), tokenizer)
    return export_encoder(model, tokenizer, out_dir, {"pretrained": False, "seed": seed, "preset": recipe.model.preset,
                                                      "recipe": recipe.to_dict()})


def run_row(variant: str, seed: int, args) -> tuple[dict, Path | None]:
    """Pretrain (or export the untrained model) and fine-tune; the row and the pretraining run directory."""
    if variant == SCRATCH:
        start = ROOT / "runs" / f"scratch-{args.size}{suffix(seed)}"
        if not (start / "config.json").is_file():
            print(f"export the untrained pretrain-mlm-{args.size} model (seed {seed}) -> {start}", flush=True)
            export_untrained(f"pretrain-mlm-{args.size}", seed, start)
        run, checkpoint = None, start
    else:
        run = ROOT / "runs" / f"pretrain-{variant}-{args.size}{suffix(seed)}"
        if not (run / "metrics.json").is_file():
            peftkit("pretrain", f"pretrain-{variant}-{args.size}", f"train.seed={seed}", f"output.dir={run}",
                    "output.overwrite=true")
        checkpoint = run / "final"
    tuned = ROOT / "runs" / f"sst2-from-{variant}-{args.size}{suffix(seed)}"
    measured_at = tuned.with_name(tuned.name + ".commit")  # beside the run directory, which is peftkit's own
    if not (tuned / "metrics.json").is_file():
        peftkit("finetune", args.finetune, f"model.name={checkpoint}", f"train.seed={seed}", f"output.dir={tuned}",
                "output.overwrite=true")
        measured_at.write_text(args.commit)
    fine = json.loads((tuned / "metrics.json").read_text())
    row = {"variant": variant, "seed": seed, "size": args.size}
    if run is None:
        row.update(mask_rate=None, steps=0, flops_per_step=None, train_flops=0, mlm_val_loss=None)
    else:
        pre = json.loads((run / "metrics.json").read_text())
        row.update(mask_rate=pre["mask_rate"], steps=pre["steps"], flops_per_step=pre["flops_per_step"],
                   train_flops=pre["train_flops"], mlm_val_loss=pre["eval_loss"])
    row.update(sst2_accuracy=fine["accuracy"], sst2_trivial=fine.get("baseline", {}).get("accuracy"),
               pretrain_seconds=None if run is None else round(pre["train_seconds"], 1), finetune_steps=fine["steps"],
               commit=measured_at.read_text().strip() if measured_at.is_file() else args.commit)
    return row, run


def merged_rows(new: list[dict], old_path: Path, keep: bool) -> list[dict]:
    """The new rows, plus (``keep``) the old JSON's rows of (variant, seed) pairs not rerun, in a stable order:
    variants as in PRETRAINED then scratch, seeds ascending. An old row without a seed ran with the recipe seed."""
    rows = {(r["variant"], r["seed"]): r for r in new}
    if keep and old_path.is_file():
        old = json.loads(old_path.read_text())
        for r in old.get("rows", []):
            r = {"variant": r["variant"], "seed": r.get("seed", RECIPE_SEED), **r}
            rows.setdefault((r["variant"], r["seed"]), r)
    order = {v: i for i, v in enumerate((*PRETRAINED, SCRATCH))}
    return [rows[k] for k in sorted(rows, key=lambda k: (order.get(k[0], len(order)), k[1]))]


NOT_REDRAWN = "; not redrawn for the rerun rows ("


def curve_note(note: str, rerun: list[str]) -> str:
    """The loss-curve note of an earlier invocation, naming every row run since that its curves do not show."""
    head, _, listed = note.rstrip(".").partition(NOT_REDRAWN)
    names = [n for n in listed.rstrip(")").split(", ") if n] if listed else []
    names += [n for n in rerun if n not in names]
    return f"{head}{NOT_REDRAWN}{', '.join(names)})." if names else note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--variants", default=",".join((*PRETRAINED, SCRATCH)),
                        help=f"comma-separated, of {', '.join((*PRETRAINED, SCRATCH))}")
    parser.add_argument("--seeds", default=str(RECIPE_SEED), help="comma-separated seeds, each row runs once per seed")
    parser.add_argument("--finetune", default="full-pretrained-sst2")
    parser.add_argument("--keep-rows", action="store_true",
                        help="keep the existing JSON's rows that this invocation does not rerun (with their commit)")
    parser.add_argument("--json", default="docs/results/pretrain-compare.json")
    parser.add_argument("--plots", default="docs/results/pretrain-compare")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in (*PRETRAINED, SCRATCH)]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join((*PRETRAINED, SCRATCH))}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: {args.seeds!r} is not a comma-separated list of integers")
    if not seeds or any(s < 0 for s in seeds):
        parser.error("--seeds: give at least one seed, each >= 0")
    args.commit = commit()

    from peftkit.bench.harness import write_bench

    new, pretrain_dirs = [], []
    for seed in seeds:
        for variant in variants:
            row, run = run_row(variant, seed, args)
            new.append(row)
            if run is not None and seed == seeds[0]:
                pretrain_dirs.append(str(run))

    notes = [f"equal compute: configs/pretrain/pretrain-<variant>-{args.size}.yaml share mlm.flop_budget; train_flops are "
             f"the analytic forward+backward FLOPs of the steps run.",
             "mlm_val_loss: the final model's MLM loss at 15% masking (80/10/10) on WikiText-2 test blocks, the same "
             "corruption for every variant, each through its own pretraining forward (3ML: the [MASK]s skip the early "
             "layers and are re-inserted, or decoded by the cross-attention decoder, which the exported checkpoint drops).",
             f"sst2_accuracy: full fine-tuning with configs/glue/{args.finetune}.yaml from each checkpoint (train.seed "
             f"= the row's seed), SST-2 validation.",
             f"scratch: no pretraining; the same fine-tuning from the randomly initialised model pretrain-mlm-{args.size} "
             f"starts from with the row's seed (same shape and tokenizer).",
             "seed: pretraining and fine-tuning seed; commit: the commit the row was measured at (+dirty: with "
             "uncommitted changes)."]
    plots = ROOT / args.plots
    if set(PRETRAINED) <= set(variants):  # the curves compare the variants: draw them only from one invocation's runs
        peftkit("report", *pretrain_dirs, "--out", str(plots))
        keep = ("loss_curves.png", "eval_curves.png", "training_dynamics.png", "report.md")
        for extra in plots.iterdir():  # the curves and the summary; the other plots have no data here
            if extra.name not in keep:
                extra.unlink() if extra.is_file() else shutil.rmtree(extra)
        notes.append(f"loss curves (seed {seeds[0]}, commit {args.commit}): {args.plots}/loss_curves.png (training "
                     f"loss per step, a panel per variant: their objectives differ), {args.plots}/eval_curves.png (the "
                     f"held-out MLM loss, comparable across variants).")
    elif args.keep_rows and (ROOT / args.json).is_file():
        old_notes = json.loads((ROOT / args.json).read_text()).get("notes", [])
        rerun = [f"{v} seed {seed}" for seed in seeds for v in variants if v != SCRATCH]
        notes += [curve_note(n, rerun) for n in old_notes if n.startswith("loss curves")]  # drawn earlier
    rows = merged_rows(new, ROOT / args.json, args.keep_rows)
    command = " ".join(["python scripts/pretrain_compare.py", *sys.argv[1:]])
    write_bench("pretrain-compare", rows, ROOT / args.json, {"notes": notes, "command": command})


if __name__ == "__main__":
    main()
