"""`peftkit pretrain RECIPE [k=v ...]`: masked-LM pretraining (mlm / 3ml-self / 3ml-cross) on the shared trainer.

The run directory holds config.yaml, train.log, metrics.jsonl (losses, evaluation), checkpoints/ (resumable
with train.resume=auto), plan.json (steps and FLOPs per step) and final/ (the exported RoBERTa checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from peftkit.errors import UserError


def make_eval_fn(blocks: list[dict], collate, batch_size: int):
    """Mean MLM loss over fixed evaluation blocks with a fixed corruption (identical at every evaluation)."""
    import torch

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(1234)  # the evaluation corruption must not depend on the training seed or variant
    batches = [collate(blocks[i:i + batch_size]) for i in range(0, len(blocks), batch_size)]
    torch.random.set_rng_state(generator_state)

    @torch.no_grad()
    def evaluate(model) -> dict:
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            targets = int((batch["labels"] != -100).sum())
            total += float(model(**batch).loss) * targets
            count += targets
        return {"eval_loss": total / max(count, 1), "eval_targets": count}

    return evaluate


def pretrain(recipe_spec: str, overrides: list[str]) -> Path:
    from peftkit.pretrain.recipe import load_recipe

    recipe = load_recipe(recipe_spec, overrides)  # every recipe error surfaces here, before heavy imports

    import torch

    from peftkit.methods.full import FullFineTuning
    from peftkit.pretrain.corpus import build_blocks, resolve_file
    from peftkit.pretrain.corruption import MaskingCollator
    from peftkit.pretrain.cost import expected_step_flops
    from peftkit.pretrain.export import export_encoder
    from peftkit.pretrain.model import MaskedLMPretrainer
    from peftkit.pretrain.presets import PRESETS, roberta_config
    from peftkit.pretrain.tokenizer import load_tokenizer
    from peftkit.train.rundir import RunDir
    from peftkit.train.trainer import Trainer
    from peftkit.utils.env import environment
    from peftkit.utils.seed import seed_everything

    m, d, mlm, t = recipe.model, recipe.data, recipe.mlm, recipe.train
    if t.threads:
        torch.set_num_threads(t.threads)
    files = [resolve_file(f) for f in d.files]
    eval_files = [resolve_file(f) for f in d.eval_files]
    tokenizer = load_tokenizer(m.tokenizer, files, m.vocab_size)
    mask_rate = mlm.resolved_mask_rate()
    resume = t.resume

    with RunDir(recipe.run_dir, recipe.to_dict(), resume != "false", recipe.output.overwrite) as run_dir:
        log_file = open(run_dir / "train.log", "a")

        def log(msg: str) -> None:
            print(msg, flush=True)
            log_file.write(msg + "\n")
            log_file.flush()

        try:
            (run_dir / "env.json").write_text(json.dumps(environment(), indent=2))
            blocks = build_blocks(files, tokenizer, d.block_size, d.limit)
            if not blocks:
                raise UserError(f"data.files hold fewer than {d.block_size} tokens: no training block. "
                                f"Add text or lower data.block_size.")
            seed_everything(t.seed)
            special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                       "eos_token_id": tokenizer.eos_token_id}
            config = roberta_config(m.preset, vocab_size=len(tokenizer),
                                    max_positions=max(PRESETS[m.preset].max_positions, d.block_size + 2),
                                    attn_implementation=m.attn_implementation, special_ids=special)
            model = MaskedLMPretrainer(config, mlm.variant, mlm.full_length_layers, mlm.decoder_layers)

            rows = t.batch_size * t.grad_accum
            per_step = expected_step_flops(config, mlm.variant, rows, d.block_size, mask_rate, mlm.replace_probs[0],
                                           full_length_layers=mlm.full_length_layers, decoder_layers=mlm.decoder_layers)
            train_options = t
            if mlm.flop_budget is not None:
                steps = max(1, round(mlm.flop_budget / per_step))
                train_options = dataclasses.replace(t, max_steps=steps)
            plan = {"variant": mlm.variant, "mask_rate": mask_rate, "full_length_layers": mlm.full_length_layers,
                    "append_layer": model.early_layers if mlm.variant == "3ml-self" else None,
                    "decoder_layers": mlm.decoder_layers if mlm.variant == "3ml-cross" else None,
                    "blocks": len(blocks), "block_size": d.block_size, "vocab_size": len(tokenizer),
                    "flops_per_step": per_step, "max_steps": train_options.max_steps, "flop_budget": mlm.flop_budget,
                    "parameters": sum(p.numel() for p in model.parameters())}
            (run_dir / "plan.json").write_text(json.dumps(plan, indent=2))
            log(f"pretrain {mlm.variant} (mask rate {mask_rate}) preset {m.preset}: {plan['parameters']:,} params, "
                f"{len(blocks)} blocks of {d.block_size}, {per_step / 1e9:.1f} GFLOP/step (analytic)"
                + (f", {train_options.max_steps} steps for a budget of {mlm.flop_budget:.3g} FLOPs" if mlm.flop_budget else ""))

            collate_args = dict(pad_id=tokenizer.pad_token_id, special_ids=tokenizer.all_special_ids,
                                mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                                replace_probs=mlm.replace_probs)
            collate = MaskingCollator(mask_rate=mask_rate, **collate_args)
            eval_fn = None
            if eval_files:
                eval_blocks = build_blocks(eval_files, tokenizer, d.block_size, d.eval_limit)
                if eval_blocks:
                    eval_fn = make_eval_fn(eval_blocks, MaskingCollator(mask_rate=d.eval_mask_rate, **collate_args),
                                           t.eval_batch_size)

            method = FullFineTuning()  # every parameter trains; the loss is the model's own (targets only)
            model = method.prepare(model, None)
            trainer = Trainer(model, method, train_options, run_dir, blocks, collate, eval_fn,
                              best_metric="eval_loss" if eval_fn else None, greater_is_better=False, log=log)
            trainer.resume(resume)
            summary = trainer.train()

            final_metrics = eval_fn(trainer.raw_model) if eval_fn else {}
            info = {"variant": mlm.variant, "recipe": recipe.to_dict(), "plan": plan, **final_metrics}
            final = export_encoder(trainer.raw_model, tokenizer, run_dir / "final", info)
            metrics = {**plan, **final_metrics, "steps": summary["steps"], "train_seconds": summary["train_seconds"],
                       "train_flops": per_step * summary["steps"], "best_step": summary["best_step"], "seed": t.seed}
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            log(f"final {mlm.variant}: " + "  ".join(f"{k} {v:.4f}" for k, v in final_metrics.items() if isinstance(v, float))
                + f"  saved {final} (loads as RobertaForSequenceClassification)")
        finally:
            log_file.close()
    return final
