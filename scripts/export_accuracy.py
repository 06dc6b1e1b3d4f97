"""Exported PaFi and HiWi models score what their runs scored, under plain transformers with peftkit unimportable.

    python scripts/export_accuracy.py --steps 200 --json docs/results/export-accuracy.json

For each recipe: `peftkit finetune` (train.max_steps shortened), `peftkit export --merge`, then, in a fresh
interpreter where `import peftkit` fails, AutoModelForSequenceClassification + AutoTokenizer from the export score the
SST-2 validation rows; the run's own accuracy comes from its metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCORE = r"""
import json, sys
sys.modules["peftkit"] = None  # the export must load without peftkit
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
export, data = sys.argv[1], sys.argv[2]
model = AutoModelForSequenceClassification.from_pretrained(export).eval()
tokenizer = AutoTokenizer.from_pretrained(export)
rows = [json.loads(line) for line in open(data, encoding="utf-8")]
correct = 0
with torch.inference_mode():
    for start in range(0, len(rows), 64):
        chunk = rows[start:start + 64]
        enc = tokenizer([r["sentence"] for r in chunk], truncation=True, max_length=64, padding=True, return_tensors="pt")
        predicted = model(**enc).logits.argmax(-1).tolist()
        correct += sum(p == r["label"] for p, r in zip(predicted, chunk))
print(json.dumps({"accuracy": correct / len(rows), "n": len(rows), "id2label": model.config.id2label}))
"""


def main() -> None:
    from peftkit.utils.tables import machine_info

    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", default="pafi-r0.005-minilm-sst2,hiwi-minilm-sst2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--work", default="runs/export-accuracy")
    parser.add_argument("--data", default=os.environ.get("PEFTKIT_DATA_DIR", str(ROOT.parent / "shared/data/glue")))
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    work = Path(args.work)
    rows = []
    for recipe in args.recipes.split(","):
        run, export = work / recipe, work / f"{recipe}-export"
        subprocess.run([sys.executable, "-m", "peftkit", "finetune", recipe, f"train.max_steps={args.steps}",
                        f"train.eval_every={args.steps}", f"output.dir={run}", "output.overwrite=true"], check=True)
        shutil.rmtree(export, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "peftkit", "export", str(run), "--out", str(export), "--merge"], check=True)
        scored = subprocess.run([sys.executable, "-c", SCORE, str(export), str(Path(args.data) / "sst2/validation.jsonl")],
                                check=True, capture_output=True, text=True)
        plain = json.loads(scored.stdout.strip().splitlines()[-1])
        metrics = json.loads((run / "metrics.json").read_text())
        rows.append({"recipe": recipe, "method": metrics["method"], "steps": metrics["steps"],
                     "run_accuracy": metrics["accuracy"], "export_accuracy_plain_transformers": plain["accuracy"],
                     "equal": plain["accuracy"] == metrics["accuracy"], "n": plain["n"],
                     "trivial_baseline": metrics["baseline"]["accuracy"], "id2label": plain["id2label"]})
    payload = {"bench": "export-accuracy", "machine": machine_info(),
               "command": " ".join(["python", "scripts/export_accuracy.py", *sys.argv[1:]]), "rows": rows}
    Path(args.json).write_text(json.dumps(payload, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
