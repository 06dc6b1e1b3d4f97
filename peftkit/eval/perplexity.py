"""WikiText-2 perplexity: non-overlapping windows of ``seq_len`` tokens over the tokenized test text.

The test file is tokenized as one stream without special tokens, cut into consecutive windows (no
BOS inserted anywhere), and the nll is averaged over every predicted token (seq_len - 1 per window).
ppl = exp(nll).
"""

from __future__ import annotations

import math
from pathlib import Path


def evaluate_perplexity(model, tokenizer, text: str, seq_len: int = 512, max_windows: int | None = None,
                        skip_windows: int = 0) -> dict:
    from peftkit.eval.wikitext import consecutive_windows, token_ids

    windows = consecutive_windows(token_ids(tokenizer, text), seq_len, max_windows, skip_windows)
    return perplexity_of_windows(model, windows)


def perplexity_of_windows(model, windows) -> dict:
    """Perplexity over (n, L) token windows; each window is scored on its own (L - 1 predictions)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for window in windows:
            ids = window[None].to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            total += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    model.train(was_training)
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])}


def load_for_eval(model_path_or_dir: str):
    """(model, tokenizer) from a quantize output dir (quantized base + LoRA), a peft adapter dir whose
    base is one of these (e.g. a fine-tuned apiq run), a model dir or an alias. A `peftkit finetune` run
    directory stands for its final/ (lora and apiq runs store a peft adapter there, full runs a model dir)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.errors import UserError
    from peftkit.models.aliases import resolve_model
    from peftkit.models.trained import INFO_FILE, final_dir
    from peftkit.quant.checkpoint import is_quantized_dir, load_quantized, load_quantized_base

    path = final_dir(model_path_or_dir)
    if (path / INFO_FILE).is_file():
        head = json.loads((path / INFO_FILE).read_text()).get("model", {}).get("task_head")
        if head != "causal_lm":
            raise UserError(f"{model_path_or_dir} was fine-tuned with a {head} head; perplexity needs a causal LM "
                            f"(a run with data.task wikitext2, a quantize output directory or a language model).")
    adapter_config = path / "adapter_config.json"
    if is_quantized_dir(path):
        model, tokenizer_dir = load_quantized(path), path
    elif adapter_config.is_file():
        from peft import PeftModel

        base_name = json.loads(adapter_config.read_text()).get("base_model_name_or_path") or ""
        if is_quantized_dir(base_name):
            base, tokenizer_dir = load_quantized_base(base_name), Path(base_name)
        else:
            tokenizer_dir = Path(resolve_model(base_name))
            base = AutoModelForCausalLM.from_pretrained(tokenizer_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(path))
        if (path / "tokenizer_config.json").is_file():
            tokenizer_dir = path
    else:
        tokenizer_dir = Path(resolve_model(str(path) if (path / INFO_FILE).is_file() else str(model_path_or_dir)))
        model = AutoModelForCausalLM.from_pretrained(tokenizer_dir, dtype=torch.float32)
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval(), AutoTokenizer.from_pretrained(tokenizer_dir)


def run(model_path_or_dir: str, data_root: str | None = None, seq_len: int = 512, max_windows: int | None = None) -> dict:
    """Perplexity of one model on the WikiText-2 test text."""
    from peftkit.eval.wikitext import TEST_FILE, default_wikitext_root, read_text

    path = Path(data_root or default_wikitext_root()) / TEST_FILE
    text = read_text(path)
    model, tokenizer = load_for_eval(str(model_path_or_dir))
    result = evaluate_perplexity(model, tokenizer, text, seq_len, max_windows)
    return {"task": "wikitext2", "model": str(model_path_or_dir), "data": str(path), **result}


def run_cli(models: list[str] | str, seq_len: int = 512, max_windows: int | None = None, json_out: str | None = None) -> list[dict]:
    """`peftkit eval --task wikitext2 --model DIR [--model DIR2] [--max-windows N] [--json FILE]`."""
    import json

    rows = [run(m, seq_len=seq_len, max_windows=max_windows) for m in ([models] if isinstance(models, str) else models)]
    for row in rows:
        print(f"wikitext2 {row['model']}: ppl {row['ppl']:.3f} (nll {row['nll']:.4f}, {row['windows']} windows x {row['seq_len']} tokens)")
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps({"task": "wikitext2", "rows": rows}, indent=2))
    return rows
