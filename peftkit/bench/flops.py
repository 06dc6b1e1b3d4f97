"""FLOPs and step time of one pretraining step: vanilla MLM vs 3ML-self and 3ML-cross.

The claim under test (3ML paper): removing the [MASK]s from the early layers at a 50% masking rate costs
0.78 (RoBERTa-base) / 0.68 (RoBERTa-large) of vanilla RoBERTa pretraining at 15%.

Method (docs/benchmarks.md): random-init RoBERTa shapes built with attn_implementation="eager" (CPU sdpa
kernels have no FLOP formula and would be silently dropped); one fixed batch of random token ids; each
variant gets its own corruption of it (same seed). All variants wrap the SAME RobertaForMaskedLM weights,
so they differ only in where the [MASK]s enter. FLOPs: torch.utils.flop_counter.FlopCounterMode around
forward + backward, compared with the analytic count of peftkit/pretrain/cost.py for the same shapes.
Time: forward + backward, contenders interleaved (each round times every contender once, rotating the
order), median of the rounds after warm-up. The vocabulary head runs on the target positions only in
every variant, the vanilla baseline included (as RoBERTa's original implementation).

Row fields: append_layer = layers that run on the unmasked tokens only before the [MASK]s are appended
(3ml-self; the [MASK]s enter at layer append_layer + 1; 0 for vanilla; all L for 3ml-cross, whose
[MASK]s enter through the decoder); decoder_layers = size of the 3ml-cross decoder.

Options: shapes (list or comma string, default base,large), seq_len (512; --quick 128), batch_size (1),
repeats (5), warmup (1), threads, seed, full_length_layers (list, default [2, 4]), decoder_layers (2),
timing (true; false = count FLOPs only, for shapes too slow to time on a CPU).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import StrictBool

from peftkit.bench.harness import time_interleaved
from peftkit.config.base import BenchSettings, option
from peftkit.config.schema import like_train
from peftkit.utils.registry import BENCHES

PAPER_BUDGET = {"base": 0.78, "large": 0.68}


def _as_list(value, cast=str) -> list:
    if isinstance(value, str):
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return [cast(v) for v in value]
    return [cast(value)]


def contenders(full_length_layers: list[int], decoder_layers: int) -> list[dict]:
    rows = [{"variant": "mlm", "mask_rate": 0.15, "full_length_layers": None, "decoder_layers": None}]
    rows += [{"variant": "3ml-self", "mask_rate": 0.5, "full_length_layers": k, "decoder_layers": None}
             for k in full_length_layers]
    rows.append({"variant": "3ml-cross", "mask_rate": 0.5, "full_length_layers": None, "decoder_layers": decoder_layers})
    return rows


def count_step_flops(model, batch) -> int:
    """FLOPs of forward + backward as counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def analytic_step_flops(model, batch) -> int:
    """The formula of cost.py evaluated on this batch's actual (padded) shapes."""
    from peftkit.pretrain.cost import step_flops

    rows, length = batch["input_ids"].shape
    kept_per_row = (batch["attention_mask"].bool() & ~batch["removed"]).sum(dim=1)
    kept = int(kept_per_row.max()) if model.variant != "mlm" else length
    targets = int((batch["labels"] != -100).sum())
    decoder = len(model.decoder.layers) if model.variant == "3ml-cross" else 0
    return step_flops(model.config, model.variant, rows, length, kept, targets, model.early_layers, decoder)


