"""Which method supports which model family: `peftkit methods` prints it, docs/methods/support.md is generated from
it (`python -m peftkit.commands.support` rewrites the page; a test fails when the page is stale)."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "methods" / "support.md"


def support_rows() -> list[dict]:
    """One row per method: yes / - for every family in peftkit.models.families, and why the others are left out."""
    from peftkit.models.families import FAMILIES
    from peftkit.utils.registry import METHODS

    rows = []
    for entry in METHODS.entries():
        method = entry.target
        claimed = method.families if method.families is not None else tuple(FAMILIES)
        rows.append({"method": entry.name, **{f: "yes" if f in claimed else "-" for f in FAMILIES},
                     "note": method.family_note})
    return rows


def support_markdown() -> str:
    from peftkit.models.families import FAMILIES

    families = list(FAMILIES)
    head = "| method | " + " | ".join(f"{f} ({FAMILIES[f].kind[:3]})" for f in families) + " |"
    lines = ["# Which method supports which model family", "",
             "Generated from the code (`families` on each method, peftkit/models/families.py) by "
             "`python -m peftkit.commands.support`; `peftkit methods` prints the same table. A recipe whose model "
             "is of a family its method does not support stops before training (exit 2) with the reason below.", "",
             head, "|" + "---|" * (len(families) + 1)]
    rows = support_rows()
    for row in rows:
        lines.append(f"| {row['method']} | " + " | ".join(row[f] for f in families) + " |")
    notes = [f"- **{row['method']}**: {row['note']}" for row in rows if row["note"]]
    from peftkit.tasks.causal_lm import LM_METHODS

    lines += ["", "Why a family is left out:", "", *notes, "",
              "Language-model recipes (model.task_head causal_lm: data.task wikitext2, data.task_type causal-lm or "
              f"sft) run with {', '.join(LM_METHODS)}.", ""]
    return "\n".join(lines)


def support_table() -> str:
    from peftkit.utils.tables import format_table

    return format_table([{k: v for k, v in row.items() if k != "note"} for row in support_rows()])


if __name__ == "__main__":
    DOC.write_text(support_markdown())
    print(f"wrote {DOC}")
