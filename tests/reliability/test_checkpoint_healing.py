"""Checkpoints heal: damaged newest -> previous good one, damaged best -> newest good step, strays ignored,
and a checkpoint of another recipe is refused on resume."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.reliability import (
    assert_identical,
    final_state,
    make_setup,
    recipe,
    write_recipe,
)

from peftkit.errors import UserError
from peftkit.train import checkpoint as ckpt


def _write(path: Path, value: float) -> Path:
    return ckpt.write_checkpoint(path, {"w": torch.full((3,), value)}, {"rng": torch.get_rng_state()},
                                 {"step": int(value)})


def _steps(tmp_path: Path, *steps: int) -> Path:
    for s in steps:
        _write(tmp_path / f"step-{s:06d}", float(s))
    return tmp_path


def _flip_last_byte(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


def _damage_consistently(checkpoint: Path, name: str, content: bytes) -> None:
    """Replace a file and re-record it in the manifest: sizes and checksums match, the file does not parse."""
    (checkpoint / name).write_bytes(content)
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    manifest["files"][name] = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", ["checksum", "state-not-json", "optimizer-not-a-torch-file", "safetensors-garbage"])
def test_a_damaged_newest_checkpoint_gives_way_to_the_previous_good_one(tmp_path, damage):
    d = _steps(tmp_path, 2, 4, 6)
    newest = d / "step-000006"
    if damage == "checksum":
        _flip_last_byte(newest / "trainable.safetensors")
    elif damage == "state-not-json":
        _damage_consistently(newest, "state.json", b'{"step": 6, "ep')
    elif damage == "optimizer-not-a-torch-file":
        _damage_consistently(newest, "optimizer.pt", b"\x80\x04not a pickle at all" + b"\x00" * 40)
    else:
        _damage_consistently(newest, "trainable.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    lines: list[str] = []
    path, tensors, _, state = ckpt.read_latest_good(d, lines.append)
    assert path == d / "step-000004" and state == {"step": 4} and torch.equal(tensors["w"], torch.full((3,), 4.0))
    assert len(lines) == 1 and "step-000006" in lines[0] and "warning" in lines[0]


def test_every_checkpoint_damaged_means_none(tmp_path):
    d = _steps(tmp_path, 2)
    _flip_last_byte(d / "step-000002" / "optimizer.pt")
    lines: list[str] = []
    assert ckpt.read_latest_good(d, lines.append) is None and len(lines) == 1


def test_stray_entries_in_the_checkpoints_folder_are_ignored(tmp_path):
    d = _steps(tmp_path, 2, 4)
    shutil.copytree(d / "step-000004", d / "step-000009-copy")  # a complete checkpoint under a name not ours
    shutil.copytree(d / "step-000004", d / ".tmp-step-000010-k2j3")  # a temp dir (complete here, still not taken)
    shutil.copytree(d / "step-000004", d / "step-10")  # too few digits to be one we wrote
    (d / "step-abc").mkdir()
    (d / "step-000012").write_text("a file, not a checkpoint")
    (d / "notes.txt").write_text("why step 4 looked odd")
    assert [p.name for p in ckpt.step_checkpoints(d)] == ["step-000002", "step-000004"]
    path, *_ = ckpt.read_latest_good(d, print)
    assert path.name == "step-000004"
    ckpt.prune(d, keep_last=1)
    assert (d / "step-000009-copy").is_dir() and (d / "notes.txt").is_file()  # pruning never takes strays


def test_a_manifest_naming_other_files_is_not_a_checkpoint(tmp_path):
    target = _write(tmp_path / "step-000001", 1.0)
    manifest = json.loads((target / ckpt.MANIFEST).read_text())
    outside = tmp_path / "secret.txt"
    outside.write_text("x")
    manifest["files"]["../secret.txt"] = {"bytes": 1, "sha256": hashlib.sha256(b"x").hexdigest()}
    (target / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert not ckpt.is_complete(target)
    with pytest.raises(ckpt.CheckpointDamaged):
        ckpt.read_checkpoint(target)


@pytest.mark.parametrize("damage", ["checksum", "missing"])
def test_a_damaged_best_gives_way_to_the_newest_good_step(tmp_path, damage):
    d = _steps(tmp_path, 2, 4, 6)
    _write(d / "best", 3.0)
    _flip_last_byte(d / "step-000006" / "state.json")
    if damage == "checksum":
        _flip_last_byte(d / "best" / "trainable.safetensors")
    else:
        shutil.rmtree(d / "best")
    lines: list[str] = []
    source, tensors = ckpt.read_best_or_latest(d, lines.append)
    assert source == d / "step-000004" and torch.equal(tensors["w"], torch.full((3,), 4.0))
    assert any("best" in line for line in lines) and any("step-000006" in line for line in lines)


# ---- through the trainer ---------------------------------------------------------------------------

def _trainer(root: Path, settings_hash: str | None = None, eval_fn=None, **opts):
    from helpers.tiny import tiny_bert, tiny_bert_tokenizer, write_glue_task

    from peftkit.config.schema import TrainArgs
    from peftkit.methods import create_method
    from peftkit.tasks.glue import PadCollator, get_task, load_rows, tokenize_rows
    from peftkit.train.trainer import Trainer

    torch.manual_seed(0)
    method = create_method("bitfit")
    model = method.prepare(tiny_bert())
    tok = tiny_bert_tokenizer(root / "tok")
    write_glue_task(root / "glue", "sst2", 32, 8)
    data = tokenize_rows(get_task("sst2"), load_rows("sst2", "train", str(root / "glue")), tok, 16)
    options = TrainArgs(**{"max_steps": 4, "batch_size": 8, "lr": 1e-2, "save_every": 2, "log_every": 1,
                              "keep_last": 5, **opts})
    lines: list[str] = []
    trainer = Trainer(model, method, options, root / "run", data, PadCollator(0, False), eval_fn=eval_fn,
                      best_metric="score" if eval_fn else None, log=lines.append, settings_hash=settings_hash)
    return trainer, lines


def test_resume_refuses_a_checkpoint_of_other_settings_unless_allowed(tmp_path):
    first, _ = _trainer(tmp_path, settings_hash=ckpt.settings_digest({"lr": 0.01, "method": "bitfit"}), max_steps=2)
    first.train()
    other = ckpt.settings_digest({"lr": 0.5, "method": "bitfit"})
    second, lines = _trainer(tmp_path, settings_hash=other)
    with pytest.raises(UserError) as e:
        second.resume("auto")
    assert first.settings_hash in str(e.value) and other in str(e.value) and "train.resume_any=true" in str(e.value)
    assert second.step == 0
    second.resume("auto", allow_foreign=True)
    assert second.step == 2 and any("warning" in line and first.settings_hash in line for line in lines)
    same, _ = _trainer(tmp_path, settings_hash=first.settings_hash)
    same.resume(str(tmp_path / "run" / "checkpoints" / "step-000002"))
    assert same.step == 2


def test_digest_ignores_key_order_and_sees_values():
    assert ckpt.settings_digest({"a": 1, "b": [1, 2]}) == ckpt.settings_digest({"b": [1, 2], "a": 1})
    assert ckpt.settings_digest({"a": 1}) != ckpt.settings_digest({"a": 2})


def test_resume_auto_skips_a_damaged_newest_and_an_explicit_damaged_path_is_a_user_error(tmp_path):
    first, _ = _trainer(tmp_path)
    first.train()
    ckpts = tmp_path / "run" / "checkpoints"
    _flip_last_byte(ckpts / "step-000004" / "optimizer.pt")
    second, lines = _trainer(tmp_path)
    second.resume("auto")
    assert second.step == 2 and any("skipping damaged checkpoint" in line and "step-000004" in line for line in lines)
    third, _ = _trainer(tmp_path)
    with pytest.raises(UserError, match="cannot resume from .*step-000004.*train.resume=auto"):
        third.resume(str(ckpts / "step-000004"))


def test_select_best_with_a_damaged_best_takes_the_last_good_step(tmp_path, monkeypatch):
    """Evaluation peaks at step 1; its `best` copy is damaged on disk: the final model is the step-4 checkpoint."""
    scores = iter([1.0, 0.5, 0.4, 0.3])
    real_write = ckpt.write_checkpoint

    def write_then_damage_best(target, *args):
        out = real_write(target, *args)
        if Path(target).name == "best":
            _flip_last_byte(Path(target) / "trainable.safetensors")
        return out

    monkeypatch.setattr(ckpt, "write_checkpoint", write_then_damage_best)
    trainer, lines = _trainer(tmp_path, eval_fn=lambda model: {"score": next(scores)}, eval_every=1, save_every=2)
    summary = trainer.train()
    assert summary["best_step"] == 1
    step4, _, _ = ckpt.read_checkpoint(tmp_path / "run" / "checkpoints" / "step-000004")
    now = trainer.method.trainable_state(trainer.raw_model)
    assert_identical({k: v.cpu() for k, v in now.items()}, step4)
    assert any("best checkpoint" in line and "damaged" in line for line in lines)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("heal"))


def test_finetune_resume_auto_over_a_damaged_newest_checkpoint_is_bit_identical(setup):
    """The whole command: step-6 damaged after a finished run; resume=auto retrains from step 4 to the same weights."""
    from peftkit.commands.train import finetune

    path = write_recipe(Path(setup["root"]) / "heal.yaml", recipe(setup, "heal", keep_last=3, select_best=False))
    run = Path(setup["root"]) / "heal"
    finetune(path, [])
    reference = final_state(run)
    _flip_last_byte(run / "checkpoints" / "step-000006" / "trainable.safetensors")
    shutil.rmtree(run / "final")
    finetune(path, ["train.resume=auto"])
    log = (run / "train.log").read_text()
    assert "skipping damaged checkpoint" in log and f"resumed from {run / 'checkpoints' / 'step-000004'}" in log
    assert_identical(reference, final_state(run))
    ckpt.read_checkpoint(run / "checkpoints" / "step-000006")  # rewritten whole by the resumed run