def measure_shape(shape: str, opts: dict, log=print) -> list[dict]:
    import torch
    from transformers import RobertaForMaskedLM

    from peftkit.pretrain.corruption import corrupt
    from peftkit.pretrain.model import MaskedLMPretrainer
    from peftkit.pretrain.presets import roberta_config

    device = torch.device(opts["device"])
    config = roberta_config(shape, attn_implementation="eager")
    torch.manual_seed(opts["seed"])
    shared = RobertaForMaskedLM(config)
    rows_, length = opts["batch_size"], opts["seq_len"]
    ids = torch.randint(5, config.vocab_size, (rows_, length))
    ids[:, 0], ids[:, -1] = config.bos_token_id, config.eos_token_id
    attention = torch.ones_like(ids)
    specials = [config.bos_token_id, config.pad_token_id, config.eos_token_id, 3, 4]

    models, batches, rows = {}, {}, []
    full_length = [k for k in opts["full_length_layers"] if k <= config.num_hidden_layers]
    for spec in contenders(full_length, opts["decoder_layers"]):
        name = spec["variant"] + (f" (last {spec['full_length_layers']} full)" if spec["full_length_layers"] else "")
        model = MaskedLMPretrainer(config, spec["variant"], spec["full_length_layers"] or 2,
                                   spec["decoder_layers"] or 2, mlm=shared).to(device).train()
        generator = torch.Generator().manual_seed(opts["seed"])
        batch = corrupt(ids, attention, specials, 4, config.vocab_size, spec["mask_rate"], generator=generator).as_batch()
        batch = {k: v.to(device) for k, v in batch.items()}
        models[name], batches[name] = model, batch
        flops = count_step_flops(model, batch)
        analytic = analytic_step_flops(model, batch)
        rows.append({"variant": spec["variant"], "shape": shape, "mask_rate": spec["mask_rate"],
                     "append_layer": model.early_layers, "decoder_layers": spec["decoder_layers"],
                     "seq_len": length, "batch_size": rows_,
                     "masks_removed": int(batch["removed"].sum()), "targets": int((batch["labels"] != -100).sum()),
                     "flops": flops, "analytic_flops": analytic, "analytic_rel_err": flops / analytic - 1,
                     "_name": name})
        log(f"{shape} {name}: {flops / 1e9:.4g} GFLOP/step counted, {analytic / 1e9:.4g} analytic")

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step_of(name):
        def step():
            models[name].zero_grad(set_to_none=True)
            models[name](**batches[name]).loss.backward()
        return step

    if opts["timing"]:
        seconds = time_interleaved({n: step_of(n) for n in models}, opts["repeats"], opts["warmup"], sync)
    else:  # FLOPs only (e.g. large shapes at 512 tokens on a CPU)
        seconds = {n: None for n in models}
    reference = rows[0]
    for row in rows:
        row["step_seconds"] = seconds[row.pop("_name")]
    for row in rows:
        row["flops_ratio"] = row["flops"] / reference["flops"]
        row["time_ratio"] = row["step_seconds"] / reference["step_seconds"] if opts["timing"] else None
        row["paper_budget"] = PAPER_BUDGET.get(shape) if row["variant"] != "mlm" else 1.0
    shared.zero_grad(set_to_none=True)
    return rows


def run(quick: bool, options: dict) -> list[dict]:
    import torch

    opts = {
        "shapes": _as_list(options.get("shapes", "base,large")),
        "seq_len": int(options.get("seq_len", 128 if quick else 512)),
        "batch_size": int(options.get("batch_size", 1)),
        "repeats": int(options.get("repeats", 5)),
        "warmup": int(options.get("warmup", 1)),
        "seed": int(options.get("seed", 0)),
        "full_length_layers": _as_list(options.get("full_length_layers", [2, 4]), int),
        "decoder_layers": int(options.get("decoder_layers", 2)),
        "device": options.get("device", "cuda" if torch.cuda.is_available() else "cpu"),
        "timing": options.get("timing", True) not in (False, "false", 0),
    }
    if options.get("threads"):
        torch.set_num_threads(int(options["threads"]))
    order = ["variant", "shape", "mask_rate", "append_layer", "decoder_layers", "flops", "flops_ratio",
             "step_seconds", "time_ratio", "analytic_flops", "analytic_rel_err", "paper_budget", "masks_removed",
             "targets", "seq_len", "batch_size"]
    rows = []
    for shape in opts["shapes"]:
        rows += [{k: r[k] for k in order} for r in measure_shape(shape, opts)]
    return rows


# ---- settings and registration -----------------------------------------------------------------------

class FlopsSettings(BenchSettings):
    shapes: Optional[list[Literal["tiny", "small", "base", "large"]]] = option(None, "Model shapes (base, large).", min_length=1)
    seq_len: Optional[int] = option(None, "Tokens per row (quick 128, full 512).", ge=8, le=1_048_576)
    batch_size: like_train("batch_size") = option(None, "Rows per step (1).")
    repeats: Optional[int] = option(None, "Timed steps (5).", ge=1, le=100_000)
    warmup: Optional[int] = option(None, "Untimed steps first (1).", ge=0, le=100_000)
    seed: like_train("seed") = option(None, "Seed (0).")
    full_length_layers: Optional[list[int]] = option(None, "3ML-self full-length layers to compare ([2, 4]).", min_length=1)
    decoder_layers: Optional[int] = option(None, "3ML-cross decoder layers (2).", ge=1, le=64)
    device: Optional[Literal["cpu", "cuda"]] = option(None, "Device (cuda when available).")
    timing: Optional[StrictBool] = option(None, "Time the steps (true); false counts FLOPs only.")
    threads: like_train("threads") = option(None, "torch threads (torch's default).")


@BENCHES.register("flops", help="FLOPs and step time of vanilla MLM vs 3ML-self/cross.")
class FlopsBench:
    Settings = FlopsSettings
    run = staticmethod(run)
