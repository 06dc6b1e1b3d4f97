"""peftkit against the tools a user would pick instead, side by side in one process.

Rows: comparison, peftkit, peer, ratio (= peftkit / peer), unit, plus what was held equal.

(a) LoRA training throughput: Hugging Face ``transformers.Trainer`` on a peft LoRA model vs peftkit's trainer
    with its ``lora`` method (what ``peftkit finetune`` runs). Same model (minilm-l6), LoRA options, batch, rows
    (real SST-2 training rows, every row padded to max_length so that every step has the same shape whatever
    order either tool draws), steps, optimizer (AdamW, same lr / weight decay, no warmup, clip 1.0) and threads.
    Each repeat builds a fresh model outside the clock and times the tool's whole ``train()`` call (setup of its
    data loader / optimizer and peftkit's final checkpoint included: what a user waits for); the tools
    alternate, the first round is a warm-up; median of the rest -> examples per second.
(b) LoftQ at 4 bits: peft.utils.loftq_utils.loftq_init (bitsandbytes NF4, block 64; it hard-codes a CUDA/XPU
    compute device, so a local wrapper rewrites that device to the weight's own while it runs; site-packages
    untouched) vs peftkit.quant.loftq.loftq_init (NF4, group 64) on the same weight matrices, same rank and
    iterations: relative reconstruction error ||W - (Q + B A)|| / ||W||, median over matrices.
(c) PaFi vs peft's Super-Tuning tuner (smallest |w|, the same trainable fraction): training step time
    (alternating, median) and trainable parameters on the same model and batch.

Beside each timed figure, per contender: wall seconds (``*_seconds``: a whole train() run in (a), all matrices in
(b), one step in (c); medians where repeated), process CPU seconds over the same span (``*_cpu_seconds``: every
thread of the process, so cpu / wall is about the cores kept busy) and MFU (``*_mfu``) = FLOPs / wall seconds /
matmul_peak_flops("fp32") (the best of five 1024^2 fp32 matmuls here, same threads). FLOPs = what
torch.utils.flop_counter counts in one training forward + backward of the contender's model on one batch (2·m·n·k
per matmul; elementwise work and the optimizer not counted), times the steps of the span: in (a) the same count for
both tools (the same LoRA model and batches), and the wall time includes each tool's setup and peftkit's final
checkpoint, so it is the MFU a user's run gets. LoftQ (b) is not a training step: its MFU is null; so are the
columns of rows that time nothing (parameter counts).

options (all optional): model, data_root, task, batch_size, max_length, steps, repeats, lr, lora_r, lora_alpha,
loftq_rank, loftq_iters, loftq_matrices, rho, skip (list of a/b/c), threads (torch.set_num_threads).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
from pathlib import Path
from typing import Optional

from peftkit.bench.harness import BenchRows, Clocks, count_step_flops, mfu
from peftkit.paths import glue_root
from peftkit.config.base import BenchSettings, option
from peftkit.config.schema import like_train
from peftkit.utils.env import matmul_peak_flops
from peftkit.utils.registry import BENCHES

QUICK = dict(steps=10, repeats=5, loftq_matrices=12, loftq_iters=1, step_repeats=5)
FULL = dict(steps=40, repeats=7, loftq_matrices=36, loftq_iters=5, step_repeats=10)
DEFAULTS = dict(model="minilm-l6", data_root=None, task="sst2", batch_size=16, max_length=64, lr=1e-3,
                threads=None, weight_decay=0.01, lora_r=8, lora_alpha=16.0, loftq_rank=16, rho=0.005, seed=42, skip=())


def settings(quick: bool, options: dict) -> dict:
    s = {**DEFAULTS, **(QUICK if quick else FULL)}
    s.update({k: v for k, v in (options or {}).items() if v is not None})
    if isinstance(s["skip"], str):
        s["skip"] = [p.strip() for p in s["skip"].split(",") if p.strip()]
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


# ---- (a) HF Trainer + peft LoRA vs peftkit LoRA -------------------------------------------------------
def lora_model(base, s: dict):
    from peftkit.methods import create_method

    method = create_method("lora", r=s["lora_r"], alpha=s["lora_alpha"])
    return method, method.prepare(copy.deepcopy(base))


def hf_trainer_run(base, rows: list[dict], s: dict) -> Clocks:
    """Wall and CPU seconds of ``transformers.Trainer.train()`` for ``steps`` steps (model built before the clock)."""
    import torch
    from transformers import Trainer, TrainingArguments

    from peftkit.tasks.glue import PadCollator

    _, model = lora_model(base, s)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=s["steps"], per_device_train_batch_size=s["batch_size"],
                                 learning_rate=s["lr"], weight_decay=s["weight_decay"], warmup_steps=0,
                                 lr_scheduler_type="linear", max_grad_norm=1.0, save_strategy="no",
                                 logging_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
                                 dataloader_num_workers=0, seed=s["seed"], use_cpu=not torch.cuda.is_available())
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=PadCollator(0, False))
        with Clocks() as spent:
            trainer.train()
        return spent


def peftkit_run(base, rows: list[dict], s: dict) -> Clocks:
    """Wall and CPU seconds of peftkit's ``Trainer.train()`` (what ``peftkit finetune`` runs) for ``steps`` steps."""
    from peftkit.config.schema import TrainArgs
    from peftkit.tasks.glue import PadCollator
    from peftkit.train.trainer import Trainer

    method, model = lora_model(base, s)
    options = TrainArgs(max_steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"],
                           weight_decay=s["weight_decay"], warmup_ratio=0.0, schedule="linear", max_grad_norm=1.0,
                           log_every=s["steps"], seed=s["seed"], group_by_length=False, select_best=False)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, method, options, Path(out), rows, PadCollator(0, False), log=lambda msg: None)
        with Clocks() as spent:
            trainer.train()
        return spent


