"""ApiQ calibration on a tiny LLaMA: losses fall, errors rank ApiQ <= LoftQ <= RTN, 16 bits = FP, NaN is survived."""

import copy

import pytest
import torch
from helpers.quant import options, structured_llama, windows

from peftkit.quant import apiq
from peftkit.quant.pipeline import build_quantized_model, quantize_model


def _last_block_output(model, ids):
    """Output of the last decoder block (before the final norm) on ``ids``."""
    from peftkit.models.families import layers_of

    got = {}
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    handle = layers_of(model)[-1].register_forward_hook(lambda m, a, o: got.__setitem__("y", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return got["y"]


def _held_out_error(fp_model, opts, calib, held_out):
    result = quantize_model(fp_model, opts, calib, log=lambda s: None)
    quantized = build_quantized_model(copy.deepcopy(fp_model), result)
    y_fp, y_q = _last_block_output(fp_model, held_out), _last_block_output(quantized, held_out)
    return ((y_q - y_fp).norm() / y_fp.norm()).item(), result


@pytest.mark.parametrize("method", ["apiq-lw", "apiq-bw"])
def test_calibration_loss_decreases(method):
    model = structured_llama()
    result = quantize_model(model, options(method, epochs=4), windows(), log=lambda s: None)
    for block in result.blocks:
        for report in block["calibration"]:
            losses = report["epoch_losses"]
            assert len(losses) == 4 and losses[-1] < losses[0], (report["where"], losses)


def test_bits_none_reproduces_the_fp_model():
    model = structured_llama()
    ids = windows(2)
    for method in ("rtn", "apiq-bw"):
        result = quantize_model(model, options(method, bits=None), windows(), log=lambda s: None)
        quantized = build_quantized_model(copy.deepcopy(model), result)
        with torch.no_grad():
            torch.testing.assert_close(quantized(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3])
def test_apiq_beats_loftq_beats_rtn_on_held_out_windows(bits):
    """Output error of the last block on windows not used for calibration (fixed seeds, same LoRA rank)."""
    model = structured_llama()
    calib, held_out = windows(32, seed=1), windows(4, seed=2)
    err = {m: _held_out_error(model, options(m, bits=bits, epochs=4, batch_size=1), calib, held_out)[0]
           for m in ("rtn", "loftq", "apiq-lw", "apiq-bw")}
    assert err["apiq-lw"] <= err["loftq"] and err["apiq-bw"] <= err["loftq"] <= err["rtn"], err  # nan fails


def test_model_is_left_full_precision():
    model = structured_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_model(model, options("apiq-lw", epochs=1), windows(4), log=lambda s: None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_progress_line_per_block_reports_its_loss():
    lines = []
    quantize_model(structured_llama(), options("apiq-bw", epochs=2), windows(4), log=lines.append)
    assert len(lines) == 2 and all("loss" in line and "rel. output error" in line for line in lines)


def test_nan_loss_is_reported_and_falls_back_to_rtn(monkeypatch, capsys):
    real_run_block = apiq.run_block

    def poisoned(block, hidden, kwargs):  # every training forward of the block turns NaN
        return real_run_block(block, hidden, kwargs) * float("nan")

    monkeypatch.setattr(apiq, "run_block", poisoned)
    model = structured_llama()
    result = quantize_model(model, options("apiq-bw", epochs=1), windows(4), log=lambda s: None)
    monkeypatch.undo()
    for i, block in enumerate(result.blocks):
        assert len(block["nan_events"]) == apiq.MAX_RETRIES + 1
        assert all(e.startswith(f"block {i}:") for e in block["nan_events"])
        assert block["calibration"][0]["fell_back_to_rtn"]
        assert torch.isfinite(torch.tensor(block["rel_output_error"]))
    assert "falling back to RTN" in capsys.readouterr().out
    # the fall-back is exactly RTN with B = 0
    rtn = quantize_model(model, options("rtn"), None, log=lambda s: None)
    for name, q in result.weights.items():
        assert torch.equal(q.dequantize(), rtn.weights[name].dequantize())
        assert torch.count_nonzero(result.lora[name][1]) == 0
