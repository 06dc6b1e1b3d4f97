"""Weight quantization for LoRA fine-tuning: RTN, normal-float (QLoRA), LoftQ, ApiQ and GPTQ, on any pre-norm decoder.

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
  checks.py           what can be quantized, read from the model's structure (the one check: recipe and pipeline)
  block_inputs.py     each block's inputs and the keyword arguments its decoder passes it, from the model's forward
  blocks.py           decoder blocks of a model: running one alone, linear inputs, forward order, skeleton loading
  apiq.py             ApiQ calibration of one block (layer-wise and block-wise objectives)
  quantizers/         the registered quantizers (QUANTIZERS), one file each: rtn, nf, loftq, apiq_lw, apiq_bw, gptq
  pipeline.py         quantize a whole model block by block through the quantizer; build the quantized model + LoRA
  result.py           QuantResult (what a quantizer produced) and the peft LoRA config it is worn with
  checkpoint.py       save / load a quantized model directory (GPTQ / bitsandbytes / peftkit NF checkpoint + peft
                      adapter), packed

A note on smollm2-135m (the real model used here): its weights were already Q4_1-quantized once
(blocks of 32) before we see them, so "FP" for it means the dequantized fp32 copy.
"""
