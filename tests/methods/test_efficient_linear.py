"""The memory-lean linear forwards of PaFi, HiWi (weights) and Super-Tuning: same outputs and gradients as the
assembled-weight autograd path, nothing weight-sized saved for backward, merged models unchanged."""

import contextlib
import copy

import pytest
import torch
from helpers.tiny import tiny_bert, tiny_llama

from peftkit.methods import create_method
from peftkit.methods.hiwi import HiWiOptions
from peftkit.methods.lora import LoRAOptions
from peftkit.methods.pafi import PaFiOptions
from peftkit.methods.supertuning import SuperTuningOptions
from peftkit.models.efficient_linear import (
    installed_modules,
    reference_forward,
    row_adapted_linear,
    sparse_linear,
)

TOL = {"rtol": 1e-5, "atol": 1e-6}
BERT_BATCH = {"input_ids": torch.tensor([[2, 7, 9, 11, 3, 0], [2, 5, 6, 8, 12, 3]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]),
              "labels": torch.tensor([0, 1])}


# ---- the functions on random tensors, against straight-line autograd ----------------------------------------
def straight_sparse(x, base, indices, values, bias, accumulate, layout):
    flat = base.reshape(-1)
    weight = (flat.scatter_add(0, indices, values) if accumulate else flat.scatter(0, indices, values)).view(base.shape)
    return torch.nn.functional.linear(x, weight.t() if layout == "conv1d" else weight, bias)


def straight_rows(x, base, down, up, bias, layout):
    weight = base + torch.relu(base @ down) @ up
    return x @ weight + bias if layout == "conv1d" else x @ weight.t() + bias


def grads_of(fn, tensors, forward_context=contextlib.nullcontext):
    with forward_context():
        out = fn(*tensors)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()  # a non-uniform upstream gradient
    return out.detach(), [None if t.grad is None else t.grad.clone() for t in tensors]


def leaves(*tensors, trainable):
    return [t.clone().requires_grad_(train) for t, train in zip(tensors, trainable)]


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_sparse_linear_matches_autograd(layout, accumulate):
    gen = torch.Generator().manual_seed(0)
    out_f, in_f = 7, 5
    shape = (in_f, out_f) if layout == "conv1d" else (out_f, in_f)
    x = torch.randn(3, 4, in_f, generator=gen)
    base = torch.randn(shape, generator=gen)
    indices = torch.randperm(base.numel(), generator=gen)[:9]
    if accumulate:  # scatter_add sums repeated positions; the gradient reaches every copy
        indices = torch.cat([indices, indices[:2]])
    values = torch.randn(indices.numel(), generator=gen)
    bias = torch.randn(out_f, generator=gen)
    for trainable in ([True, False, True, True], [False, False, True, False]):
        ref = grads_of(lambda x, b, v, c: straight_sparse(x, b, indices, v, c, accumulate, layout),
                       leaves(x, base, values, bias, trainable=trainable))
        stored = indices.int() if accumulate else indices  # peft keeps its positions as int32
        new = grads_of(lambda x, b, v, c: sparse_linear(x, b, stored, v, c, accumulate=accumulate, layout=layout),
                       leaves(x, base, values, bias, trainable=trainable))
        torch.testing.assert_close(new[0], ref[0], **TOL)
        for got, want in zip(new[1], ref[1]):
            assert (got is None) == (want is None)
            if want is not None:
                torch.testing.assert_close(got, want, **TOL)


def test_sparse_linear_gradcheck():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    base = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    indices = torch.tensor([0, 3, 7, 19])
    values = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: sparse_linear(x, base, indices, v, b), (x, values, bias))


def test_sparse_linear_under_autocast_rounds_like_autograd():
    # bf16 autocast: the forward's products run in bf16 and the backward's must too, as autograd's would
    gen = torch.Generator().manual_seed(3)
    x, base = torch.randn(4, 6, 16, generator=gen), torch.randn(8, 16, generator=gen)
    indices, values = torch.randperm(128, generator=gen)[:10], torch.randn(10, generator=gen)
    bias = torch.randn(8, generator=gen)
    def autocast():  # the forward only, as training loops do it: backward runs outside the autocast block
        return torch.autocast("cpu", dtype=torch.bfloat16)

    ref = grads_of(lambda x, v: straight_sparse(x, base, indices, v, bias, False, "linear"),
                   leaves(x, values, trainable=[True, True]), autocast)
    new = grads_of(lambda x, v: sparse_linear(x, base, indices, v, bias), leaves(x, values, trainable=[True, True]),
                   autocast)
    assert new[0].dtype == ref[0].dtype == torch.bfloat16
    torch.testing.assert_close(new[0], ref[0])
    for got, want in zip(new[1], ref[1]):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_row_adapted_linear_matches_autograd(layout):
    gen = torch.Generator().manual_seed(2)
    out_f, in_f, r = 6, 5, 3
    shape = (in_f, out_f) if layout == "conv1d" else (out_f, in_f)
    width = shape[1]
    x = torch.randn(2, 4, in_f, generator=gen)
    base = torch.randn(shape, generator=gen)
    down, up = torch.randn(width, r, generator=gen), torch.randn(r, width, generator=gen)
    bias = torch.randn(out_f, generator=gen)
    tensors = (x, base, down, up, bias)
    trainable = [True, False, True, True, False]
    ref = grads_of(lambda x, b, d, u, c: straight_rows(x, b, d, u, c, layout), leaves(*tensors, trainable=trainable))
    new = grads_of(lambda x, b, d, u, c: row_adapted_linear(x, b, d, u, c, layout=layout),
                   leaves(*tensors, trainable=trainable))
    torch.testing.assert_close(new[0], ref[0], **TOL)
    for got, want in zip(new[1], ref[1]):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, **TOL)


