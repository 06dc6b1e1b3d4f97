"""Which method supports which model family: `peftkit methods` prints it, docs/methods/support.md is generated from
it (`python -m peftkit.commands.support` rewrites the page; a test fails when the page is stale).

Nothing here is a list: each cell is the method's declared ``needs`` checked against the family as
peftkit/models/families derives it from transformers' default config of that model type, the same check a recipe
meets (on its own model's config) before training.
"""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "methods" / "support.md"


def support_rows() -> list[dict]:
    """One row per method: yes / - for every family of peftkit.models.families.FAMILIES, the heads it runs on, and
    why each left-out family is left out (reason -> families)."""
    from peftkit.models.families import FAMILIES
    from peftkit.utils.registry import METHODS

    families = {name: FAMILIES[name] for name in FAMILIES}
    rows = []
    for entry in METHODS.entries():
        method = entry.target
        variants = [(entry.name, method.needs)] + [
            (f"{entry.name} ({option}={value})", tuple(dict.fromkeys((*method.needs, *extra))))
            for (option, value), extra in method.option_needs.items()]
        for label, needs in variants:
            cells, why = {}, {}
            for name, family in families.items():
                reason = method.unsupported(family, needs)
                cells[name] = "-" if reason else "yes"
                if reason:
                    why.setdefault(reason, []).append(name)
            rows.append({"method": label, **cells, "heads": ", ".join(sorted(method.heads)),
                         "needs": ", ".join(needs) or "nothing", "why": why})
    return rows


def support_markdown() -> str:
    from peftkit.models.families import FAMILIES

    families = list(FAMILIES)
    head = "| method | " + " | ".join(f"{f} ({FAMILIES[f].kind[:3]})" for f in families) + " | heads | needs |"
    lines = ["# Which method supports which model family", "",
             "Generated from the code by `python -m peftkit.commands.support`; `peftkit methods` prints the same "
             "table. Each method declares the task heads it runs on and what it needs of a model (`heads`, `needs` "
             "in peftkit/methods/); each family's capabilities are read from the model's own structure "
             "(peftkit/models/structure.py, peftkit/models/families/), here from transformers' default config of "
             "each model type. A recipe is checked the same way against its own model's config.json and stops "
             "before any data is read (exit 2) with the reason below. Adding a family: docs/adding-a-model.md.", "",
             head, "|" + "---|" * (len(families) + 3)]
    rows = support_rows()
    for row in rows:
        lines.append(f"| {row['method']} | " + " | ".join(row[f] for f in families)
                     + f" | {row['heads']} | {row['needs']} |")
    grouped: dict[tuple[str, tuple[str, ...]], list[str]] = {}  # methods left out of the same families alike
    for row in rows:
        for reason, names in row["why"].items():
            grouped.setdefault((reason, tuple(names)), []).append(row["method"])
    notes = [f"- **{', '.join(methods)}** on {', '.join(names)}: {reason}"
             for (reason, names), methods in grouped.items()]
    decoders = [f for f in families if FAMILIES[f].kind == "decoder" and FAMILIES[f].decoder_inputs is not None]
    files = sorted({FAMILIES[f].family_file.rpartition(".")[2] + ".py" for f in decoders})
    lines += ["", "Why a family is left out:", "", *notes, "",
              f"MEFT runs on post-norm encoders whose blocks it re-composes from the parts their run order shows, and "
              f"on pre-norm decoders whose bare model's input builder is described in a family file: "
              f"{', '.join(decoders)} (peftkit/models/families/{{{','.join(files)}}}).", "",
              "LoRA's default targets are every attention and FFN projection the structure finds (as today on BERT "
              "and LLaMA, now on every family); `method.targets: all-linear` is peft's keyword (every Linear but the "
              "output layer); explicit `method.targets` are honoured on any model. The task head trains in full "
              "either way.", "",
              "`apiq` fine-tunes the output of `peftkit quantize`, and is tested with it (tests/quant/).", ""]
    return "\n".join(lines)


def support_table() -> str:
    from peftkit.utils.tables import format_table

    return format_table([{k: v for k, v in row.items() if k not in ("why", "needs")} for row in support_rows()])


if __name__ == "__main__":
    DOC.write_text(support_markdown())
    print(f"wrote {DOC}")
