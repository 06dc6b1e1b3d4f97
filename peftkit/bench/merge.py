"""Merge bench: LoRA fine-tuned on a quantized base (apiq runs), merged four ways and compared with the unmerged model.

For every run in ``runs`` (a finished apiq run on a GPTQ-packed or NF4 `peftkit quantize` output), one row each:
  unmerged     the run as trained: the packed base plus its LoRA (peftkit's PackedLinear + peft LoRA)
  naive        dequant(W) + s B A rounded back onto the base's grid (peftkit/quant/merge.py)
  blockwise    re-quantized block by block against the unmerged model's outputs, not tuned end to end
  calibrated   the block-wise merge with its scales and norms then tuned end to end against the unmerged model's
               next-token distributions (the export's default)
  float        the LoRA folded into the unpacked weights, full precision (``--merge-mode float``)
Columns: WikiText-2 test perplexity (non-overlapping windows), its ratio to the unmerged model's, the stored model
bytes (tensors as written: packed codes, fp16 scales and the fp16 rest; unmerged adds the adapter; float is the
float32 model the float merge writes), the per-token latency of greedy generation with the KV cache (prompt of
``gen_prompt`` tokens, ``gen_tokens`` new ones; the low-bit models run on peftkit's packed runtime, which unpacks
each weight per matmul) and its ratio to the unmerged model's, timed interleaved, and the merge's seconds.
The calibration windows come from each run's own training text (``calib`` train) or WikiText-2's wiki.valid.tokens.

options (all optional but ``runs``): runs, calib, calib_windows, calib_seq_len, tune_windows, tune_epochs, tune_lr,
ppl_windows, ppl_seq_len, gen_prompt, gen_tokens, gen_repeats, modes.
"""

from __future__ import annotations

import time
from typing import Literal, Optional

from peftkit.config.base import BenchSettings, option
from peftkit.errors import UserError
from peftkit.utils.registry import BENCHES

QUICK = dict(calib_windows=8, calib_seq_len=256, tune_windows=64, tune_epochs=4, ppl_windows=8, ppl_seq_len=256,
             gen_prompt=32, gen_tokens=16, gen_repeats=3)
FULL = dict(calib_windows=16, calib_seq_len=256, tune_windows=64, tune_epochs=4, ppl_windows=40, ppl_seq_len=256,
            gen_prompt=64, gen_tokens=32, gen_repeats=5)
MODES = ("unmerged", "naive", "blockwise", "calibrated", "float")


def _settings(quick: bool, options: dict) -> dict:
    s = dict(QUICK if quick else FULL)
    s.update(calib="train", modes=list(MODES), runs=None)
    s.update({k: v for k, v in (options or {}).items() if v is not None})
    if not s["runs"]:
        raise UserError("bench merge needs runs: --set runs=RUN[,RUN...] (finished apiq runs, LoRA fine-tuned on a "
                        "`peftkit quantize` output; scripts/merge_smollm2_runs.sh makes the smollm2 ones).")
    return s


def _file_bytes(directory, names=("model.safetensors", "adapter_model.safetensors")) -> int:
    from pathlib import Path

    from safetensors import safe_open

    total = 0
    for name in names:
        path = Path(directory) / name
        if not path.is_file():
            continue
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                n = 1
                for d in t.get_shape():
                    n *= d
                total += n * {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "U8": 1, "I64": 8}[t.get_dtype()]
    return total


def _per_token_seconds(models: dict, prompt, new_tokens: int, repeats: int) -> dict:
    import torch

    from peftkit.bench.harness import time_interleaved

    def generate(model):
        def go():
            with torch.inference_mode():
                model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, use_cache=True, pad_token_id=0)
        return go

    times = time_interleaved({name: generate(m) for name, m in models.items()}, repeats, 1, lambda: None)
    return {name: t / new_tokens for name, t in times.items()}


