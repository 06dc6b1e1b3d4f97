"""OPT decoders (learned positions, biased projections) go through the same pipeline and checkpoint."""

import torch
from helpers.quant import options, stored_reference, windows

from peftkit.quant.checkpoint import load_quantized, save_quantized
from peftkit.quant.pipeline import quantize_model


def tiny_opt(seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("opt", vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_opt_apiq_bw_calibrates_saves_and_reloads(tmp_path):
    model = tiny_opt()
    lines = []
    result = quantize_model(model, options("apiq-bw", bits=3, epochs=3), windows(6), log=lines.append)
    assert len(lines) == 2 and len(result.weights) == 2 * 6  # q, k, v, out_proj, fc1, fc2
    for block in result.blocks:
        losses = block["calibration"][0]["epoch_losses"]
        assert losses[-1] < losses[0]
    save_quantized(tmp_path / "q", model, result)
    ids = windows(2, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path / "q")(input_ids=ids).logits,
                                   stored_reference(model, result)(input_ids=ids).logits, rtol=0, atol=1e-5)
