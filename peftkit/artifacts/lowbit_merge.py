"""``peftkit export RUN --merge`` for LoRA on a quantized base (method apiq): the merged model stays low-bit.

The merge itself is peftkit/quant/merge.py; this file decides what a run's export merges into, finds the
calibration text, writes the merged directory (a plain GPTQ or bitsandbytes NF4 checkpoint, no adapter), measures
the quality change on held-out windows of the same text and adds the merge section of the model card.

Merge modes (``--merge-mode``):
  calibrated  re-quantized to the base's bits and group size, calibrated block by block against the unmerged model's
              outputs, then its scales and norms tuned end to end against the unmerged model's next-token
              distributions (the default for a GPTQ-packed or NF4 base)
  naive       dequant(W) + s B A rounded back onto the base's grid (for comparison)
  float       the LoRA folded into the unpacked weights: a full-precision model of the base architecture
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import UserError

MERGE_MODES = ("calibrated", "naive", "float")
CALIB_SOURCES = ("train", "wikitext2")
DEFAULT_WINDOWS, DEFAULT_SEQ_LEN = 8, 256
DEFAULT_TUNE_WINDOWS, DEFAULT_TUNE_EPOCHS = 64, 4
CANDIDATE_WORDS = {"naive": "naive rounding onto the base's grid", "fresh": "fresh min/max (NF: absmax) rounding",
                   "gptq": "GPTQ", "clip": "clipping search", "round": "learned rounding"}
HELD_OUT = 4  # windows after the calibration ones, for the measured quality change
CHECK = 4  # windows after the tuning ones: the end-to-end tuning keeps its best epoch on them
LOWBIT_STORAGE = ("gptq", "bitsandbytes")


@dataclass
class MergeRequest:
    """What the user asked of the merge; None = not given (the defaults below apply)."""

    mode: str | None = None
    calib: str | None = None
    windows: int | None = None
    seq_len: int | None = None
    tune_windows: int | None = None
    tune_epochs: int | None = None
    tune_lr: float | None = None

    def given(self) -> list[str]:
        flags = {"mode": "--merge-mode", "calib": "--calib", "windows": "--calib-windows", "seq_len": "--calib-len",
                 "tune_windows": "--tune-windows", "tune_epochs": "--tune-epochs", "tune_lr": "--tune-lr"}
        return [flag for key, flag in flags.items() if getattr(self, key) is not None]


def quantized_base_of(info) -> tuple[Path | None, dict | None]:
    """(the quantize output directory a run fine-tuned, its quantization.json) or (None, None)."""
    from peftkit.models.aliases import resolve_model
    from peftkit.quant.checkpoint import is_quantized_dir, read_info

    path = Path(resolve_model(info.model["name"]))
    if info.method != "apiq" or not is_quantized_dir(path):
        return None, None
    return path, read_info(path)


def resolve_mode(method, info, merge: bool | None, request: MergeRequest) -> str | None:
    """The merge mode of this export (None: not merged), or a UserError for a request that does not fit the run."""
    if request.mode is not None and request.mode not in MERGE_MODES:
        raise UserError(f"--merge-mode {request.mode!r} is not one of {', '.join(MERGE_MODES)}.")
    if request.calib is not None and request.calib not in CALIB_SOURCES:
        raise UserError(f"--calib {request.calib!r} is not one of {', '.join(CALIB_SOURCES)} (train = the run's own "
                        f"training text, wikitext2 = WikiText-2's {'wiki.valid.tokens'}).")
    for flag, value in (("--calib-windows", request.windows), ("--calib-len", request.seq_len),
                        ("--tune-windows", request.tune_windows)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value} must be at least 1.")
    if request.tune_epochs is not None and request.tune_epochs < 0:
        raise UserError(f"--tune-epochs {request.tune_epochs} must be 0 (no end-to-end tuning) or more.")
    if request.tune_lr is not None and not 0 < request.tune_lr < 1:
        raise UserError(f"--tune-lr {request.tune_lr} must lie between 0 and 1 (default: 1e-3 at 4 bits and more, 3e-3 "
                        f"below).")
    if merge is False:
        if request.given():
            raise UserError(f"{', '.join(request.given())} only apply to a merged export, and --no-merge was given. "
                            f"Drop them, or drop --no-merge.")
        return None
    if not method.can_merge:
        return None  # export_format refuses it with its own words
    base_dir, quant = quantized_base_of(info)
    if base_dir is None:
        if request.given():
            raise UserError(f"{', '.join(request.given())} choose how LoRA merges into a quantized base (method apiq, "
                            f"a `peftkit quantize` output); this is a {info.method} run on {info.model['name']}, which "
                            f"merges into its full-precision weights. Drop them.")
        return None
    lowbit = quant.get("storage") in LOWBIT_STORAGE
    mode = request.mode or ("calibrated" if lowbit else "float")
    if mode != "float" and not lowbit:
        why = ("it is not quantized (bits null)" if quant.get("bits") is None else
               f"its {quant.get('bits')}-bit {quant.get('method')} codes are stored in peftkit's own {quant.get('storage')} "
               f"layout, which neither transformers nor bitsandbytes loads")
        raise UserError(f"--merge-mode {mode}: the base of this run ({base_dir}) has no low-bit form outside peftkit: "
                        f"{why}. Export with --merge-mode float (a full-precision model) or --no-merge (the adapter "
                        f"next to its quantized base).")
    if mode == "float" and any(f != "--merge-mode" for f in request.given()):
        raise UserError(f"{', '.join(f for f in request.given() if f != '--merge-mode')}: a float merge reads no "
                        f"calibration text (it folds the LoRA into the unpacked weights). Drop them, or choose "
                        f"--merge-mode calibrated.")
    tuning = [f for f in request.given() if f.startswith("--tune-")]
    if mode == "naive" and tuning:
        raise UserError(f"{', '.join(tuning)}: the naive merge rounds onto the base's grid without tuning anything. "
                        f"Drop them, or choose --merge-mode calibrated.")
    return mode


# ---- calibration text -----------------------------------------------------------------------------------------

def _run_recipe(directory: Path) -> dict:
    """The run's recipe (config.yaml beside final/), or {} when the run directory does not hold one."""
    import yaml

    for candidate in (directory / "config.yaml", directory.parent / "config.yaml"):
        if candidate.is_file():
            try:
                data = yaml.safe_load(candidate.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def calibration_text(directory: Path, info, source: str) -> tuple[str, str]:
    """(text, where it came from) for ``source``: the run's own training text or WikiText-2's wiki.valid.tokens."""
    from peftkit.paths import WIKITEXT_TRAIN, wikitext_root

    data = (_run_recipe(directory).get("data") or {})
    if source == "wikitext2" or info.task == "wikitext2":
        root = Path(data.get("root") or wikitext_root()).expanduser() if source == "train" else Path(wikitext_root())
        path = root / WIKITEXT_TRAIN
        if not path.is_file():
            raise UserError(f"the calibration text {path} does not exist. Set env PEFTKIT_WIKITEXT to the directory "
                            f"holding {WIKITEXT_TRAIN}.")
        return path.read_text(encoding="utf-8"), str(path)
    kind = info.get("task_type")
    train_file = data.get("train_file")
    if kind not in ("causal-lm", "sft") or not train_file:
        raise UserError(f"{directory}: the run's own training text cannot be read for calibration (a {kind or info.task} "
                        f"run{'' if train_file else ' without data.train_file in its config.yaml'}). Calibrate on "
                        f"WikiText-2 instead: --calib wikitext2.")
    from peftkit.tasks.tabular import read_file, texts

    table = read_file(train_file)
    if kind == "sft":
        prompt, response = data.get("prompt_column") or "prompt", data.get("response_column") or "response"
        rows = [f"{p}\n{r}" for p, r in zip(texts(table, prompt), texts(table, response))]
    else:
        rows = texts(table, (info.get("text_columns") or ["text"])[0])
    return "\n\n".join(rows), str(train_file)


@dataclass
class MergeWindows:
    """Token windows of the calibration text, each drawn for one use: ``calib`` (block by block), ``held`` (the
    measured quality change), ``tune`` (end to end) and ``check`` (the tuning's choice of epoch)."""

    calib: object
    held: object
    tune: object
    check: object
    described: dict


def calibration_windows(directory: Path, info, tokenizer, request: MergeRequest) -> MergeWindows:
    """The windows of the requested text (the run's own training text or WikiText-2's wiki.valid.tokens)."""
    from peftkit.utils.text_windows import random_windows, token_ids

    source = request.calib or "train"
    n, seq_len = request.windows or DEFAULT_WINDOWS, request.seq_len or DEFAULT_SEQ_LEN
    tune = DEFAULT_TUNE_WINDOWS if request.tune_windows is None else request.tune_windows
    epochs = DEFAULT_TUNE_EPOCHS if request.tune_epochs is None else request.tune_epochs
    tune = tune if epochs > 0 else 0
    text, where = calibration_text(directory, info, source)
    ids = token_ids(tokenizer, text)
    if ids.numel() <= seq_len:
        raise UserError(f"the calibration text {where} has {ids.numel()} tokens, not enough for one window of "
                        f"--calib-len {seq_len}; lower --calib-len or use --calib wikitext2.")
    # one seeded draw, cut in order: the calibration and held-out windows are those of a draw without tuning
    windows = random_windows(ids, n + HELD_OUT + (tune + CHECK if tune else 0), seq_len, seed=0)
    cut = [n, n + HELD_OUT, n + HELD_OUT + tune]
    return MergeWindows(windows[:cut[0]], windows[cut[0]:cut[1]], windows[cut[1]:cut[2]] if tune else None,
                        windows[cut[2]:] if tune else None,
                        {"source": source, "text": where, "windows": n, "seq_len": seq_len,
                         "held_out_windows": HELD_OUT, "tune_windows": tune, "tune_epochs": epochs,
                         "check_windows": CHECK if tune else 0})


# ---- the merged export ------------------------------------------------------------------------------------------

def perplexity(model, windows) -> float:
    from peftkit.tasks.causal_lm import perplexity_of_windows

    return perplexity_of_windows(model, windows)["ppl"]


def write_lowbit_merge(directory: Path, out: Path, info, model, tokenizer, mode: str, request: MergeRequest,
                       log=print) -> dict:
    """Merge ``model`` (the run loaded by its method: LoRA on the packed base) into low-bit weights in ``out``;
    returns the merge record (also in out/quantization.json and the export's stored numbers)."""
    from peftkit.quant.checkpoint import load_quantized_base
    from peftkit.quant.merge import MergeSettings, merge_lowbit, save_merged

    if info.model.get("task_head") != "causal_lm":
        raise UserError(f"--merge-mode {mode}: low-bit merging calibrates a causal LM on text; this run has a "
                        f"{info.model.get('task_head')} head. Export with --merge-mode float or --no-merge.")
    base_dir, quant = quantized_base_of(info)
    windows = calibration_windows(directory, info, tokenizer, request)
    described, held = windows.described, windows.held
    settings = MergeSettings(mode=mode, seed=0, tune_epochs=described["tune_epochs"], tune_lr=request.tune_lr)
    result = merge_lowbit(model, windows.calib, settings, symmetric=bool(quant.get("symmetric")), log=log,
                          tune_ids=windows.tune, check_ids=windows.check)
    chosen = result.blocks_chosen()
    record = {"mode": mode, "bits": quant["bits"], "group_size": quant["group_size"], "storage": quant["storage"],
              "base_method": quant["method"], "calibration": described, "seconds": round(result.seconds, 1),
              "blocks_chosen": chosen, "blocks": result.blocks, "tuning": result.tuning}
    save_merged(out, base_dir, result, record)
    merged = load_quantized_base(out)
    ppl_unmerged, ppl_merged = perplexity(model, held), perplexity(merged, held)
    record["quality"] = {"ppl_unmerged": ppl_unmerged, "ppl_merged": ppl_merged,
                         "ppl_change": ppl_merged / ppl_unmerged - 1,
                         "measured_on": f"{HELD_OUT} windows of {described['seq_len']} tokens of {described['text']} "
                                        f"that the calibration did not use"}
    base_bytes = json.loads((base_dir / "quantization.json").read_text()).get("model_bytes")
    written = json.loads((out / "quantization.json").read_text())
    record["model_bytes"], record["base_model_bytes"] = written["model_bytes"], base_bytes
    written["merge"] = record
    (out / "quantization.json").write_text(json.dumps(written, indent=2, default=str))
    if not (out / "generation_config.json").is_file():
        merged.generation_config.save_pretrained(out)
    return record


def _tuning_lines(record: dict) -> list[str]:
    tuning, c = record.get("tuning"), record["calibration"]
    if record["mode"] != "calibrated" or not tuning:
        return []
    outcome = (f"held-out KL to the unmerged model {tuning['check_kl_before']:.4g} -> {tuning['check_kl_after']:.4g}"
               if tuning["kept"] else "no epoch lowered the held-out KL, so the block-wise result was kept")
    return [f"- end-to-end tuning of the scales and norms: {c['tune_windows']} windows x {c['seq_len']} tokens, "
            f"{c['tune_epochs']} epochs at learning rate {tuning['lr']:g}; {outcome}"]


def card_section(record: dict) -> str:
    """The model card's merge section: bits, group size, calibration data and size, the measured quality change."""
    q, c = record["quality"], record["calibration"]
    storage = {"gptq": "GPTQ (gptq_v2, loads in transformers with GPTQModel)",
               "bitsandbytes": "bitsandbytes NF4 (loads in transformers with bitsandbytes)"}[record["storage"]]
    tried = [name for name in CANDIDATE_WORDS if any(name in b["candidates"] for b in record["blocks"])]
    chosen = ", ".join(f"{CANDIDATE_WORDS[k]} in {n}" for k, n in sorted(record["blocks_chosen"].items()))
    how = (f"re-quantized block by block against the unmerged model's outputs, each block keeping the best of "
           f"{', '.join(CANDIDATE_WORDS[k] for k in tried)} (chosen: {chosen} blocks)" if record["mode"] == "calibrated"
           else "dequant(W) + s B A rounded back onto the base's grid (naive merge)")
    lines = ["", "## Low-bit merge", "",
             f"The LoRA was merged into the quantized weights: {how}. No adapter is needed.", "",
             f"- bits: {record['bits']}, group size: {record['group_size']}, storage: {storage}",
             f"- calibration: {c['windows']} windows x {c['seq_len']} tokens of {c['text']} ({c['source']})"
             if record["mode"] == "calibrated" else
             f"- measurement text: {c['text']} ({c['source']})",
             *_tuning_lines(record),
             f"- perplexity on {q['measured_on']}: unmerged {q['ppl_unmerged']:.4g}, merged {q['ppl_merged']:.4g} "
             f"({100 * q['ppl_change']:+.2f}%)",
             f"- model bytes: {record['model_bytes']:,} (the base: {record['base_model_bytes']:,})",
             f"- merge time: {record['seconds']} s", ""]
    return "\n".join(lines)
