"""peftkit against the tools a user would pick instead, side by side in one process.

Rows: comparison, peftkit, peer, ratio (= peftkit / peer), unit, plus what was held equal.

(a) Training throughput, LoRA and full fine-tuning: Hugging Face ``transformers.Trainer`` (on the peft LoRA model
    peftkit's ``lora`` method builds, or on the plain model) vs peftkit's trainer with its ``lora`` / ``full`` method
    (what ``peftkit finetune`` runs). peftkit runs at its settings for the machine (``precision``, default auto:
    bf16 where measured faster; ``compile``), and transformers.Trainer in the precision peftkit resolved to
    (``bf16=True`` where that is bf16). Same model (minilm-l6), batch, rows (real SST-2 training rows that each fill
    max_length tokens, so every step has one shape and nothing is padded whatever order either tool draws), steps,
    optimizer (AdamW, same lr / weight decay, linear decay without warmup, clip 1.0) and threads (one by default).
    Each run builds a fresh model outside the clock; the clock spans the training loop, from the start of the first
    optimizer step to the end of the last (neither tool's setup before it, nor peftkit's final checkpoint after
    it). The tools alternate, the first round is a warm-up; medians of the rest. Two rows per method: examples per
    second (wall) and examples per process CPU-second (on a machine shared with other work the wall clock also
    counts time spent waiting for a core).
(b) LoftQ at 4 bits: peft.utils.loftq_utils.loftq_init (bitsandbytes NF4, block 64; it hard-codes a CUDA/XPU
    compute device, so a local wrapper rewrites that device to the weight's own while it runs; site-packages
    untouched) vs peftkit.quant.loftq.loftq_init (NF4, group 64) on the same weight matrices, same rank and
    iterations: relative reconstruction error ||W - (Q + B A)|| / ||W||, median over matrices.
(c) PaFi vs peft's Super-Tuning tuner (smallest |w|, the same trainable fraction): training step time
    (alternating, median) and trainable parameters on the same model and batch.

Beside each timed figure, per contender: wall seconds (``*_seconds``: the training loop of a run in (a), all matrices in
(b), one step in (c); medians where repeated), process CPU seconds over the same span (``*_cpu_seconds``: every
thread of the process, so cpu / wall is about the cores kept busy) and MFU (``*_mfu``) = FLOPs / wall seconds /
matmul_peak_flops of the precision the row trained in (the best of five 1024^2 matmuls here, same threads; fp32
outside (a)). FLOPs = what
torch.utils.flop_counter counts in one training forward + backward of the contender's model on one batch (2·m·n·k
per matmul; elementwise work and the optimizer not counted), times the steps of the span: in (a) the same count for
both tools (the same model and batches). LoftQ (b) is not a training step: its MFU is null; so are the
columns of rows that time nothing (parameter counts).

options (all optional): model, data_root, task, batch_size, max_length, steps, repeats, lr (LoRA), full_lr, methods
(lora, full), precision, compile, lora_r, lora_alpha, loftq_rank, loftq_iters, loftq_matrices, rho, skip (list of
a/b/c), threads (torch.set_num_threads; 1 by default).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Literal, Optional

from peftkit.bench.harness import BenchRows, Clocks, count_step_flops, mfu
from peftkit.paths import glue_root
from peftkit.config.base import BenchSettings, option
from peftkit.config.schema import like_train
from peftkit.utils.env import matmul_peak_flops
from peftkit.utils.registry import BENCHES

QUICK = dict(steps=10, repeats=5, loftq_matrices=12, loftq_iters=1, step_repeats=5)
FULL = dict(steps=40, repeats=7, loftq_matrices=36, loftq_iters=5, step_repeats=10)
DEFAULTS = dict(model="minilm-l6", data_root=None, task="sst2", batch_size=32, max_length=32, lr=1e-3, full_lr=2e-5,
                threads=1, weight_decay=0.01, lora_r=8, lora_alpha=16.0, loftq_rank=16, rho=0.005, seed=42, skip=(),
                methods=("lora", "full"), precision="auto", compile=False)


def settings(quick: bool, options: dict) -> dict:
    s = {**DEFAULTS, **(QUICK if quick else FULL)}
    s.update({k: v for k, v in (options or {}).items() if v is not None})
    for key in ("skip", "methods"):
        if isinstance(s[key], str):
            s[key] = [p.strip() for p in s[key].split(",") if p.strip()]
    return s


# ---- data: fixed-shape rows --------------------------------------------------------------------------
def fixed_length_rows(s: dict, n: int) -> list[dict]:
    """The first ``n`` training rows, tokenized and padded to max_length (every batch has one shape)."""
    from peftkit.models.load import load_tokenizer
    from peftkit.tasks.glue import get_task, load_rows, tokenize_rows

    task = get_task(s["task"])
    tokenizer = load_tokenizer(s["model"])
    rows = tokenize_rows(task, load_rows(task.name, "train", s["data_root"], n), tokenizer, s["max_length"])
    pad = {"input_ids": tokenizer.pad_token_id or 0, "token_type_ids": 0, "attention_mask": 0}
    return [{k: (v + [pad[k]] * (s["max_length"] - len(v)) if k in pad else v) for k, v in r.items()} for r in rows]


# ---- (a) transformers.Trainer vs peftkit's trainer, LoRA and full fine-tuning -----------------------------
def filled_rows(s: dict, n: int) -> list[dict]:
    """``n`` training rows that each fill max_length tokens (longer sentences cut there, shorter ones left out), in
    file order, repeated from the start where the split has fewer: every batch has one shape and no padding, so
    neither tool gains from how it pads or orders rows."""
    from peftkit.errors import UserError
    from peftkit.models.load import load_tokenizer
    from peftkit.tasks.glue import get_task, load_rows, tokenize_rows

    task = get_task(s["task"])
    tokenizer = load_tokenizer(s["model"])
    source = load_rows(task.name, "train", s["data_root"])
    filled = []
    for start in range(0, len(source), 4096):  # tokenize in chunks: most runs need a small part of the split
        tokenized = tokenize_rows(task, source[start : start + 4096], tokenizer, s["max_length"])
        filled += [r for r in tokenized if len(r["input_ids"]) == s["max_length"]]
        if len(filled) >= n:
            break
    if not filled:
        raise UserError(f"bench peers: no {task.name} training row fills max_length={s['max_length']} tokens with "
                        f"{s['model']}'s tokenizer; set a smaller max_length.")
    return [filled[i % len(filled)] for i in range(n)]


def method_model(base, s: dict, name: str):
    """(method, model) of peftkit's method ``name`` ('lora' or 'full') on a copy of ``base``: the one model both
    tools train (transformers.Trainer gets the peft model that peftkit's lora method builds)."""
    from peftkit.methods import create_method

    method = create_method("lora", r=s["lora_r"], alpha=s["lora_alpha"]) if name == "lora" else create_method(name)
    return method, method.prepare(copy.deepcopy(base))


def lora_model(base, s: dict):
    return method_model(base, s, "lora")


def method_lr(s: dict, name: str) -> float:
    return s["lr"] if name == "lora" else s["full_lr"]


class LoopSpan:
    """Wall and process CPU seconds from the start of a run's first optimizer step to the end of its last: the
    training loop, without either tool's setup before it or peftkit's final checkpoint after it."""

    def __init__(self):
        self.start = self.end = None

    def begin(self) -> None:
        if self.start is None:
            self.start = (time.perf_counter(), time.process_time())

    def finish(self) -> None:
        self.end = (time.perf_counter(), time.process_time())

    def clocks(self) -> Clocks:
        spent = Clocks()
        spent.wall, spent.cpu = self.end[0] - self.start[0], self.end[1] - self.start[1]
        return spent


def hf_trainer_run(base, rows: list[dict], s: dict, name: str = "lora", precision: str = "fp32") -> Clocks:
    """The training loop's wall and CPU seconds in ``transformers.Trainer.train()`` for ``steps`` steps (model built
    before the clock), in bf16 autocast (``bf16=True``) where peftkit trains in bf16."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from peftkit.tasks.glue import PadCollator

    span = LoopSpan()

    class Span(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            span.begin()

        def on_step_end(self, args, state, control, **kwargs):
            span.finish()

    _, model = method_model(base, s, name)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=s["steps"], per_device_train_batch_size=s["batch_size"],
                                 learning_rate=method_lr(s, name), weight_decay=s["weight_decay"], warmup_steps=0,
                                 lr_scheduler_type="linear", max_grad_norm=1.0, save_strategy="no",
                                 logging_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
                                 dataloader_num_workers=0, seed=s["seed"], use_cpu=not torch.cuda.is_available(),
                                 bf16=precision == "bf16", fp16=precision == "fp16")
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=PadCollator(0, False),
                          callbacks=[Span()])
        trainer.train()
    return span.clocks()


def peftkit_options(s: dict, name: str):
    from peftkit.config.schema import TrainArgs

    return TrainArgs(max_steps=s["steps"], batch_size=s["batch_size"], lr=method_lr(s, name),
                     weight_decay=s["weight_decay"], warmup_ratio=0.0, schedule="linear", max_grad_norm=1.0,
                     log_every=s["steps"], seed=s["seed"], group_by_length=False, select_best=False,
                     precision=s["precision"], compile=s["compile"])


def peftkit_run(base, rows: list[dict], s: dict, name: str = "lora", precision: str | None = None) -> Clocks:
    """The training loop's wall and CPU seconds in peftkit's ``Trainer.train()`` (what ``peftkit finetune`` runs)
    for ``steps`` steps, at the bench's train.precision and train.compile (``precision``: what that must resolve to,
    the precision the peer was given)."""
    from peftkit.tasks.glue import PadCollator
    from peftkit.train.trainer import Trainer

    method, model = method_model(base, s, name)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, method, peftkit_options(s, name), Path(out), rows, PadCollator(0, False),
                          log=lambda msg: None)
        if precision is not None and trainer.precision != precision:
            raise RuntimeError(f"peftkit resolved precision {trainer.precision}, the peer was given {precision}")
        span, step = LoopSpan(), trainer.optimizer_step

        def timed_step(batches):
            span.begin()
            result = step(batches)
            span.finish()
            return result

        trainer.optimizer_step = timed_step
        trainer.train()
    return span.clocks()


def resolved_precision(base, rows: list[dict], s: dict) -> str:
    """What peftkit's trainer resolves the bench's train.precision to for this model and these rows."""
    from peftkit.train.trainer import matmul_shapes
    from peftkit.utils.env import resolve_precision

    options = peftkit_options(s, "lora")
    shapes = matmul_shapes(base, options, rows) if options.precision == "auto" else None
    return resolve_precision(options.precision, shapes)[0]


def method_step_flops(base, rows: list[dict], s: dict, name: str = "lora") -> int:
    """FLOPs of one training step of the model both tools train, on its first batch (count_step_flops)."""
    from peftkit.tasks.glue import PadCollator

    method, model = method_model(base, s, name)
    model.train()
    return count_step_flops(method, model, PadCollator(0, False)(rows[: s["batch_size"]]))


def lora_step_flops(base, rows: list[dict], s: dict) -> int:
    return method_step_flops(base, rows, s, "lora")


def cost_columns(spans: dict[str, list[Clocks]] | None, flops: dict[str, float | None] | None = None,
                 peak_flops: float | None = None) -> dict:
    """peftkit_/peer_ seconds, cpu_seconds and mfu of a row from the repeated spans of the two contenders ('peftkit'
    and 'peer'): medians of wall and of CPU seconds, MFU = flops / median wall / peak; all None for a row that times
    nothing."""
    columns = {}
    for side in ("peftkit", "peer"):
        timed = (spans or {}).get(side)
        wall = statistics.median(c.wall for c in timed) if timed else None
        columns[f"{side}_seconds"] = wall
        columns[f"{side}_cpu_seconds"] = statistics.median(c.cpu for c in timed) if timed else None
        columns[f"{side}_mfu"] = mfu((flops or {}).get(side), wall, peak_flops)
    return columns


METHOD_LABELS = {"lora": "LoRA", "full": "full fine-tuning"}


def trainer_rows(base, s: dict) -> list[dict]:
    rows = filled_rows(s, s["steps"] * s["batch_size"])
    precision = resolved_precision(base, rows, s)
    peak = matmul_peak_flops(precision if precision in ("bf16", "fp16") else "fp32")
    out = []
    for name in s["methods"]:
        runs = {"peftkit": peftkit_run, "peer": hf_trainer_run}
        times = {side: [] for side in runs}
        for round_ in range(s["repeats"] + 1):  # alternate, rotating who goes first; round 0 warms up
            order = list(runs) if round_ % 2 == 0 else list(runs)[::-1]
            for side in order:
                spent = runs[side](base, rows, s, name, precision)
                print(f"[peers] {name} round {round_} {side}: {spent.wall:.2f} s ({spent.cpu:.2f} s CPU)", flush=True)
                if round_:
                    times[side].append(spent)
        examples = s["steps"] * s["batch_size"]
        per_second = {side: examples / statistics.median(c.wall for c in t) for side, t in times.items()}
        per_cpu = {side: examples / statistics.median(c.cpu for c in t) for side, t in times.items()}
        run_flops = s["steps"] * method_step_flops(base, rows, s, name)
        costs = cost_columns(times, {"peftkit": run_flops, "peer": run_flops}, peak)
        setting = (f"{s['model']}, {s['task']} rows that fill {s['max_length']} tokens, batch {s['batch_size']}, "
                   f"{s['steps']} steps per run (the loop from the first step's start to the last step's end), "
                   f"precision {precision} in both (peftkit train.precision={s['precision']}, transformers "
                   f"bf16={precision == 'bf16'}), peftkit train.compile={s['compile']}, lr {method_lr(s, name)} "
                   f"linear to 0, clip 1.0, median of {s['repeats']} alternating runs")
        label = METHOD_LABELS.get(name, name)
        common = {**costs, "precision": precision, "mfu_peak": f"{precision} matmul", "setting": setting}
        out += [{"comparison": f"{label} training throughput: peftkit trainer vs transformers.Trainer",
                 "peftkit": per_second["peftkit"], "peer": per_second["peer"],
                 "ratio": per_second["peftkit"] / per_second["peer"],
                 "unit": "examples/second of the training loop (higher is better)", **common},
                {"comparison": f"{label} training examples per CPU-second: peftkit trainer vs transformers.Trainer",
                 "peftkit": per_cpu["peftkit"], "peer": per_cpu["peer"], "ratio": per_cpu["peftkit"] / per_cpu["peer"],
                 "unit": "examples per process CPU-second of the training loop (higher is better)", **common}]
    return out


# ---- (b) LoftQ ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def compute_device_rewritten(device):
    """While active, ``.to("cuda"|"xpu")`` on tensors and bitsandbytes Params4bit goes to ``device`` instead.

    peft's loftq_init moves the weight to a hard-coded accelerator; this lets it run where the weight is.
    """
    import torch

    patched = [(torch.Tensor, torch.Tensor.to)]
    try:
        import bitsandbytes as bnb

        patched.append((bnb.nn.Params4bit, bnb.nn.Params4bit.to))
    except ImportError:
        pass

    def redirect(value):
        is_accelerator = isinstance(value, (str, torch.device)) and str(value).split(":")[0] in ("cuda", "xpu")
        return device if is_accelerator else value

    def wrap(original):
        def to(self, *args, **kwargs):
            args = tuple(redirect(a) for a in args)
            if "device" in kwargs:
                kwargs["device"] = redirect(kwargs["device"])
            return original(self, *args, **kwargs)
        return to

    for cls, original in patched:
        cls.to = wrap(original)
    try:
        yield
    finally:
        for cls, original in patched:
            cls.to = original


def peft_loftq(weight, bits: int, rank: int, iters: int):
    """peft's LoftQ of one matrix, run on the weight's own device: (dequantized Q, A, B) with W ~ Q + B A."""
    from peft.utils.loftq_utils import loftq_init

    if weight.device.type in ("cuda", "xpu"):
        return loftq_init(weight, bits, rank, iters)
    with compute_device_rewritten(weight.device):
        return loftq_init(weight, bits, rank, iters)


def peftkit_loftq(weight, bits: int, rank: int, iters: int):
    from peftkit.quant.loftq import loftq_init

    quantized, A, B = loftq_init(weight, bits, 64, rank, 1.0, iters)
    return quantized.dequantize().to(weight.device), A, B


def relative_error(weight, q, A, B) -> float:
    return float((weight - q - B @ A).norm() / weight.norm())


def loftq_rows(base, s: dict) -> list[dict]:
    import torch

    linears = [(n, m) for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "classifier" not in n
               and m.weight.shape[0] % 64 == 0 and m.weight.shape[1] % 64 == 0][: s["loftq_matrices"]]
    errors, spans = {"peftkit": [], "peer": []}, {"peftkit": [], "peer": []}
    for name, module in linears:
        weight = module.weight.detach().float()
        for side, loftq in (("peftkit", peftkit_loftq), ("peer", peft_loftq)):
            with Clocks() as clock:
                q, A, B = loftq(weight, 4, s["loftq_rank"], s["loftq_iters"])
            spans[side].append(clock)
            errors[side].append(relative_error(weight, q, A, B))
    ours, theirs = errors["peftkit"], errors["peer"]
    ratios = [e_ours / e_peer for e_ours, e_peer in zip(ours, theirs)]
    totals = {side: [Clocks.summed(clocks)] for side, clocks in spans.items()}  # all matrices: one span per side
    return [{"comparison": "LoftQ 4-bit reconstruction error: peftkit loftq vs peft loftq_init",
             "peftkit": statistics.median(ours), "peer": statistics.median(theirs),
             "ratio": statistics.median(ratios), "unit": "||W - (Q + BA)|| / ||W||, median over matrices (lower is better)",
             **cost_columns(totals),
             "setting": f"{len(linears)} Linear weights of {s['model']}, NF4 block 64, rank {s['loftq_rank']}, "
                        f"{s['loftq_iters']} iteration(s); ratio range {min(ratios):.4f}..{max(ratios):.4f}"}]


# ---- (c) PaFi vs peft Super-Tuning ---------------------------------------------------------------------
def sparse_rows(base, s: dict) -> list[dict]:

    from peftkit.bench.harness import training_step
    from peftkit.methods import create_method
    from peftkit.models.load import count_parameters
    from peftkit.tasks.glue import PadCollator

    batch = PadCollator(0, False)(fixed_length_rows(s, s["batch_size"]))
    contenders, flops = {}, {}
    for name in ("pafi", "supertuning"):
        method = create_method(name, rho=s["rho"])
        model = method.prepare(copy.deepcopy(base))
        model.train()
        flops[name] = count_step_flops(method, model, batch)
        contenders[name] = (method, model, training_step(method, model, lr=1e-4))
    times = {name: [] for name in contenders}
    for round_ in range(s["step_repeats"] + 1):
        for name, (method, model, step) in contenders.items():
            with Clocks() as spent:
                step(batch)
            if round_:
                times[name].append(spent)
    step = {n: statistics.median(c.wall for c in t) for n, t in times.items()}
    sides = {"peftkit": "pafi", "peer": "supertuning"}
    costs = cost_columns({side: times[name] for side, name in sides.items()},
                         {side: flops[name] for side, name in sides.items()}, matmul_peak_flops("fp32"))
    params = {n: count_parameters(m)[0] for n, (_, m, _) in contenders.items()}
    entries = {n: block_trainable(m) for n, (_, m, _) in contenders.items()}
    setting = (f"{s['model']}, rho {s['rho']} (peft sparsity {1 - s['rho']:.3f}, smallest |w|), batch {s['batch_size']}"
               f" x {s['max_length']}")
    return [{"comparison": "sparse tuning step time: peftkit pafi vs peft supertuning", "peftkit": step["pafi"],
             "peer": step["supertuning"], "ratio": step["pafi"] / step["supertuning"],
             "unit": f"seconds per training step, median of {s['step_repeats']} alternating (lower is better)",
             **costs, "setting": setting},
            {"comparison": "sparse tuning trainable parameters: peftkit pafi vs peft supertuning",
             "peftkit": params["pafi"], "peer": params["supertuning"], "ratio": params["pafi"] / params["supertuning"],
             "unit": "trainable parameters, all (task head and pooler included)", **cost_columns(None),
             "setting": setting},
            {"comparison": "sparse tuning selected entries: peftkit pafi vs peft supertuning",
             "peftkit": entries["pafi"], "peer": entries["supertuning"],
             "ratio": entries["pafi"] / entries["supertuning"],
             "unit": "trainable parameters outside the task head and pooler (the sparse entries)", **cost_columns(None),
             "setting": setting}]


HEAD_MARKERS = ("classifier", "pooler", "score")


def block_trainable(model) -> int:
    """Trainable parameters outside the task head / pooler (each counted once)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen and not any(m in name for m in HEAD_MARKERS):
            seen.add(id(p))
            total += p.numel()
    return total


