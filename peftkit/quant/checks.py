"""What a quantize recipe must satisfy against its model: a supported decoder, targets that exist, and a
group size that divides every projection's input width. Only the model's config is read."""

from __future__ import annotations

from peftkit.errors import UserError


def model_problems(quant, model_name: str) -> list[str]:
    from peftkit.models.aliases import resolve_model
    from peftkit.models.families import FAMILIES

    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_model(model_name))
    except UserError as e:
        return [f"model.name: {e}"]
    except Exception as e:  # noqa: BLE001 - any loading problem is the user's path/name
        return [f"model.name: cannot read the config of {model_name!r} ({type(e).__name__}: {e})"]
    if getattr(config, "model_type", None) not in ("llama", "opt"):  # the decoders peftkit.models.families describes
        return [f"model.name: {model_name!r} is a {config.model_type!r} model; quantize supports LLaMA-family and OPT decoders"]
    family = FAMILIES[config.model_type]
    leaves = [n.split(".")[-1] for n in (*family.attn_linears, *family.ffn_linears)]
    problems = []
    unknown = [t for t in (quant.lora_targets or []) if t not in leaves]
    if unknown:
        problems.append(f"quant.lora_targets: {unknown} are not projections of a {config.model_type} block (choose from {leaves})")
    if quant.bits >= 16:
        return problems
    widths = {"hidden_size": config.hidden_size}
    for key in ("intermediate_size", "ffn_dim"):
        if getattr(config, key, None):
            widths[key] = getattr(config, key)
    fitting = [d for d in (128, 64, 32, 16) if all(w % d == 0 for w in widths.values())]
    hint = f"; use one that divides all of them, e.g. {fitting[0]}" if fitting else ""
    for key, width in widths.items():
        if width % quant.group_size:
            problems.append(f"quant.group_size: {quant.group_size} does not divide the model's {key} {width}{hint}")
    return problems
