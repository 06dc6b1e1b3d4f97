"""Masked-LM pretraining (mlm / 3ml-self / 3ml-cross) as a task of the one run pipeline.

The run directory holds what every run has plus plan.json (steps and FLOPs per step); final/ is the
exported RoBERTa checkpoint, which loads as RobertaForSequenceClassification. The evaluation loss uses
a fixed corruption at ``data.eval_mask_rate`` for every variant, so runs compare (lower is better).
"""

from __future__ import annotations

import json
from pathlib import Path

from peftkit.errors import UserError
from peftkit.tasks.base import Task, TaskData
from peftkit.utils.registry import TASKS


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


@TASKS.register("mlm", help="Masked-LM pretraining from scratch: vanilla MLM, 3ML-self, 3ML-cross.")
class MaskedLMPretraining(Task):
    name = "mlm"
    recipe_kind = "pretrain"
    best_metric = "eval_loss"
    greater_is_better = False

    @classmethod
    def recipe_problems(cls, recipe) -> list[str]:
        from peftkit.pretrain.corpus import resolve_file
        from peftkit.pretrain.presets import PRESETS

        m, d, mlm, t = recipe.model, recipe.data, recipe.mlm, recipe.train
        shape, problems = PRESETS[m.preset], []
        for key in ("files", "eval_files"):
            for i, spec in enumerate(getattr(d, key)):
                if resolve_file(spec) is None:
                    problems.append(f"data.{key}[{i}]: file {spec!r} not found "
                                    f"(relative paths: from the working directory or the repository root)")
        if d.block_size > shape.max_positions - 2:
            problems.append(f"data.block_size: must be in 8..{shape.max_positions - 2} for preset {m.preset}, "
                            f"got {d.block_size}")
        if mlm.variant == "3ml-self" and mlm.full_length_layers > shape.layers:
            problems.append(f"mlm.full_length_layers: must be in 1..{shape.layers} (the layers of preset {m.preset}), "
                            f"got {mlm.full_length_layers}")
        if mlm.flop_budget is not None and t.max_steps is not None:
            problems.append("mlm.flop_budget: set either mlm.flop_budget or train.max_steps, not both")
        return problems

    def __init__(self, recipe):
        super().__init__(recipe)
        from peftkit.pretrain.corpus import resolve_file

        self.files = [resolve_file(f) for f in recipe.data.files]
        self.eval_files = [resolve_file(f) for f in recipe.data.eval_files]
        self.mask_rate = recipe.mlm.resolved_mask_rate()

    def load_tokenizer(self):
        from peftkit.pretrain.tokenizer import load_tokenizer

        return load_tokenizer(self.recipe.model.tokenizer, self.files, self.recipe.model.vocab_size)

    def load_data(self, tokenizer) -> TaskData:
        from peftkit.pretrain.corpus import build_blocks
        from peftkit.pretrain.corruption import MaskingCollator

        d, mlm = self.recipe.data, self.recipe.mlm
        blocks = build_blocks(self.files, tokenizer, d.block_size, d.limit)
        if not blocks:
            raise UserError(f"data.files hold fewer than {d.block_size} tokens: no training block. "
                            f"Add text or lower data.block_size.")
        collate_args = dict(pad_id=tokenizer.pad_token_id, special_ids=tokenizer.all_special_ids,
                            mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                            replace_probs=mlm.replace_probs)
        eval_fn = None
        eval_blocks = build_blocks(self.eval_files, tokenizer, d.block_size, d.eval_limit) if self.eval_files else []
        if eval_blocks:
            eval_fn = make_eval_fn(eval_blocks, MaskingCollator(mask_rate=d.eval_mask_rate, **collate_args),
                                   self.recipe.train.eval_batch_size)
        return TaskData(blocks, MaskingCollator(mask_rate=self.mask_rate, **collate_args), eval_fn, {"blocks": len(blocks)})

    def build_model(self, method, tokenizer):
        from peftkit.pretrain.model import MaskedLMPretrainer
        from peftkit.pretrain.presets import PRESETS, roberta_config

        m, d, mlm = self.recipe.model, self.recipe.data, self.recipe.mlm
        special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id}
        config = roberta_config(m.preset, vocab_size=len(tokenizer),
                                max_positions=max(PRESETS[m.preset].max_positions, d.block_size + 2),
                                attn_implementation=m.attn_implementation, special_ids=special)
        return method.prepare(MaskedLMPretrainer(config, mlm.variant, mlm.full_length_layers, mlm.decoder_layers))

    def train_args(self, model, run_dir: Path, log):
        """Steps from the FLOP budget when one is set (equal compute across variants); the plan goes to plan.json."""
        from peftkit.pretrain.cost import expected_step_flops

        r = self.recipe
        m, d, mlm, t = r.model, r.data, r.mlm, r.train
        per_step = expected_step_flops(model.config, mlm.variant, t.batch_size * t.grad_accum, d.block_size,
                                       self.mask_rate, mlm.replace_probs[0], full_length_layers=mlm.full_length_layers,
                                       decoder_layers=mlm.decoder_layers)
        args = t if mlm.flop_budget is None else t.model_copy(update={"max_steps": max(1, round(mlm.flop_budget / per_step))})
        self.plan = {"variant": mlm.variant, "mask_rate": self.mask_rate, "full_length_layers": mlm.full_length_layers,
                     "append_layer": model.early_layers if mlm.variant == "3ml-self" else None,
                     "decoder_layers": mlm.decoder_layers if mlm.variant == "3ml-cross" else None,
                     "block_size": d.block_size, "vocab_size": model.config.vocab_size,
                     "flops_per_step": per_step, "max_steps": args.max_steps, "flop_budget": mlm.flop_budget,
                     "parameters": sum(p.numel() for p in model.parameters())}
        if run_dir is not None:
            (run_dir / "plan.json").write_text(json.dumps(self.plan, indent=2))
        log(f"pretrain {mlm.variant} (mask rate {self.mask_rate}) preset {m.preset}: {self.plan['parameters']:,} params, "
            f"blocks of {d.block_size}, {per_step / 1e9:.1f} GFLOP/step (analytic)"
            + (f", {args.max_steps} steps for a budget of {mlm.flop_budget:.3g} FLOPs" if mlm.flop_budget else ""))
        return args

    def save_final(self, method, model, tokenizer, directory, task_info=None) -> None:
        from peftkit.pretrain.export import INFO_FILE

        model.mlm.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        info = {"variant": self.recipe.mlm.variant, "recipe": self.recipe.to_dict(), "plan": self.plan}
        (directory / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))

    def summary(self, data, final, start, model, trained) -> dict:
        return {**self.plan, "blocks": data.info["blocks"], **final,
                "train_flops": self.plan["flops_per_step"] * trained["steps"]}

    def describe(self, data) -> str:
        return f"{self.recipe.model.preset} RoBERTa / {self.recipe.mlm.variant} on {data.info['blocks']} blocks"
