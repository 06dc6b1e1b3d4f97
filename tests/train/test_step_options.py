"""Training-step options: mixed precision (autocast, fp16 scaler), gradient checkpointing, fused and 8-bit AdamW."""

import copy

import pytest
import torch

from peftkit.config.schema import TrainArgs
from peftkit.errors import UserError
from peftkit.methods import create_method
from peftkit.train.trainer import Trainer


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(5, 64, (4, 12), generator=g), "attention_mask": torch.ones(4, 12, dtype=torch.long),
            "labels": torch.tensor([0, 1, 1, 0])}


def _steps(model, method, n=3, **options):
    trainer = Trainer.stepper(model, method, TrainArgs(lr=1e-3, warmup_ratio=0.0, schedule="constant", **options))
    return [trainer.optimizer_step([_batch(i)])[0] for i in range(n)], trainer


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_stays_close_to_fp32(precision):
    from helpers.tiny import tiny_bert

    base = tiny_bert()
    method = create_method("full")
    fp32, _ = _steps(method.prepare(copy.deepcopy(base)), method)
    mixed, trainer = _steps(method.prepare(copy.deepcopy(base)), method, precision=precision)
    assert trainer.precision == precision and trainer.autocast_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert (trainer.scaler is not None) == (precision == "fp16")
    assert all(torch.isfinite(torch.tensor(mixed)))
    assert mixed[0] == pytest.approx(fp32[0], abs=0.05)  # the same start, rounded differently
    assert mixed != fp32  # autocast really ran in the low precision
    assert next(trainer.raw_model.parameters()).dtype == torch.float32  # weights stay fp32 (mixed precision)


def test_explicit_precision_is_the_users(monkeypatch):
    """An explicit precision is kept whatever the machine (auto is measured: tests/train/test_precision_auto.py)."""
    from peftkit.utils import env

    monkeypatch.setattr(env, "cpu_bf16_failure", lambda: "pack_vnni2 is only supported when avx512 is supported")
    monkeypatch.setattr(env, "matmul_seconds", lambda *args, **kwargs: pytest.fail("an explicit precision is not timed"))
    for precision in ("fp32", "bf16", "fp16"):
        assert env.resolve_precision(precision) == (precision, "set by train.precision")


def test_bf16_probe_reports_a_kernel_that_raises(monkeypatch):
    from peftkit.utils import env

    def refuse(*args, **kwargs):
        raise RuntimeError("pack_vnni2 is only supported when avx512 is supported\nmore detail")

    env.cpu_bf16_failure.cache_clear()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", refuse)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        assert env.cpu_bf16_failure() == "pack_vnni2 is only supported when avx512 is supported"
        assert env.bf16_or_fp32_dtype_name() == "float32"
    finally:
        env.cpu_bf16_failure.cache_clear()
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # where the probe's kernels run, they are the ones a bf16 step uses: it then reports no failure
    if env.cpu_bf16_failure() is None:
        q = torch.randn(1, 2, 64, 32, dtype=torch.bfloat16, requires_grad=True)
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
        assert env.bf16_or_fp32_dtype_name() == "bfloat16"


@pytest.mark.parametrize("method_name", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_step_with_fewer_saved_bytes(method_name):
    from helpers.tiny import tiny_bert

    from peftkit.bench.memory import saved_tensor_bytes

    base = tiny_bert(layers=4)
    method = create_method(method_name)
    plain, checkpointed = method.prepare(copy.deepcopy(base)), method.prepare(copy.deepcopy(base))
    method.enable_gradient_checkpointing(checkpointed)
    for model in (plain, checkpointed):
        model.train()
    torch.manual_seed(0)
    saved_plain = saved_tensor_bytes(plain, _batch())
    torch.manual_seed(0)
    saved_checkpointed = saved_tensor_bytes(checkpointed, _batch())
    assert saved_checkpointed < 0.7 * saved_plain
    torch.manual_seed(1)
    losses_plain, _ = _steps(plain, method)
    torch.manual_seed(1)
    losses_checkpointed, _ = _steps(checkpointed, method)
    assert losses_checkpointed == pytest.approx(losses_plain, rel=1e-5)  # dropout replayed, same arithmetic


def test_meft_refuses_gradient_checkpointing():
    from helpers.tiny import tiny_bert

    method = create_method("meft1")
    with pytest.raises(UserError, match="gradient_checkpointing"):
        method.enable_gradient_checkpointing(method.prepare(tiny_bert()))


def test_adamw8bit_keeps_8_bit_state():
    from helpers.tiny import tiny_bert

    method = create_method("full")
    try:
        losses, trainer = _steps(method.prepare(tiny_bert(vocab_size=1000)), method, optimizer="adamw8bit")
    except (RuntimeError, NotImplementedError) as e:  # a bitsandbytes build without CPU 8-bit optimizers
        pytest.skip(f"bitsandbytes 8-bit AdamW is not available on this device: {e}")
    assert type(trainer.optimizer).__name__ == "AdamW8bit" and all(torch.isfinite(torch.tensor(losses)))
    states = [s for s in trainer.optimizer.state.values() if "state1" in s]
    assert states and any(s["state1"].dtype == torch.uint8 for s in states)  # tensors of >= 4096 entries


def test_fused_adamw_is_selected_and_steps_as_the_unfused_one():
    from helpers.tiny import tiny_bert

    from peftkit.train.trainer import make_optimizer

    method = create_method("full")
    _, trainer = _steps(method.prepare(tiny_bert()), method, n=1)
    assert trainer.optimizer.defaults["fused"] is True  # torch 2.13 has a fused AdamW kernel for the CPU

    models = [method.prepare(tiny_bert()) for _ in range(2)]
    for model in models:
        model.train()
        torch.manual_seed(0)
        model(**_batch()).loss.backward()
    options = TrainArgs(lr=1e-2, weight_decay=0.1)
    fused = make_optimizer(options, method.param_groups(models[0], 0.1))
    plain = torch.optim.AdamW(method.param_groups(models[1], 0.1), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, fused=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for _ in range(2):  # the second step uses the moments the first one left
        fused.step()
        plain.step()
    before = dict(tiny_bert().named_parameters())
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert not torch.equal(a, before[name])  # both stepped
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_forced_cpu_capability_compiles_into_a_cache_of_its_own(monkeypatch):
    import os

    from peftkit.utils.env import separate_compile_cache_per_capability

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert separate_compile_cache_per_capability() is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    avx2 = separate_compile_cache_per_capability()
    assert avx2 and avx2.endswith("-avx2") and os.environ["TORCHINDUCTOR_CACHE_DIR"] == avx2
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert separate_compile_cache_per_capability().endswith("-avx512")  # one folder per capability
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/chosen")
    assert separate_compile_cache_per_capability() is None  # the user's choice stands
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/chosen"
