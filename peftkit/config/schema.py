"""The recipe schema: one options dataclass per section. Field help texts are the documentation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from peftkit.utils.options import option


@dataclass
class ModelOptions:
    name: str = option("minilm-l6", "Model alias (minilm-l6, smollm2-135m), local directory or hub id.")
    task_head: Literal["seq_cls", "causal_lm", "mlm"] = option("seq_cls", "Head put on the backbone.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = option(
        "float32", "Training dtype; 'auto' picks bfloat16 on CUDA hardware that supports it, else float32."
    )
    trust_remote_code: bool = option(False, "Allow code shipped with a hub model to run (off unless you trust it).")
    attn_implementation: Optional[str] = option(None, "Attention kernel (eager, sdpa); None lets transformers choose.")


@dataclass
class DataOptions:
    task: str = option("sst2", "Dataset: a GLUE task name (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), or wikitext2 "
                               "(causal LM: trains on wiki.valid.tokens, perplexity on wiki.test.raw; needs task_head causal_lm).")
    root: Optional[str] = option(
        None, "Directory laid out as <task>/<split>.jsonl|tsv|parquet; None = env PEFTKIT_DATA_DIR, else the hub. "
              "wikitext2: the WikiText-2 directory; None = env PEFTKIT_WIKITEXT, else ../shared/data/wikitext-2."
    )
    max_length: int = option(128, "Truncate tokenized inputs to this many tokens (wikitext2: the length of every "
                                  "training and evaluation window).")
    limit: Optional[int] = option(None, "Use only the first N training rows (wikitext2: windows) (None = all).")
    eval_limit: Optional[int] = option(None, "Use only the first N validation rows (wikitext2: test windows) (None = all).")
    train_split: str = option("train", "Split used for training (GLUE only).")
    eval_split: Optional[str] = option(None, "Split used for evaluation; None = the task's validation split (GLUE only).")


@dataclass
class MethodOptions:
    name: str = option("lora", "Method plugin (peftkit methods lists them); its own options sit beside 'name'.")


@dataclass
class TrainOptions:
    epochs: float = option(3.0, "Passes over the training data (ignored when max_steps is set).")
    max_steps: Optional[int] = option(None, "Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = option(32, "Examples per forward pass (per process).")
    grad_accum: int = option(1, "Forward passes accumulated per optimizer step.")
    lr: float = option(5e-4, "Peak learning rate.")
    weight_decay: float = option(0.0, "AdamW weight decay (never applied to biases and LayerNorm weights).")
    adam_betas: list[float] = option(factory=lambda: [0.9, 0.999], help="AdamW betas.")
    adam_eps: float = option(1e-8, "AdamW epsilon.")
    warmup_ratio: float = option(0.06, "Fraction of steps with linear warmup.")
    schedule: Literal["linear", "cosine", "constant"] = option("linear", "Learning-rate decay after warmup.")
    max_grad_norm: Optional[float] = option(1.0, "Clip the global gradient norm (None = no clipping).")
    eval_every: Optional[int] = option(None, "Evaluate every N optimizer steps (None = at the end of each epoch).")
    save_every: Optional[int] = option(None, "Checkpoint every N optimizer steps (None = with each evaluation).")
    keep_last: int = option(2, "Checkpoints kept on disk (the best one is kept as well).")
    seed: int = option(42, "Seed for initialisation, data order and dropout.")
    resume: str = option("false", "'auto' continues from the latest checkpoint, a path resumes from it, 'false' starts fresh.")
    log_every: int = option(10, "Log training loss every N optimizer steps.")
    eval_batch_size: int = option(128, "Batch size for evaluation.")
    threads: Optional[int] = option(None, "torch.set_num_threads (None = torch's default).")
    group_by_length: bool = option(True, "Batch rows of similar length together (less padding; order stays seeded).")
    select_best: bool = option(True, "Final model = best evaluated checkpoint (False: the last one).")


@dataclass
class OutputOptions:
    dir: Optional[str] = option(None, "Run directory; None = runs/<recipe name>.")
    overwrite: bool = option(False, "Replace an existing run directory that holds a different run.")


SECTIONS = {
    "model": ModelOptions,
    "data": DataOptions,
    "method": MethodOptions,
    "train": TrainOptions,
    "output": OutputOptions,
}
