"""Write docs/interop.md from the methods' own export declarations (peftkit.artifacts.export.interop_markdown)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peftkit.artifacts.export import interop_markdown  # noqa: E402


def main() -> None:
    target = ROOT / "docs" / "interop.md"
    target.write_text(interop_markdown())
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
