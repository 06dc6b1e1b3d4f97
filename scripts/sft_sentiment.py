"""Instruction tuning on your own file, end to end: smollm2-135m learns to answer "positive" / "negative" for
SST-2 sentences written as an SFT JSONL (prompt, response), with LoRA and the loss on the answer tokens only.

    python scripts/sft_sentiment.py --train-rows 800 --eval-rows 120 --steps 120 --json docs/results/sft-smollm2-sst2.json

Steps: write train/validation JSONL from the shared GLUE SST-2 rows; score the untuned model's greedy answers on the
validation prompts (in the chat template the run will use); `peftkit finetune` (data.task_type sft); score the run's
answers on the same prompts; keep the response-only training loss at the start and the end, and one generation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPT = "Review: {sentence}\nIs the sentiment of this movie review positive or negative? Answer with one word."


def write_rows(source: Path, target: Path, limit: int) -> list[dict]:
    rows = []
    for line in source.read_text(encoding="utf-8").splitlines()[:limit]:
        row = json.loads(line)
        rows.append({"prompt": PROMPT.format(sentence=row["sentence"].strip()),
                     "response": "positive" if int(row["label"]) == 1 else "negative"})
    target.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


def answers(model, tokenizer, prompts: list[str]) -> list[str]:
    import torch

    from peftkit.tasks.dataset import prompt_text

    out = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for prompt in prompts:
        enc = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=pad)
        out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def accuracy(generated: list[str], rows: list[dict]) -> float:
    """An answer counts when its first word is the label (case and punctuation ignored)."""
    def first_word(text: str) -> str:
        return (text.split() or [""])[0].strip(".,!:;\"'").lower()

    return sum(first_word(g) == r["response"] for g, r in zip(generated, rows)) / len(rows)


def validation_loss(model, tokenizer, rows: list[dict]) -> float:
    """Mean cross-entropy over the answer tokens of the validation rows (what the run reports as its loss), computed
    with the run's own encoding: the number to compare before and after tuning."""
    from peftkit.tasks.dataset import SFTCollator, encode_sft, response_loss

    encoded, _, _ = encode_sft(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows], 96)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return response_loss(model, encoded, SFTCollator(pad), 16)["loss"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "glue" / "sst2"))
    parser.add_argument("--work", default="runs/sft-sentiment")
    parser.add_argument("--train-rows", type=int, default=800)
    parser.add_argument("--eval-rows", type=int, default=120)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()

    from peftkit.artifacts.load import load_run
    from peftkit.utils.tables import machine_info

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train = write_rows(Path(args.data) / "train.jsonl", work / "train.jsonl", args.train_rows)
    validation = write_rows(Path(args.data) / "validation.jsonl", work / "validation.jsonl", args.eval_rows)
    prompts = [r["prompt"] for r in validation]

    base, tokenizer, _ = load_run("smollm2-135m", plain_head="causal_lm")
    before = answers(base, tokenizer, prompts)
    loss_before = validation_loss(base, tokenizer, validation)
    del base
    run = work / "run"
    command = [sys.executable, "-m", "peftkit", "finetune", "ft-wikitext2-smollm2-lora", "data.task=dataset",
               f"data.train_file={work / 'train.jsonl'}", f"data.validation_file={work / 'validation.jsonl'}",
               "data.task_type=sft", "data.prompt_column=prompt", "data.response_column=response", "data.max_length=96",
               f"train.max_steps={args.steps}", "train.batch_size=8", "train.lr=1e-3", "train.warmup_ratio=0.05",
               f"train.eval_every={args.steps}", "train.log_every=5", "train.eval_batch_size=16", "train.threads=2",
               f"output.dir={run}", "output.overwrite=true"]
    subprocess.run(command, check=True)
    tuned, tokenizer, _ = load_run(str(run), plain_head="causal_lm")
    after = answers(tuned, tokenizer, prompts)
    loss_after = validation_loss(tuned, tokenizer, validation)
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in losses if "loss" in r]
    metrics = json.loads((run / "metrics.json").read_text())
    rows = [{"model": "smollm2-135m (untuned)", "answer_accuracy": accuracy(before, validation), "n": len(validation),
             "validation_response_loss": loss_before, "example_prompt": prompts[0], "example_answer": before[0]},
            {"model": f"smollm2-135m + LoRA SFT ({args.steps} steps, {len(train)} rows)",
             "answer_accuracy": accuracy(after, validation), "n": len(validation),
             "train_loss_first_logged": train_losses[0], "train_loss_last_logged": train_losses[-1],
             "validation_response_loss": loss_after, "run_reported_response_loss": metrics.get("loss"),
             "example_prompt": prompts[0], "example_answer": after[0], "train_seconds": metrics.get("train_seconds")}]
    payload = {"bench": "sft-sentiment", "machine": machine_info(),
               "command": " ".join(["python", "scripts/sft_sentiment.py", *sys.argv[1:]]), "rows": rows,
               "notes": ["smollm2-135m's weights were Q4_1-quantized once before conversion (a 4.5-bit model in fp32)."]}
    Path(args.json).write_text(json.dumps(payload, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
