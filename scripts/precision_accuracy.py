"""Does bf16 cost accuracy? The same fine-tune in fp32 and in bf16 autocast, validation accuracy side by side.

    python scripts/precision_accuracy.py --recipe full-minilm-sst2 --steps 300 --json docs/results/precision-accuracy.json

Both runs are ``peftkit finetune RECIPE`` with the recipe's own settings except train.max_steps = eval_every =
--steps, train.threads (one each: the two runs go side by side) and train.precision (fp32, bf16); each is evaluated
once, at its last step, on the whole validation split. The JSON rows give each run's validation metrics, its
training seconds and the bf16 - fp32 difference in points, checked against --tolerance (0.5 points).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PRECISIONS = ("fp32", "bf16")


def finetune_command(recipe: str, precision: str, steps: int, out: Path, threads: int) -> list[str]:
    return [sys.executable, "-m", "peftkit.cli", "finetune", recipe, f"train.precision={precision}",
            f"train.max_steps={steps}", f"train.eval_every={steps}", f"train.save_every={steps}",
            f"train.threads={threads}", f"output.dir={out}"]


def last_eval(run_dir: Path) -> dict:
    """The last evaluation metrics.jsonl holds, and the last logged training row's elapsed seconds."""
    evals, elapsed = [], None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval" in row:
            evals.append(row["eval"])
        if "elapsed" in row:
            elapsed = row["elapsed"]
    if not evals:
        raise SystemExit(f"{run_dir}: no evaluation in metrics.jsonl")
    return {**evals[-1], "train_seconds": elapsed}


def main() -> None:
    from peftkit.utils.env import cpu_model, matmul_kind
    from peftkit.utils.tables import machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="full-minilm-sst2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--metric", default="accuracy")
    parser.add_argument("--tolerance", type=float, default=0.5, help="points of --metric bf16 may differ by")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="precision-accuracy-") as work:
        runs = {p: Path(work) / p for p in PRECISIONS}
        children = {p: subprocess.Popen(finetune_command(args.recipe, p, args.steps, runs[p], args.threads),
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=os.environ.copy())
                    for p in PRECISIONS}
        results = {}
        for precision, child in children.items():
            output, _ = child.communicate()
            if child.returncode != 0:
                raise SystemExit(f"the {precision} run failed ({child.returncode}):\n{output[-3000:]}")
            results[precision] = last_eval(runs[precision])
    rows = [{"precision": p, "recipe": args.recipe, "steps": args.steps, **results[p]} for p in PRECISIONS]
    difference = 100 * (results["bf16"][args.metric] - results["fp32"][args.metric])
    rows.append({"precision": "bf16 - fp32", "recipe": args.recipe, "steps": args.steps,
                 f"{args.metric}_difference_points": difference, "tolerance_points": args.tolerance,
                 "within_tolerance": abs(difference) <= args.tolerance})
    payload = {"bench": "precision-accuracy", "machine": {**machine_info(), "cpu_model": cpu_model(),
                                                          "matmul_kind": matmul_kind()},
               "command": " ".join(["python", "scripts/precision_accuracy.py", *sys.argv[1:]]), "rows": rows}
    Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