def supertuning_in_peft() -> bool:
    try:
        from peft import SupertuningConfig  # noqa: F401
    except ImportError:
        return False
    return True


def run(quick: bool, options: dict) -> list[dict]:
    import torch

    from peftkit.models.load import load_model

    s = settings(quick, options)
    s["data_root"] = s["data_root"] or glue_root()
    if s.get("threads"):  # e.g. 1 on a shared machine: oversubscribed thread pools slow every contender
        torch.set_num_threads(int(s["threads"]))
    torch.manual_seed(s["seed"])
    base = load_model(s["model"], "seq_cls", 2)
    notes = [f"{'quick' if quick else 'full'} settings: {s['steps']} steps per trainer run, {s['repeats']} timed "
             f"repeats after 1 warm-up, batch {s['batch_size']} x {s['max_length']}, {torch.get_num_threads()} torch "
             f"thread(s), LoftQ on {s['loftq_matrices']} matrices with {s['loftq_iters']} iteration(s).",
             "ratio = peftkit / peer in the unit of the row."]
    rows = []
    if "a" not in s["skip"]:
        rows += trainer_rows(base, s)
    if "b" not in s["skip"]:
        rows += loftq_rows(base, s)
    if "c" not in s["skip"]:
        if supertuning_in_peft():
            rows += sparse_rows(base, s)
        else:
            notes.append("peft has no Super-Tuning tuner in this version: the PaFi vs supertuning rows are absent.")
    return BenchRows(rows, {"notes": notes, "settings": s})


