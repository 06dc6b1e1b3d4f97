"""The cost measurements the benches share: what a saved model, a training forward, a step, an inference
forward and a fresh training process cost.

  stored_bytes              files of a saved model without tokenizer files and peftkit.json;
  saved_tensor_bytes        bytes autograd keeps between forward and backward in one training forward (storages
                            counted once by untyped_storage().data_ptr(), parameter and buffer storages excluded);
  saved_and_step_time       that, and the median seconds of the trainer's own optimizer step, contenders alternating;
  latency_ratios            inference forward (merged where the method can merge) over the unmodified base,
                            interleaved rounds (harness.time_interleaved);
  peak_memory_in_fresh_process   what training steps add to the peak RSS (and on CUDA the peak allocated bytes) of a
                            FRESH interpreter, over its own peak after loading the model and optimizer state and one
                            no-grad forward (docs/benchmarks.md and bench/memory.py say how the RSS peak is reset).
Contenders are named by ``label_of`` (``meft3[num_rev_layers=3]``; ``+gc`` turns on gradient checkpointing).
"""

from __future__ import annotations

import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from peftkit.bench.harness import time_interleaved, training_step


# ---- contenders --------------------------------------------------------------------------------------
def label_of(name: str, options: dict | None) -> str:
    """A row's method label: the name plus its non-default options, e.g. ``meft3[num_rev_layers=3]``."""
    if not options:
        return name
    return name + "[" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + "]"


def parse_label(label: str) -> tuple[str, dict]:
    """(method name with any "+gc", options) of a row label made by ``label_of``."""
    name, _, rest = label.partition("[")
    options = {}
    for item in filter(None, rest.rstrip("]").split(",")):
        key, _, value = item.partition("=")
        options[key] = int(value) if value.lstrip("-").isdigit() else value  # "float" stays a string
    return name, options


def saved_tensor_bytes(model, batch: dict) -> int:
    """Bytes autograd saves for backward in one training forward of ``model(**batch).loss`` (then backward)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def build_model(spec: dict):
    """A sequence classifier: minilm-l6 weights (spec["model"] == "minilm-l6") or a random one from a config."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(spec.get("seed", 0))
    if spec["model"] == "config":
        config = AutoConfig.for_model("bert", **spec["config"], num_labels=2)
        return AutoModelForSequenceClassification.from_config(config)
    from transformers.utils import logging

    from peftkit.models.aliases import resolve_model

    logging.set_verbosity_error()  # the "classifier newly initialised" report is expected
    return AutoModelForSequenceClassification.from_pretrained(resolve_model(spec["model"]), num_labels=2)


def prepare(method_name: str, model, options: dict | None = None):
    """(method plugin, prepared model); ``options`` are the recipe's method section (name excluded). A name ending
    in "+gc" turns on gradient checkpointing, as ``train.gradient_checkpointing`` does in a run."""
    from peftkit.methods import create_method

    method_name, label_options = parse_label(method_name)
    options = {**label_options, **(options or {})}
    name, _, flag = method_name.partition("+")
    method = create_method(name, {k: v for k, v in options.items() if k != "name"})
    with warnings.catch_warnings():  # meft3's "rounding may be amplified" warning: here memory is measured, not grads
        warnings.simplefilter("ignore", UserWarning)
        model = method.prepare(model)
    if flag == "gc":
        method.enable_gradient_checkpointing(model)
    return method, model


def bench_device() -> torch.device:
    """CUDA when there is one (fp32 there too, so that byte counts compare with CPU runs), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def make_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if vocab_size > 2000 else 5, vocab_size, (batch, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids), "labels": torch.randint(0, 2, (batch,), generator=generator)}


def make_optimizer(method, model, materialize: bool = False):
    # foreach=False: no model-sized temporaries in the step, so peak RSS reflects activations
    optimizer = torch.optim.AdamW(method.param_groups(model, 0.01), lr=1e-5, foreach=False)
    if materialize:  # allocate grads and AdamW state now, so that later growth is activation memory
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    return optimizer


def train_step(model, optimizer, batch) -> None:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)


def _maxrss_bytes() -> int:
    """Peak RSS of this process: VmHWM where /proc has it, else ru_maxrss.

    ru_maxrss of a child started by fork+exec never reports less than the parent's RSS at the fork (Linux keeps
    the pre-exec memory map's high-water mark), so a fresh interpreter launched by a big bench process would read
    the parent's size; VmHWM belongs to the child's own memory map only.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def rss_child(spec: dict) -> dict:
    """Runs in a fresh interpreter: baseline peak, then peak over a few training steps."""
    torch.set_num_threads(spec.get("threads", 1))
    device = torch.device(spec.get("device", "cpu"))
    method, model = prepare(spec["method"], build_model(spec).to(device), spec.get("method_options"))
    model.train()
    optimizer = make_optimizer(method, model, materialize=True)
    batch = to_device(make_batch(model.config.vocab_size, spec["batch"], spec["seq"]), device)
    with torch.no_grad():
        model(**batch)
    cuda = device.type == "cuda"
    if cuda:  # on a GPU the memory that matters is the device's: peak allocated over the steps, minus the start
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_baseline = torch.cuda.memory_allocated(device)
    peak_was_reset = _reset_peak_rss()
    baseline = _maxrss_bytes()
    for _ in range(spec["steps"]):
        train_step(model, optimizer, batch)
    result = {"baseline": baseline, "peak": _maxrss_bytes(), "peak_was_reset": peak_was_reset}
    if cuda:
        torch.cuda.synchronize(device)
        result.update(cuda_baseline=cuda_baseline, cuda_peak=torch.cuda.max_memory_allocated(device))
    return result


