"""The equal-compute 3ML comparison (issue 6): pretrain vanilla MLM, 3ML-self and 3ML-cross on the same FLOP budget,
fine-tune each checkpoint on SST-2, and write one bench-format JSON + the pretraining loss curves.

Each step is a plain peftkit command (printed before it runs), so any row can be reproduced by hand:
  peftkit pretrain pretrain-<variant>-<size>
  peftkit finetune full-pretrained-sst2 model.name=runs/pretrain-<variant>-<size>/final output.dir=runs/sst2-from-...
Finished runs (metrics.json present) are reused. Rows: variant, size, mask_rate, steps, flops_per_step,
train_flops, mlm_val_loss (15% masking on WikiText-2 test blocks, the same corruption for every variant),
sst2_accuracy, pretrain_seconds.

usage: python scripts/pretrain_compare.py [--size small] [--finetune full-pretrained-sst2]
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

VARIANTS = ("mlm", "3ml-self", "3ml-cross")


def peftkit(*args: str) -> None:
    command = [sys.executable, "-m", "peftkit", *args]
    print("$ peftkit " + " ".join(args), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--finetune", default="full-pretrained-sst2")
    parser.add_argument("--json", default="docs/results/pretrain-compare.json")
    parser.add_argument("--plots", default="docs/results/pretrain-compare")
    args = parser.parse_args()

    from peftkit.bench.common import write_bench

    rows, pretrain_dirs = [], []
    for variant in VARIANTS:
        run = ROOT / "runs" / f"pretrain-{variant}-{args.size}"
        if not (run / "metrics.json").is_file():
            peftkit("pretrain", f"pretrain-{variant}-{args.size}", f"output.dir={run}", "output.overwrite=true")
        tuned = ROOT / "runs" / f"sst2-from-{variant}-{args.size}"
        if not (tuned / "metrics.json").is_file():
            peftkit("finetune", args.finetune, f"model.name={run / 'final'}", f"output.dir={tuned}", "output.overwrite=true")
        pre, fine = (json.loads((d / "metrics.json").read_text()) for d in (run, tuned))
        rows.append({"variant": variant, "size": args.size, "mask_rate": pre["mask_rate"], "steps": pre["steps"],
                     "flops_per_step": pre["flops_per_step"], "train_flops": pre["train_flops"],
                     "mlm_val_loss": pre["eval_loss"], "sst2_accuracy": fine["accuracy"],
                     "sst2_trivial": fine.get("baseline", {}).get("accuracy"),
                     "pretrain_seconds": round(pre["train_seconds"], 1), "finetune_steps": fine["steps"]})
        pretrain_dirs.append(str(run))

    plots = ROOT / args.plots
    peftkit("report", *pretrain_dirs, "--out", str(plots))
    keep = ("loss_curves.png", "eval_curves.png", "training_dynamics.png", "report.md")
    for extra in plots.iterdir():  # the curves and the summary; the other plots have no data here
        if extra.name not in keep:
            extra.unlink() if extra.is_file() else shutil.rmtree(extra)
    budget = rows[0]["train_flops"]
    notes = [f"equal compute: peftkit/recipes/pretrain-<variant>-{args.size}.yaml share mlm.flop_budget; train_flops are the "
             f"analytic forward+backward FLOPs of the steps run (vanilla: {budget:.3g}).",
             "mlm_val_loss: the final model's MLM loss at 15% masking (80/10/10) on WikiText-2 test blocks, the same "
             "corruption for every variant, each through its own pretraining forward (3ML: the [MASK]s skip the early "
             "layers and are re-inserted, or decoded by the cross-attention decoder, which the exported checkpoint drops).",
             f"sst2_accuracy: full fine-tuning with peftkit/recipes/{args.finetune}.yaml from each checkpoint, SST-2 validation.",
             f"loss curves: {args.plots}/loss_curves.png (training loss per step, a panel per variant: their objectives "
             f"differ), {args.plots}/eval_curves.png (the held-out MLM loss, comparable across variants)."]
    command = " ".join(["python scripts/pretrain_compare.py", *sys.argv[1:]])
    write_bench("pretrain-compare", rows, ROOT / args.json, {"notes": notes, "command": command})


if __name__ == "__main__":
    main()
