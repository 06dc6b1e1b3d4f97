"""What ApiQ's objectives compare, checked tensor by tensor against references computed here from whole models.

The calibration is watched through spies on the functions it calls (no seam needed): the arguments the pipeline
hands to ``calibrate_block`` / ``calibrate_linear``, the inputs ``run_block`` and ``capture_linear_input`` see and
the (prediction, target) pairs of every ``mse_loss``. The references are hooks on the full-precision model and on
the quantized model built from the result:

* block i + 1 is calibrated on the quantized chain's output of block i (the error-propagation step);
* ApiQ-bw's target is the FP block on the FP chain, F(X; W); its aug target is the FP block on the quantized chain,
  F(Xq; W); the quantized block runs on Xq;
* ApiQ-lw's target is X W^T with X the Linear's FP-chain input, and the quantized Linear sees its quantized-chain input;
* AdamW gives the clipping logits lr_clip and LoRA lr_lora.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers.quant import options, structured_llama, windows
from torch import nn

from peftkit.models.families import layers_of
from peftkit.quant import apiq
from peftkit.quant.pipeline import build_quantized_model, quantize_model
from peftkit.quant.qlinear import QuantLinear

N_WINDOWS = 4
CLOSE = dict(rtol=1e-4, atol=2e-5)  # the peft model and QuantLinear add the same terms in a different order


class _Stop(Exception):
    pass


def _layers(model):
    return layers_of(model.get_base_model() if hasattr(model, "get_base_model") else model)


def _run(model, ids, handles) -> None:
    """``model`` on ``ids`` (a hook may stop it early with _Stop), then the hooks removed."""
    try:
        with torch.no_grad():
            model(input_ids=ids)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


def _block_inputs_outputs(model, ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every decoder block of ``model`` on ``ids``."""
    seen, handles = {}, []
    for i, block in enumerate(_layers(model)):
        def hook(module, args, kwargs, out, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[i] = (hidden.detach().clone(), (out[0] if isinstance(out, tuple) else out).detach().clone())
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    _run(model, ids, handles)
    return [seen[i] for i in range(len(seen))]


def _block_output_on(model, index, ids, hidden) -> torch.Tensor:
    """Output of block ``index`` of ``model`` when its input is replaced by ``hidden`` (F_i(hidden; model's W))."""
    block, got = _layers(model)[index], {}

    def substitute(module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def capture(module, args, out):
        got["y"] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        raise _Stop

    handles = [block.register_forward_pre_hook(substitute, with_kwargs=True), block.register_forward_hook(capture)]
    _run(model, ids, handles)
    return got["y"]


def _linear_inputs(model, names, ids) -> dict[str, torch.Tensor]:
    """Input of each named Linear (full module names of the plain model) on ``ids``."""
    root = model.base_model.model if hasattr(model, "get_base_model") else model
    seen = {}
    handles = [root.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen.__setitem__(n, args[0].detach().clone())) for n in names]
    _run(model, ids, handles)
    return seen


class _Spies:
    """Records what calibration compares; installed with monkeypatch so nothing outlives the test."""

    def __init__(self, monkeypatch):
        self.blocks, self.linears, self.losses, self.run_inputs, self.captured_q = {}, {}, [], [], {}
        self.current = None
        real_block, real_linear = apiq.calibrate_block, apiq.calibrate_linear
        real_run, real_capture = apiq.run_block, apiq.capture_linear_input

        def calibrate_block(qblock, qlinears, x_q, y_fp, y_aug, kwargs, settings, where):
            self.current = where
            self.blocks[where] = SimpleNamespace(x_q=x_q.clone(), y_fp=y_fp.clone(),
                                                 y_aug=None if y_aug is None else y_aug.clone())
            return real_block(qblock, qlinears, x_q, y_fp, y_aug, kwargs, settings, where)

        def calibrate_linear(qblock, qlinear, inputs_fp, x_q, kwargs, settings, where):
            self.current = where
            self.linears[where] = SimpleNamespace(qlinear=qlinear, inputs_fp=inputs_fp.clone(), x_q=x_q.clone())
            return real_linear(qblock, qlinear, inputs_fp, x_q, kwargs, settings, where)

        def run_block(block, hidden, kwargs):
            self.run_inputs.append((self.current, hidden.detach().clone()))
            return real_run(block, hidden, kwargs)

        def capture_linear_input(block, linear, hidden, kwargs, batch_size):
            got = real_capture(block, linear, hidden, kwargs, batch_size)
            self.captured_q[self.current] = got.clone()
            return got

        def mse_loss(prediction, target, *args, **kwargs):
            self.losses.append((self.current, prediction.detach().clone(), target.detach().clone()))
            return F.mse_loss(prediction, target, *args, **kwargs)

        # the quantizers (peftkit/quant/quantizers/apiq_*.py) look these up in apiq when they run
        monkeypatch.setattr(apiq, "calibrate_block", calibrate_block)
        monkeypatch.setattr(apiq, "calibrate_linear", calibrate_linear)
        monkeypatch.setattr(apiq, "run_block", run_block)
        monkeypatch.setattr(apiq, "capture_linear_input", capture_linear_input)
        monkeypatch.setattr(apiq, "F", SimpleNamespace(mse_loss=mse_loss, linear=F.linear))

    def losses_of(self, where):
        return [(p, t) for w, p, t in self.losses if w == where]


def _calibrate(method, monkeypatch, **kw):
    """(spies, fp model, quantized peft model, ids): one epoch, all windows in one batch (one loss per objective)."""
    model, ids = structured_llama(), windows(N_WINDOWS, length=16)
    spies = _Spies(monkeypatch)
    opts = options(method, epochs=1, batch_size=N_WINDOWS, **kw)
    result = quantize_model(model, opts, ids, log=lambda s: None)
    monkeypatch.undo()
    quantized = build_quantized_model(copy.deepcopy(model), result).eval()
    return spies, model, quantized, ids


@pytest.fixture(scope="module")
def bw():
    with pytest.MonkeyPatch.context() as mp:
        yield _calibrate("apiq-bw", mp)


@pytest.fixture(scope="module")
def lw():
    with pytest.MonkeyPatch.context() as mp:
        yield _calibrate("apiq-lw", mp)


def test_bw_next_block_is_calibrated_on_the_quantized_chain(bw):
    spies, model, quantized, ids = bw
    fp_io, q_io = _block_inputs_outputs(model, ids), _block_inputs_outputs(quantized, ids)
    assert set(spies.blocks) == {"block 0", "block 1"}
    torch.testing.assert_close(spies.blocks["block 0"].x_q, fp_io[0][0], **CLOSE)  # the embeddings, for both chains
    x_q = spies.blocks["block 1"].x_q
    torch.testing.assert_close(x_q, q_io[1][0], **CLOSE)  # = the quantized block 0's output
    assert not torch.allclose(x_q, fp_io[1][0], **CLOSE)  # ... which is not the FP chain's


def test_bw_target_is_the_fp_block_on_the_fp_chain_and_aug_target_the_fp_block_on_the_quantized_chain(bw):
    spies, model, quantized, ids = bw
    fp_io, q_io = _block_inputs_outputs(model, ids), _block_inputs_outputs(quantized, ids)
    block = spies.blocks["block 1"]
    y_fp = fp_io[1][1]  # F(X; W)
    y_aug = _block_output_on(model, 1, ids, q_io[1][0])  # F(Xq; W)
    torch.testing.assert_close(block.y_fp, y_fp, **CLOSE)
    torch.testing.assert_close(block.y_aug, y_aug, **CLOSE)
    assert not torch.allclose(y_fp, y_aug, **CLOSE)
    # the loss compares the quantized block's output with exactly these two targets
    (p1, t1), (p2, t2) = spies.losses_of("block 1")
    torch.testing.assert_close(t1, y_fp, **CLOSE)
    torch.testing.assert_close(t2, y_aug, **CLOSE)
    assert torch.equal(p1, p2)
    # ... and the quantized block ran on the quantized chain
    inputs = [h for w, h in spies.run_inputs if w == "block 1"]
    assert inputs and all(torch.allclose(h, q_io[1][0], **CLOSE) for h in inputs)


def test_bw_without_aug_compares_with_the_fp_target_only(monkeypatch):
    spies, model, _, ids = _calibrate("apiq-bw", monkeypatch, aug_loss=False)
    assert spies.blocks["block 1"].y_aug is None
    losses = spies.losses_of("block 1")
    assert len(losses) == 1  # no aug term
    torch.testing.assert_close(losses[0][1], _block_inputs_outputs(model, ids)[1][1], **CLOSE)


def test_lw_next_block_is_calibrated_on_the_quantized_chain(lw):
    spies, model, quantized, ids = lw
    q_io, fp_io = _block_inputs_outputs(quantized, ids), _block_inputs_outputs(model, ids)
    names = [w for w in spies.linears if w.startswith("block 1 ")]
    assert names
    for where in names:
        torch.testing.assert_close(spies.linears[where].x_q, q_io[1][0], **CLOSE)
    assert not torch.allclose(q_io[1][0], fp_io[1][0], **CLOSE)


def test_lw_target_is_W_times_the_fp_input_and_the_quantized_linear_sees_the_quantized_input(lw):
    spies, model, quantized, ids = lw
    full = {where: "model.layers.{}.{}".format(*where.split(" ")[1:]) for where in spies.linears}
    fp_inputs = _linear_inputs(model, list(full.values()), ids)
    q_inputs = _linear_inputs(quantized, list(full.values()), ids)
    differing = 0
    for where, name in full.items():
        linear = model.get_submodule(name)
        x_fp, x_q = fp_inputs[name], q_inputs[name]
        torch.testing.assert_close(spies.linears[where].inputs_fp, x_fp, **CLOSE)
        torch.testing.assert_close(spies.captured_q[where], x_q, **CLOSE)
        [(prediction, target)] = spies.losses_of(where)
        with torch.no_grad():
            torch.testing.assert_close(target, F.linear(x_fp, linear.weight, linear.bias), **CLOSE)
        differing += not torch.allclose(x_fp, x_q, **CLOSE)
    assert differing >= len(full) // 2  # most Linears see a drifted input: a target from Xq would be told apart


def test_lw_quantized_linear_is_fed_its_quantized_chain_input(monkeypatch):
    """The prediction of each layer's loss is the QuantLinear on Xq (checked at the moment of the loss)."""
    real = QuantLinear.forward
    fed = []

    def forward(self, x):
        fed.append((self, x.detach().clone()))
        return real(self, x)

    monkeypatch.setattr(QuantLinear, "forward", forward)
    spies, model, quantized, ids = _calibrate("apiq-lw", monkeypatch)  # also undoes the spy on forward
    for where, record in spies.linears.items():
        name = "model.layers.{}.{}".format(*where.split(" ")[1:])
        x_q = _linear_inputs(quantized, [name], ids)[name]
        own = [x for q, x in fed if q is record.qlinear and x.shape == x_q.shape]
        assert own and any(torch.allclose(x, x_q, **CLOSE) for x in own), where
        x_fp = _linear_inputs(model, [name], ids)[name]
        if not torch.allclose(x_fp, x_q, **CLOSE):
            assert not any(torch.allclose(x, x_fp, **CLOSE) for x in own), where


def test_clipping_logits_get_lr_clip_and_lora_gets_lr_lora():
    """One AdamW step from zero moments moves each element by ~lr (|m / sqrt(v)| = 1): the step size shows each
    parameter group's learning rate directly."""
    torch.manual_seed(0)
    q = QuantLinear(nn.Linear(32, 16), bits=2, group_size=16, lwc=True, r=4, scaling=2.0)
    with torch.no_grad():
        q.lora_B.copy_(torch.randn(q.lora_B.shape) * 0.1)  # so that A gets a gradient too
    before = {n: p.detach().clone() for n, p in q.named_parameters() if p.requires_grad}
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    target = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    lr_lora, lr_clip = 3e-4, 5e-2
    settings = apiq.CalibSettings(epochs=1, lr_lora=lr_lora, lr_clip=lr_clip, weight_decay=0.0, batch_size=8)
    apiq._optimize([q], lambda b: F.mse_loss(q(x), target), 1, settings, apiq.CalibReport("layer"))
    moved = {n: (p.detach() - before[n]).abs() for n, p in q.named_parameters() if n in before}
    for name, lr in (("gamma", lr_clip), ("beta", lr_clip), ("lora_A", lr_lora), ("lora_B", lr_lora)):
        step = moved[name]
        assert step.max().item() == pytest.approx(lr, rel=0.05), name
        assert step.max().item() <= lr * 1.0001, name
