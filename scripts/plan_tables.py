"""Regenerate the plan tables of docs/scaling.md by running `peftkit plan` on the Llama-3-shaped configs.

Each table sits between `<!-- plan: ARGS -->` and `<!-- /plan -->` in the page; ARGS are the command's arguments.
The command runs in this process through the CLI itself (typer's runner: the same code path and output as a shell).

  .venv/bin/python scripts/plan_tables.py [docs/scaling.md]
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BLOCK = re.compile(r"(<!-- plan: (?P<args>.*?) -->\n)(.*?)(<!-- /plan -->)", re.S)


def run(args: str) -> str:
    from typer.testing import CliRunner

    from peftkit.cli import app

    result = CliRunner().invoke(app, ["plan", *shlex.split(args)])
    if result.exit_code != 0:
        raise SystemExit(f"peftkit plan {args} failed ({result.exit_code}):\n{result.output}")
    return result.output.rstrip("\n")


def main() -> None:
    import os

    os.chdir(ROOT)  # the configs' model.name is relative to the repository root
    page = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "scaling.md")
    text = page.read_text()

    def table(match: re.Match) -> str:
        args = match.group("args")
        print(f"peftkit plan {args}", flush=True)
        return f"{match.group(1)}```\n$ peftkit plan {args}\n{run(args)}\n```\n{match.group(4)}"

    page.write_text(BLOCK.sub(table, text))


if __name__ == "__main__":
    main()
