"""Collect finished runs (runs/<name>/metrics.json) into one bench-format JSON under docs/results/.

GLUE runs give their GLUE metrics; causal-LM runs (data.task wikitext2) their start point and perplexity
before/after fine-tuning.

usage: python scripts/collect_runs.py NAME RUN_DIR [RUN_DIR ...] [--command "..."] [--title "..."] [--note "..."]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftkit.bench.harness import machine_info  # noqa: E402

METRICS = ("accuracy", "f1", "macro_f1", "pearson", "spearman", "matthews_correlation")


def lm_row_of(run: Path, m: dict) -> dict:
    """A causal-LM run (data.task wikitext2): its start point (quantizer and bits, or fp), perplexity before/after."""
    return {"run": run.name, "method": m.get("quant_method") or "fp", "bits": m.get("bits") or 16,
            "finetune": m["method"], "ppl_before": round(m["ppl_start"], 2), "ppl_after": round(m["ppl"], 2),
            "eval": f"{m['eval_windows']}x{m['eval_seq_len']}", "trainable_pct": round(m["trainable_pct"], 3),
            "steps": m["steps"], "train_tokens": m["train_tokens"], "seconds": round(m["train_seconds"], 1),
            "quant_seconds": m.get("quant_seconds"), "seed": m["seed"]}


def row_of(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    if "ppl_start" in m:
        return lm_row_of(run, m)
    row = {"run": run.name, "method": m["method"], "task": m["task"]}
    for key in METRICS:
        if key in m:
            row[key] = round(m[key], 4)
    for key, value in m.get("baseline", {}).items():
        if key in METRICS:
            row[f"baseline_{key}"] = round(value, 4)
    row.update({"trainable_pct": round(m["trainable_pct"], 3), "steps": m["steps"], "epochs": round(m["epochs"], 2),
                "train_seconds": round(m["train_seconds"], 1), "seed": m["seed"]})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--command", default="")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--title", default=None)
    parser.add_argument("--note", action="append", default=[], help="a sentence for the results page (repeatable)")
    args = parser.parse_args()
    rows = [row_of(Path(r)) for r in args.runs if (Path(r) / "metrics.json").is_file()]
    env = json.loads((Path(args.runs[0]) / "env.json").read_text()) if (Path(args.runs[0]) / "env.json").is_file() else {}
    payload = {"bench": args.name, "machine": machine_info() | {"threads": env.get("torch_threads")},
               "command": args.command, "rows": rows}
    if args.title:
        payload["title"] = args.title
    if args.note:
        payload["notes"] = args.note
    out = Path(args.out) / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
