"""The wheel as a user gets it: built from the files a clone would hold, installed (not editable) into a fresh venv
outside the repository, with its recipes (the repository's configs/) as package data, a version, a fine-tune from
a shipped recipe by its flat name and one from a copied recipe."""

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

ROOT = Path(__file__).resolve().parents[1]
# the commands below must not see the sources under test through PYTHONPATH (pip would take them as installed)
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PEFTKIT_DATA_DIR")}


def _clone_files(src: Path) -> None:
    """The working tree's files as a fresh clone of it would hold them (tracked or new, not ignored): the build
    must not lean on anything only this checkout has, such as a stale peftkit/recipes/ or an egg-info."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():  # a file deleted but not yet committed is listed too
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)


def _build_wheel(tmp_path: Path) -> Path:
    """`pip wheel` on a copy of the sources (an in-tree build would leave build/ and *.egg-info in the repository);
    no build isolation, so the venv's own setuptools builds it without a download."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs the git checkout to know which files a clone holds")
    src = tmp_path / "src"
    src.mkdir()
    _clone_files(src)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(src)], check=True, capture_output=True, text=True, timeout=300, env=CLEAN_ENV)
    wheels = list(dist.glob("peftkit-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _venv_with(wheel: Path, where: Path) -> Path:
    """A new venv with the wheel installed (no dependencies, no index), whose own site-packages come first, then
    (through a .pth line written after the install, so that pip does not take the peftkit it would see there as
    already installed) the site-packages of the interpreter running the tests: torch and the rest without a
    download. A path added by a .pth line is not itself scanned for .pth files, so an editable install of peftkit
    there stays invisible."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=300, env=CLEAN_ENV)
    python = where / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300, env=CLEAN_ENV)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, env=CLEAN_ENV).stdout.strip()
    ours = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (Path(purelib) / "peftkit-test-deps.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
    from helpers.tiny import save_tiny_classifier, write_glue_task

    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    # configs/<group>/x.yaml becomes the package data peftkit/recipes/<group>/x.yaml, and nothing else is added
    shipped = sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").glob("*/*.yaml"))
    assert len(shipped) > 50
    assert sorted(n.removeprefix("peftkit/recipes/") for n in names if n.startswith("peftkit/recipes/")) == shipped
    assert [n for n in names if not n.startswith(("peftkit/", "peftkit-"))] == []

    python = _venv_with(wheel, tmp_path / "venv")
    work = tmp_path / "work"  # outside the repository, no PYTHONPATH: only the installed wheel can answer
    work.mkdir()
    env = dict(CLEAN_ENV)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    exe = str(tmp_path / "venv" / "bin" / "peftkit")

    def run(*args):
        return subprocess.run([exe, *args], capture_output=True, text=True, cwd=work, env=env, timeout=600)

    where = subprocess.run([str(python), "-c", "import peftkit; print(peftkit.__file__)"], capture_output=True,
                           text=True, cwd=work, env=env, check=True).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "venv"), where

    from peftkit import __version__

    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"peftkit {__version__}"
    listed = run("recipes", "list")
    assert listed.returncode == 0
    assert {tuple(line.split()[:2]) for line in listed.stdout.splitlines() if line.strip()} == \
        {(Path(n).stem, Path(n).parent.name) for n in shipped}

    copied = run("recipes", "copy", "lora-minilm-sst2", "mine.yaml")
    assert copied.returncode == 0, copied.stderr
    assert (work / "mine.yaml").read_bytes() == (ROOT / "configs" / "glue" / "lora-minilm-sst2.yaml").read_bytes()
    again = run("recipes", "copy", "lora-minilm-sst2", "mine.yaml")
    assert again.returncode == 2 and "already exists" in again.stderr

    # edit the copy as a user would: a tiny model and data written here, a short schedule
    import yaml

    from peftkit.config.loader import (
        parse_yaml,  # YAML 1.2 numbers, as peftkit reads the file
    )

    model_dir = save_tiny_classifier(work / "tiny-bert")
    write_glue_task(work / "glue", "sst2", n_train=32, n_val=16)
    recipe = parse_yaml((work / "mine.yaml").read_text(), "mine.yaml")
    recipe["model"]["name"] = str(model_dir)
    recipe["data"].update(root=str(work / "glue"), max_length=16)
    recipe["train"].update(max_steps=3, batch_size=8, eval_every=3, log_every=1, threads=1)
    recipe.pop("output", None)
    (work / "mine.yaml").write_text(yaml.safe_dump(recipe))
    trained = run("finetune", "mine.yaml")
    assert trained.returncode == 0, trained.stderr[-2000:]
    run_dir = work / "runs" / "mine"
    assert (run_dir / "final" / "peftkit.json").is_file() and (run_dir / "metrics.json").is_file()

    # a shipped recipe by its flat name (it sits in configs/glue/), shortened on the command line
    by_name = run("finetune", "lora-minilm-sst2", f"model.name={model_dir}", f"data.root={work / 'glue'}",
                  "data.max_length=16", "train.max_steps=2", "train.batch_size=8", "train.eval_every=2",
                  "train.threads=1", "output.dir=runs/by-name")
    assert by_name.returncode == 0, by_name.stderr[-2000:]
    assert (work / "runs" / "by-name" / "final" / "peftkit.json").is_file()