# ---- the methods on tiny models: installed forward vs the parametrized (assembled-weight) forward ------------
def tiny_gpt2(seed=0):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = AutoConfig.for_model("gpt2", vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  num_labels=2, pad_token_id=0)
    return AutoModelForSequenceClassification.from_config(config)


def batch_for(kind):
    if kind == "llama":
        ids = torch.tensor([[3, 17, 9, 44, 5, 60], [8, 2, 90, 31, 7, 12]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return BERT_BATCH


MODELS = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}
CASES = [  # (method, options, model kinds)
    ("pafi", PaFiOptions(rho=0.05), ("bert", "llama", "gpt2")),
    ("pafi", PaFiOptions(rho=0.05, include_bias=True, per_layer=True), ("bert", "gpt2")),
    ("hiwi", HiWiOptions(target="weight", r=4), ("bert", "llama", "gpt2")),
    ("supertuning", SuperTuningOptions(rho=0.05), ("bert", "llama")),
]
PARAMS = [pytest.param(m, o, k, id=f"{m}-{i}-{k}") for i, (m, o, ks) in enumerate(CASES) for k in ks]


def prepared(method_name, options, kind, seed=0):
    method = create_method(method_name, options)
    model = method.prepare(MODELS[kind](seed=seed))
    with torch.no_grad():  # move the trainable parameters off their identity start, so every path contributes
        gen = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return method, model


def loss_and_grads(model, batch, seed=0):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks on both paths
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


@pytest.mark.parametrize("method_name,options,kind", PARAMS)
def test_installed_forward_matches_parametrized_forward(method_name, options, kind):
    _, model = prepared(method_name, options, kind)
    assert installed_modules(model), "the method installed no memory-lean forward"
    batch = batch_for(kind)
    logits, grads = loss_and_grads(model, batch)
    with reference_forward(model):
        assert not installed_modules(model)
        ref_logits, ref_grads = loss_and_grads(model, batch)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=lambda m: f"{name}: {m}")
    assert installed_modules(model), "reference_forward did not put the installed forwards back"


@pytest.mark.parametrize("method_name,options,kind", PARAMS)
def test_merged_model_equals_trained_model(method_name, options, kind):
    method, model = prepared(method_name, options, kind)
    optimizer = torch.optim.AdamW(method.param_groups(model, 0.1), lr=1e-2)
    batch = batch_for(kind)
    model.train()
    for _ in range(2):  # trained through the installed forward and backward
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        unmerged = model(**inputs).logits
    with torch.enable_grad():  # grad on: HiWi's factored path, the one training runs
        factored = model(**inputs).logits.detach()
    merged = method.merge(model)
    assert not installed_modules(merged), "merge left an installed forward on a plain module"
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, unmerged, rtol=0, atol=0)
        torch.testing.assert_close(merged(**inputs).logits, factored, **TOL)


def test_deepcopy_keeps_each_copy_on_its_own_parameters():
    _, model = prepared("pafi", PaFiOptions(rho=0.05), "bert")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.mul_(3)
    assert len(installed_modules(twin)) == len(installed_modules(model))
    model.eval()
    twin.eval()
    inputs = {k: v for k, v in BERT_BATCH.items() if k != "labels"}
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, twin(**inputs).logits)


# ---- what autograd keeps for backward -----------------------------------------------------------------------
def saved_bytes_and_shapes(model, batch):
    """(bytes autograd keeps for backward in one training forward, shapes of the kept tensors); each storage
    counted once, parameter and buffer storages excluded (the definition of peftkit.bench.memory)."""
    model.train()
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages, shapes = {}, set()

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
            shapes.add(tuple(tensor.shape))
        return tensor

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values()), shapes


def adapted_weight_shapes(model):
    return {tuple(getattr(m, "base_layer", m).weight.shape) for m in installed_modules(model)}


SAVED_CASES = [("pafi", PaFiOptions(rho=0.05)), ("hiwi", HiWiOptions(target="weight", r=8)),
               ("supertuning", SuperTuningOptions(rho=0.05))]


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("method_name,options", SAVED_CASES, ids=[c[0] for c in SAVED_CASES])
def test_saved_for_backward_is_at_most_loras(method_name, options, kind):
    # wide layers and few tokens: a weight-sized saved tensor outweighs the activations
    model_kw = {"hidden": 64, "intermediate_size": 256} if kind == "bert" else {"hidden": 64}
    batch = batch_for(kind)
    lora = create_method("lora", LoRAOptions(r=8)).prepare(MODELS[kind](**model_kw))
    lora_bytes, _ = saved_bytes_and_shapes(lora, batch)
    model = create_method(method_name, options).prepare(MODELS[kind](**model_kw))
    new_bytes, new_shapes = saved_bytes_and_shapes(model, batch)
    with reference_forward(model):
        old_bytes, old_shapes = saved_bytes_and_shapes(model, batch)
    assert new_bytes <= lora_bytes < old_bytes, (new_bytes, lora_bytes, old_bytes)
    weights = adapted_weight_shapes(model)
    assert weights & old_shapes, "the assembled-weight path should keep assembled weights (is the measure blind?)"
    assert not weights & new_shapes, f"a weight-shaped tensor is kept for backward: {weights & new_shapes}"
