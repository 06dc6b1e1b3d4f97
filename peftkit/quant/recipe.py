"""The `peftkit quantize` recipe: sections model, quant, calib, output (YAML + dotted overrides).

Validated with the same loader helpers as training recipes: every problem is collected and reported
at once by its key path, before any model weights are loaded (only the model's config is read to
check that the group size divides every projection's input width).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from peftkit.config.loader import build_section, read_recipe_sections
from peftkit.errors import UserError
from peftkit.eval.wikitext import default_wikitext_root
from peftkit.utils.options import option

METHODS = ("rtn", "nf", "loftq", "apiq-lw", "apiq-bw")
BITS = (2, 3, 4, 16)


@dataclass
class QuantModelOptions:
    name: str = option("smollm2-135m", "Model to quantize: alias (smollm2-135m), local directory (LLaMA-family or OPT decoder).")


@dataclass
class QuantOptions:
    method: Literal["rtn", "nf", "loftq", "apiq-lw", "apiq-bw"] = option(
        "apiq-bw", "rtn (min/max round-to-nearest, B=0) | nf (normal-float, the QLoRA start, B=0) | loftq | apiq-lw | apiq-bw.")
    bits: int = option(2, "Bits per weight: 2, 3 or 4 (16 = no quantization, LoRA B=0).")
    group_size: int = option(64, "Consecutive input columns sharing one scale/zero; must divide every projection's input width.")
    symmetric: bool = option(False, "Symmetric uniform quantization (fixed zero point 2^(b-1)); rtn and ApiQ only.")
    lora_r: int = option(64, "LoRA rank r.")
    lora_alpha: float = option(16.0, "LoRA alpha; the update is (alpha / r)·B·A.")
    lora_targets: list[str] = option(factory=list, help="Projection names that get LoRA; [] = all (q,k,v,o,gate,up,down for LLaMA).")
    loftq_iters: int = option(1, "LoftQ alternations T.")
    epochs: int = option(2, "ApiQ: calibration epochs over the windows, per block (bw) or per layer (lw).")
    lr_lora: float = option(5e-3, "ApiQ: AdamW learning rate of A and B.")
    lr_clip: float = option(5e-2, "ApiQ: AdamW learning rate of the clipping logits gamma, beta.")
    weight_decay: float = option(0.0, "ApiQ: AdamW weight decay.")
    aug_loss: bool = option(True, "ApiQ-bw: add ||F(Xq; W) - F(Xq; Q, A, B)||^2 to the loss.")
    batch_size: int = option(1, "ApiQ: calibration windows per optimizer step (and per forward when measuring).")
    seed: int = option(0, "Seed of the LoRA A initialisation and the calibration order.")

    def validate(self) -> list[str]:
        errors = []
        if self.bits not in BITS:
            errors.append(f"quant.bits: must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.group_size < 1:
            errors.append(f"quant.group_size: must be a positive integer, got {self.group_size}")
        if self.symmetric and self.method in ("nf", "loftq"):
            errors.append(f"quant.symmetric: {self.method} uses normal-float levels (absmax, always symmetric); set symmetric: false")
        for key in ("lora_r", "loftq_iters", "epochs", "batch_size"):
            if getattr(self, key) < 1:
                errors.append(f"quant.{key}: must be at least 1, got {getattr(self, key)}")
        for key in ("lr_lora", "lr_clip"):
            if not getattr(self, key) > 0:
                errors.append(f"quant.{key}: must be positive, got {getattr(self, key)}")
        if self.weight_decay < 0:
            errors.append(f"quant.weight_decay: must be >= 0, got {self.weight_decay}")
        return errors


@dataclass
class CalibOptions:
    root: Optional[str] = option(None, "WikiText-2 directory; None = env PEFTKIT_WIKITEXT, else ../shared/data/wikitext-2.")
    file: str = option("wiki.valid.tokens", "Calibration text file inside root (never the test file used for perplexity).")
    n_windows: int = option(32, "Random token windows drawn from the file.")
    seq_len: int = option(256, "Tokens per window.")
    seed: int = option(0, "Seed of the window positions.")


@dataclass
class QuantOutputOptions:
    dir: Optional[str] = option(None, "Output directory; None = runs/<recipe name>.")
    overwrite: bool = option(False, "Replace an existing output directory.")


SECTIONS = {"model": QuantModelOptions, "quant": QuantOptions, "calib": CalibOptions, "output": QuantOutputOptions}


@dataclass
class QuantRecipe:
    name: str
    source: str
    model: QuantModelOptions
    quant: QuantOptions
    calib: CalibOptions
    output: QuantOutputOptions

    @property
    def out_dir(self) -> Path:
        return Path(self.output.dir or f"runs/{self.name}")

    @property
    def calib_path(self) -> Path:
        return Path(self.calib.root or default_wikitext_root()) / self.calib.file


def _check_model(quant: QuantOptions, model_name: str, errors: list[str]) -> None:
    """Every projection's input width must be a multiple of the group size."""
    from peftkit.models.aliases import resolve_model

    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_model(model_name))
    except UserError as e:
        errors.append(f"model.name: {e}")
        return
    except Exception as e:  # noqa: BLE001 - any loading problem is the user's path/name
        errors.append(f"model.name: cannot read the config of {model_name!r} ({type(e).__name__}: {e})")
        return
    if getattr(config, "model_type", None) not in ("llama", "opt"):  # the decoders peftkit.models.families describes
        errors.append(f"model.name: {model_name!r} is a {config.model_type!r} model; quantize supports LLaMA-family and OPT decoders")
        return
    from peftkit.models.families import FAMILIES

    leaves = [n.split(".")[-1] for n in (*FAMILIES[config.model_type].attn_linears, *FAMILIES[config.model_type].ffn_linears)]
    unknown = [t for t in (quant.lora_targets or []) if t not in leaves]
    if unknown:
        errors.append(f"quant.lora_targets: {unknown} are not projections of a {config.model_type} block (choose from {leaves})")
    if quant.bits >= 16 or quant.group_size < 1:
        return
    widths = {"hidden_size": config.hidden_size}
    for key in ("intermediate_size", "ffn_dim"):
        if getattr(config, key, None):
            widths[key] = getattr(config, key)
    fitting = [d for d in (128, 64, 32, 16) if all(w % d == 0 for w in widths.values())]
    hint = f"; use one that divides all of them, e.g. {fitting[0]}" if fitting else ""
    for key, width in widths.items():
        if width % quant.group_size:
            errors.append(f"quant.group_size: {quant.group_size} does not divide the model's {key} {width}{hint}")


