"""MEFT's CPU dropout: masks drawn once per seed and replayed in the reversible backward.

The blocks of peftkit.methods.meft draw their CPU dropout masks from 64-bit words seeded from torch's default
generator (``_keep_mask``) and write the self-attention out in training so that the attention-probability dropout
uses them too. Checked here: the masks are Bernoulli with the module's rate and unbiased; with nothing dropped the
written-out attention is the pretrained one (eager and sdpa, padding); the reversible backward regenerates exactly
the forward's masks, and its gradients equal plain autograd's with dropout on; no bernoulli_ is drawn.
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny_bert
from test_meft import assert_same_grads, batch_of, grads_of

from peftkit.methods import create_method
from peftkit.methods import meft as meft_module
from peftkit.methods.meft import MEFTOptions, meft_encoder_of

VARIANTS = ("meft1", "meft2", "meft3")


def test_keep_masks_are_bernoulli_with_the_rate_and_unbiased():
    torch.manual_seed(0)
    keep, scale = meft_module._keep_mask((1000, 1000), 0.1)
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    assert keep.float().mean().item() == pytest.approx(0.9, abs=0.002)  # 1e6 draws: std 3e-4
    assert scale == pytest.approx(1 / 0.9, rel=1e-4)
    # every 16-bit lane of a word is used: rows of 4 consecutive elements are not correlated
    lanes = keep.flatten()[:400_000].view(-1, 4).float()
    assert torch.allclose(lanes.mean(0), torch.full((4,), 0.9), atol=0.004)
    # the mean is unchanged: kept elements are scaled by the exact inverse keep probability
    assert (torch.where(keep, 1.0, 0.0) * scale).mean().item() == pytest.approx(1.0, abs=0.003)
    # the mask follows torch's default generator: same state, same mask; next draw, another mask
    torch.manual_seed(0)
    again, _ = meft_module._keep_mask((1000, 1000), 0.1)
    other, _ = meft_module._keep_mask((1000, 1000), 0.1)
    assert torch.equal(keep, again) and not torch.equal(keep, other)
    for p in (0.02, 0.5):
        kept, _ = meft_module._keep_mask((500, 500), p)
        assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.004)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_written_out_attention_is_the_pretrained_one_when_nothing_is_dropped(variant, attn, monkeypatch):
    base = tiny_bert(layers=2, initializer_range=0.2, attn_implementation=attn).double()
    model = create_method(variant, MEFTOptions()).prepare(base)
    batch = batch_of(model)  # rows 1 and 2 padded
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
    calls = []

    def keep_all(shape, p):
        calls.append((tuple(shape), p))
        return torch.ones(shape, dtype=torch.bool), 1.0

    monkeypatch.setattr(meft_module, "_keep_mask", keep_all)
    meft_encoder_of(model).train()  # the layers only: the embeddings' and the head's dropout stay off
    with torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    heads = model.config.num_attention_heads
    assert (tuple(batch["input_ids"].shape[:1]) + (heads,) + (9, 9), 0.1) in calls  # attention probabilities
    assert len(calls) == 2 * 3  # per layer: attention probabilities, attention output, FFN output


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_regenerates_the_forward_masks_and_matches_autograd_with_dropout(variant, monkeypatch):
    model = tiny_bert(layers=3, seed=1, initializer_range=0.2).double()
    model = create_method(variant, MEFTOptions()).prepare(model).train()  # dropout 0.1 everywhere
    batch = batch_of(model)
    drawn = []
    real_keep_mask = meft_module._keep_mask

    def recording(shape, p):
        keep, scale = real_keep_mask(shape, p)
        drawn.append(keep)
        return keep, scale

    monkeypatch.setattr(meft_module, "_keep_mask", recording)
    reversible = grads_of(model, batch, True)
    forward_masks, backward_masks = drawn[: len(drawn) // 2], drawn[len(drawn) // 2:]
    assert len(forward_masks) == 9 and len(backward_masks) == 9  # 3 layers x 3 dropouts, once each way
    # backward walks the blocks from the top and recomputes G before F: the same masks, block by block
    by_shape_forward = sorted((tuple(m.shape), m.sum().item()) for m in forward_masks)
    by_shape_backward = sorted((tuple(m.shape), m.sum().item()) for m in backward_masks)
    assert by_shape_forward == by_shape_backward
    assert any(not m.all() for m in forward_masks)  # something was dropped
    drawn.clear()
    plain = grads_of(model, batch, False)
    assert len(drawn) == 9
    assert_same_grads(model, reversible, plain, rtol=1e-6)
    # dropout is active: another seed gives other gradients
    other = grads_of(model, batch, False, seed=8)
    assert any(not torch.allclose(other[n], plain[n]) for n in plain)


def test_training_step_draws_no_bernoulli_masks_inside_the_blocks():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountBernoulli(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "bernoulli" in func.__name__ or "native_dropout" in func.__name__:
                CountBernoulli.count += 1
            return func(*args, **(kwargs or {}))

    model = create_method("meft1", MEFTOptions()).prepare(tiny_bert(layers=4)).train()
    batch = batch_of(model)
    with CountBernoulli():
        model(**batch).loss.backward()
    # the embeddings' and the head's dropout stay torch's own (2 masks); the 4 layers draw none
    assert CountBernoulli.count <= 2