# ---- settings and registration -----------------------------------------------------------------------

class PeersSettings(BenchSettings):
    model: Optional[str] = option(None, "Model alias or directory (default minilm-l6).", min_length=1)
    data_root: Optional[str] = option(None, "GLUE data root (env PEFTKIT_DATA_DIR).", min_length=1)
    task: Optional[str] = option(None, "GLUE task (sst2).", min_length=1)
    steps: like_train("max_steps") = option(None, "Training steps per contender (quick 10, full 40).")
    repeats: Optional[int] = option(None, "Repeats (quick 5, full 7).", ge=1, le=100_000)
    step_repeats: Optional[int] = option(None, "Timed steps (quick 5, full 10).", ge=1, le=100_000)
    loftq_matrices: Optional[int] = option(None, "Weight matrices LoftQ is compared on (quick 12, full 36).", ge=1, le=100_000)
    loftq_iters: Optional[int] = option(None, "LoftQ alternations (quick 1, full 5).", ge=1, le=1000)
    loftq_rank: Optional[int] = option(None, "LoftQ rank (16).", ge=1, le=65536)
    batch_size: like_train("batch_size") = option(None, "Rows per step (32).")
    max_length: Optional[int] = option(None, "Tokens per row (32).", ge=2, le=1_048_576)
    lr: like_train("lr") = option(None, "LoRA learning rate (1e-3).")
    full_lr: like_train("lr") = option(None, "Full fine-tuning learning rate (2e-5).")
    methods: Optional[list[Literal["lora", "full"]]] = option(None, "Methods the trainers are compared on (lora, full).")
    precision: like_train("precision") = option(None, "peftkit's train.precision; the peer runs in what it resolves to (auto).")
    compile: like_train("compile") = option(None, "peftkit's train.compile (false).")
    weight_decay: like_train("weight_decay") = option(None, "AdamW weight decay (0.01).")
    threads: like_train("threads") = option(None, "torch threads (1: one thread per contender on a shared machine).")
    lora_r: Optional[int] = option(None, "LoRA rank (8).", ge=1, le=65536)
    lora_alpha: Optional[float] = option(None, "LoRA alpha (16).", gt=0, le=1e6)
    rho: Optional[float] = option(None, "Sparse fraction of PaFi and supertuning (0.005).", gt=0, lt=1)
    seed: like_train("seed") = option(None, "Seed (42).")
    skip: Optional[list[str]] = option(None, "Comparisons to skip.")


@BENCHES.register("peers", help="peftkit vs the tools users would pick instead (HF Trainer + peft, peft LoftQ, peft supertuning).")
class PeersBench:
    Settings = PeersSettings
    run = staticmethod(run)