def load_quant_recipe(spec: str | Path | dict, overrides: list[str] | tuple[str, ...] = (), check_model: bool = True) -> QuantRecipe:
    raw, source, name, errors = read_recipe_sections(spec, overrides, SECTIONS, "quant")
    sections = {s: build_section(cls, raw.get(s), s, errors) for s, cls in SECTIONS.items()}
    recipe = QuantRecipe(name=name, source=source, **sections)
    q, c = recipe.quant, recipe.calib
    if isinstance(q.bits, int) and isinstance(q.group_size, int):
        errors.extend(q.validate())
    for key in ("n_windows", "seq_len"):
        if isinstance(getattr(c, key), int) and getattr(c, key) < 2:
            errors.append(f"calib.{key}: must be at least 2, got {getattr(c, key)}")
    if not recipe.calib_path.is_file():
        errors.append(f"calib.root/calib.file: {recipe.calib_path} does not exist (set calib.root or env PEFTKIT_WIKITEXT)")
    if check_model and isinstance(recipe.model.name, str) and isinstance(q.group_size, int) and isinstance(q.bits, int) and not any(e.startswith("quant.group_size") for e in errors):
        _check_model(q, recipe.model.name, errors)
    if errors:
        where = f" in {source}" if source != "<dict>" else ""
        raise UserError(f"invalid quantization recipe{where} ({len(errors)} problem{'s' if len(errors) > 1 else ''}): "
                        f"{'; '.join(errors)}. Fix these keys and run again.")
    return recipe


def load_recipe(spec, overrides=()) -> QuantRecipe:
    """The name peftkit.config.loader.load_any_recipe calls for recipes with a ``quant`` section."""
    return load_quant_recipe(spec, overrides)
