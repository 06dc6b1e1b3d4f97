"""`peftkit predict` (labels or scores for new rows) and `peftkit generate` (text from a causal-LM or SFT run).

Both read rows from a CSV / JSONL / JSON / Parquet file and write one JSON object per row, to --output or stdout.
An existing --output is replaced only when it holds predictions peftkit wrote (one JSON object a line, of the
shapes predict and generate write), never another file, and never the --input file itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftkit.errors import UserError


def check_jsonl_output(path: str | None, input_file: str | None = None) -> Path | None:
    """The --output file, refused before any model loads when it is not ours to write: the input file itself,
    or an existing file that is not predictions peftkit wrote (see output_paths.is_peftkit_jsonl)."""
    from peftkit.utils.output_paths import check_output_file

    if not path:
        return None
    return check_output_file(path, "--output", must_be_json=False, inputs=(input_file,) if input_file else ())


def write_jsonl(records: list[dict], out: Path | None) -> None:
    from peftkit.utils.output_paths import write_result_jsonl

    if out is None:
        print("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), end="")
        return
    write_result_jsonl(out, records)


def predict(run: str, input_file: str, output: str | None = None, batch_size: int = 64,
            trust_remote_code: bool = False) -> list[dict]:
    """`label` and `probabilities` (classification) or `value` (regression) for every row of ``input_file``."""
    from peftkit.tasks.tabular import read_file

    out = check_jsonl_output(output, input_file)
    table = read_file(input_file)  # a bad file fails before the model loads
    from peftkit.artifacts.load import load_run
    from peftkit.tasks.dataset import RunReading, logits_of
    from peftkit.tasks.glue import PadCollator

    model, tokenizer, info = load_run(run, trust_remote_code)
    if info is not None and info.model.get("task_head") == "causal_lm":
        raise UserError(f"{run} is a language model (task_head causal_lm); `peftkit generate {run} --input FILE` "
                        f"writes its answers.")
    reading = RunReading(info, model.config)
    rows = reading.encode(tokenizer, table)
    logits = logits_of(model, rows, PadCollator(tokenizer.pad_token_id or 0, False), batch_size)
    if reading.task_type == "regression":
        records = [{"value": v} for v in logits[:, 0].tolist()]
    else:
        names = reading.labels or list(range(logits.shape[1]))
        records = []
        for p in logits.softmax(-1).tolist():
            best = max(range(len(p)), key=p.__getitem__)
            records.append({"label": names[best], "probabilities": {str(n): round(x, 6) for n, x in zip(names, p)}})
    write_jsonl(records, out)
    return records


def generate(run: str, prompts: list[str] | None = None, input_file: str | None = None, output: str | None = None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[dict]:
    """Continue each prompt with a causal-LM run, an SFT run (in the prompt format it was trained with), a quantize
    output directory or a plain language model. temperature 0 = greedy."""
    from peftkit.tasks.tabular import read_file, texts

    if not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p} must be in (0, 1]: the share of probability mass sampled from.")
    if bool(prompts) == bool(input_file):
        raise UserError("give the prompts either with --prompt (repeatable) or with --input FILE, one of the two.")
    out = check_jsonl_output(output, input_file)
    info = run_info(run) or {}
    if input_file:
        table = read_file(input_file)
        column = info.get("prompt_column") or "prompt"
        if column not in table.columns:
            raise UserError(f"{table.where}: no column {column!r} with the prompts; its columns are: "
                            f"{', '.join(table.columns)}.")
        prompts = texts(table, column)
    import torch

    from functools import partial

    from peftkit.artifacts.load import load_run
    from peftkit.tasks.causal_lm import CausalLMText
    from peftkit.tasks.dataset import prompt_text

    # a run with another head is refused from its record, as perplexity refuses it
    model, tokenizer, _ = load_run(run, plain_head="causal_lm", check=partial(CausalLMText.check_run, run))
    if torch.cuda.is_available():
        model = model.cuda()
    sft = info.get("task_type") == "sft"
    device = next(model.parameters()).device
    records = []
    for prompt in prompts:
        text = prompt_text(tokenizer, prompt) if sft else prompt
        enc = tokenizer(text, add_special_tokens=not (sft and getattr(tokenizer, "chat_template", None)),
                        return_tensors="pt").to(device)
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
        answer = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        records.append({"prompt": prompt, "generation": answer})
    write_jsonl(records, out)
    return records


def run_info(run: str):
    """peftkit.json of a run (a RunInfo), or None for a model directory that is not a run."""
    from peftkit.artifacts.load import final_dir
    from peftkit.config.run_info import INFO_FILE, read_run_info

    path = final_dir(run) / INFO_FILE
    return read_run_info(path) if path.is_file() else None