def lora_step_flops(base, rows: list[dict], s: dict) -> int:
    """FLOPs of one training step of the LoRA model both tools train, on its first batch (count_step_flops)."""
    from peftkit.tasks.glue import PadCollator

    method, model = lora_model(base, s)
    model.train()
    return count_step_flops(method, model, PadCollator(0, False)(rows[: s["batch_size"]]))


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


def trainer_rows(base, s: dict) -> list[dict]:
    rows = fixed_length_rows(s, s["steps"] * s["batch_size"])
    runs = {"peftkit": peftkit_run, "hf": hf_trainer_run}
    times = {name: [] for name in runs}
    for round_ in range(s["repeats"] + 1):  # alternate, rotating who goes first; round 0 warms up
        order = list(runs) if round_ % 2 == 0 else list(runs)[::-1]
        for name in order:
            spent = runs[name](base, rows, s)
            print(f"[peers] round {round_} {name}: {spent.wall:.2f} s ({spent.cpu:.2f} s CPU)", flush=True)
            if round_:
                times[name].append(spent)
    examples = s["steps"] * s["batch_size"]
    speed = {name: examples / statistics.median(c.wall for c in t) for name, t in times.items()}
    run_flops = s["steps"] * lora_step_flops(base, rows, s)
    return [{"comparison": "LoRA training throughput: peftkit trainer vs transformers.Trainer + peft",
             "peftkit": speed["peftkit"], "peer": speed["hf"], "ratio": speed["peftkit"] / speed["hf"],
             "unit": "examples/second (higher is better)",
             **cost_columns({"peftkit": times["peftkit"], "peer": times["hf"]},
                            {"peftkit": run_flops, "peer": run_flops}, matmul_peak_flops("fp32")),
             "setting": f"{s['model']}, {s['task']} rows, batch {s['batch_size']} x {s['max_length']} tokens, "
                        f"{s['steps']} steps per run, median of {s['repeats']} alternating runs"}]


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
    batch_size: like_train("batch_size") = option(None, "Rows per step (16).")
    max_length: Optional[int] = option(None, "Tokens per row (64).", ge=2, le=1_048_576)
    lr: like_train("lr") = option(None, "Learning rate (1e-3).")
    weight_decay: like_train("weight_decay") = option(None, "AdamW weight decay (0.01).")
    threads: like_train("threads") = option(None, "torch threads.")
    lora_r: Optional[int] = option(None, "LoRA rank (8).", ge=1, le=65536)
    lora_alpha: Optional[float] = option(None, "LoRA alpha (16).", gt=0, le=1e6)
    rho: Optional[float] = option(None, "Sparse fraction of PaFi and supertuning (0.005).", gt=0, lt=1)
    seed: like_train("seed") = option(None, "Seed (42).")
    skip: Optional[list[str]] = option(None, "Comparisons to skip.")


@BENCHES.register("peers", help="peftkit vs the tools users would pick instead (HF Trainer + peft, peft LoftQ, peft supertuning).")
class PeersBench:
    Settings = PeersSettings
    run = staticmethod(run)
