"""The bitsandbytes 4-bit (NF4) checkpoint layout of one quantized Linear, written and read without bitsandbytes.

This is what ``Linear4bit`` saves and what transformers' bitsandbytes integration loads back (bitsandbytes 0.50,
transformers 5). For a Linear with weight (out, in), NF4 codes q (out, in) and one absmax per block of
``blocksize`` consecutive values of the row-major flattened weight (= per group of g input columns of one row,
since g divides in):

  <name>.weight                                  uint8 (out * in / 2, 1): the codes of the flattened weight, two
                                                 per byte, the even-indexed code in the high nibble
  <name>.weight.absmax                           float32 (out * in / g,): the block absmax values, row-major
  <name>.weight.quant_map                        float32 (16,): the NF4 table (informative: bitsandbytes decodes
                                                 nf4 with its own fixed copy of the same table)
  <name>.weight.quant_state.bitsandbytes__nf4    uint8: the UTF-8 bytes of a JSON object
                                                 {"quant_type": "nf4", "blocksize": g, "dtype": "float32",
                                                  "shape": [out, in]}

bitsandbytes decodes W = NF4[q] * absmax in float32, the product peftkit's nf_dequantize computes with the same
table, so both give the same weights bit for bit. Double quantization (nested absmax) is not written. Blocksizes
bitsandbytes accepts for 4-bit: 32, 64, ..., 4096 (``bitsandbytes.functional.dequantize_4bit`` refuses others);
NF2/NF3 codes and other group sizes have no bitsandbytes form and stay in peftkit's own layout.
"""

from __future__ import annotations

import json

import torch

from peftkit.quant.normal_float import nf_levels

BNB_BITS = 4
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPE = "nf4"
STATE_KEY = f"weight.quant_state.bitsandbytes__{QUANT_TYPE}"
DEQUANT_DTYPE = "float32"  # the dtype bitsandbytes dequantizes to (our weights are exact in float32)


def check_storable(bits: int, group_size: int, shape: tuple[int, int]) -> str | None:
    """Why an NF weight of ``shape`` cannot be stored as bitsandbytes 4-bit, or None when it can."""
    if bits != BNB_BITS:
        return f"bitsandbytes stores normal-float codes at 4 bits only, not {bits}"
    if group_size not in BNB_BLOCKSIZES:
        return f"bitsandbytes 4-bit blocks are {', '.join(map(str, BNB_BLOCKSIZES))} values, not {group_size}"
    if shape[1] % group_size:
        return f"in_features {shape[1]} is not a multiple of the group size {group_size}"
    return None


def _state_bytes(state: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)


def to_bnb(codes: torch.Tensor, absmax: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """codes (out, in) in [0, 16), absmax (out, in / g) -> the tensors of one Linear (keys after ``<name>.``)."""
    shape = tuple(codes.shape)
    reason = check_storable(BNB_BITS, group_size, shape)
    if reason:
        raise ValueError(reason)
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() and int(flat.max()) >= 16:
        raise ValueError("NF4 codes must lie in [0, 15]")
    packed = (flat[0::2] << 4) | flat[1::2]  # numel is even: g (>= 32) divides in
    state = {"quant_type": QUANT_TYPE, "blocksize": int(group_size), "dtype": DEQUANT_DTYPE, "shape": list(shape)}
    return {
        "weight": packed.reshape(-1, 1).contiguous(),
        "weight.absmax": absmax.detach().to(torch.float32).reshape(-1).contiguous(),
        "weight.quant_map": nf_levels(BNB_BITS),
        STATE_KEY: _state_bytes(state),
    }


def is_bnb(parts: dict[str, torch.Tensor]) -> bool:
    """Whether one Linear's tensors (keys after ``<name>.``) are in the bitsandbytes 4-bit layout."""
    return any(key.startswith("weight.quant_state.") for key in parts)


def read_state(parts: dict[str, torch.Tensor]) -> dict:
    """The JSON quant state of one Linear, checked to be what ``from_bnb`` can read."""
    keys = [key for key in parts if key.startswith("weight.quant_state.")]
    if keys != [STATE_KEY]:
        raise ValueError(f"expected one {STATE_KEY} entry (bitsandbytes NF4), found {keys}")
    state = json.loads(bytes(parts[STATE_KEY].to(torch.uint8).tolist()).decode("utf-8"))
    if any(key.startswith("weight.nested_") for key in parts) or "nested_blocksize" in state:
        raise ValueError("double-quantized (nested) absmax is not read by peftkit")
    if state.get("quant_type") != QUANT_TYPE:
        raise ValueError(f"quant_type {state.get('quant_type')!r} is not {QUANT_TYPE!r}")
    if int(state.get("blocksize", 0)) not in BNB_BLOCKSIZES or len(state.get("shape") or ()) != 2:
        raise ValueError(f"blocksize {state.get('blocksize')!r} / shape {state.get('shape')!r} are not a 2-D NF4 weight")
    return state


def from_bnb(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The bitsandbytes tensors of one Linear -> codes (out, in) uint8, absmax (out, in / g) float32, g."""
    state = read_state(parts)
    out_features, in_features = (int(s) for s in state["shape"])
    group = int(state["blocksize"])
    if in_features % group:
        raise ValueError(f"in_features {in_features} is not a multiple of the blocksize {group}")
    packed = parts["weight"].reshape(-1).to(torch.uint8)
    if packed.numel() * 2 != out_features * in_features:
        raise ValueError(f"{packed.numel()} bytes do not hold a {out_features}x{in_features} NF4 weight")
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(out_features, in_features)
    absmax = parts["weight.absmax"].to(torch.float32)
    if absmax.numel() != out_features * in_features // group:
        raise ValueError(f"{absmax.numel()} absmax values do not fit blocks of {group} in {out_features}x{in_features}")
    return codes.contiguous(), absmax.reshape(out_features, in_features // group).contiguous(), group


def quantization_config(skip_modules: list[str], compute_dtype: str = "float32") -> dict:
    """config.json's quantization_config for a model whose quantized Linears are bitsandbytes NF4.

    ``skip_modules``: the Linears kept in 16 bits (an untied lm_head, unquantized projections); transformers
    replaces every other Linear by bitsandbytes' Linear4bit before loading the tensors.
    """
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": QUANT_TYPE,
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": sorted(skip_modules),
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def compute_in_float32(model):
    """``model`` (transformers' load of a bitsandbytes 4-bit file) made to compute in float32, as peftkit does.

    transformers keeps a pre-quantized bitsandbytes checkpoint's float tensors (embeddings, norms) in the file's
    float16 whatever dtype is asked for, and bitsandbytes runs eval forwards through a bfloat16 kernel on CPUs with
    AVX512-BF16. Both are compute-dtype choices, not the stored model: undone here, the logits equal peftkit's."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype == torch.float16:
                p.data = p.data.float()
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model
