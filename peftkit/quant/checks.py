"""What `peftkit quantize` can quantize, decided once, from the model's structure (peftkit.models.families, which
reads it from the model itself; no list of model types here):

  - the model is a pre-norm decoder whose projections are nn.Linear (the family's ``quantizable`` capability; GPT-2's
    Conv1D projections, stored transposed, are refused: GPTQ checkpoints and peftkit's packed layers hold (out, in)
    Linear weights);
  - ``quant.lora_targets`` name projections of its blocks;
  - the group size divides the input width of every projection, and for the quantizers whose codes are stored in the
    GPTQ layout every projection's shape fills whole 32-bit words at ``quant.bits``.

Recipe validation asks ``model_problems`` (from config.json, on a model built on the meta device: no weights are
read); the pipeline asks ``check_model`` of the model it is given. Both run ``problems``.
"""

from __future__ import annotations

from peftkit.errors import UserError


def problems(model, quant, where: str = "model.name") -> list[str]:
    """Why ``quant`` cannot be applied to ``model`` (a loaded model, a skeleton or one on the meta device), or []."""
    from peftkit.models.families import family_of, get_path, layers_of
    from peftkit.quant.gptq_format import check_packable
    from peftkit.utils.registry import QUANTIZERS

    try:
        family = family_of(model)
    except ValueError as e:
        return [f"{where}: {e}"]
    why = family.lacks("quantizable")
    if why is not None:
        return [f"{where}: a {family.name} model cannot be quantized: {why}. `peftkit quantize` calibrates pre-norm "
                f"decoders with Linear projections (LLaMA, Mistral, Qwen2, Qwen3, Gemma, Gemma-2, Phi-3, OPT, ...)"]
    found = []
    leaves = [path.rpartition(".")[2] for path in family.projections]
    unknown = [t for t in (quant.lora_targets or []) if t not in leaves]
    if unknown:
        found.append(f"quant.lora_targets: {unknown} are not projections of a {family.name} block (choose from {leaves})")
    if quant.bits is None:
        return found
    if quant.bits not in (2, 3, 4):
        return [*found, f"quant.bits: {quant.bits!r} is not a bit width peftkit quantizes to (2, 3 or 4; null = not "
                        f"quantized)"]
    block = layers_of(model)[0]
    shapes = {path: tuple(get_path(block, path).weight.shape) for path in family.projections}
    widths = sorted({shape[1] for shape in shapes.values()})
    fitting = [d for d in (128, 64, 32, 16) if all(w % d == 0 for w in widths)]
    hint = f"; use one that divides all of them, e.g. {fitting[0]}" if fitting else ""
    misfits = [width for width in widths if width % quant.group_size]
    if misfits:
        where = "; ".join(f"the input width {width} of " + ", ".join(p for p, s in shapes.items() if s[1] == width)
                          for width in misfits)
        found.append(f"quant.group_size: {quant.group_size} does not divide {where}{hint}")
    if not misfits and QUANTIZERS.get(quant.method).codes == "uniform":
        for path, (out_features, in_features) in shapes.items():
            reason = check_packable(out_features, in_features, quant.bits, quant.group_size)
            if reason:
                found.append(f"quant.bits: {path} cannot be stored in the GPTQ layout: {reason}")
    return found


def model_problems(quant, model_name: str) -> list[str]:
    """``problems`` for the model a recipe names, read from its config.json (the model is built on the meta device)."""
    from peftkit.models.aliases import resolve_model

    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_model(model_name))
    except UserError as e:
        return [f"model.name: {e}"]
    except Exception as e:  # noqa: BLE001 - any loading problem is the user's path/name
        return [f"model.name: cannot read the config of {model_name!r} ({type(e).__name__}: {e})"]
    try:
        model = meta_model(config)
    except Exception as e:  # noqa: BLE001 - transformers has no causal LM of this architecture
        return [f"model.name: {model_name!r} is a {getattr(config, 'model_type', None)!r} model with no causal LM "
                f"class in transformers ({type(e).__name__}: {e}); `peftkit quantize` quantizes decoders"]
    return problems(model, quant)


def meta_model(config):
    """The causal LM ``config`` describes, on the meta device (shapes without storage)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_model(model, quant) -> None:
    """UserError with every problem of ``quant`` on ``model``."""
    found = problems(model, quant, where="model")
    if found:
        raise UserError("the model cannot be quantized as asked:\n  " + "\n  ".join(found))
