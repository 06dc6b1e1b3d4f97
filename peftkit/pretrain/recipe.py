"""The pretraining recipe: sections model, data, mlm, train (the shared TrainOptions) and output.

Read with the lead's loader helpers (YAML, dotted overrides, typed sections); every problem is collected
and reported at once by key path, before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from peftkit.config.loader import build_section, check_counts, read_recipe_sections
from peftkit.config.schema import OutputOptions, TrainOptions
from peftkit.errors import UserError
from peftkit.utils.options import option

WIKITEXT_VALID = "../shared/data/wikitext-2/wiki.valid.tokens"
WIKITEXT_TEST = "../shared/data/wikitext-2/wiki.test.raw"
SST2_TRAIN = "../shared/data/glue/sst2/train.jsonl"


@dataclass
class PretrainModelOptions:
    preset: Literal["tiny", "small", "base", "large"] = option(
        "small", "RoBERTa shape: tiny (tests), small (6x256, CPU), base (12x768), large (24x1024).")
    tokenizer: str = option("train", "'train' = byte-level BPE trained on data.files (cached), or a local tokenizer directory.")
    vocab_size: int = option(8192, "Vocabulary of the trained BPE (the model always takes the tokenizer's size).")
    attn_implementation: Optional[str] = option(None, "Attention kernel (eager, sdpa); None lets transformers choose.")


@dataclass
class PretrainDataOptions:
    files: list[str] = option(factory=lambda: [WIKITEXT_VALID, SST2_TRAIN],
                              help="Training text: plain text (a paragraph per line) or GLUE-style .jsonl. Relative paths "
                                   "are read from the working directory, else from the repository root.")
    block_size: int = option(128, "Tokens per training block, <s> and </s> included.")
    limit: Optional[int] = option(None, "Use only the first N training blocks (None = all).")
    eval_files: list[str] = option(factory=lambda: [WIKITEXT_TEST], help="Held-out text for the evaluation loss ([] = none).")
    eval_limit: Optional[int] = option(64, "Evaluation blocks (None = all).")
    eval_mask_rate: float = option(0.15, "Masking rate of the evaluation loss; the same for every variant so runs compare.")


@dataclass
class MLMOptions:
    variant: Literal["mlm", "3ml-self", "3ml-cross"] = option(
        "3ml-self", "mlm = vanilla RoBERTa MLM; 3ml-self / 3ml-cross = Mask More and Mask Later.")
    mask_rate: Optional[float] = option(None, "Fraction of tokens to predict; None = 0.15 for mlm, 0.5 for 3ML.")
    replace_probs: list[float] = option(factory=lambda: [0.8, 0.1, 0.1],
                                        help="How targets are corrupted: [MASK] (removed from 3ML's early layers) / "
                                             "random token / unchanged.")
    full_length_layers: int = option(2, "3ml-self: top encoder layers that see the [MASK]s (appended after layer L - this).")
    decoder_layers: int = option(2, "3ml-cross: layers of the self+cross-attention decoder (dropped after pretraining).")
    flop_budget: Optional[float] = option(None, "Total training FLOPs (forward+backward, analytic): sets train.max_steps "
                                                "so that variants train with equal compute. Exclusive with train.max_steps.")

    def resolved_mask_rate(self) -> float:
        if self.mask_rate is not None:
            return self.mask_rate
        return 0.15 if self.variant == "mlm" else 0.5


SECTIONS = {"model": PretrainModelOptions, "data": PretrainDataOptions, "mlm": MLMOptions,
            "train": TrainOptions, "output": OutputOptions}


@dataclass
class PretrainRecipe:
    name: str
    source: str
    model: PretrainModelOptions
    data: PretrainDataOptions
    mlm: MLMOptions
    train: TrainOptions
    output: OutputOptions

    def to_dict(self) -> dict:
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir or f"runs/{self.name}")


def _check(recipe: PretrainRecipe, errors: list[str]) -> None:
    from peftkit.pretrain.corpus import resolve_file
    from peftkit.pretrain.presets import PRESETS

    m, d, mlm, t = recipe.model, recipe.data, recipe.mlm, recipe.train
    shape = PRESETS.get(m.preset)
    if m.tokenizer == "train":
        if isinstance(m.vocab_size, int) and m.vocab_size < 300:
            errors.append(f"model.vocab_size: a byte-level BPE needs at least 300 entries (256 bytes + merges), got {m.vocab_size}")
    elif not Path(m.tokenizer).is_dir():
        errors.append(f"model.tokenizer: {m.tokenizer!r} is neither 'train' nor an existing tokenizer directory")
    for key in ("files", "eval_files"):
        paths = getattr(d, key)
        if key == "files" and isinstance(paths, list) and not paths:
            errors.append("data.files: give at least one training text file")
        for i, spec in enumerate(paths if isinstance(paths, list) else []):
            if isinstance(spec, str) and resolve_file(spec) is None:
                errors.append(f"data.{key}[{i}]: file {spec!r} not found "
                              f"(relative paths: from the working directory or the repository root)")
    if isinstance(d.block_size, int) and shape is not None and not 8 <= d.block_size <= shape.max_positions - 2:
        errors.append(f"data.block_size: must be in 8..{shape.max_positions - 2} for preset {m.preset}, got {d.block_size}")
    check_counts({"data.limit": d.limit, "data.eval_limit": d.eval_limit, "train.max_steps": t.max_steps}, errors, nullable=True)
    check_counts({"train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum, "train.log_every": t.log_every,
                  "train.keep_last": t.keep_last, "mlm.decoder_layers": mlm.decoder_layers}, errors)
    for key, rate in {"mlm.mask_rate": mlm.mask_rate, "data.eval_mask_rate": d.eval_mask_rate}.items():
        if isinstance(rate, float) and not 0 < rate < 1:
            errors.append(f"{key}: must be in (0, 1), got {rate}")
    probs = mlm.replace_probs
    if isinstance(probs, list) and all(isinstance(p, float) for p in probs):
        if len(probs) != 3 or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
            errors.append(f"mlm.replace_probs: three non-negative numbers ([MASK], random, unchanged) summing to 1, got {probs}")
    if mlm.variant == "3ml-self" and shape is not None and isinstance(mlm.full_length_layers, int) \
            and not 1 <= mlm.full_length_layers <= shape.layers:
        errors.append(f"mlm.full_length_layers: must be in 1..{shape.layers} (the layers of preset {m.preset}), "
                      f"got {mlm.full_length_layers}")
    if mlm.flop_budget is not None:
        if isinstance(mlm.flop_budget, float) and not mlm.flop_budget > 0:
            errors.append(f"mlm.flop_budget: must be positive, got {mlm.flop_budget}")
        if t.max_steps is not None:
            errors.append("mlm.flop_budget: set either mlm.flop_budget or train.max_steps, not both")
    if isinstance(t.lr, float) and not t.lr > 0:
        errors.append(f"train.lr: must be positive, got {t.lr}")
    if isinstance(t.warmup_ratio, float) and not 0 <= t.warmup_ratio < 1:
        errors.append(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if isinstance(t.resume, str) and t.resume not in ("auto", "false") and not Path(t.resume).exists():
        errors.append(f"train.resume: {t.resume!r} is neither 'auto', 'false' nor an existing checkpoint path")


def load_recipe(spec: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> PretrainRecipe:
    """Read, override and validate a pretraining recipe. Raises UserError listing every problem."""
    raw, source, name, errors = read_recipe_sections(spec, overrides, SECTIONS, "pretrain")
    sections: dict[str, Any] = {s: build_section(cls, raw.get(s), s, errors) for s, cls in SECTIONS.items()}
    recipe = PretrainRecipe(name=name, source=source, **sections)
    _check(recipe, errors)
    if errors:
        where = f" in {source}" if source != "<dict>" else ""
        raise UserError(f"invalid pretraining recipe{where} ({len(errors)} problem{'s' if len(errors) > 1 else ''}): "
                        f"{'; '.join(errors)}. Fix these keys and run again.")
    return recipe
