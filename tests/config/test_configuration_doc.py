"""docs/configuration.md is generated from the typed sections and must match them."""

import subprocess
import sys
from pathlib import Path

from peftkit.commands.recipes import configuration_reference
from peftkit.config.schema import KINDS
from peftkit.utils.registry import METHODS

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "configuration.md"


def test_configuration_doc_is_not_stale():
    assert DOC.read_text(encoding="utf-8") == configuration_reference(), \
        "docs/configuration.md is stale: run python scripts/make_config_doc.py (make docs)"


def _section(text: str, heading: str) -> str:
    start = text.index(heading + "\n")
    following = text.find("\n### ", start + 1)
    return text[start: following if following != -1 else None]


def test_every_option_of_every_kind_and_method_is_documented_with_its_default():
    text = configuration_reference()
    for kind, cls in KINDS.items():
        for section in cls.SECTIONS:
            if section == "method":
                continue
            part = _section(text, f"### {kind}: `{section}`")
            for name, field in cls.model_fields[section].annotation.model_fields.items():
                assert f"| `{name}` |" in part, (kind, section, name)
                assert field.description and field.description.replace("|", "\\|") in part, (kind, section, name)
    for entry in METHODS.entries():
        heading = next(line for line in text.splitlines() if line.startswith("### ") and f"`{entry.name}`" in line)
        part = _section(text, heading)
        assert f"- `{entry.name}`: {entry.help}" in part
        for name, field in entry.target.Options.model_fields.items():
            assert f"| `{name}` |" in part, (entry.name, name)
    train = _section(text, "### finetune: `train`")
    assert "| `lr` | `float` | `0.0005` | > 0, <= 10 |" in train
    assert "| `report_to` | `list[Literal['tensorboard', 'wandb', 'mlflow']]` | `[]` | len <= 3 |" in train


def test_the_script_checks_and_writes(tmp_path):
    check = subprocess.run([sys.executable, "scripts/make_config_doc.py", "--check"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stderr