def run(quick: bool, options: dict) -> list[dict]:
    import copy
    import tempfile
    from pathlib import Path

    from peftkit.artifacts.load import final_dir, load_run
    from peftkit.artifacts.lowbit_merge import MergeRequest, calibration_windows, quantized_base_of
    from peftkit.methods import create_method
    from peftkit.paths import wikitext_root
    from peftkit.quant.checkpoint import load_quantized_base
    from peftkit.quant.merge import MergeSettings, merge_lowbit, save_merged, tune_end_to_end
    from peftkit.tasks.causal_lm import perplexity_of_windows
    from peftkit.utils.text_windows import TEST_FILE, consecutive_windows, read_text, token_ids

    s = _settings(quick, options)
    rows = []
    for run_dir in s["runs"]:
        model, tokenizer, info = load_run(run_dir)
        base_dir, quant = quantized_base_of(info) if info is not None else (None, None)
        if base_dir is None or quant.get("storage") not in ("gptq", "bitsandbytes"):
            raise UserError(f"bench merge: {run_dir} is not an apiq run on a GPTQ-packed or NF4 `peftkit quantize` "
                            f"output; give runs of `peftkit finetune` with method apiq.")
        test_ids = token_ids(tokenizer, read_text(Path(wikitext_root()) / TEST_FILE))
        ppl_windows = consecutive_windows(test_ids, s["ppl_seq_len"], s["ppl_windows"])
        prompt = test_ids[-s["gen_prompt"]:][None]
        request = MergeRequest(calib=s["calib"], windows=s["calib_windows"], seq_len=s["calib_seq_len"],
                               tune_windows=s["tune_windows"], tune_epochs=s["tune_epochs"])
        windows = calibration_windows(final_dir(run_dir), info, tokenizer, request)
        described = windows.described
        base_bytes = _file_bytes(base_dir, ("model.safetensors",))
        common = {"run": str(run_dir), "bits": quant["bits"], "group_size": quant["group_size"],
                  "storage": quant["storage"], "base_method": quant["method"],
                  "calibration": f"{described['windows']} x {described['seq_len']} tokens of {described['text']}",
                  "base_model_bytes": base_bytes}
        models, found = {"unmerged": model}, {"unmerged": {"model_bytes": _file_bytes(final_dir(run_dir)) + base_bytes,
                                                           "seconds": 0.0}}
        with tempfile.TemporaryDirectory(prefix="peftkit-merge-bench-") as scratch:
            def keep(mode, result, seconds):
                out = Path(scratch) / mode
                out.mkdir()
                save_merged(out, base_dir, result, {"mode": mode})
                models[mode] = load_quantized_base(out)
                chosen = result.blocks_chosen()
                found[mode] = {"model_bytes": _file_bytes(out, ("model.safetensors",)), "seconds": round(seconds, 1),
                               "blocks_chosen": chosen}
                print(f"{Path(run_dir).name} {mode}: merged in {seconds:.0f} s ({chosen})", flush=True)

            def log(line):
                print(f"  {line}", flush=True)

            symmetric = bool(quant.get("symmetric"))
            if "naive" in s["modes"]:
                result = merge_lowbit(model, windows.calib, MergeSettings(mode="naive"), symmetric, log=log)
                keep("naive", result, result.seconds)
            if {"blockwise", "calibrated"} & set(s["modes"]):
                settings = MergeSettings(mode="calibrated", tune_epochs=s["tune_epochs"], tune_lr=s.get("tune_lr"))
                result = merge_lowbit(model, windows.calib, settings, symmetric, log=log)
                if "blockwise" in s["modes"]:
                    keep("blockwise", result, result.seconds)
                if "calibrated" in s["modes"]:
                    if windows.tune is not None:  # the same block-wise merge, then tuned as the export tunes it
                        result.tuning = tune_end_to_end(model, result, windows.tune, windows.check, settings, log)
                    keep("calibrated", result, result.seconds + (result.tuning or {}).get("seconds", 0.0))
                    found["calibrated"]["tuning"] = result.tuning
            if "float" in s["modes"]:
                start = time.perf_counter()
                floated = create_method(info.method, info.options).merge(copy.deepcopy(model)).eval()
                state = floated.state_dict()
                found["float"] = {"model_bytes": sum({t.untyped_storage().data_ptr(): t.numel() * t.element_size()
                                                      for t in state.values()}.values()),
                                  "seconds": round(time.perf_counter() - start, 1)}
                models["float"] = floated
            seconds = _per_token_seconds(models, prompt, s["gen_tokens"], s["gen_repeats"])
            ppl = {name: perplexity_of_windows(m, ppl_windows)["ppl"] for name, m in models.items()}
        for name in models:
            row = {**common, "merge": name, "ppl": ppl[name], "ppl_vs_unmerged": ppl[name] / ppl["unmerged"],
                   **found[name], "ms_per_token": round(1000 * seconds[name], 3),
                   "latency_vs_unmerged": seconds[name] / seconds["unmerged"],
                   "ppl_windows": f"{s['ppl_windows']} x {s['ppl_seq_len']}"}
            rows.append(row)
            print(f"{Path(run_dir).name} {quant['bits']}-bit {name}: ppl {row['ppl']:.4g} "
                  f"({row['ppl_vs_unmerged']:.3f}x unmerged), {row['model_bytes']:,} bytes, "
                  f"{row['ms_per_token']:.2f} ms/token", flush=True)
        del models, model
    notes = ["unmerged = the packed base plus its LoRA; naive = W' rounded onto the base's grid; blockwise = "
             "re-quantized block by block against the unmerged model's outputs; calibrated = the export's default "
             "merge: the blockwise one with its scales and norms tuned end to end; float = the LoRA folded into "
             "float32 weights. ppl: WikiText-2 test windows; ms_per_token: greedy generation with the KV cache, "
             "timed interleaved, on peftkit's packed runtime for the low-bit rows."]
    if any("smollm2" in str(r.get("run", "")) for r in rows):
        notes.append("smollm2-135m's weights are a Q4_1 GGUF: every bit width here is a re-quantization of a 4.5-bit "
                     "model, and its float merge is the dequantized Q4_1 model plus the LoRA.")
    from peftkit.bench.harness import BenchRows

    return BenchRows(rows, {"notes": notes})


