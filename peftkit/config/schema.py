"""Every recipe section, typed and ranged, and the three kinds of recipe built from them.

One ``TrainArgs`` serves fine-tuning and pretraining; one ``OutputArgs`` every command that writes a
directory. A recipe names its ``kind`` (finetune, pretrain, quantize); the sections it may hold follow
from the kind. Field help texts are the documentation (`peftkit recipes show`, docs/configuration.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import StrictBool, field_validator, model_validator

from peftkit.config.base import MAX_COUNT, MAX_SEED, Section, option
from peftkit.paths import PRETRAIN_EVAL_FILES, PRETRAIN_FILES

Count = int  # an integer option; its range is declared with the field
ATTENTION = Optional[Literal["eager", "sdpa", "flash_attention_2", "flex_attention"]]
# train.report_to backend -> (the module it needs, the pip extra that installs it)
REPORT_BACKENDS = {"tensorboard": ("tensorboard", "peftkit[tensorboard]"), "wandb": ("wandb", "peftkit[wandb]"),
                   "mlflow": ("mlflow", "peftkit[mlflow]")}


def plain_name(value: Optional[str]) -> Optional[str]:
    """A name usable as one path component (a split, a run name): no separators, not '.' or '..'."""
    if value is None:
        return value
    if not value.strip() or value in (".", "..") or any(c in value for c in "/\\\0"):
        raise ValueError("must be a plain file name such as train or validation (no '/', '\\', '..')")
    return value


# ---- sections shared by several kinds ---------------------------------------------------------------
class TrainArgs(Section):
    """The training loop: one set of options for fine-tuning and pretraining."""

    epochs: float = option(3.0, "Passes over the training data (ignored when max_steps is set).", gt=0, le=1e6)
    max_steps: Optional[Count] = option(None, "Stop after this many optimizer steps (overrides epochs).", ge=1, le=MAX_COUNT)
    batch_size: Count = option(32, "Examples per forward pass (per process).", ge=1, le=65536)
    grad_accum: Count = option(1, "Forward passes accumulated per optimizer step.", ge=1, le=65536)
    lr: float = option(5e-4, "Peak learning rate.", gt=0, le=10)
    weight_decay: float = option(0.0, "AdamW weight decay (never applied to biases and LayerNorm weights).", ge=0, le=10)
    adam_betas: list[float] = option(factory=lambda: [0.9, 0.999], help="AdamW betas, each in [0, 1).",
                                     min_length=2, max_length=2)
    adam_eps: float = option(1e-8, "AdamW epsilon.", gt=0, le=1)
    warmup_ratio: float = option(0.06, "Fraction of steps with linear warmup.", ge=0, lt=1)
    schedule: Literal["linear", "cosine", "constant"] = option("linear", "Learning-rate decay after warmup.")
    max_grad_norm: Optional[float] = option(1.0, "Clip the global gradient norm to this (null = no clipping).", gt=0)
    eval_every: Optional[Count] = option(None, "Evaluate every N optimizer steps (null = at the end of each epoch).",
                                         ge=1, le=MAX_COUNT)
    save_every: Optional[Count] = option(None, "Checkpoint every N optimizer steps (null = with each evaluation).",
                                         ge=1, le=MAX_COUNT)
    keep_last: Count = option(2, "Checkpoints kept on disk (the best one is kept as well).", ge=1, le=1000)
    seed: Count = option(42, "Seed for initialisation, data order and dropout.", ge=0, le=MAX_SEED)
    resume: str = option("false", "'auto' continues from the latest checkpoint, a path resumes from it, 'false' starts fresh.")
    resume_any: StrictBool = option(False, "Resume even from a checkpoint whose recipe had other result-changing "
                                           "settings (by default such a resume is refused).")
    log_every: Count = option(10, "Log training loss every N optimizer steps.", ge=1, le=MAX_COUNT)
    eval_batch_size: Count = option(128, "Batch size for evaluation.", ge=1, le=65536)
    threads: Optional[Count] = option(None, "torch.set_num_threads (null = torch's default).", ge=1, le=1024)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "fp32", "Mixed precision of the forward and backward (autocast; fp16 adds a gradient scaler). 'auto' picks bf16 "
                "on CUDA devices with bf16; on a CPU it times a bf16 and an fp32 matmul of the model's shapes once per "
                "machine (cached in the peftkit cache) and picks bf16 where it is at least 1.3x faster, else fp32; the "
                "run logs what it picked and the measured ratio.")
    gradient_checkpointing: Optional[StrictBool] = option(
        None, "Recompute each layer's activations in backward instead of keeping them (less memory, ~1/3 more compute). "
              "null = the method's default: on for a quantized base (method apiq), off otherwise.")
    optimizer: Literal["adamw", "adamw8bit"] = option(
        "adamw", "adamw (torch's, its fused kernel where the device has one) or adamw8bit (bitsandbytes' 8-bit AdamW: "
                 "optimizer state in 8 bits).")
    compile: Union[StrictBool, Literal["auto"]] = option(
        False, "torch.compile the model's forward and backward (inductor; on a CPU its C++ backend, which needs a C++ "
               "compiler). The first steps pay the compilation (tens of seconds on a CPU, again for new sequence "
               "lengths), so it pays off only on long runs. Where compiling fails, or the method cannot be compiled "
               "(MEFT's reversible layers), the run logs one line and continues eagerly. 'auto': a single-process "
               "run of at least 300 steps times a few eager steps, compiles, times a few compiled ones and keeps "
               "the compiled model only where its steps are at least 1.1x faster (one log line with both figures); "
               "shorter runs stay eager.")
    strategy: Literal["ddp", "fsdp"] = option(
        "ddp", "Under torchrun: ddp (a full replica per process) or fsdp (FSDP2: parameters, gradients and optimizer "
               "state sharded across processes, for models that do not fit one device; docs/distributed.md says "
               "what each method shards).")
    fsdp_mixed_precision: Literal["none", "bf16"] = option(
        "none", "Under strategy fsdp: bf16 gathers the parameters in bfloat16 for forward and backward and reduces "
                "gradients in float32 (FSDP2's MixedPrecisionPolicy); the sharded copy the optimizer updates stays "
                "float32. none = the parameters' own dtype.")
    fsdp_cpu_offload: StrictBool = option(
        False, "Under strategy fsdp: keep the sharded parameters, gradients and optimizer state on the CPU between "
               "uses (FSDP2's CPUOffloadPolicy; the optimizer step runs on the CPU).")
    group_by_length: StrictBool = option(True, "Batch rows of similar length together (less padding; order stays seeded).")
    select_best: StrictBool = option(True, "Final model = best evaluated checkpoint (false: the last one).")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = option(
        factory=list, help="Also send what metrics.jsonl logs (loss, lr, grad norm, throughput, peak memory, evaluations) "
                           "to these trackers: tensorboard (event files in <run>/tensorboard), wandb (honours WANDB_MODE="
                           "offline, WANDB_PROJECT), mlflow (MLFLOW_TRACKING_URI, else a file store in <run>/mlruns). "
                           "Each needs its package (pip install 'peftkit[NAME]').", max_length=3)

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, betas: list[float]) -> list[float]:
        if any(not 0 <= b < 1 for b in betas):
            raise ValueError("each beta must be in [0, 1)")
        return betas

    @model_validator(mode="after")
    def _fsdp_options(self):
        given = [name for name in ("fsdp_mixed_precision", "fsdp_cpu_offload")
                 if getattr(self, name) != type(self).model_fields[name].default]
        if given and self.strategy != "fsdp":
            names = " and ".join(given)
            raise ValueError(f"{names} {'applies' if len(given) == 1 else 'apply'} only under train.strategy=fsdp "
                             f"(this recipe trains with {self.strategy}); set train.strategy=fsdp or remove {names}")
        return self

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # report_to=tensorboard means [tensorboard]

    @field_validator("report_to")
    @classmethod
    def _report_to(cls, names: list[str]) -> list[str]:
        import importlib.util

        if len(set(names)) != len(names):
            raise ValueError("names a tracker twice")
        for name in names:
            module, extra = REPORT_BACKENDS[name]
            if importlib.util.find_spec(module) is None:
                raise ValueError(f"{name} needs the package {module}, which is not installed in this environment; "
                                 f"pip install '{extra}' or leave {name} out of train.report_to")
        return names

    @field_validator("resume")
    @classmethod
    def _resume(cls, value: str) -> str:
        if value in ("auto", "false"):
            return value
        try:  # a checkpoint directory holds a manifest (train/checkpoint.py); any other path cannot be one
            is_checkpoint = (Path(value).expanduser() / "manifest.json").is_file()
        except (OSError, ValueError):  # a NUL byte or a name too long for the file system
            is_checkpoint = False
        if not is_checkpoint:
            raise ValueError("is neither 'auto', 'false' nor a checkpoint directory (runs/<name>/checkpoints/step-N)")
        return value


class OutputArgs(Section):
    dir: Optional[str] = option(None, "Output directory; null = runs/<recipe name>. '~' and $VARS are expanded.",
                                min_length=1)
    overwrite: StrictBool = option(False, "Replace what an earlier peftkit run wrote in this directory (never other files).")


# ---- fine-tuning ----------------------------------------------------------------------------------
class ModelArgs(Section):
    name: str = option("minilm-l6", "Model alias (minilm-l6, smollm2-135m), local directory or hub id.", min_length=1)
    task_head: Literal["seq_cls", "causal_lm", "mlm"] = option("seq_cls", "Head put on the backbone.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = option(
        "float32", "Training dtype; 'auto' picks bfloat16 on CUDA hardware that supports it, else float32.")
    trust_remote_code: StrictBool = option(False, "Allow code shipped with a hub model to run (off unless you trust it).")
    attn_implementation: ATTENTION = option(None, "Attention kernel; null lets transformers choose.")


TASK_TYPES = ("classification", "regression", "causal-lm", "sft")
OWN_DATA_TASK = "dataset"  # the task that reads data.train_file / data.dataset_name (peftkit/tasks/dataset.py)
# Options that only mean something for one's own data (the "dataset" task).
OWN_DATA_OPTIONS = ("dataset_name", "dataset_config_name", "train_file", "validation_file", "validation_fraction",
                    "text_columns", "label_column", "task_type", "prompt_column", "response_column")


class DataArgs(Section):
    task: str = option("sst2", "A GLUE task name (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), wikitext2 "
                               "(causal LM: trains on wiki.valid.tokens, perplexity on wiki.test.raw; needs task_head "
                               "causal_lm), or dataset (your own data; chosen by itself when data.train_file or "
                               "data.dataset_name is set).", min_length=1)
    root: Optional[str] = option(
        None, "Directory laid out as <task>/<split>.jsonl|tsv|parquet; null = env PEFTKIT_DATA_DIR, else the hub. "
              "wikitext2: the WikiText-2 directory; null = env PEFTKIT_WIKITEXT.")
    max_length: Count = option(128, "Truncate tokenized inputs to this many tokens (wikitext2 and causal-lm: the length "
                                    "of every training and evaluation window).", ge=2, le=1_048_576)
    limit: Optional[Count] = option(None, "Use only the first N training rows (wikitext2: windows) (null = all).",
                                    ge=1, le=MAX_COUNT)
    eval_limit: Optional[Count] = option(None, "Use only the first N validation rows (wikitext2: test windows) (null = all).",
                                         ge=1, le=MAX_COUNT)
    train_split: str = option("train", "Split used for training (GLUE and data.dataset_name).")
    eval_split: Optional[str] = option(None, "Split used for evaluation; null = the task's validation split (GLUE), or "
                                             "the dataset's 'validation' split when it has one (data.dataset_name).")
    # ---- your own data (task "dataset"); names as in the transformers example scripts ----
    dataset_name: Optional[str] = option(None, "A datasets hub id (e.g. imdb) read from datasets' local cache; "
                                               "exclusive with data.train_file.", min_length=1)
    dataset_config_name: Optional[str] = option(None, "The configuration of data.dataset_name (e.g. sst2 of glue).",
                                                min_length=1)
    train_file: Optional[str] = option(None, "Training rows: a local .csv, .tsv, .json, .jsonl or .parquet file.",
                                       min_length=1)
    validation_file: Optional[str] = option(None, "Validation rows, same formats; null = the dataset's validation split, "
                                                  "else data.validation_fraction of the training rows.", min_length=1)
    validation_fraction: float = option(0.1, "Share of the training rows held out for validation when there is no "
                                             "validation file or split (drawn with a fixed seed, the same every run).",
                                        gt=0, le=0.5)
    text_columns: Optional[list[str]] = option(None, "The one or two text columns (a pair is encoded as a sentence "
                                                     "pair); null = the text columns the file has besides the label "
                                                     "(causal-lm: 'text').", min_length=1, max_length=2)
    label_column: str = option("label", "Column holding the label: class names or integers (classification) or "
                                        "numbers (regression).", min_length=1)
    task_type: Optional[Literal["classification", "regression", "causal-lm", "sft"]] = option(
        None, "What to learn; null = sft when data.prompt_column/response_column is set, causal-lm with "
              "model.task_head causal_lm, else classification.")
    prompt_column: Optional[str] = option(None, "sft: the column holding the prompt (null = 'prompt').", min_length=1)
    response_column: Optional[str] = option(None, "sft: the column holding the answer, the only tokens the loss is "
                                                  "taken on (null = 'response').", min_length=1)
    packing: bool = option(False, "causal-lm and sft: put several rows into each training row of up to "
                                  "data.max_length tokens (sft: whole rows, best-fit decreasing; causal-lm: the same "
                                  "windows). Position ids restart per row and no row attends to or predicts "
                                  "another, so the loss is on the same tokens; evaluation is not packed.")

    @field_validator("train_split", "eval_split")
    @classmethod
    def _split(cls, value: Optional[str]) -> Optional[str]:
        return plain_name(value)

    @model_validator(mode="after")
    def _own_data(self):
        own = bool(self.train_file or self.dataset_name)
        if "task" not in self.model_fields_set and own:
            self.task = OWN_DATA_TASK
        elif own and self.task != OWN_DATA_TASK:
            given = "train_file" if self.train_file else "dataset_name"
            raise ValueError(f"{given}: data.task {self.task!r} reads its own rows; remove data.task (or set it to "
                             f"{OWN_DATA_TASK}) to train on data.{given}")
        if self.task != OWN_DATA_TASK:
            stray = [k for k in OWN_DATA_OPTIONS if k in self.model_fields_set and k != "validation_fraction"
                     and getattr(self, k) is not None and (k != "label_column" or self.label_column != "label")]
            if stray:
                raise ValueError(f"{stray[0]}: an option for your own data, which data.task {self.task!r} does not "
                                 f"read; set data.train_file or data.dataset_name (and remove data.task)")
        if self.packing and self.task != OWN_DATA_TASK:
            raise ValueError(f"packing: packs rows of data.task_type causal-lm or sft data (data.train_file or "
                             f"data.dataset_name); data.task {self.task!r} has no rows to pack; remove data.packing")
        if self.packing and self.task_type in ("classification", "regression"):
            raise ValueError(f"packing: only for data.task_type causal-lm or sft; a {self.task_type} row is one "
                             f"sequence with one label; remove data.packing")
        return self


class MethodArgs(Section):
    """The base of every method's options; a method's options sit beside ``name`` in the recipe."""


# ---- pretraining ----------------------------------------------------------------------------------
class PretrainModelArgs(Section):
    preset: Literal["tiny", "small", "base", "large"] = option(
        "small", "RoBERTa shape: tiny (tests), small (6x256, CPU), base (12x768), large (24x1024).")
    tokenizer: str = option("train", "'train' = byte-level BPE trained on data.files (cached), or a local tokenizer directory.")
    vocab_size: Count = option(8192, "Vocabulary of the trained BPE (256 bytes + merges; the model takes the tokenizer's size).",
                               ge=300, le=1_000_000)
    attn_implementation: ATTENTION = option(None, "Attention kernel; null lets transformers choose.")

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, value: str) -> str:
        if value != "train" and not Path(value).expanduser().is_dir():
            raise ValueError("is neither 'train' nor an existing tokenizer directory")
        return value


class PretrainDataArgs(Section):
    files: list[str] = option(factory=lambda: list(PRETRAIN_FILES), min_length=1,
                              help="Training text: plain text (a paragraph per line) or GLUE-style .jsonl. $VARIABLES "
                                   "are expanded; relative paths are read from the working directory, else from the "
                                   "repository root.")
    block_size: Count = option(128, "Tokens per training block, <s> and </s> included.", ge=8, le=65536)
    limit: Optional[Count] = option(None, "Use only the first N training blocks (null = all).", ge=1, le=MAX_COUNT)
    eval_files: list[str] = option(factory=lambda: list(PRETRAIN_EVAL_FILES),
                                   help="Held-out text for the evaluation loss ([] = none).")
    eval_limit: Optional[Count] = option(64, "Evaluation blocks (null = all).", ge=1, le=MAX_COUNT)
    eval_mask_rate: float = option(0.15, "Masking rate of the evaluation loss; the same for every variant so runs compare.",
                                   gt=0, lt=1)


class MLMArgs(Section):
    variant: Literal["mlm", "3ml-self", "3ml-cross"] = option(
        "3ml-self", "mlm = vanilla RoBERTa MLM; 3ml-self / 3ml-cross = Mask More and Mask Later.")
    mask_rate: Optional[float] = option(None, "Fraction of tokens to predict; null = 0.15 for mlm, 0.5 for 3ML.", gt=0, lt=1)
    replace_probs: list[float] = option(factory=lambda: [0.8, 0.1, 0.1], min_length=3, max_length=3,
                                        help="How targets are corrupted: [MASK] (removed from 3ML's early layers) / "
                                             "random token / unchanged; three numbers >= 0 summing to 1.")
    full_length_layers: Count = option(2, "3ml-self: top encoder layers that see the [MASK]s (appended after layer L - this).",
                                       ge=1, le=1024)
    decoder_layers: Count = option(2, "3ml-cross: layers of the self+cross-attention decoder (dropped after pretraining).",
                                   ge=1, le=64)
    flop_budget: Optional[float] = option(None, "Total training FLOPs (forward+backward, analytic): sets train.max_steps "
                                                "so that variants train with equal compute. Exclusive with train.max_steps.",
                                          gt=0, le=1e30)

    @field_validator("replace_probs")
    @classmethod
    def _probs(cls, probs: list[float]) -> list[float]:
        if min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
            raise ValueError("must be three numbers >= 0 ([MASK], random, unchanged) summing to 1")
        return probs

    def resolved_mask_rate(self) -> float:
        if self.mask_rate is not None:
            return self.mask_rate
        return 0.15 if self.variant == "mlm" else 0.5


# ---- quantization ---------------------------------------------------------------------------------
class QuantModelArgs(Section):
    name: str = option("smollm2-135m", "Model to quantize: alias (smollm2-135m) or local directory of a pre-norm decoder "
                                       "with Linear projections (LLaMA, Mistral, Qwen2/3, Gemma/Gemma-2, Phi-3, OPT, ...).",
                       min_length=1)


class QuantArgs(Section):
    method: str = option(
        "apiq-bw", "A registered quantizer: rtn (min/max round-to-nearest, B=0) | nf (normal-float, the QLoRA start, B=0) | "
                   "loftq | apiq-lw | apiq-bw | gptq (GPTQModel's solver, B=0).")
    bits: Optional[Literal[2, 3, 4]] = option(2, "Bits per weight: 2, 3 or 4; null = not quantized (LoRA B=0).")
    group_size: Count = option(64, "Consecutive input columns sharing one scale/zero; must divide every projection's input width.",
                               ge=1, le=65536)
    symmetric: StrictBool = option(False, "Symmetric uniform quantization (fixed zero point 2^(b-1)); rtn and ApiQ only.")
    lora_r: Count = option(64, "LoRA rank r.", ge=1, le=65536)
    lora_alpha: float = option(16.0, "LoRA alpha; the update is (alpha / r)·B·A.", gt=0, le=1e6)
    lora_targets: list[str] = option(factory=list, help="Projection names that get LoRA; [] = all (q,k,v,o,gate,up,down for LLaMA).")
    loftq_iters: Count = option(1, "LoftQ alternations T.", ge=1, le=1000)
    epochs: Count = option(2, "ApiQ: calibration epochs over the windows, per block (bw) or per layer (lw).", ge=1, le=100_000)
    lr_lora: float = option(5e-3, "ApiQ: AdamW learning rate of A and B.", gt=0, le=10)
    lr_clip: float = option(5e-2, "ApiQ: AdamW learning rate of the clipping logits gamma, beta.", gt=0, le=10)
    weight_decay: float = option(0.0, "ApiQ: AdamW weight decay.", ge=0, le=10)
    aug_loss: StrictBool = option(True, "ApiQ-bw: add ||F(Xq; W) - F(Xq; Q, A, B)||^2 to the loss.")
    batch_size: Count = option(4, "ApiQ: calibration windows per optimizer step (and per forward when measuring); 4 halves "
                                  "the CPU time of an epoch against 1, with fewer steps per epoch.", ge=1, le=65536)
    seed: Count = option(0, "Seed of the LoRA A initialisation and the calibration order.", ge=0, le=MAX_SEED)

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        from peftkit.utils.registry import QUANTIZERS

        problem = QUANTIZERS.unknown(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("bits", mode="before")
    @classmethod
    def _bits(cls, value):
        if value == 16 and not isinstance(value, bool):
            raise ValueError("16 is not a bit width peftkit quantizes to: write null for a model that is not "
                             "quantized (what 16 meant in older recipes), or 2, 3 or 4")
        return value

    @model_validator(mode="after")
    def _symmetric(self):
        from peftkit.utils.registry import QUANTIZERS

        refusal = QUANTIZERS.get(self.method).symmetric_refusal if self.method in QUANTIZERS else None
        if self.symmetric and refusal:
            raise ValueError(f"symmetric: {self.method} {refusal}; set symmetric: false")
        return self


class CalibArgs(Section):
    root: Optional[str] = option(None, "WikiText-2 directory; null = env PEFTKIT_WIKITEXT.")
    file: str = option("wiki.valid.tokens", "Calibration text file inside root (never the test file used for perplexity).")
    n_windows: Count = option(32, "Random token windows drawn from the file.", ge=2, le=1_000_000)
    seq_len: Count = option(256, "Tokens per window.", ge=2, le=1_048_576)
    seed: Count = option(0, "Seed of the window positions.", ge=0, le=MAX_SEED)

    @field_validator("file")
    @classmethod
    def _file(cls, value: str) -> str:
        return plain_name(value)


# ---- the recipes ----------------------------------------------------------------------------------
class Recipe(Section):
    """What every kind shares: its kind, its name (the default run directory) and where it came from."""

    kind: str
    name: str = "recipe"
    source: str = "<dict>"
    output: OutputArgs = option(factory=OutputArgs)
    SECTIONS: ClassVar[tuple[str, ...]] = ()

    @property
    def run_dir(self) -> Path:
        from peftkit.utils.output_paths import resolve_output_dir

        return resolve_output_dir(self.output.dir) if self.output.dir else Path("runs") / self.name

    def result_settings(self) -> dict[str, Any]:
        """The settings that change what a run computes: what a checkpoint must share with the run resuming it."""
        settings = self.to_dict()
        settings.pop("output", None)
        # how the same arithmetic is executed (threads, compiled or eager) is not a result-changing setting
        for key in ("resume", "resume_any", "threads", "compile", "log_every", "eval_batch_size", "report_to",
                    "fsdp_cpu_offload"):
            settings.get("train", {}).pop(key, None)
        return settings

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as config.yaml holds it."""
        out: dict[str, Any] = {"kind": self.kind}
        for section in self.SECTIONS:
            value = getattr(self, section)
            if section == "method":
                out[section] = {"name": self.method_name, **value.model_dump(mode="json")}
            else:
                out[section] = value.model_dump(mode="json")
        return out


