"""scripts/gpu_check.sh --dry-run: on a CPU it lists the GPU check's commands and validates each recipe with its
overrides and the bench's settings, so a broken command is found before anyone spends GPU time on it."""

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def dry_run(out: Path, script: Path = SCRIPT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PEFTKIT": str(ROOT / ".venv" / "bin" / "peftkit"),
           "PYTHON": str(ROOT / ".venv" / "bin" / "python"), "TORCHRUN": str(ROOT / ".venv" / "bin" / "torchrun")}
    return subprocess.run(["bash", str(script), "--dry-run", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=600)


def test_dry_run_validates_every_command_and_covers_every_method(tmp_path):
    from peftkit.utils.registry import METHODS

    result = dry_run(tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    commands = [line for line in result.stdout.splitlines() if line.startswith("== ")]
    assert f"dry run: {len(commands)} commands valid" in result.stdout
    finetuned = {m.group(1) for line in commands if (m := re.search(r"method\.name=(\S+)", line))}
    finetuned |= {m.group(1) for line in commands if (m := re.match(r"== (\S+)-bf16:", line))}
    apiq = [line for line in commands if line.startswith("== gptq-apiq-bf16:")]
    assert apiq and "ft-wikitext2-smollm2-2bit-rtn" in apiq[0]  # apiq: the fine-tune of the GPTQ output
    missing = set(METHODS.names()) - finetuned - {"apiq"}  # apiq: checked above
    assert not missing, f"methods the GPU check does not run: {sorted(missing)}"
    assert any("--nproc_per_node=1" in line and "train.strategy=fsdp" in line for line in commands)
    assert any("quant.method=gptq" in line for line in commands)
    assert any(" bench glue --quick " in line for line in commands)
    assert all("train.precision=bf16" in line for line in commands if " finetune " in line)
    assert not (tmp_path / "out" / "runs").exists() or not any((tmp_path / "out" / "runs").iterdir())  # ran nothing


def test_dry_run_fails_on_an_invalid_recipe_option(tmp_path):
    broken = tmp_path / "gpu_check.sh"
    broken.write_text(SCRIPT.read_text().replace("train.eval_every=5 train.save_every=5 train.precision=bf16 data.limit",
                                                 "train.eval_every=5 train.save_every=5 train.precison=bf16 data.limit"))
    work = tmp_path / "repo"
    (work / "scripts").mkdir(parents=True)
    # the script changes to the folder above its own: give it one whose configs are the repository's
    (work / "configs").symlink_to(ROOT / "configs")
    (work / "scripts" / "gpu_check.sh").write_text(broken.read_text())
    result = dry_run(tmp_path / "out", work / "scripts" / "gpu_check.sh")
    assert result.returncode == 1
    assert "train.precison" in result.stderr and "invalid" in result.stderr
