"""Weight quantization for LoRA fine-tuning: RTN, normal-float (QLoRA), LoftQ and ApiQ.

One job per module:
  uniform.py          asymmetric/symmetric b-bit group-wise quantizer with learnable weight clipping
  normal_float.py     NF2/NF3/NF4 levels and the absmax group quantizer (QLoRA, LoftQ)
  packing.py          codes <-> real low-bit storage (2/3/4 bits in uint8)
  gptq_format.py      codes, scales, zeros <-> GPTQ tensors (qweight, qzeros, scales, g_idx; gptq_v2)
  bnb_format.py       NF4 codes, absmax <-> bitsandbytes 4-bit tensors (weight, absmax, quant_map, quant_state)
  packed_linear.py    PackedLinear: the run-time Linear that keeps its weight packed (unpacked per matmul)
  quantized_weight.py one quantized matrix: codes (held packed) + scales (+ zeros), dequantize
  qlinear.py          QuantLinear: fake-quant weight + LoRA, the module calibration trains
  loftq.py            LoftQ initialisation (alternating quantization and rank-r SVD)
  blocks.py           decoder blocks of a model: cached block inputs, target linears, forward order
  apiq.py             ApiQ calibration of one block (layer-wise and block-wise objectives)
  pipeline.py         quantize a whole model block by block; build the quantized model + LoRA
  gptq_baseline.py    the GPTQ baseline of the quant bench (GPTQModel's solver, imported only there)
  checkpoint.py       save / load a quantized model directory (GPTQ / bitsandbytes / peftkit NF checkpoint + peft
                      adapter), packed

A note on smollm2-135m (the real model used here): its weights were already Q4_1-quantized once
(blocks of 32) before we see them, so "FP" for it means the dequantized fp32 copy.
"""
