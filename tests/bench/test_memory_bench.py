"""The saved-bytes counter of the memory bench: each storage once, parameters and buffers excluded."""

from types import SimpleNamespace

import torch
from torch import nn

from peftkit.bench.memory import make_batch, saved_tensor_bytes


class TwoLinears(nn.Module):
    """loss = sum(tanh(x W1) W2); W1 frozen. Saved: tanh's output (also W2's input, one storage)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 16, bias=False).requires_grad_(False)
        self.second = nn.Linear(16, 2, bias=False)
        self.register_buffer("scale", torch.ones(2))

    def forward(self, x):
        hidden = torch.tanh(self.first(x))
        return SimpleNamespace(loss=(self.second(hidden) * self.scale).sum())


def test_counts_each_activation_storage_once_and_no_parameters():
    model = TwoLinears()
    x = torch.randn(5, 8)
    # tanh saves its output (5x16 floats); the second Linear saves the same tensor as its input -> counted once.
    # The weights saved by the Linears and the buffer are not activations.
    assert saved_tensor_bytes(model, {"x": x}) == 5 * 16 * 4
    assert model.second.weight.grad is None  # the counter leaves no gradients behind


def test_batches_have_the_requested_shape():
    batch = make_batch(vocab_size=100, batch=3, seq=7)
    assert batch["input_ids"].shape == (3, 7) and batch["labels"].shape == (3,)
    assert int(batch["input_ids"].max()) < 100


def test_step_flops_counts_the_step_and_falls_back_for_meft():
    import torch
    from helpers.tiny import tiny_bert

    from peftkit.bench.memory import step_flops
    from peftkit.methods import create_method

    batch = {"input_ids": torch.randint(5, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
             "labels": torch.tensor([0, 1])}
    full = create_method("full")
    counted, how = step_flops(full, full.prepare(tiny_bert()), batch)
    assert how == "counted" and counted > 0
    meft = create_method("meft1")
    tripled, how = step_flops(meft, meft.prepare(tiny_bert()), batch)
    assert how == "forward x3" and tripled > 0
    # full fine-tuning's backward computes input and weight gradients: about twice its forward
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        full.prepare(tiny_bert())(**batch)
    assert 2.5 * counter.get_total_flops() < counted < 3.5 * counter.get_total_flops()


def test_row_labels_carry_method_options_and_the_recipes_meft3_setting():
    from peftkit.bench.memory import label_of, parse_label, recipe_contenders

    assert label_of("meft3", {"num_rev_layers": 3, "segment_layers": 2}) == "meft3[num_rev_layers=3,segment_layers=2]"
    assert parse_label("meft3[num_rev_layers=3,segment_layers=2]") == ("meft3", {"num_rev_layers": 3, "segment_layers": 2})
    assert parse_label("lora+gc") == ("lora+gc", {})
    assert parse_label("meft3[stream_arithmetic=float]") == ("meft3", {"stream_arithmetic": "float"})
    # the shipped MEFT GLUE recipes train the default configuration (every layer reversible, fixed-point streams)
    assert recipe_contenders() == []


def test_gradient_error_columns_flag_reconstruction_beyond_fp32_rounding():
    import warnings

    from helpers.tiny import tiny_bert

    from peftkit.bench.memory import gradient_errors, prepare

    batch = {"input_ids": torch.randint(5, 64, (2, 12), generator=torch.Generator().manual_seed(0)),
             "labels": torch.tensor([0, 1])}

    def errors(label, layers=6):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            method, model = prepare(label, tiny_bert(layers=layers, initializer_range=0.2))
        return gradient_errors(method, model, batch)

    full = errors("full")
    assert full["grad_error"] == 0 and 0 < full["grad_error_ref"] < 1e-4 and not full["grad_error_flag"]
    # six fp32 MEFT3 layers reconstructed in one go in float: rounding divided by 0.01 per layer, far above fp32's own
    whole = errors("meft3[stream_arithmetic=float]")
    assert whole["grad_error_flag"] and whole["grad_error"] > 100 * whole["grad_error_ref"]
    assert whole["grad_error_worst"] == "layer 0"  # reconstruction errors grow from the top down
    # the default fixed-point streams reconstruct the same six layers exactly
    exact = errors("meft3")
    assert not exact["grad_error_flag"] and exact["grad_error"] < 10 * exact["grad_error_ref"]
    # one layer per segment: no reconstruction through other layers, autograd's level
    split = errors("meft3[segment_layers=1,stream_arithmetic=float]")
    assert not split["grad_error_flag"] and split["grad_error"] < 10 * split["grad_error_ref"]
    # checkpointing recomputes the same function
    assert errors("full+gc", layers=2)["grad_error"] < 1e-6
