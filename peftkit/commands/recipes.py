"""`peftkit recipes list / show`: the shipped recipes, and one recipe resolved with every option's doc."""

from __future__ import annotations


def list_recipes() -> str:
    from peftkit.config.loader import infer_kind, read_yaml, shipped_recipes
    from peftkit.errors import UserError

    def field(raw, section, key):
        value = raw.get(section)
        return str(value.get(key, "")) if isinstance(value, dict) else ""

    lines = []
    for name, path in shipped_recipes().items():
        try:
            raw = read_yaml(path)
        except UserError:
            raw = {}
        kind = raw.get("kind") or infer_kind(raw)
        # finetune recipes name a method, quantize recipes a quant.method, pretrain recipes an mlm.variant
        method = field(raw, "method", "name") or field(raw, "quant", "method") or field(raw, "mlm", "variant") or "?"
        model = field(raw, "model", "name") or field(raw, "model", "preset") or "?"
        task = field(raw, "data", "task") or (f"{field(raw, 'quant', 'bits')}-bit" if "quant" in raw else "")
        lines.append(f"{name:36s} {path.parent.name:9s} {kind:9s} {method:10s} {model:14s} {task}")
    return "\n".join(lines)


def show_recipe(name: str, overrides: list[str]) -> str:
    """The resolved recipe as YAML, each option followed by its type, range and help as a comment."""
    from peftkit.config.loader import load_recipe
    from peftkit.utils.registry import METHODS

    recipe = load_recipe(name, overrides)
    lines = [f"# {recipe.source}", f"kind: {recipe.kind}"]
    for section in recipe.SECTIONS:
        value = getattr(recipe, section)
        lines.append(f"{section}:")
        if section == "method":
            lines.append(f"  name: {recipe.method_name}  # {METHODS.entry(recipe.method_name).help}")
        for option, type_name, _default, allowed, help_text in type(value).options():
            current = getattr(value, option)
            doc = "; ".join(x for x in (type_name, allowed, help_text) if x)
            lines.append(f"  {option}: {_yaml_scalar(current)}  # {doc}")
    return "\n".join(lines)


def _yaml_scalar(value) -> str:
    import json

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def copy_recipe(name: str, dest: str) -> str:
    """Copy the shipped recipe ``name`` (comments and all) to ``dest``, a new file or an existing directory.

    An existing file is never replaced, and the copy appears whole or not at all (written beside the target,
    then linked into place, which fails rather than overwrite a file that appeared meanwhile)."""
    import os
    import tempfile

    from peftkit.config.loader import shipped_recipes
    from peftkit.errors import UserError, did_you_mean
    from peftkit.utils.output_paths import expand_path

    shipped = shipped_recipes()
    stem = name[:-5] if name.endswith(".yaml") else name
    if stem not in shipped:
        raise UserError(f'"{name}" is not a shipped recipe{did_you_mean(stem, shipped)}. '
                        f"`peftkit recipes list` prints the names.")
    source = shipped[stem]
    target = expand_path(dest, "the destination")
    if target.is_dir():
        target = target / source.name
    if target.exists() or target.is_symlink():
        raise UserError(f"{target} already exists; peftkit does not overwrite it. Choose another destination or "
                        f"remove that file first.")
    if not target.parent.is_dir():
        raise UserError(f"the folder {target.parent} does not exist; create it or choose another destination.")
    data = source.read_bytes()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the permissions of a file the user created (mkstemp makes it private)
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise UserError(f"{target} appeared while copying; peftkit does not overwrite it.") from None
    finally:
        os.unlink(tmp)
    kind = "finetune"
    for line in data.decode("utf-8").splitlines():
        if line.startswith("kind:"):
            kind = line.split(":", 1)[1].split("#")[0].strip() or kind
            break
    return f"copied {stem} to {target}; edit it, then run `peftkit {kind} {target}`"


SECTION_DOCS = {
    "model": "The model the recipe starts from.",
    "data": "What the recipe trains and evaluates on.",
    "method": "The method (`name`) and its options, which sit beside the name; see Methods below.",
    "train": "The training loop, the same for fine-tuning and pretraining.",
    "output": "Where the run directory goes.",
    "mlm": "The masked-LM objective: vanilla MLM or 3ML.",
    "quant": "The quantizer and the LoRA it initialises.",
    "calib": "The calibration text the quantizer sees.",
}


def configuration_reference() -> str:
    """docs/configuration.md: every option of every recipe kind and of every method, from the typed sections."""
    from peftkit.config.schema import KINDS
    from peftkit.utils.registry import METHODS

    out = ["# Configuration reference\n",
           "Generated from the typed sections in `peftkit/config/schema.py` and the methods' options classes by "
           "`python scripts/make_config_doc.py` (`make docs`); `tests/config/test_configuration_doc.py` fails when "
           "this file is stale. Do not edit it by hand: change the option's declaration.\n",
           "A recipe is YAML with a `kind` and the sections of that kind. Any option can be overridden on the "
           "command line as `section.option=value` (`train.lr=3e-4 method.r=16`); `peftkit recipes show NAME` prints "
           "a recipe with every option resolved. Ranges are checked when the recipe loads, and every problem is "
           "reported at once (exit 2). `null` means the option is unset; the description says what that does.\n"]
    out.append("Contents: " + ", ".join(f"[`kind: {k}`](#kind-{k})" for k in KINDS) + ", [methods](#methods).\n")
    for kind, cls in KINDS.items():
        out.append(f"## kind: {kind}\n")
        out.append(f"Sections: {', '.join(f'`{s}`' for s in cls.SECTIONS)}; also `name` (the default run directory "
                   f"`runs/<name>`, else the file's stem).\n")
        for section in cls.SECTIONS:
            out.append(f"### {kind}: `{section}`\n")
            out.append(SECTION_DOCS.get(section, "") + "\n")
            if section == "method":
                continue
            out.append(_options_table(cls.model_fields[section].annotation))
    out.append("## Methods\n")
    out.append("`method.name` picks one; its options sit beside the name (`method: {name: lora, r: 8}`). "
               "`peftkit methods` lists them.\n")
    by_options: dict[type, list] = {}
    for entry in METHODS.entries():
        by_options.setdefault(entry.target.Options, []).append(entry)
    for options, entries in by_options.items():
        names = ", ".join(f"`{e.name}`" for e in entries)
        out.append(f"### {names}\n")
        out.append("".join(f"- `{e.name}`: {e.help}\n" for e in entries) + "\n")
        out.append(_options_table(options) if options.options() else "No options of its own.\n")
    return "\n".join(out)


def _options_table(section) -> str:
    rows = ["| option | type | default | range | description |", "|---|---|---|---|---|"]
    for name, type_name, default, allowed, help_text in section.options():
        cells = [f"`{name}`", f"`{type_name}`", f"`{_yaml_scalar(default)}`", allowed, help_text]
        rows.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(rows) + "\n"
