"""`peftkit finetune` with a language-modelling data.task (wikitext2): causal-LM fine-tuning, perplexity metrics.

Same trainer, run directory, checkpoints and final/ as a GLUE run; the differences are the data (token
windows, labels = inputs, see data/lm_text.py), the metric (perplexity, lower is better: checkpoint selection
uses greater_is_better=False) and one evaluation of the start point before any training, so each run records
how far fine-tuning moved it (``ppl_start`` vs ``ppl``) on the same windows.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftkit.finetune import _write_final, load_prepared_model, run_logger


def finetune_lm(recipe) -> Path:
    import torch

    from peftkit.data.lm_text import TRAIN_FILE, LMText, collate_windows, make_perplexity_eval_fn, text_windows, window_rows
    from peftkit.eval.wikitext import TEST_FILE
    from peftkit.methods import get_method
    from peftkit.models.load import count_parameters, load_tokenizer
    from peftkit.train.distributed import init_distributed
    from peftkit.train.rundir import RunDir
    from peftkit.train.trainer import Trainer
    from peftkit.utils.seed import seed_everything

    d = recipe.data
    method = get_method(recipe.method_name)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    texts = LMText.read(d.root)  # a missing file fails here, before the model loads
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.trust_remote_code)
    train_windows = text_windows(tokenizer, texts.train_text, d.max_length, d.limit, str(texts.root / TRAIN_FILE))
    eval_windows = text_windows(tokenizer, texts.eval_text, d.max_length, d.eval_limit, str(texts.root / TEST_FILE))
    dist = init_distributed()
    resume = recipe.train.resume

    seed_everything(recipe.train.seed)
    model = load_prepared_model(recipe, method, None, None)

    with RunDir(recipe.run_dir, recipe.to_dict(), resume != "false", recipe.output.overwrite, dist.is_main) as run_dir, \
            run_logger(run_dir, dist) as log:
        trainable, total = count_parameters(model)
        log(f"method {recipe.method_name} on {recipe.model.name} / {d.task}: trainable params {trainable:,} "
            f"of {total:,} ({100 * trainable / total:.3f}%); {len(train_windows)} training windows and "
            f"{len(eval_windows)} evaluation windows of {d.max_length} tokens from {texts.root}")
        eval_fn = make_perplexity_eval_fn(eval_windows)
        trainer = Trainer(model, method, recipe.train, run_dir, window_rows(train_windows), collate_windows, eval_fn,
                          best_metric="ppl", greater_is_better=False, dist=dist, log=log)
        start = eval_fn(trainer.raw_model)  # before resume: the start point, whatever the checkpoints hold
        log(f"start point: ppl {start['ppl']:.4f}  nll {start['nll']:.4f}")
        trainer.resume(resume)
        summary = trainer.train()

        final = eval_fn(trainer.raw_model)
        if dist.is_main:
            saved = _write_final(method, trainer.raw_model, recipe, tokenizer,
                                 {"task": d.task, "num_labels": None, "problem_type": None}, run_dir)
            tokens_per_step = recipe.train.batch_size * recipe.train.grad_accum * dist.world_size * d.max_length
            metrics = {"task": d.task, "method": recipe.method_name, "model": recipe.model.name,
                       "ppl": final["ppl"], "nll": final["nll"], "ppl_start": start["ppl"], "nll_start": start["nll"],
                       "eval_windows": final["windows"], "eval_seq_len": final["seq_len"], "eval_tokens": final["tokens"],
                       "train_windows": len(train_windows), "train_tokens": summary["steps"] * tokens_per_step,
                       "trainable_params": trainable, "total_params": total,
                       "trainable_pct": 100 * trainable / total, "train_seconds": summary["train_seconds"],
                       "steps": summary["steps"], "epochs": summary["epochs"], "seed": recipe.train.seed,
                       "best_step": summary["best_step"], "dtype": str(next(trainer.raw_model.parameters()).dtype),
                       "data_root": str(texts.root), "world_size": dist.world_size, **_start_point(recipe.model.name)}
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            log(f"final {d.task}: ppl {final['ppl']:.4f}  nll {final['nll']:.4f}  (start ppl {start['ppl']:.4f}; "
                f"{final['windows']} windows x {final['seq_len']} tokens)  saved {saved}")
    return run_dir


def _start_point(model_name: str) -> dict:
    """Which quantizer made the base (from its quantization.json), so results can name the start point."""
    from peftkit.quant.checkpoint import is_quantized_dir, read_info

    if not is_quantized_dir(model_name):
        return {"quant_method": None, "bits": None}
    info = read_info(model_name)
    return {"quant_method": info["method"], "bits": info["bits"], "group_size": info["group_size"],
            "quant_seconds": info.get("seconds")}