class MergeBenchSettings(BenchSettings):
    runs: Optional[list[str]] = option(None, "Finished apiq runs (LoRA on a GPTQ-packed or NF4 quantize output).",
                                       min_length=1)
    calib: Optional[Literal["train", "wikitext2"]] = option(None, "Calibration text: each run's own (train) or "
                                                                  "WikiText-2's wiki.valid.tokens.")
    calib_windows: Optional[int] = option(None, "Calibration windows (quick 8, full 16).", ge=1, le=1_000_000)
    calib_seq_len: Optional[int] = option(None, "Tokens per calibration window (256).", ge=2, le=1_048_576)
    tune_windows: Optional[int] = option(None, "Windows of the calibrated merge's end-to-end tuning (64).", ge=1,
                                         le=1_000_000)
    tune_epochs: Optional[int] = option(None, "Epochs of that tuning (4; 0: the calibrated row is the block-wise one).",
                                        ge=0, le=1000)
    tune_lr: Optional[float] = option(None, "Learning rate of that tuning (1e-3 at 4 bits and more, 3e-3 below).",
                                      gt=0, lt=1)
    ppl_windows: Optional[int] = option(None, "WikiText-2 test windows of the perplexity (quick 8, full 40).", ge=1,
                                        le=1_000_000)
    ppl_seq_len: Optional[int] = option(None, "Tokens per perplexity window (256).", ge=2, le=1_048_576)
    gen_prompt: Optional[int] = option(None, "Prompt tokens of the latency's generation (quick 32, full 64).", ge=1,
                                       le=1_048_576)
    gen_tokens: Optional[int] = option(None, "Generated tokens per timing (quick 16, full 32).", ge=1, le=1_048_576)
    gen_repeats: Optional[int] = option(None, "Timed generations per model, interleaved (quick 3, full 5).", ge=1,
                                        le=1000)
    modes: Optional[list[Literal["unmerged", "naive", "blockwise", "calibrated", "float"]]] = option(
        None, "Rows to measure (all five).", min_length=1)


@BENCHES.register("merge", help="LoRA on a quantized base merged naive / blockwise / calibrated / float vs "
                                "unmerged: ppl, bytes, per-token latency.")
class MergeBench:
    Settings = MergeBenchSettings
    run = staticmethod(run)
