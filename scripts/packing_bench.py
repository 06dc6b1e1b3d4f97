"""Tokens per second of SFT on short rows with and without ``data.packing``, and the loss each reaches.

    python scripts/packing_bench.py --json docs/results/packing-sft.json

The SFT rows are the SST-2 prompts of scripts/sft_sentiment.py (a review and "positive or negative?", the answer
one word). Each run is a fresh `peftkit finetune ft-wikitext2-smollm2-lora` process on one thread, one epoch over
the same rows with the same seed and learning rate; unpacked (A) and packed (B) runs alternate A B A B so a
machine whose load drifts shows up in both. Per run: the training loop's wall seconds up to its last optimizer step,
the process's wall and CPU seconds (model load and the two evaluations included), the training tokens (every
token of every row, padding not counted; the same rows in both modes) and the response tokens the loss is on,
and the response loss on the validation rows (scored unpacked in both modes) before and after.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))




def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def padding_shares(lengths: list[int], packed_lengths: list[int], batch_size: int, draws: int = 500) -> dict:
    """The share of the computed positions that are padding, unpacked and packed: batches of ``batch_size`` rows
    drawn at random (seeded) are padded to their widest row, as the collators do."""
    import random

    rng = random.Random(0)

    def share(sizes: list[int]) -> float:
        real = padded = 0
        for _ in range(draws):
            batch = rng.sample(sizes, min(batch_size, len(sizes)))
            real, padded = real + sum(batch), padded + max(batch) * len(batch)
        return 1 - real / padded

    return {"unpacked_padding_share": share(lengths), "packed_padding_share": share(packed_lengths)}


def token_counts(train_file: Path, max_length: int, batch_size: int) -> dict:
    """Tokens of the training rows as the SFT task encodes them (the same rows whether packed or not)."""
    from peftkit.models.load import load_tokenizer
    from peftkit.tasks.dataset import encode_sft
    from peftkit.tasks.packing import pack_rows

    tokenizer = load_tokenizer("smollm2-135m", False)
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    encoded, over, dropped = encode_sft(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                                        max_length)
    lengths = [len(r["input_ids"]) for r in encoded]
    packed = pack_rows(encoded, max_length)
    response = sum(sum(label != -100 for label in r["labels"][1:]) for r in encoded)
    return {"rows": len(encoded), "tokens": sum(lengths), "response_tokens": response,
            "mean_row_tokens": sum(lengths) / len(lengths), "max_row_tokens": max(lengths),
            "packed_rows": len(packed), "longer_than_max_length": over, "dropped": dropped,
            **padding_shares(lengths, [len(r["input_ids"]) for r in packed], batch_size)}


def one_run(work: Path, packing: bool, args, index: int) -> dict:
    run = work / f"run-{index}-{'packed' if packing else 'unpacked'}"
    command = [sys.executable, "-m", "peftkit", "finetune", "ft-wikitext2-smollm2-lora", "data.task=dataset",
               f"data.train_file={work / 'train.jsonl'}", f"data.validation_file={work / 'validation.jsonl'}",
               "data.task_type=sft", "data.prompt_column=prompt", "data.response_column=response",
               f"data.max_length={args.max_length}", f"data.packing={'true' if packing else 'false'}",
               "train.epochs=1", "train.max_steps=null", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}",
               "train.warmup_ratio=0.0", "train.log_every=1", "train.eval_batch_size=16", "train.threads=1",
               "train.seed=0", f"output.dir={run}", "output.overwrite=true"]
    cpu_before, wall_before = children_cpu_seconds(), time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall, cpu = time.perf_counter() - wall_before, children_cpu_seconds() - cpu_before
    metrics = json.loads((run / "metrics.json").read_text())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r and "elapsed" in r]
    train_losses = [r["loss"] for r in steps]
    # the loop's own time up to the end of its last optimizer step (train_seconds adds the last evaluation and save)
    first = steps[0]["elapsed"] if steps[0]["step"] == 1 else None
    return {"packing": packing, "steps": metrics["steps"], "train_seconds": steps[-1]["elapsed"],
            "first_step_seconds": first, "mean_step_seconds_after_first": (
                (steps[-1]["elapsed"] - first) / (len(steps) - 1) if first is not None and len(steps) > 1 else None),
            "run_train_seconds": metrics["train_seconds"],
            "process_wall_seconds": wall, "process_cpu_seconds": cpu,
            "validation_response_loss_start": metrics["loss_start"], "validation_response_loss": metrics["loss"],
            "validation_response_tokens": metrics["tokens"], "train_loss_mean": sum(train_losses) / len(train_losses),
            "packed_rows": metrics.get("packed_rows")}


def main() -> None:
    from sft_sentiment import write_rows

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "glue" / "sst2"))
    parser.add_argument("--work", default="runs/packing-bench")
    parser.add_argument("--train-rows", type=int, default=160)
    parser.add_argument("--eval-rows", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    write_rows(Path(args.data) / "train.jsonl", work / "train.jsonl", args.train_rows)
    write_rows(Path(args.data) / "validation.jsonl", work / "validation.jsonl", args.eval_rows)
    counts = token_counts(work / "train.jsonl", args.max_length, args.batch_size)
    runs = []
    for i in range(args.repeats):
        for packing in (False, True):  # A B A B
            row = one_run(work, packing, args, len(runs))
            row.update(repeat=i, tokens_per_second=counts["tokens"] / row["train_seconds"],
                       response_tokens_per_second=counts["response_tokens"] / row["train_seconds"],
                       tokens_per_cpu_second=counts["tokens"] / row["process_cpu_seconds"])
            runs.append(row)
            print(json.dumps(row), flush=True)

    payload = build_payload(args, counts, runs)
    Path(args.json).write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload["notes"], indent=2))


def build_payload(args, counts: dict, runs: list[dict]) -> dict:
    from peftkit.utils.env import cpu_model
    from peftkit.utils.tables import machine_info

    def best(packing: bool, key: str) -> float:
        return max(r[key] for r in runs if r["packing"] is packing)

    def mean(packing: bool, key: str) -> float:
        values = [r[key] for r in runs if r["packing"] is packing]
        return sum(values) / len(values)

    summary = {"tokens_per_second_ratio_best": best(True, "tokens_per_second") / best(False, "tokens_per_second"),
               "tokens_per_cpu_second_ratio_best": (best(True, "tokens_per_cpu_second")
                                                    / best(False, "tokens_per_cpu_second"))}
    notes = [f"{counts['rows']} SFT rows, {counts['tokens']} tokens (mean {counts['mean_row_tokens']:.1f}, max "
             f"{counts['max_row_tokens']}), {counts['response_tokens']} of them answer tokens; packed into "
             f"{counts['packed_rows']} rows of at most {args.max_length}.",
             f"Share of computed positions that are padding (random batches of {args.batch_size}): unpacked "
             f"{counts['unpacked_padding_share']:.3f}, packed {counts['packed_padding_share']:.3f}.",
             f"Training tokens/s, packed over unpacked (best run of each): {summary['tokens_per_second_ratio_best']:.3f}; "
             f"tokens per process CPU second: {summary['tokens_per_cpu_second_ratio_best']:.3f}.",
             f"First optimizer step (mean of the runs): unpacked {mean(False, 'first_step_seconds'):.1f} s, packed "
             f"{mean(True, 'first_step_seconds'):.1f} s; later steps {mean(False, 'mean_step_seconds_after_first'):.2f} s "
             f"and {mean(True, 'mean_step_seconds_after_first'):.2f} s.",
             f"Validation answer loss after one epoch (mean of the runs): unpacked "
             f"{mean(False, 'validation_response_loss'):.4f} in {runs[0]['steps']} steps, packed "
             f"{mean(True, 'validation_response_loss'):.4f} in {runs[1]['steps']} steps; before training "
             f"{runs[0]['validation_response_loss_start']:.4f}."]
    return {"bench": "packing-sft", "machine": {**machine_info(), "cpu_model": cpu_model()},
            "command": " ".join(["python", "scripts/packing_bench.py", *sys.argv[1:]]),
            "settings": vars(args), "data": counts, "rows": runs, "summary": summary, "notes": notes}

if __name__ == "__main__":
    main()
