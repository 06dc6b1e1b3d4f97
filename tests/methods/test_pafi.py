"""PaFi invariants (docs/methods/pafi-hiwi.md): exact fraction, smallest |w| chosen, frozen entries bit-identical
after real AdamW steps with weight decay, save -> load -> same logits, merged == unmerged, base architecture."""

import copy

import pytest
import torch
from helpers.tiny import assert_base_architecture, tiny_bert, tiny_llama

from peftkit.errors import UserError
from peftkit.methods import create_method
from peftkit.methods.base import is_head_parameter
from peftkit.methods.pafi import PaFi, PaFiOptions

METHOD = create_method("pafi")
BATCH = {"input_ids": torch.tensor([[2, 7, 9, 11, 3, 0], [2, 5, 6, 8, 12, 3]]),
         "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]),
         "labels": torch.tensor([0, 1])}


def pool_params(model, include_bias=False):
    """Independent pool: Linear weights (and biases) inside encoder.layer, by name, in model order."""
    out = {}
    for name, module in model.named_modules():
        if ".layer." in name and isinstance(module, torch.nn.Linear):
            out[f"{name}.weight"] = module.weight.detach().clone()
            if include_bias:
                out[f"{name}.bias"] = module.bias.detach().clone()
    return out


def chosen_entries(model):
    """(tensor name, flat index) pairs the prepared model trains."""
    from peftkit.methods.pafi import sparse_entries

    return {(name, int(i)) for name, e in sparse_entries(model).items() for i in e.indices}


def expected_smallest(tensors: dict, k: int):
    """The k smallest |w| over the concatenation, ties to the lower position, by a stable full sort."""
    names = list(tensors)
    flat = torch.cat([tensors[n].abs().reshape(-1) for n in names])
    order = torch.sort(flat, stable=True).indices[:k]
    offsets, total = [], 0
    for n in names:
        offsets.append((total, n))
        total += tensors[n].numel()
    out = set()
    for pos in order.tolist():
        start, name = max((o, n) for o, n in offsets if o <= pos)
        out.add((name, pos - start))
    return out


def train_steps(model, method, steps=4, lr=5e-2, weight_decay=0.5):
    model.train()
    opt = torch.optim.AdamW(method.param_groups(model, weight_decay), lr=lr)
    for _ in range(steps):
        loss = method.compute_loss(model, BATCH)
        loss.backward()
        opt.step()
        opt.zero_grad()
        method.after_optimizer_step(model)
    return opt


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=BATCH["input_ids"], attention_mask=BATCH["attention_mask"]).logits


