"""Step time and peak RSS of a LoRA step on a packed low-bit base against the same LoRA on the float32 model.

  python scripts/lowbit_lora_step.py QUANT_DIR [--model smollm2-135m] [--batch 4 --seq 128 --steps 4 --reps 2]
                                     [--json docs/results/lowbit-lora-step.json]

Each measurement is a fresh interpreter (peftkit.bench.packed_step.measure: peak RSS over that interpreter's idle
RSS; LoRA of the quantize output's rank on its modules; the trainer's AdamW kernel; the model's own loss on both
sides). The float and packed sides alternate (float, packed, float, packed ...) for each gradient-checkpointing
setting, so that a slower or busier stretch of a shared machine falls on both. The first step of each run is a
warm-up and is not timed; the step time of a run is the median of the rest, and a side's figure is the median over
its runs. Both wall-clock and process CPU seconds are kept: with one thread, CPU seconds are what other jobs on a
shared machine do not stretch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def summary(runs: list[dict], side: str, gc: bool) -> dict:
    mine = [r for r in runs if r["side"] == side and r["gradient_checkpointing"] == gc]
    return {"step_seconds": statistics.median(statistics.median(r["step_seconds"][1:]) for r in mine),
            "step_cpu_seconds": statistics.median(statistics.median(r["step_cpu_seconds"][1:]) for r in mine),
            "train_peak_bytes": statistics.median(r["train_peak_bytes"] for r in mine),
            "model_bytes": mine[0]["model_bytes_in_memory"], "runs": len(mine)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("quant_dir")
    parser.add_argument("--model", default="smollm2-135m", help="the float model the quantize output came from")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="steps per run, the first a warm-up")
    parser.add_argument("--reps", type=int, default=2, help="runs per side and setting")
    parser.add_argument("--dtype", default="bfloat16", help="what the packed side unpacks into")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gc", default="off,on", help="gradient checkpointing settings to run: off, on or both")
    parser.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: the quantize output's)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--note", default="", help="appended to the JSON's notes")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first is a warm-up)")

    from peftkit.bench.packed_step import measure

    settings = [{"off": False, "on": True}[g] for g in args.gc.split(",")]
    spec = {"quant_dir": str(Path(args.quant_dir).resolve()), "source_model": args.model, "lora_r": args.lora_r,
            "seq": args.seq, "steps": args.steps, "threads": args.threads, "dtype": args.dtype}
    from peftkit.quant.checkpoint import read_info

    rank = args.lora_r or read_info(args.quant_dir)["lora"]["r"]
    runs = []
    for batch in args.batch:
        for gc in settings:
            for rep in range(args.reps):
                for side in ("full", "packed"):
                    result = measure({**spec, "batch": batch, "side": side, "gradient_checkpointing": gc})
                    runs.append({"side": side, "batch": batch, "gradient_checkpointing": gc, "rep": rep, **result})
                    print(json.dumps(runs[-1]), flush=True)
    rows = []
    for batch, gc in [(b, g) for b in args.batch for g in settings]:
        full = summary([r for r in runs if r["batch"] == batch], "full", gc)
        packed = summary([r for r in runs if r["batch"] == batch], "packed", gc)
        row = {"gradient_checkpointing": gc, "batch": batch, "seq": args.seq, "lora_r": rank, "packed_dtype": args.dtype,
               "fp32_step_s": round(full["step_seconds"], 3), "packed_step_s": round(packed["step_seconds"], 3),
               "step_time_ratio": round(packed["step_seconds"] / full["step_seconds"], 3),
               "fp32_step_cpu_s": round(full["step_cpu_seconds"], 3),
               "packed_step_cpu_s": round(packed["step_cpu_seconds"], 3),
               "step_cpu_ratio": round(packed["step_cpu_seconds"] / full["step_cpu_seconds"], 3),
               "fp32_peak_mb": round(full["train_peak_bytes"] / 2 ** 20, 1),
               "packed_peak_mb": round(packed["train_peak_bytes"] / 2 ** 20, 1),
               "peak_rss_ratio": round(packed["train_peak_bytes"] / full["train_peak_bytes"], 3),
               "fp32_model_mb": round(full["model_bytes"] / 2 ** 20, 1),
               "packed_model_mb": round(packed["model_bytes"] / 2 ** 20, 1), "runs_per_side": full["runs"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        from peftkit.utils.tables import machine_info

        command = "python scripts/lowbit_lora_step.py " + " ".join(sys.argv[1:])
        payload = {"bench": args.json.stem, "machine": {**machine_info(), "threads": args.threads},
                   "command": command, "rows": rows, "runs": runs,
                   "notes": (f"LoRA r {rank} on {args.model}: float32 model vs its packed "
                             f"quantize output (unpacked into {args.dtype}); {args.steps - 1} timed AdamW steps of "
                             f"batch x {args.seq} tokens per run after one warm-up. {args.note}").strip()}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