def _reset_peak_rss() -> bool:
    """Give free heap pages back to the OS, then reset the peak-RSS counter to the current RSS (Linux >= 4.0)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_in_fresh_process(spec: dict, timeout: float = 600) -> dict:
    """What training steps add to a FRESH interpreter's peaks: {"peak_rss_bytes", "peak_cuda_bytes"}.

    ``spec``: model, batch, seq, steps, threads, method, optional method_options and device ("cuda" adds the
    device's peak allocated bytes; None on the CPU)."""
    code = ("import json, sys; from peftkit.bench.costs import rss_child; "
            "print('RSS ' + json.dumps(rss_child(json.loads(sys.argv[1]))))")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MALLOC_MMAP_THRESHOLD_": "262144"}  # tensors > 256 KiB are mmapped: freed memory leaves the RSS
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RSS ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"peak-memory subprocess for {spec['method']} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(lines[-1][4:])
    print(f"[memory]   {spec['method']}: {result}", flush=True)
    cuda = result["cuda_peak"] - result["cuda_baseline"] if "cuda_peak" in result else None
    return {"peak_rss_bytes": result["peak"] - result["baseline"], "peak_cuda_bytes": cuda}


def synchronize(device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: a timer must wait for them
        torch.cuda.synchronize(device)


# ---- the costs of a grid row -------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja", "peftkit.json")


def stored_bytes(final_dir: Path) -> int:
    """Bytes of a saved model without its tokenizer files and peftkit.json: what a user keeps per task."""
    return sum(p.stat().st_size for p in Path(final_dir).rglob("*") if p.is_file() and p.name not in TOKENIZER_FILES)


def real_batch(model: str, task: str, data_root: str | None, size: int, max_length: int) -> dict:
    """The first ``size`` training rows of GLUE ``task``, tokenized and padded as the trainer does."""
    from peftkit.models.load import load_tokenizer
    from peftkit.tasks.glue import PadCollator, get_task, load_rows, tokenize_rows

    t = get_task(task)
    tokenizer = load_tokenizer(model)
    rows = load_rows(task, "train", data_root, size)
    data = tokenize_rows(t, rows, tokenizer, max_length)
    return PadCollator(tokenizer.pad_token_id or 0, t.is_regression)(data)


def build_contenders(recipes: dict[str, dict], base, seed: int) -> dict:
    """name -> (method plugin, prepared model, options) on copies of one base model; ``recipes`` maps each name to
    the recipe (a dict) whose method section it prepares."""
    from peftkit.config.loader import load_recipe
    from peftkit.methods import create_method

    contenders = {}
    for name, raw in recipes.items():
        recipe = load_recipe(raw, [])
        method = create_method(recipe.method_name, recipe.method)
        torch_seed(seed)
        contenders[name] = (method, method.prepare(copy.deepcopy(base)), recipe.method)
    return contenders


def torch_seed(seed: int) -> None:
    torch.manual_seed(seed)


def saved_and_step_time(contenders: dict, batch: dict, repeats: int) -> tuple[dict, dict]:
    saved, times, steps = {}, {n: [] for n in contenders}, {}
    for name, (method, model, _) in contenders.items():
        model.train()
        torch_seed(0)
        saved[name] = saved_tensor_bytes(model, batch)
        steps[name] = training_step(method, model)
    for round_ in range(repeats + 1):  # round 0 is the warm-up; contenders alternate within each round
        for name, (method, model, _) in contenders.items():
            device = next(model.parameters()).device
            synchronize(device)
            start = time.perf_counter()
            steps[name](batch)
            synchronize(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return saved, {n: statistics.median(t) for n, t in times.items()}


def latency_ratios(contenders: dict, base, batch: dict, repeats: int) -> tuple[dict, dict]:
    """method -> latency ratio to the base (merged model where the method can merge); and what was timed."""
    models, kinds = {"base": copy.deepcopy(base).eval()}, {}
    for name, (method, model, _) in contenders.items():
        if method.can_merge:
            models[name], kinds[name] = method.merge(copy.deepcopy(model)).eval(), "merged"
        else:
            models[name], kinds[name] = copy.deepcopy(model).eval(), "unmerged"
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def forward_of(model):
        def forward():
            with torch.inference_mode():
                return model(**inputs).logits
        return forward

    device = next(base.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = time_interleaved({n: forward_of(m) for n, m in models.items()}, repeats, 3, sync)
    return {n: seconds[n] / seconds["base"] for n in contenders}, kinds


def fresh_process_peaks(sections: dict[str, dict], spec: dict) -> dict:
    """name -> {"peak_rss_bytes", "peak_cuda_bytes"}: one fresh interpreter per name, preparing the method section
    (name + options) it maps to; ``spec`` holds the rest of peak_memory_in_fresh_process's spec."""
    peaks = {}
    for row, section in sections.items():
        options = dict(section)
        peaks[row] = peak_memory_in_fresh_process({**spec, "method": options.pop("name"), "method_options": options})
    return peaks
