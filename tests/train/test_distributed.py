"""Two CPU processes under torchrun (gloo, DDP) train in lockstep: the replicas end with equal weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

HERE = Path(__file__).parent


def _torchrun(*args, cwd=None, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd, env=e)


def test_two_process_replicas_agree(tmp_path):
    result = _torchrun(str(HERE / "ddp_worker.py"), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # the adapters really moved (B starts at zero)


def test_finetune_command_under_torchrun(tiny_run_setup, tmp_path):
    import yaml

    recipe = tiny_run_setup("lora", out="ddp", max_steps=4)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = _torchrun("-m", "peftkit", "finetune", str(path), cwd=str(Path(__file__).parents[2]))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    assert result.stdout.count("final sst2") == 1  # rank 0 alone logs


def test_pretrain_command_under_torchrun(tmp_path):
    """The one pipeline gives pretraining the same distributed path: two gloo processes, rank 0 writes."""
    import random

    import yaml

    rng = random.Random(0)
    words = "the a good bad movie film plot actor was is not very fun boring story scene".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)) + "\n")
    recipe = {"kind": "pretrain", "model": {"preset": "tiny", "vocab_size": 300},
              "data": {"files": [str(corpus)], "block_size": 32, "eval_files": [str(corpus)], "eval_limit": 4},
              "mlm": {"variant": "3ml-self", "full_length_layers": 1},
              "train": {"batch_size": 4, "max_steps": 3, "log_every": 1}, "output": {"dir": str(tmp_path / "run")}}
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = _torchrun("-m", "peftkit", "pretrain", str(path), cwd=str(Path(__file__).parents[2]),
                       env={"PEFTKIT_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    for name in ("config.yaml", "env.json", "final"):
        assert (tmp_path / "run" / name).exists(), name
    assert json.loads((tmp_path / "run" / "env.json").read_text())["world_size"] == 2


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_fsdp_trains_the_same_steps_as_ddp_and_resumes(tiny_run_setup, tmp_path):
    """FSDP2 (gloo, 2 CPU processes) against DDP on the same recipe: the same losses within fp tolerance, the same
    final weights; the FSDP run's step-2 checkpoint resumes to the uninterrupted run's final weights."""
    import shutil

    import yaml
    from safetensors.torch import load_file

    root = str(Path(__file__).parents[2])
    runs = {}
    for strategy in ("ddp", "fsdp"):
        recipe = tiny_run_setup("full", out=strategy, max_steps=4, save_every=2, eval_every=2, strategy=strategy)
        recipe["train"].update(select_best=False)
        path = tmp_path / f"{strategy}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        result = _torchrun("-m", "peftkit", "finetune", str(path), cwd=root)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[strategy] = tmp_path / strategy
    # an FSDP run stopped after its step-2 checkpoint: resume=auto must land on the same final weights
    stopped = tmp_path / "fsdp-resumed"
    shutil.copytree(runs["fsdp"], stopped)
    for name in ("final", "metrics.json", "checkpoints/step-000004"):
        shutil.rmtree(stopped / name) if (stopped / name).is_dir() else (stopped / name).unlink()
    recipe = yaml.safe_load((tmp_path / "fsdp.yaml").read_text())
    recipe["output"]["dir"] = str(stopped)
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(recipe))
    result = _torchrun("-m", "peftkit", "finetune", str(tmp_path / "resume.yaml"), "train.resume=auto", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "step-000002" in result.stdout
    runs["fsdp-resumed"] = stopped

    ddp, fsdp = _losses(runs["ddp"]), _losses(runs["fsdp"])
    assert len(ddp) == len(fsdp) == 4
    assert fsdp == pytest.approx(ddp, rel=1e-4, abs=1e-5)
    weights = {name: load_file(str(runs[name] / "final" / "model.safetensors")) for name in runs}
    for key, tensor in weights["ddp"].items():
        torch.testing.assert_close(weights["fsdp"][key], tensor, rtol=1e-4, atol=1e-5, msg=key)
        torch.testing.assert_close(weights["fsdp-resumed"][key], weights["fsdp"][key], rtol=1e-5, atol=1e-6, msg=key)
    metrics = json.loads((runs["fsdp"] / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
