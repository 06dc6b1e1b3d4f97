"""Shared pieces of the quantization tests: tiny decoders of every family with some structure and option sets."""

from types import SimpleNamespace

import torch

_DECODER = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3)
# label -> (model_type, config values): hidden 64, 2 blocks, what each family adds switched on where it is optional
# (sliding windows shorter than the test windows, so that a block given another block's mask computes differently)
TINY_DECODERS = {
    "llama": ("llama", dict(_DECODER, tie_word_embeddings=False)),
    "llama3": ("llama", dict(_DECODER, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": ("mistral", dict(_DECODER, sliding_window=8)),
    "qwen2": ("qwen2", dict(_DECODER, use_sliding_window=True, sliding_window=8, max_window_layers=1)),  # q/k/v biases
    "qwen3": ("qwen3", dict(_DECODER, head_dim=16)),  # q_norm, k_norm
    "gemma": ("gemma", dict(_DECODER, head_dim=16)),
    "gemma2": ("gemma2", dict(_DECODER, head_dim=16, sliding_window=8)),  # softcapping, sliding/full blocks alternate
    "phi3": ("phi3", _DECODER),  # fused qkv_proj and gate_up_proj
    "opt": ("opt", dict(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=2,
                        eos_token_id=3)),
    "gpt2": ("gpt2", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=2,
                          eos_token_id=3)),
}


def structured_decoder(label="llama", seed=0, **config):
    """A tiny causal LM of family ``label`` (TINY_DECODERS) whose projections are low rank + noise with a few large
    input columns (outliers), like pretrained weights, so that quantizers can be told apart."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, values = TINY_DECODERS[label]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**values, **config})).eval()
    _structure(model, seed)
    return model


def structured_llama(seed=0, layers=2, hidden=64):
    """A tiny LLaMA whose projections are low rank + noise with a few large input columns (outliers),
    like pretrained weights, so that quantizers can be told apart."""
    from helpers.tiny import tiny_llama

    return _structure(tiny_llama(seed=seed, layers=layers, hidden=hidden).eval(), seed)


def _structure(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "layers" in name:
                out, inp = p.shape
                w = torch.randn(out, 4, generator=g) @ torch.randn(4, inp, generator=g) * 0.05
                w += 0.02 * torch.randn(out, inp, generator=g)
                w[:, torch.randint(0, inp, (2,), generator=g)] *= 6
                p.copy_(w)
    return model


def options(method, bits=2, group_size=16, **kw):
    base = dict(method=method, bits=bits, group_size=group_size, symmetric=False, lora_r=8, lora_alpha=16.0,
                lora_targets=None, loftq_iters=3, epochs=4, lr_lora=2e-3, lr_clip=2e-2, weight_decay=0.0,
                aug_loss=True, batch_size=2, seed=0)
    base.update(kw)
    return SimpleNamespace(**base)


def windows(n=8, length=32, seed=1, vocab=128):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def write_model_dir(directory, label=None, **kw):
    """A tiny structured LLaMA (or decoder of family ``label``) + a tiny tokenizer saved as a transformers checkpoint
    directory."""
    from helpers.tiny import tiny_bert_tokenizer

    (structured_decoder(label, **kw) if label else structured_llama(**kw)).save_pretrained(directory)
    tiny_bert_tokenizer(directory)
    return directory


def write_wikitext(root, words=4000, seed=0):
    """A WikiText-shaped directory with calibration and test files made of the tiny tokenizer's words."""
    import random
    from pathlib import Path

    from helpers.tiny import WORDS

    rng = random.Random(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("wiki.valid.tokens", "wiki.test.raw"):
        (root / name).write_text(" ".join(rng.choice(WORDS) for _ in range(words)) + "\n")
    return root


def write_quantized_setup(root, words: int = 1200):
    """A tiny structured LLaMA dir, its 2-bit RTN `peftkit quantize`-format output and WikiText-shaped text under
    ``root``: (model_dir, quant_dir, wikitext_dir)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.quant.checkpoint import save_quantized
    from peftkit.quant.pipeline import quantize_model

    root = Path(root)
    model_dir = write_model_dir(root / "model")
    data = write_wikitext(root / "wt", words=words)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    result = quantize_model(model, options("rtn", bits=2, group_size=16), None, log=lambda s: None)
    save_quantized(root / "q2", model, result, AutoTokenizer.from_pretrained(model_dir))
    return model_dir, root / "q2", data


def stored_reference(model, result):
    """The reference: the full-precision model with each quantized weight replaced by its codes' value as GPTQ
    kernels compute it (a float16 product) and every other tensor rounded to float16, as the file stores them."""
    import copy

    from peftkit.quant.result import attach_lora

    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.half().float())
        for name, q in result.weights.items():
            w = q.dequantize()
            # GPTQ: a float16 product; unquantized (16-bit) layers: stored as float16; NF: levels x float32 absmax
            reference.get_submodule(name).weight.copy_(w if q.kind == "nf" else w.half().float())
    return attach_lora(reference, result.lora_r, result.lora_alpha, result.lora_targets, result.lora).eval()