class FinetuneRecipe(Recipe):
    kind: Literal["finetune"] = "finetune"
    model: ModelArgs = option(factory=ModelArgs)
    data: DataArgs = option(factory=DataArgs)
    method_name: str = "lora"
    method: MethodArgs = option(factory=MethodArgs)
    train: TrainArgs = option(factory=TrainArgs)
    SECTIONS: ClassVar[tuple[str, ...]] = ("model", "data", "method", "train", "output")


class PretrainRecipe(Recipe):
    kind: Literal["pretrain"] = "pretrain"
    model: PretrainModelArgs = option(factory=PretrainModelArgs)
    data: PretrainDataArgs = option(factory=PretrainDataArgs)
    mlm: MLMArgs = option(factory=MLMArgs)
    train: TrainArgs = option(factory=TrainArgs)
    SECTIONS: ClassVar[tuple[str, ...]] = ("model", "data", "mlm", "train", "output")


class QuantizeRecipe(Recipe):
    kind: Literal["quantize"] = "quantize"
    model: QuantModelArgs = option(factory=QuantModelArgs)
    quant: QuantArgs = option(factory=QuantArgs)
    calib: CalibArgs = option(factory=CalibArgs)
    SECTIONS: ClassVar[tuple[str, ...]] = ("model", "quant", "calib", "output")


KINDS: dict[str, type[Recipe]] = {"finetune": FinetuneRecipe, "pretrain": PretrainRecipe, "quantize": QuantizeRecipe}


def like_train(name: str) -> Any:
    """The type of ``TrainArgs.<name>`` with its range, optional: a bench setting that means the same as a training
    option is checked by the same rule."""
    from typing import Annotated, Union, get_args, get_origin

    field = TrainArgs.model_fields[name]
    base = field.annotation
    if get_origin(base) is Union:
        base = next(a for a in get_args(base) if a is not type(None))
    return Optional[Annotated[(base, *field.metadata)]] if field.metadata else Optional[base]
