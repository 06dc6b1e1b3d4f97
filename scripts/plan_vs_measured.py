"""`peftkit plan`'s per-device memory next to what a real training run measures, saved as JSON.

For each (model, method, batch) a FRESH interpreter loads the recipe, records its RSS once everything is imported
(the idle baseline), builds the model exactly as `peftkit finetune` does (task.build_model: the method's own loader,
the packed 2-bit base for apiq), and takes the trainer's own optimizer steps (Trainer.stepper: loss, backward,
clipping, AdamW, schedule) on full-length batches of data.max_length tokens. What it records:

  measured_total_bytes        peak RSS over the steps minus the idle baseline: weights, gradients, optimizer state
                              and activations together (loading transients are left out: the peak counter is reset
                              after the model is built, as bench/costs.py does);
  measured_activation_bytes   peak RSS of steps 2..N minus the RSS after step 1 (weights, gradients and AdamW state
                              all exist by then), plus the gradients, which the trainer frees before each forward:
                              what the memory bench calls training's addition. Where the plan's peak is the end of
                              backward (gradients, not activations: full fine-tuning at a small batch) this is that
                              peak instead, and no activation error is given.

Beside them the plan's figures for the same recipe (peftkit.bench.plan.plan_recipe, from the config alone) and the
relative error of each. Large tensors are mmapped (MALLOC_MMAP_THRESHOLD_) so freed memory leaves the RSS.

  .venv/bin/python scripts/plan_vs_measured.py --out docs/results/plan-vs-measured.json [--quant-dir DIR]
  .venv/bin/python scripts/plan_vs_measured.py --calibrate --out /tmp/plan-calibration.json

--calibrate measures the calibration set instead (random-weight BERT- and LLaMA-shaped models of other widths and
depths, at a batch the validation does not use) from which bench/plan.py's per-method constants were fitted once.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GLUE_RECIPES = {"full": "full-minilm-sst2", "lora": "lora-minilm-sst2", "pafi": "pafi-r0.005-minilm-sst2",
                "meft3": "meft3-minilm-sst2"}
LM_RECIPE = "ft-wikitext2-smollm2-lora"
LM_METHODS = {"full": {"name": "full"}, "lora": {"name": "lora", "r": 64, "alpha": 16, "dropout": 0.0},
              "pafi": {"name": "pafi", "rho": 0.005}, "meft3": {"name": "meft3", "r": 8}}
APIQ_RECIPE = "ft-wikitext2-smollm2-2bit-rtn"
# validation: the models the issue names, at two batch sizes each (max_length 128)
VALIDATION = {"minilm-l6": (8, 32), "smollm2-135m": (2, 8)}
SEQ = 128
STEPS = 3
TOLERANCE = 0.20


def _raw(name: str) -> dict:
    from peftkit.config.loader import resolve_recipe_path
    from peftkit.utils.safe_yaml import load_yaml_bounded

    return dict(load_yaml_bounded(resolve_recipe_path(name).read_text()))


def recipe_for(model: str, method: str, batch: int, quant_dir: str | None = None, model_dir: str | None = None) -> dict:
    """The recipe (a dict) a case trains: the shipped recipe of the method, at ``batch`` x SEQ tokens."""
    if model == "minilm-l6" or (model_dir and "bert" in model):
        raw = copy.deepcopy(_raw(GLUE_RECIPES[method]))
    elif method == "pafi":  # PaFi is wired for classification heads only: the decoder with a classification head
        raw = copy.deepcopy(_raw(GLUE_RECIPES[method]))
        raw["model"] = {"name": model}
    elif method == "apiq":
        raw = copy.deepcopy(_raw(APIQ_RECIPE))
        raw["model"] = {**raw["model"], "name": quant_dir}
    else:
        raw = copy.deepcopy(_raw(LM_RECIPE))
        raw["method"] = dict(LM_METHODS[method])
    if model_dir:
        raw["model"] = {**raw["model"], "name": model_dir}
    raw["data"] = {**raw["data"], "max_length": SEQ}
    raw["train"] = {**raw["train"], "batch_size": batch, "threads": 1}
    return raw


# ---- the fresh process ----------------------------------------------------------------------------------
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _import_what_the_method_uses(recipe, method) -> None:
    """Prepare the method once on a shrunken random copy of the model: what it imports on first use (peft's LoRA
    dispatchers pull in optional quantization backends, ~150 MB of code) belongs to the idle baseline, not to the
    training memory the plan predicts."""
    import gc
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from peftkit.methods import create_method
    from peftkit.models.aliases import resolve_model
    from peftkit.models.structure import shrunken_config

    name = "lora" if recipe.method_name == "apiq" else recipe.method_name  # apiq: LoRA on the packed base
    options = {} if recipe.method_name == "apiq" else recipe.method
    config = shrunken_config(AutoConfig.from_pretrained(resolve_model(recipe.model.name)))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    causal = recipe.model.task_head == "causal_lm"
    small = (AutoModelForCausalLM if causal else AutoModelForSequenceClassification).from_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        create_method(name, options).prepare(small)
    del small
    gc.collect()


def child(raw: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    import peft  # noqa: F401  (imported before the baseline: library code is not what the plan counts)
    import transformers  # noqa: F401

    from peftkit.config.loader import load_recipe
    from peftkit.train.pipeline import create_recipe_method, create_task
    from peftkit.train.trainer import Trainer

    recipe = load_recipe(raw, [])
    task, method = create_task(recipe), create_recipe_method(recipe)
    _import_what_the_method_uses(recipe, method)
    _reset_peak()
    idle = _status("VmRSS")
    model = task.build_model(method, None)
    if recipe.train.gradient_checkpointing or (recipe.train.gradient_checkpointing is None and method.checkpoints_by_default):
        method.enable_gradient_checkpointing(model)
    model.train()
    stepper = Trainer.stepper(model, method, recipe.train)
    batch_size, seq = recipe.train.batch_size, recipe.data.max_length
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (batch_size, seq), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if recipe.model.task_head == "causal_lm":
        batch["labels"] = ids.clone()
    else:
        if getattr(model.config, "type_vocab_size", None):  # BERT's segment ids (a decoder takes none)
            batch["token_type_ids"] = torch.zeros_like(ids)
        batch["labels"] = torch.randint(0, 2, (batch_size,), generator=generator)
    _reset_peak()  # loading transients (the checkpoint read, the dequantizing copy) are not training's
    built = _status("VmRSS")
    stepper.optimizer_step([batch])
    first_peak = _status("VmHWM")
    _reset_peak()
    steady = _status("VmRSS")  # weights, gradients and AdamW state
    for _ in range(STEPS - 1):
        stepper.optimizer_step([batch])
    later_peak = _status("VmHWM")
    return {"idle_rss": idle, "built_rss": built, "steady_rss": steady, "first_peak": first_peak,
            "later_peak": later_peak, "measured_total_bytes": max(first_peak, later_peak) - idle,
            "measured_activation_bytes": later_peak - steady}


def measure(raw: dict, timeout: float = 1800) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MALLOC_MMAP_THRESHOLD_": "262144", "OMP_NUM_THREADS": "1"}
    code = ("import json, sys; sys.path.insert(0, sys.argv[2]); from scripts.plan_vs_measured import child; "
            "print('RESULT ' + json.dumps(child(json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(raw), str(ROOT)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


# ---- the cases -------------------------------------------------------------------------------------------
def validation_cases(quant_dir: str | None) -> list[dict]:
    cases = []
    for model, batches in VALIDATION.items():
        methods = ["full", "lora", "pafi", "meft3"] + (["apiq"] if model == "smollm2-135m" and quant_dir else [])
        for method in methods:
            for batch in batches:
                cases.append({"model": model, "method": method, "batch": batch,
                              "recipe": recipe_for(model, method, batch, quant_dir)})
    return cases


CALIBRATION_CONFIGS = {  # random weights; widths and depths neither validation model has
    "bert-h256-l4": {"model_type": "bert", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                     "intermediate_size": 1024, "vocab_size": 30522, "max_position_embeddings": 512},
    "llama-h192-l6": {"model_type": "llama", "hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3,
                      "num_key_value_heads": 1, "intermediate_size": 512, "vocab_size": 49152,
                      "max_position_embeddings": 2048, "tie_word_embeddings": True},
}
CALIBRATION_BATCH = 16


def calibration_cases(work: Path) -> list[dict]:
    from transformers import AutoConfig, AutoModel

    cases = []
    for name, config in CALIBRATION_CONFIGS.items():
        path = work / name
        if not (path / "config.json").is_file():
            import torch

            torch.manual_seed(0)
            settings = dict(config)
            AutoModel.from_config(AutoConfig.for_model(settings.pop("model_type"), **settings)).save_pretrained(path)
        for method in ("full", "lora", "pafi", "meft3"):
            cases.append({"model": name, "method": method, "batch": CALIBRATION_BATCH,
                          "recipe": recipe_for(name, method, CALIBRATION_BATCH, model_dir=str(path))})
    return cases


def _measured(out: Path) -> list[dict]:
    """The measurements a previous (maybe interrupted) run of this script saved in ``out``: kept, not repeated."""
    if not out.is_file():
        return []
    data = json.loads(out.read_text())
    return data.get("measurements", data.get("rows", []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quant-dir", help="a 2-bit `peftkit quantize` output of smollm2-135m (the apiq rows)")
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--work", default="/tmp/plan-calibration-models")
    parser.add_argument("--only", help="comma-separated model:method filters")
    args = parser.parse_args()
    cases = calibration_cases(Path(args.work)) if args.calibrate else validation_cases(args.quant_dir)
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if f"{c['model']}:{c['method']}" in wanted]
    out = Path(args.out)
    done = _measured(out)
    have = {(r["model"], r["method"], r["batch"]) for r in done}
    rows = list(done)
    for case in cases:
        if (case["model"], case["method"], case["batch"]) in have:
            continue
        print(f"measuring {case['model']} {case['method']} batch {case['batch']}", flush=True)
        start = time.time()
        measured = measure(case["recipe"])
        rows.append({"model": case["model"], "method": case["method"], "batch": case["batch"], "seq": SEQ,
                     "recipe": case["recipe"], "seconds": round(time.time() - start, 1), **measured})
        out.write_text(json.dumps({"measurements": rows}, indent=1))
    from peftkit.bench.harness import machine_info
    from peftkit.bench.plan import plan_recipe
    from peftkit.config.loader import load_recipe

    table = []
    for raw in rows:
        plan = plan_recipe(load_recipe(raw["recipe"], []), device="cpu")
        # the steady RSS the activation figure is measured from holds the previous step's gradients, which the
        # trainer frees before the forward (zero_grad(set_to_none=True)): they come back into the comparison
        activation = raw["measured_activation_bytes"] + plan.bytes_of("gradients")
        # where the plan's peak is the gradients' side (end of backward), steps 2..N peak there too: the figure
        # above is then not the activations', and no activation error is given
        side = ("gradients" if plan.bytes_of("gradients") + plan.facts["tied_gradient_sum_bytes"]
                > plan.bytes_of("activations") + plan.facts["head_gradient_bytes"] else "activations")
        table.append({"model": raw["model"], "method": raw["method"], "batch": raw["batch"], "seq": raw["seq"],
                      "plan_total_bytes": plan.total, "measured_total_bytes": raw["measured_total_bytes"],
                      "total_error": plan.total / raw["measured_total_bytes"] - 1,
                      "plan_activation_bytes": plan.bytes_of("activations"),
                      "measured_activation_bytes": activation,
                      "activation_error": plan.bytes_of("activations") / activation - 1 if side == "activations" else None,
                      "peak_side": side,
                      "plan_weights_bytes": plan.bytes_of("weights") + plan.bytes_of("trainable"),
                      "plan_optimizer_bytes": plan.bytes_of("optimizer state"),
                      "plan_gradient_bytes": plan.bytes_of("gradients"),
                      "trainable_params": plan.facts["trainable_params"]})
    worst = max(abs(r["total_error"]) for r in table)
    result = {"bench": "plan-vs-measured" + ("-calibration" if args.calibrate else ""), "machine": machine_info(),
              "command": "python scripts/plan_vs_measured.py " + " ".join(sys.argv[1:]),
              "tolerance": TOLERANCE, "worst_total_error": worst, "all_within_tolerance": worst <= TOLERANCE,
              "rows": table, "measurements": rows}
    out.write_text(json.dumps(result, indent=1) + "\n")
    for r in table:
        print(f"{r['model']:14s} {r['method']:6s} b{r['batch']:<3d} total plan {r['plan_total_bytes'] / 2**20:8.1f} MiB "
              f"measured {r['measured_total_bytes'] / 2**20:8.1f} ({r['total_error']:+.1%})   activations plan "
              f"{r['plan_activation_bytes'] / 2**20:7.1f} measured {r['measured_activation_bytes'] / 2**20:7.1f} "
              + (f"({r['activation_error']:+.1%})" if r["activation_error"] is not None else "(peak: gradients)"))
    print(f"worst total error {worst:.1%} (tolerance {TOLERANCE:.0%})")


if __name__ == "__main__":
    main()