@pytest.mark.parametrize("rho", [0.005, 0.05, 0.3, 0.999])
def test_trains_exactly_round_rho_n_entries(rho):
    base = tiny_bert()
    n = sum(t.numel() for t in pool_params(base).values())
    model = PaFi(PaFiOptions(rho=rho)).prepare(base)
    assert len(chosen_entries(model)) == round(rho * n)
    head = {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert head <= trainable
    assert all(name in head or name.endswith(".values") for name in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == round(rho * n) + 32 * 2 + 2 + 32 * 32 + 32


def test_smallest_one_entry_edge():
    base = tiny_bert()
    n = sum(t.numel() for t in pool_params(base).values())
    model = PaFi(PaFiOptions(rho=1.0 / n)).prepare(copy.deepcopy(base))
    assert chosen_entries(model) == expected_smallest(pool_params(base), 1)
    with pytest.raises(UserError, match="selects no entry"):
        PaFi(PaFiOptions(rho=0.4 / n)).prepare(copy.deepcopy(base))


@pytest.mark.parametrize("include_bias", [False, True])
def test_chosen_are_exactly_the_smallest_magnitudes_with_ties(include_bias):
    base = tiny_bert()
    with torch.no_grad():  # coarse grid -> many exact ties, so tie-breaking must be deterministic too
        for t in pool_params(base, include_bias):
            p = base.get_parameter(t)
            p.copy_((p * 50).round() / 50)
    tensors = pool_params(base, include_bias)
    k = round(0.1 * sum(t.numel() for t in tensors.values()))
    model = PaFi(PaFiOptions(rho=0.1, include_bias=include_bias)).prepare(copy.deepcopy(base))
    assert chosen_entries(model) == expected_smallest(tensors, k)


def test_per_layer_ranks_within_each_matrix():
    base = tiny_bert()
    model = PaFi(PaFiOptions(rho=0.07, per_layer=True)).prepare(copy.deepcopy(base))
    expected = set()
    for name, t in pool_params(base).items():
        expected |= expected_smallest({name: t}, round(0.07 * t.numel()))
    assert chosen_entries(model) == expected


def test_patterns_restrict_the_pool():
    base = tiny_bert()
    model = PaFi(PaFiOptions(rho=0.1, patterns=["intermediate"])).prepare(copy.deepcopy(base))
    names = {name for name, _ in chosen_entries(model)}
    assert names == {"bert.encoder.layer.0.intermediate.dense.weight", "bert.encoder.layer.1.intermediate.dense.weight"}
    assert len(chosen_entries(model)) == round(0.1 * 2 * 64 * 32)
    with pytest.raises(UserError, match="no weight matrices"):
        PaFi(PaFiOptions(patterns=["no_such_module"])).prepare(copy.deepcopy(base))


def test_options_validate():
    assert create_method("pafi").options == PaFiOptions()
    for rho in (0.0, 1.0, -0.1, 2.0):
        with pytest.raises(UserError, match="method.rho"):
            create_method("pafi", rho=rho)
    with pytest.raises(UserError, match="method.patterns: .*not a valid regular expression"):
        create_method("pafi", patterns=["(unclosed"])


def test_outside_the_mask_bit_identical_after_adamw_with_weight_decay():
    base = tiny_bert()
    model = PaFi(PaFiOptions(rho=0.05)).prepare(copy.deepcopy(base))
    opt = train_steps(model, METHOD)
    # AdamW holds state only for the k values and the head, never for a whole matrix.
    state_numel = sum(s["exp_avg"].numel() for s in opt.state.values())
    assert state_numel == len(chosen_entries(model)) + 32 * 2 + 2 + 32 * 32 + 32  # k values + classifier + pooler
    chosen = chosen_entries(model)
    merged = METHOD.merge(model)
    base_state, merged_state = base.state_dict(), merged.state_dict()
    changed_inside = 0
    for name, before in base_state.items():
        after = merged_state[name]
        if is_head_parameter(name):
            continue
        inside = torch.zeros(before.numel(), dtype=torch.bool)
        inside[[i for n, i in chosen if n == name]] = True
        assert torch.equal(after.reshape(-1)[~inside], before.reshape(-1)[~inside]), name
        changed_inside += int((after.reshape(-1)[inside] != before.reshape(-1)[inside]).sum())
    assert changed_inside > 0.9 * len(chosen)  # and the masked entries did train


def test_checkpoint_state_roundtrip_and_save_load_reproduce_logits(tmp_path):
    model = PaFi(PaFiOptions(rho=0.05)).prepare(tiny_bert())
    train_steps(model, METHOD)
    trained = logits(model)
    opts = PaFiOptions(rho=0.05)

    resumed = PaFi(opts).prepare(tiny_bert())
    METHOD.load_trainable_state(resumed, METHOD.trainable_state(model))
    assert torch.equal(logits(resumed), trained)

    PaFi(opts).save(model, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter.safetensors"))
    assert {k for k in saved if not is_head_parameter(k)} == {
        f"{n}{suffix}" for n in {name for name, _ in chosen_entries(model)} for suffix in (".indices", ".values")}
    assert sum(v.numel() for k, v in saved.items() if k.endswith(".values")) == len(chosen_entries(model))
    fresh = tiny_bert()
    torch.nn.init.normal_(fresh.classifier.weight)  # a different random head: the saved one must win
    loaded = PaFi(opts).load(fresh, tmp_path)
    assert torch.equal(logits(loaded), trained)


def test_load_rejects_a_mask_from_another_base():
    model = PaFi(PaFiOptions(rho=0.05)).prepare(tiny_bert(seed=0))
    other = PaFi(PaFiOptions(rho=0.05)).prepare(tiny_bert(seed=3))
    with pytest.raises(ValueError, match="mask"):
        METHOD.load_trainable_state(other, METHOD.trainable_state(model))


def test_merged_equals_unmerged_and_has_the_base_architecture():
    base = tiny_bert()
    model = PaFi(PaFiOptions(rho=0.05, include_bias=True)).prepare(copy.deepcopy(base))
    train_steps(model, METHOD)
    unmerged = logits(model)
    merged = METHOD.merge(model)
    assert torch.equal(logits(merged), unmerged)
    assert_base_architecture(merged, base)


def test_decoder_family_and_unchanged_forward_at_start():
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        before = base(input_ids=ids).logits
    model = PaFi(PaFiOptions(rho=0.01)).prepare(copy.deepcopy(base))
    n = sum(p.numel() for name, p in base.named_parameters() if ".layers." in name and p.ndim == 2)
    assert len(chosen_entries(model)) == round(0.01 * n)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_weight_decay_reaches_the_sparse_weight_entries_but_not_biases():
    """AdamW with a zero gradient moves a parameter only by decoupled weight decay: p <- p·(1 - lr·wd).
    The trained entries of weight matrices decay like full fine-tuning's weights; bias entries and the head's
    biases do not (PaFi's values are 1-D tensors, so the usual 'ndim < 2 -> no decay' rule would miss them)."""
    from peftkit.methods.pafi import sparse_entries

    model = PaFi(PaFiOptions(rho=0.05, include_bias=True)).prepare(tiny_bert())
    lr, wd = 0.1, 0.5
    opt = torch.optim.AdamW(METHOD.param_groups(model, wd), lr=lr)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in trainable.values())
    before = {n: p.detach().clone() for n, p in trainable.items()}
    for p in trainable.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    entries = sparse_entries(model)
    weights = [n for n in entries if n.endswith(".weight")]
    biases = [n for n in entries if n.endswith(".bias")]
    assert weights and biases
    for name in weights:
        values = entries[name].values
        name_of_values = next(n for n, p in trainable.items() if p is values)
        torch.testing.assert_close(values.detach(), before[name_of_values] * (1 - lr * wd))
    for name in biases:
        values = entries[name].values
        name_of_values = next(n for n, p in trainable.items() if p is values)
        assert torch.equal(values.detach(), before[name_of_values])
    torch.testing.assert_close(model.classifier.weight.detach(), before["classifier.weight"] * (1 - lr * wd))
    assert torch.equal(model.classifier.bias.detach(), before["classifier.bias"])
