"""HiWi's bottleneck units can die (ReLU(P·W_down) is 0 on every row of P, so they never learn again): the count is
exact, a run warns when it grows, stops when every unit is dead, and the bias variant starts each unit with margin."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.reliability import invoke
from test_hiwi import BATCH, FFN, pretrained_like

from peftkit.errors import RunFailed
from peftkit.methods import hiwi
from peftkit.methods.hiwi import HiWi, HiWiOptions, adapted_tensors, dead_units, dead_units_by_tensor


def unit_is_dead_by_hand(rows: torch.Tensor, down: torch.Tensor, j: int) -> bool:
    """No row of the pretrained parameter gives unit j a positive pre-activation (one dot product per row)."""
    return all(float(torch.dot(row, down[:, j])) <= 0 for row in rows)


@pytest.mark.parametrize("target", ["bias", "weight"])
def test_dead_units_are_the_units_no_row_of_p_activates_and_they_get_no_gradient(target):
    base = pretrained_like()
    model = HiWi(HiWiOptions(target=target, r=4)).prepare(copy.deepcopy(base))
    adapters = adapted_tensors(model)
    killed = {f"{FFN[0]}.{target}": [0, 2], f"{FFN[3]}.{target}": [1]}
    with torch.no_grad():
        for name, units in killed.items():
            down, p = adapters[name].down, base.get_parameter(name)
            for j in units:  # against the bias's signs: h_j = -sum|P_i||W_ij|; a matrix has rows of both signs: zero
                down[:, j] = -torch.sign(p) * down[:, j].abs() if target == "bias" else 0.0
    by_hand = {name: sum(unit_is_dead_by_hand(base.get_parameter(name).detach().reshape(-1, a.down.shape[0]),
                                              a.down.detach(), j) for j in range(a.down.shape[1]))
               for name, a in adapters.items()}
    assert sum(by_hand.values()) == 3
    assert dead_units_by_tensor(model) == {name: (dead, 4) for name, dead in by_hand.items()}
    assert dead_units(model) == (3, 4 * len(FFN))

    # dead means frozen: one AdamW step (no weight decay) moves every live unit's W_up row and none of the dead ones'
    for a in adapters.values():
        torch.nn.init.normal_(a.up, std=0.1)  # W_up = 0 would hold W_down still on every unit
    before = {name: (a.down.detach().clone(), a.up.detach().clone()) for name, a in adapters.items()}
    optimizer = torch.optim.AdamW([p for a in adapters.values() for p in a.parameters()], lr=1e-2, weight_decay=0.0)
    model(**BATCH).loss.backward()
    optimizer.step()
    for name, a in adapters.items():
        for j in range(a.down.shape[1]):
            moved = not torch.equal(a.up[j], before[name][1][j]) or not torch.equal(a.down[:, j], before[name][0][:, j])
            assert moved != (j in killed.get(name, [])), (name, j)


def test_the_bias_init_starts_every_unit_alive_with_every_term_of_its_pre_activation_positive():
    base = pretrained_like()
    model = HiWi(HiWiOptions(target="bias", r=16)).prepare(copy.deepcopy(base))
    assert dead_units(model) == (0, 16 * len(FFN))
    for name, adapter in adapted_tensors(model).items():
        bias = base.get_parameter(name).detach()
        terms = bias[:, None] * adapter.down.detach()  # P_i · W_ij: all >= 0, so h_j = sum_i |P_i|·|W_ij|
        assert bool((terms >= 0).all()), name
        assert torch.allclose(bias @ adapter.down.detach(), bias.abs() @ adapter.down.detach().abs())


@pytest.fixture
def hiwi_bias_recipe(tiny_run_setup):
    """The tiny run's BERT with non-zero biases (HiWi cannot move a zero bias) and a HiWi-bias recipe for it."""
    recipe = tiny_run_setup("hiwi", max_steps=3, lr=1e-6, log_every=1, eval_every=3, save_every=3)
    model_dir = recipe["model"]["name"]
    pretrained_like().save_pretrained(model_dir)
    recipe["method"].update(target="bias", r=4)
    return recipe


def write(tmp_path, recipe) -> str:
    import yaml

    path = tmp_path / "hiwi-bias.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_a_run_warns_once_with_the_count_when_units_are_dead(hiwi_bias_recipe, tmp_path, monkeypatch):
    aligned, adapters_made = hiwi.aligned_with, []

    def some_units_dead(row, down):
        """The first adapter made starts with every unit dead, the others with their first unit dead."""
        out = aligned(row, down)
        out[:, :None if not adapters_made else 1] *= -1
        adapters_made.append(row)
        return out

    monkeypatch.setattr(hiwi, "aligned_with", some_units_dead)
    from peftkit.commands.train import finetune

    run = finetune(write(tmp_path, hiwi_bias_recipe), [])
    log = (run / "train.log").read_text()
    dead = 4 + (len(FFN) - 1)
    warning = (f"warning: HiWi: {dead} of {4 * len(FFN)} bottleneck units are dead at step 1 (ReLU(P·W_down) is 0 on "
               f"every row of P they see; they will not learn again); 1 of the {len(FFN)} adapted FFN biases have no "
               f"live unit left and are frozen")
    assert log.count(warning) == 1 and log.count("bottleneck units are dead") == 1, log  # not again at steps 2, 3


def test_a_run_whose_units_all_die_stops_as_a_run_failure_that_says_what_to_do(hiwi_bias_recipe, tmp_path, monkeypatch):
    aligned = hiwi.aligned_with
    monkeypatch.setattr(hiwi, "aligned_with", lambda row, down: -aligned(row, down))  # every unit starts dead
    result = invoke("finetune", write(tmp_path, hiwi_bias_recipe))
    assert result.exit_code == 1, result.output
    assert f"run failed: HiWi target='bias': all {4 * len(FFN)} bottleneck units" in result.output
    assert "at step 1" in result.output and "lower train.lr" in result.output
    assert not (tmp_path / "run" / "final").exists()
    method = HiWi(HiWiOptions(target="bias", r=2))
    with pytest.raises(RunFailed, match="at step 5"):  # the method's own verdict, whatever a trainer does with it
        method.training_note(method.prepare(pretrained_like()), 5)


def test_zero_biases_are_not_counted_so_a_model_without_them_trains_its_head(tiny_run_setup, tmp_path):
    recipe = tiny_run_setup("hiwi", max_steps=2, log_every=1, eval_every=2, save_every=2)  # from_config: zero biases
    recipe["method"].update(target="bias", r=4)
    from peftkit.commands.train import finetune

    with pytest.warns(UserWarning, match="all 4 FFN biases are zero"):
        run = finetune(write(tmp_path, recipe), [])
    assert (run / "final").is_dir() and "dead" not in (run / "train.log").read_text()
