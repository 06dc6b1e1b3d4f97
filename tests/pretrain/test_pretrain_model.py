"""Invariants of docs/methods/3ml.md: no masks = vanilla RoBERTa; early layers see exactly the unmasked tokens at
their original positions; [MASK] slots come back in order; padding and uneven mask counts are handled."""

import pytest
import torch
from helpers.pretrain import MASK_ID, corrupted, tiny_config
from transformers import RobertaForMaskedLM

from peftkit.models.families import layers_of
from peftkit.pretrain.model import MaskedLMPretrainer
from peftkit.pretrain.shorten import shorten


def _vanilla(config, seed=0):
    torch.manual_seed(seed)
    return RobertaForMaskedLM(config).eval()


@pytest.mark.parametrize("variant", ["mlm", "3ml-self"])
def test_masking_rate_zero_equals_plain_roberta_mlm(variant):
    config = tiny_config()
    reference = _vanilla(config)
    model = MaskedLMPretrainer(config, variant, full_length_layers=1, mlm=reference).eval()
    ids, batch = corrupted(mask_rate=0.0)
    assert not batch.removed.any() and (batch.labels == -100).all()
    # nothing corrupted, every real ordinary token predicted
    labels = torch.where(batch.attention_mask.bool() & (ids > 4), ids, torch.full_like(ids, -100))
    ours = model(ids, batch.attention_mask, labels)
    theirs = reference(input_ids=ids, attention_mask=batch.attention_mask, labels=labels)
    targets = labels != -100
    torch.testing.assert_close(ours.logits, theirs.logits[targets], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)


def test_appending_before_layer_one_equals_vanilla_with_mask_tokens():
    """3ML-self with Le = 0 is vanilla MLM once the [MASK] vector equals the [MASK] word (+ type) embedding."""
    config = tiny_config()
    reference = _vanilla(config)
    model = MaskedLMPretrainer(config, "3ml-self", full_length_layers=config.num_hidden_layers, mlm=reference).eval()
    emb = reference.roberta.embeddings
    with torch.no_grad():
        model.mask_embedding.copy_(emb.word_embeddings.weight[MASK_ID] + emb.token_type_embeddings.weight[0])
    _, batch = corrupted(mask_rate=0.5)
    assert batch.removed.sum() > 5
    ours = model(**batch.as_batch())
    theirs = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    torch.testing.assert_close(ours.logits, theirs.logits[batch.labels != -100], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["3ml-self", "3ml-cross"])
def test_early_layers_see_exactly_the_unmasked_tokens_at_original_positions(variant):
    config = tiny_config(layers=3)
    model = MaskedLMPretrainer(config, variant, full_length_layers=1).eval()
    ids, batch = corrupted(rows=4, length=24, mask_rate=0.5)
    seen = {}

    def embed_hook(module, args, kwargs, output):
        seen["ids"], seen["positions"] = kwargs["input_ids"], kwargs["position_ids"]

    lengths = []
    handles = [model.mlm.roberta.embeddings.register_forward_hook(embed_hook, with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
                for layer in layers_of(model.mlm)]
    model(**batch.as_batch())
    for h in handles:
        h.remove()

    keep = batch.attention_mask.bool() & ~batch.removed
    kept_counts = keep.sum(dim=1)
    assert (kept_counts == batch.attention_mask.sum(1) - batch.removed.sum(1)).all()
    assert len(set(kept_counts.tolist())) > 1  # rows really lose different numbers of tokens
    short_length = int(kept_counts.max())
    assert lengths[: model.early_layers] == [short_length] * model.early_layers
    assert lengths[model.early_layers:] == [ids.shape[1]] * (config.num_hidden_layers - model.early_layers)
    for r in range(ids.shape[0]):
        n = int(kept_counts[r])
        original_positions = keep[r].nonzero().squeeze(1)
        assert torch.equal(seen["ids"][r, :n], batch.input_ids[r][keep[r]])  # no [MASK] id among them
        assert not (seen["ids"][r, :n] == MASK_ID).any()
        # RoBERTa numbers positions from padding_idx + 1 = 2
        assert torch.equal(seen["positions"][r, :n], original_positions + 2)


def test_mask_slots_are_reinserted_in_order_at_their_positions():
    config = tiny_config(layers=3)
    model = MaskedLMPretrainer(config, "3ml-self", full_length_layers=1).eval()
    layers = layers_of(model.mlm)
    _, batch = corrupted(rows=3, length=24, mask_rate=0.5)
    captured = {}
    h1 = layers[model.early_layers - 1].register_forward_hook(lambda m, a, out: captured.__setitem__("short", out))
    h2 = layers[model.early_layers].register_forward_pre_hook(lambda m, args: captured.__setitem__("full", args[0]))
    model(**batch.as_batch())
    h1.remove(), h2.remove()

    keep = batch.attention_mask.bool() & ~batch.removed
    full, short = captured["full"], captured["short"]
    positions = model.position_ids(batch.attention_mask)
    expected_slots = model.mask_slots(positions)
    for r in range(full.shape[0]):
        n = int(keep[r].sum())
        torch.testing.assert_close(full[r][keep[r]], short[r, :n])  # unmasked states in their original order
        removed = batch.removed[r]
        torch.testing.assert_close(full[r][removed], expected_slots[r][removed])
    # the slot states differ by position, so a slot put at a wrong place would not match
    assert not torch.allclose(expected_slots[0, 1], expected_slots[0, 2])


@pytest.mark.parametrize("variant", ["mlm", "3ml-self", "3ml-cross"])
def test_batch_with_padding_equals_rows_run_alone(variant):
    config = tiny_config()
    model = MaskedLMPretrainer(config, variant, full_length_layers=1).eval()
    _, batch = corrupted(rows=3, length=24, mask_rate=0.5)
    together = model(**batch.as_batch()).logits
    alone = []
    for r in range(3):
        n = int(batch.attention_mask[r].sum())
        row = {k: v[r : r + 1, :n] for k, v in batch.as_batch().items()}
        alone.append(model(**row).logits)
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-5)


