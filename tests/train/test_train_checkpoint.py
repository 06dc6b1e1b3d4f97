import pytest
import torch

from peftkit.train import checkpoint as ckpt


def _write(path, value=1.0):
    return ckpt.write_checkpoint(path, {"w": torch.full((3,), value)}, {"rng": torch.get_rng_state()}, {"step": int(value)})


def test_roundtrip_and_manifest(tmp_path):
    target = _write(tmp_path / "step-000001")
    assert ckpt.is_complete(target)
    tensors, torch_state, state = ckpt.read_checkpoint(target)
    assert torch.equal(tensors["w"], torch.ones(3)) and state == {"step": 1}
    assert torch.equal(torch_state["rng"], torch.get_rng_state())


def test_replacing_keeps_one_complete_copy_and_no_temp_dirs(tmp_path):
    _write(tmp_path / "best", 1.0)
    _write(tmp_path / "best", 2.0)
    assert ckpt.read_checkpoint(tmp_path / "best")[2] == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_corruption_and_truncation_are_detected(tmp_path):
    target = _write(tmp_path / "step-000003")
    data = (target / "trainable.safetensors").read_bytes()
    (target / "trainable.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="checksum"):
        ckpt.read_checkpoint(target)
    (target / "optimizer.pt").write_bytes(b"short")
    assert not ckpt.is_complete(target)
    assert ckpt.step_checkpoints(tmp_path) == []


def test_incomplete_checkpoints_are_ignored_and_pruned(tmp_path):
    for step in (1, 2, 3):
        _write(tmp_path / f"step-{step:06d}", float(step))
    (tmp_path / "step-000004").mkdir()  # a crash before the manifest was written
    (tmp_path / ".tmp-step-000005-x").mkdir()
    assert [p.name for p in ckpt.step_checkpoints(tmp_path)] == ["step-000001", "step-000002", "step-000003"]
    ckpt.prune(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.step_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    assert not (tmp_path / ".tmp-step-000005-x").exists()


def test_schedule_shapes():
    from peftkit.train.schedule import lr_factor

    assert lr_factor(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "linear") == pytest.approx(0.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(70, 100, 10, "constant") == 1.0