def test_gradients_reach_mask_vector_decoder_and_encoder():
    model = MaskedLMPretrainer(tiny_config(), "3ml-cross", decoder_layers=2).train()
    _, batch = corrupted(mask_rate=0.5)
    model(**batch.as_batch()).loss.backward()
    assert model.mask_embedding.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert model.mlm.roberta.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_shorten_keeps_order_and_scatter_restores_positions():
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(4, 10, generator=g) > 0.4
    short = shorten(keep)
    values = torch.arange(40.0).view(4, 10, 1)
    gathered = short.gather(values)
    assert gathered.shape[1] == int(keep.sum(1).max())
    for r in range(4):
        n = int(keep[r].sum())
        assert torch.equal(gathered[r, :n, 0], values[r, keep[r], 0])
        assert short.mask[r].sum() == n and short.mask[r, :n].all()
    filled = short.scatter_into(gathered, torch.full_like(values, -1.0))
    assert torch.equal(filled[keep], values[keep]) and (filled[~keep] == -1).all()


def test_vanilla_head_runs_on_targets_only():
    model = MaskedLMPretrainer(tiny_config(), "mlm").eval()
    ids, batch = corrupted(mask_rate=0.15)
    calls = []
    h = model.mlm.lm_head.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape))
    model(**batch.as_batch())
    h.remove()
    assert calls == [torch.Size([int((batch.labels != -100).sum()), model.config.hidden_size])]


def test_cross_decoder_stream_holds_encoded_tokens_and_mask_slots():
    """3ML-cross: the decoder's input has the encoder's output at every kept slot (in order) and the
    [MASK]+position state at every removed slot; the encoder states are also its cross-attention memory."""
    config = tiny_config(layers=2)
    model = MaskedLMPretrainer(config, "3ml-cross", decoder_layers=2).eval()
    _, batch = corrupted(rows=3, length=24, mask_rate=0.5)
    captured = {}

    def decoder_hook(module, args, kwargs):
        captured["stream"] = args[0]
        captured["memory"] = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]

    h1 = layers_of(model.mlm)[-1].register_forward_hook(lambda m, a, out: captured.__setitem__(
        "encoded", out[0] if isinstance(out, tuple) else out))
    h2 = model.decoder.layers[0].register_forward_pre_hook(decoder_hook, with_kwargs=True)
    model(**batch.as_batch())
    h1.remove(), h2.remove()

    keep = batch.attention_mask.bool() & ~batch.removed
    stream, encoded = captured["stream"], captured["encoded"]
    torch.testing.assert_close(captured["memory"], encoded)
    expected_slots = model.mask_slots(model.position_ids(batch.attention_mask))
    for r in range(stream.shape[0]):
        n = int(keep[r].sum())
        torch.testing.assert_close(stream[r][keep[r]], encoded[r, :n])
        torch.testing.assert_close(stream[r][batch.removed[r]], expected_slots[r][batch.removed[r]])
    # the kept slots really differ from a [MASK] slot at the same position
    assert not torch.allclose(stream[keep], expected_slots[keep])
